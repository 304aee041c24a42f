"""The backup pipeline after the walk: files in, committed packs out.

::

    jobs ─► 2 file workers: read, chunk, id, dedup, zstd, AEAD ─► packer ─► 2 uploaders

Each arrow is a bounded trio channel, so memory stays bounded whatever the
file sizes. Nouns:

* **file work** — one regular file to read, and what reading it gave (its
  content, its stat, or why it was left out);
* **job** — the files one worker reads in one go: one large file, or a
  **batch** of small ones (filled across directories, sent when full or
  when the walk waits for one of its files), with the job's tallies;
* **dedup** — the :class:`Deduper` decides whether a chunk still needs
  storing: every blob id of the index and every id **claimed** in this run;
* a **file worker** runs one job at a time: a large file is read in a
  thread (hashing, zstd and libsodium release the GIL); a batch of many
  small files by the worker's **sealer** process (:mod:`~p2pbackup.engine.sealer`),
  since each small file is a string of short calls that would hand the GIL
  between threads. The **sealers** (:class:`Sealers`) are started at a
  worker's first batch of enough files; when one cannot start or fails, the
  threads read its batch again, and every later one, for the rest of the run;
* the **outbox** of a job takes its sealed blobs to the packer in **groups**
  of a few MiB: one channel send per group, not per blob;
* the **packer** fills packs to the target size, file data apart from
  metadata; two **uploaders** have the repository code, place and commit
  each pack (:meth:`~p2pbackup.engine.repository.Repository.write_pack`).

The pipeline counts nothing itself: it tells its owner of each job done and
each pack written.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs
import trio

from p2pbackup.core import blobs, chunker, packer
from p2pbackup.engine import reading, runtime, sealwire
from p2pbackup.engine.index import Index
from p2pbackup.engine.repository import Repository
from p2pbackup.engine.sealer import Sealer, SealerError
from p2pbackup.errors import LocalProtocolError
from p2pbackup.model import BlobType, FileStat, PackRecord, SealingKeys

log = logging.getLogger(__name__)

_T = TypeVar("_T")

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
SEALER_MIN_FILES = 64


@attrs.define(eq=False)
class FileWork:
    """One regular file to read, and what reading it gave."""

    path: bytes
    st: os.stat_result
    job: Job | None = None
    content: tuple[bytes, ...] = ()
    final_st: os.stat_result | FileStat | None = None
    error: str | None = None
    #: How the walker counted it: "new", "changed" or "unchanged" (its
    #: further hard-linked names count the same).
    counted: str = ""


@attrs.define(eq=False)
class Job:
    """Files for one worker-thread call, and its tallies."""

    files: list[FileWork] = attrs.Factory(list)
    size: int = 0
    done: trio.Event = attrs.Factory(trio.Event)
    bytes_read: int = 0
    bytes_new: int = 0
    bytes_deduplicated: int = 0
    blobs_new: int = 0

    def add(self, work: FileWork) -> None:
        self.files.append(work)
        self.size += work.st.st_size
        work.job = self


@attrs.frozen
class _Sealed:
    blob_type: BlobType
    ident: bytes
    sealed: bytes
    raw_length: int


class _Outbox:
    """A job's sealed blobs on their way to the packer, counted into the job as
    its chunks are read (in a thread or by a sealer)."""

    def __init__(self, job: Job) -> None:
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


class Deduper:
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


class Sealers:
    """The file workers' sealer processes: their lifecycle (module docstring)."""

    def __init__(self, setup: sealwire.Setup, min_files: int) -> None:
        self._setup = setup
        #: Batches of at least this many files go to sealer processes.
        self.min_files = min_files
        self._working = True

    def wanted(self, job: Job) -> bool:
        """Whether ``job`` is to be read by a sealer."""
        return self._working and len(job.files) >= self.min_files

    async def start(self) -> Sealer | None:
        """A new sealer; None, and no more tries this run, if it cannot start."""
        try:
            return await Sealer.start(self._setup)
        except SealerError as exc:
            self._working = False
            log.warning("%s; reading files in threads instead", exc)
            return None

    async def failed(self, sealer: Sealer, error: SealerError) -> None:
        """``sealer`` failed: close it, and read in threads from now on."""
        # Nothing of the batch was taken from it: the threads read it again.
        self._working = False
        log.warning("%s; reading files in threads instead", error)
        await sealer.aclose()


