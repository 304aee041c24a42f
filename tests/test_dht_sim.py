"""A 100-node DHT in one process, on the memory network, in virtual time.

Every node runs the same :class:`~p2pbackup.dht.discovery.Discovery` that
``p2pbackup serve`` runs, over the in-memory network with latency and loss,
under ``MockClock``: refresh periods of an hour pass in milliseconds.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator

import attrs
import pytest
import trio
import trio.testing

from p2pbackup.core.keys import node_id_for
from p2pbackup.dht import adapter as dht
from p2pbackup.dht import records
from p2pbackup.dht.discovery import Discovery, DiscoveryOptions, FriendContact
from p2pbackup.net.memory import LinkProfile, MemoryNetwork
from p2pbackup.net.network import Address
from p2pbackup.wire.session import Identity

pytestmark = pytest.mark.slow

#: Virtual wall clock: unix seconds at trio time 0.
EPOCH = 1_800_000_000
PORT = 4000
REFRESH = 600.0
NODES = int(__import__("os").environ.get("SIM_NODES", "100"))
FRIENDS_PER_NODE = 3


def wall_clock() -> float:
    return EPOCH + trio.current_time()


def make_identity(index: int, generation: int = 0) -> Identity:
    seed = hashlib.blake2b(f"dht-sim {index} {generation}".encode(), digest_size=32).digest()
    transport = hashlib.blake2b(seed, digest_size=32, person=b"x25519").digest()
    return Identity.from_secrets(seed, transport)


@attrs.define
class SimNode:
    index: int
    identity: Identity
    host: str
    friends: list[FriendContact]
    dht: dht.DhtNode | None = None
    discovery: Discovery | None = None
    cancel: trio.CancelScope | None = None

    @property
    def node_id(self) -> bytes:
        return node_id_for(self.identity.signing_public)

    @property
    def address(self) -> Address:
        return Address(self.host, PORT)


class World:
    def __init__(self, nursery: trio.Nursery, seed: int = 7) -> None:
        self.nursery = nursery
        self.network = MemoryNetwork(seed=seed, default_link=LinkProfile(latency=0.02, loss=0.01))
        self.random = random.Random(seed)
        self.nodes: list[SimNode] = []

    def friends_of(self, node: SimNode) -> list[FriendContact]:
        return node.friends

    async def start(self, node: SimNode, bootstrap: list[Address]) -> None:
        async def run(task_status: trio.TaskStatus[None]) -> None:
            with trio.CancelScope() as scope:
                node.cancel = scope
                async with dht.open_dht(
                    self.network.interface(node.host),
                    Address("0.0.0.0", PORT),
                    node_id=node.node_id,
                    wall_clock=wall_clock,
                ) as running:
                    node.dht = running
                    node.discovery = Discovery(
                        running,
                        node.identity,
                        [records.RecordAddress.from_host_port(node.host, PORT)],
                        options=DiscoveryOptions(
                            refresh_period=REFRESH, bootstrap=tuple(bootstrap)
                        ),
                        friends=lambda: node.friends,
                    )
                    await node.discovery.join()
                    await node.discovery.publish()
                    task_status.started()
                    async with trio.open_nursery() as roles:
                        roles.start_soon(self._refresh_loop, node.discovery)

        await self.nursery.start(run)

    @staticmethod
    async def _refresh_loop(discovery: Discovery) -> None:
        # Discovery.run without its first join and publish, done above.
        while True:
            await trio.sleep(REFRESH)
            await discovery.node.refresh()
            await discovery.publish()
            await discovery.follow_friends()

    def stop(self, node: SimNode) -> None:
        assert node.cancel is not None
        node.cancel.cancel()


@pytest.fixture
async def world(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> AsyncIterator[World]:
    w = World(nursery)
    rng = w.random
    for index in range(NODES):
        host = f"10.0.{index // 200}.{index % 200 + 1}"
        w.nodes.append(SimNode(index, make_identity(index), host, []))
    for node in w.nodes:
        others = [n for n in w.nodes if n is not node]
        node.friends = [
            FriendContact(f.node_id, (f.address,)) for f in rng.sample(others, FRIENDS_PER_NODE)
        ]
    for index, node in enumerate(w.nodes):
        # Each node joins through one node already there, as a newcomer would.
        bootstrap = [w.nodes[rng.randrange(index)].address] if index else []
        await w.start(node, bootstrap)
    yield w
    nursery.cancel_scope.cancel()


def contact_key(node_id: bytes) -> bytes:
    return records.dht_key(records.RecordKind.CONTACT, node_id)


@pytest.mark.slow
async def test_every_node_finds_every_other_nodes_contact_record(
    world: World, autojump_clock: trio.testing.MockClock
) -> None:
    # Nodes that joined early published into a smaller network; one refresh
    # period later every owner has republished into the whole of it (records
    # handed to newcomers in passing can be lost to the 1% datagram loss).
    await trio.sleep(REFRESH + 60)
    missing: list[tuple[int, int]] = []
    found = 0

    async def look_up_all(source: SimNode) -> None:
        nonlocal found
        assert source.dht is not None
        for target in world.nodes:
            if target is source:
                continue
            record = await source.dht.find_contact(target.node_id)
            if record is None or record.addresses[0].host != target.host:
                missing.append((source.index, target.index))
            else:
                found += 1

    async with trio.open_nursery() as lookups:
        for node in world.nodes:
            lookups.start_soon(look_up_all, node)
    assert missing == []
    assert found == NODES * (NODES - 1)
    # No node was refused or confused by an honest peer.
    assert sum(n.dht.malformed for n in world.nodes if n.dht) == 0


async def test_a_node_that_moves_is_found_at_its_new_address_within_one_refresh_period(
    world: World, autojump_clock: trio.testing.MockClock
) -> None:
    mover = world.nodes[10]
    friends = [world.nodes[i] for i in (20, 30, 40)]
    for friend in friends:
        friend.friends.append(FriendContact(mover.node_id, (mover.address,)))
    # Everyone has followed everyone at least once (the mover answering at
    # the address its friends have on record, mostly without a lookup).
    await trio.sleep(REFRESH + 60)

    world.stop(mover)
    await trio.sleep(30)
    old_host = mover.host
    mover.host = "10.9.0.1"  # a new IP from the provider
    await world.start(mover, [world.nodes[0].address])
    moved_at = trio.current_time()

    def all_follow() -> bool:
        return all(
            f.discovery is not None
            and mover.node_id in f.discovery.followed
            and f.discovery.followed[mover.node_id].addresses[0].host == mover.host
            for f in friends
        )

    while not all_follow() and trio.current_time() - moved_at < 2 * REFRESH:
        await trio.sleep(10)
    assert all_follow(), old_host
    assert trio.current_time() - moved_at <= REFRESH + 10


def closest_nodes(world: World, key: bytes, count: int) -> list[SimNode]:
    target = int.from_bytes(key, "big")
    return sorted(world.nodes, key=lambda n: int.from_bytes(n.node_id, "big") ^ target)[:count]


class LyingStorage:
    """A DHT node's storage that serves ``bad`` for ``key``, whatever it holds."""

    def __init__(self, honest: dht.RecordStorage, key: bytes, bad: bytes) -> None:
        self.honest = honest
        self.key = key
        self.bad = bad

    def get(self, key: bytes, default: bytes | None = None) -> bytes | None:
        return self.bad if key == self.key else self.honest.get(key, default)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.honest)


