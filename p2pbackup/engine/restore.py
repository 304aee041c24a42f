"""Restore: bring a snapshot (or one path of it) back into a target directory.

The restorer first walks the snapshot's trees and makes a **plan**: the
directories to create, the files to write (each with the packs and offsets of
its chunks), the symlinks, hard links, fifos and devices to make afterwards.
It then reads each
needed pack once — verifying every shard and every blob — and writes the
chunks it holds into **temporary files** beside their final names. A file is
renamed into place only when every byte is written and checked, so a file
never appears half-written under its real name. A chunk of zeros is not
written but left a **hole**, so a sparse file comes back sparse.

Every entry gets its owner (as root), mode, mtime and **extended
attributes** (POSIX ACLs among them) back; an attribute the target cannot
take (a filesystem without them, a namespace only root may write) is named
in the summary, and the entry is restored without it.

Safety rules:

* nothing is written outside the target: names come from trees that
  :mod:`formats` already refused if they held ``/``, ``.`` or ``..``; every
  directory on the way is created by us or checked not to be a symlink;
* an existing file is never replaced by a different one unless ``overwrite``
  is set; such **conflicts** are listed; an identical existing file is left;
* where a pack has fewer than k good shards the restore goes on with
  everything else and names exactly the files it could not restore
  (**unrecoverable**).

**Include** and **exclude** patterns (``backup --exclude``'s rules,
:mod:`p2pbackup.core.exclude`, on the paths as they were backed up) choose
what is restored: an excluded entry is left out with everything under it;
with include patterns, only what one matches is restored, with everything
under it and the directories on the way to it (a directory with nothing
included below is not created). **Verify** reads every file restored back
once all are written, cuts it into chunks as the backup did, and compares
their ids with the snapshot's: a file that differs is a **mismatch**.
"""

from __future__ import annotations

import itertools
import os
import re
import stat
import threading
import time
from pathlib import Path
from typing import Any

import attrs
import trio

from p2pbackup.core import blobs, chunker, formats, packer
from p2pbackup.core.exclude import ExcludeRules
from p2pbackup.engine import runtime
from p2pbackup.engine.index import BlobLocation
from p2pbackup.engine.progress import Progress, human_bytes, human_rate, plural
from p2pbackup.engine.repository import Repository
from p2pbackup.engine.treediff import same_content
from p2pbackup.errors import NotEnoughShardsError, P2PBackupError, UsageError
from p2pbackup.model import BlobEntry, BlobType, NodeKind, Snapshot, Tree, TreeNode
from p2pbackup.nurseries import unwrap_single

#: Packs read and written at once.
_CONCURRENT_PACKS = 2


@attrs.define
class RestoreSummary:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    #: Fifos and devices.
    specials: int = 0
    bytes_written: int = 0
    #: Files already present with the same content (left as they were).
    identical: int = 0
    unrecoverable: list[str] = attrs.Factory(list)
    conflicts: list[str] = attrs.Factory(list)
    failed: list[tuple[str, str]] = attrs.Factory(list)
    #: Entries restored without some of their metadata (extended attributes), and why.
    incomplete_metadata: list[tuple[str, str]] = attrs.Factory(list)
    seconds: float = 0.0
    #: Entries left out by the include and exclude patterns.
    filtered: int = 0
    #: Files read back and found to hold the snapshot's content (``verify``);
    #: None when not asked for.
    verified: int | None = None
    #: Files read back whose content is not the snapshot's, and why.
    mismatches: list[tuple[str, str]] = attrs.Factory(list)

    @property
    def ok(self) -> bool:
        return not (self.unrecoverable or self.conflicts or self.failed or self.mismatches)

    def to_json(self) -> dict[str, object]:
        data = attrs.asdict(self)
        data["failed"] = [{"path": p, "reason": r} for p, r in self.failed]
        data["mismatches"] = [{"path": p, "reason": r} for p, r in self.mismatches]
        data["incomplete_metadata"] = [
            {"path": p, "reason": r} for p, r in self.incomplete_metadata
        ]
        return data

    def lines(self) -> list[str]:
        lines = [
            f"restored {plural(self.files, 'file')}, {plural(self.dirs, 'directory')}, "
            f"{plural(self.symlinks, 'symlink')}"
            + (
                f", {plural(self.specials, 'fifo or device', 'fifos and devices')}"
                if self.specials
                else ""
            )
            + f"; {human_bytes(self.bytes_written)} in {self.seconds:.1f} s "
            f"({human_rate(self.bytes_written, self.seconds)})",
        ]
        if self.identical:
            were = "was" if self.identical == 1 else "were"
            lines.append(
                f"{plural(self.identical, 'file')} {were} already present with the same content"
            )
        if self.filtered:
            lines.append(f"left out {plural(self.filtered, 'entry')} by --include/--exclude")
        if self.verified is not None:
            files = "file" if self.verified == 1 else "files"
            lines.append(
                f"verified {self.verified} {files} against the snapshot: "
                + (f"{len(self.mismatches)} differ" if self.mismatches else "all match")
            )
        for path, reason in self.mismatches:
            lines.append(f"mismatch: {path}: {reason}")
        for path in self.conflicts:
            lines.append(f"conflict (exists and differs; use --overwrite): {path}")
        for path in self.unrecoverable:
            lines.append(f"unrecoverable (too few good shards): {path}")
        for path, reason in self.failed:
            lines.append(f"failed: {path}: {reason}")
        for path, reason in self.incomplete_metadata:
            lines.append(f"restored without some extended attributes: {path}: {reason}")
        return lines


