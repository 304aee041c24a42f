"""Repair as a delegate: the owner away, a peer lost, and a friend holding
the owner's grant rebuilds the lost shards in the owner's namespace, with
no key of the owner's."""

from __future__ import annotations

import functools
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio

from p2pbackup.app import delegating, operations
from p2pbackup.app.home import Home
from p2pbackup.core import delegation, formats, keys
from p2pbackup.core.keys import Keyring
from p2pbackup.engine.backup import Backup
from p2pbackup.engine.index import Index
from p2pbackup.engine.restore import Restorer
from p2pbackup.maintenance import delegated, grants
from p2pbackup.maintenance.repair import RepairPolicy
from p2pbackup.maintenance.repairer import RepairOptions
from p2pbackup.model import GrantPack, GrantShard, RepairGrant, ShardLocation
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
    servers: dict[str, StorageServer]

    def keyring(self, name: str) -> Keyring:
        home = self.alice if name == "alice" else self.homes[name]
        return Keyring.from_master_secret(home.load_secret())


def new_home(root: Path, name: str) -> Home:
    home = Home(root / name)
    operations.init_home(home, attrs.evolve(SMALL, k=2, n=3))
    return home


def placed_of(
    placed: dict[tuple[bytes, int], str], pack: GrantPack, shard: GrantShard
) -> tuple[int, str, bytes]:
    return shard.index, placed[pack.pack_id, shard.index], shard.merkle_root


def repair_log(home: Home, seed: bytes, owner: bytes) -> bytes | None:
    """What ``serve`` answers an owner's GetRepairLog with (app.daemon)."""
    path = delegated.grant_index_path(home.path, owner)
    return delegated.sealed_log(path, seed, owner, int(time.time()))


@pytest.fixture
async def world(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[World]:
    net = MemoryNetwork(seed=5, default_link=LinkProfile(latency=0.0005), connect_timeout=0.5)
    alice = new_home(tmp_path, "alice")
    homes, hosts, servers = {}, {}, {}
    for name in NODES:
        home = homes[name] = new_home(tmp_path, name)
        host = hosts[name] = ShardHost.open(home.hosted_path)
        keyring = Keyring.from_master_secret(home.load_secret())
        server = servers[name] = StorageServer(
            host,
            Identity.from_keyring(keyring),
            repair_log=functools.partial(repair_log, home, keyring.identity_seed),
        )
        await nursery.start(
            net.interface(name).serve, Address(name, PORT), server.handle_connection
        )
    world = World(net, alice, homes, hosts, servers)
    async with operations.open_repository(alice, network=net.interface("alice")) as repo:
        for name in NODES:
            node_id = world.keyring(name).node_id.hex()
            await operations.add_node_peer(repo, f"{name}:{PORT}", node_id)
    yield world
    for host in hosts.values():
        host.close()


def busiest_holder(
    world: World, grant: RepairGrant, packs: list[GrantPack], besides: set[str]
) -> str:
    """The node, ``besides`` aside, holding the most shards of ``packs``.

    Placement follows node ids, which are new keys in every run: a node
    picked by name may hold nothing of a few packs."""
    held = {
        name: sum(
            1
            for p in packs
            for s in p.shards
            if grant.peers[s.peer].node_id == world.keyring(name).node_id
        )
        for name in NODES
        if name not in besides
    }
    busiest = max(held, key=lambda name: held[name])
    assert held[busiest] > 0
    return busiest


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
    # The owner's home is gone now; so is a peer, with the shards it held.
    held = world.hosts["bob"].held_grant(alice_id)
    assert held is not None
    grant = delegation.open_grant(held.grant, owner=alice_id)
    gone = busiest_holder(world, grant, list(grant.packs), besides={"bob"})
    gone_id = world.keyring(gone).node_id
    lost = [
        (pack, s)
        for pack in grant.packs
        for s in pack.shards
        if grant.peers[s.peer].node_id == gone_id
    ]
    world.world.kill_host(gone)

    path = delegated.grant_index_path(world.homes["bob"].path, alice_id)
    path.parent.mkdir()
    index, _grant = delegated.open_grant_index(path, held.grant, alice_id)
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
            1 for pack in grant.packs for s in pack.shards if grant.peers[s.peer].node_id != gone_id
        )
        assert result.leases.renewed == live_shards + len(lost)
        assert result.leases.unanswered == []  # no shard row is on the lost peer any more
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
    live = {name: host for name, host in world.hosts.items() if name != gone}
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

    # Alice comes back and reads bob's log: her index finds the new shards.
    network = world.world.interface("alice")
    async with operations.open_repository(world.alice, network=network) as repo:
        taken, warnings = await grants.read_back(repo)
        assert (taken, warnings) == (len(lost), [])
        assert (await grants.read_back(repo))[0] == 0  # nothing new the second time
        placed = {
            (pack_id, s.index): s.peer_id
            for pack_id in repo.index.pack_ids()
            for s in repo.index.pack(pack_id, with_blobs=False).shards  # type: ignore[union-attr]
        }
        assert all(placed[p.pack_id, s.index] != gone_id.hex() for p, s in lost)
        # Alice hands out a new grant; the log bob keeps follows the older
        # one, so it no longer moves anything back, whatever alice does.
        [handed] = await grants.hand_grants(repo)
        assert handed.ok
        pack, shard = lost[0]
        elsewhere = ShardLocation(shard.index, "elsewhere", shard.merkle_root)
        with repo.index.transaction():
            repo.index.set_shard(pack.pack_id, elsewhere)
        assert await grants.read_back(repo) == (0, [])
        record = repo.index.pack(pack.pack_id, with_blobs=False)
        assert record is not None and elsewhere in record.shards
        with repo.index.transaction():
            repo.index.set_shard(pack.pack_id, ShardLocation(*placed_of(placed, pack, shard)))
    # Now the node that shared most packs with the lost peer dies too:
    # without the log, those packs would have one shard left that alice
    # knows of.
    packs = [p for p, _s in lost]
    world.world.kill_host(busiest_holder(world, grant, packs, besides={"bob", gone}))
    target = tmp_path / "restored"
    async with operations.open_repository(world.alice, network=network) as repo:
        [(_sid, snapshot)] = repo.index.snapshots()
        summary = await Restorer(repo, target).run(snapshot)
    assert summary.unrecoverable == [] and summary.failed == []
    for i in range(3):
        restored = target / str(source.absolute()).lstrip("/") / f"file-{i}"
        assert restored.read_bytes() == bytes([i]) * 90_000


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
        sealed = delegation.seal_grant(alice.identity_seed, grant)
    world.world.kill_host("carol")
    live = [host for name, host in world.hosts.items() if name != "carol"]
    before = [host.list(alice.node_id, None, 1000)[0] for host in live]
    # A certificate for someone else: every node refuses the delegate.
    other = delegation.issue_certificate(
        alice.identity_seed, world.keyring("dave").node_id, now=int(time.time())
    )
    index, _grant = delegated.open_grant_index(tmp_path / "grant.sqlite", sealed, alice.node_id)
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


