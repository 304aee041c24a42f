"""Repair as a delegate: the owner away, a peer lost, and a friend holding
the owner's grant rebuilds the lost shards in the owner's namespace, with
no key of the owner's."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio

from p2pbackup.app import operations
from p2pbackup.app.home import Home
from p2pbackup.core import delegation, formats
from p2pbackup.core.keys import Keyring
from p2pbackup.engine.backup import Backup
from p2pbackup.maintenance import delegated, grants
from p2pbackup.maintenance.repair import RepairPolicy
from p2pbackup.maintenance.repairer import RepairOptions
from p2pbackup.net.memory import LinkProfile, MemoryNetwork
from p2pbackup.net.network import Address
from p2pbackup.node.server import StorageServer
from p2pbackup.node.shardhost import ShardHost
from p2pbackup.wire.session import Identity

from .engine_helpers import SMALL

PORT = 47470
NODES = ("bob", "carol", "dave", "erin", "frank")


@attrs.define
class World:
    world: MemoryNetwork
    alice: Home
    homes: dict[str, Home]
    hosts: dict[str, ShardHost]

    def keyring(self, name: str) -> Keyring:
        home = self.alice if name == "alice" else self.homes[name]
        return Keyring.from_master_secret(home.load_secret())


def new_home(root: Path, name: str) -> Home:
    home = Home(root / name)
    operations.init_home(home, attrs.evolve(SMALL, k=2, n=3))
    return home


@pytest.fixture
async def world(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[World]:
    net = MemoryNetwork(seed=5, default_link=LinkProfile(latency=0.0005), connect_timeout=0.5)
    alice = new_home(tmp_path, "alice")
    homes, hosts = {}, {}
    for name in NODES:
        home = homes[name] = new_home(tmp_path, name)
        host = hosts[name] = ShardHost.open(home.hosted_path)
        keyring = Keyring.from_master_secret(home.load_secret())
        server = StorageServer(host, Identity.from_keyring(keyring))
        await nursery.start(
            net.interface(name).serve, Address(name, PORT), server.handle_connection
        )
    world = World(net, alice, homes, hosts)
    async with operations.open_repository(alice, network=net.interface("alice")) as repo:
        for name in NODES:
            node_id = world.keyring(name).node_id.hex()
            await operations.add_node_peer(repo, f"{name}:{PORT}", node_id)
    yield world
    for host in hosts.values():
        host.close()


async def test_a_delegate_rebuilds_what_a_lost_peer_held(world: World, tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for i in range(3):
        (source / f"file-{i}").write_bytes(bytes([i]) * 90_000)
    alice_id = world.keyring("alice").node_id
    bob = world.keyring("bob")
    async with operations.open_repository(
        world.alice, network=world.world.interface("alice")
    ) as repo:
        await Backup(repo).run([source])
        with repo.index.transaction():
            repo.index.add_delegate(bob.node_id, 1)
        [handed] = await grants.hand_grants(repo)
        assert handed.ok
    # The owner's home is gone now; so is carol, with the shards it held.
    held = world.hosts["bob"].held_grant(alice_id)
    assert held is not None
    grant = delegation.open_grant(held.grant, owner=alice_id)
    carol = world.keyring("carol").node_id
    lost = [
        (pack, s)
        for pack in grant.packs
        for s in pack.shards
        if grant.peers[s.peer].node_id == carol
    ]
    assert lost
    world.world.kill_host("carol")

    index = delegated.open_grant_index(tmp_path / "grant.sqlite", grant)
    try:
        result = await delegated.repair_for(
            bob,
            index,
            held.certificate,
            world.world.interface("bob"),
            RepairOptions(policy=RepairPolicy(grace=0), rate=None),
        )
        assert result.repair.ok, result.repair.lines()
        assert result.repair.shards_rebuilt == len(lost)
        # The leases of every shard on a live node are renewed, by the delegate.
        live_shards = sum(
            1 for pack in grant.packs for s in pack.shards if grant.peers[s.peer].node_id != carol
        )
        assert result.leases.renewed == live_shards + len(lost)
        assert result.leases.unanswered == []  # no shard row is on carol any more
        # The grant index knows where the shards went; a second pass has
        # nothing to do.
        again = await delegated.repair_for(
            bob,
            index,
            held.certificate,
            world.world.interface("bob"),
            RepairOptions(policy=RepairPolicy(grace=0), rate=None),
        )
        assert again.repair.shards_rebuilt == 0
    finally:
        index.close()

    # Every lost shard is back on a live node, in alice's namespace, with
    # the root the owner recorded for it.
    live = {name: host for name, host in world.hosts.items() if name != "carol"}
    for pack, shard in lost:
        sid = formats.shard_id(pack.pack_id, shard.index)
        roots = [
            info.merkle_root
            for host in live.values()
            if (info := host.info(alice_id, sid)) is not None
        ]
        assert roots == [shard.merkle_root]
    # Nothing landed in the delegate's own namespace.
    for host in live.values():
        assert host.list(bob.node_id, None, 10)[0] == []


async def test_a_delegate_without_a_good_certificate_changes_nothing(
    world: World, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "file").write_bytes(b"x" * 50_000)
    alice = world.keyring("alice")
    async with operations.open_repository(
        world.alice, network=world.world.interface("alice")
    ) as repo:
        await Backup(repo).run([source])
        grant = grants.build_grant(repo.index, alice.node_id, sequence=1, now=1)
    world.world.kill_host("carol")
    live = [host for name, host in world.hosts.items() if name != "carol"]
    before = [host.list(alice.node_id, None, 1000)[0] for host in live]
    # A certificate for someone else: every node refuses the delegate.
    other = delegation.issue_certificate(
        alice.identity_seed, world.keyring("dave").node_id, now=int(time.time())
    )
    index = delegated.open_grant_index(tmp_path / "grant.sqlite", grant)
    try:
        result = await delegated.repair_for(
            world.keyring("bob"),
            index,
            other,
            world.world.interface("bob"),
            RepairOptions(policy=RepairPolicy(grace=0), rate=None),
        )
    finally:
        index.close()
    assert result.repair.shards_rebuilt == 0 and not result.repair.ok
    assert [host.list(alice.node_id, None, 1000)[0] for host in live] == before
