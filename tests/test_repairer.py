"""Repair passes over storage nodes on the memory network.

Nodes die, sleep, come back and rot; a pass rebuilds what is gone onto
nodes that hold none of the pack, the index and the root record follow,
and the data restores from the rebuilt shards alone.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from p2pbackup.app import operations
from p2pbackup.app.home import Home
from p2pbackup.core import formats, keys
from p2pbackup.engine import rootrecord, shards
from p2pbackup.engine.index import ShardShortfall
from p2pbackup.engine.repository import Repository
from p2pbackup.engine.treediff import diff_trees
from p2pbackup.maintenance.repair import RepairPolicy
from p2pbackup.maintenance.repairer import RepairOptions, evacuate, repair_pass
from p2pbackup.model import FriendRecord, PackRecord

from .engine_helpers import make_tree, restored_path
from .net_helpers import RunningNode
from .test_network_engine import Cluster, backup, make_cluster, restore

FAST = RepairOptions(rate=None)
NOW_LOST = RepairOptions(policy=RepairPolicy(grace=0), rate=None)


def records(repo: Repository) -> list[PackRecord]:
    found = []
    for pack_id in repo.index.pack_ids():
        record = repo.index.pack(pack_id, with_blobs=False)
        assert record is not None
        found.append(record)
    return found


def node_ids(cluster: Cluster, names: list[str]) -> set[str]:
    return {node.identity.node_id.hex() for node in cluster.nodes if node.address.host in names}


def node_with_id(cluster: Cluster, peer_id: str) -> RunningNode:
    return next(node for node in cluster.nodes if node.identity.node_id.hex() == peer_id)


def corrupt_every_shard(root: Path) -> int:
    count = 0
    for path in root.glob("shards/*/*/*"):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x5A
        path.write_bytes(bytes(data))
        count += 1
    return count


def test_rebuilt_shards_are_the_originals_byte_for_byte() -> None:
    data = bytes(range(256)) * 1000
    k, n, block = 3, 6, 4096
    payloads, roots, shard_size = shards.encode_pack([data], len(data), k, n, block)
    record = PackRecord(b"p" * 32, len(data), k, n, shard_size, block, (), ())
    head = formats.SHARD_HEADER_SIZE
    good = {i: bytes(payloads[i][head:]) for i in (1, 3, 5)}
    rebuilt = shards.rebuild_shards(record, good, [0, 2, 4])
    for index in (0, 2, 4):
        assert rebuilt[index].payload == bytes(payloads[index])
        assert rebuilt[index].root == roots[index]


async def test_a_pass_rebuilds_lost_shards_on_new_nodes_and_they_restore(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    cluster = await make_cluster(tmp_path, nursery, nodes=9)
    source = make_tree(tmp_path / "src")
    await backup(cluster, source)
    dead = ["node0", "node1"]
    for host in dead:
        cluster.world.kill_host(host)
    dead_ids = node_ids(cluster, dead)
    async with cluster.repository() as repo:
        before = {r.pack_id: r for r in records(repo)}
        sequence = repo.index.root_sequence()
        # Just seen: within the grace period, the dead nodes are only away,
        # and every pack keeps 4 healthy shards of 6: it waits for them.
        waited = await repair_pass(repo, FAST)
        assert waited.ok and waited.shards_rebuilt == 0
        assert len(waited.waiting) == sum(
            1 for r in before.values() if {s.peer_id for s in r.shards} & dead_ids
        )
        assert repo.index.root_sequence() == sequence

        report = await repair_pass(repo, NOW_LOST)
        assert report.ok, report.lines()
        assert report.shards_rebuilt > 0 and report.repaired
        assert not report.limited and not report.waiting
        owner = repo.keyring.node_id
        by_peer = {node.identity.node_id.hex(): node for node in cluster.nodes}
        for record in records(repo):
            peers = [s.peer_id for s in record.shards]
            assert len(peers) == len(set(peers)) == record.n
            assert not set(peers) & dead_ids
            old = before.get(record.pack_id)  # None: the new index segment
            for location in record.shards:
                # Rebuilt shards are the originals, byte for byte: same roots.
                if old is not None:
                    assert location.merkle_root == old.shards[location.index].merkle_root
                hosted = by_peer[location.peer_id].host.info(
                    owner, formats.shard_id(record.pack_id, location.index)
                )
                assert hosted is not None and hosted.merkle_root == location.merkle_root
        # The moved shards are remembered as displaced copies on the dead nodes.
        displaced = repo.index.displaced()
        assert {c.location.peer_id for cs in displaced.values() for c in cs} == dead_ids
        # Repair traffic is counted per peer and day.
        traffic = repo.index.traffic()
        assert sum(t.sent for t in traffic) == report.bytes_sent > 0
        assert sum(t.received for t in traffic) == report.bytes_received > 0
        assert {t.purpose for t in traffic} == {"repair"}
        # So are the shards moved: off the dead nodes, onto the new holders.
        counts = repo.index.repair_counts()
        assert sum(c.moved_off for c in counts.values()) == report.shards_rebuilt
        assert sum(c.placed for c in counts.values()) == report.shards_rebuilt
        assert {p for p, c in counts.items() if c.moved_off} == dead_ids
        assert {p for p, c in counts.items() if c.placed} == report.new_holders
        # The root record went to every node, the new holders among them,
        # and it names the index packs where their shards are now.
        sequence = repo.index.root_sequence()
        index_packs = {r.pack_id: r for r in records(repo) if repo.index.is_index_pack(r.pack_id)}
        for holder in report.new_holders:
            envelope = by_peer[holder].host.get_root(owner)
            assert envelope is not None
            root = rootrecord.open_root_record(repo.keyring, envelope)
            assert root.sequence == sequence
            assert {p.pack_id: p.shards for p in root.index_packs} == {
                p: r.shards for p, r in index_packs.items()
            }
    # Three more nodes die: k of 6 remain for every pack, rebuilt ones included.
    for host in ["node2", "node3", "node4"]:
        cluster.world.kill_host(host)
    summary = await restore(cluster, tmp_path / "out")
    assert summary.ok, summary.lines()
    assert diff_trees(source, restored_path(tmp_path / "out", source)) == []


async def test_a_returning_node_counts_again_and_its_surplus_goes_later(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    cluster = await make_cluster(tmp_path, nursery, nodes=8)
    await backup(cluster, make_tree(tmp_path / "src"))
    everyone = [node.address.host for node in cluster.nodes]
    async with cluster.repository() as repo:
        # The node holding the most shards goes away, so that several are
        # moved and their new holders are more than one node.
        held = Counter(s.peer_id for r in records(repo) for s in r.shards)
        away_id = max(held, key=lambda peer_id: (held[peer_id], peer_id))
        away = node_with_id(cluster, away_id).address.host
        cluster.world.partition(["owner", *[h for h in everyone if h != away]])
        report = await repair_pass(repo, NOW_LOST)
        assert report.ok and report.shards_rebuilt > 0
        moved = {
            (pack_id, c.location.index)
            for pack_id, cs in repo.index.displaced().items()
            for c in cs
            if c.location.peer_id == away_id
        }
        assert moved
        # The node comes back; a new holder of its old shards dies. The
        # returning copies are counted again instead of being rebuilt.
        cluster.world.heal()
        replaced = Counter(
            s.peer_id for r in records(repo) for s in r.shards if (r.pack_id, s.index) in moved
        )
        # The new holder of the fewest, so that some moved shards stay
        # healthy elsewhere and their returning copies are surplus.
        fewest = min(replaced, key=lambda peer_id: (replaced[peer_id], peer_id))
        assert replaced[fewest] < len(moved)
        victim = node_with_id(cluster, fewest)
        cluster.world.kill_host(victim.address.host)
        victim_id = victim.identity.node_id.hex()
        lost_there = {
            (r.pack_id, s.index) for r in records(repo) for s in r.shards if s.peer_id == victim_id
        }
        back = await repair_pass(repo, NOW_LOST)
        assert back.ok, back.lines()
        returned = lost_there & moved
        assert returned
        assert back.shards_reinstated >= len(returned)
        for record in records(repo):
            for location in record.shards:
                if (record.pack_id, location.index) in returned:
                    assert location.peer_id == away_id
        # Surplus copies on the returned node (indices whose new holder is
        # fine) stay for a while, then go.
        surplus = moved - returned
        assert surplus
        kept = await repair_pass(repo, FAST)
        assert kept.shards_deleted == 0
        later = await repair_pass(repo, FAST, now=time.time() + 4 * 86400)
        assert later.shards_deleted >= len(surplus)
        held, _ = await repo.list_held([away_id])
        for pack_id, index in surplus:
            assert formats.shard_id(pack_id, index) not in held[away_id]
        assert not any(
            c.location.peer_id == away_id and (p, c.location.index) in surplus
            for p, cs in repo.index.displaced().items()
            for c in cs
        )


async def test_read_verification_finds_corrupt_shards_and_rebuilds_them(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    cluster = await make_cluster(tmp_path, nursery, nodes=7)
    source = make_tree(tmp_path / "src")
    await backup(cluster, source)
    rotten = cluster.nodes[2]
    assert corrupt_every_shard(tmp_path / "node2") > 0
    rotten_id = rotten.identity.node_id.hex()
    async with cluster.repository() as repo:
        listed = await repair_pass(repo, FAST)
        assert listed.shards_rebuilt == 0  # the listing alone sees nothing wrong
        report = await repair_pass(repo, attrs.evolve(FAST, verify=True))
        assert report.ok, report.lines()
        assert report.shards_failed > 0
        assert report.shards_verified > 0
        for record in records(repo):
            assert len({s.peer_id for s in record.shards}) == record.n
    # The rotten node's shards were deleted and rebuilt (some perhaps on it
    # again): with every other node but k gone, data still restores.
    for node in cluster.nodes:
        if node.identity.node_id.hex() != rotten_id and node.address.host in ("node0", "node1"):
            cluster.world.kill_host(node.address.host)
    summary = await restore(cluster, tmp_path / "out")
    assert summary.ok, summary.lines()
    assert diff_trees(source, restored_path(tmp_path / "out", source)) == []


async def test_evacuate_moves_a_peers_shards_and_asks_it_to_delete_them(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    cluster = await make_cluster(tmp_path, nursery, nodes=8)
    await backup(cluster, make_tree(tmp_path / "src"))
    leaving = cluster.nodes[3]
    leaving_id = leaving.identity.node_id.hex()
    async with cluster.repository() as repo:
        held = repo.index.shard_count_by_peer()[leaving_id]
        report = await evacuate(repo, leaving_id, FAST)
        assert report.shards_rebuilt == held
        assert report.shards_deleted >= held
        assert leaving_id not in repo.index.shard_count_by_peer()
        shards, _more = leaving.host.list(repo.keyring.node_id, None, 10_000)
        # Only the root record may be left there, and a new index pack never goes there.
        assert shards == []


@pytest.fixture
def virtual_clock() -> trio.testing.MockClock:
    """Virtual time that jumps once the run is idle for a moment of real
    time, so that the storage nodes' worker threads finish first."""
    return trio.testing.MockClock(autojump_threshold=0.02)