def test_delegates_step_in_one_at_a_time_in_node_id_order() -> None:
    first, second, stranger = b"\x01" * 20, b"\x02" * 20, b"\x03" * 20
    grant = RepairGrant(b"\x09" * 20, 1, 1000, (), (), (second, first))
    grant = attrs.evolve(grant, delegates=(first, second))
    grace = 3 * 86400.0
    assert delegated.turn_at(grant, first, None, grace) == 1000 + grace
    assert delegated.turn_at(grant, second, None, grace) == 1000 + grace + delegated.STAGGER
    assert delegated.turn_at(grant, stranger, None, grace) == 1000 + grace + 2 * delegated.STAGGER
    # Seen since the grant: the grace period runs from then.
    assert delegated.turn_at(grant, first, 5000, grace) == 5000 + grace
    assert delegated.turn_at(grant, first, 10, grace) == 1000 + grace


async def test_serve_repairs_for_an_owner_away_past_its_grace(world: World, tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "file").write_bytes(b"y" * 200_000)
    alice_id = world.keyring("alice").node_id
    bob, dave = world.keyring("bob"), world.keyring("dave")
    async with operations.open_repository(
        world.alice, network=world.world.interface("alice")
    ) as repo:
        await Backup(repo).run([source])
        with repo.index.transaction():
            repo.index.add_delegate(bob.node_id, 1)
            repo.index.add_delegate(dave.node_id, 1)
        assert all(h.ok for h in await grants.hand_grants(repo))
    held = world.hosts["bob"].held_grant(alice_id)
    assert held is not None
    grant = delegation.open_grant(held.grant, owner=alice_id)
    world.world.kill_host(busiest_holder(world, grant, list(grant.packs), {"bob", "dave"}))
    options = RepairOptions(policy=RepairPolicy(grace=0), rate=None)
    # Alice's node is nowhere to be reached, and the grace period is over:
    # the first delegate in node id order repairs now, the other waits a day.
    first, second = sorted([("bob", bob), ("dave", dave)], key=lambda item: item[1].node_id)
    for (name, keyring), expected in ((second, 0), (first, 1)):
        acted = await delegating.owners_round(
            world.homes[name],
            world.world.interface(name),
            Identity.from_keyring(keyring),
            options,
        )
        assert len(acted) == expected
    [done] = acted
    assert done.owner == alice_id and done.report.repair.ok
    assert done.report.repair.shards_rebuilt > 0
    # Round after round, only the shards due on the audit schedule are
    # audited (few, a minute on); a forced pass (repair --for) audits all.
    name, keyring = first
    soon_now = time.time() + 60
    index = Index(delegated.grant_index_path(world.homes[name].path, alice_id), create=False)
    try:
        placed = len(index.placed_shards())
        due = {key for key, audit in index.shard_audits().items() if audit.due_at <= soon_now}
    finally:
        index.close()
    assert len(due) < placed
    [soon] = await delegating.owners_round(
        world.homes[name],
        world.world.interface(name),
        Identity.from_keyring(keyring),
        options,
        clock=lambda: soon_now,
        rng=random.Random(1),
    )
    assert {(r.pack_id, r.index) for r in soon.report.audit.results} <= due
    _grant, forced = await delegating.repair_for_owner(
        world.homes[name], alice_id, options, network=world.world.interface(name)
    )
    assert len(forced.audit.results) > len(due)
    assert len(forced.audit.results) >= done.report.repair.shards_rebuilt > 0
    # A day later the second one's turn comes: the packs are healthy.
    later = time.time() + delegated.STAGGER + 60
    name, keyring = second
    [again] = await delegating.owners_round(
        world.homes[name],
        world.world.interface(name),
        Identity.from_keyring(keyring),
        options,
        clock=lambda: later,
    )
    assert again.report.repair.shards_rebuilt == 0


