"""Backup: turn directory trees into a snapshot of packs on the peers.

The pipeline (each arrow a bounded trio channel, so memory stays bounded
whatever the file sizes):

    walker ─► reader thread: chunk + id ─► 2 sealers: zstd + AEAD ─► packer ─► uploader

* the **walker** visits the given paths depth-first, in name order, and emits
  one :class:`~p2pbackup.model.TreeNode` per entry; a directory's tree blob is
  stored once its children are;
* a **reader** thread chunks one file at a time and computes chunk ids; chunks
  already in the index (or queued in this run) are not sent on — that is the
  deduplication;
* two **sealers** compress and encrypt new blobs in threads (zstd and
  libsodium release the GIL, so both cores work);
* the **packer** fills packs to the target size; the **uploader** erasure-codes
  them, puts the shards on the peers and commits each pack to the index in one
  transaction.

Crash safety follows from the order of commits: a pack enters the index only
after all its shards are stored; the snapshot blob is in the last pack, written
after every pack it depends on; the snapshot becomes visible (index row, root
record) only after that. A backup killed at any point leaves, at worst, shards
that no index entry names (``prune`` removes them).

A file that changes while it is read is read again (twice at most) and, if it
keeps changing, left out of the snapshot and reported — never stored as a mix
of two versions.
"""

from __future__ import annotations

import os
import socket
import stat
import time
from collections.abc import Iterable

import attrs
import trio

from p2pbackup import blobs, chunker, formats, packer
from p2pbackup.errors import UsageError
from p2pbackup.index import CachedFile
from p2pbackup.model import BlobType, IndexSegment, NodeKind, Snapshot, Tree, TreeNode
from p2pbackup.nurseries import unwrap_single
from p2pbackup.progress import Progress, human_bytes
from p2pbackup.repository import Repository

#: How many times a file that changes under us is read before giving up on it.
_READ_ATTEMPTS = 3
#: Channel depths: small, because each item may be a chunk of up to a few MiB.
_SEAL_QUEUE = 4
_PACK_QUEUE = 4
_SEALERS = 2


