"""Audits against cheating holders: each way of losing or faking a shard is
caught, by its own test, on storage nodes over the memory network (and on
folder peers); reputation follows, and placement and ``status`` with it.

Slow answers are timed on trio's virtual clock, with memory stores that run
no threads (a thread's wait would let the autojumping clock skip ahead).
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from p2pbackup.app import operations
from p2pbackup.core import formats, merkle
from p2pbackup.core.keys import Keyring
from p2pbackup.engine.backup import Backup
from p2pbackup.engine.index import Index, PlacedShard
from p2pbackup.engine.repository import Repository
from p2pbackup.maintenance import auditor
from p2pbackup.maintenance.audit import AuditPolicy, FailureReason, Outcome
from p2pbackup.maintenance.auditor import AuditReport, ShardResult, audit_once, run_audits
from p2pbackup.maintenance.reputation import ShardHealth
from p2pbackup.maintenance.standing import peer_standing, peer_standings, shard_states
from p2pbackup.maintenance.status import gather_status
from p2pbackup.model import PEER_KIND_DIR, PackRecord, PeerRecord, ShardLocation
from p2pbackup.node.shardhost import SHARDS_DIR
from p2pbackup.stores.memory import MemoryShardStore
from p2pbackup.stores.shardstore import ShardRoot, ShardStore
from p2pbackup.wire.messages import AuditProof

from .engine_helpers import SMALL, make_setup, make_tree, shard_files
from .net_helpers import RunningNode
from .test_network_engine import Cluster, backup, make_cluster

#: Two blocks of SMALL's 4 KiB per challenge, as the defaults ask two of 64 KiB.
POLICY = AuditPolicy(challenge_bytes=8 * 1024)


# -- helpers -----------------------------------------------------------------------------------


async def backed_up(
    tmp_path: Path, nursery: trio.Nursery, *, nodes: int = 6, big: int = 600_000
) -> Cluster:
    cluster = await make_cluster(tmp_path, nursery, nodes=nodes)
    await backup(cluster, make_tree(tmp_path / "src", big=big))
    return cluster


async def audit(cluster: Cluster, *, seed: int = 1, policy: AuditPolicy = POLICY) -> AuditReport:
    async with cluster.repository() as repo:
        return await audit_once(repo, rng=random.Random(seed), policy=policy)


def peer_of(node: RunningNode) -> str:
    return node.identity.node_id.hex()


def held(cluster: Cluster, node: RunningNode) -> list[PlacedShard]:
    index = Index(cluster.home.index_path)
    try:
        return [s for s in index.placed_shards() if s.peer_id == peer_of(node)]
    finally:
        index.close()


def sid(shard: PlacedShard) -> bytes:
    return formats.shard_id(shard.pack_id, shard.index)


def shard_path(cluster: Cluster, node: RunningNode, shard: PlacedShard) -> Path:
    name = sid(shard).hex()
    return node.host.root / SHARDS_DIR / cluster.home.node_id().hex() / name[:2] / name


def verdicts(report: AuditReport) -> dict[tuple[bytes, int], ShardResult]:
    return {(r.pack_id, r.index): r for r in report.results}


def only_failure(report: AuditReport, shard: PlacedShard) -> ShardResult:
    """The one failed audit of ``report``, which must be ``shard``'s; every
    other shard, on every peer, passed."""
    (failed,) = report.failures
    assert (failed.pack_id, failed.index, failed.peer_id) == (
        shard.pack_id,
        shard.index,
        shard.peer_id,
    )
    assert report.count(Outcome.HEALTHY) == len(report.results) - 1
    return failed


# -- honest peers ------------------------------------------------------------------------------


async def test_honest_peers_pass_every_audit(tmp_path: Path, nursery: trio.Nursery) -> None:
    cluster = await backed_up(tmp_path, nursery)
    report = await audit(cluster)
    async with cluster.repository() as repo:
        placed = repo.index.placed_shards()
        states = shard_states(repo.index)
        standings = peer_standings(repo.index, now=2_000_000_000)
        traffic = repo.index.traffic()
    assert len(report.results) == len(placed) > 20
    # What the audits cost is counted per peer and day, and is what came.
    assert {t.purpose for t in traffic} == {"audit"}
    assert {t.peer_id for t in traffic} == {r.peer_id for r in report.results}
    assert sum(t.received for t in traffic) == sum(r.received for r in report.results) > 0
    assert sum(t.sent for t in traffic) == sum(r.sent for r in report.results) > 0
    assert report.count(Outcome.HEALTHY) == len(placed)
    assert report.lines() == [
        f"audited {len(placed)} shards on 6 peers: {len(placed)} healthy, 0 failed, 0 unanswered"
    ]
    assert {state.health for state in states.values()} == {ShardHealth.HEALTHY}
    for standing in standings.values():
        assert standing.score == 1.0 and standing.audits > 3 and not standing.disqualified
    # Two blocks of 4 KiB and their proofs, per shard: the shard itself never came.
    assert all(r.received < 2 * 4096 + 1024 for r in report.results)
    assert max(s.shard_size for s in placed) > 10 * 4096
    json = report.to_json()
    assert (json["shards"], json["healthy"], json["failures"]) == (len(placed), len(placed), [])


# -- the cheats, each caught -------------------------------------------------------------------


async def test_a_peer_that_deleted_a_shard_is_caught(tmp_path: Path, nursery: trio.Nursery) -> None:
    cluster = await backed_up(tmp_path, nursery)
    cheat = cluster.nodes[1]
    victim = held(cluster, cheat)[2]
    assert cheat.host.delete(cluster.home.node_id(), sid(victim))  # quietly, to free space
    failed = only_failure(await audit(cluster), victim)
    assert failed.verdict.reason is FailureReason.MISSING
    async with cluster.repository() as repo:
        state = shard_states(repo.index)[(victim.pack_id, victim.index)]
        assert state.lost and state.health is ShardHealth.FAILED
        assert state.reason == "missing: the peer does not have it"
        standing = peer_standing(repo.index, victim.peer_id, now=2_000_000_000)
        assert standing.failures == 1 and standing.score < 1.0 and not standing.disqualified


async def test_a_peer_with_one_corrupted_block_is_caught(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    cluster = await backed_up(tmp_path, nursery)
    cheat = cluster.nodes[2]
    victim = held(cluster, cheat)[1]
    path = shard_path(cluster, cheat, victim)
    data = bytearray(path.read_bytes())
    data[len(data) - 10] ^= 0x40  # one bit of the last block, wherever the blocks asked are
    path.write_bytes(bytes(data))
    failed = only_failure(await audit(cluster), victim)
    assert failed.verdict.reason is FailureReason.WRONG_BLOCK
    assert "does not match the shard's Merkle root" in failed.verdict.detail


async def test_a_peer_that_cut_a_shard_short_is_caught(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    cluster = await backed_up(tmp_path, nursery)
    cheat = cluster.nodes[3]
    victim = max(held(cluster, cheat), key=lambda shard: shard.shard_size)
    path = shard_path(cluster, cheat, victim)
    assert path.stat().st_size > 6 * 4096
    path.write_bytes(path.read_bytes()[: 3 * 4096])  # the first three blocks kept
    failed = only_failure(await audit(cluster), victim)
    assert failed.verdict.reason is FailureReason.MISSING
    assert "damaged" in failed.verdict.detail


async def test_a_peer_that_keeps_half_of_each_shard_is_caught(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    # A craftier cheat: it keeps every shard's Merkle tree and the first half
    # of its blocks, and answers for the other half with zeros.
    cluster = await backed_up(tmp_path, nursery, big=2_500_000)
    cheat = cluster.nodes[4]
    honest = cheat.host.audit
    beyond: dict[bytes, bool] = {}  # shard id -> whether a block it lacks was asked

    def half(owner: bytes, shard_id: bytes, indices: Sequence[int]) -> list[Any]:
        info = cheat.host.info(owner, shard_id)
        assert info is not None
        kept = merkle.block_count(info.size, info.block_size) // 2
        beyond[shard_id] = any(index >= kept for index in indices)
        return [
            (block if index < kept else bytes(len(block)), proof)
            for index, (block, proof) in zip(indices, honest(owner, shard_id, indices), strict=True)
        ]

    cheat.host.audit = half  # type: ignore[method-assign]
    report = await audit(cluster)
    mine = held(cluster, cheat)
    assert len(mine) > 8
    results = verdicts(report)
    # Caught exactly when the challenge (two blocks) asked for a block it
    # lacks: three times in four, which soon disqualifies it.
    asked = [shard for shard in mine if (shard.pack_id, shard.index) in results]
    for shard in asked:
        verdict = results[(shard.pack_id, shard.index)].verdict
        if beyond[sid(shard)]:
            assert verdict.reason is FailureReason.WRONG_BLOCK
        else:
            assert verdict.passed
    assert any(beyond.values())
    assert {f.peer_id for f in report.failures} == {peer_of(cheat)}
    assert len(asked) == len(mine) or report.disqualified == (peer_of(cheat),)


async def test_a_peer_answering_with_another_shards_blocks_is_caught(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    cluster = await backed_up(tmp_path, nursery, big=2_500_000)
    cheat = cluster.nodes[0]
    # Two shards of as many blocks: the decoy's proofs have the victim's shape.
    by_blocks: dict[int, list[PlacedShard]] = {}
    for shard in held(cluster, cheat):
        stored = formats.SHARD_HEADER_SIZE + shard.shard_size
        by_blocks.setdefault(merkle.block_count(stored, shard.block_size), []).append(shard)
    victim, decoy = max(by_blocks.values(), key=len)[:2]
    honest = cheat.host.audit

    def swapped(owner: bytes, shard_id: bytes, indices: Sequence[int]) -> list[Any]:
        return honest(owner, sid(decoy) if shard_id == sid(victim) else shard_id, indices)

    cheat.host.audit = swapped  # type: ignore[method-assign]
    failed = only_failure(await audit(cluster), victim)
    assert failed.verdict.reason is FailureReason.WRONG_SHARD


async def test_a_peer_answering_with_stale_bytes_after_a_rewrite_is_caught(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    cluster = await backed_up(tmp_path, nursery)
    cheat = cluster.nodes[5]
    victim = held(cluster, cheat)[1]
    real_begin_put = cheat.host.begin_put

    # It says yes to a delete and keeps the shard; asked to store the id
    # again, it says it already has it.
    def keep(owner: bytes, shard_id: bytes) -> bool:
        return True

    def pretend(owner: bytes, shard_id: bytes, *args: Any) -> Any:
        if cheat.host.info(owner, shard_id) is not None:
            return None
        return real_begin_put(owner, shard_id, *args)

    cheat.host.delete = keep  # type: ignore[method-assign]
    cheat.host.begin_put = pretend  # type: ignore[method-assign]
    async with cluster.repository() as repo:
        record = repo.index.pack(victim.pack_id)
        assert record is not None
        store = repo.store(victim.peer_id)
        await store.delete(sid(victim))
        fresh = os.urandom(formats.SHARD_HEADER_SIZE + victim.shard_size)
        root = merkle.merkle_root(fresh, victim.block_size)
        await store.put(sid(victim), fresh, ShardRoot(victim.block_size, root))
        rewritten = tuple(
            attrs.evolve(s, merkle_root=root) if s.index == victim.index else s
            for s in record.shards
        )
        with repo.index.transaction():
            repo.index.add_pack(attrs.evolve(record, shards=rewritten))
    failed = only_failure(await audit(cluster), victim)
    assert failed.verdict.reason is FailureReason.WRONG_BLOCK


async def test_a_real_node_that_answers_past_the_deadline_is_caught(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    cluster = await backed_up(tmp_path, nursery)
    cheat = cluster.nodes[2]
    victim = held(cluster, cheat)[0]
    honest = cheat.host.audit

    def slow(owner: bytes, shard_id: bytes, indices: Sequence[int]) -> list[Any]:
        if shard_id == sid(victim):
            trio.from_thread.run(trio.sleep, 2.0)  # fetching it from elsewhere, say
        return honest(owner, shard_id, indices)

    cheat.host.audit = slow  # type: ignore[method-assign]
    quick = attrs.evolve(POLICY, min_deadline=0.5)
    report = await audit(cluster, policy=quick)
    failed = next(r for r in report.failures)
    assert (failed.pack_id, failed.index) == (victim.pack_id, victim.index)
    assert failed.verdict.reason is FailureReason.TOO_SLOW and failed.asks == 4
    # The rest of its shards wait for the next pass; other peers are done.
    others = [r for r in report.results if r.peer_id == victim.peer_id and r is not failed]
    assert all(r.verdict.outcome in (Outcome.HEALTHY, Outcome.UNANSWERED) for r in others)
    assert report.count(Outcome.FAILED) == 1


# -- unreachable peers are not blamed ------------------------------------------------------------


async def test_an_unreachable_peer_is_not_blamed(tmp_path: Path, nursery: trio.Nursery) -> None:
    cluster = await backed_up(tmp_path, nursery)
    asleep = cluster.nodes[3]
    cluster.world.kill_host("node3")
    report = await audit(cluster)
    assert set(report.unreachable) == {peer_of(asleep)}
    assert report.failures == []
    assert any("unreachable" in line for line in report.lines())
    async with cluster.repository() as repo:
        assert peer_of(asleep) not in repo.index.peer_audits()  # no verdict on it
        counts = repo.index.probe_counts()[peer_of(asleep)]
        assert counts.asked > counts.answered  # its absence shows in its uptime
        states = shard_states(repo.index)
    assert {s.health for s in states.values() if s.peer_id == peer_of(asleep)} == {
        ShardHealth.UNAUDITED
    }


# -- folder peers --------------------------------------------------------------------------------


async def test_folder_peers_on_a_rotting_disk_are_audited_too(tmp_path: Path) -> None:
    setup = await make_setup(tmp_path)
    async with operations.open_repository(setup.home) as repo:
        await Backup(repo).run([make_tree(tmp_path / "src")])
    rotten = shard_files(setup.peers[0])[0]
    data = bytearray(rotten.read_bytes())
    data[100] ^= 1
    rotten.write_bytes(bytes(data))
    shard_files(setup.peers[1])[0].unlink()
    setup.peers[2].rename(tmp_path / "elsewhere")  # an unplugged disk
    async with operations.open_repository(setup.home) as repo:
        report = await audit_once(repo, rng=random.Random(2), policy=POLICY)
        folders = {p.location: p.peer_id for p in repo.peers()}
    reasons = {(f.peer_id, f.verdict.reason) for f in report.failures}
    assert reasons == {
        (folders[str(setup.peers[0])], FailureReason.WRONG_BLOCK),
        (folders[str(setup.peers[1])], FailureReason.MISSING),
    }
    assert set(report.unreachable) == {folders[str(setup.peers[2])]}


# -- disqualification --------------------------------------------------------------------------


async def test_a_peer_that_lost_everything_is_disqualified(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    cluster = await backed_up(tmp_path, nursery, nodes=7, big=6_000_000)
    wiped = cluster.nodes[6]
    owner = cluster.home.node_id()
    shards, _more = wiped.host.list(owner)
    assert len(shards) > 11
    for shard in shards:
        wiped.host.delete(owner, shard.shard_id)
    report = await audit(cluster)
    assert report.disqualified == (peer_of(wiped),)
    # Disqualified at the eleventh failure: its other shards were not asked.
    assert report.count(Outcome.FAILED) == 11
    assert any("DISQUALIFIED" in line for line in report.lines())
    async with cluster.repository() as repo:
        states = shard_states(repo.index)
        theirs = [s for s in states.values() if s.peer_id == peer_of(wiped)]
        assert theirs and all(s.lost for s in theirs)
        assert all(not s.lost for s in states.values() if s.peer_id != peer_of(wiped))
        before = set(repo.index.pack_ids())
        # It gets no new shards: the next backup places on the other six.
        await Backup(repo).run([make_tree(tmp_path / "more", seed=2)])
        for pack_id in set(repo.index.pack_ids()) - before:
            record = repo.index.pack(pack_id)
            assert record is not None
            assert peer_of(wiped) not in {s.peer_id for s in record.shards}
        assert len(set(repo.index.pack_ids()) - before) > 3
        status = await gather_status(repo, now=2_000_000_000)
        # A later pass leaves it alone.
        again = await audit_once(repo, rng=random.Random(3), policy=POLICY)
    assert peer_of(wiped) not in {r.peer_id for r in again.results}
    lines = status.lines()
    (line,) = [ln for ln in lines if ln.startswith(f"peer {peer_of(wiped)[:16]}")]
    assert "DISQUALIFIED" in line and "its shards count as lost and it gets no new ones" in line
    others = [ln for ln in lines if ln.startswith("peer ") and ln != line]
    assert [ln for ln in others if "audit score 1.00, last audit " not in ln] == []
    (state,) = [p for p in status.peers if p.peer_id == peer_of(wiped)]
    assert state.disqualified_at is not None and state.audit_score is not None
    assert state.audit_score < 0.9 and "missing" in state.audit_failure
    # Its shards no longer count toward the packs' health.
    assert status.data.min_healthy is not None and status.data.min_healthy <= 5
    json = status.to_json()["peers"]
    assert any(p["disqualified_at"] is not None for p in json)  # type: ignore[index]


# -- virtual time: deadlines, re-asks, the schedule ---------------------------------------------

T0 = 1_900_000_000


class MemoryPeers(Repository):
    """A repository whose peers are memory stores: no threads, so trio's
    autojumping clock is the only time there is."""

    def __init__(self, path: Path, stores: dict[str, ShardStore]) -> None:
        index = Index(path)
        with index.transaction():
            index.set_config(SMALL)
            for peer in stores:
                index.add_peer(PeerRecord(peer, PEER_KIND_DIR, f"/nowhere/{peer}"))
        super().__init__(Keyring.from_master_secret(bytes(32)), index)
        self.stores = stores

    def store(self, peer_id: str) -> ShardStore:
        return self.stores[peer_id]


@attrs.define
class Slow:
    """A holder that takes ``delay`` seconds over the first ``slow_asks``
    audits of each shard (for ever, by default)."""

    inner: MemoryShardStore
    delay: float
    slow_asks: int = 1 << 30
    asks: dict[bytes, int] = attrs.field(factory=dict)

    async def audit(
        self, shard_id: bytes, nonce: bytes, indices: Sequence[int], block_size: int
    ) -> AuditProof:
        self.asks[shard_id] = self.asks.get(shard_id, 0) + 1
        if self.asks[shard_id] <= self.slow_asks:
            await trio.sleep(self.delay)
        return await self.inner.audit(shard_id, nonce, indices, block_size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def place_packs(repo: Repository, count: int, rng: random.Random) -> list[PackRecord]:
    """``count`` packs of random shards, one on every peer."""
    peers = [p.peer_id for p in repo.peers()]
    records = []
    for _ in range(count):
        pack_id = rng.randbytes(32)
        locations = []
        for index, peer in enumerate(peers):
            data = rng.randbytes(formats.SHARD_HEADER_SIZE + 20_000)
            root = merkle.merkle_root(data, 4096)
            await repo.store(peer).put(
                formats.shard_id(pack_id, index), data, ShardRoot(4096, root)
            )
            locations.append(ShardLocation(index, peer, root))
        record = PackRecord(pack_id, 40_000, 2, len(peers), 20_000, 4096, tuple(locations), ())
        with repo.index.transaction():
            repo.index.add_pack(record)
        records.append(record)
    return records


def virtual_now() -> float:
    return T0 + trio.current_time()


async def test_answers_past_the_deadline_are_asked_again_then_fail(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    stores: dict[str, Any] = {
        "steady": MemoryShardStore(),
        "slow": Slow(MemoryShardStore(), delay=20.0),  # past 15 s every time
        "late-once": Slow(MemoryShardStore(), delay=20.0, slow_asks=1),
        "late-thrice": Slow(MemoryShardStore(), delay=16.0, slow_asks=3),
        "in-time": Slow(MemoryShardStore(), delay=14.0),
    }
    repo = MemoryPeers(tmp_path / "index.sqlite", stores)
    await place_packs(repo, 3, random.Random(1))
    start = trio.current_time()
    report = await audit_once(repo, clock=virtual_now, rng=random.Random(2), policy=POLICY)
    by_peer = report.by_peer()
    (slow, *rest) = by_peer["slow"]
    assert slow.verdict.reason is FailureReason.TOO_SLOW and slow.asks == 4
    assert slow.verdict.detail == "no answer within 15 s, asked 4 times"
    # One slow shard per pass: the others wait, unanswered, for the next.
    assert [r.verdict.outcome for r in rest] == [Outcome.UNANSWERED] * 2
    assert [r.asks for r in by_peer["late-once"]] == [2, 2, 2]
    assert [r.asks for r in by_peer["late-thrice"]] == [4, 4, 4]
    assert all(
        r.verdict.passed
        for p in ("steady", "late-once", "late-thrice", "in-time")
        for r in by_peer[p]
    )
    # Peers are asked at once: the pass took as long as its slowest peer
    # (three shards asked four times each, 16 s then an answer), not the sum.
    assert trio.current_time() - start == pytest.approx(3 * (3 * 15.0 + 0.0), abs=1.0)
    standing = peer_standing(repo.index, "slow", now=int(virtual_now()))
    assert standing.failures == 1 and standing.last_failure.endswith("asked 4 times")
    # A slow peer does not count as seen by its silence.
    assert repo.index.last_seen()["slow"] == T0 + int(start)
    repo.index.close()


async def test_every_shard_is_audited_once_per_period(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    stores: dict[str, ShardStore] = {f"peer{i}": MemoryShardStore() for i in range(4)}
    repo = MemoryPeers(tmp_path / "index.sqlite", stores)
    await place_packs(repo, 10, random.Random(3))
    period = 24 * 3600.0
    reports: list[tuple[float, AuditReport]] = []
    policy = attrs.evolve(POLICY, period=period)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_audits(
                repo,
                clock=virtual_now,
                rng=random.Random(4),
                policy=policy,
                on_report=lambda report: reports.append((virtual_now(), report)),
                task_status=task_status,
            )
        )
        await trio.sleep(3.5 * period)
        nursery.cancel_scope.cancel()
    times: dict[tuple[bytes, int], list[float]] = {}
    for when, report in reports:
        assert report.failures == [] and report.unreachable == {}
        for result in report.results:
            times.setdefault((result.pack_id, result.index), []).append(when)
    assert len(times) == 40
    for key, seen in times.items():
        gaps = [b - a for a, b in zip([T0, *seen], [*seen, T0 + 3.5 * period], strict=True)]
        # Never more than a period (and a pass's wake-up slack) without an audit.
        assert max(gaps) <= period + auditor.MAX_SLEEP, (key, gaps)
        assert 3 <= len(seen) <= 7
    # Passes are small and many: the schedule spreads the shards over the period.
    assert len(reports) > 20 and max(len(r.results) for _, r in reports) < 20
    repo.index.close()
