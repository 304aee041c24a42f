"""The shard host: what a storage node keeps on disk for its peers.

Nouns:

* **owner** — the node id (20 bytes) of the peer whose shards these are. The
  server passes the session's authenticated node id, never one read from a
  message. Every method takes the owner and only ever touches that owner's
  rows and files, so one owner cannot read, list, renew or delete another's
  shards: owners are isolated by construction, not by a check that could be
  forgotten.
* **hosted shard** — opaque bytes an owner stored under a 32-byte shard id,
  with the geometry the owner declared for them: the size, a Merkle block size
  and the Merkle root (:mod:`p2pbackup.core.merkle`'s tree over the whole stored
  bytes). :class:`HostedShard` is its metadata row. Shards are write-once: an
  id names the same bytes until the shard is deleted or collected.
* **upload** — :class:`Upload`: a put in progress. Its bytes stream into a
  temp file and a :class:`~p2pbackup.core.merkle.MerkleBuilder`; :meth:`Upload.commit`
  stores the shard only if the size and the Merkle root are the declared ones,
  so an acknowledged shard has always been verified.
* **charge** — what a stored file costs its owner (:class:`ShardCharge`): its
  size rounded up to whole 4 KiB blocks, plus 4 KiB for its inode, directory
  entry and row. That is at least what the file takes on disk, so a quota
  bounds the disk an owner can take, however small its shards: a 0-byte
  shard is charged 4 KiB. Each owner also keeps at most
  :data:`MAX_SHARDS_PER_OWNER` shards, which bounds the files of an owner
  with no quota.
* **reservation** — the charge of every upload in progress, counted against
  the quotas and the free disk beside what is already held, so that two
  concurrent uploads cannot together exceed a quota or a disk that each fits
  alone. On the disk, only the part of an upload not written yet is counted
  (the free space already shows the rest).
* **lease** — the unix second until which the host promises to keep a shard.
  Putting or renewing never shortens it. A lease that has run out makes the
  shard *collectable*: :meth:`ShardHost.collect_expired` deletes it, except
  the shards of **spared** owners (the node's friends: a friend's shards
  are kept while it is a friend, whatever its leases); until then it is
  still served and may be renewed. How long a lease may be is the server's
  to bound (a stranger gets less than a friend, :mod:`p2pbackup.node.server`).
* **forgetting an owner** — :meth:`ShardHost.delete_owner`: every shard and
  the root record of one owner, deleted at its request (it is leaving).
* **root record** — one owner's opaque mutable bytes (at most 1 MiB), replaced
  whole and atomically.
* **revocation** — an owner's word that this host must refuse its delegation
  certificates for one delegate issued before a time (docs/delegation.md);
  the latest time asked for is kept.
* **held grant** — a repair grant and certificate an owner handed this node
  as its delegate (both sealed, as received and already checked by the
  server), with the grant's sequence: a grant replaces only one of a lower
  sequence. Revoking this node as a delegate drops it.
* **usage** — what an owner is charged for: its shards plus its root record,
  each at its charge. The **owner quota** bounds each owner's usage, the
  **capacity** all owners' together; either may be None (no bound but the
  disk). (:func:`usage_by_owner` reads the plain bytes of shards instead, for
  the reciprocity balance, which compares them with the owner's own count.)
* **offer** — what the host offers one owner now: its usage plus its
  **room**, the charge a put may still take: the least of what the owner
  quota, the capacity and the free disk still allow, uploads in progress
  counted (:meth:`ShardHost.space`). This
  is what a node states to each owner, so that owners place shards where
  there is room and ask no more of a friend than it gives.
* **reconciliation** — what :meth:`ShardHost.open` does before serving: bring
  files and rows back into agreement after a crash (:class:`ReconcileReport`).
* **adoption** — listing a shard file again that has no row. Shards are
  self-describing: a p2pbackup shard starts with its header (index, Merkle
  block size, shard size; :mod:`p2pbackup.core.formats`), and a file whose
  size agrees with its header (and, for a version 1 header, which names its
  pack, whose name is the shard id the header derives) gets its row back —
  the Merkle root recomputed from the bytes (the
  owner checks it against its own, as for every read), stored at the file's
  mtime, with a lease of :data:`ADOPTED_LEASE_SECONDS` from now (the old
  expiry was in the lost row). Other files without a row are removed.

Layout under the host's root directory (format version 1, the SQLite
``user_version``), private to the node's user (directories 0700, files
0600; tightened on open)::

    host.lock                             flock: one process per host
    hosted.sqlite                         metadata (WAL): one row per shard
    shards/<owner hex>/<ab>/<shard hex>   shard files; <ab> = first byte of the id
    roots/<owner hex>                     root records
    tmp/                                  uploads in progress; emptied on open

Crash order. A put writes the temp file, fsyncs it, renames it into place,
fsyncs the directory and only then inserts the row (one transaction, durable
before it returns); the put is acknowledged after that. A crash at any point
therefore leaves either nothing, a temp file (removed on open) or a file
without a row — an **orphan**: adopted on open if it is a well-formed shard,
else removed — and never a row without its file. A delete removes the row
first and the file second, for the same reason (a crash in between may bring
the shard back by adoption; its lease then ends it). A row whose file is gone
or has the wrong size (a disk that lost data) is dropped on open and reported
as **missing**, so the owner's next audit or listing tells it to repair.

A lost database. The rows are the only record of what was acknowledged, but
the files are the data: when ``hosted.sqlite`` is missing or empty (deleted,
cut to 0 bytes, or a copy of the home that left out the ``-wal`` file, which
holds the rows not yet checkpointed), every shard file is an orphan. Open
then never removes one: it adopts them all, which rebuilds the database
(:attr:`ReconcileReport.rebuilt_database`), or — if any file is not a
well-formed shard — refuses to open (StoreError naming one such file) and
changes nothing, so that the user can move the stray files away and retry.

Threads. The server calls every method from worker threads, several at once.
One SQLite connection and the usage counters are guarded by one lock; the
bulk of the file I/O (writing and syncing uploads, reading shards, hashing for
audits) happens outside it, so a large upload does not hold up reads of other
shards. Renames into place and file removals happen under the lock, so that a
row and its file change together as seen by every other thread.

Errors. Refusals are :class:`~p2pbackup.errors.StoreError`s: ShardNotFoundError
for an absent shard, StoreFullError for quota, capacity or a full disk (ENOSPC,
EDQUOT), :class:`ShardConflictError` (defined here, since only a host meets it)
for a different shard already stored under the id, MerkleError for bytes that
fail their declared root, and plain StoreError for anything else, including
nonsensical values a peer may send (a zero block size, a bad range), which
must be refused rather than crash the server. Only arguments the server
itself builds (the owner) raise ValueError.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import functools
import os
import re
import secrets
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path

import attrs

from p2pbackup.core import formats
from p2pbackup.core.formats import MAX_BLOCK_SIZE
from p2pbackup.core.merkle import HASH_SIZE, MerkleBuilder, block_count, prove_blocks
from p2pbackup.engine.progress import plural
from p2pbackup.errors import (
    FormatError,
    MerkleError,
    ShardNotFoundError,
    StoreError,
    StoreFullError,
    StoreRequestError,
)
from p2pbackup.model import ID_SIZE, NODE_ID_SIZE
from p2pbackup.stores.durable import (
    DirectWriter,
    fsync_dir,
    make_dirs,
    os_errors,
    store_error,
    unlink_quietly,
    write_temp_file,
)
from p2pbackup.stores.shardstore import check_audit_size, check_range, check_shard_id, conflict
from p2pbackup.wire.messages import (
    MAX_LEASE_SECONDS,
    MAX_LIST_LIMIT,
    MAX_ROOT_SIZE,
)

#: Version of the layout and of the SQLite schema (its ``user_version``).
SCHEMA_VERSION = 1
DB_NAME = "hosted.sqlite"
LOCK_NAME = "host.lock"
SHARDS_DIR = "shards"
ROOTS_DIR = "roots"
TMP_DIR = "tmp"

# What a host keeps and answers is bounded by the protocol's own limits
# (wire.messages), so that no request the wire lets through is refused here
# and no answer is built that the wire could not carry: root records
# (MAX_ROOT_SIZE), leases (MAX_LEASE_SECONDS; a longer request is granted that
# much, and the answer says the expiry granted), listing pages
# (MAX_LIST_LIMIT), blocks per audit (MAX_AUDIT_BLOCKS); Merkle blocks by the
# formats' MAX_BLOCK_SIZE (an audit answer carries one per index).

#: Most blocks a shard may have. An upload keeps 32 bytes per block in memory,
#: so a peer declaring 1-byte blocks must not be able to make that gigabytes.
#: 65 536 blocks of 64 KiB is a 4 GiB shard.
MAX_BLOCKS = 1 << 16
#: Most shards one owner may keep here (module docstring, "charge").
MAX_SHARDS_PER_OWNER = 1 << 20
#: Revocations one owner may keep here (each a row; a node bounds them all).
MAX_REVOCATIONS_PER_OWNER = 1024
#: The lease of an adopted shard: at least the 365 days p2pbackup owners ask.
ADOPTED_LEASE_SECONDS = 366 * 24 * 3600

# Adoption hashes a whole shard file in reads of this size (bounded memory).
_READ_SIZE = 1 << 20
# collect_expired removes this many shards per turn of the lock.
_COLLECT_BATCH = 1000
_OWNER_NAME = re.compile(f"[0-9a-f]{{{2 * NODE_ID_SIZE}}}")
_SHARD_NAME = re.compile(f"[0-9a-f]{{{2 * ID_SIZE}}}")

_SCHEMA = """
CREATE TABLE shards (
    owner BLOB NOT NULL,
    shard_id BLOB NOT NULL,
    size INTEGER NOT NULL,
    block_size INTEGER NOT NULL,
    merkle_root BLOB NOT NULL,
    stored_at INTEGER NOT NULL,
    lease_expiry INTEGER NOT NULL,
    PRIMARY KEY (owner, shard_id)
) WITHOUT ROWID;
CREATE INDEX shards_by_expiry ON shards (lease_expiry);
"""
#: Tables added to version 1 without a new version (nothing older reads
#: them, and a database without them gains them on open).
_DELEGATION_SCHEMA = """
CREATE TABLE IF NOT EXISTS revoked_delegates (
    owner BLOB NOT NULL,
    delegate BLOB NOT NULL,
    revoked_before INTEGER NOT NULL,
    PRIMARY KEY (owner, delegate)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS held_grants (
    owner BLOB PRIMARY KEY,
    sequence INTEGER NOT NULL,
    grant_data BLOB NOT NULL,
    certificate BLOB NOT NULL,
    received_at INTEGER NOT NULL
) WITHOUT ROWID;
"""
_COLUMNS = "shard_id, size, block_size, merkle_root, stored_at, lease_expiry"


@attrs.frozen
class HeldGrant:
    """A repair grant an owner handed this node (module docstring, "held grant")."""

    owner: bytes = attrs.field(repr=bytes.hex)
    sequence: int
    grant: bytes = attrs.field(repr=lambda data: f"<{len(data)} bytes>")
    certificate: bytes = attrs.field(repr=lambda data: f"<{len(data)} bytes>")
    received_at: int

    @classmethod
    def from_row(cls, row: tuple[bytes, int, bytes, bytes, int]) -> HeldGrant:
        owner, sequence, grant, certificate, received_at = row
        return cls(bytes(owner), int(sequence), bytes(grant), bytes(certificate), received_at)


class ShardConflictError(StoreError):
    """A different shard (size or Merkle root) is already stored under the id."""


@attrs.frozen
class ShardCharge:
    """What a stored file of some size costs its owner (module docstring, "charge")."""

    #: Sizes are rounded up to whole blocks of this many bytes.
    block: int = 4096
    #: Added once per file: its inode, directory entry and row.
    per_file: int = 4096

    def of(self, size: int) -> int:
        """The charge of a file of ``size`` bytes."""
        return -(-size // self.block) * self.block + self.per_file

    def largest(self, budget: int) -> int:
        """The largest size whose charge fits in ``budget`` (0 if none does)."""
        return max(0, (budget - self.per_file) // self.block * self.block)


@attrs.frozen
class HostedShard:
    """Metadata of one hosted shard, as its owner declared it."""

    shard_id: bytes = attrs.field(repr=lambda value: value.hex())
    size: int
    block_size: int
    merkle_root: bytes = attrs.field(repr=lambda value: value.hex())
    #: Unix seconds.
    stored_at: int
    lease_expiry: int

    @classmethod
    def from_row(cls, row: tuple[bytes, int, int, bytes, int, int]) -> HostedShard:
        shard_id, size, block_size, merkle_root, stored_at, lease_expiry = row
        return cls(
            shard_id=bytes(shard_id),
            size=size,
            block_size=block_size,
            merkle_root=bytes(merkle_root),
            stored_at=stored_at,
            lease_expiry=lease_expiry,
        )


@attrs.frozen
class LostShard:
    """A row reconciliation dropped because its file was gone or the wrong size."""

    owner: bytes = attrs.field(repr=lambda value: value.hex())
    shard_id: bytes = attrs.field(repr=lambda value: value.hex())
    reason: str


@attrs.frozen
class ReconcileReport:
    """What :meth:`ShardHost.open` found and fixed."""

    #: Files without a row that are not shards adoption can list again, removed.
    orphans_removed: int = 0
    #: Rows dropped because their file was missing or had the wrong size.
    missing: tuple[LostShard, ...] = ()
    #: Files of uploads in progress at the last stop, removed.
    temps_removed: int = 0
    #: Shards whose lease had run out, collected.
    expired: int = 0
    #: Shard files without a row listed again from their headers (adoption).
    adopted: int = 0
    #: The database was missing or empty and was rebuilt by adopting every file.
    rebuilt_database: bool = False

    @property
    def clean(self) -> bool:
        return not (
            self.orphans_removed
            or self.missing
            or self.temps_removed
            or self.expired
            or self.adopted
            or self.rebuilt_database
        )

    def describe(self) -> list[str]:
        """One line per finding, for a human; nothing when all was in order."""
        lines = []
        days = ADOPTED_LEASE_SECONDS // 86400
        if self.rebuilt_database:
            lines.append(
                f"{DB_NAME} was missing or empty: rebuilt it from the "
                f"{plural(self.adopted, 'shard file')} found (their leases restart at {days} days)"
            )
        elif self.adopted:
            lines.append(
                f"listed {plural(self.adopted, 'shard file')} again whose row was missing "
                f"(their leases restart at {days} days)"
            )
        if self.temps_removed:
            lines.append(f"removed {plural(self.temps_removed, 'unfinished upload')}")
        if self.orphans_removed:
            lines.append(
                f"removed {plural(self.orphans_removed, 'shard file')} that were never stored"
            )
        for lost in self.missing:
            lines.append(
                f"lost shard {lost.shard_id.hex()[:16]} of {lost.owner.hex()[:16]}: {lost.reason}"
            )
        if self.expired:
            lines.append(f"collected {plural(self.expired, 'shard')} whose lease ran out")
        return lines


# -- checks -------------------------------------------------------------------------------


def _check_owner(owner: bytes) -> None:
    # The server builds the owner from the session, so a bad one is our bug.
    if not isinstance(owner, bytes) or len(owner) != NODE_ID_SIZE:
        raise ValueError(f"an owner is a {NODE_ID_SIZE}-byte node id, got {owner!r}")


def _check_geometry(size: int, block_size: int, merkle_root: bytes) -> None:
    if size < 0:
        raise StoreRequestError(f"shard size must not be negative, got {size}")
    if not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise StoreRequestError(f"Merkle block size {block_size} is not in [1, {MAX_BLOCK_SIZE}]")
    blocks = block_count(size, block_size)
    if blocks > MAX_BLOCKS:
        raise StoreRequestError(
            f"a shard of {size} bytes in blocks of {block_size} has {blocks} blocks; "
            f"this host takes at most {MAX_BLOCKS}"
        )
    if len(merkle_root) != HASH_SIZE:
        raise StoreRequestError(f"a Merkle root is {HASH_SIZE} bytes, got {len(merkle_root)}")


def _granted_lease(lease_seconds: int) -> int:
    if lease_seconds < 0:
        raise StoreRequestError(f"lease must not be negative, got {lease_seconds} seconds")
    return min(lease_seconds, MAX_LEASE_SECONDS)


def _short(shard_id: bytes) -> str:
    return shard_id.hex()[:16]


# -- file helpers -------------------------------------------------------------------------


def _make_private(path: Path) -> None:
    """Take group and other permissions off ``path`` if it exists (a host made
    by an older version, or a directory the user made for it)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    if mode & 0o077:
        os.chmod(path, mode & 0o700)


def _read_at(fd: int, offset: int, length: int) -> bytes:
    """Up to ``length`` bytes from ``offset``; fewer only at the end of the file."""
    pieces = []
    while length > 0:
        piece = os.pread(fd, length, offset)
        if not piece:
            break
        pieces.append(piece)
        offset += len(piece)
        length -= len(piece)
    return b"".join(pieces)


# -- the host -----------------------------------------------------------------------------


class ShardHost:
    """The shards and root records a node keeps for its peers (module docstring).

    Make one with :meth:`open`; every method is safe to call from several
    threads at once.
    """

    def __init__(
        self,
        root: Path,
        db: sqlite3.Connection,
        lock_fd: int,
        *,
        capacity: int | None,
        owner_quota: int | None,
        charge: ShardCharge,
        max_shards_per_owner: int,
        clock: Callable[[], float],
    ) -> None:
        # Use open(): this only wires together what open() prepared.
        self.root = root
        self.capacity = capacity
        self.owner_quota = owner_quota
        self.charge = charge
        self.max_shards_per_owner = max_shards_per_owner
        self.reconcile_report = ReconcileReport()
        self._db = db
        self._lock_fd = lock_fd
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False
        # Per owner: the charges of its shards, their count, its root record's size.
        self._shard_charges: dict[bytes, int] = {}
        self._shard_counts: dict[bytes, int] = {}
        self._root_sizes: dict[bytes, int] = {}
        # Per owner: the charges of its uploads in progress.
        self._reserved: dict[bytes, int] = {}
        self._uploads: set[Upload] = set()

    @classmethod
    def open(
        cls,
        root: Path,
        *,
        capacity: int | None = None,
        owner_quota: int | None = None,
        charge: ShardCharge = ShardCharge(),
        max_shards_per_owner: int = MAX_SHARDS_PER_OWNER,
        clock: Callable[[], float] = time.time,
        spare: Collection[bytes] = frozenset(),
    ) -> ShardHost:
        """Open (creating if needed) the host at ``root`` and reconcile it
        (shards whose lease ran out are collected, but those of the owners in
        ``spare``).

        StoreError if another process has it open, if its database is not
        one this version reads, or if the database is missing or empty while
        shard files it cannot account for are present (module docstring, "A
        lost database").
        """
        for name, limit in (("capacity", capacity), ("owner quota", owner_quota)):
            if limit is not None and limit < 0:
                raise ValueError(f"{name} must not be negative, got {limit}")
        with os_errors("create the shard host directory", root):
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            _make_private(root)
            for name in (SHARDS_DIR, ROOTS_DIR, TMP_DIR):
                make_dirs(root / name, root, mode=0o700)
                _make_private(root / name)
            lock_fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(f"the shard host {root} is in use by another process") from None
            db, created = _open_db(root / DB_NAME, before_create=lambda: _check_adoptable(root))
        except BaseException:
            os.close(lock_fd)
            raise
        host = cls(
            root,
            db,
            lock_fd,
            capacity=capacity,
            owner_quota=owner_quota,
            charge=charge,
            max_shards_per_owner=max_shards_per_owner,
            clock=clock,
        )
        try:
            report = host._reconcile(spare)
            if created and report.adopted:
                report = attrs.evolve(report, rebuilt_database=True)
            host.reconcile_report = report
        except BaseException:
            host.close()
            raise
        return host

    def close(self) -> None:
        """Abort the uploads in progress and release the host; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            uploads = builtins.list(self._uploads)
        # Outside the lock: an upload takes its own lock first, then ours.
        for upload in uploads:
            upload.abort()
        with self._lock:
            self._db.close()
            os.close(self._lock_fd)  # releases the flock

    # -- puts ------------------------------------------------------------------------------

    def begin_put(
        self,
        owner: bytes,
        shard_id: bytes,
        size: int,
        block_size: int,
        merkle_root: bytes,
        lease_seconds: int,
    ) -> Upload | None:
        """Start storing a shard; None when it is already stored.

        "Already stored" means the same size and Merkle root: the put is then
        idempotent, and the lease is extended to the later of the old and the
        new expiry. A different shard under the id raises ShardConflictError
        (unless its lease has run out: the id is then free again). Its charge
        is reserved until the upload is committed or aborted; StoreFullError
        when the owner's quota, the capacity or the disk has no room for it,
        or the owner keeps as many shards as it may.
        """
        _check_owner(owner)
        check_shard_id(shard_id, StoreRequestError)
        _check_geometry(size, block_size, merkle_root)
        lease = _granted_lease(lease_seconds)
        disk_free = self._disk_free()
        with self._lock:
            self._check_open()
            now = self._now()
            existing = self._row(owner, shard_id)
            if existing is not None:
                if existing.size == size and existing.merkle_root == merkle_root:
                    self._extend_leases(owner, [shard_id], now + lease)
                    return None
                if existing.lease_expiry > now:
                    raise _conflict(shard_id, existing)
                self._remove_locked(owner, shard_id, existing.size)
            shards = self._shard_counts.get(owner, 0) + sum(
                1 for upload in self._uploads if upload.owner == owner
            )
            if shards >= self.max_shards_per_owner:
                raise StoreFullError(
                    f"owner {owner.hex()[:16]} keeps {shards} shards here (uploads in "
                    f"progress counted), the most this node keeps for one owner"
                )
            charge = self.charge.of(size)
            self._check_room(owner, size, charge, disk_free=disk_free)
            self._reserved[owner] = self._reserved.get(owner, 0) + charge
            temp = self.root / TMP_DIR / f"shard-{secrets.token_hex(8)}"
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except OSError as error:
                self._release(owner, charge)
                raise store_error("create", temp, error) from error
            upload = Upload(
                self,
                owner=owner,
                shard_id=shard_id,
                size=size,
                block_size=block_size,
                merkle_root=merkle_root,
                lease_seconds=lease,
                temp=temp,
                fd=fd,
            )
            self._uploads.add(upload)
            return upload

    def _publish(self, upload: Upload) -> int:
        """Move a verified, synced upload into place and insert its row."""
        owner, shard_id = upload.owner, upload.shard_id
        final = self._shard_path(owner, shard_id)
        try:
            with os_errors("create the directory of", final):
                make_dirs(final.parent, self.root / SHARDS_DIR, mode=0o700)
        except BaseException:
            self._finish(upload)
            raise
        with self._lock:
            # The reservation ends in the same critical section as the row
            # begins, so no one ever sees the bytes counted twice.
            try:
                self._check_open()
                now = self._now()
                expiry = now + upload.lease_seconds
                existing = self._row(owner, shard_id)
                if existing is not None:
                    # Another upload of this id committed first.
                    if existing.size == upload.size and existing.merkle_root == upload.merkle_root:
                        self._extend_leases(owner, [shard_id], expiry)
                        return max(expiry, existing.lease_expiry)
                    if existing.lease_expiry > now:
                        raise _conflict(shard_id, existing)
                    self._remove_locked(owner, shard_id, existing.size)
                try:
                    with os_errors("move into place", final):
                        os.replace(upload.temp, final)
                        fsync_dir(final.parent)
                    row = (owner, shard_id, upload.size, upload.block_size, upload.merkle_root)
                    with self._transaction() as db:
                        db.execute(
                            f"INSERT INTO shards (owner, {_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (*row, now, expiry),
                        )
                except BaseException:
                    # Without its row the file is an orphan: remove it now
                    # rather than at the next open. (No other thread can have
                    # put a file there: the name is free while we hold the lock.)
                    unlink_quietly(final)
                    raise
                self._count_shard(owner, upload.size, +1)
                return expiry
            finally:
                self._finish_locked(upload)

    def _finish(self, upload: Upload) -> None:
        with self._lock:
            self._finish_locked(upload)

    def _finish_locked(self, upload: Upload) -> None:
        """Forget an upload and free its reservation (once)."""
        if upload in self._uploads:
            self._uploads.discard(upload)
            self._release(upload.owner, self.charge.of(upload.size))

    def _release(self, owner: bytes, charge: int) -> None:
        left = self._reserved[owner] - charge
        if left:
            self._reserved[owner] = left
        else:
            del self._reserved[owner]

    def _count_shard(self, owner: bytes, size: int, sign: int) -> None:
        """Add (``sign`` +1) or take away (-1) a stored shard of ``size`` bytes."""
        for counts, amount in (
            (self._shard_charges, self.charge.of(size)),
            (self._shard_counts, 1),
        ):
            left = counts.get(owner, 0) + sign * amount
            if left:
                counts[owner] = left
            else:
                counts.pop(owner, None)

    def _disk_free(self) -> int:
        with os_errors("read the free space of", self.root):
            disk = os.statvfs(self.root)
        return int(disk.f_bavail * disk.f_frsize)

    def _rooms_locked(self, owner: bytes, disk_free: int, freed: int = 0) -> dict[str, int]:
        """The charge each bound still allows ``owner`` (``freed`` given back),
        each with the words that explain it."""
        rooms = {}
        if self.owner_quota is not None:
            used = self._usage_locked(owner)
            reserved = self._reserved.get(owner, 0)
            free = self.owner_quota - used - reserved + freed
            rooms[
                f"owner {owner.hex()[:16]} has no room for {{what}}: its quota is "
                f"{self.owner_quota} bytes, {used} used and {reserved} reserved by "
                f"uploads in progress ({max(0, free)} free)"
            ] = free
        if self.capacity is not None:
            used = self._total_locked()
            reserved = sum(self._reserved.values())
            free = self.capacity - used - reserved + freed
            rooms[
                f"this node has no room for {{what}}: its capacity is "
                f"{self.capacity} bytes, {used} used and {reserved} reserved by "
                f"uploads in progress ({max(0, free)} free)"
            ] = free
        # What uploads in progress have not written yet is not on the disk
        # yet, but will be: the disk's free space must hold it too.
        pending = sum(max(0, self.charge.of(u.size) - u.written) for u in self._uploads)
        rooms[
            f"this node has no room for {{what}}: the disk holding {self.root} has "
            f"{disk_free} bytes free, {pending} of them promised to uploads in progress"
        ] = disk_free - pending + freed
        return rooms

    def _check_room(
        self, owner: bytes, size: int, charge: int, *, freed: int = 0, disk_free: int
    ) -> None:
        """StoreFullError unless a file of ``size`` bytes, charged ``charge``,
        fits (``freed`` given back)."""
        what = f"{size} bytes" if charge == size else f"{size} bytes (charged {charge})"
        for words, free in self._rooms_locked(owner, disk_free, freed).items():
            if charge > free:
                raise StoreFullError(words.format(what=what))

    # -- reads -----------------------------------------------------------------------------

    def has(self, owner: bytes, shard_id: bytes) -> bool:
        return self.info(owner, shard_id) is not None

    def info(self, owner: bytes, shard_id: bytes) -> HostedShard | None:
        _check_owner(owner)
        check_shard_id(shard_id, StoreRequestError)
        with self._lock:
            self._check_open()
            return self._row(owner, shard_id)

    def read(
        self, owner: bytes, shard_id: bytes, offset: int = 0, length: int | None = None
    ) -> bytes:
        """The shard's bytes from ``offset``, at most ``length`` (None: to the end).

        A range past the end returns what exists. The bytes are read as they
        are on disk, unverified: the owner checks them against its root.
        """
        check_range(offset, length, StoreRequestError)
        with self._open_shard(owner, shard_id) as (fd, _info):
            if length is None:
                length = max(0, os.fstat(fd).st_size - offset)
            return _read_at(fd, offset, length)

    def audit(
        self, owner: bytes, shard_id: bytes, indices: Sequence[int]
    ) -> builtins.list[tuple[bytes, tuple[bytes, ...]]]:
        """Blocks ``indices`` of a shard, each with its Merkle proof.

        The tree is rebuilt from the file as it is now
        (:func:`~p2pbackup.core.merkle.prove_blocks`): a damaged file gives
        proofs that fail against the owner's root. StoreError for an index out of
        range (naming it and the block count) or a file of the wrong size.
        """
        check_audit_size(indices)
        with self._open_shard(owner, shard_id) as (fd, info):
            count = block_count(info.size, info.block_size)
            for index in indices:
                if not 0 <= index < count:
                    raise StoreRequestError(
                        f"audit of shard {_short(shard_id)}: block {index} is out of range "
                        f"(the shard has {count} blocks)"
                    )
            on_disk = os.fstat(fd).st_size
            if on_disk != info.size:
                raise StoreError(
                    f"shard {_short(shard_id)} is damaged: its file holds {on_disk} bytes, "
                    f"{info.size} were stored"
                )
            read = functools.partial(_read_at, fd)
            return prove_blocks(read, info.size, info.block_size, indices)

    @contextlib.contextmanager
    def _open_shard(self, owner: bytes, shard_id: bytes) -> Iterator[tuple[int, HostedShard]]:
        """An open descriptor of a stored shard's file, with its row."""
        info = self.info(owner, shard_id)
        path = self._shard_path(owner, shard_id)
        if info is None:
            raise _not_found(shard_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise _not_found(shard_id) from None  # deleted since the lookup
        except OSError as error:
            raise store_error("open", path, error) from error
        try:
            with os_errors("read", path):
                yield fd, info
        finally:
            os.close(fd)

    def list(
        self, owner: bytes, after: bytes | None = None, limit: int = MAX_LIST_LIMIT
    ) -> tuple[builtins.list[HostedShard], bool]:
        """The owner's shards with ids above ``after``, sorted by id, at most
        ``limit`` (capped at MAX_LIST_LIMIT); and whether more follow."""
        _check_owner(owner)
        if limit < 1:
            raise StoreRequestError(f"a listing needs a limit of at least 1, got {limit}")
        limit = min(limit, MAX_LIST_LIMIT)
        with self._lock:
            self._check_open()
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM shards WHERE owner = ? AND shard_id > ? "
                "ORDER BY shard_id LIMIT ?",
                (owner, after or b"", limit + 1),
            ).fetchall()
        shards = [HostedShard.from_row(row) for row in rows[:limit]]
        return shards, len(rows) > limit

    # -- leases and deletes -----------------------------------------------------------------

    def renew(
        self, owner: bytes, shard_ids: Sequence[bytes], lease_seconds: int
    ) -> tuple[int, builtins.list[bytes]]:
        """Keep the listed shards at least ``lease_seconds`` from now.

        Returns that expiry (unix seconds; a lease already longer is kept)
        and the ids the owner has no shard under, in the order given.
        """
        _check_owner(owner)
        for shard_id in shard_ids:
            check_shard_id(shard_id, StoreRequestError)
        lease = _granted_lease(lease_seconds)
        with self._lock:
            self._check_open()
            expiry = self._now() + lease
            missing = self._extend_leases(owner, shard_ids, expiry)
        return expiry, missing

    def _extend_leases(
        self, owner: bytes, shard_ids: Sequence[bytes], expiry: int
    ) -> builtins.list[bytes]:
        missing = []
        with self._transaction() as db:
            for shard_id in shard_ids:
                cursor = db.execute(
                    "UPDATE shards SET lease_expiry = MAX(lease_expiry, ?) "
                    "WHERE owner = ? AND shard_id = ?",
                    (expiry, owner, shard_id),
                )
                if cursor.rowcount == 0:
                    missing.append(shard_id)
        return missing

    def delete(self, owner: bytes, shard_id: bytes) -> bool:
        """Remove a shard; whether it existed."""
        _check_owner(owner)
        check_shard_id(shard_id, StoreRequestError)
        with self._lock:
            self._check_open()
            existing = self._row(owner, shard_id)
            if existing is None:
                return False
            self._remove_locked(owner, shard_id, existing.size)
            return True

    def delete_owner(self, owner: bytes) -> tuple[int, bool]:
        """Forget an owner (module docstring): every shard it keeps here and
        its root record; how many shards there were, and whether there was
        a root record."""
        _check_owner(owner)
        removed = 0
        while True:
            with self._lock:
                self._check_open()
                rows = self._db.execute(
                    "SELECT owner, shard_id, size FROM shards WHERE owner = ? LIMIT ?",
                    (owner, _COLLECT_BATCH),
                ).fetchall()
                self._remove_rows_locked(rows)
            removed += len(rows)
            if len(rows) < _COLLECT_BATCH:
                break
        with self._lock:
            self._check_open()
            with self._transaction() as db:
                db.execute("DELETE FROM held_grants WHERE owner = ?", (owner,))
                db.execute("DELETE FROM revoked_delegates WHERE owner = ?", (owner,))
            had_root = self._root_sizes.pop(owner, None) is not None
            unlink_quietly(self._root_path(owner))
            # The owner's directories, now empty (an upload still in
            # progress keeps its own; a later open tidies nothing more).
            owner_dir = self.root / SHARDS_DIR / owner.hex()
            for directory in [*(Path(entry.path) for entry in _scan(owner_dir)), owner_dir]:
                with contextlib.suppress(OSError):
                    directory.rmdir()
        return removed, had_root

    def collect_expired(self, spare: Collection[bytes] = frozenset()) -> int:
        """Delete every shard whose lease has run out, but those of the owners
        in ``spare`` (the friends); how many there were."""
        spared = builtins.list(spare)
        for owner in spared:
            _check_owner(owner)
        # One bound parameter per spared owner: a node has tens of friends,
        # far below SQLite's limit on parameters.
        not_spared = f" AND owner NOT IN ({', '.join('?' * len(spared))})" if spared else ""
        removed = 0
        while True:
            with self._lock:
                self._check_open()
                rows = self._db.execute(
                    "SELECT owner, shard_id, size FROM shards WHERE lease_expiry <= ?"
                    f"{not_spared} LIMIT ?",
                    (self._now(), *spared, _COLLECT_BATCH),
                ).fetchall()
                self._remove_rows_locked(rows)
            removed += len(rows)
            if len(rows) < _COLLECT_BATCH:
                return removed

    def _remove_locked(self, owner: bytes, shard_id: bytes, size: int) -> None:
        self._remove_rows_locked([(owner, shard_id, size)])

    def _remove_rows_locked(self, rows: Sequence[tuple[bytes, bytes, int]]) -> None:
        # Rows first, files second: a crash in between leaves orphan files,
        # which reconciliation removes, never rows without files.
        if not rows:
            return
        with self._transaction() as db:
            db.executemany(
                "DELETE FROM shards WHERE owner = ? AND shard_id = ?",
                [(owner, shard_id) for owner, shard_id, _size in rows],
            )
        for owner, shard_id, size in rows:
            unlink_quietly(self._shard_path(owner, shard_id))
            self._count_shard(owner, size, -1)

    # -- root records ----------------------------------------------------------------------

    def put_root(self, owner: bytes, data: bytes) -> None:
        """Replace the owner's root record atomically (it counts toward usage)."""
        _check_owner(owner)
        if len(data) > MAX_ROOT_SIZE:
            raise StoreRequestError(
                f"a root record of {len(data)} bytes is over the limit of {MAX_ROOT_SIZE} bytes"
            )
        final = self._root_path(owner)
        charge = self.charge.of(len(data))
        disk_free = self._disk_free()
        with self._lock:
            self._check_open()
            self._check_room(
                owner, len(data), charge, freed=self._root_charge(owner), disk_free=disk_free
            )
        temp = self.root / TMP_DIR / f"root-{secrets.token_hex(8)}"
        with os_errors("write", temp):
            write_temp_file(temp, data)
        try:
            with self._lock:
                self._check_open()
                # Checked again: other puts may have used the room meanwhile.
                self._check_room(
                    owner,
                    len(data),
                    charge,
                    freed=self._root_charge(owner),
                    disk_free=disk_free,  # as it was before the temp file
                )
                with os_errors("move into place", final):
                    os.replace(temp, final)
                    fsync_dir(final.parent)
                self._root_sizes[owner] = len(data)
        finally:
            unlink_quietly(temp)

    def get_root(self, owner: bytes) -> bytes | None:
        """The owner's root record, or None if it never put one."""
        _check_owner(owner)
        with self._lock:
            self._check_open()
        path = self._root_path(owner)
        try:
            with open(path, "rb") as file:
                return file.read(MAX_ROOT_SIZE)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise store_error("read", path, error) from error

    # -- delegation ------------------------------------------------------------------------

    def revoke_delegate(self, owner: bytes, delegate: bytes, before: int) -> None:
        """Refuse ``owner``'s certificates for ``delegate`` issued before
        ``before`` from now on (a later time than one already kept wins)."""
        _check_owner(owner)
        _check_owner(delegate)
        with self._lock:
            self._check_open()
            with self._transaction() as db:
                (count,) = db.execute(
                    "SELECT count(*) FROM revoked_delegates WHERE owner = ? AND delegate != ?",
                    (owner, delegate),
                ).fetchone()
                if count >= MAX_REVOCATIONS_PER_OWNER:
                    raise StoreFullError(
                        f"an owner keeps at most {MAX_REVOCATIONS_PER_OWNER} revocations here"
                    )
                db.execute(
                    "INSERT INTO revoked_delegates (owner, delegate, revoked_before)"
                    " VALUES (?, ?, ?) ON CONFLICT (owner, delegate) DO UPDATE"
                    " SET revoked_before = max(revoked_before, excluded.revoked_before)",
                    (owner, delegate, before),
                )

    def revoked_before(self, owner: bytes, delegate: bytes) -> int:
        """Certificates of ``owner`` for ``delegate`` issued before this are
        revoked (0: none is)."""
        with self._lock:
            self._check_open()
            row = self._db.execute(
                "SELECT revoked_before FROM revoked_delegates WHERE owner = ? AND delegate = ?",
                (owner, delegate),
            ).fetchone()
        return 0 if row is None else int(row[0])

    def put_grant(self, owner: bytes, sequence: int, grant: bytes, certificate: bytes) -> int:
        """Keep ``owner``'s grant unless one of a higher sequence is held; the
        sequence held afterwards. An equal sequence renews the certificate."""
        _check_owner(owner)
        if len(grant) > MAX_ROOT_SIZE:
            raise StoreRequestError(f"a grant of {len(grant)} bytes is over the limit")
        with self._lock:
            self._check_open()
            with self._transaction() as db:
                row = db.execute(
                    "SELECT sequence FROM held_grants WHERE owner = ?", (owner,)
                ).fetchone()
                if row is not None and int(row[0]) > sequence:
                    return int(row[0])
                db.execute(
                    "INSERT OR REPLACE INTO held_grants"
                    " (owner, sequence, grant_data, certificate, received_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (owner, sequence, grant, certificate, self._now()),
                )
        return sequence

    def held_grant(self, owner: bytes) -> HeldGrant | None:
        """The grant ``owner`` handed this node, if any."""
        with self._lock:
            self._check_open()
            row = self._db.execute(
                "SELECT owner, sequence, grant_data, certificate, received_at"
                " FROM held_grants WHERE owner = ?",
                (owner,),
            ).fetchone()
        return None if row is None else HeldGrant.from_row(row)

    def held_grants(self) -> builtins.list[HeldGrant]:
        """Every grant held here, by owner."""
        with self._lock:
            self._check_open()
            rows = self._db.execute(
                "SELECT owner, sequence, grant_data, certificate, received_at"
                " FROM held_grants ORDER BY owner"
            ).fetchall()
        return [HeldGrant.from_row(row) for row in rows]

    def drop_grant(self, owner: bytes) -> bool:
        """Forget ``owner``'s grant; whether there was one."""
        with self._lock:
            self._check_open()
            with self._transaction() as db:
                removed = db.execute("DELETE FROM held_grants WHERE owner = ?", (owner,)).rowcount
        return bool(removed)

    # -- usage -----------------------------------------------------------------------------

    def usage(self, owner: bytes) -> int:
        """What ``owner`` is charged for: its shards and its root record."""
        _check_owner(owner)
        with self._lock:
            self._check_open()
            return self._usage_locked(owner)

    def space(self, owner: bytes) -> tuple[int, int]:
        """(usage, offer) of ``owner`` now: the offer is the usage plus the
        room left, the charge a put may still take (module docstring)."""
        _check_owner(owner)
        disk_free = self._disk_free()
        with self._lock:
            self._check_open()
            used = self._usage_locked(owner)
            room = min(self._rooms_locked(owner, disk_free).values())
        return used, used + max(0, room)

    def total_usage(self) -> int:
        """What all owners are charged for."""
        with self._lock:
            self._check_open()
            return self._total_locked()

    def _usage_locked(self, owner: bytes) -> int:
        return self._shard_charges.get(owner, 0) + self._root_charge(owner)

    def _total_locked(self) -> int:
        roots = sum(self.charge.of(size) for size in self._root_sizes.values())
        return sum(self._shard_charges.values()) + roots

    def _root_charge(self, owner: bytes) -> int:
        size = self._root_sizes.get(owner)
        return 0 if size is None else self.charge.of(size)

    # -- reconciliation --------------------------------------------------------------------

    def _reconcile(self, spare: Collection[bytes]) -> ReconcileReport:
        """Bring files and rows into agreement (see the module docstring).

        Runs before the host is shared with other threads. It stats every
        shard file once, which is fine for the tens of thousands of shards a
        home node holds.
        """
        temps_removed = 0
        for entry in _scan(self.root / TMP_DIR):
            unlink_quietly(Path(entry.path))
            temps_removed += 1
        stored: set[str] = set()
        lost: builtins.list[LostShard] = []
        for owner, shard_id, size in self._db.execute(
            "SELECT owner, shard_id, size FROM shards"
        ).fetchall():
            path = self._shard_path(owner, shard_id)
            try:
                found = os.stat(path)
            except FileNotFoundError:
                lost.append(LostShard(owner, shard_id, "its file is missing"))
                continue
            if not stat.S_ISREG(found.st_mode) or found.st_size != size:
                lost.append(
                    LostShard(owner, shard_id, f"its file holds {found.st_size} of {size} bytes")
                )
                unlink_quietly(path)
                continue
            stored.add(str(path))
        if lost:
            with self._transaction() as db:
                db.executemany(
                    "DELETE FROM shards WHERE owner = ? AND shard_id = ?",
                    [(shard.owner, shard.shard_id) for shard in lost],
                )
        orphans = adopted = 0
        batch: builtins.list[tuple[bytes, bytes, int, int, bytes, int, int]] = []
        expiry = self._now() + ADOPTED_LEASE_SECONDS
        for entry in _shard_files(self.root):
            if entry.path in stored:
                continue
            row = _adopt(entry, expiry)
            if row is None:
                unlink_quietly(Path(entry.path))
                orphans += 1
                continue
            batch.append(row)
            if len(batch) == _COLLECT_BATCH:
                adopted += self._insert_adopted(batch)
                batch = []
        adopted += self._insert_adopted(batch)
        block, per_file = self.charge.block, self.charge.per_file
        for owner, count, charges in self._db.execute(
            "SELECT owner, COUNT(*), SUM((size + ? - 1) / ? * ? + ?) FROM shards GROUP BY owner",
            (block, block, block, per_file),
        ):
            self._shard_counts[bytes(owner)] = count
            self._shard_charges[bytes(owner)] = charges
        for entry in _scan(self.root / ROOTS_DIR):
            if _OWNER_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                self._root_sizes[bytes.fromhex(entry.name)] = entry.stat().st_size
        expired = self.collect_expired(spare)
        return ReconcileReport(
            orphans_removed=orphans,
            missing=tuple(lost),
            temps_removed=temps_removed,
            expired=expired,
            adopted=adopted,
        )

    def _insert_adopted(
        self, rows: builtins.list[tuple[bytes, bytes, int, int, bytes, int, int]]
    ) -> int:
        if rows:
            with self._transaction() as db:
                db.executemany(
                    f"INSERT INTO shards (owner, {_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", rows
                )
        return len(rows)

    # -- internals -------------------------------------------------------------------------

    def _now(self) -> int:
        return int(self._clock())

    def now(self) -> int:
        """The host's clock, in unix seconds: what leases and certificates
        are checked against."""
        return self._now()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the shard host {self.root} is closed")

    def _shard_path(self, owner: bytes, shard_id: bytes) -> Path:
        name = shard_id.hex()
        return self.root / SHARDS_DIR / owner.hex() / name[:2] / name

    def _root_path(self, owner: bytes) -> Path:
        return self.root / ROOTS_DIR / owner.hex()

    def _row(self, owner: bytes, shard_id: bytes) -> HostedShard | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM shards WHERE owner = ? AND shard_id = ?",
            (owner, shard_id),
        ).fetchone()
        return None if row is None else HostedShard.from_row(row)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as error:
            if error.sqlite_errorcode == sqlite3.SQLITE_FULL:
                raise StoreFullError(f"no room on disk for the host's metadata: {error}") from error
            raise StoreError(f"the shard host's metadata failed: {error}") from error


