"""Looking into snapshots without restoring them: diff, find, dump.

Nouns:

* **change** — :class:`Change`: one path that differs between two snapshots,
  as restic marks it: ``+`` added, ``-`` removed, ``M`` content changed
  (a file's bytes, a symlink's target), ``U`` metadata only (mode, mtime,
  owner, extended attributes), ``T`` type changed (a file that became a
  directory…). Everything below an added or removed directory is added or
  removed too; subtrees with the same tree id are not read at all.
* **match** — a path of a snapshot that a ``find`` pattern matches: a
  pattern without a slash matches a name anywhere, one with a slash the
  whole path (the rules of ``backup --exclude``, :mod:`p2pbackup.core.exclude`).
* **span** — the part of one chunk that a read of a file at an offset
  needs (:func:`chunk_spans`, pure): which chunk, and where in it; how
  ``mount`` reads a file without reading all of it.
* **dump** — a file's bytes, or a directory (the whole snapshot for ``/``)
  as a tar stream, as restic's ``dump`` gives them: POSIX (pax) headers, so
  long names, names that are not UTF-8 (kept as their bytes) and large
  files survive.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import AsyncIterator, Callable

import attrs

from p2pbackup.core.exclude import ExcludeRules
from p2pbackup.engine.repository import Repository
from p2pbackup.engine.snapshots import find_node, load_tree, walk
from p2pbackup.errors import UsageError
from p2pbackup.model import BlobType, NodeKind, Snapshot, TreeNode

ADDED, REMOVED, MODIFIED, METADATA, TYPE = "+", "-", "M", "U", "T"


@attrs.frozen
class Change:
    """One path that differs (module docstring)."""

    kind: str
    path: bytes
    old: TreeNode | None
    new: TreeNode | None


@attrs.define
class DiffStats:
    """What a diff found, counted."""

    files_added: int = 0
    files_removed: int = 0
    files_changed: int = 0
    dirs_added: int = 0
    dirs_removed: int = 0
    others_added: int = 0
    others_removed: int = 0
    metadata_changed: int = 0
    #: Bytes of the files added, and removed; of changed files, before and after.
    bytes_added: int = 0
    bytes_removed: int = 0
    bytes_changed_before: int = 0
    bytes_changed_after: int = 0

    def count(self, change: Change) -> None:
        if change.kind in (ADDED, TYPE) and change.new is not None:
            self._count_side(change.new, added=True)
        if change.kind in (REMOVED, TYPE) and change.old is not None:
            self._count_side(change.old, added=False)
        if change.kind == MODIFIED and change.old is not None and change.new is not None:
            self.files_changed += 1
            self.bytes_changed_before += change.old.size
            self.bytes_changed_after += change.new.size
        if change.kind == METADATA:
            self.metadata_changed += 1

    def _count_side(self, node: TreeNode, *, added: bool) -> None:
        prefix = "added" if added else "removed"
        if node.kind == NodeKind.FILE:
            setattr(self, f"files_{prefix}", getattr(self, f"files_{prefix}") + 1)
            setattr(self, f"bytes_{prefix}", getattr(self, f"bytes_{prefix}") + node.size)
        elif node.kind == NodeKind.DIR:
            setattr(self, f"dirs_{prefix}", getattr(self, f"dirs_{prefix}") + 1)
        else:
            setattr(self, f"others_{prefix}", getattr(self, f"others_{prefix}") + 1)


async def diff(repo: Repository, old: Snapshot, new: Snapshot) -> AsyncIterator[Change]:
    """Every change from ``old`` to ``new``, in path order."""
    async for change in _diff_trees(repo, old.tree, new.tree, b""):
        yield change


async def _diff_trees(
    repo: Repository, old_id: bytes | None, new_id: bytes | None, prefix: bytes
) -> AsyncIterator[Change]:
    if old_id == new_id:
        return
    old = {n.name: n for n in (await load_tree(repo, old_id)).nodes} if old_id else {}
    new = {n.name: n for n in (await load_tree(repo, new_id)).nodes} if new_id else {}
    for name in sorted(old.keys() | new.keys()):
        path = prefix + b"/" + name
        before, after = old.get(name), new.get(name)
        if after is None:
            assert before is not None
            async for change in _whole(repo, REMOVED, path, before):
                yield change
        elif before is None:
            async for change in _whole(repo, ADDED, path, after):
                yield change
        elif before.kind != after.kind:
            yield Change(TYPE, path, before, after)
            if before.subtree is not None:
                async for change in _below(repo, REMOVED, path, before.subtree):
                    yield change
            if after.subtree is not None:
                async for change in _below(repo, ADDED, path, after.subtree):
                    yield change
        else:
            if _content(before) != _content(after):
                yield Change(MODIFIED, path, before, after)
            elif _metadata(before) != _metadata(after):
                yield Change(METADATA, path, before, after)
            if before.kind == NodeKind.DIR:
                async for change in _diff_trees(repo, before.subtree, after.subtree, path):
                    yield change


def _content(node: TreeNode) -> object:
    if node.kind == NodeKind.DIR:
        return None  # a directory's content is its entries, compared one by one
    return (node.size, node.content, node.link_target, node.rdev)


def _metadata(node: TreeNode) -> object:
    return (node.mode, node.mtime_ns, node.uid, node.gid, node.xattrs)


async def _whole(repo: Repository, kind: str, path: bytes, node: TreeNode) -> AsyncIterator[Change]:
    """``node`` and everything below it, all added (or all removed)."""
    yield Change(kind, path, node if kind == REMOVED else None, node if kind == ADDED else None)
    if node.kind == NodeKind.DIR and node.subtree is not None:
        async for change in _below(repo, kind, path, node.subtree):
            yield change


async def _below(repo: Repository, kind: str, path: bytes, tree_id: bytes) -> AsyncIterator[Change]:
    for node in (await load_tree(repo, tree_id)).nodes:
        async for change in _whole(repo, kind, path + b"/" + node.name, node):
            yield change


# -- find ---------------------------------------------------------------------------------


def matcher(patterns: list[str]) -> ExcludeRules:
    """The rules that match what ``find``'s patterns name."""
    if not patterns:
        raise UsageError("find needs a pattern, such as '*.jpg' or '/home/*/notes.txt'")
    return ExcludeRules.from_patterns(patterns)