class Pipeline:
    """The stages of one backup after its walk (module docstring)."""

    def __init__(
        self,
        repo: Repository,
        params: chunker.ChunkerParams,
        keys: SealingKeys,
        deduper: Deduper,
        sealers: Sealers,
        *,
        job_done: Callable[[Job], None],
        pack_written: Callable[[PackRecord], None],
        instead_of_storing: Callable[[packer.PackBuilder], None] | None = None,
    ) -> None:
        self._repo = repo
        self._params = params
        self._keys = keys
        self._deduper = deduper
        self._sealers = sealers
        self._job_done = job_done
        self._pack_written = pack_written
        #: A dry run's: each full pack goes here, and nowhere else.
        self._instead_of_storing = instead_of_storing
        #: Set by :meth:`drop_unsent`.
        self._drop_unsent = False
        self._pack_size = repo.config.pack_size
        self._job_send: trio.MemorySendChannel[Job] | None = None
        self._pack_send: trio.MemorySendChannel[list[_Sealed]] | None = None
        #: The batch of small files being filled (it may span directories).
        self._batch = Job()

    async def run(self, feed: Callable[[], Awaitable[_T]]) -> _T:
        """Run the stages while ``feed`` gives them files and blobs (through
        :meth:`read`, :meth:`store_small_blob`); once it returns, flush and
        commit every pack, and return what it returned."""
        job_send, job_recv = trio.open_memory_channel[Job](_JOB_QUEUE)
        pack_send, pack_recv = trio.open_memory_channel[list[_Sealed]](_PACK_QUEUE)
        upload_send, upload_recv = trio.open_memory_channel[packer.PackBuilder](0)
        self._job_send, self._pack_send = job_send, pack_send
        async with trio.open_nursery() as nursery:
            for _ in range(_UPLOADERS):
                nursery.start_soon(self._uploader, upload_recv.clone())
            upload_recv.close()
            nursery.start_soon(self._packer, pack_recv, upload_send)
            async with pack_send, trio.open_nursery() as workers:
                for _ in range(_FILE_WORKERS):
                    workers.start_soon(self._file_worker, job_recv.clone())
                job_recv.close()
                async with job_send:
                    result = await feed()
            # Closing pack_send lets the packer flush its last pack and stop.
        return result

    # -- the way in -------------------------------------------------------------------

    async def read(self, work: FileWork) -> None:
        """Have a worker read the file of ``work``: a large file at once, a
        small one with the batch being filled."""
        if work.st.st_size >= _LARGE_FILE:
            alone = Job()
            alone.add(work)
            await self._submit(alone)
            return
        # Small files are batched across directories: one thread call each
        # would cost more than reading them.
        batch = self._batch
        if batch.files and (
            batch.size + work.st.st_size > _BATCH_BYTES or len(batch.files) >= _BATCH_FILES
        ):
            await self.flush()
        self._batch.add(work)

    async def wait_read(self, job: Job) -> None:
        """Wait until every file of ``job`` is read and its blobs forwarded."""
        if job is self._batch:
            # Still being filled: send it now rather than wait for more files.
            await self.flush()
        await job.done.wait()

    async def flush(self) -> None:
        """Send the batch being filled to the workers, if it has any file."""
        if not self._batch.files:
            return
        # Swap first: while the send waits for room, nobody else may send it too.
        batch, self._batch = self._batch, Job()
        await self._submit(batch)

    async def store_small_blob(
        self,
        blob_type: BlobType,
        ident: bytes,
        plaintext: bytes,
        *,
        check: Callable[[bytes], object] | None = None,
    ) -> bool:
        """Seal and queue a tree or snapshot blob unless it is stored already;
        whether it was. ``check`` (a decoder) must accept the plaintext of a
        blob about to be stored: an incremental backup re-encodes every
        directory's tree, and proving each again would cost a decode apiece
        for blobs it does not store."""
        if self._deduper.known(ident):
            return False
        if check is not None:
            check(plaintext)
        if not self._deduper.claim(ident):
            return False
        sealed = blobs.seal_blob(self._repo.keyring.data_key, blob_type, ident, plaintext)
        await self._forward([_Sealed(blob_type, ident, sealed, len(plaintext))])
        return True

    def drop_unsent(self) -> None:
        """Store none of the blobs still waiting for a pack when the run
        ends: a backup that skips as unchanged needs none (every blob below
        its targets is stored already; the trees above them, new only as
        their mtimes changed, are not wanted)."""
        self._drop_unsent = True

    async def _submit(self, job: Job) -> None:
        assert self._job_send is not None
        await self._job_send.send(job)

    async def _forward(self, items: list[_Sealed]) -> None:
        # One channel send per group, not per blob: a group of small files'
        # blobs is thousands of them, each send a trip through the scheduler.
        assert self._pack_send is not None
        await self._pack_send.send(items)

    # -- file workers -----------------------------------------------------------------

    async def _file_worker(self, receive: trio.MemoryReceiveChannel[Job]) -> None:
        # Each worker has a sealer process of its own, started at its first
        # batch of enough small files.
        sealers = self._sealers
        sealer: Sealer | None = None
        try:
            async with receive:
                async for job in receive:
                    if sealer is None and sealers.wanted(job):
                        sealer = await sealers.start()
                    if sealer is not None and sealers.wanted(job):
                        try:
                            await self._run_job_in_sealer(sealer, job)
                        except SealerError as exc:
                            await sealers.failed(sealer, exc)
                            sealer = None
                            await trio.to_thread.run_sync(self._run_job, job)
                    else:
                        await trio.to_thread.run_sync(self._run_job, job)
                    self._job_done(job)
                    job.done.set()
        finally:
            if sealer is not None:
                await sealer.aclose()

    def _run_job(self, job: Job) -> None:
        """Runs in a worker thread: read, chunk, dedup and seal every file of a job."""
        outbox = _Outbox(job)

        def sink(ident: bytes, length: int, sealed: bytes | None) -> None:
            if group := outbox.add(ident, length, sealed):
                trio.from_thread.run(self._forward, group)

        if len(job.files) > 1:
            reading.prefetch(work.path for work in job.files)
        for work in job.files:
            outcome = reading.read_file(
                work.path, self._params, self._keys, self._deduper.claim, sink
            )
            work.content, work.final_st, work.error = outcome.content, outcome.stat, outcome.error
        if outbox.items:
            trio.from_thread.run(self._forward, outbox.take())

    async def _run_job_in_sealer(self, sealer: Sealer, job: Job) -> None:
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
                            f"{os.fsdecode(work.path)} without its blob"
                        )
                    sealed = chunk.sealed
                if group := outbox.add(chunk.ident, chunk.length, sealed):
                    await self._forward(group)
        if outbox.items:
            await self._forward(outbox.take())

    # -- packer and uploaders ---------------------------------------------------------

    async def _packer(
        self,
        receive: trio.MemoryReceiveChannel[list[_Sealed]],
        send: trio.MemorySendChannel[packer.PackBuilder],
    ) -> None:
        # File data and metadata (trees, snapshots) go to separate packs, so that
        # listing or planning a restore reads a few small packs, not the data.
        target = self._pack_size
        builders = {True: packer.PackBuilder(target), False: packer.PackBuilder(target)}
        async with receive, send:
            async for group in receive:
                for item in group:
                    is_data = item.blob_type == BlobType.DATA
                    builder = builders[is_data]
                    # A blob that does not fit starts the next pack, so that
                    # every pack but a run's last is padded to exactly the
                    # target (core.packer).
                    if not builder.fits(len(item.sealed)):
                        await send.send(builder)
                        builder = builders[is_data] = packer.PackBuilder(target)
                    builder.add(item.blob_type, item.ident, item.sealed, item.raw_length)
            for builder in builders.values():
                if len(builder) and not self._drop_unsent:
                    await send.send(builder)

    async def _uploader(self, receive: trio.MemoryReceiveChannel[packer.PackBuilder]) -> None:
        async with receive:
            async for builder in receive:
                if self._instead_of_storing is not None:
                    self._instead_of_storing(builder)
                    continue
                self._pack_written(await self._repo.write_pack(builder))
                runtime.release_free_memory()