class Upload:
    """A put in progress: bytes go to a temp file and a Merkle builder.

    Made by :meth:`ShardHost.begin_put`. Feed it the shard's bytes with
    :meth:`write` in pieces of any size, then :meth:`commit`; or
    :meth:`abort`. Any failure aborts it (removes the temp file and frees the
    reservation); aborting again, or after a commit, does nothing.
    """

    def __init__(
        self,
        host: ShardHost,
        *,
        owner: bytes,
        shard_id: bytes,
        size: int,
        block_size: int,
        merkle_root: bytes,
        lease_seconds: int,
        temp: Path,
        fd: int,
    ) -> None:
        self.owner = owner
        self.shard_id = shard_id
        self.size = size
        self.block_size = block_size
        self.merkle_root = merkle_root
        self.lease_seconds = lease_seconds
        self.temp = temp
        self._host = host
        self._fd = fd
        self._writer = DirectWriter(fd)
        self._builder = MerkleBuilder(block_size)
        self._lock = threading.Lock()
        self._done = False

    @property
    def written(self) -> int:
        return self._builder.size

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``. More bytes than declared abort the upload (StoreError);
        a full disk aborts it with StoreFullError."""
        view = memoryview(data).cast("B")
        with self._lock:
            self._check_open()
            if self._builder.size + len(view) > self.size:
                self._abort_locked()
                raise StoreError(
                    f"upload of shard {_short(self.shard_id)} is longer than the "
                    f"{self.size} bytes declared; it was aborted"
                )
            try:
                self._writer.write(view)
            except OSError as error:
                self._abort_locked()
                raise store_error("write", self.temp, error) from error
            self._builder.update(view)

    def commit(self) -> int:
        """Verify and store the shard; its lease expiry (unix seconds).

        StoreError if fewer bytes came than declared, MerkleError if they do
        not hash to the declared root; either way nothing is stored.
        """
        with self._lock:
            self._check_open()
            try:
                if self._builder.size != self.size:
                    raise StoreError(
                        f"upload of shard {_short(self.shard_id)} ended after "
                        f"{self._builder.size} of the {self.size} bytes declared"
                    )
                if self._builder.root() != self.merkle_root:
                    raise MerkleError(
                        f"shard {_short(self.shard_id)}: the {self.size} bytes received do "
                        f"not hash to the declared Merkle root {self.merkle_root.hex()[:16]}"
                    )
                with os_errors("write", self.temp):
                    self._writer.flush()
                with os_errors("sync", self.temp):
                    os.fsync(self._fd)
                self._close_fd()
            except BaseException:
                self._abort_locked()
                raise
            self._done = True
            try:
                return self._host._publish(self)
            finally:
                unlink_quietly(self.temp)  # still there unless it was moved into place

    def abort(self) -> None:
        """Drop the upload: remove the temp file, free the reservation."""
        with self._lock:
            if not self._done:
                self._abort_locked()

    def _abort_locked(self) -> None:
        self._done = True
        self._close_fd()
        unlink_quietly(self.temp)
        self._host._finish(self)

    def _close_fd(self) -> None:
        self._writer.close()
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def _check_open(self) -> None:
        if self._done:
            raise StoreError(f"upload of shard {_short(self.shard_id)} is already finished")


# -- module helpers -------------------------------------------------------------------------


def usage_by_owner(root: Path) -> dict[bytes, int]:
    """Bytes of shards held for each owner, read without opening the host (a
    running node holds it); empty if nothing was ever hosted under ``root``."""
    path = root / DB_NAME
    if not path.exists():
        return {}
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT owner, sum(size) FROM shards GROUP BY owner").fetchall()
        finally:
            db.close()
    except sqlite3.Error as error:
        raise StoreError(f"cannot read the shard host database {path}: {error}") from error
    return {bytes(owner): int(size) for owner, size in rows}


def read_held_grants(root: Path) -> builtins.list[HeldGrant]:
    """The grants held under ``root``, read without opening the host (a
    running node holds it); empty if there are none."""
    path = root / DB_NAME
    if not path.exists():
        return []
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = db.execute(
                "SELECT owner, sequence, grant_data, certificate, received_at"
                " FROM held_grants ORDER BY owner"
            ).fetchall()
        finally:
            db.close()
    except sqlite3.OperationalError as error:
        if "no such table" in str(error):
            return []  # a database no version with grants has opened
        raise StoreError(f"cannot read the shard host database {path}: {error}") from error
    except sqlite3.Error as error:
        raise StoreError(f"cannot read the shard host database {path}: {error}") from error
    return [HeldGrant.from_row(row) for row in rows]


def _open_db(path: Path, *, before_create: Callable[[], None]) -> tuple[sqlite3.Connection, bool]:
    """The open database, and whether it was made now (``before_create``
    runs first, and may refuse by raising)."""
    with os_errors("create", path):
        # Made here, not by SQLite, to make it 0600: SQLite gives its -wal
        # and -shm files the mode of the database.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        for suffix in ("", "-wal", "-shm"):
            _make_private(Path(f"{path}{suffix}"))
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as error:
        raise StoreError(f"cannot open the shard host database {path}: {error}") from error
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            before_create()
            # A new database: schema and version in one transaction, so a
            # crash leaves either nothing or both.
            db.execute("BEGIN IMMEDIATE")
            # One statement at a time: executescript() would commit midway.
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        elif version != SCHEMA_VERSION:
            raise StoreError(
                f"the shard host database {path} has schema version {version}; "
                f"this p2pbackup reads version {SCHEMA_VERSION}"
            )
        for statement in filter(str.strip, _DELEGATION_SCHEMA.split(";")):
            db.execute(statement)
        db.execute("PRAGMA journal_mode = WAL")
        # FULL: a committed row survives power loss, so an acknowledged put does.
        db.execute("PRAGMA synchronous = FULL")
    except sqlite3.Error as error:
        db.close()
        raise StoreError(f"cannot open the shard host database {path}: {error}") from error
    except BaseException:
        db.close()
        raise
    return db, version == 0


def _shard_files(root: Path) -> Iterator[os.DirEntry[str]]:
    """Every file where shard files live (shards/<owner>/<ab>/<name>), named well or not."""
    for owner_dir in _scan(root / SHARDS_DIR):
        for prefix_dir in _scan(Path(owner_dir.path)):
            for entry in _scan(Path(prefix_dir.path)):
                if entry.is_file(follow_symlinks=False):
                    yield entry


def _adoptable(entry: os.DirEntry[str]) -> tuple[bytes, bytes, int, int] | None:
    """(owner, shard id, size, block size) of a shard file that agrees with its
    name and its header (module docstring, "adoption"); None for any other file."""
    path = Path(entry.path)
    owner_name, prefix, name = path.parent.parent.name, path.parent.name, path.name
    if not (
        _OWNER_NAME.fullmatch(owner_name) and _SHARD_NAME.fullmatch(name) and prefix == name[:2]
    ):
        return None
    try:
        size = entry.stat(follow_symlinks=False).st_size
        with open(path, "rb") as file:
            head = file.read(formats.SHARD_HEADER_SIZE)
        header = formats.decode_shard_header(head)
    except (OSError, FormatError):
        return None
    shard_id = bytes.fromhex(name)
    # A version 1 header names its pack, so its name can be checked; a
    # version 2 header names none (docs/privacy.md): its size and geometry must do.
    named = header.pack_id is None or formats.shard_id(header.pack_id, header.index) == shard_id
    if (
        not named
        or size != formats.SHARD_HEADER_SIZE + header.shard_size
        or block_count(size, header.block_size) > MAX_BLOCKS
    ):
        return None
    return bytes.fromhex(owner_name), shard_id, size, header.block_size


def _adopt(
    entry: os.DirEntry[str], lease_expiry: int
) -> tuple[bytes, bytes, int, int, bytes, int, int] | None:
    """The row of an adoptable shard file, its Merkle root computed from its
    bytes; None if it is not one. StoreError if it cannot be read (it is
    kept, for the next open to try again)."""
    found = _adoptable(entry)
    if found is None:
        return None
    owner, shard_id, size, block_size = found
    builder = MerkleBuilder(block_size)
    with os_errors("read", entry.path):
        fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for offset in range(0, size, _READ_SIZE):
                builder.update(_read_at(fd, offset, _READ_SIZE))
            stored_at = int(os.fstat(fd).st_mtime)
        finally:
            os.close(fd)
    if builder.size != size:
        return None  # cut short since it was listed
    return owner, shard_id, size, block_size, builder.root(), stored_at, lease_expiry


def _check_adoptable(root: Path) -> None:
    """Before a database is made where shard files may already be: StoreError
    unless adoption can account for every one of them."""
    strays = [entry.path for entry in _shard_files(root) if _adoptable(entry) is None]
    if strays:
        raise StoreError(
            f"the shard host database {root / DB_NAME} is missing or empty, and "
            f"{plural(len(strays), 'file')} under {root / SHARDS_DIR} are not shards it can be "
            f"rebuilt from (such as {strays[0]}); nothing was changed: restore the "
            "database from a copy, or move those files away, and start again"
        )


def _scan(directory: Path) -> builtins.list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as entries:
            return builtins.list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _not_found(shard_id: bytes) -> ShardNotFoundError:
    return ShardNotFoundError(f"this host holds no shard {_short(shard_id)} for you")


def _conflict(shard_id: bytes, existing: HostedShard) -> StoreError:
    stored = f"on this host ({existing.size} bytes, root {existing.merkle_root.hex()[:16]})"
    return conflict(shard_id, stored, ShardConflictError)