@attrs.define
class BackupSummary:
    snapshot_id: bytes = b""
    files_new: int = 0
    files_changed: int = 0
    files_unchanged: int = 0
    dirs: int = 0
    symlinks: int = 0
    #: Bytes read from files (unchanged files are not read).
    bytes_read: int = 0
    #: Total size of the files in the snapshot.
    total_size: int = 0
    #: Plaintext bytes of new chunks (after deduplication, before compression).
    bytes_new: int = 0
    #: Plaintext bytes read that were already stored (deduplication savings).
    bytes_deduplicated: int = 0
    blobs_new: int = 0
    packs_written: int = 0
    #: Bytes uploaded to peers, shards and headers, i.e. with redundancy.
    bytes_stored: int = 0
    k: int = 0
    n: int = 0
    seconds: float = 0.0
    #: (path, reason) for everything left out of the snapshot.
    skipped: list[tuple[str, str]] = attrs.Factory(list)

    def to_json(self) -> dict[str, object]:
        data = attrs.asdict(self)
        data["snapshot_id"] = self.snapshot_id.hex()
        data["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]
        return data

    def lines(self) -> list[str]:
        rate = self.bytes_read / self.seconds / 1e6 if self.seconds > 0 else 0.0
        lines = [
            f"files: {self.files_new} new, {self.files_changed} changed, "
            f"{self.files_unchanged} unchanged; {self.dirs} directories, "
            f"{self.symlinks} symlinks",
            f"read {human_bytes(self.bytes_read)} of {human_bytes(self.total_size)}; "
            f"new data {human_bytes(self.bytes_new)}, "
            f"deduplicated {human_bytes(self.bytes_deduplicated)}",
            f"stored {human_bytes(self.bytes_stored)} in {self.packs_written} packs "
            f"({self.k}-of-{self.n} shards)",
            f"took {self.seconds:.1f} s ({rate:.1f} MB/s)",
        ]
        for path, reason in self.skipped:
            lines.append(f"skipped {path}: {reason}")
        return lines


class _FileChanged(Exception):
    """The file changed while it was read."""


@attrs.frozen
class _Sealable:
    blob_type: BlobType
    ident: bytes
    plaintext: bytes


@attrs.frozen
class _Sealed:
    blob_type: BlobType
    ident: bytes
    sealed: bytes
    raw_length: int


def _fsdecode(path: bytes) -> str:
    return os.fsdecode(path)


def normalize_paths(paths: Iterable[str | os.PathLike[str]]) -> list[bytes]:
    """Absolute byte paths, checked to exist, with paths inside others dropped."""
    result: list[bytes] = []
    for path in paths:
        absolute = os.path.abspath(os.fsencode(path))
        if not os.path.lexists(absolute):
            raise UsageError(f"path does not exist: {os.fsdecode(absolute)}")
        result.append(absolute)
    result = sorted(set(result))
    kept: list[bytes] = []
    for candidate in result:
        if any(candidate == k or candidate.startswith(k.rstrip(b"/") + b"/") for k in kept):
            continue
        kept.append(candidate)
    return kept


class Backup:
    """One backup run."""

    def __init__(self, repo: Repository, *, progress: Progress | None = None) -> None:
        self.repo = repo
        config = repo.config
        self.params = chunker.ChunkerParams(
            min_size=config.chunk_min,
            avg_size=config.chunk_avg,
            max_size=config.chunk_max,
            seed=repo.keyring.chunker_seed,
        )
        self.pack_size = config.pack_size
        self.summary = BackupSummary(k=config.k, n=config.n)
        self.progress = progress or Progress("backup", enabled=False)
        self._pending: set[bytes] = set()
        self._hardlinks: dict[tuple[int, int], tuple[int, tuple[bytes, ...]]] = {}
        self._next_hardlink_group = 1
        self._file_cache: list[tuple[bytes, CachedFile]] = []
        self._seal_send: trio.MemorySendChannel[_Sealable] | None = None

    # -- entry point ------------------------------------------------------------

    async def run(
        self, paths: Iterable[str | os.PathLike[str]], tags: Iterable[str] = ()
    ) -> BackupSummary:
        targets = normalize_paths(paths)
        if not targets:
            raise UsageError("nothing to back up: give at least one path")
        self.repo.check_enough_peers()
        started = time.monotonic()
        with unwrap_single():
            snapshot_id, snapshot = await self._run_pipeline(targets, tags)
        self.progress.close()
        await self._write_index_segment()
        with self.repo.index.transaction():
            self.repo.index.add_snapshot(snapshot_id, snapshot)
            self.repo.index.cache_files(self._file_cache)
        await self.repo.publish_root()
        self.summary.snapshot_id = snapshot_id
        self.summary.seconds = time.monotonic() - started
        return self.summary

    async def _run_pipeline(
        self, targets: list[bytes], tags: Iterable[str]
    ) -> tuple[bytes, Snapshot]:
        seal_send, seal_recv = trio.open_memory_channel[_Sealable](_SEAL_QUEUE)
        pack_send, pack_recv = trio.open_memory_channel[_Sealed](_PACK_QUEUE)
        upload_send, upload_recv = trio.open_memory_channel[packer.PackBuilder](0)
        self._seal_send = seal_send
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._uploader, upload_recv)
            nursery.start_soon(self._packer, pack_recv, upload_send)
            async with trio.open_nursery() as sealers:
                for _ in range(_SEALERS):
                    sealers.start_soon(self._sealer, seal_recv.clone(), pack_send.clone())
                seal_recv.close()
                async with seal_send:
                    root = await self._save_root(targets)
                    snapshot = Snapshot(
                        time_ns=time.time_ns(),
                        hostname=socket.gethostname(),
                        paths=tuple(targets),
                        tags=tuple(tags),
                        tree=root,
                        file_count=self.summary.files_new
                        + self.summary.files_changed
                        + self.summary.files_unchanged,
                        total_size=self.summary.total_size,
                    )
                    snapshot_bytes = formats.encode_snapshot(snapshot)
                    snapshot_id = blobs.blob_id(self.repo.keyring.dedup_key, snapshot_bytes)
                    await self._store_blob(BlobType.SNAPSHOT, snapshot_id, snapshot_bytes)
            # All sealers are done: closing pack_send lets the packer flush.
            await pack_send.aclose()
        return snapshot_id, snapshot

    # -- pipeline stages ----------------------------------------------------------

    async def _sealer(
        self,
        receive: trio.MemoryReceiveChannel[_Sealable],
        send: trio.MemorySendChannel[_Sealed],
    ) -> None:
        key = self.repo.keyring.data_key
        async with receive, send:
            async for item in receive:
                sealed = await trio.to_thread.run_sync(
                    blobs.seal_blob, key, item.blob_type, item.ident, item.plaintext
                )
                await send.send(_Sealed(item.blob_type, item.ident, sealed, len(item.plaintext)))

    async def _packer(
        self,
        receive: trio.MemoryReceiveChannel[_Sealed],
        send: trio.MemorySendChannel[packer.PackBuilder],
    ) -> None:
        builder = packer.PackBuilder()
        async with receive, send:
            async for item in receive:
                builder.add(item.blob_type, item.ident, item.sealed, item.raw_length)
                if builder.size >= self.pack_size:
                    await send.send(builder)
                    builder = packer.PackBuilder()
            if len(builder):
                await send.send(builder)

    async def _uploader(self, receive: trio.MemoryReceiveChannel[packer.PackBuilder]) -> None:
        async with receive:
            async for builder in receive:
                record = await self.repo.write_pack(builder)
                self.summary.packs_written += 1
                self.summary.bytes_stored += len(record.shards) * (
                    record.shard_size + formats.SHARD_HEADER_SIZE
                )
                for entry in record.blobs:
                    self._pending.discard(entry.blob_id)

    async def _store_blob(self, blob_type: BlobType, ident: bytes, plaintext: bytes) -> bool:
        """Queue a blob unless it is stored or queued already; True if it was new."""
        if ident in self._pending or self.repo.index.has_blob(ident):
            return False
        self._pending.add(ident)
        assert self._seal_send is not None
        await self._seal_send.send(_Sealable(blob_type, ident, plaintext))
        self.summary.blobs_new += 1
        return True

    async def _submit_chunk(self, ident: bytes, chunk: bytes) -> None:
        if await self._store_blob(BlobType.DATA, ident, chunk):
            self.summary.bytes_new += len(chunk)
        else:
            self.summary.bytes_deduplicated += len(chunk)
        self.summary.bytes_read += len(chunk)
        self.progress.update(
            f"{self.summary.files_new + self.summary.files_changed + self.summary.files_unchanged}"
            f" files, {human_bytes(self.summary.bytes_read)} read"
        )

    # -- the walk ------------------------------------------------------------------

    async def _save_root(self, targets: list[bytes]) -> bytes:
        """Store the trees from / down to every target; return the root tree id."""
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
        if targets == [b"/"]:
            node = await self._save_dir(b"/", b"", os.lstat(b"/"))
            assert node is not None and node.subtree is not None
            return node.subtree
        return await self._save_layout(b"", layout)

    async def _save_layout(self, prefix: bytes, layout: dict[bytes, object]) -> bytes:
        nodes: list[TreeNode] = []
        for name in sorted(layout):
            path = prefix + b"/" + name
            below = layout[name]
            st = os.lstat(path)
            if below is None:
                node = await self._save_entry(path, name, st)
                if node is not None:
                    nodes.append(node)
            else:
                assert isinstance(below, dict)
                subtree = await self._save_layout(path, below)
                nodes.append(self._dir_node(name, st, subtree))
        return await self._save_tree(Tree(tuple(nodes)))

    async def _save_tree(self, tree: Tree) -> bytes:
        data = formats.encode_tree(tree)
        ident = blobs.blob_id(self.repo.keyring.dedup_key, data)
        await self._store_blob(BlobType.TREE, ident, data)
        return ident

    @staticmethod
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

    async def _save_entry(self, path: bytes, name: bytes, st: os.stat_result) -> TreeNode | None:
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            return await self._save_dir(path, name, st)
        if stat.S_ISREG(mode):
            return await self._save_file(path, name, st)
        if stat.S_ISLNK(mode):
            self.summary.symlinks += 1
            return TreeNode(
                name=name,
                kind=NodeKind.SYMLINK,
                mode=stat.S_IMODE(mode),
                mtime_ns=st.st_mtime_ns,
                link_target=os.readlink(path),
                uid=st.st_uid,
                gid=st.st_gid,
            )
        kind = "fifo" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device"
        self.summary.skipped.append((_fsdecode(path), f"{kind}, not backed up"))
        return None

    async def _save_dir(self, path: bytes, name: bytes, st: os.stat_result) -> TreeNode | None:
        try:
            entries = await trio.to_thread.run_sync(_list_dir, path)
        except OSError as exc:
            self.summary.skipped.append((_fsdecode(path), f"cannot list: {exc.strerror}"))
            return None
        self.summary.dirs += 1
        nodes: list[TreeNode] = []
        for child_name, child_st in entries:
            child = path.rstrip(b"/") + b"/" + child_name
            node = await self._save_entry(child, child_name, child_st)
            if node is not None:
                nodes.append(node)
        subtree = await self._save_tree(Tree(tuple(nodes)))
        return self._dir_node(name, st, subtree)

    async def _save_file(self, path: bytes, name: bytes, st: os.stat_result) -> TreeNode | None:
        group = 0
        if st.st_nlink > 1:
            known = self._hardlinks.get((st.st_dev, st.st_ino))
            if known is not None:
                group, content = known
                self.summary.files_unchanged += 1
                self.summary.total_size += st.st_size
                return self._file_node(name, st, content, group)
            group = self._next_hardlink_group
            self._next_hardlink_group += 1
        cached = self.repo.index.cached_file(path)
        if (
            cached is not None
            and (cached.size, cached.mtime_ns, cached.ctime_ns, cached.inode)
            == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            and all(c in self._pending or self.repo.index.has_blob(c) for c in cached.content)
        ):
            content = cached.content
            self.summary.files_unchanged += 1
        else:
            read = await self._read_file(path)
            if read is None:
                return None
            content, st = read
            if cached is None:
                self.summary.files_new += 1
            else:
                self.summary.files_changed += 1
        self._file_cache.append(
            (path, CachedFile(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, content))
        )
        if group:
            self._hardlinks[(st.st_dev, st.st_ino)] = (group, content)
        self.summary.total_size += st.st_size
        return self._file_node(name, st, content, group)

    @staticmethod
    def _file_node(
        name: bytes, st: os.stat_result, content: tuple[bytes, ...], group: int
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

    async def _read_file(self, path: bytes) -> tuple[tuple[bytes, ...], os.stat_result] | None:
        reason = ""
        for _attempt in range(_READ_ATTEMPTS):
            try:
                return await trio.to_thread.run_sync(self._chunk_file, path)
            except _FileChanged:
                reason = "changed while it was read (left out; back it up again)"
            except OSError as exc:
                self.summary.skipped.append((_fsdecode(path), f"cannot read: {exc.strerror}"))
                return None
        self.summary.skipped.append((_fsdecode(path), reason))
        return None

    def _chunk_file(self, path: bytes) -> tuple[tuple[bytes, ...], os.stat_result]:
        """Runs in a worker thread: chunk, id and submit one file."""
        dedup_key = self.repo.keyring.dedup_key
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NOATIME", 0))
        try:
            with os.fdopen(fd, "rb", buffering=0, closefd=False) as stream:
                before = os.fstat(fd)
                content: list[bytes] = []
                total = 0
                for chunk in chunker.iter_chunks(stream, self.params):
                    ident = blobs.blob_id(dedup_key, chunk)
                    content.append(ident)
                    total += len(chunk)
                    trio.from_thread.run(self._submit_chunk, ident, chunk)
                after = os.fstat(fd)
        finally:
            os.close(fd)
        if total != after.st_size or (before.st_size, before.st_mtime_ns, before.st_ctime_ns) != (
            after.st_size,
            after.st_mtime_ns,
            after.st_ctime_ns,
        ):
            raise _FileChanged()
        return tuple(content), after

    # -- index segment ---------------------------------------------------------------

    async def _write_index_segment(self) -> None:
        await write_index_segment(self.repo, self.repo.index.packs_without_segment())


async def write_index_segment(repo: Repository, pack_ids: list[bytes]) -> None:
    """Store the records of ``pack_ids`` as an index pack, so a new home finds them."""
    if not pack_ids:
        return
    records = []
    for pack_id in pack_ids:
        record = repo.index.pack(pack_id)
        if record is not None:
            records.append(record)
    data = formats.encode_index_segment(IndexSegment(tuple(records)))
    ident = blobs.blob_id(repo.keyring.dedup_key, data)
    sealed = await trio.to_thread.run_sync(
        blobs.seal_blob, repo.keyring.data_key, BlobType.INDEX, ident, data
    )
    builder = packer.PackBuilder()
    builder.add(BlobType.INDEX, ident, sealed, len(data))
    await repo.write_pack(builder, is_index=True)
    with repo.index.transaction():
        repo.index.mark_in_segment(pack_ids)


def _list_dir(path: bytes) -> list[tuple[bytes, os.stat_result]]:
    entries = []
    with os.scandir(path) as it:
        for entry in it:
            entries.append((os.fsencode(entry.name), entry.stat(follow_symlinks=False)))
    entries.sort(key=lambda e: e[0])
    return entries
