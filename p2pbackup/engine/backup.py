"""Backup: turn directory trees into a snapshot of packs on the peers.

The pipeline (each arrow a bounded trio channel, so memory stays bounded
whatever the file sizes)::

    walker ─► 2 file workers: read, chunk, id, dedup, zstd, AEAD ─► packer ─► 2 uploaders

* the **walker** (:mod:`.walk`) visits the given paths depth-first, in name
  order. For each directory it hands the files that need reading to the
  workers as **jobs** (one large file, or a batch of small ones), walks the
  subdirectories, then waits for its own jobs and stores the directory's tree
  blob. A file the file cache shows unchanged is not read, nor a further name
  of a hard-linked file already met;
* the rest of the pipeline (:mod:`.pipeline`): a **file worker** runs one job:
  it chunks each file, computes chunk ids, and keeps the sealed (compressed
  and encrypted) chunks that are neither indexed nor already claimed in this
  run — that is the deduplication. A large file is read in a thread (hashing,
  zstd and libsodium release the GIL); a batch of many small files by the
  worker's sealer process (:mod:`p2pbackup.engine.sealer`), since each small
  file is a string of short calls that would hand the GIL between threads;
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

A **dry run** walks and reads as a backup does, and deduplicates against
the index, but hands every pack to the summary instead of the peers, and
writes nothing: no shard, no index row, no file cache entry, no root record.
Its summary says what a backup would store now.

A run **skips if unchanged** when asked to (``serve``'s scheduled runs
always, ``backup --skip-if-unchanged``): when each target it backed up —
its metadata and the whole tree below it — is as in its **parent**, the
newest snapshot of the same paths from this host, no new snapshot is made;
the summary names the parent (:attr:`BackupSummary.unchanged_since`). The
directories above the targets are not compared (their mtimes change as
files come and go beside the targets).

The summary says what was placed, not what was meant: each pack's code, the
fewest shards any pack got and its **spare** shards (placed − k: how many
more lost peers it survives), every pack stored **below n** (a peer failed
or refused while it was uploaded and no spare was left), and every peer
**passed over** and why.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable

import attrs

from p2pbackup.core import blobs, erasure, formats, packer
from p2pbackup.core.exclude import ExcludeRules
from p2pbackup.engine import runtime, sealwire, snapshots
from p2pbackup.engine.listing import ScanTotals, scan
from p2pbackup.engine.pipeline import SEALER_MIN_FILES, Deduper, Job, Pipeline, Sealers
from p2pbackup.engine.progress import Progress, fraction_line, human_bytes, human_rate, plural
from p2pbackup.engine.repository import Repository
from p2pbackup.engine.walk import FileCache, TreeWalk
from p2pbackup.errors import NotEnoughShardsError, UsageError
from p2pbackup.model import BlobType, PackRecord, SealingKeys, Snapshot
from p2pbackup.nurseries import unwrap_single


@attrs.frozen
class PackPlacement:
    """How one pack was stored: its code and the shards placed."""

    pack_id: bytes
    k: int
    n: int
    placed: int

    @property
    def spare(self) -> int:
        """How many more lost peers the pack survives."""
        return self.placed - self.k

    def to_json(self) -> dict[str, object]:
        return {"pack_id": self.pack_id.hex(), "k": self.k, "n": self.n, "placed": self.placed}


#: How the summary says why a peer was passed over.
_PASSED_OVER = {
    "full": "is full",
    "refused": "refused our shards",
    # Full by its own offer: the reason says so.
    "no room": "is full",
    "down": "is down",
}


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
    #: Bytes of the files the file cache found unchanged (not read).
    bytes_unchanged: int = 0
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
    #: too few peers for it); of the pack with the fewest spare shards when
    #: they differ.
    k: int = 0
    n: int = 0
    configured_k: int = 0
    configured_n: int = 0
    #: The fewest shards placed of any pack, and the fewest spare ones
    #: (placed − k); None before a pack is written.
    placed_min: int | None = None
    spare_min: int | None = None
    #: Every pack stored with fewer shards than its n.
    below_n: list[PackPlacement] = attrs.Factory(list)
    seconds: float = 0.0
    #: Files and directories left out by exclude patterns (not read, not listed).
    excluded: int = 0
    #: (path, reason) for everything left out of the snapshot.
    skipped: list[tuple[str, str]] = attrs.Factory(list)
    #: (peer id, what, why) for every peer passed over in this run: ``full``
    #: (it refused a shard as full), ``refused`` (it refused one otherwise),
    #: ``no room`` (too little room for one by its own offer) or ``down``.
    passed_over: list[tuple[str, str, str]] = attrs.Factory(list)
    #: A dry run: the packs and bytes counted are what would be stored.
    dry_run: bool = False
    #: The parent this run found unchanged, when it skipped (no snapshot was
    #: made; ``snapshot_id`` is then empty).
    unchanged_since: bytes | None = None

    def placed(self, record: PackRecord) -> None:
        """Count how ``record``'s pack was stored."""
        pack = PackPlacement(record.pack_id, record.k, record.n, len(record.shards))
        if self.spare_min is None or pack.spare < self.spare_min:
            self.spare_min = pack.spare
            self.k, self.n = pack.k, pack.n
        if self.placed_min is None or pack.placed < self.placed_min:
            self.placed_min = pack.placed
        if pack.placed < pack.n:
            self.below_n.append(pack)

    def to_json(self) -> dict[str, object]:
        data = attrs.asdict(self, recurse=False)
        data["snapshot_id"] = self.snapshot_id.hex()
        data["unchanged_since"] = self.unchanged_since.hex() if self.unchanged_since else None
        data["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]
        data["below_n"] = [pack.to_json() for pack in self.below_n]
        data["passed_over"] = [
            {"peer_id": p, "what": w, "reason": r} for p, w, r in self.passed_over
        ]
        return data

    def _code_note(self) -> str:
        if (self.k, self.n) == (self.configured_k, self.configured_n):
            return ""
        return (
            f"; fewer peers than the configured {self.configured_k}-of-{self.configured_n} "
            "need, so the code was adapted"
        )

    def lines(self) -> list[str]:
        lines = [
            f"files: {self.files_new} new, {self.files_changed} changed, "
            f"{self.files_unchanged} unchanged; {plural(self.dirs, 'directory')}, "
            f"{plural(self.symlinks, 'symlink')}",
            f"read {human_bytes(self.bytes_read)} of {human_bytes(self.total_size)}; "
            f"new data {human_bytes(self.bytes_new)}, "
            f"deduplicated {human_bytes(self.bytes_deduplicated)}",
            f"stored {human_bytes(self.bytes_stored)} in {plural(self.packs_written, 'pack')} "
            f"({self.k}-of-{self.n} shards{self._code_note()})",
            f"took {self.seconds:.1f} s ({human_rate(self.bytes_read, self.seconds)})",
        ]
        if self.dry_run:
            lines[2] = (
                f"would store about {human_bytes(self.bytes_stored)} in "
                f"{plural(self.packs_written, 'pack')} ({self.k}-of-{self.n} shards)"
            )
        if self.excluded:
            lines.append(
                f"excluded {plural(self.excluded, 'file or directory', 'files and directories')}"
            )
        for path, reason in self.skipped:
            lines.append(f"skipped {path}: {reason}")
        # Where every pack got all its shards, a peer passed over had its
        # share go to others; where not, that would not be true.
        elsewhere = "" if self.below_n else ", its shards went to other peers"
        for peer_id, what, reason in self.passed_over:
            lines.append(f"warning: peer {peer_id} {_PASSED_OVER[what]}{elsewhere}: {reason}")
        if self.below_n:
            weakest = min(self.below_n, key=lambda pack: pack.spare)
            stored = (
                "is stored below its n" if len(self.below_n) == 1 else "are stored below their n"
            )
            lines.append(
                f"warning: {plural(len(self.below_n), 'pack')} {stored}, "
                f"on as few as {weakest.placed} of {weakest.n} peers: the weakest survives "
                f"{plural(weakest.spare, 'more peer')} lost, not {weakest.n - weakest.k}"
            )
        return lines


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


def progress_text(summary: BackupSummary, totals: ScanTotals | None, elapsed: float) -> str:
    """The progress line of a backup: files and bytes so far, and once the
    scan has counted them, of how many, the percentage and the ETA (files
    the file cache says are unchanged count as done without being read)."""
    files = summary.files_new + summary.files_changed + summary.files_unchanged
    done = summary.bytes_read + summary.bytes_unchanged
    if totals is None:
        return f"{plural(files, 'file')}, {human_bytes(done)} (counting…)"
    return (
        f"{files} of {plural(totals.files, 'file')}, {human_bytes(done)} of "
        f"{human_bytes(totals.bytes)} ({fraction_line(done, totals.bytes, elapsed)})"
    )


class Backup:
    """One backup run: the walk feeding the pipeline, then the snapshot's commit."""

    def __init__(
        self,
        repo: Repository,
        *,
        progress: Progress | None = None,
        exclude: ExcludeRules | None = None,
        dry_run: bool = False,
        skip_if_unchanged: bool = False,
        told: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self.repo = repo
        #: Told of each file read: ``("new" or "changed", path)`` (``--verbose``).
        self.told = told
        #: What the scan found (None until it is done, or without progress).
        self.totals: ScanTotals | None = None
        self.dry_run = dry_run
        self.skip_if_unchanged = skip_if_unchanged
        self.exclude = exclude if exclude is not None else ExcludeRules()
        config = repo.config
        self.params = repo.chunker_params()
        self._keys = SealingKeys(repo.keyring.dedup_key, repo.keyring.data_key)
        #: Batches of at least this many files go to sealer processes.
        self.sealer_min_files = SEALER_MIN_FILES
        self.summary = BackupSummary(
            k=config.k,
            n=config.n,
            configured_k=config.k,
            configured_n=config.n,
            dry_run=dry_run,
        )
        self.progress = progress or Progress("backup", enabled=False)
        self._deduper = Deduper(repo.index)
        self._file_cache = FileCache(repo.index, self._deduper.known)

    async def run(
        self, paths: Iterable[str | os.PathLike[str]], tags: Iterable[str] = ()
    ) -> BackupSummary:
        targets = normalize_paths(paths)
        if not targets:
            raise UsageError("nothing to back up: give at least one path")
        pipeline = Pipeline(
            self.repo,
            self.params,
            self._keys,
            self._deduper,
            Sealers(sealwire.Setup(self._keys, self.params), self.sealer_min_files),
            job_done=self._job_done,
            pack_written=self._pack_written,
            instead_of_storing=self._pack_counted if self.dry_run else None,
        )
        walk = TreeWalk(
            pipeline,
            self._file_cache,
            self.exclude,
            self.summary,
            self.repo.keyring.dedup_key,
            told=self.told,
        )
        # Listed from now on, while the peers are asked.
        await walk.start_listing(targets)
        try:
            return await self._run(walk, pipeline, targets, tuple(tags))
        finally:
            await walk.aclose()

    async def _run(
        self, walk: TreeWalk, pipeline: Pipeline, targets: list[bytes], tags: tuple[str, ...]
    ) -> BackupSummary:
        if not self.dry_run:
            # Who is up and how much room each has, before the first pack: a
            # dead peer costs one probe instead of a timeout per pack, and
            # placement weighs the rest by their room.
            await self.repo.probe_peers()
            self.repo.check_enough_peers()
            # Another home of this identity writing the root record would
            # make this one's unpublishable: say so before uploading anything.
            await self.repo.check_writer()
        started = time.monotonic()
        stop_scan = threading.Event()
        if self.progress.enabled:
            # Counted beside the walk, for a percentage and an ETA (restic's
            # scan): a thread of its own, never waited for.
            threading.Thread(
                target=self._scan, args=(targets, stop_scan), name="backup-scan", daemon=True
            ).start()
        try:
            with unwrap_single(), runtime.rare_collections():
                snapshot_id, snapshot = await pipeline.run(
                    functools.partial(self._save_snapshot, walk, pipeline, targets, tags)
                )
        finally:
            stop_scan.set()
        self.progress.close()
        self.summary.seconds = time.monotonic() - started
        if self.dry_run:
            self.summary.snapshot_id = snapshot_id
            return self.summary
        segment = await self.repo.write_index_segment(self.repo.index.packs_without_segment())
        if segment is not None:
            self.summary.placed(segment)
        unchanged = self.summary.unchanged_since is not None
        with self.repo.index.transaction():
            if not unchanged:
                self.repo.index.add_snapshot(snapshot_id, snapshot)
            self._file_cache.write_back()
        if not unchanged or segment is not None:
            await self.repo.publish_root()
        self.summary.passed_over = [
            (peer_id, what, reason)
            for peer_id, (what, reason) in sorted(self.repo.run.passed_over().items())
        ]
        self.summary.snapshot_id = b"" if unchanged else snapshot_id
        self.summary.seconds = time.monotonic() - started
        return self.summary

    async def _save_snapshot(
        self, walk: TreeWalk, pipeline: Pipeline, targets: list[bytes], tags: tuple[str, ...]
    ) -> tuple[bytes, Snapshot]:
        """Walk the targets and store the snapshot of what was found; it is
        sent once every blob it refers to is."""
        root = await walk.save(targets)
        summary = self.summary
        if self.skip_if_unchanged:
            parent = self._parent(targets)
            if parent is not None and await self._unchanged(parent[1], root, walk, targets):
                summary.unchanged_since = parent[0]
                pipeline.drop_unsent()
                return parent
        snapshot = Snapshot(
            time_ns=time.time_ns(),
            hostname=socket.gethostname(),
            paths=tuple(targets),
            tags=tags,
            tree=root,
            file_count=summary.files_new + summary.files_changed + summary.files_unchanged,
            total_size=summary.total_size,
        )
        snapshot_bytes = formats.encode_snapshot(snapshot)
        snapshot_id = blobs.blob_id(self.repo.keyring.dedup_key, snapshot_bytes)
        if await pipeline.store_small_blob(BlobType.SNAPSHOT, snapshot_id, snapshot_bytes):
            summary.blobs_new += 1
        return snapshot_id, snapshot

    def _parent(self, targets: list[bytes]) -> tuple[bytes, Snapshot] | None:
        """The newest snapshot of the same paths from this host (module docstring)."""
        host = socket.gethostname()
        same = [
            (sid, snap)
            for sid, snap in self.repo.index.snapshots()
            if snap.paths == tuple(targets) and snap.hostname == host
        ]
        return max(same, key=lambda row: (row[1].time_ns, row[0]), default=None)

    async def _unchanged(
        self, parent: Snapshot, root: bytes, walk: TreeWalk, targets: list[bytes]
    ) -> bool:
        """Whether every target is as in ``parent``: its node (metadata and
        whole tree below) the same. The directories above the targets are
        not compared: their mtimes change as other files come and go beside
        the targets, which is not a change to what is backed up."""
        if parent.tree == root:
            return True
        for target in targets:
            node = walk.target_nodes.get(target)
            if node is None:  # "/" itself, or a target that could not be read
                return False
            try:
                before = await snapshots.find_node(self.repo, parent, target)
            except (NotEnoughShardsError, UsageError):
                return False  # unreadable or not there: no reason to skip
            if before != node:
                return False
        return True

    def _scan(self, targets: list[bytes], stop: threading.Event) -> None:
        self.totals = scan(targets, self.exclude, stop)

    def _job_done(self, job: Job) -> None:
        summary = self.summary
        summary.bytes_read += job.bytes_read
        summary.bytes_new += job.bytes_new
        summary.bytes_deduplicated += job.bytes_deduplicated
        summary.blobs_new += job.blobs_new
        self.progress.update(progress_text(summary, self.totals, self.progress.elapsed))

    def _pack_counted(self, builder: packer.PackBuilder) -> None:
        """A dry run's pack: counted as the configured code would store it."""
        summary = self.summary
        summary.packs_written += 1
        shard = erasure.shard_length(builder.size, summary.k) + formats.SHARD_HEADER_SIZE
        summary.bytes_stored += summary.n * shard

    def _pack_written(self, record: PackRecord) -> None:
        summary = self.summary
        summary.packs_written += 1
        # Fewer peers than configured give a smaller code: say which.
        summary.placed(record)
        summary.bytes_stored += len(record.shards) * (record.shard_size + formats.SHARD_HEADER_SIZE)
