"""The local index: an SQLite cache of what the peers hold for us.

Nouns:

* **blob row** — blob id → the pack holding it, with offset and lengths.
  A blob may sit in more than one pack (a backup killed after uploading a pack
  but before committing it is repeated; prune copies live blobs); any copy
  will do.
* **pack row** — pack id → code parameters; **shard rows** say which peer holds
  shard i and its Merkle root.
* **segment flag** — whether a pack is already described by an index segment
  stored on the peers; the next backup writes a segment for the rest.
* **file cache** — path → (size, mtime, ctime, inode) → chunk ids, so that
  unchanged files are not read again.
* **snapshot rows** — decoded snapshots, a cache of the snapshot blobs.
* **meta** — repository configuration; this home's **instance id** (made
  at its first root record, :mod:`~p2pbackup.engine.rootrecord`); and the
  **last root record** this home wrote or, when recovered, took over: its
  sequence number and the instance id of the home that wrote it.
* **friend rows** — nodes added with an invite code: node id, the public key
  every session to them must prove, the ``HOST:PORT`` addresses last known
  (newline-separated) and when they were added. A friend is also a peer row
  (kind "node", peer id = the node id in hex); the friends table only adds
  what the invite said. Added to schema version 1 as a new table, so an older
  index gains it on open.
* **probe counts** — per peer, how many times it was asked something that
  tells whether it is up (a status or backup-time probe, a put) and how many
  times it answered: the peer's **uptime** record, which placement weighs.
  When the asked count reaches :data:`PROBE_MEMORY` both counts halve, so the
  record follows the last hundred or two observations rather than all time.
  Added in schema version 2.
* **peer audits** and **shard audits** — what audits said of each peer (its
  decayed passes and failures, whether it is disqualified) and of each shard
  on its peer (the last verdict, when the next audit is due): the
  :class:`~p2pbackup.model.PeerAudits` and :class:`~p2pbackup.model.ShardAudit`
  rows that :mod:`p2pbackup.maintenance` keeps. A shard audit row speaks of
  the peer it names only: once a shard moves to another peer, the row is
  stale and read as absent. Added in schema version 3.
* **displaced shards** — copies of a shard that a repair replaced while
  their peer was away: the shard moved to another peer, but the old copy is
  remembered (pack, shard index, peer, Merkle root, when), so that it
  counts again if the peer returns (:mod:`p2pbackup.maintenance.repair`).
* **traffic** — bytes sent to and received from each peer per day (unix day
  number) and purpose (``repair``, ``audit``): what maintenance cost.
* **repairs** — per peer and day, how many of our shards on it repair
  rebuilt elsewhere (**moved off**) and how many rebuilt shards it took
  (**placed**).
  Displaced shards, traffic and repairs are created on open where missing.
* **lease expiry** — per shard row, the unix second until which its peer
  promised to keep it (what the peer answered to the put or to the last
  renewal); NULL when unknown (a folder peer, which has no leases; a row
  recovered from an index segment, or made before schema version 4): the
  next renewal asks for it (:mod:`p2pbackup.maintenance.leases`).
* **leaving peers** — peers that told us they are leaving the network, and
  when: their shards count as removed, so repair moves them away while the
  peer still serves. Added in schema version 4, with the lease expiry.

* **delegates** — nodes this home lets keep its backups alive while it is
  away (docs/delegation.md): when each was added, when it last took a
  repair grant and of which sequence, and what went wrong the last time it
  was handed one (empty: nothing). The last grant sequence issued is a
  meta value. Added in schema version 5.

Schema versions: ``meta.schema_version``. Opening an older index migrates it
forward in one transaction (:data:`_MIGRATIONS`, one step per version); a
newer one is refused and left untouched.

Everything here can be rebuilt from the peers (``recover``), so the index is a
cache, but one whose every write happens in a transaction: a backup killed at
any moment leaves it consistent.

The connection belongs to one thread (trio's), and each call is short.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

import attrs

from p2pbackup.errors import UsageError
from p2pbackup.model import (
    BlobEntry,
    BlobType,
    FriendRecord,
    PackRecord,
    PeerAudits,
    PeerRecord,
    RepositoryConfig,
    ShardAudit,
    ShardLocation,
    Snapshot,
)

SCHEMA_VERSION = 6
#: Asked count at which a peer's probe counts halve (see the module docstring).
PROBE_MEMORY = 200

_PEER_PROBES = """
CREATE TABLE IF NOT EXISTS peer_probes (
    peer_id TEXT PRIMARY KEY, asked INTEGER NOT NULL, answered INTEGER NOT NULL);
"""

_PEER_AUDITS = """
CREATE TABLE IF NOT EXISTS peer_audits (
    peer_id TEXT PRIMARY KEY, passed REAL NOT NULL, failed REAL NOT NULL,
    audits INTEGER NOT NULL, failures INTEGER NOT NULL, last_audit INTEGER,
    last_failure TEXT NOT NULL, disqualified_at INTEGER);
"""
_SHARD_AUDITS = """
CREATE TABLE IF NOT EXISTS shard_audits (
    pack_id BLOB NOT NULL REFERENCES packs(pack_id) ON DELETE CASCADE,
    idx INTEGER NOT NULL, peer_id TEXT NOT NULL, due_at INTEGER NOT NULL,
    audited_at INTEGER, passed INTEGER, reason TEXT NOT NULL,
    PRIMARY KEY (pack_id, idx));
"""
#: Tables added to version 2 without a new version: an index of version 2
#: that lacks them gains them on open.
_MAINTENANCE_TABLES = """
CREATE TABLE IF NOT EXISTS displaced_shards (
    pack_id BLOB NOT NULL REFERENCES packs(pack_id) ON DELETE CASCADE,
    idx INTEGER NOT NULL, peer_id TEXT NOT NULL, merkle_root BLOB NOT NULL,
    displaced_at INTEGER NOT NULL, PRIMARY KEY (pack_id, idx, peer_id));
CREATE TABLE IF NOT EXISTS traffic (
    day INTEGER NOT NULL, peer_id TEXT NOT NULL, purpose TEXT NOT NULL,
    sent INTEGER NOT NULL, received INTEGER NOT NULL,
    PRIMARY KEY (day, peer_id, purpose));
