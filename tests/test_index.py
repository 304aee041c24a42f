"""The index's schema versions, and the peers' uptime and audit records kept in it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pbackup.engine.index import (
    PROBE_MEMORY,
    SCHEMA_VERSION,
    Index,
    LeasedShard,
    PlacedShard,
    ProbeCounts,
)
from p2pbackup.errors import UsageError
from p2pbackup.model import (
    PackRecord,
    PeerAudits,
    PeerRecord,
    RepositoryConfig,
    ShardAudit,
    ShardLocation,
)

CONFIG = RepositoryConfig(2, 4, 1 << 20, 1 << 12, 1 << 14, 1 << 16, 1 << 16)


def as_version_5(db: sqlite3.Connection) -> None:
    """Take version 6's delegate acts out of today's index."""
    db.execute("DROP TABLE delegate_acts")
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (b"5",))


def as_version_4(db: sqlite3.Connection) -> None:
    """Take version 5's delegates out of today's index."""
    as_version_5(db)
    db.execute("DROP TABLE delegates")
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (b"4",))


def as_version_3(db: sqlite3.Connection) -> None:
    """Take version 4's lease column and leaving peers out of today's index."""
    as_version_4(db)
    db.execute("DROP INDEX shards_by_lease")
    db.execute("ALTER TABLE shards DROP COLUMN lease_expiry")
    db.execute("DROP TABLE leaving_peers")
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (b"3",))


def version_1_index(path: Path) -> None:
    """An index as version 1 wrote it: today's, less the probe counts."""
    index = Index(path)
    with index.transaction():
        index.set_config(CONFIG)
        index.add_peer(PeerRecord("peer-a", "node", "10.0.0.1:47470"))
        index.set_seen("peer-a", 1_700_000_000)
    index.close()
    db = sqlite3.connect(path)
    as_version_3(db)
    db.execute("DROP TABLE peer_probes")
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (b"1",))
    db.commit()
    db.close()


def version_2_index(path: Path) -> None:
    """An index as version 2 wrote it: today's, less the audit records."""
    index = Index(path)
    with index.transaction():
        index.set_config(CONFIG)
        index.add_peer(PeerRecord("peer-a", "node", "10.0.0.1:47470"))
        index.record_probe("peer-a", True)
    index.close()
    db = sqlite3.connect(path)
    as_version_3(db)
    db.execute("DROP TABLE peer_audits")
    db.execute("DROP TABLE shard_audits")
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (b"2",))
    db.commit()
    db.close()


def stored_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        (raw,) = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(raw)
    finally:
        db.close()