async def test_a_home_recovered_from_its_key_finds_what_its_delegate_moved(
    world: World, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for i in range(3):
        (source / f"file-{i}").write_bytes(bytes([i]) * 90_000)
    alice, bob = world.keyring("alice"), world.keyring("bob")
    async with operations.open_repository(
        world.alice, network=world.world.interface("alice")
    ) as repo:
        await Backup(repo).run([source])
        with repo.index.transaction():
            repo.index.add_delegate(bob.node_id, 1)
        await repo.publish_root()  # the root record names bob now
        [handed] = await grants.hand_grants(repo)
        assert handed.ok
    held = world.hosts["bob"].held_grant(alice.node_id)
    assert held is not None
    grant = delegation.open_grant(held.grant, owner=alice.node_id)
    # Alice's machine is gone; a peer dies, and bob repairs for alice.
    gone = busiest_holder(world, grant, list(grant.packs), besides={"bob"})
    world.world.kill_host(gone)
    path = delegated.grant_index_path(world.homes["bob"].path, alice.node_id)
    path.parent.mkdir()
    index, _grant = delegated.open_grant_index(path, held.grant, alice.node_id)
    try:
        result = await delegated.repair_for(
            bob,
            index,
            held.certificate,
            world.world.interface("bob"),
            RepairOptions(policy=RepairPolicy(grace=0), rate=None),
        )
    finally:
        index.close()
    assert result.repair.shards_rebuilt > 0
    # Then the node holding most of what the lost peer shared dies too:
    # every pack both held has one of its first shards left, fewer than k = 2.
    gone_id = world.keyring(gone).node_id
    shared = [
        p for p in grant.packs if any(grant.peers[s.peer].node_id == gone_id for s in p.shards)
    ]
    world.world.kill_host(busiest_holder(world, grant, shared, besides={"bob", gone}))

    # A new machine, the recovery key and bob's address: the root record
    # names bob as a delegate, and his log says where the shards are now.
    fresh = Home(tmp_path / "fresh")
    summary = await operations.recover(
        fresh,
        keys.format_recovery_key(world.alice.load_secret()),
        [],
        [(f"bob:{PORT}", bob.node_id.hex())],
        network=world.world.interface("alice"),
    )
    assert summary.delegated_moves == result.repair.shards_rebuilt
    assert summary.packs_restorable == summary.packs == len(grant.packs)
    target = tmp_path / "restored"
    async with operations.open_repository(fresh, network=world.world.interface("alice")) as repo:
        assert [row.node_id for row in repo.index.delegates()] == [bob.node_id]
        [(_sid, snapshot)] = repo.index.snapshots()
        restore = await Restorer(repo, target).run(snapshot)
    assert restore.unrecoverable == [] and restore.failed == []
    for i in range(3):
        restored = target / str(source.absolute()).lstrip("/") / f"file-{i}"
        assert restored.read_bytes() == bytes([i]) * 90_000