CREATE TABLE IF NOT EXISTS repairs (
    day INTEGER NOT NULL, peer_id TEXT NOT NULL,
    moved_off INTEGER NOT NULL, placed INTEGER NOT NULL,
    PRIMARY KEY (day, peer_id));
"""

#: Version 4's change to a table of version 1. ALTER TABLE has no IF NOT
#: EXISTS, so a new index runs these once after making its tables, and an
#: index of version 3 in its migration.
_LEASE_COLUMN = (
    "ALTER TABLE shards ADD COLUMN lease_expiry INTEGER",
    "CREATE INDEX IF NOT EXISTS shards_by_lease ON shards(lease_expiry)",
)
_LEAVING_PEERS = """
CREATE TABLE IF NOT EXISTS leaving_peers (peer_id TEXT PRIMARY KEY, since INTEGER NOT NULL);
"""
#: The names a user gave peers and friends (``friend add --name``, ``peer
#: rename``). Added in schema version 5.
_PEER_NAMES = """
CREATE TABLE IF NOT EXISTS peer_names (peer_id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE);
"""
_DELEGATES = """
CREATE TABLE IF NOT EXISTS delegates (
    node_id BLOB PRIMARY KEY, added_at INTEGER NOT NULL, granted_at INTEGER,
    grant_sequence INTEGER, problem TEXT NOT NULL DEFAULT '');
"""
#: When each delegate last acted for this home, as its repair log says.
#: Added in schema version 6.
_DELEGATE_ACTS = """
CREATE TABLE IF NOT EXISTS delegate_acts (node_id BLOB PRIMARY KEY, acted_at INTEGER NOT NULL);
"""

#: The tables of schema version 1.
_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS peers (
    peer_id TEXT PRIMARY KEY, kind TEXT NOT NULL, location TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS peer_seen (peer_id TEXT PRIMARY KEY, seen_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS packs (
    pack_id BLOB PRIMARY KEY, size INTEGER NOT NULL, k INTEGER NOT NULL,
    n INTEGER NOT NULL, shard_size INTEGER NOT NULL, block_size INTEGER NOT NULL,
    is_index INTEGER NOT NULL DEFAULT 0, in_segment INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS shards (
    pack_id BLOB NOT NULL REFERENCES packs(pack_id) ON DELETE CASCADE,
    idx INTEGER NOT NULL, peer_id TEXT NOT NULL, merkle_root BLOB NOT NULL,
    PRIMARY KEY (pack_id, idx));
CREATE INDEX IF NOT EXISTS shards_by_peer ON shards(peer_id);
CREATE TABLE IF NOT EXISTS blobs (
    blob_id BLOB NOT NULL, type INTEGER NOT NULL,
    pack_id BLOB NOT NULL REFERENCES packs(pack_id) ON DELETE CASCADE,
    offset INTEGER NOT NULL, length INTEGER NOT NULL, raw_length INTEGER NOT NULL,
    PRIMARY KEY (blob_id, pack_id));
CREATE INDEX IF NOT EXISTS blobs_by_pack ON blobs(pack_id);
CREATE TABLE IF NOT EXISTS snapshots (
    snapshot_id BLOB PRIMARY KEY, time_ns INTEGER NOT NULL, hostname TEXT NOT NULL,
    paths BLOB NOT NULL, tags TEXT NOT NULL, tree BLOB NOT NULL,
    file_count INTEGER NOT NULL, total_size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS file_cache (
    dir BLOB NOT NULL, name BLOB NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, inode INTEGER NOT NULL,
    content BLOB NOT NULL, PRIMARY KEY (dir, name));
CREATE TABLE IF NOT EXISTS friends (
    node_id BLOB PRIMARY KEY, public_key BLOB NOT NULL, addresses TEXT NOT NULL,
    added_at INTEGER NOT NULL);
"""
#: Every table of the current version, for a new index (and, as each creates
#: only what is missing, for one of the current version that lacks some).
_SCHEMA = (
    _SCHEMA_V1
    + _PEER_PROBES
    + _PEER_AUDITS
    + _SHARD_AUDITS
    + _MAINTENANCE_TABLES
    + _LEAVING_PEERS
    + _PEER_NAMES
    + _DELEGATES
    + _DELEGATE_ACTS
)

#: Schema version → the statements that turn an index of that version into
#: one of the next.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (_PEER_PROBES,),
    2: (_PEER_AUDITS, _SHARD_AUDITS),
    3: (*_LEASE_COLUMN, _LEAVING_PEERS),
    4: (_DELEGATES, _PEER_NAMES),
    5: (_DELEGATE_ACTS,),
}


@attrs.frozen
class BlobLocation:
    pack_id: bytes
    entry: BlobEntry


@attrs.frozen
class ShardShortfall:
    """Packs whose shard rows fall short: of n (less redundant than asked) and
    of k (no longer restorable from what the index knows)."""

    below_n: int
    below_k: int


@attrs.frozen
class ProbeCounts:
    """A peer's uptime record: times asked, times it answered."""

    asked: int
    answered: int


@attrs.frozen
class PlacedShard:
    """One shard row, with what checking that shard needs of its pack."""

    pack_id: bytes
    index: int
    peer_id: str
    merkle_root: bytes
    #: Bytes of the shard's data (its header aside), and its Merkle block size.
    shard_size: int
    block_size: int


@attrs.frozen
class LeasedShard:
    """A shard row on a node peer, with the lease expiry recorded for it."""

    pack_id: bytes
    index: int
    peer_id: str
    #: Unix seconds; None: unknown (module docstring, "lease expiry").
    lease_expiry: int | None


@attrs.frozen
class DisplacedShard:
    """A copy of shard ``location.index`` of a pack that a repair moved away
    from ``location.peer_id`` at unix second ``displaced_at``."""

    pack_id: bytes
    location: ShardLocation
    displaced_at: int


@attrs.frozen
class Traffic:
    """Bytes moved with one peer on one day (unix day number) for one purpose."""

    day: int
    peer_id: str
    purpose: str
    sent: int
    received: int