def test_a_version_1_index_is_migrated_forward_with_its_data(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    version_1_index(path)
    assert stored_version(path) == 1
    index = Index(path)
    assert stored_version(path) == SCHEMA_VERSION == 6
    assert index.config() == CONFIG
    assert index.peers() == [PeerRecord("peer-a", "node", "10.0.0.1:47470")]
    assert index.last_seen() == {"peer-a": 1_700_000_000}
    assert index.probe_counts() == {}
    index.record_probe("peer-a", True)
    assert index.probe_counts() == {"peer-a": ProbeCounts(asked=1, answered=1)}
    index.close()
    reopened = Index(path)  # and opening it again changes nothing
    assert reopened.probe_counts() == {"peer-a": ProbeCounts(asked=1, answered=1)}
    reopened.close()


def test_a_version_2_index_gains_the_audit_records(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    version_2_index(path)
    index = Index(path)
    assert stored_version(path) == SCHEMA_VERSION
    assert index.probe_counts() == {"peer-a": ProbeCounts(asked=1, answered=1)}
    assert index.peer_audits() == {}
    assert index.shard_audits() == {}
    audits = PeerAudits(passed=99.0, failed=1.0, audits=2, failures=1, last_audit=5)
    index.set_peer_audits("peer-a", audits)
    index.close()
    assert Index(path).peer_audits() == {"peer-a": audits}


def test_a_version_3_index_gains_leases_and_leaving_peers(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    index = Index(path)
    with index.transaction():
        index.set_config(CONFIG)
        index.add_peer(PeerRecord("peer-a", "node", "10.0.0.1:47470"))
        index.add_pack(pack(b"P" * 32, "peer-a"))
    index.close()
    db = sqlite3.connect(path)
    as_version_3(db)
    db.commit()
    db.close()
    index = Index(path)
    assert stored_version(path) == SCHEMA_VERSION
    # The row made before leases were recorded: its lease is unknown, so due.
    assert index.leased_shards(expiring_before=0) == [LeasedShard(b"P" * 32, 0, "peer-a", None)]
    assert index.leaving_peers() == {}
    index.close()


def test_leases_are_recorded_and_read_back_by_expiry(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    with index.transaction():
        for peer in ("a", "b"):
            index.add_peer(PeerRecord(peer, "node", f"10.0.0.{ord(peer)}:1"))
        index.add_peer(PeerRecord("folder", "dir", "/mnt/f"))
        index.add_pack(pack(b"P" * 32, "a", "b", "folder"))
        index.set_lease_expiries([(b"P" * 32, 0, "a", 1000), (b"P" * 32, 1, "b", 5000)])
        # Shard 1 is b's, not a's: left alone.
        index.set_lease_expiries([(b"P" * 32, 1, "a", 1)])
    # Folders have no leases; b's lease ends after the bound.
    assert index.leased_shards(expiring_before=2000) == [LeasedShard(b"P" * 32, 0, "a", 1000)]
    assert [s.peer_id for s in index.leased_shards(expiring_before=9999)] == ["a", "b"]
    # A leaving peer's shards are not renewed; a stranger's notice is not kept.
    with index.transaction():
        assert index.set_leaving("b", 77)
        assert index.set_leaving("b", 88)  # the first notice counts
        assert not index.set_leaving("stranger", 77)
    assert index.leaving_peers() == {"b": 77}
    assert [s.peer_id for s in index.leased_shards(expiring_before=9999)] == ["a"]
    # Moved to another peer by a repair: the new copy's lease is unknown.
    with index.transaction():
        index.set_shard(b"P" * 32, ShardLocation(0, "b", bytes(32)))
        index.remove_peer("b")
    assert index.leaving_peers() == {}
    assert index.leased_shards(expiring_before=9999) == []
    index.close()


def pack(pack_id: bytes, *holders: str) -> PackRecord:
    shards = tuple(ShardLocation(i, peer, bytes([i]) * 32) for i, peer in enumerate(holders))
    return PackRecord(pack_id, 100, 1, len(holders), 60, 4096, shards, ())


def test_audit_records_follow_the_shards_and_peers(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    with index.transaction():
        for peer in ("a", "b", "c"):
            index.add_peer(PeerRecord(peer, "dir", f"/mnt/{peer}"))
        index.add_pack(pack(b"P" * 32, "a", "b"))
        index.add_pack(pack(b"Q" * 32, "b", "c"))
    assert index.placed_shards()[0] == PlacedShard(b"P" * 32, 0, "a", bytes(32), 60, 4096)
    assert index.has_shard_root(bytes([1]) * 32) and not index.has_shard_root(b"x" * 32)
    good = ShardAudit("a", due_at=10, audited_at=5, passed=True)
    bad = ShardAudit("c", due_at=10, audited_at=5, passed=False, reason="missing")
    index.set_shard_audits(
        [
            (b"P" * 32, 0, good),
            (b"Q" * 32, 1, bad),
            (b"Q" * 32, 0, ShardAudit("a", due_at=3)),  # shard 0 of Q is b's, not a's
            (b"R" * 32, 0, good),  # no such pack
        ]
    )
    assert index.shard_audits() == {(b"P" * 32, 0): good, (b"Q" * 32, 1): bad}
    index.set_peer_audits("b", PeerAudits(1.0, 9.0, disqualified_at=7))
    index.set_peer_audits("gone", PeerAudits(1.0, 0.0))  # not a peer: not recorded
    assert index.disqualified_peers() == {"b"}
    assert set(index.peer_audits()) == {"b"}
    # A shard moved to another peer: the old peer's verdict no longer speaks for it.
    with index.transaction():
        index.add_pack(pack(b"P" * 32, "c", "b"))
    assert (b"P" * 32, 0) not in index.shard_audits()
    with index.transaction():
        index.remove_pack(b"Q" * 32)
        index.remove_peer("b")
    assert index.shard_audits() == {}
    assert index.peer_audits() == {}
    assert index.disqualified_peers() == frozenset()
    index.close()


_PEERS = ("a", "b", "c", "d")


@settings(max_examples=60, deadline=None)
@given(
    packs=st.lists(
        st.lists(st.sampled_from(_PEERS), min_size=1, max_size=4), min_size=0, max_size=6
    ),
    rows=st.lists(
        st.tuples(
            st.integers(0, 5), st.integers(0, 3), st.sampled_from(_PEERS), st.integers(0, 20)
        ),
        max_size=20,
    ),
    disqualified=st.sets(st.sampled_from(_PEERS)),
    now=st.integers(0, 20),
)
def test_the_audit_queries_agree_with_every_row_read(
    tmp_path_factory: pytest.TempPathFactory,
    packs: list[list[str]],
    rows: list[tuple[int, int, str, int]],
    disqualified: set[str],
    now: int,
) -> None:
    # What a maintenance round asks the index for (the shards due, those
    # without a row, the next due time) is what every shard and row say.
    index = Index(tmp_path_factory.mktemp("audits") / "index.sqlite")
    ids = [bytes([65 + i]) * 32 for i in range(len(packs))]
    with index.transaction():
        for peer in _PEERS:
            index.add_peer(PeerRecord(peer, "dir", f"/mnt/{peer}"))
        for pack_id, holders in zip(ids, packs, strict=True):
            index.add_pack(pack(pack_id, *holders))
        index.set_shard_audits(
            (ids[p], i, ShardAudit(peer, due_at=due)) for p, i, peer, due in rows if p < len(ids)
        )
        for peer in disqualified:
            index.set_peer_audits(peer, PeerAudits(0.0, 9.0, disqualified_at=1))
    placed = [s for s in index.placed_shards() if s.peer_id not in disqualified]
    audits = index.shard_audits()
    row_of = {s: audits.get((s.pack_id, s.index)) for s in placed}
    assert index.shards_due_for_audit(now) == [
        s for s in placed if (a := row_of[s]) is not None and a.due_at <= now
    ]
    assert index.shards_without_audit_row() == [s for s in placed if row_of[s] is None]
    dues = [a.due_at for a in audits.values() if a.peer_id not in disqualified]
    assert index.next_audit_due() == (min(dues) if dues else None)
    index.close()


def test_a_new_index_starts_at_the_current_version(tmp_path: Path) -> None:
    Index(tmp_path / "index.sqlite").close()
    assert stored_version(tmp_path / "index.sqlite") == SCHEMA_VERSION


def test_a_newer_index_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    Index(path).close()
    db = sqlite3.connect(path)
    newer = SCHEMA_VERSION + 1
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(newer).encode(),))
    db.execute("DROP TABLE friends")  # a newer release might have done anything
    db.commit()
    db.close()
    with pytest.raises(
        UsageError, match=rf"schema version {newer}; this p2pbackup reads versions up to"
    ):
        Index(path)
    db = sqlite3.connect(path)
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    db.close()
    assert "friends" not in tables  # not recreated: nothing was changed


def test_probe_counts_follow_the_recent_past(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    for _ in range(PROBE_MEMORY - 1):
        index.record_probe("flaky", False)
    index.record_probe("steady", True)
    assert index.probe_counts()["flaky"] == ProbeCounts(PROBE_MEMORY - 1, 0)
    # The count reaching PROBE_MEMORY halves both: old silence weighs less
    # and less as the peer answers again.
    index.record_probe("flaky", True)
    assert index.probe_counts()["flaky"] == ProbeCounts(PROBE_MEMORY // 2, 0)
    for _ in range(PROBE_MEMORY // 2):
        index.record_probe("flaky", True)
    counts = index.probe_counts()["flaky"]
    assert counts == ProbeCounts(PROBE_MEMORY // 2, PROBE_MEMORY // 4)
    assert index.probe_counts()["steady"] == ProbeCounts(1, 1)
    with index.transaction():
        index.add_peer(PeerRecord("steady", "dir", "/mnt/disk"))
        index.remove_peer("steady")
    assert "steady" not in index.probe_counts()  # a forgotten peer's record goes too
    index.close()


def test_displaced_copies_and_traffic_are_kept_and_go_with_their_peer(tmp_path: Path) -> None:
    pack_id = bytes(range(32))
    record = PackRecord(pack_id, 100, 2, 4, 50, 4096, (ShardLocation(0, "peer-a", b"r" * 32),), ())
    index = Index(tmp_path / "index.sqlite")
    with index.transaction():
        index.set_config(CONFIG)
        index.add_peer(PeerRecord("peer-a", "node", "10.0.0.1:47470"))
        index.add_pack(record)
        # A repair moves shard 0 to peer-b and remembers the copy on peer-a.
        index.add_displaced(pack_id, ShardLocation(0, "peer-a", b"r" * 32), 1_700_000_000)
        index.set_shard(pack_id, ShardLocation(0, "peer-b", b"r" * 32))
        index.add_traffic(19_000, "peer-b", "repair", sent=10)
        index.add_traffic(19_000, "peer-b", "repair", sent=5, received=7)
        index.add_traffic(19_001, "peer-a", "audit", received=3)
    stored = index.pack(pack_id)
    assert stored is not None and [s.peer_id for s in stored.shards] == ["peer-b"]
    [copy] = index.displaced()[pack_id]
    assert copy.location.peer_id == "peer-a" and copy.displaced_at == 1_700_000_000
    assert [(t.day, t.peer_id, t.purpose, t.sent, t.received) for t in index.traffic()] == [
        (19_000, "peer-b", "repair", 15, 7),
        (19_001, "peer-a", "audit", 0, 3),
    ]
    assert [t.peer_id for t in index.traffic(since_day=19_001)] == ["peer-a"]
    with index.transaction():
        index.remove_peer("peer-a")
    assert index.displaced() == {}
    index.close()


def test_a_version_4_index_gains_delegates(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    index = Index(path)
    with index.transaction():
        index.set_config(CONFIG)
    index.close()
    db = sqlite3.connect(path)
    as_version_4(db)
    db.commit()
    db.close()
    index = Index(path)
    assert stored_version(path) == SCHEMA_VERSION
    assert index.delegates() == []
    with index.transaction():
        assert index.add_delegate(b"D" * 20, 100)
        assert not index.add_delegate(b"D" * 20, 200)
        index.set_delegate_granted(b"D" * 20, 300, 7)
    [row] = index.delegates()
    assert (row.node_id, row.added_at, row.granted_at, row.grant_sequence) == (
        b"D" * 20,
        100,
        300,
        7,
    )
    with index.transaction():
        assert index.next_grant_sequence(1000) == 1000
        assert index.next_grant_sequence(900) == 1001
        assert index.remove_delegate(b"D" * 20)
    assert index.delegates() == []
    index.close()


def test_a_version_5_index_gains_when_delegates_acted(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    index = Index(path)
    with index.transaction():
        index.set_config(CONFIG)
        index.add_delegate(b"D" * 20, 100)
    index.close()
    db = sqlite3.connect(path)
    as_version_5(db)
    db.commit()
    db.close()
    index = Index(path)
    assert stored_version(path) == SCHEMA_VERSION
    [row] = index.delegates()
    assert row.acted_at is None
    with index.transaction():
        index.set_delegate_acted(b"D" * 20, 500)
        index.set_delegate_acted(b"D" * 20, 400)  # an older log says less
    assert index.delegates()[0].acted_at == 500
    with index.transaction():
        assert index.remove_delegate(b"D" * 20)
        assert index.add_delegate(b"D" * 20, 600)
    assert index.delegates()[0].acted_at is None  # a new delegate has not acted yet
    index.close()