def bad_records(victim: SimNode) -> dict[str, bytes]:
    """Values a liar may serve for the victim's contact record."""
    assert victim.discovery is not None and victim.discovery.contact is not None
    current = victim.discovery.contact
    now = int(wall_clock())
    elsewhere = [records.RecordAddress.from_host_port("10.66.6.6", PORT)]
    attacker = make_identity(999)
    forged = attrs.evolve(
        records.sign_contact(
            attacker.signing_seed,
            addresses=elsewhere,
            storage_offered=0,
            sequence=current.sequence + 1000,
            now=now,
            lifetime=3600,
        ),
        node_id=victim.node_id,
    )
    older = records.sign_contact(
        victim.identity.signing_seed,
        addresses=elsewhere,
        storage_offered=0,
        sequence=current.sequence - 1,
        now=now,
        lifetime=3600,
    )
    expired = records.sign_contact(
        victim.identity.signing_seed,
        addresses=elsewhere,
        storage_offered=0,
        sequence=current.sequence + 1000,
        now=now - 7200,
        lifetime=3600,
    )
    return {
        "signed with another key": records.encode_record(forged),
        "older sequence": records.encode_record(older),
        "expired": records.encode_record(expired),
    }


async def test_forged_stale_and_expired_records_lose_even_to_a_lying_majority(
    world: World, autojump_clock: trio.testing.MockClock
) -> None:
    await trio.sleep(5)
    victim = world.nodes[50]
    assert victim.discovery is not None and victim.discovery.contact is not None
    key = contact_key(victim.node_id)
    closest = [n for n in closest_nodes(world, key, 21) if n is not victim][:20]
    liars = closest[:14]  # most of the k closest, the ones a lookup asks
    lookers = [n for n in world.nodes if n not in closest and n is not victim][:10]
    for kind, bad in bad_records(victim).items():
        for liar in liars:
            assert liar.dht is not None
            protocol = liar.dht._protocol
            protocol.storage = LyingStorage(protocol.record_storage, key, bad)
        for looker in lookers:
            assert looker.dht is not None
            looker.dht.storage._values.pop(key, None)  # no help from its own cache
            record = await looker.dht.find_contact(victim.node_id)
            assert record is not None, kind
            assert record == victim.discovery.contact, kind
    # What liars served was never stored by an honest node either.
    for node in world.nodes:
        if node.dht is not None and node not in liars:
            held = node.dht.storage.get(key)
            assert held is None or records.decode_record(held) == victim.discovery.contact