@attrs.frozen
class RepairCount:
    """Shards repair rebuilt away from one peer, and rebuilt shards it took."""

    moved_off: int
    placed: int


@attrs.frozen
class DelegateRow:
    """A delegate (module docstring, "delegates")."""

    node_id: bytes = attrs.field(repr=bytes.hex)
    added_at: int
    #: When it last took a grant, and the grant's sequence (None: never).
    granted_at: int | None
    grant_sequence: int | None
    #: What went wrong the last time it was handed one ("": nothing).
    problem: str
    #: When it last acted for this home, as its repair log says (None: never).
    acted_at: int | None = None


@attrs.frozen
class CachedFile:
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    content: tuple[bytes, ...]


#: The peers that audits disqualified (a query, also a subquery).
_DISQUALIFIED = "SELECT peer_id FROM peer_audits WHERE disqualified_at IS NOT NULL"


def _join_ids(ids: Iterable[bytes]) -> bytes:
    return b"".join(ids)


def _split_ids(joined: bytes) -> tuple[bytes, ...]:
    return tuple(joined[i : i + 32] for i in range(0, len(joined), 32))


def _split_path(path: bytes) -> tuple[bytes, bytes]:
    directory, _, name = path.rpartition(b"/")
    return directory, name


def _join_strs(values: Iterable[bytes]) -> bytes:
    # Paths are bytes that may hold anything but NUL.
    return b"\0".join(values)


def _join_addresses(addresses: Iterable[str]) -> str:
    joined = list(addresses)
    # HOST:PORT texts never hold a newline (net.Address refuses whitespace in hosts).
    if any("\n" in address for address in joined):
        raise ValueError(f"an address holds a newline: {joined!r}")
    return "\n".join(joined)


def _friend(row: tuple[bytes, bytes, str, int]) -> FriendRecord:
    node_id, public_key, addresses, added_at = row
    return FriendRecord(
        bytes(node_id),
        bytes(public_key),
        tuple(addresses.split("\n")) if addresses else (),
        added_at,
    )


def _lost_index(path: Path) -> UsageError:
    return UsageError(
        f"the index {path} is missing or empty, so this home no longer knows its "
        "snapshots; they are still on its peers: `p2pbackup recover` with the recovery "
        "key, into a new home, finds them again"
    )