async def find(
    repo: Repository, snapshot: Snapshot, rules: ExcludeRules
) -> AsyncIterator[tuple[bytes, TreeNode]]:
    """Every (path, node) of ``snapshot`` that ``rules`` match, in path order."""
    async for path, node in walk(repo, snapshot):
        if rules.excludes(path):
            yield path, node


# -- dump ---------------------------------------------------------------------------------

#: Writes bytes to where the dump goes.
ByteSink = Callable[[bytes], None]

_TAR_TYPES = {
    NodeKind.FILE: tarfile.REGTYPE,
    NodeKind.DIR: tarfile.DIRTYPE,
    NodeKind.SYMLINK: tarfile.SYMTYPE,
    NodeKind.FIFO: tarfile.FIFOTYPE,
    NodeKind.CHARDEV: tarfile.CHRTYPE,
    NodeKind.BLOCKDEV: tarfile.BLKTYPE,
}


async def dump(repo: Repository, snapshot: Snapshot, path: bytes, write: ByteSink) -> None:
    """A file's bytes, or a directory as a tar stream, to ``write``."""
    node = await find_node(repo, snapshot, path)
    if node is not None and node.kind == NodeKind.FILE:
        await write_content(repo, node, write)
        return
    if node is not None and node.kind != NodeKind.DIR:
        raise UsageError(
            f"{os.fsdecode(path)} is a {node.kind.name.lower()}: dump takes a file or a directory"
        )
    base = b"/" + b"/".join(c for c in path.split(b"/") if c)
    cut = len(base.rsplit(b"/", 1)[0]) + 1 if base != b"/" else 1
    written = 0
    async for where, entry in walk(repo, snapshot, path):
        name = where[cut:] if where != b"/" else b""
        if not name:
            continue
        info = _tar_info(name, entry)
        header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        write(header)
        written += len(header)
        if entry.kind == NodeKind.FILE:
            await write_content(repo, entry, write)
            padding = -entry.size % tarfile.BLOCKSIZE
            write(bytes(padding))
            written += entry.size + padding
    end = 2 * tarfile.BLOCKSIZE
    written += end
    write(bytes(end + (-written % tarfile.RECORDSIZE)))


def _tar_info(name: bytes, node: TreeNode) -> tarfile.TarInfo:
    info = tarfile.TarInfo(os.fsdecode(name))
    info.type = _TAR_TYPES[node.kind]
    info.mode = stat.S_IMODE(node.mode)
    info.mtime = node.mtime_ns // 1_000_000_000
    info.uid, info.gid = node.uid, node.gid
    if node.kind == NodeKind.FILE:
        info.size = node.size
    if node.link_target is not None:
        info.linkname = os.fsdecode(node.link_target)
    if node.kind in (NodeKind.CHARDEV, NodeKind.BLOCKDEV):
        info.devmajor, info.devminor = os.major(node.rdev), os.minor(node.rdev)
    return info


async def write_content(repo: Repository, node: TreeNode, write: ByteSink) -> None:
    """A file's bytes, chunk by chunk (each read, verified and decrypted)."""
    for blob_id in node.content:
        write(await repo.load_blob(blob_id, BlobType.DATA))


@attrs.frozen
class Span:
    """Bytes ``start``..``end`` of chunk number ``chunk`` of a file."""

    chunk: int
    start: int
    end: int


def chunk_spans(sizes: list[int], offset: int, length: int) -> list[Span]:
    """The spans of a file made of chunks of ``sizes`` bytes that hold its
    bytes ``offset``..``offset + length`` (fewer at the end of the file)."""
    spans = []
    end = offset + length
    at = 0
    for number, size in enumerate(sizes):
        if at >= end:
            break
        start, stop = max(offset - at, 0), min(end - at, size)
        if start < stop:
            spans.append(Span(number, start, stop))
        at += size
    return spans