@attrs.define(eq=False)
class _FileJob:
    path: Path
    node: TreeNode
    remaining: int = 0
    temp: Path | None = None
    failed: bool = False
    #: The temp file already carries the node's mode and mtime.
    stamped: bool = False
    #: The parent directory was created by this restore (so it was empty).
    fresh: bool = False


@attrs.define(eq=False)
class _Piece:
    job: _FileJob
    offset: int
    entry: BlobEntry


def _display(path: Path, target: Path) -> str:
    return "/" + str(path.relative_to(target))


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


class Restorer:
    def __init__(
        self,
        repo: Repository,
        target: Path,
        *,
        overwrite: bool = False,
        progress: Progress | None = None,
        include: ExcludeRules | None = None,
        exclude: ExcludeRules | None = None,
        verify: bool = False,
    ) -> None:
        self.repo = repo
        self.target = Path(os.path.abspath(target))
        self.overwrite = overwrite
        #: None: everything is included.
        self.include = include if include is not None and include.patterns else None
        self.exclude = exclude if exclude is not None else ExcludeRules()
        self.verify = verify
        self.progress = progress or Progress("restore", enabled=False)
        self.summary = RestoreSummary()
        self._dirs: list[tuple[Path, TreeNode]] = []
        self._files: list[_FileJob] = []
        self._symlinks: list[tuple[Path, TreeNode]] = []
        self._specials: list[tuple[Path, TreeNode]] = []
        self._hardlinks: dict[int, _FileJob] = {}
        self._links: list[tuple[Path, TreeNode, int]] = []
        self._chown = hasattr(os, "geteuid") and os.geteuid() == 0
        self._own_ids = (os.geteuid(), os.getegid()) if self._chown else (-1, -1)
        self._temp_lock = threading.Lock()
        self._fresh_dirs: set[Path] = set()
        self._temp_numbers = itertools.count()
        self._tree_locations: dict[bytes, BlobLocation] = {}

    async def run(self, snapshot: Snapshot, only: bytes | None = None) -> RestoreSummary:
        started = time.monotonic()
        if self.target.exists() and not _is_real_dir(self.target):
            raise UsageError(f"restore target {self.target} exists and is not a directory")
        self.target.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(self.target)
        with unwrap_single(), runtime.rare_collections():
            await self._plan(snapshot, only)
            await self._write_files()
        self._finish_links()
        self._finish_specials()
        self._finish_dirs()
        if self.verify:
            await self._verify()
        self.progress.close()
        self.summary.seconds = time.monotonic() - started
        return self.summary

    # -- planning ----------------------------------------------------------------

    async def _load_tree(self, tree_id: bytes) -> Tree:
        known = self._tree_locations.get(tree_id)
        data = await self.repo.load_blob(tree_id, BlobType.TREE, known=known)
        return formats.decode_tree(data)

    async def _plan(self, snapshot: Snapshot, only: bytes | None) -> None:
        # One query for where every tree is, not one a tree: with the index
        # out of the page cache each lookup is a few random reads of it.
        self._tree_locations = self.repo.index.blob_locations_of_type(BlobType.TREE)
        components = [c for c in (only or b"").split(b"/") if c]
        tree_id = snapshot.tree
        path = self.target
        for depth, name in enumerate(components):
            try:
                tree = await self._load_tree(tree_id)
            except NotEnoughShardsError:
                self.summary.unrecoverable.append(_display(path, self.target) + " (listing lost)")
                return
            node = next((n for n in tree.nodes if n.name == name), None)
            if node is None:
                raise UsageError(f"path {os.fsdecode(only or b'')} is not in this snapshot")
            if depth == len(components) - 1:
                await self._plan_node(path, node, included=False)
                return
            if node.kind != NodeKind.DIR or node.subtree is None:
                raise UsageError(f"path {os.fsdecode(only or b'')} is not in this snapshot")
            child = path / os.fsdecode(name)
            if not self._make_dir(child, node):
                return
            path = child
            tree_id = node.subtree
        await self._plan_tree(path, tree_id, included=False)

    def _make_dir(self, path: Path, node: TreeNode) -> bool:
        try:
            os.mkdir(path, 0o700)
            # Nothing can be in the way inside a directory this restore made:
            # its files skip the existence checks (two syscalls per file).
            self._fresh_dirs.add(path)
        except FileExistsError:
            if not _is_real_dir(path):
                self.summary.conflicts.append(_display(path, self.target))
                return False
            _remove_stale_temps(path)
        except OSError as exc:
            self.summary.failed.append((_display(path, self.target), str(exc.strerror)))
            return False
        self._dirs.append((path, node))
        return True

    async def _plan_tree(self, path: Path, tree_id: bytes, *, included: bool) -> None:
        try:
            tree = await self._load_tree(tree_id)
        except NotEnoughShardsError:
            self.summary.unrecoverable.append(_display(path, self.target) + "/ (listing lost)")
            return
        for node in tree.nodes:
            await self._plan_node(path, node, included=included)

    def _planned(self) -> int:
        lists: tuple[list[Any], ...] = (
            self._dirs, self._files, self._symlinks, self._specials, self._links)  # fmt: skip
        return sum(len(planned) for planned in lists)

    async def _plan_node(self, parent: Path, node: TreeNode, *, included: bool) -> None:
        """Plan ``node``; ``included``: an include pattern matched a directory above it."""
        path = parent / os.fsdecode(node.name)
        if self.exclude.patterns or self.include is not None:
            where = os.fsencode(_display(path, self.target))
            if self.exclude.excludes(where):
                self.summary.filtered += 1
                return
            included = included or self.include is None or self.include.excludes(where)
        else:
            included = True
        if node.kind == NodeKind.DIR:
            before = self._planned()
            if self._make_dir(path, node) and node.subtree is not None:
                self.summary.dirs += 1
                await self._plan_tree(path, node.subtree, included=included)
                if not included and self._planned() == before + 1:
                    self._drop_dir(path)
        elif not included:
            self.summary.filtered += 1
        elif node.kind == NodeKind.SYMLINK:
            self._symlinks.append((path, node))
        elif node.kind in _SPECIAL_TYPES:
            self._specials.append((path, node))
        elif node.hardlink_group and node.hardlink_group in self._hardlinks:
            self._links.append((path, node, node.hardlink_group))
        else:
            job = _FileJob(path, node, fresh=parent in self._fresh_dirs)
            if node.hardlink_group:
                self._hardlinks[node.hardlink_group] = job
            if self._check_conflict(job):
                self._files.append(job)

    def _drop_dir(self, path: Path) -> None:
        """Undo the plan of a directory with nothing included below it."""
        dropped, _node = self._dirs.pop()
        assert dropped == path
        self.summary.dirs -= 1
        if path in self._fresh_dirs:
            self._fresh_dirs.discard(path)
            os.rmdir(path)

    def _check_conflict(self, job: _FileJob) -> bool:
        """False if an existing entry means this file must not be restored."""
        if job.fresh:
            return True
        try:
            st = os.lstat(job.path)
        except FileNotFoundError:
            return True
        if not stat.S_ISREG(st.st_mode) or (st.st_size != job.node.size and not self.overwrite):
            self.summary.conflicts.append(_display(job.path, self.target))
            job.failed = True
            return False
        return True

    # -- writing ---------------------------------------------------------------------

    async def _write_files(self) -> None:
        by_pack: dict[bytes, list[_Piece]] = {}
        known = self.repo.index.blob_locations_of_type(BlobType.DATA)
        for job in self._files:
            offset = 0
            for chunk_id in job.node.content:
                location = known.get(chunk_id)
                if location is None:
                    job.failed = True
                    self.summary.unrecoverable.append(_display(job.path, self.target))
                    break
                by_pack.setdefault(location.pack_id, []).append(_Piece(job, offset, location.entry))
                offset += location.entry.raw_length
                job.remaining += 1
        for pieces in by_pack.values():
            pieces[:] = [p for p in pieces if not p.job.failed]
        empty = [job for job in self._files if not job.failed and job.remaining == 0]
        for start in range(0, len(empty), 256):
            await self._finish_files(empty[start : start + 256])

        queue = list(by_pack.items())
        limiter = trio.CapacityLimiter(_CONCURRENT_PACKS)

        async def restore_pack(pack_id: bytes, pieces: list[_Piece]) -> None:
            async with limiter:
                await self._restore_pack(pack_id, pieces)

        async with trio.open_nursery() as nursery:
            for pack_id, pieces in queue:
                if pieces:
                    nursery.start_soon(restore_pack, pack_id, pieces)
        # Whatever is left half-written belongs to a file that failed.
        for job in self._files:
            if job.temp is not None and job.failed:
                job.temp.unlink(missing_ok=True)

    async def _restore_pack(self, pack_id: bytes, pieces: list[_Piece]) -> None:
        record = self.repo.index.pack(pack_id, with_blobs=False)
        pieces = [p for p in pieces if not p.job.failed]
        if not pieces:
            return
        try:
            if record is None:
                raise NotEnoughShardsError(f"pack {pack_id.hex()[:16]} is not in the index")
            data = await self.repo.read_pack_pieces(record)
        except NotEnoughShardsError:
            for piece in pieces:
                self._fail(piece.job, None)
            return
        outcomes = await trio.to_thread.run_sync(self._write_pieces, data, pieces)
        del data
        completed: list[_FileJob] = []
        for piece, outcome in zip(pieces, outcomes, strict=True):
            if isinstance(outcome, P2PBackupError):
                self._fail(piece.job, None)
            elif isinstance(outcome, OSError):
                self._fail(piece.job, f"cannot write: {outcome.strerror}")
            elif outcome is not None:
                self.summary.bytes_written += outcome
                piece.job.remaining -= 1
                if piece.job.remaining == 0:
                    completed.append(piece.job)
        if completed:
            await self._finish_files(completed)
        self.progress.update(
            f"{plural(self.summary.files, 'file')}, "
            f"{human_bytes(self.summary.bytes_written)} written"
        )

    def _write_pieces(
        self, pack: list[memoryview], pieces: list[_Piece]
    ) -> list[int | P2PBackupError | OSError | None]:
        """Runs in a worker thread: decrypt and write every piece of one pack.

        One thread call per pack, not per chunk: a home directory's thousands
        of small files would otherwise cost a thread hand-off each.
        """
        outcomes: list[int | P2PBackupError | OSError | None] = []
        for piece in pieces:
            if piece.job.failed:
                outcomes.append(None)
                continue
            try:
                outcomes.append(self._write_piece(pack, piece))
            except (P2PBackupError, OSError) as exc:
                outcomes.append(exc)
        return outcomes

    def _fail(self, job: _FileJob, reason: str | None) -> None:
        if job.failed:
            return
        job.failed = True
        shown = _display(job.path, self.target)
        if reason is None:
            self.summary.unrecoverable.append(shown)
        else:
            self.summary.failed.append((shown, reason))

    def _temp_name(self, job: _FileJob) -> Path:
        return job.path.with_name(f".p2pbackup-{os.getpid()}-{next(self._temp_numbers)}.tmp")

    def _create_temp(self, job: _FileJob) -> None:
        temp = self._temp_name(job)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, job.node.size)
        finally:
            os.close(fd)
        job.temp = temp

    def _write_piece(self, pack: list[memoryview], piece: _Piece) -> int:
        """Runs in a worker thread: decrypt one chunk and write it in place."""
        job = piece.job
        plaintext = blobs.open_blob(
            self.repo.keyring.data_key,
            self.repo.keyring.dedup_key,
            BlobType.DATA,
            piece.entry.blob_id,
            packer.blob_bytes(pack, piece.entry),
            verify_id=False,
        )
        if len(job.node.content) == 1:
            # The common small file: create, write and stamp it through one open.
            temp = self._temp_name(job)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            job.temp = temp
            try:
                if _is_zeros(plaintext):
                    os.ftruncate(fd, len(plaintext))  # a hole, not written blocks
                else:
                    _write_at(fd, plaintext, 0)
                self._stamp(fd, job.path, job.node)
                job.stamped = True
            finally:
                os.close(fd)
            return len(plaintext)
        with self._temp_lock:
            # Two packs may hold pieces of one file: only one creates its temp file.
            if job.temp is None:
                self._create_temp(job)
        assert job.temp is not None
        if _is_zeros(plaintext):
            return len(plaintext)  # the temp file was made at full size: a hole is there
        fd = os.open(job.temp, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            _write_at(fd, plaintext, piece.offset)
        finally:
            os.close(fd)
        return len(plaintext)

    def _stamp(self, fd: int, path: Path, node: TreeNode) -> None:
        """Give an open file the node's owner, extended attributes, mode and
        mtime (after its last write)."""
        # The temp file is ours already: chown only to someone else.
        if self._chown and (node.uid, node.gid) != self._own_ids:
            os.fchown(fd, node.uid, node.gid)
        # Before the mode: a read-only mode would refuse them, and an ACL's
        # entries must agree with the mode set after it.
        self._set_xattrs(fd, path, node)
        os.fchmod(fd, node.mode)
        os.utime(fd, ns=(node.mtime_ns, node.mtime_ns))

    async def _finish_files(self, jobs: list[_FileJob]) -> None:
        outcomes = await trio.to_thread.run_sync(self._place_files, jobs)
        for job, outcome in zip(jobs, outcomes, strict=True):
            if isinstance(outcome, OSError):
                self._fail(job, f"cannot write: {outcome.strerror}")
                if job.temp is not None:
                    job.temp.unlink(missing_ok=True)
            elif outcome == "conflict":
                job.failed = True
                self.summary.conflicts.append(_display(job.path, self.target))
            elif outcome == "identical":
                self.summary.identical += 1
            else:
                self.summary.files += 1

    def _place_files(self, jobs: list[_FileJob]) -> list[str | OSError]:
        """Runs in a worker thread: put finished files in place."""
        outcomes: list[str | OSError] = []
        for job in jobs:
            try:
                if job.temp is None:
                    self._create_temp(job)  # an empty file: nothing was written
                outcomes.append(self._place_file(job))
            except OSError as exc:
                outcomes.append(exc)
        return outcomes

    def _place_file(self, job: _FileJob) -> str:
        """Runs in a worker thread: set metadata, rename into place.

        No fsync per file: a killed restore never shows a partial file (the
        rename comes after the last write), and after a power cut the restore
        is simply run again.
        """
        assert job.temp is not None
        node = job.node
        if not job.fresh and os.path.lexists(job.path):
            if same_content(job.temp, job.path):
                # Same bytes: keep the file, but give it the snapshot's metadata.
                job.temp.unlink()
                self._apply_metadata(job.path, node)
                return "identical"
            if not self.overwrite:
                job.temp.unlink()
                return "conflict"
        if not job.stamped:
            self._apply_metadata(job.temp, node, shown=job.path)
        os.replace(job.temp, job.path)
        return "restored"

    def _apply_metadata(self, path: Path, node: TreeNode, shown: Path | None = None) -> None:
        """Owner, extended attributes, mode and mtime; ``shown`` is the name
        the summary gives the entry (``path`` may be its temp file)."""
        if self._chown:
            os.chown(path, node.uid, node.gid, follow_symlinks=False)
        self._set_xattrs(path, shown or path, node)
        if node.kind != NodeKind.SYMLINK:
            os.chmod(path, node.mode)
        os.utime(path, ns=(node.mtime_ns, node.mtime_ns), follow_symlinks=False)

    def _set_xattrs(self, where: int | Path, shown: Path, node: TreeNode) -> None:
        """Set ``node``'s extended attributes on ``where`` (an open file or a
        path, not followed); those the target refuses are named in the summary."""
        refused = []
        for name, value in node.xattrs:
            try:
                if isinstance(where, int):
                    os.setxattr(where, name, value)
                else:
                    os.setxattr(where, name, value, follow_symlinks=False)
            except OSError as exc:
                refused.append(f"{os.fsdecode(name)} ({exc.strerror})")
        if refused:
            # list.append is atomic: worker threads may report at once.
            self.summary.incomplete_metadata.append(
                (_display(shown, self.target), ", ".join(refused))
            )

    def _finish_links(self) -> None:
        for path, _node, group in self._links:
            primary = self._hardlinks[group]
            shown = _display(path, self.target)
            if primary.failed:
                self.summary.unrecoverable.append(shown)
                continue
            try:
                if os.path.lexists(path):
                    if same_content(primary.path, path):
                        self.summary.identical += 1
                        continue
                    if not self.overwrite:
                        self.summary.conflicts.append(shown)
                        continue
                    os.unlink(path)
                os.link(primary.path, path)
                self.summary.files += 1
            except OSError as exc:
                self.summary.failed.append((shown, str(exc.strerror)))
        for path, node in self._symlinks:
            shown = _display(path, self.target)
            assert node.link_target is not None
            try:
                if os.path.lexists(path):
                    if os.path.islink(path) and os.readlink(path) == os.fsdecode(node.link_target):
                        self.summary.identical += 1
                        continue
                    if not self.overwrite or _is_real_dir(path):
                        self.summary.conflicts.append(shown)
                        continue
                    os.unlink(path)
                os.symlink(node.link_target, path)
                self._apply_metadata(path, node)
                self.summary.symlinks += 1
            except OSError as exc:
                self.summary.failed.append((shown, str(exc.strerror)))

    def _finish_specials(self) -> None:
        """Make the fifos and devices (a device only as root, as mknod demands)."""
        for path, node in self._specials:
            shown = _display(path, self.target)
            file_type = _SPECIAL_TYPES[node.kind]
            try:
                if os.path.lexists(path):
                    st = os.lstat(path)
                    if stat.S_IFMT(st.st_mode) == file_type and st.st_rdev == node.rdev:
                        self._apply_metadata(path, node)
                        self.summary.identical += 1
                        continue
                    if not self.overwrite or _is_real_dir(path):
                        self.summary.conflicts.append(shown)
                        continue
                    os.unlink(path)
                if node.kind == NodeKind.FIFO:
                    os.mkfifo(path, 0o600)
                else:
                    os.mknod(path, file_type | 0o600, node.rdev)
                self._apply_metadata(path, node)
                self.summary.specials += 1
            except OSError as exc:
                self.summary.failed.append((shown, str(exc.strerror)))

    def _finish_dirs(self) -> None:
        # Deepest first: setting a parent's mtime must come after its children change.
        for path, node in sorted(self._dirs, key=lambda d: len(d[0].parts), reverse=True):
            try:
                self._apply_metadata(path, node)
            except OSError as exc:
                self.summary.failed.append((_display(path, self.target), str(exc.strerror)))

    async def _verify(self) -> None:
        """Read every file restored back and compare its chunk ids with the snapshot's."""
        self.summary.verified = 0
        params = self.repo.chunker_params()
        dedup_key = self.repo.keyring.dedup_key
        for job in self._files:
            if job.failed:
                continue
            self.progress.update(f"verifying {_display(job.path, self.target)}")
            problem = await trio.to_thread.run_sync(
                _content_problem, job.path, job.node, params, dedup_key
            )
            if problem is None:
                self.summary.verified += 1
            else:
                self.summary.mismatches.append((_display(job.path, self.target), problem))


#: Temp files are ``.p2pbackup-<pid>-<n>.tmp``: the pid tells whether the
#: restore that wrote one is still running.
_TEMP_NAME = re.compile(rb"\.p2pbackup-(\d+)-\d+\.tmp")


def _content_problem(
    path: Path, node: TreeNode, params: chunker.ChunkerParams, dedup_key: bytes
) -> str | None:
    """Why the file at ``path`` does not hold ``node``'s content; None if it does."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != node.size:
                return f"{size} bytes, not {node.size}"
            ids = [blobs.blob_id(dedup_key, chunk) for chunk in chunker.iter_chunk_views(f, params)]
    except OSError as exc:
        return f"cannot read it back: {exc.strerror}"
    if tuple(ids) != node.content:
        return "its content is not the snapshot's"
    return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _remove_stale_temps(directory: Path) -> None:
    """Delete temp files that a killed restore left in ``directory``."""
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                match = _TEMP_NAME.fullmatch(os.fsencode(entry.name))
                if (
                    match
                    and entry.is_file(follow_symlinks=False)
                    and not _process_alive(int(match[1]))
                ):
                    os.unlink(entry.path)
    except OSError:
        return  # leftovers are harmless; a failed cleanup must not stop a restore


#: The file type each special node is made as.
_SPECIAL_TYPES = {
    NodeKind.FIFO: stat.S_IFIFO,
    NodeKind.CHARDEV: stat.S_IFCHR,
    NodeKind.BLOCKDEV: stat.S_IFBLK,
}


def _is_zeros(data: bytes) -> bool:
    """True for a chunk of zeros (the first byte rules out almost every other)."""
    return data[:1] == b"\0" and data.count(0) == len(data)


def _write_at(fd: int, data: bytes, position: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, position)
        view = view[done:]
        position += done