async def test_keeping_a_record_stores_it_on_every_closest_node_that_lost_it(
    world: World, autojump_clock: trio.testing.MockClock
) -> None:
    await trio.sleep(5)
    owner = world.nodes[60]
    assert owner.discovery is not None and owner.discovery.contact is not None
    key = contact_key(owner.node_id)
    closest = [n for n in closest_nodes(world, key, 21) if n is not owner][:20]
    keeper = next(n for n in world.nodes if n not in closest and n is not owner)
    assert keeper.dht is not None
    # No datagram lost from here on: every one of the closest answers.
    world.network.default_link = LinkProfile(latency=0.02)
    # Half the closest nodes lost it (they restarted, say); the keeper holds
    # an older record of its own.
    for node in closest[::2]:
        assert node.dht is not None
        node.dht.storage._values.pop(key, None)
    older = records.sign_contact(
        owner.identity.signing_seed,
        addresses=owner.discovery.contact.addresses,
        storage_offered=0,
        sequence=owner.discovery.contact.sequence - 1,
        now=int(wall_clock()),
        lifetime=3600,
    )
    lacking = [n for n in closest if n.dht is not None and n.dht.storage.get(key) is None]
    sent: list[str] = []
    protocol = keeper.dht._protocol
    request = protocol._request

    def counting(name: str, *args: object) -> object:
        sent.append(name)
        return request(name, *args)

    protocol._request = counting
    kept = await keeper.dht.keep(
        records.RecordKind.CONTACT, owner.node_id, [records.encode_record(older)]
    )
    assert kept == owner.discovery.contact
    for node in closest:
        assert node.dht is not None
        held = node.dht.storage.get(key)
        assert held is not None and records.decode_record(held) == kept
    # One search, then a store on each node that lacked the record, no more.
    assert "find_node" not in sent
    assert sent.count("store") == len(lacking)