async def _inline_run_sync(function: Callable[..., Any], *args: Any, **_: Any) -> Any:
    await trio.lowlevel.checkpoint()
    return function(*args)


async def test_the_rate_limit_holds_in_virtual_time(
    tmp_path: Path,
    nursery: trio.Nursery,
    virtual_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The backup runs with real worker threads, under a clock that waits a
    # whole second of real time before it jumps (a loaded machine is slow);
    # the repair with the threads' work inline, where it may jump at once.
    virtual_clock.autojump_threshold = 1.0
    cluster = await make_cluster(tmp_path, nursery, nodes=8)
    await backup(cluster, make_tree(tmp_path / "src", big=3_000_000))
    cluster.world.kill_host("node0")
    monkeypatch.setattr(trio.to_thread, "run_sync", _inline_run_sync)
    virtual_clock.autojump_threshold = 0
    rate = 50_000.0
    burst = 1 << 20
    async with cluster.repository() as repo:
        shard = max(formats.SHARD_HEADER_SIZE + r.shard_size for r in records(repo))
        started = trio.current_time()
        report = await repair_pass(repo, attrs.evolve(NOW_LOST, rate=rate))
        elapsed = trio.current_time() - started
    moved = report.bytes_sent + report.bytes_received
    assert report.ok and report.shards_rebuilt > 0
    assert moved > burst + 4 * shard  # enough that the rate has to bite
    # Every byte beyond the first burst waited for its turn; the last
    # transfer booked may start before it ends.
    assert elapsed >= (moved - burst - shard) / rate, (elapsed, moved)


async def test_a_home_recovered_after_a_repair_finds_the_moved_shards(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    cluster = await make_cluster(tmp_path, nursery, nodes=9)
    source = make_tree(tmp_path / "src")
    await backup(cluster, source)
    dead = ["node0", "node1"]
    for host in dead:
        cluster.world.kill_host(host)
    async with cluster.repository() as repo:
        report = await repair_pass(repo, NOW_LOST)
        assert report.ok and report.shards_rebuilt > 0
        repaired = {r.pack_id: r.shards for r in records(repo)}
    # The old index segment and the repair's new one disagree on where the
    # moved shards are: the peers' listings settle it.
    key = keys.format_recovery_key(cluster.home.load_secret())
    fresh = Home(tmp_path / "fresh")
    live = cluster.nodes[4]
    summary = await operations.recover(
        fresh,
        key,
        [],
        [(str(live.address), live.identity.node_id.hex())],
        network=cluster.world.interface("owner"),
    )
    assert summary.packs_restorable == summary.packs == len(repaired), summary.lines()
    recovered = Cluster(cluster.world, fresh, cluster.nodes)
    async with recovered.repository() as repo:
        assert {r.pack_id: r.shards for r in records(repo)} == repaired
    for host in ["node2", "node3", "node5"]:
        cluster.world.kill_host(host)
    summary_restore = await restore(recovered, tmp_path / "out")
    assert summary_restore.ok, summary_restore.lines()
    assert diff_trees(source, restored_path(tmp_path / "out", source)) == []


async def test_friend_remove_rebuilds_its_shards_elsewhere_before_forgetting_it(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    cluster = await make_cluster(tmp_path, nursery, nodes=8)
    source = make_tree(tmp_path / "src")
    await backup(cluster, source)
    friend = cluster.nodes[3]
    friend_id = friend.identity.node_id
    async with cluster.repository() as repo:
        with repo.index.transaction():
            repo.index.add_friend(
                FriendRecord(friend_id, friend.identity.signing_public, (str(friend.address),), 0)
            )
        held = repo.index.shard_count_by_peer()[friend_id.hex()]
        removed = await operations.remove_friend(repo, friend_id.hex()[:8])
        assert (removed.shards_rebuilt, removed.shards_forgotten) == (held, 0)
        assert removed.shards_deleted >= held
        assert removed.shortfall == ShardShortfall(below_n=0, below_k=0)
        assert removed.warnings == ()
        assert repo.index.friend(friend_id) is None
        assert friend_id.hex() not in {p.peer_id for p in repo.peers()}
        shards, _more = friend.host.list(repo.keyring.node_id, None, 10_000)
        assert shards == []
    # Without it and two more nodes, every pack still has k shards.
    for host in [friend.address.host, "node0", "node1"]:
        cluster.world.kill_host(host)
    summary = await restore(cluster, tmp_path / "out")
    assert summary.ok, summary.lines()
    assert diff_trees(source, restored_path(tmp_path / "out", source)) == []
