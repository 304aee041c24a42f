"""The root pointer: where a home's root record is kept, found in the DHT.

A home's node publishes it (signed, naming the addresses of its storage
nodes, friends first); its friends store it again on the nodes now closest to
its key, so it outlives the home; ``recover --bootstrap`` follows it from
nothing but the recovery key and one DHT node's address. Also here: the ways
into the DHT that the owner's commands use (the daemon's running node, the
neighbours a node saves), on which recovering and relocating peers depend.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from p2pbackup.app import homedht, operations
from p2pbackup.app.home import Home
from p2pbackup.app.homedht import dht_locator, home_root_holders
from p2pbackup.core.keys import Keyring, node_id_for, parse_recovery_key
from p2pbackup.dht import adapter as dht
from p2pbackup.dht import records
from p2pbackup.dht.discovery import (
    SERVING_NODE,
    STATE_SAVE_PERIOD,
    Discovery,
    DiscoveryOptions,
    FriendContact,
    lookup_root_pointer,
    node_at,
)
from p2pbackup.engine.backup import Backup
from p2pbackup.engine.index import Index
from p2pbackup.errors import PeerUnavailableError, UsageError
from p2pbackup.model import PEER_KIND_DIR, PEER_KIND_NODE, FriendRecord, PeerRecord
from p2pbackup.net.memory import LinkProfile, MemoryNetwork
from p2pbackup.net.network import Address
from p2pbackup.wire.relay import Route
from p2pbackup.wire.session import Identity

from .engine_helpers import SMALL, make_tree
from .test_relocate import PORT, Friend, befriend, bob_and_carol, eventually, start

EPOCH = 1_800_000_000
DHT_PORT = 4000


def wall_clock() -> float:
    return EPOCH + trio.current_time()


def make_identity(name: str) -> Identity:
    seed = hashlib.blake2b(name.encode(), digest_size=32).digest()
    return Identity.from_secrets(seed, hashlib.blake2b(seed, digest_size=32).digest())


def record_address(host: str) -> records.RecordAddress:
    return records.RecordAddress.from_host_port(host, DHT_PORT)


@attrs.define
class Member:
    """One DHT node of the small world below, with its discovery role."""

    host: str
    identity: Identity
    discovery: Discovery | None = None
    scope: trio.CancelScope | None = None

    @property
    def node_id(self) -> bytes:
        return node_id_for(self.identity.signing_public)

    @property
    def dht(self) -> dht.DhtNode:
        assert self.discovery is not None
        return self.discovery.node


@contextlib.asynccontextmanager
async def discovery_of(
    world: MemoryNetwork, member: Member, **options: Any
) -> AsyncIterator[Discovery]:
    """``member``'s DHT node on the memory network and its discovery role
    (not yet run); ``options`` go to :class:`Discovery`."""
    async with dht.open_dht(
        world.interface(member.host),
        Address(member.host, DHT_PORT),
        node_id=member.node_id,
        wall_clock=wall_clock,
    ) as running:
        yield Discovery(running, member.identity, [record_address(member.host)], **options)


async def join(
    nursery: trio.Nursery,
    world: MemoryNetwork,
    member: Member,
    bootstrap: list[Address],
    *,
    friends: Sequence[FriendContact] = (),
    holders: Sequence[records.RecordAddress] = (),
    root_lifetime: int = 3600,
    state_path: Path | None = None,
) -> None:
    async def run(task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope() as scope:
            member.scope = scope
            async with discovery_of(
                world,
                member,
                options=DiscoveryOptions(
                    bootstrap=tuple(bootstrap), root_pointer_lifetime=root_lifetime
                ),
                friends=lambda: friends,
                root_holders=lambda: holders,
                state_path=state_path,
            ) as discovery:
                member.discovery = discovery
                await member.discovery.join()
                await member.discovery.publish()
                task_status.started()
                await trio.sleep_forever()

    await nursery.start(run)


async def test_friends_keep_the_pointer_alive_after_the_home_is_gone_until_it_expires(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    world = MemoryNetwork(seed=5, default_link=LinkProfile(latency=0.01))
    alice = Member("10.0.0.1", make_identity("alice"))
    key = records.dht_key(records.RecordKind.ROOT, alice.node_id)
    # Bob is the node closest to Alice's pointer key, so no newcomer is ever
    # closer than him: none gets the pointer handed over on joining, and a
    # lookup's repair reaches one node at most. Only Bob storing it again
    # puts it on every node now closest to the key.
    candidates = [make_identity(f"member {i}") for i in range(12)]
    target = int.from_bytes(key, "big")
    candidates.sort(key=lambda i: int.from_bytes(node_id_for(i.signing_public), "big") ^ target)
    bob = Member("10.0.0.2", candidates[0])
    newcomers = [Member(f"10.0.1.{i + 1}", ident) for i, ident in enumerate(candidates[1:5])]

    await join(nursery, world, bob, [], friends=[FriendContact(alice.node_id, ())])
    lifetime = 3600
    await join(
        nursery,
        world,
        alice,
        [Address(bob.host, DHT_PORT)],
        holders=[record_address(bob.host)],
        root_lifetime=lifetime,
    )
    assert alice.discovery is not None
    pointer = await alice.discovery.publish_root_pointer()
    assert pointer is not None and pointer.addresses == (record_address(bob.host),)
    assert bob.dht.storage.get(key) == records.encode_record(pointer)

    # Alice's house burns down; four nodes join after.
    assert alice.scope is not None
    alice.scope.cancel()
    for member in newcomers:
        await join(nursery, world, member, [Address(bob.host, DHT_PORT)])
    assert bob.discovery is not None
    await bob.discovery.follow_friends()
    for member in newcomers:
        assert member.dht.storage.get(key) == records.encode_record(pointer), member.host

    # Nobody can extend it: once its lifetime is over, it is gone everywhere.
    await trio.sleep(lifetime)
    await bob.discovery.follow_friends()
    for member in [bob, *newcomers]:
        assert await member.dht.lookup(records.RecordKind.ROOT, alice.node_id) is None


async def test_a_friend_keeps_the_pointer_on_disk_through_a_night_when_every_node_was_off(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    # DHT nodes hold records in memory: once every node has stopped, only
    # what a friend kept on disk can bring a lost home's pointer back.
    world = MemoryNetwork(seed=8, default_link=LinkProfile(latency=0.01))
    alice = Member("10.0.0.1", make_identity("alice"))
    bob = Member("10.0.0.2", make_identity("bob"))
    carol = Member("10.0.0.3", make_identity("carol"))
    state = tmp_path / "bob-dht-state.json"
    friends = [FriendContact(alice.node_id)]
    way_in = [Address(carol.host, DHT_PORT)]
    await join(nursery, world, carol, [])
    await join(nursery, world, bob, way_in, friends=friends, state_path=state)
    await join(
        nursery, world, alice, way_in, holders=[record_address(bob.host)], root_lifetime=86400
    )
    assert alice.discovery is not None and bob.discovery is not None
    pointer = await alice.discovery.publish_root_pointer()
    # Alice's house burns down; Bob finds her silent and keeps her pointer.
    for member in (alice, bob, carol):
        assert member.scope is not None
        member.scope.cancel()
        if member is alice:
            await trio.sleep(1)
            await bob.discovery.follow_friends()
            assert bob.discovery.kept_pointers == {alice.node_id: records.encode_record(pointer)}
            bob.discovery.save_state()  # as the running node does every few minutes
    await trio.sleep(8 * 3600)  # the night: every node off, the DHT empty
    bob, carol = Member(bob.host, bob.identity), Member(carol.host, carol.identity)
    await join(nursery, world, carol, [])
    await join(nursery, world, bob, way_in, friends=friends, state_path=state)
    assert await carol.dht.lookup(records.RecordKind.ROOT, alice.node_id) is None
    assert bob.discovery is not None
    await bob.discovery.follow_friends()
    assert await carol.dht.lookup(records.RecordKind.ROOT, alice.node_id) == pointer
    # Once it has expired, it is neither served nor kept.
    await trio.sleep(86400)
    await bob.discovery.follow_friends()
    assert await carol.dht.lookup(records.RecordKind.ROOT, alice.node_id) is None
    assert bob.discovery.kept_pointers == {}


async def test_the_pointer_is_published_again_when_its_holders_change(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    world = MemoryNetwork(seed=6, default_link=LinkProfile(latency=0.01))
    bob = Member("10.0.0.2", make_identity("bob"))
    await join(nursery, world, bob, [])
    holders: list[records.RecordAddress] = []
    alice = Member("10.0.0.1", make_identity("alice"))
    async with (
        discovery_of(
            world,
            alice,
            options=DiscoveryOptions(bootstrap=(Address(bob.host, DHT_PORT),)),
            root_holders=lambda: holders,
        ) as discovery,
        trio.open_nursery() as inner,
    ):
        await inner.start(discovery.run)
        await trio.sleep(1)
        # No holders yet: nothing to point at, so nothing is published.
        assert await bob.dht.lookup(records.RecordKind.ROOT, alice.node_id) is None
        holders.append(record_address("10.0.0.7"))
        await trio.sleep(60)
        # Only a hint makes it look before the refresh period is over.
        assert await bob.dht.lookup(records.RecordKind.ROOT, alice.node_id) is None
        discovery.root_holders_may_have_changed()
        await trio.sleep(1)
        found = await bob.dht.lookup(records.RecordKind.ROOT, alice.node_id)
        assert isinstance(found, records.RootPointer)
        assert found.addresses == (record_address("10.0.0.7"),)
        first = found.sequence
        # A hint with no change publishes nothing new.
        discovery.root_holders_may_have_changed()
        await trio.sleep(1)
        found = await bob.dht.lookup(records.RecordKind.ROOT, alice.node_id)
        assert isinstance(found, records.RootPointer) and found.sequence == first
        # The republish period pushes the expiry on, holders changed or not.
        await trio.sleep(discovery.options.republish_period)
        found = await bob.dht.lookup(records.RecordKind.ROOT, alice.node_id)
        assert isinstance(found, records.RootPointer) and found.sequence > first
        inner.cancel_scope.cancel()


def test_root_holders_are_the_node_peers_friends_first(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    operations.init_home(home, SMALL)
    friend = make_identity("friend")
    index = Index(home.index_path)
    try:
        with index.transaction():
            index.add_peer(PeerRecord("aa" * 20, PEER_KIND_NODE, "10.0.0.5:4000"))
            index.add_peer(PeerRecord("dir-peer", PEER_KIND_DIR, str(tmp_path / "disk")))
            # Where nobody can be reached: never in a pointer.
            index.add_peer(PeerRecord("bb" * 20, PEER_KIND_NODE, "0.0.0.0:4000"))
            index.add_peer(PeerRecord(friend.node_id.hex(), PEER_KIND_NODE, "[2001:db8::1]:4000"))
            index.add_friend(
                FriendRecord(friend.node_id, friend.signing_public, ("[2001:db8::1]:4000",), 0)
            )
    finally:
        index.close()
    assert home_root_holders(home) == [
        records.RecordAddress("2001:db8::1", 4000),
        records.RecordAddress("10.0.0.5", 4000),
    ]


async def test_recover_from_the_key_and_one_dht_address(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    world, bob, carol = await bob_and_carol(tmp_path, nursery, seed=11)
    alice = Friend(Home(tmp_path / "alice"), "owner-home")
    key = operations.init_home(alice.home, attrs.evolve(SMALL, k=1, n=2))
    network = world.interface(alice.host)
    await befriend(world, alice.home, [bob, carol])
    # Alice's node runs: it publishes her root pointer, naming Bob and Carol.
    await start(nursery, world, alice, (Address(bob.host, PORT),))
    tree = make_tree(tmp_path / "tree")
    async with operations.open_repository(alice.home, network=network) as repo:
        await Backup(repo).run([tree])
        friends_before = repo.index.friends()
    keyring = Keyring.from_master_secret(parse_recovery_key(key))

    async def published() -> bool:
        found = await lookup_root_pointer(
            homedht.remembered(Home(tmp_path / "nobody")),
            keyring.node_id,
            bootstrap=[Address(carol.host, PORT)],
            network=world.interface("lookup-host"),
        )
        return found is not None and len(found.addresses) == 2

    await eventually(published)
    # The house burns down: Alice's node is gone with her home.
    assert alice.scope is not None
    alice.scope.cancel()

    fresh = Home(tmp_path / "new-alice")
    summary = await operations.recover(
        fresh, key, [], [], bootstrap=[Address(carol.host, PORT)], network=network
    )
    assert summary.peers_reached == 2
    assert summary.snapshots == 1
    assert summary.packs_restorable == summary.packs > 0
    async with operations.open_repository(fresh, network=network) as repo:
        assert repo.index.friends() == friends_before

    # The recovered node serves from its new machine and resumes its place:
    # Carol finds it through the DHT (her node's saved neighbours are the way
    # in) and stores with it as with Alice before.
    await start(nursery, world, Friend(fresh, "new-machine"), (Address(bob.host, PORT),))
    async with operations.open_repository(carol.home, network=world.interface(carol.host)) as repo:
        store = repo.store(keyring.node_id.hex())
        await store.put(bytes(32), b"a shard of Carol's")
        assert await store.get(bytes(32)) == b"a shard of Carol's"
        assert {p.location for p in repo.peers() if p.peer_id == keyring.node_id.hex()} == {
            f"new-machine:{PORT}"
        }


async def test_recover_with_no_pointer_says_so_and_leaves_no_home(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    world, bob, _carol = await bob_and_carol(tmp_path, nursery, seed=12)
    lost = Home(tmp_path / "lost")
    key = operations.init_home(lost, SMALL)
    fresh = Home(tmp_path / "fresh")
    with pytest.raises(UsageError, match=r"no root pointer for node .* use --friend"):
        await operations.recover(
            fresh,
            key,
            [],
            [],
            bootstrap=[Address(bob.host, PORT)],
            network=world.interface("new-machine"),
        )
    assert not fresh.exists()


async def test_node_at_names_whoever_answers(tmp_path: Path, nursery: trio.Nursery) -> None:
    world, bob, _carol = await bob_and_carol(tmp_path, nursery, seed=13)
    network = world.interface("asker")
    asker = make_identity("asker")
    assert await node_at(network, asker, Address(bob.host, PORT)) == bob.home.node_id()
    with pytest.raises(PeerUnavailableError, match="nobody-home"):
        await node_at(network, asker, Address("nobody-home", PORT), timeout=2)


async def test_commands_in_the_daemon_look_nodes_up_through_its_running_node(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    world, bob, carol = await bob_and_carol(tmp_path, nursery, seed=14)
    lonely = Home(tmp_path / "lonely")
    operations.init_home(lonely, SMALL)  # no friends, no saved neighbours
    locate = dht_locator(lonely, world.interface("lonely-home"))
    with pytest.raises(UsageError, match="no way into the DHT"):
        await locate(bob.home.node_id())
    # Inside Carol's daemon the running node answers, joined long ago.
    assert carol.serving is not None and carol.serving.discovery is not None
    token = SERVING_NODE.set(carol.serving.discovery.node)
    try:

        async def found() -> bool:
            locate = dht_locator(lonely, world.interface("lonely-home"))
            return await locate(bob.home.node_id()) == [Route(Address(bob.host, PORT))]

        await eventually(found)  # once Bob's record is published
    finally:
        SERVING_NODE.reset(token)


async def test_a_node_that_started_alone_saves_the_neighbours_it_meets_later(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    world = MemoryNetwork(seed=8, default_link=LinkProfile(latency=0.01))
    first = Member("10.0.0.1", make_identity("first"))
    state = tmp_path / "dht-state.json"
    async with (
        discovery_of(world, first, state_path=state) as discovery,
        trio.open_nursery() as inner,
    ):
        await inner.start(discovery.run)
        await trio.sleep(1)
        assert dht.load_routing_state(state, first.node_id) == []
        second = Member("10.0.0.2", make_identity("second"))
        await join(nursery, world, second, [Address(first.host, DHT_PORT)])
        # Long before the hour's refresh, the newcomer is on disk.
        await trio.sleep(STATE_SAVE_PERIOD)
        saved = dht.load_routing_state(state, first.node_id)
        assert [c.node_id for c in saved] == [second.node_id]
        inner.cancel_scope.cancel()
