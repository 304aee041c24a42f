"""Backup: turn directory trees into a snapshot of packs on the peers.

The pipeline (each arrow a bounded trio channel, so memory stays bounded
whatever the file sizes)::

    walker ─► 2 file workers: read, chunk, id, dedup, zstd, AEAD ─► packer ─► 2 uploaders

* the **walker** visits the given paths depth-first, in name order. For each
  directory it hands the files that need reading to the workers as **jobs**
  (one large file, or a batch of small ones), walks the subdirectories, then
  waits for its own jobs and stores the directory's tree blob;
* a **file worker** runs one job: it chunks each file, computes chunk ids,
  and keeps the sealed (compressed and encrypted) chunks that are neither
  indexed nor already claimed in this run — that is the deduplication. A
  large file is read in a thread (hashing, zstd and libsodium release the
  GIL); a batch of many small files by the worker's sealer process
  (:mod:`p2pbackup.engine.sealer`), since each small file is a string of short
  calls that would hand the GIL between threads;
* the **packer** fills packs to the target size; two **uploaders** erasure-code
  them, put the shards on the peers and commit each pack to the index in one
  transaction.

Crash safety follows from the order of commits: a pack enters the index only
after all its shards are stored; the snapshot blob is sent after every blob it
refers to; the snapshot becomes visible (index row, root record) only after
every pack is committed. A backup killed at any point leaves, at worst, shards
that no index entry names (``prune`` removes them).

A file that changes while it is read is read again (twice at most) and, if it
keeps changing, left out of the snapshot and reported — never stored as a mix
of two versions.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Iterable, Iterator

import attrs
import trio

from p2pbackup.core import blobs, chunker, formats, packer
from p2pbackup.core.exclude import ExcludeRules
from p2pbackup.engine import reading, runtime, sealwire
from p2pbackup.engine.index import CachedFile, Index
from p2pbackup.engine.progress import Progress, human_bytes
from p2pbackup.engine.repository import Repository
from p2pbackup.engine.sealer import Sealer, SealerError
from p2pbackup.errors import LocalProtocolError, UsageError
from p2pbackup.model import (
    BlobType,
    FileStat,
    NodeKind,
    SealingKeys,
    Snapshot,
    Tree,
    TreeNode,
)
from p2pbackup.nurseries import unwrap_single

log = logging.getLogger(__name__)

#: Threads reading, chunking and sealing files (one per core).
_FILE_WORKERS = 2
#: Packs being erasure-coded and uploaded at once.
_UPLOADERS = 2
#: Jobs queued for the file workers.
_JOB_QUEUE = 2
#: Groups of sealed blobs queued for the packer (a group holds about
#: _FORWARD_BYTES, or a single blob of up to a few MiB). One is enough to keep
#: the packer fed; two only raised the peak memory of a large file's backup,
#: at the same speed (docs/performance.md#backup).
_PACK_QUEUE = 1
#: Files at least this large get a job of their own; smaller ones are batched.
_LARGE_FILE = 1 << 20
#: A batch of small files holds at most this many bytes or files.
_BATCH_BYTES = 8 << 20
_BATCH_FILES = 256
#: A worker hands its sealed blobs to the packer in groups of about this size.
_FORWARD_BYTES = 4 << 20
#: A batch of at least this many small files is read by a sealer process
#: (:mod:`p2pbackup.engine.sealer`); smaller ones, and large files, by threads. A
#: backup of a few files is not worth starting processes for.
_SEALER_MIN_FILES = 64
#: Directory entries listed ahead of the walk in one thread call.
_LISTING_BUDGET = 4096

#: A directory's entries (name, lstat), or why it could not be listed.
_Listing = list[tuple[bytes, os.stat_result]] | OSError


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
    #: The code of the packs written (the configured one unless there were
    #: too few peers for it).
    k: int = 0
    n: int = 0
    configured_k: int = 0
    configured_n: int = 0
    seconds: float = 0.0
    #: Files and directories left out by exclude patterns (not read, not listed).
    excluded: int = 0
    #: (path, reason) for everything left out of the snapshot.
    skipped: list[tuple[str, str]] = attrs.Factory(list)
    #: (peer id, why) for every peer that refused a shard as full, or had too
    #: little room for one by its own offer; those shards went to other peers.
    full_peers: list[tuple[str, str]] = attrs.Factory(list)

    def to_json(self) -> dict[str, object]:
        data = attrs.asdict(self)
        data["snapshot_id"] = self.snapshot_id.hex()
        data["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]
        data["full_peers"] = [{"peer_id": p, "reason": r} for p, r in self.full_peers]
        return data

    def _code_note(self) -> str:
        if (self.k, self.n) == (self.configured_k, self.configured_n):
            return ""
        return (
            f"; fewer peers than the configured {self.configured_k}-of-{self.configured_n} "
            "need, so the code was adapted"
        )

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
            f"({self.k}-of-{self.n} shards{self._code_note()})",
            f"took {self.seconds:.1f} s ({rate:.1f} MB/s)",
        ]
        if self.excluded:
            lines.append(f"excluded {self.excluded} files and directories by pattern")
        for path, reason in self.skipped:
            lines.append(f"skipped {path}: {reason}")
        for peer_id, reason in self.full_peers:
            lines.append(
                f"warning: peer {peer_id} is full, its shards went to other peers: {reason}"
            )
        return lines


@attrs.frozen
class _Sealed:
    blob_type: BlobType
    ident: bytes
    sealed: bytes
    raw_length: int


class _Outbox:
    """A job's sealed blobs on their way to the packer, counted into the job as
    its chunks are read (in a thread or by a sealer)."""

    def __init__(self, job: _Job) -> None:
        self.job = job
        self.items: list[_Sealed] = []
        self._bytes = 0

    def add(self, ident: bytes, length: int, sealed: bytes | None) -> list[_Sealed] | None:
        """Count a chunk read (``sealed`` None: already stored or claimed); a
        group of about _FORWARD_BYTES to forward, if this chunk filled one."""
        job = self.job
        job.bytes_read += length
        if sealed is None:
            job.bytes_deduplicated += length
            return None
        job.bytes_new += length
        job.blobs_new += 1
        self.items.append(_Sealed(BlobType.DATA, ident, sealed, length))
        self._bytes += len(sealed)
        return self.take() if self._bytes >= _FORWARD_BYTES else None

    def take(self) -> list[_Sealed]:
        items, self.items, self._bytes = self.items, [], 0
        return items


class _Deduper:
    """Decides, from any thread, whether a blob still needs storing.

    It holds every blob id of the index (loaded once, at the start) and every
    id claimed during this run, in memory: a lookup must not release the GIL,
    or the two file workers convoy on it (an SQLite query per chunk cost many
    times its own time that way). About 100 bytes per blob: 100 MB for a
    million.
    """

    def __init__(self, index: Index) -> None:
        self._lock = threading.Lock()
        self._known: set[bytes] = set(index.iter_blob_ids())

    def known(self, ident: bytes) -> bool:
        return ident in self._known

    def claim(self, ident: bytes) -> bool:
        """True if the caller must store ``ident`` (and now owns that duty)."""
        with self._lock:
            if ident in self._known:
                return False
            self._known.add(ident)
            return True


@attrs.define(eq=False)
class _FileWork:
    """One regular file to read, and what reading it gave."""

    path: bytes
    st: os.stat_result
    job: _Job | None = None
    content: tuple[bytes, ...] = ()
    final_st: os.stat_result | FileStat | None = None
    error: str | None = None


@attrs.define(eq=False)
class _Job:
    """Files for one worker-thread call, and its tallies."""

    files: list[_FileWork] = attrs.Factory(list)
    size: int = 0
    done: trio.Event = attrs.Factory(trio.Event)
    bytes_read: int = 0
    bytes_new: int = 0
    bytes_deduplicated: int = 0
    blobs_new: int = 0


@attrs.define(eq=False)
class _Link:
    """A second name of a hard-linked file: same content as ``primary``."""

    name: bytes
    st: os.stat_result
    group: int
    primary: _FileWork


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
    st: os.stat_result
    node: TreeNode | None = None
    work: _FileWork | None = None
    link: _Link | None = None
    subtree: _TreeFuture | None = None


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

    def __init__(
        self,
        repo: Repository,
        *,
        progress: Progress | None = None,
        exclude: ExcludeRules | None = None,
    ) -> None:
        self.repo = repo
        self.exclude = exclude if exclude is not None else ExcludeRules()
        config = repo.config
        self.params = chunker.ChunkerParams(
            min_size=config.chunk_min,
            avg_size=config.chunk_avg,
            max_size=config.chunk_max,
            seed=repo.keyring.chunker_seed,
        )
        self._keys = SealingKeys(repo.keyring.dedup_key, repo.keyring.data_key)
        #: Batches of at least this many files go to sealer processes.
        self.sealer_min_files = _SEALER_MIN_FILES
        self._sealers_work = True
        self.pack_size = config.pack_size
        self.summary = BackupSummary(
            k=config.k, n=config.n, configured_k=config.k, configured_n=config.n
        )
        self.progress = progress or Progress("backup", enabled=False)
        self._deduper = _Deduper(repo.index)
        self._hardlinks: dict[tuple[int, int], tuple[int, _FileWork]] = {}
        self._next_hardlink_group = 1
        self._file_cache: list[tuple[bytes, CachedFile]] = []
        self._job_send: trio.MemorySendChannel[_Job] | None = None
        self._trees: trio.Nursery | None = None
        #: The batch of small files being filled (it may span directories).
        self._batch = _Job()
        self._pack_send: trio.MemorySendChannel[list[_Sealed]] | None = None
        #: Directories listed ahead of the walk, until it gets there (see _listing).
        self._listings: dict[bytes, _Listing] = {}
        self._walk_ahead: Iterator[tuple[bytes, _Listing]] | None = None

    # -- entry point ------------------------------------------------------------

    async def run(
        self, paths: Iterable[str | os.PathLike[str]], tags: Iterable[str] = ()
    ) -> BackupSummary:
        targets = normalize_paths(paths)
        if not targets:
            raise UsageError("nothing to back up: give at least one path")
        # Who is up and how much room each has, before the first pack: a dead
        # peer costs one probe instead of a timeout per pack, and placement
        # weighs the rest by their room.
        await self.repo.probe_peers()
        self.repo.check_enough_peers()
        started = time.monotonic()
        with unwrap_single(), runtime.rare_collections():
            snapshot_id, snapshot = await self._run_pipeline(targets, tuple(tags))
        self.progress.close()
        await self._write_index_segment()
        with self.repo.index.transaction():
            self.repo.index.add_snapshot(snapshot_id, snapshot)
            self.repo.index.cache_files(self._file_cache)
        await self.repo.publish_root()
        self.summary.full_peers = sorted(self.repo.full_peers().items())
        self.summary.snapshot_id = snapshot_id
        self.summary.seconds = time.monotonic() - started
        return self.summary

    async def _run_pipeline(
        self, targets: list[bytes], tags: tuple[str, ...]
    ) -> tuple[bytes, Snapshot]:
        job_send, job_recv = trio.open_memory_channel[_Job](_JOB_QUEUE)
        pack_send, pack_recv = trio.open_memory_channel[list[_Sealed]](_PACK_QUEUE)
        upload_send, upload_recv = trio.open_memory_channel[packer.PackBuilder](0)
        self._job_send, self._pack_send = job_send, pack_send
        async with trio.open_nursery() as nursery:
            for _ in range(_UPLOADERS):
                nursery.start_soon(self._uploader, upload_recv.clone())
            upload_recv.close()
            nursery.start_soon(self._packer, pack_recv, upload_send)
            async with pack_send:
                async with trio.open_nursery() as workers:
                    for _ in range(_FILE_WORKERS):
                        workers.start_soon(self._file_worker, job_recv.clone())
                    job_recv.close()
                    async with job_send:
                        async with trio.open_nursery() as trees:
                            self._trees = trees
                            root_future = await self._save_root(targets)
                            if self._batch.files:
                                await self._submit_batch()
                        root = await root_future.wait()
                        assert root is not None
                snapshot = Snapshot(
                    time_ns=time.time_ns(),
                    hostname=socket.gethostname(),
                    paths=tuple(targets),
                    tags=tags,
                    tree=root,
                    file_count=self.summary.files_new
                    + self.summary.files_changed
                    + self.summary.files_unchanged,
                    total_size=self.summary.total_size,
                )
                snapshot_bytes = formats.encode_snapshot(snapshot)
                snapshot_id = blobs.blob_id(self.repo.keyring.dedup_key, snapshot_bytes)
                await self._store_small_blob(BlobType.SNAPSHOT, snapshot_id, snapshot_bytes)
            # Closing pack_send lets the packer flush its last pack and stop.
        return snapshot_id, snapshot

    # -- pipeline stages ----------------------------------------------------------

    async def _file_worker(self, receive: trio.MemoryReceiveChannel[_Job]) -> None:
        # Each worker has a sealer process of its own, started at its first
        # batch of enough small files.
        sealer: Sealer | None = None
        try:
            async with receive:
                async for job in receive:
                    if sealer is None and self._wants_sealer(job):
                        sealer = await self._start_sealer()
                    if sealer is not None and self._wants_sealer(job):
                        try:
                            await self._run_job_in_sealer(sealer, job)
                        except SealerError as exc:
                            await self._sealer_failed(sealer, exc)
                            sealer = None
                            await trio.to_thread.run_sync(self._run_job, job)
                    else:
                        await trio.to_thread.run_sync(self._run_job, job)
                    self._job_done(job)
        finally:
            if sealer is not None:
                await sealer.aclose()

    def _wants_sealer(self, job: _Job) -> bool:
        return self._sealers_work and len(job.files) >= self.sealer_min_files

    async def _start_sealer(self) -> Sealer | None:
        try:
            return await Sealer.start(sealwire.Setup(self._keys, self.params))
        except SealerError as exc:
            self._sealers_work = False
            log.warning("%s; reading files in threads instead", exc)
            return None

    async def _sealer_failed(self, sealer: Sealer, error: SealerError) -> None:
        # Nothing of the batch was taken from it: the threads read it again.
        self._sealers_work = False
        log.warning("%s; reading files in threads instead", error)
        await sealer.aclose()

    async def _run_job_in_sealer(self, sealer: Sealer, job: _Job) -> None:
        """Have a sealer process read a job's files; claim and forward what it sealed."""
        files = await sealer.seal([work.path for work in job.files])
        outbox = _Outbox(job)
        for work, file in zip(job.files, files, strict=True):
            outcome = file.outcome
            work.content, work.final_st, work.error = outcome.content, outcome.stat, outcome.error
            for chunk in file.chunks:
                sealed = None
                if self._deduper.claim(chunk.ident):
                    if chunk.sealed is None:
                        # The sealer leaves out only blobs it sent before, which
                        # were claimed then: this is a bug, not a bad file.
                        raise LocalProtocolError(
                            f"a sealer sent chunk {chunk.ident.hex()[:16]} of "
                            f"{_fsdecode(work.path)} without its blob"
                        )
                    sealed = chunk.sealed
                if group := outbox.add(chunk.ident, chunk.length, sealed):
                    await self._forward(group)
        if outbox.items:
            await self._forward(outbox.take())

    def _job_done(self, job: _Job) -> None:
        summary = self.summary
        summary.bytes_read += job.bytes_read
        summary.bytes_new += job.bytes_new
        summary.bytes_deduplicated += job.bytes_deduplicated
        summary.blobs_new += job.blobs_new
        job.done.set()
        self.progress.update(
            f"{summary.files_new + summary.files_changed + summary.files_unchanged}"
            f" files, {human_bytes(summary.bytes_read)} read"
        )

    async def _packer(
        self,
        receive: trio.MemoryReceiveChannel[list[_Sealed]],
        send: trio.MemorySendChannel[packer.PackBuilder],
    ) -> None:
        # File data and metadata (trees, snapshots) go to separate packs, so that
        # listing or planning a restore reads a few small packs, not the data.
        builders = {True: packer.PackBuilder(), False: packer.PackBuilder()}
        async with receive, send:
            async for group in receive:
                for item in group:
                    is_data = item.blob_type == BlobType.DATA
                    builder = builders[is_data]
                    builder.add(item.blob_type, item.ident, item.sealed, item.raw_length)
                    if builder.size >= self.pack_size:
                        await send.send(builder)
                        builders[is_data] = packer.PackBuilder()
            for builder in builders.values():
                if len(builder):
                    await send.send(builder)

    async def _uploader(self, receive: trio.MemoryReceiveChannel[packer.PackBuilder]) -> None:
        async with receive:
            async for builder in receive:
                record = await self.repo.write_pack(builder)
                self.summary.packs_written += 1
                # Fewer peers than configured give a smaller code: say which.
                self.summary.k, self.summary.n = record.k, record.n
                self.summary.bytes_stored += len(record.shards) * (
                    record.shard_size + formats.SHARD_HEADER_SIZE
                )

    async def _forward(self, items: list[_Sealed]) -> None:
        # One channel send per group, not per blob: a group of small files'
        # blobs is thousands of them, each send a trip through the scheduler.
        assert self._pack_send is not None
        await self._pack_send.send(items)

    async def _store_small_blob(self, blob_type: BlobType, ident: bytes, plaintext: bytes) -> None:
        """Seal and queue a tree or snapshot blob unless it is stored already."""
        if not self._deduper.claim(ident):
            return
        sealed = blobs.seal_blob(self.repo.keyring.data_key, blob_type, ident, plaintext)
        self.summary.blobs_new += 1
        await self._forward([_Sealed(blob_type, ident, sealed, len(plaintext))])

    # -- file workers (threads) --------------------------------------------------------

    def _run_job(self, job: _Job) -> None:
        """Runs in a worker thread: read, chunk, dedup and seal every file of a job."""
        outbox = _Outbox(job)

        def sink(ident: bytes, length: int, sealed: bytes | None) -> None:
            if group := outbox.add(ident, length, sealed):
                trio.from_thread.run(self._forward, group)

        for work in job.files:
            outcome = reading.read_file(
                work.path, self.params, self._keys, self._deduper.claim, sink
            )
            work.content, work.final_st, work.error = outcome.content, outcome.stat, outcome.error
        if outbox.items:
            trio.from_thread.run(self._forward, outbox.take())

    # -- the walk ------------------------------------------------------------------

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
            return await self._save_dir(b"/")
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
        return await self._save_entries(prefix, entries, subdirs)

    async def _save_dir(self, path: bytes) -> _TreeFuture:
        listing = await self._listing(path)
        if isinstance(listing, OSError):
            self.summary.skipped.append((_fsdecode(path), f"cannot list: {listing.strerror}"))
            return _TreeFuture.failed()
        entries = listing
        self.summary.dirs += 1
        return await self._save_entries(path.rstrip(b"/"), entries, {})

    async def _listing(self, path: bytes) -> _Listing:
        """The entries of ``path``, listed ahead of the walk.

        A thread call per directory made the walk wait at every directory
        (for a thread, then the GIL): a source tree of small directories spent
        much of its backup there (docs/performance.md#backup). So a walk of
        the same order runs ahead of this one, a few thousand entries per
        thread call.
        """
        listing = self._listings.pop(path, None)
        if listing is not None:
            return listing
        for attempt in range(2):
            if self._walk_ahead is None or attempt:
                # The first directory of a target, or the walk ahead lost its way.
                self._listings.clear()
                self._walk_ahead = _walk_listings(path, self.exclude)
            listings = await trio.to_thread.run_sync(_list_ahead, self._walk_ahead, _LISTING_BUDGET)
            if not listings:
                self._walk_ahead = None
            self._listings.update(listings)
            listing = self._listings.pop(path, None)
            if listing is not None:
                return listing
        raise AssertionError(f"a walk from {path!r} did not list it first")

    async def _save_entries(
        self,
        prefix: bytes,
        entries: list[tuple[bytes, os.stat_result]],
        layout_dirs: dict[bytes, dict[bytes, object]],
    ) -> _TreeFuture:
        """Plan one directory: its files go to the workers, its subdirectories
        are walked, and a task stores its tree once all of them are done.

        The walker itself never waits for file data, so the workers always have
        the next files queued (it waits only when the job queue is full).
        """
        pending: list[_Entry] = []
        cache = self.repo.index.cached_files_in(prefix)
        for name, st in entries:
            path = prefix + b"/" + name
            if self.exclude.excludes(path):
                self.summary.excluded += 1
                continue
            entry = _Entry(name, st=st)
            pending.append(entry)
            if stat.S_ISREG(st.st_mode):
                await self._plan_file(entry, path, st, cache)
            elif stat.S_ISDIR(st.st_mode):
                entry.subtree = await self._save_dir(path)
            else:
                entry.node = self._special_node(path, name, st)
        for name in sorted(layout_dirs):
            path = prefix + b"/" + name
            entry = _Entry(name, st=os.lstat(path))
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
        """Decide how a regular file is saved: from the cache, or by a worker."""
        group = 0
        if st.st_nlink > 1:
            known = self._hardlinks.get((st.st_dev, st.st_ino))
            if known is not None:
                entry.link = _Link(entry.name, st, known[0], known[1])
                return
            group = self._next_hardlink_group
            self._next_hardlink_group += 1
        work = _FileWork(path, st)
        entry.work = work
        if group:
            self._hardlinks[(st.st_dev, st.st_ino)] = (group, work)
        cached = cache.get(entry.name)
        if (
            cached is not None
            and (cached.size, cached.mtime_ns, cached.ctime_ns, cached.inode)
            == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            and all(self._deduper.known(c) for c in cached.content)
        ):
            work.content, work.final_st = cached.content, st
            self.summary.files_unchanged += 1
            return
        if cached is None:
            self.summary.files_new += 1
        else:
            self.summary.files_changed += 1
        if st.st_size >= _LARGE_FILE:
            alone = _Job()
            self._add_to_job(alone, work)
            await self._submit(alone)
            return
        # Small files are batched across directories: one thread call each
        # would cost more than reading them.
        batch = self._batch
        if batch.files and (
            batch.size + st.st_size > _BATCH_BYTES or len(batch.files) >= _BATCH_FILES
        ):
            await self._submit_batch()
        self._add_to_job(self._batch, work)

    @staticmethod
    def _add_to_job(job: _Job, work: _FileWork) -> None:
        job.files.append(work)
        job.size += work.st.st_size
        work.job = job

    async def _submit(self, job: _Job) -> None:
        assert self._job_send is not None
        await self._job_send.send(job)

    def _record(self, work: _FileWork) -> None:
        """Remember a file just read for the next backup's file cache (entries
        of unchanged files are already right and are not written again)."""
        st = work.final_st or work.st
        self._file_cache.append(
            (
                work.path,
                CachedFile(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, work.content),
            )
        )

    async def _finish_entry(self, entry: _Entry) -> TreeNode | None:
        if entry.subtree is not None:
            tree_id = await entry.subtree.wait()
            if tree_id is None:
                return None
            return self._dir_node(entry.name, entry.st, tree_id)
        if entry.node is not None or (entry.work is None and entry.link is None):
            return entry.node
        if entry.link is not None:
            primary = entry.link.primary
            if primary.job is not None:
                await self._wait_for(primary.job)
            if primary.error is not None:
                return None
            self.summary.files_unchanged += 1
            self.summary.total_size += entry.link.st.st_size
            return self._file_node(entry.name, entry.link.st, primary.content, entry.link.group)
        work = entry.work
        assert work is not None
        group = 0
        known = self._hardlinks.get((work.st.st_dev, work.st.st_ino))
        if known is not None and known[1] is work:
            group = known[0]
        if work.job is not None:
            await self._wait_for(work.job)
            if work.error is not None:
                self.summary.skipped.append((_fsdecode(work.path), work.error))
                return None
            self._record(work)
        st = work.final_st or work.st
        self.summary.total_size += st.st_size
        return self._file_node(entry.name, st, work.content, group)

    async def _wait_for(self, job: _Job) -> None:
        if job is self._batch:
            # Still being filled: send it now rather than wait for more files.
            await self._submit_batch()
        await job.done.wait()

    async def _submit_batch(self) -> None:
        # Swap first: while the send waits for room, nobody else may send it too.
        batch, self._batch = self._batch, _Job()
        await self._submit(batch)

    async def _save_tree(self, tree: Tree) -> bytes:
        data = formats.encode_tree(tree)
        ident = blobs.blob_id(self.repo.keyring.dedup_key, data)
        await self._store_small_blob(BlobType.TREE, ident, data)
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

    def _special_node(self, path: bytes, name: bytes, st: os.stat_result) -> TreeNode | None:
        """A symlink's node; None (and a note) for fifos, sockets and devices."""
        mode = st.st_mode
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

    @staticmethod
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

    # -- index segment ---------------------------------------------------------------

    async def _write_index_segment(self) -> None:
        await self.repo.write_index_segment(self.repo.index.packs_without_segment())