class Index:
    """The SQLite index of one home."""

    def __init__(self, path: Path, *, create: bool = True) -> None:
        """Open the index at ``path``; without ``create``, one that is missing
        or empty (never made, deleted, cut to 0 bytes) is an error, not a new
        index: an initialised home whose index is gone has lost what it knew,
        and an empty index would only hide that."""
        self.path = path
        if not create and not path.exists():
            raise _lost_index(path)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise UsageError(f"cannot open the index {path}: {exc}") from exc
        version = self._stored_version()
        if version is None and not create:
            self._db.close()
            raise _lost_index(path)
        if version is not None and version > SCHEMA_VERSION:
            self._db.close()
            raise UsageError(
                f"the index {path} has schema version {version}; this p2pbackup reads "
                f"versions up to {SCHEMA_VERSION} (was it written by a newer release?)"
            )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        if version is not None and version < SCHEMA_VERSION:
            self._migrate(version)
        if version is None:
            with self.transaction():
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    self._db.execute(statement)
                for statement in _LEASE_COLUMN:
                    self._db.execute(statement)
                self.set_meta("schema_version", str(SCHEMA_VERSION).encode())
        else:
            self._db.executescript(_SCHEMA)

    def _stored_version(self) -> int | None:
        """The schema version of the index; None for a new (empty) one."""
        try:
            has_meta = self._db.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
            ).fetchone()
            raw = self.get_meta("schema_version") if has_meta else None
        except sqlite3.Error as exc:
            self._db.close()
            raise UsageError(f"cannot read the index {self.path}: {exc}") from exc
        try:
            return None if raw is None else int(raw)
        except ValueError:
            self._db.close()
            raise UsageError(
                f"the index {self.path} has a malformed schema version {raw!r}"
            ) from None

    def _migrate(self, version: int) -> None:
        """Bring an index of ``version`` up to :data:`SCHEMA_VERSION`, all or nothing."""
        with self.transaction():
            for step in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[step]:
                    self._db.execute(statement)
            self.set_meta("schema_version", str(SCHEMA_VERSION).encode())

    def close(self) -> None:
        self._db.close()

    # -- transactions -------------------------------------------------------

    def transaction(self) -> _Transaction:
        return _Transaction(self._db)

    # -- meta ----------------------------------------------------------------

    def get_meta(self, key: str) -> bytes | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def set_meta(self, key: str, value: bytes) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def config(self) -> RepositoryConfig:
        raw = self.get_meta("config")
        if raw is None:
            raise UsageError("the index holds no repository configuration")
        k, n, pack_size, cmin, cavg, cmax, block = (int(x) for x in raw.decode().split(","))
        return RepositoryConfig(k, n, pack_size, cmin, cavg, cmax, block)

    def set_config(self, config: RepositoryConfig) -> None:
        fields = attrs.astuple(config)
        self.set_meta("config", ",".join(str(x) for x in fields).encode())

    def root_sequence(self) -> int:
        raw = self.get_meta("root_sequence")
        return 0 if raw is None else int(raw)

    def root_writer(self) -> bytes:
        """The instance id in the last root record (empty: none, or one
        written before records had one)."""
        return self.get_meta("root_writer") or b""

    def set_root(self, sequence: int, writer: bytes) -> None:
        """The last root record is number ``sequence``, written by the home
        whose instance id is ``writer``."""
        self.set_meta("root_sequence", str(sequence).encode())
        self.set_meta("root_writer", writer)

    def instance(self) -> bytes | None:
        """This home's instance id, once it has one."""
        return self.get_meta("instance")

    def set_instance(self, instance: bytes) -> None:
        self.set_meta("instance", instance)

    # -- peers ---------------------------------------------------------------

    def add_peer(self, peer: PeerRecord) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO peers(peer_id, kind, location) VALUES (?, ?, ?)",
            (peer.peer_id, peer.kind, peer.location),
        )

    def set_peer_name(self, peer_id: str, name: str | None) -> None:
        """Name ``peer_id`` (None: take its name away); names are unique
        (a second peer of one name is an IntegrityError of SQLite's)."""
        self._db.execute("DELETE FROM peer_names WHERE peer_id=?", (peer_id,))
        if name is not None:
            self._db.execute("INSERT INTO peer_names(peer_id, name) VALUES (?, ?)", (peer_id, name))

    def peer_names(self) -> dict[str, str]:
        """Peer id → the name the user gave it."""
        return dict(self._db.execute("SELECT peer_id, name FROM peer_names"))

    def peers(self) -> list[PeerRecord]:
        rows = self._db.execute("SELECT peer_id, kind, location FROM peers ORDER BY peer_id")
        return [PeerRecord(*row) for row in rows]

    def remove_peer(self, peer_id: str) -> int:
        """Forget a peer and the shard rows that place shards on it (call
        inside a transaction); returns how many shard rows went."""
        removed = self._db.execute("DELETE FROM shards WHERE peer_id=?", (peer_id,)).rowcount
        self._db.execute("DELETE FROM displaced_shards WHERE peer_id=?", (peer_id,))
        self._db.execute("DELETE FROM peers WHERE peer_id=?", (peer_id,))
        self._db.execute("DELETE FROM peer_probes WHERE peer_id=?", (peer_id,))
        self._db.execute("DELETE FROM peer_audits WHERE peer_id=?", (peer_id,))
        self._db.execute("DELETE FROM shard_audits WHERE peer_id=?", (peer_id,))
        self._db.execute("DELETE FROM leaving_peers WHERE peer_id=?", (peer_id,))
        self._db.execute("DELETE FROM peer_names WHERE peer_id=?", (peer_id,))
        return int(removed)

    def set_leaving(self, peer_id: str, since: int) -> bool:
        """Remember that ``peer_id`` said at unix second ``since`` that it is
        leaving (the first notice counts); whether it is one of our peers
        (only those are remembered)."""
        if not self._db.execute("SELECT 1 FROM peers WHERE peer_id=?", (peer_id,)).fetchone():
            return False
        self._db.execute(
            "INSERT OR IGNORE INTO leaving_peers(peer_id, since) VALUES (?, ?)", (peer_id, since)
        )
        return True

    def leaving_peers(self) -> dict[str, int]:
        """Each peer that said it is leaving, and since when (unix seconds)."""
        rows = self._db.execute("SELECT peer_id, since FROM leaving_peers")
        return {peer: int(since) for peer, since in rows}

    def forget_shards_on(self, peer_ids: Iterable[str]) -> int:
        """Forget every shard the peers ``peer_ids`` held (they deleted them:
        this home left them; call inside a transaction), then every pack left
        with fewer than k shards, which can no longer be read, and with no
        pack left, the snapshots; returns how many packs went."""
        for peer_id in peer_ids:
            self._db.execute("DELETE FROM shards WHERE peer_id=?", (peer_id,))
            self._db.execute("DELETE FROM displaced_shards WHERE peer_id=?", (peer_id,))
        dropped = self._db.execute(
            "DELETE FROM packs WHERE k > (SELECT count(*) FROM shards s"
            " WHERE s.pack_id = packs.pack_id)"
        ).rowcount
        if not self._db.execute("SELECT 1 FROM packs LIMIT 1").fetchone():
            self._db.execute("DELETE FROM snapshots")
        return int(dropped)

    def shard_shortfall(self) -> ShardShortfall:
        """How many packs have fewer shard rows than n, and than k."""
        row = self._db.execute(
            "SELECT coalesce(sum(held < n), 0), coalesce(sum(held < k), 0) FROM"
            " (SELECT p.n AS n, p.k AS k,"
            "  (SELECT count(*) FROM shards s WHERE s.pack_id = p.pack_id) AS held"
            "  FROM packs p)"
        ).fetchone()
        return ShardShortfall(below_n=int(row[0]), below_k=int(row[1]))

    # -- friends ---------------------------------------------------------------

    def add_friend(self, friend: FriendRecord) -> None:
        """Record a friend, replacing any row of the same node id."""
        self._db.execute(
            "INSERT OR REPLACE INTO friends(node_id, public_key, addresses, added_at)"
            " VALUES (?, ?, ?, ?)",
            (friend.node_id, friend.public_key, _join_addresses(friend.addresses), friend.added_at),
        )

    def friends(self) -> list[FriendRecord]:
        """Every friend, oldest first."""
        rows = self._db.execute(
            "SELECT node_id, public_key, addresses, added_at FROM friends"
            " ORDER BY added_at, node_id"
        )
        return [_friend(row) for row in rows]

    def friend(self, node_id: bytes) -> FriendRecord | None:
        row = self._db.execute(
            "SELECT node_id, public_key, addresses, added_at FROM friends WHERE node_id=?",
            (node_id,),
        ).fetchone()
        return None if row is None else _friend(row)

    def remove_friend(self, node_id: bytes) -> bool:
        """Forget a friend (its peer row stays: see :meth:`remove_peer`);
        whether there was one."""
        cursor = self._db.execute("DELETE FROM friends WHERE node_id=?", (node_id,))
        return cursor.rowcount > 0

    def set_friend_addresses(self, node_id: bytes, addresses: Iterable[str]) -> bool:
        """Where a friend is known to listen now; whether there was such a friend."""
        cursor = self._db.execute(
            "UPDATE friends SET addresses=? WHERE node_id=?",
            (_join_addresses(addresses), node_id),
        )
        return cursor.rowcount > 0

    # -- delegates ------------------------------------------------------------

    def add_delegate(self, node_id: bytes, added_at: int) -> bool:
        """Make ``node_id`` a delegate; whether it was not one already."""
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO delegates(node_id, added_at) VALUES (?, ?)", (node_id, added_at)
        )
        return cursor.rowcount > 0

    def delegates(self) -> list[DelegateRow]:
        """Every delegate, oldest first."""
        rows = self._db.execute(
            "SELECT d.node_id, d.added_at, d.granted_at, d.grant_sequence, d.problem,"
            " a.acted_at FROM delegates d LEFT JOIN delegate_acts a ON a.node_id = d.node_id"
            " ORDER BY d.added_at, d.node_id"
        )
        return [DelegateRow(bytes(n), a, g, q, p, t) for n, a, g, q, p, t in rows]

    def remove_delegate(self, node_id: bytes) -> bool:
        """Forget a delegate; whether there was one."""
        self._db.execute("DELETE FROM delegate_acts WHERE node_id=?", (node_id,))
        return self._db.execute("DELETE FROM delegates WHERE node_id=?", (node_id,)).rowcount > 0

    def set_delegate_acted(self, node_id: bytes, acted_at: int) -> None:
        """The delegate's repair log says it last acted at ``acted_at``
        (kept only if later than what was known)."""
        self._db.execute(
            "INSERT INTO delegate_acts(node_id, acted_at) VALUES (?, ?) ON CONFLICT(node_id)"
            " DO UPDATE SET acted_at = max(acted_at, excluded.acted_at)",
            (node_id, acted_at),
        )

    def set_delegate_granted(self, node_id: bytes, granted_at: int, sequence: int) -> None:
        """The delegate took the grant of ``sequence`` at ``granted_at``."""
        self._db.execute(
            "UPDATE delegates SET granted_at=?, grant_sequence=?, problem='' WHERE node_id=?",
            (granted_at, sequence, node_id),
        )

    def set_delegate_problem(self, node_id: bytes, problem: str) -> None:
        """Handing the delegate its grant failed, for this reason."""
        self._db.execute("UPDATE delegates SET problem=? WHERE node_id=?", (problem, node_id))

    def next_grant_sequence(self, now: int) -> int:
        """A grant sequence above every one issued before (call inside a
        transaction): the clock's second, or one more than the last if
        that is higher, so that a home recovered from its key, whose count
        started again, still issues higher sequences than the home it
        replaced did."""
        raw = self.get_meta("grant_sequence")
        sequence = max(now, 0 if raw is None else int(raw) + 1)
        self.set_meta("grant_sequence", str(sequence).encode())
        return sequence

    # -- packs and blobs ----------------------------------------------------

    def add_pack(
        self, record: PackRecord, *, is_index: bool = False, in_segment: bool = False
    ) -> None:
        """Record a pack, its shards and its blobs (call inside a transaction)."""
        self._db.execute(
            "INSERT OR IGNORE INTO packs(pack_id, size, k, n, shard_size, block_size,"
            " is_index, in_segment) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.pack_id,
                record.size,
                record.k,
                record.n,
                record.shard_size,
                record.block_size,
                int(is_index),
                int(in_segment),
            ),
        )
        self._db.executemany(
            "INSERT OR REPLACE INTO shards(pack_id, idx, peer_id, merkle_root) VALUES (?, ?, ?, ?)",
            [(record.pack_id, s.index, s.peer_id, s.merkle_root) for s in record.shards],
        )
        self._db.executemany(
            "INSERT OR IGNORE INTO blobs(blob_id, type, pack_id, offset, length, raw_length)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [
                (b.blob_id, int(b.type), record.pack_id, b.offset, b.length, b.raw_length)
                for b in record.blobs
            ],
        )

    def remove_pack(self, pack_id: bytes) -> None:
        self._db.execute("DELETE FROM packs WHERE pack_id=?", (pack_id,))

    def has_blob(self, blob_id: bytes) -> bool:
        row = self._db.execute("SELECT 1 FROM blobs WHERE blob_id=? LIMIT 1", (blob_id,)).fetchone()
        return row is not None

    def blob_locations(self, blob_id: bytes) -> list[BlobLocation]:
        rows = self._db.execute(
            "SELECT type, pack_id, offset, length, raw_length FROM blobs WHERE blob_id=?",
            (blob_id,),
        )
        return [
            BlobLocation(bytes(p), BlobEntry(BlobType(t), blob_id, o, ln, raw))
            for t, p, o, ln, raw in rows
        ]

    def blob_locations_of_type(self, blob_type: BlobType) -> dict[bytes, BlobLocation]:
        """One location for every blob of a type, in one query (a restore asks
        for tens of thousands; one query each would cost seconds)."""
        rows = self._db.execute(
            "SELECT blob_id, pack_id, offset, length, raw_length FROM blobs WHERE type=?",
            (int(blob_type),),
        )
        return {
            bytes(b): BlobLocation(bytes(p), BlobEntry(blob_type, bytes(b), o, ln, raw))
            for b, p, o, ln, raw in rows
        }

    def pack(self, pack_id: bytes, *, with_blobs: bool = True) -> PackRecord | None:
        """A pack's record; ``with_blobs=False`` leaves its blob list empty,
        which is all that reading the pack needs (and far cheaper for a pack
        of thousands of trees)."""
        row = self._db.execute(
            "SELECT size, k, n, shard_size, block_size FROM packs WHERE pack_id=?", (pack_id,)
        ).fetchone()
        if row is None:
            return None
        shards = tuple(
            ShardLocation(idx, peer, bytes(root))
            for idx, peer, root in self._db.execute(
                "SELECT idx, peer_id, merkle_root FROM shards WHERE pack_id=? ORDER BY idx",
                (pack_id,),
            )
        )
        blobs = (
            tuple(
                BlobEntry(BlobType(t), bytes(b), o, ln, raw)
                for b, t, o, ln, raw in self._db.execute(
                    "SELECT blob_id, type, offset, length, raw_length FROM blobs"
                    " WHERE pack_id=? ORDER BY offset",
                    (pack_id,),
                )
            )
            if with_blobs
            else ()
        )
        size, k, n, shard_size, block_size = row
        return PackRecord(pack_id, size, k, n, shard_size, block_size, shards, blobs)

    def pack_ids(self, *, is_index: bool | None = None) -> list[bytes]:
        if is_index is None:
            rows = self._db.execute("SELECT pack_id FROM packs ORDER BY pack_id")
        else:
            rows = self._db.execute(
                "SELECT pack_id FROM packs WHERE is_index=? ORDER BY pack_id", (int(is_index),)
            )
        return [bytes(r[0]) for r in rows]

    def packs_without_segment(self) -> list[bytes]:
        rows = self._db.execute(
            "SELECT pack_id FROM packs WHERE in_segment=0 AND is_index=0 ORDER BY pack_id"
        )
        return [bytes(r[0]) for r in rows]

    def mark_in_segment(self, pack_ids: Iterable[bytes]) -> None:
        self._db.executemany(
            "UPDATE packs SET in_segment=1 WHERE pack_id=?", [(p,) for p in pack_ids]
        )

    def mark_out_of_segment(self, pack_ids: Iterable[bytes]) -> None:
        """The records of these data packs changed (a repair moved shards):
        the next index segment describes them again."""
        self._db.executemany(
            "UPDATE packs SET in_segment=0 WHERE pack_id=? AND is_index=0",
            [(p,) for p in pack_ids],
        )

    def is_index_pack(self, pack_id: bytes) -> bool:
        row = self._db.execute("SELECT is_index FROM packs WHERE pack_id=?", (pack_id,)).fetchone()
        return row is not None and bool(row[0])

    # -- shards moved by repairs ------------------------------------------------

    def set_shard(self, pack_id: bytes, location: ShardLocation) -> None:
        """Shard ``location.index`` of a pack is on ``location.peer_id`` now."""
        self._db.execute(
            "INSERT OR REPLACE INTO shards(pack_id, idx, peer_id, merkle_root) VALUES (?, ?, ?, ?)",
            (pack_id, location.index, location.peer_id, location.merkle_root),
        )

    def forget_shard(self, pack_id: bytes, index: int, peer_id: str) -> None:
        """Forget that ``peer_id`` holds shard ``index`` of a pack, as its
        current copy or a displaced one."""
        self._db.execute(
            "DELETE FROM shards WHERE pack_id=? AND idx=? AND peer_id=?", (pack_id, index, peer_id)
        )
        self.forget_displaced(pack_id, index, peer_id)

    def add_displaced(self, pack_id: bytes, location: ShardLocation, displaced_at: int) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO displaced_shards(pack_id, idx, peer_id, merkle_root,"
            " displaced_at) VALUES (?, ?, ?, ?, ?)",
            (pack_id, location.index, location.peer_id, location.merkle_root, displaced_at),
        )

    def forget_displaced(self, pack_id: bytes, index: int, peer_id: str) -> None:
        self._db.execute(
            "DELETE FROM displaced_shards WHERE pack_id=? AND idx=? AND peer_id=?",
            (pack_id, index, peer_id),
        )

    def displaced(self) -> dict[bytes, list[DisplacedShard]]:
        """Every displaced copy, by pack."""
        found: dict[bytes, list[DisplacedShard]] = {}
        rows = self._db.execute(
            "SELECT pack_id, idx, peer_id, merkle_root, displaced_at FROM displaced_shards"
            " ORDER BY pack_id, idx, peer_id"
        )
        for pack_id, idx, peer_id, root, at in rows:
            key = bytes(pack_id)
            location = ShardLocation(int(idx), peer_id, bytes(root))
            found.setdefault(key, []).append(DisplacedShard(key, location, int(at)))
        return found

    # -- traffic --------------------------------------------------------------------

    def add_traffic(
        self, day: int, peer_id: str, purpose: str, *, sent: int = 0, received: int = 0
    ) -> None:
        """Count bytes moved with ``peer_id`` on ``day`` (unix day number)."""
        self._db.execute(
            "INSERT INTO traffic(day, peer_id, purpose, sent, received) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT(day, peer_id, purpose) DO UPDATE SET sent = sent + excluded.sent,"
            " received = received + excluded.received",
            (day, peer_id, purpose, sent, received),
        )

    def traffic(self, *, since_day: int = 0) -> list[Traffic]:
        """Every day's traffic from ``since_day`` on, by day, peer and purpose."""
        rows = self._db.execute(
            "SELECT day, peer_id, purpose, sent, received FROM traffic WHERE day >= ?"
            " ORDER BY day, peer_id, purpose",
            (since_day,),
        )
        return [Traffic(int(d), p, purpose, int(s), int(r)) for d, p, purpose, s, r in rows]

    def add_repairs(self, day: int, peer_id: str, *, moved_off: int = 0, placed: int = 0) -> None:
        """Count shards repair moved off ``peer_id`` or placed on it on ``day``."""
        self._db.execute(
            "INSERT INTO repairs(day, peer_id, moved_off, placed) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(day, peer_id) DO UPDATE SET moved_off = moved_off + excluded.moved_off,"
            " placed = placed + excluded.placed",
            (day, peer_id, moved_off, placed),
        )

    def repair_counts(self, *, since_day: int = 0) -> dict[str, RepairCount]:
        """Each peer's shards moved off and placed by repair from ``since_day`` on."""
        rows = self._db.execute(
            "SELECT peer_id, SUM(moved_off), SUM(placed) FROM repairs WHERE day >= ?"
            " GROUP BY peer_id",
            (since_day,),
        )
        return {peer: RepairCount(int(off), int(on)) for peer, off, on in rows}

    def set_seen(self, peer_id: str, seen_at: int) -> None:
        """Remember that ``peer_id`` answered at ``seen_at`` (unix seconds)."""
        self._db.execute(
            "INSERT OR REPLACE INTO peer_seen(peer_id, seen_at) VALUES (?, ?)", (peer_id, seen_at)
        )

    def last_seen(self) -> dict[str, int]:
        """When each peer last answered (unix seconds), for those that ever did."""
        return {
            peer: int(at) for peer, at in self._db.execute("SELECT peer_id, seen_at FROM peer_seen")
        }

    def record_probe(self, peer_id: str, answered: bool) -> None:
        """Count one observation of whether ``peer_id`` answered (module docstring)."""
        self._db.execute(
            "INSERT INTO peer_probes(peer_id, asked, answered) VALUES (?, 1, ?)"
            " ON CONFLICT(peer_id) DO UPDATE SET asked = asked + 1,"
            " answered = answered + excluded.answered",
            (peer_id, int(answered)),
        )
        self._db.execute(
            "UPDATE peer_probes SET asked = asked / 2, answered = answered / 2"
            " WHERE peer_id = ? AND asked >= ?",
            (peer_id, PROBE_MEMORY),
        )

    def probe_counts(self) -> dict[str, ProbeCounts]:
        """Every peer's uptime record, for those ever asked."""
        rows = self._db.execute("SELECT peer_id, asked, answered FROM peer_probes")
        return {peer: ProbeCounts(int(asked), int(answered)) for peer, asked, answered in rows}

    # -- audits --------------------------------------------------------------

    def peer_audits(self) -> dict[str, PeerAudits]:
        """What audits said of each peer ever audited."""
        rows = self._db.execute(
            "SELECT peer_id, passed, failed, audits, failures, last_audit, last_failure,"
            " disqualified_at FROM peer_audits"
        )
        return {
            peer: PeerAudits(
                passed=passed,
                failed=failed,
                audits=audits,
                failures=failures,
                last_audit=last,
                last_failure=failure,
                disqualified_at=disqualified,
            )
            for peer, passed, failed, audits, failures, last, failure, disqualified in rows
        }

    def set_peer_audits(self, peer_id: str, audits: PeerAudits) -> None:
        """Record what audits said of a peer (unless it was removed meanwhile)."""
        self._db.execute(
            "INSERT OR REPLACE INTO peer_audits(peer_id, passed, failed, audits, failures,"
            " last_audit, last_failure, disqualified_at) SELECT ?, ?, ?, ?, ?, ?, ?, ?"
            " WHERE EXISTS (SELECT 1 FROM peers WHERE peer_id=?)",
            (
                peer_id,
                audits.passed,
                audits.failed,
                audits.audits,
                audits.failures,
                audits.last_audit,
                audits.last_failure,
                audits.disqualified_at,
                peer_id,
            ),
        )

    def disqualified_peers(self) -> frozenset[str]:
        """The peers that audits disqualified: they get no new shards."""
        rows = self._db.execute(_DISQUALIFIED)
        return frozenset(peer for (peer,) in rows)

    def placed_shards(self) -> list[PlacedShard]:
        """Every shard row, with its pack's shard size and block size."""
        return self._placed_shards("", ())

    def shards_due_for_audit(self, now: float) -> list[PlacedShard]:
        """The shards on peers not disqualified whose audit row (naming the
        peer that holds them now) is due at ``now``, by pack and index."""
        return self._placed_shards(
            " JOIN shard_audits a"
            " ON a.pack_id = s.pack_id AND a.idx = s.idx AND a.peer_id = s.peer_id"
            f" WHERE a.due_at <= ? AND s.peer_id NOT IN ({_DISQUALIFIED})",
            (now,),
        )

    def shards_without_audit_row(self) -> list[PlacedShard]:
        """The shards on peers not disqualified that no audit row names
        with the peer that holds them now, by pack and index."""
        return self._placed_shards(
            " LEFT JOIN shard_audits a"
            " ON a.pack_id = s.pack_id AND a.idx = s.idx AND a.peer_id = s.peer_id"
            f" WHERE a.pack_id IS NULL AND s.peer_id NOT IN ({_DISQUALIFIED})",
            (),
        )

    def next_audit_due(self) -> float | None:
        """When the first shard on a peer not disqualified comes due for an
        audit (the due time of its row), None if no row names one."""
        (due,) = self._db.execute(
            "SELECT MIN(a.due_at) FROM shard_audits a JOIN shards s"
            " ON s.pack_id = a.pack_id AND s.idx = a.idx AND s.peer_id = a.peer_id"
            f" WHERE a.peer_id NOT IN ({_DISQUALIFIED})"
        ).fetchone()
        return None if due is None else float(due)

    def _placed_shards(self, where: str, parameters: tuple[object, ...]) -> list[PlacedShard]:
        # A maintenance round asks for the few shards due, not for every
        # shard and audit row: with a year of packs, building them all each
        # round was most of a simulated circle's time.
        rows = self._db.execute(
            "SELECT s.pack_id, s.idx, s.peer_id, s.merkle_root, p.shard_size, p.block_size"
            f" FROM shards s JOIN packs p ON p.pack_id = s.pack_id{where}"
            " ORDER BY s.pack_id, s.idx",
            parameters,
        )
        return [
            PlacedShard(bytes(pack), idx, peer, bytes(root), size, block)
            for pack, idx, peer, root, size, block in rows
        ]

    def leased_shards(self, *, expiring_before: int) -> list[LeasedShard]:
        """The shard rows on node peers not leaving whose lease ends before
        unix second ``expiring_before`` or is unknown, by peer: one query,
        which is all a renewal with nothing due costs."""
        rows = self._db.execute(
            "SELECT s.pack_id, s.idx, s.peer_id, s.lease_expiry FROM shards s"
            " JOIN peers p ON p.peer_id = s.peer_id"
            " WHERE p.kind = 'node' AND (s.lease_expiry IS NULL OR s.lease_expiry < ?)"
            " AND s.peer_id NOT IN (SELECT peer_id FROM leaving_peers)"
            " ORDER BY s.peer_id, s.pack_id, s.idx",
            (expiring_before,),
        )
        return [
            LeasedShard(bytes(pack), int(idx), peer, None if expiry is None else int(expiry))
            for pack, idx, peer, expiry in rows
        ]

    def set_lease_expiries(self, leases: Iterable[tuple[bytes, int, str, int]]) -> None:
        """Record leases, each (pack id, shard index, peer, expiry in unix
        seconds); a row whose shard is no longer on that peer is left alone."""
        self._db.executemany(
            "UPDATE shards SET lease_expiry=? WHERE pack_id=? AND idx=? AND peer_id=?",
            [(expiry, pack_id, index, peer_id) for pack_id, index, peer_id, expiry in leases],
        )

    def has_shard_root(self, merkle_root: bytes) -> bool:
        """Whether any shard of ours has this Merkle root."""
        row = self._db.execute(
            "SELECT 1 FROM shards WHERE merkle_root=? LIMIT 1", (merkle_root,)
        ).fetchone()
        return row is not None

    def shard_audits(self) -> dict[tuple[bytes, int], ShardAudit]:
        """(pack id, shard index) → its audit row, for the shards whose row
        names the peer that holds them now (module docstring)."""
        rows = self._db.execute(
            "SELECT a.pack_id, a.idx, a.peer_id, a.due_at, a.audited_at, a.passed, a.reason"
            " FROM shard_audits a JOIN shards s"
            " ON s.pack_id = a.pack_id AND s.idx = a.idx AND s.peer_id = a.peer_id"
        )
        return {
            (bytes(pack), idx): ShardAudit(
                peer, due, audited, None if passed is None else bool(passed), reason
            )
            for pack, idx, peer, due, audited, passed, reason in rows
        }

    def set_shard_audits(self, audits: Iterable[tuple[bytes, int, ShardAudit]]) -> None:
        """Record audit rows, each (pack id, shard index, row); a row whose
        shard is gone from that peer meanwhile (pruned, moved) is dropped."""
        self._db.executemany(
            "INSERT OR REPLACE INTO shard_audits(pack_id, idx, peer_id, due_at, audited_at,"
            " passed, reason) SELECT ?, ?, ?, ?, ?, ?, ? WHERE EXISTS"
            " (SELECT 1 FROM shards WHERE pack_id=? AND idx=? AND peer_id=?)",
            [
                (
                    pack_id,
                    index,
                    a.peer_id,
                    a.due_at,
                    a.audited_at,
                    None if a.passed is None else int(a.passed),
                    a.reason,
                    pack_id,
                    index,
                    a.peer_id,
                )
                for pack_id, index, a in audits
            ],
        )

    def pack_placements(self) -> Iterator[tuple[bytes, int, int, list[tuple[str, int]]]]:
        """Every pack as (pack id, k, n, (peer, shard index) of each shard placed)."""
        rows = self._db.execute(
            "SELECT p.pack_id, p.k, p.n, s.peer_id, s.idx FROM packs p"
            " LEFT JOIN shards s ON s.pack_id = p.pack_id ORDER BY p.pack_id"
        )
        current: tuple[bytes, int, int, list[tuple[str, int]]] | None = None
        for pack_id, k, n, peer_id, shard_index in rows:
            if current is None or current[0] != pack_id:
                if current is not None:
                    yield current
                current = (bytes(pack_id), int(k), int(n), [])
            if peer_id is not None:
                current[3].append((peer_id, int(shard_index)))
        if current is not None:
            yield current

    def shard_bytes_by_peer(self) -> dict[str, int]:
        """Bytes of shard data each peer holds for this home (headers aside)."""
        rows = self._db.execute(
            "SELECT s.peer_id, sum(p.shard_size) FROM shards s"
            " JOIN packs p ON p.pack_id = s.pack_id GROUP BY s.peer_id"
        )
        return {peer: int(size) for peer, size in rows}

    def shard_count_by_peer(self) -> dict[str, int]:
        rows = self._db.execute("SELECT peer_id, count(*) FROM shards GROUP BY peer_id")
        return {peer: count for peer, count in rows}

    def add_snapshot(self, snapshot_id: bytes, snap: Snapshot) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO snapshots(snapshot_id, time_ns, hostname, paths, tags, tree,"
            " file_count, total_size) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                snapshot_id,
                snap.time_ns,
                snap.hostname,
                _join_strs(snap.paths),
                "\0".join(snap.tags),
                snap.tree,
                snap.file_count,
                snap.total_size,
            ),
        )

    def remove_snapshot(self, snapshot_id: bytes) -> None:
        self._db.execute("DELETE FROM snapshots WHERE snapshot_id=?", (snapshot_id,))

    def snapshots(self) -> list[tuple[bytes, Snapshot]]:
        rows = self._db.execute(
            "SELECT snapshot_id, time_ns, hostname, paths, tags, tree, file_count, total_size"
            " FROM snapshots ORDER BY time_ns, snapshot_id"
        )
        result = []
        for sid, time_ns, host, paths, tags, tree, count, size in rows:
            snap = Snapshot(
                time_ns=time_ns,
                hostname=host,
                paths=tuple(bytes(paths).split(b"\0")) if paths else (),
                tags=tuple(tags.split("\0")) if tags else (),
                tree=bytes(tree),
                file_count=count,
                total_size=size,
            )
            result.append((bytes(sid), snap))
        return result

    # -- file cache -----------------------------------------------------------

    def cached_files_in(self, directory: bytes) -> dict[bytes, CachedFile]:
        """Name → cache entry for the files of one directory, in one query
        (a query per file cost a backup of 44,000 files over a second)."""
        rows = self._db.execute(
            "SELECT name, size, mtime_ns, ctime_ns, inode, content FROM file_cache WHERE dir=?",
            (directory,),
        )
        return {
            bytes(name): CachedFile(size, mtime, ctime, inode, _split_ids(bytes(content)))
            for name, size, mtime, ctime, inode, content in rows
        }

    def cache_files(self, entries: Iterable[tuple[bytes, CachedFile]]) -> None:
        """Remember files (by absolute path) that a backup has just read."""
        self._db.executemany(
            "INSERT OR REPLACE INTO file_cache(dir, name, size, mtime_ns, ctime_ns, inode, content)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (*_split_path(p), c.size, c.mtime_ns, c.ctime_ns, c.inode, _join_ids(c.content))
                for p, c in entries
            ],
        )

    def iter_blob_ids(self) -> Iterator[bytes]:
        """Every distinct blob id in the index."""
        for (blob_id,) in self._db.execute("SELECT DISTINCT blob_id FROM blobs"):
            yield bytes(blob_id)

    def iter_blob_rows(self) -> Iterator[tuple[bytes, bytes]]:
        """(blob id, pack id) for every stored copy of every blob."""
        for blob_id, pack_id in self._db.execute("SELECT blob_id, pack_id FROM blobs"):
            yield bytes(blob_id), bytes(pack_id)


class _Transaction:
    """``with index.transaction():`` — BEGIN IMMEDIATE … COMMIT, or ROLLBACK on error."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self._db.execute("COMMIT")
        else:
            self._db.execute("ROLLBACK")
