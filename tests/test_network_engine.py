"""The engine over network peers: storage nodes on the in-memory network.

The same Backup and Restorer as on folder peers, each shard placed on a
storage node reached through a Noise session. Nodes die, go silent or lie;
backups finish as long as enough nodes answer, and restores route around the
rest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from p2pbackup.app import operations
from p2pbackup.app.home import Home
from p2pbackup.core import formats
from p2pbackup.engine import snapshots
from p2pbackup.engine.backup import Backup
from p2pbackup.engine.repository import Repository
from p2pbackup.engine.restore import Restorer, RestoreSummary
from p2pbackup.engine.treediff import diff_trees
from p2pbackup.errors import UsageError
from p2pbackup.net.memory import LinkProfile, MemoryNetwork
from p2pbackup.net.network import Address

from .engine_helpers import SMALL, make_tree, restored_path
from .net_helpers import RunningNode, start_node

PORT = 47470


@attrs.define
class Cluster:
    world: MemoryNetwork
    home: Home
    nodes: list[RunningNode]

    def repository(self) -> contextlib.AbstractAsyncContextManager[Repository]:
        return operations.open_repository(self.home, network=self.world.interface("owner"))


async def make_cluster(
    tmp_path: Path, nursery: trio.Nursery, *, nodes: int, k: int = 3, n: int = 6
) -> Cluster:
    world = MemoryNetwork(seed=7, default_link=LinkProfile(latency=0.0005), connect_timeout=0.5)
    running = []
    for i in range(nodes):
        host = f"node{i}"
        running.append(
            await start_node(
                nursery,
                world.interface(host),
                tmp_path / host,
                name=host,
                listen=Address(host, PORT),
            )
        )
    home = Home(tmp_path / "home")
    operations.init_home(home, attrs.evolve(SMALL, k=k, n=n))
    cluster = Cluster(world, home, running)
    async with cluster.repository() as repo:
        for node in running:
            await operations.add_node_peer(repo, str(node.address), node.identity.node_id.hex())
    return cluster


async def backup(cluster: Cluster, source: Path) -> None:
    async with cluster.repository() as repo:
        await Backup(repo).run([source])


async def restore(cluster: Cluster, target: Path) -> RestoreSummary:
    async with cluster.repository() as repo:
        _, snap = snapshots.resolve(repo.index, "latest")
        return await Restorer(repo, target).run(snap, None)


async def test_backup_and_restore_through_storage_nodes(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    cluster = await make_cluster(tmp_path, nursery, nodes=6)
    source = make_tree(tmp_path / "src")
    await backup(cluster, source)
    owner = cluster.home
    async with cluster.repository() as repo:
        owner_id = repo.keyring.node_id
        records = [repo.index.pack(p) for p in repo.index.pack_ids()]
    assert len(records) > 3
    for node in cluster.nodes:  # every node holds one shard of every pack
        shards, _more = node.host.list(owner_id, None, 10_000)
        assert len(shards) >= len(records)
    # Each host verified and keeps the very root the owner's index holds: the
    # one audits will be checked against.
    by_peer = {node.identity.node_id.hex(): node for node in cluster.nodes}
    for record in records:
        assert record is not None
        for location in record.shards:
            hosted = by_peer[location.peer_id].host.info(
                owner_id, formats.shard_id(record.pack_id, location.index)
            )
            assert hosted is not None
            assert (hosted.merkle_root, hosted.block_size) == (
                location.merkle_root,
                record.block_size,
            )
    summary = await restore(cluster, tmp_path / "out")
    assert summary.ok, summary.lines()
    assert diff_trees(source, restored_path(tmp_path / "out", source)) == []
    assert owner.exists()


async def test_a_dead_node_is_routed_around_on_backup_and_restore(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    cluster = await make_cluster(tmp_path, nursery, nodes=7)
    cluster.world.kill_host("node2")  # a crashed machine: connections time out
    source = make_tree(tmp_path / "src", big=5_000_000)
    await backup(cluster, source)
    # The dead node cost a timeout for the packs in flight when it was first
    # tried, not one for every pack.
    failed = cluster.world.statistics().connections_failed
    async with cluster.repository() as repo:
        assert len(repo.index.pack_ids()) > 15
        assert failed <= 4
        for pack_id in repo.index.pack_ids():
            record = repo.index.pack(pack_id)
            assert record is not None
            peers = [s.peer_id for s in record.shards]
            assert len(peers) == len(set(peers)) == 6  # the spare took node2's shards
            assert cluster.nodes[2].identity.node_id.hex() not in peers
    cluster.world.kill_host("node5")
    summary = await restore(cluster, tmp_path / "out")
    assert summary.ok, summary.lines()
    assert diff_trees(source, restored_path(tmp_path / "out", source)) == []


async def test_too_few_peers_names_those_that_are_only_offline(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    cluster = await make_cluster(tmp_path, nursery, nodes=3)
    cluster.world.kill_host("node1")  # a friend's machine switched off
    source = make_tree(tmp_path / "src")
    with pytest.raises(UsageError) as raised:
        await backup(cluster, source)
    message = str(raised.value)
    assert "storing needs at least 3 peers" in message and "2 usable" in message
    offline = cluster.nodes[1].identity.node_id.hex()
    assert f"1 more are offline: {offline}: " in message
    assert "\n" not in message


async def test_a_node_that_lies_about_shard_contents_is_routed_around(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    cluster = await make_cluster(tmp_path, nursery, nodes=6)
    source = make_tree(tmp_path / "src")
    await backup(cluster, source)
    liars = cluster.nodes[:3]  # n - k of them: each pack still has k honest shards
    served = []
    for liar in liars:
        honest_read = liar.host.read

        def lying_read(*args: Any, _read: Callable[..., bytes] = honest_read) -> bytes:
            data = bytearray(_read(*args))
            if data:
                data[len(data) // 2] ^= 0x55
            served.append(len(data))
            return bytes(data)

        liar.host.read = lying_read  # type: ignore[method-assign]
    summary = await restore(cluster, tmp_path / "out")
    assert summary.ok, summary.lines()
    assert diff_trees(source, restored_path(tmp_path / "out", source)) == []
    assert served, "the liars were asked and their answers were not used"


async def test_a_partitioned_node_fails_only_its_own_shards(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    cluster = await make_cluster(tmp_path, nursery, nodes=6)
    source = make_tree(tmp_path / "src")
    await backup(cluster, source)
    # The owner cannot reach three of six nodes: k=3 remain for every pack.
    cluster.world.partition(["owner", "node0", "node1", "node2"])
    summary = await restore(cluster, tmp_path / "out")
    assert summary.ok, summary.lines()
    assert diff_trees(source, restored_path(tmp_path / "out", source)) == []


async def test_two_nodes_on_one_host_never_hold_one_pack_twice_when_others_can(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    world = MemoryNetwork(seed=8, default_link=LinkProfile(latency=0.0005), connect_timeout=0.5)
    places = [("shared", PORT), ("shared", PORT + 1), ("other1", PORT), ("other2", PORT)]
    running = [
        await start_node(
            nursery,
            world.interface(host),
            tmp_path / f"{host}-{port}",
            name=f"{host}-{port}",
            listen=Address(host, port),
        )
        for host, port in places
    ]
    home = Home(tmp_path / "home")
    operations.init_home(home, attrs.evolve(SMALL, k=1, n=3))
    cluster = Cluster(world, home, running)
    async with cluster.repository() as repo:
        for node in running:
            await operations.add_node_peer(repo, str(node.address), node.identity.node_id.hex())
    await backup(cluster, make_tree(tmp_path / "src"))
    async with cluster.repository() as repo:
        host_of = {p.peer_id: p.location.split(":")[0] for p in repo.peers()}
        for pack_id in repo.index.pack_ids():
            record = repo.index.pack(pack_id)
            assert record is not None
            hosts = [host_of[s.peer_id] for s in record.shards]
            assert len(hosts) == 3 and len(set(hosts)) == 3, hosts
