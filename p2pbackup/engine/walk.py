"""The walk of a backup: from the targets to the trees of a snapshot.

* the **walker** (:class:`TreeWalk`) visits the targets depth first, in name
  order, and the directories from / down to them. For each directory it
  **plans** every entry — a regular file read by the pipeline
  (:mod:`.pipeline`) or taken from the file cache, a subdirectory walked, a
  symlink, fifo or device stored as it is, a socket left out and named, each
  with its **extended attributes** (POSIX ACLs among them) — then a task of
  the directory's own stores its **tree** blob once every entry is done. The
  walker itself never waits for file data, so the workers always have the
  next files queued (it waits only when the job queue is full).
* **listings** come from a walk run ahead by the lister process
  (:mod:`.lister`), with the extended attributes of the entries listed.
* **hard links** (:class:`HardLinks`) — a file with more names is read once,
  at the first name met; the others are links to it, in one **group**.
* the **file cache** (:class:`FileCache`) — a file whose size, times and
  inode are those the last backup saw is **unchanged**: its content is taken
  from the cache, and it is not read.

What the walk finds it counts into a :class:`WalkTally` (the backup's summary).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Mapping
from typing import Generic, Protocol, TypeVar

import attrs
import trio

from p2pbackup.core import blobs, formats
from p2pbackup.core.exclude import ExcludeRules
from p2pbackup.engine.index import CachedFile, Index
from p2pbackup.engine.lister import ListingAhead
from p2pbackup.engine.listing import read_xattrs
from p2pbackup.engine.listwire import Xattrs
from p2pbackup.engine.pipeline import FileWork, Pipeline
from p2pbackup.model import BlobType, FileStat, NodeKind, Tree, TreeNode

_T = TypeVar("_T")

log = logging.getLogger(__name__)


class WalkTally(Protocol):
    """What a walk counts (see :class:`~p2pbackup.engine.backup.BackupSummary`)."""

    files_new: int
    files_changed: int
    files_unchanged: int
    bytes_unchanged: int
    dirs: int
    symlinks: int
    total_size: int
    blobs_new: int
    excluded: int
    skipped: list[tuple[str, str]]


def _count_file(tally: WalkTally, counted: str) -> None:
    """Count a file the walk found ``counted`` ("new", "changed" or "unchanged")."""
    if counted == "new":
        tally.files_new += 1
    elif counted == "changed":
        tally.files_changed += 1
    else:
        tally.files_unchanged += 1


class HardLinks(Generic[_T]):
    """The files with more than one name met in one walk, by inode.

    Each such file is a **group**, numbered from 1 in the order met. The
    **primary** is what stands for its first name met, which alone is read;
    every later name is a link to it, not read again, and restored as a hard
    link. Group 0 is no group.
    """

    def __init__(self) -> None:
        self._groups: dict[tuple[int, int], tuple[int, _T]] = {}

    def meet(self, st: os.stat_result, name: _T) -> tuple[int, _T]:
        """Meet ``name``, a name of the file ``st`` describes: the file's group
        and its primary (``name`` itself, unless a name of it was met before)."""
        if st.st_nlink <= 1:
            return 0, name
        key = (st.st_dev, st.st_ino)
        known = self._groups.get(key)
        if known is None:
            known = self._groups[key] = (len(self._groups) + 1, name)
        return known


class FileCache:
    """The file cache's part in one backup (:meth:`Index.cached_files_in`).

    A file is **unchanged** when its size, mtime, ctime and inode are those
    the cache kept and every chunk of the content kept is still stored: its
    content is taken from the cache, and the file is not read. The files
    that were read are remembered for the next backup (the entries of
    unchanged files are right already, and are not written again).
    """

    def __init__(self, index: Index, known: Callable[[bytes], bool]) -> None:
        self._index = index
        #: Whether a blob id is stored (or claimed in this run).
        self._known = known
        self._read: list[tuple[bytes, CachedFile]] = []

    def directory(self, path: bytes) -> dict[bytes, CachedFile]:
        """Name → cache entry for the files of the directory ``path``."""
        return self._index.cached_files_in(path)

    def unchanged(self, cached: CachedFile, st: os.stat_result) -> bool:
        return (cached.size, cached.mtime_ns, cached.ctime_ns, cached.inode) == (
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
            st.st_ino,
        ) and all(self._known(c) for c in cached.content)

    def record(
        self, path: bytes, st: os.stat_result | FileStat, content: tuple[bytes, ...]
    ) -> None:
        """Remember a file just read, as ``st`` found it."""
        self._read.append(
            (path, CachedFile(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, content))
        )

    def write_back(self) -> None:
        """Write the entries of the files read to the index (in the caller's
        transaction, the snapshot's)."""
        self._index.cache_files(self._read)


@attrs.define(eq=False)
class _Link:
    """A second name of a hard-linked file: same content as ``primary``."""

    name: bytes
    st: os.stat_result
    group: int
    primary: FileWork


@attrs.define(eq=False)
class _TreeFuture:
    """The id of a directory's tree, once every entry in it is stored.

    ``None`` when the directory could not be listed (it is left out).
    """

    _done: trio.Event = attrs.Factory(trio.Event)
    _tree_id: bytes | None = None

    @classmethod
    def failed(cls) -> _TreeFuture:
        future = cls()
        future._done.set()
        return future

    def resolve(self, tree_id: bytes) -> None:
        self._tree_id = tree_id
        self._done.set()

    async def wait(self) -> bytes | None:
        await self._done.wait()
        return self._tree_id


@attrs.define(eq=False)
class _Entry:
    """A directory entry waiting to become a tree node."""

    name: bytes
    path: bytes
    st: os.stat_result
    node: TreeNode | None = None
    work: FileWork | None = None
    #: The hard-link group of ``work`` (0: none).
    group: int = 0
    link: _Link | None = None
    subtree: _TreeFuture | None = None
    #: Its extended attributes, read with its directory's listing (None:
    #: not listed, a target or a directory above one; read when finished).
    xattrs: Xattrs | None = None


class TreeWalk:
    """The walker of one backup (module docstring)."""

    def __init__(
        self,
        pipeline: Pipeline,
        file_cache: FileCache,
        exclude: ExcludeRules,
        tally: WalkTally,
        dedup_key: bytes,
        *,
        told: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._told = told
        self._file_cache = file_cache
        self._exclude = exclude
        self._tally = tally
        self._dedup_key = dedup_key
        self._listings = ListingAhead(exclude)
        self._hardlinks = HardLinks[FileWork]()
        self._trees: trio.Nursery | None = None
        self._targets: frozenset[bytes] = frozenset()
        #: Each target's own node as stored (the root "/" has none), once
        #: :meth:`save` returned: what a backup that skips if unchanged
        #: compares with its parent's.
        self.target_nodes: dict[bytes, TreeNode] = {}

    async def start_listing(self, targets: list[bytes]) -> None:
        """Start listing ahead for a walk down to ``targets``, before
        :meth:`save` (and :meth:`aclose` after it)."""
        roots = [t for t in sorted(targets, key=_components) if _is_dir(t)]
        await self._listings.start(roots)

    async def aclose(self) -> None:
        """Stop listing ahead."""
        await self._listings.aclose()

    async def save(self, targets: list[bytes]) -> bytes:
        """Walk from / down to every target; the id of the root tree, once
        every tree below it is stored."""
        self._targets = frozenset(targets)
        async with trio.open_nursery() as trees:
            self._trees = trees
            root_future = await self._save_root(targets)
            await self._pipeline.flush()
        root = await root_future.wait()
        assert root is not None
        return root

    async def _save_root(self, targets: list[bytes]) -> _TreeFuture:
        """Walk from / down to every target; the future gives the root tree id."""
        layout: dict[bytes, object] = {}
        for target in targets:
            parts = [p for p in target.split(b"/") if p]
            level = layout
            for part in parts[:-1]:
                nested = level.setdefault(part, {})
                assert isinstance(nested, dict)
                level = nested
            if parts:
                level[parts[-1]] = None
        if not layout:  # the target is "/" itself
            return await self._save_dir(b"/", os.lstat(b"/").st_dev)
        return await self._save_layout(b"", layout)

    async def _save_layout(self, prefix: bytes, layout: dict[bytes, object]) -> _TreeFuture:
        entries: list[tuple[bytes, os.stat_result]] = []
        subdirs: dict[bytes, dict[bytes, object]] = {}
        for name in sorted(layout):
            below = layout[name]
            st = os.lstat(prefix + b"/" + name)
            if below is None:
                entries.append((name, st))
            else:
                assert isinstance(below, dict)
                subdirs[name] = below
        return await self._save_entries(prefix, entries, subdirs, None, None)

    async def _save_dir(self, path: bytes, device: int) -> _TreeFuture:
        """Plan the directory ``path`` (on ``device``), unless it cannot be
        listed or holds a marker (then it is left out: the future fails)."""
        listing, xattrs = await self._listings.listing(path)
        if isinstance(listing, OSError):
            self._tally.skipped.append((os.fsdecode(path), f"cannot list: {listing.strerror}"))
            return _TreeFuture.failed()
        if self._exclude.marked(name for name, _st in listing):
            self._tally.excluded += 1
            return _TreeFuture.failed()
        self._tally.dirs += 1
        return await self._save_entries(path.rstrip(b"/"), listing, {}, device, xattrs)

    async def _save_entries(
        self,
        prefix: bytes,
        entries: list[tuple[bytes, os.stat_result]],
        layout_dirs: dict[bytes, dict[bytes, object]],
        device: int | None,
        xattrs: Mapping[bytes, Xattrs] | None,
    ) -> _TreeFuture:
        """Plan one directory (on ``device``; None for the directories above
        the targets and the targets themselves): its files go to the workers,
        its subdirectories are walked, and a task stores its tree once all of
        them are done. ``xattrs``: its entries' extended attributes, read
        with its listing (None: not listed)."""
        pending: list[_Entry] = []
        cache = self._file_cache.directory(prefix)
        for name, st in entries:
            path = prefix + b"/" + name
            if self._exclude.leaves_out(path, st.st_dev, device):
                self._tally.excluded += 1
                continue
            entry = _Entry(name, path, st=st)
            if xattrs is not None:
                entry.xattrs = xattrs.get(name, ())
            pending.append(entry)
            if stat.S_ISREG(st.st_mode):
                await self._plan_file(entry, path, st, cache)
            elif stat.S_ISDIR(st.st_mode):
                entry.subtree = await self._save_dir(path, st.st_dev)
            else:
                entry.node = self._special_node(path, name, st)
        for name in sorted(layout_dirs):
            path = prefix + b"/" + name
            entry = _Entry(name, path, st=os.lstat(path))
            entry.subtree = await self._save_layout(path, layout_dirs[name])
            pending.append(entry)
        future = _TreeFuture()
        assert self._trees is not None
        self._trees.start_soon(self._finish_tree, future, pending)
        return future

    async def _finish_tree(self, future: _TreeFuture, pending: list[_Entry]) -> None:
        nodes = [node for node in [await self._finish_entry(e) for e in pending] if node]
        nodes.sort(key=lambda n: n.name)
        future.resolve(await self._save_tree(Tree(tuple(nodes))))

    async def _plan_file(
        self, entry: _Entry, path: bytes, st: os.stat_result, cache: dict[bytes, CachedFile]
    ) -> None:
        """Decide how a regular file is saved: as a link to a name met
        before, from the file cache, or read by a worker."""
        work = FileWork(path, st)
        group, primary = self._hardlinks.meet(st, work)
        if primary is not work:
            entry.link = _Link(entry.name, st, group, primary)
            return
        entry.work, entry.group = work, group
        cached = cache.get(entry.name)
        if cached is not None and self._file_cache.unchanged(cached, st):
            work.content, work.final_st = cached.content, st
            work.counted = "unchanged"
            _count_file(self._tally, work.counted)
            self._tally.bytes_unchanged += st.st_size
            return
        work.counted = "new" if cached is None else "changed"
        _count_file(self._tally, work.counted)
        if self._told is not None:
            self._told(work.counted, path)
        await self._pipeline.read(work)

    async def _finish_entry(self, entry: _Entry) -> TreeNode | None:
        node = await self._entry_node(entry)
        if node is None:
            return None
        xattrs = entry.xattrs if entry.xattrs is not None else read_xattrs(entry.path)
        if xattrs:
            node = attrs.evolve(node, xattrs=xattrs)
        if entry.path in self._targets:
            self.target_nodes[entry.path] = node
        return node

    async def _entry_node(self, entry: _Entry) -> TreeNode | None:
        tally = self._tally
        if entry.subtree is not None:
            tree_id = await entry.subtree.wait()
            if tree_id is None:
                return None
            return _dir_node(entry.name, entry.st, tree_id)
        if entry.node is not None or (entry.work is None and entry.link is None):
            return entry.node
        if entry.link is not None:
            primary = entry.link.primary
            if primary.job is not None:
                await self._pipeline.wait_read(primary.job)
            if primary.error is not None:
                return None
            # A further name counts as its first did: on a first backup a
            # hard link is new, not "unchanged".
            _count_file(tally, primary.counted)
            tally.total_size += entry.link.st.st_size
            return _file_node(entry.name, entry.link.st, primary.content, entry.link.group)
        work = entry.work
        assert work is not None
        if work.job is not None:
            await self._pipeline.wait_read(work.job)
            if work.error is not None:
                tally.skipped.append((os.fsdecode(work.path), work.error))
                return None
            self._file_cache.record(work.path, work.final_st or work.st, work.content)
        st = work.final_st or work.st
        tally.total_size += st.st_size
        return _file_node(entry.name, st, work.content, entry.group)

    async def _save_tree(self, tree: Tree) -> bytes:
        data = formats.encode_tree(tree, checked=False)
        ident = blobs.blob_id(self._dedup_key, data)
        stored = await self._pipeline.store_small_blob(
            BlobType.TREE, ident, data, check=formats.decode_tree
        )
        if stored:
            self._tally.blobs_new += 1
        return ident

    def _special_node(self, path: bytes, name: bytes, st: os.stat_result) -> TreeNode | None:
        """The node of a symlink, a fifo or a device; None (and a note) for a socket."""
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            self._tally.symlinks += 1
            return TreeNode(
                name=name,
                kind=NodeKind.SYMLINK,
                mode=stat.S_IMODE(mode),
                mtime_ns=st.st_mtime_ns,
                link_target=os.readlink(path),
                uid=st.st_uid,
                gid=st.st_gid,
            )
        kind = _SPECIAL_KINDS.get(stat.S_IFMT(mode))
        if kind is None:
            # A socket is made by the program that listens on it, never restored.
            self._tally.skipped.append((os.fsdecode(path), "socket, not backed up"))
            return None
        return TreeNode(
            name=name,
            kind=kind,
            mode=stat.S_IMODE(mode),
            mtime_ns=st.st_mtime_ns,
            uid=st.st_uid,
            gid=st.st_gid,
            rdev=st.st_rdev if kind is not NodeKind.FIFO else 0,
        )


def _components(path: bytes) -> list[bytes]:
    """Where the walk meets ``path``: it goes down by name, one component at a time."""
    return path.split(b"/")


def _is_dir(path: bytes) -> bool:
    """Whether ``path`` is a directory the walk lists (not a link to one)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


_SPECIAL_KINDS = {
    stat.S_IFIFO: NodeKind.FIFO,
    stat.S_IFCHR: NodeKind.CHARDEV,
    stat.S_IFBLK: NodeKind.BLOCKDEV,
}


def _dir_node(name: bytes, st: os.stat_result, subtree: bytes) -> TreeNode:
    return TreeNode(
        name=name,
        kind=NodeKind.DIR,
        mode=stat.S_IMODE(st.st_mode),
        mtime_ns=st.st_mtime_ns,
        subtree=subtree,
        uid=st.st_uid,
        gid=st.st_gid,
    )


def _file_node(
    name: bytes, st: os.stat_result | FileStat, content: tuple[bytes, ...], group: int
) -> TreeNode:
    return TreeNode(
        name=name,
        kind=NodeKind.FILE,
        mode=stat.S_IMODE(st.st_mode),
        mtime_ns=st.st_mtime_ns,
        size=st.st_size,
        content=content,
        uid=st.st_uid,
        gid=st.st_gid,
        hardlink_group=group,
    )