def _walk_listings(root: bytes, exclude: ExcludeRules) -> Iterator[tuple[bytes, _Listing]]:
    """Every directory from ``root`` down with its listing, in the walk's own
    order: depth first, entries by name, excluded directories not entered, an
    error standing in for a directory that cannot be listed."""
    try:
        entries: _Listing = _list_dir(root)
    except OSError as exc:
        entries = exc
    yield root, entries
    if isinstance(entries, OSError):
        return
    prefix = root.rstrip(b"/")
    for name, st in entries:
        below = prefix + b"/" + name
        if stat.S_ISDIR(st.st_mode) and not exclude.excludes(below):
            yield from _walk_listings(below, exclude)


def _list_ahead(
    walk: Iterator[tuple[bytes, _Listing]], budget: int
) -> list[tuple[bytes, _Listing]]:
    """The next directories of ``walk``, until about ``budget`` entries are listed."""
    listings = []
    listed = 0
    for path, listing in walk:
        listings.append((path, listing))
        listed += len(listing) if isinstance(listing, list) else 1
        if listed >= budget:
            break
    return listings


def _list_dir(path: bytes) -> list[tuple[bytes, os.stat_result]]:
    entries = []
    with os.scandir(path) as it:
        for entry in it:
            entries.append((os.fsencode(entry.name), entry.stat(follow_symlinks=False)))
    entries.sort(key=lambda e: e[0])
    return entries
