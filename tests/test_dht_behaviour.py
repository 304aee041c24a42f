"""DHT nodes talking over the memory network: the behaviour between two or
three of them that the unit tests cannot show and the 100-node simulation
does not single out."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import trio
import trio.testing
import umsgpack

from p2pbackup.core.keys import node_id_for
from p2pbackup.dht import adapter as dht
from p2pbackup.dht import records
from p2pbackup.dht.discovery import (
    FOLLOW_RECHECK,
    Discovery,
    DiscoveryOptions,
    FriendContact,
    read_only_client,
)
from p2pbackup.dht.ratelimit import RateLimit
from p2pbackup.errors import PeerUnavailableError
from p2pbackup.net.memory import LinkProfile, MemoryNetwork
from p2pbackup.net.network import Address
from p2pbackup.wire.session import Identity

EPOCH = 1_800_000_000
PORT = 4000


def wall_clock() -> float:
    return EPOCH + trio.current_time()


def identity(name: str) -> Identity:
    seed = hashlib.blake2b(name.encode(), digest_size=32).digest()
    return Identity.from_secrets(seed, hashlib.blake2b(seed, digest_size=32).digest())


def node_id(name: str) -> bytes:
    return node_id_for(identity(name).signing_public)


@contextlib.asynccontextmanager
async def running(
    world: MemoryNetwork, host: str, name: str | None, **options: object
) -> AsyncIterator[dht.DhtNode]:
    async with dht.open_dht(
        world.interface(host),
        Address(host, PORT),
        node_id=None if name is None else node_id(name),
        wall_clock=wall_clock,
        options=dht.DhtOptions(**options),  # type: ignore[arg-type]
    ) as node:
        yield node


def world() -> MemoryNetwork:
    return MemoryNetwork(seed=1, default_link=LinkProfile(latency=0.01))


def contact(name: str, host: str, sequence: int = 1) -> records.ContactRecord:
    return records.sign_contact(
        identity(name).signing_seed,
        addresses=[records.RecordAddress.from_host_port(host, PORT)],
        storage_offered=1,
        sequence=sequence,
        now=int(wall_clock()),
        lifetime=3600,
    )


async def test_a_read_only_client_is_answered_but_never_remembered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    w = world()
    async with running(w, "10.0.0.1", "a") as a, running(w, "10.0.0.2", "b") as b:
        await b.bootstrap([a.local_address])
        assert await b.publish(contact("b", "10.0.0.2"))
        async with running(w, "10.0.0.9", None) as client:
            assert client.node_id == dht.READ_ONLY_ID
            assert await client.bootstrap([a.local_address]) == 2
            found = await client.find_contact(node_id("b"))
            assert found is not None and found.addresses[0].host == "10.0.0.2"
        # Neither node put the client in its routing table, so no lookup will
        # ever wait on it now that it is gone.
        for node in (a, b):
            assert dht.READ_ONLY_ID not in {c.node_id for c in node.contacts()}
            assert "10.0.0.9" not in {c.address.host for c in node.contacts()}


async def test_a_read_only_client_that_no_node_answers_names_each_address_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    w = world()
    here, there = Address("10.0.0.5", PORT), Address("10.0.0.6", PORT)
    friend = FriendContact(node_id("f"), (here, there))
    with pytest.raises(PeerUnavailableError) as raised:
        async with read_only_client(
            None, bootstrap=[here], friends=[friend], network=w.interface("10.0.0.9")
        ):
            pass
    assert str(raised.value) == "no DHT node answered at 10.0.0.5:4000, 10.0.0.6:4000"


async def test_a_known_id_at_a_new_address_replaces_the_old_only_if_that_is_gone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    w = world()
    async with running(w, "10.0.0.1", "a") as a:
        async with running(w, "10.0.0.2", "b") as b:
            await b.bootstrap([a.local_address])
            assert {c.address.host for c in a.contacts()} == {"10.0.0.2"}
            # Someone else claims b's id from another host while b still answers.
            async with running(w, "10.6.6.6", "b") as impostor:
                await impostor.bootstrap([a.local_address])
                await trio.sleep(10)
                assert {c.address.host for c in a.contacts()} == {"10.0.0.2"}
        # b is gone; the same id speaking from a new host is the node, moved.
        async with running(w, "10.0.0.3", "b") as moved:
            await moved.bootstrap([a.local_address])
            await trio.sleep(10)
            assert [(c.node_id, c.address.host) for c in a.contacts()] == [
                (node_id("b"), "10.0.0.3")
            ]


async def test_one_flooding_host_is_cut_off_and_others_are_still_served(
    autojump_clock: trio.testing.MockClock,
) -> None:
    w = world()
    limit = RateLimit(rate=10.0, burst=20.0)
    async with running(w, "10.0.0.1", "a", rate_limit=limit) as a:
        flood = await w.interface("10.6.6.6").open_datagram(Address("10.6.6.6", 5000))
        ping = b"\x00" + bytes(20) + umsgpack.packb(["ping", [bytes(20)]])
        for _ in range(200):
            await flood.send(ping, a.local_address)
        answers = 0
        with trio.move_on_after(1):
            while True:
                await flood.receive()
                answers += 1
        assert answers == 20  # the burst, then nothing
        assert a.limiter.refused == 180
        async with running(w, "10.0.0.2", "b") as b:
            assert await b.bootstrap([a.local_address]) == 1  # a stranger still gets in
        await flood.aclose()


async def test_one_host_cannot_fill_a_nodes_record_table(
    autojump_clock: trio.testing.MockClock,
) -> None:
    storage = dht.RecordStorage(wall_clock, max_records=1000, max_keys_per_source=3)
    names = [f"n{i}" for i in range(5)]
    accepted = [
        storage.offer(
            records.dht_key(records.RecordKind.CONTACT, node_id(name)),
            records.encode_record(contact(name, "10.0.0.5")),
            source="10.6.6.6",
        )
        for name in names
    ]
    assert accepted == [True, True, True, False, False]
    # Updates to keys it brought still pass, and other hosts are not affected.
    newer = contact("n0", "10.0.0.7", sequence=2)
    assert storage.offer(
        records.dht_key(records.RecordKind.CONTACT, node_id("n0")),
        records.encode_record(newer),
        source="10.6.6.6",
    )
    assert storage.offer(
        records.dht_key(records.RecordKind.CONTACT, node_id("n4")),
        records.encode_record(contact("n4", "10.0.0.5")),
        source="10.0.0.2",
    )
    # Once its records expire, the host's allowance comes back.
    await trio.sleep(3601)
    assert storage.offer(
        records.dht_key(records.RecordKind.CONTACT, node_id("n3")),
        records.encode_record(contact("n3", "10.0.0.5")),
        source="10.6.6.6",
    )


# --- one network is one source: an IPv4 /24, an IPv6 /64 ------------------------------------


@functools.cache
def many_records(count: int) -> list[tuple[bytes, bytes]]:
    """``count`` valid records under distinct keys, as (DHT key, bytes): a
    contact record and a root pointer for each of count / 2 identities."""
    made = []
    where = [records.RecordAddress.from_host_port("10.0.0.5", PORT)]
    for index in range((count + 1) // 2):
        seed = hashlib.blake2b(f"filler {index}".encode(), digest_size=32).digest()
        for record in (
            records.sign_contact(
                seed, addresses=where, storage_offered=0, sequence=1, now=EPOCH, lifetime=3600
            ),
            records.sign_root_pointer(seed, addresses=where, sequence=1, now=EPOCH, lifetime=3600),
        ):
            key = records.dht_key(records.record_kind(record), record.node_id)
            made.append((key, records.encode_record(record)))
    return made[:count]


def offer_all(storage: dht.RecordStorage, offers: list[tuple[str, tuple[bytes, bytes]]]) -> int:
    """Offer each (source host, record); how many the storage took."""
    return sum(storage.offer(key, value, source=host) for host, (key, value) in offers)


def test_many_addresses_of_one_network_are_one_source() -> None:
    storage = dht.RecordStorage(lambda: EPOCH)
    share = dht.DEFAULT_MAX_KEYS_PER_SOURCE
    filler = iter(many_records(3 * (share + 50) + 2))
    # Every datagram from another address: of one /24, of one /64, and of
    # that /24 again seen through a dual-stack socket.
    ipv4 = [(f"198.51.100.{i % 254 + 1}", next(filler)) for i in range(share + 50)]
    ipv6 = [(f"2001:db8:7:7::{i + 1:x}", next(filler)) for i in range(share + 50)]
    mapped = [(f"::ffff:198.51.100.{i % 254 + 1}", next(filler)) for i in range(share + 50)]
    assert offer_all(storage, ipv4) == share
    assert offer_all(storage, ipv6) == share
    assert offer_all(storage, mapped) == 0  # the /24 had its share already
    # The neighbouring networks are sources of their own.
    key, value = next(filler)
    assert storage.offer(key, value, source="198.51.101.1")
    key, value = next(filler)
    assert storage.offer(key, value, source="2001:db8:7:8::1")


def test_it_takes_40_networks_to_fill_a_nodes_record_table() -> None:
    share = dht.DEFAULT_MAX_KEYS_PER_SOURCE
    assert math.ceil(dht.DEFAULT_MAX_RECORDS / share) == 40  # as docs/discovery.md says
    storage = dht.RecordStorage(lambda: EPOCH)
    filler = iter(many_records(dht.DEFAULT_MAX_RECORDS + share + 1))
    # 39 networks, each sending its whole share from addresses all over its /24.
    for network in range(39):
        offers = [(f"10.{network}.7.{i % 254 + 1}", next(filler)) for i in range(share)]
        assert offer_all(storage, offers) == share
    # Room is left for others: a record from anywhere else is still taken...
    key, value = next(filler)
    assert storage.offer(key, value, source="192.0.2.1")
    # ...until a 40th network fills the table; then new keys wait for expiry.
    offers = [(f"10.39.7.{i % 254 + 1}", next(filler)) for i in range(share)]
    assert offer_all(storage, offers) == dht.DEFAULT_MAX_RECORDS - 39 * share - 1
    assert storage.count == dht.DEFAULT_MAX_RECORDS
    key, value = next(filler)
    assert not storage.offer(key, value, source="192.0.2.1")


async def test_a_flood_from_many_addresses_of_one_network_gets_one_burst(
    autojump_clock: trio.testing.MockClock,
) -> None:
    w = world()
    limit = RateLimit(rate=10.0, burst=20.0)
    ping = b"\x00" + bytes(20) + umsgpack.packb(["ping", [bytes(20)]])
    async with running(w, "10.0.0.1", "a", rate_limit=limit) as a:
        for hosts in (
            [f"10.6.6.{i + 1}" for i in range(50)],
            [f"2001:db8:6:6::{i + 1:x}" for i in range(50)],
        ):
            flood = [await w.interface(host).open_datagram(Address(host, 5000)) for host in hosts]
            for endpoint in flood:
                await endpoint.send(ping, a.local_address)
            answers = 0
            for endpoint in flood:
                with trio.move_on_after(1):
                    await endpoint.receive()
                    answers += 1
                await endpoint.aclose()
            assert answers == 20  # one burst for the whole network
        assert a.limiter.refused == 2 * 30
        async with running(w, "10.6.7.1", "b") as b:
            assert await b.bootstrap([a.local_address]) == 1  # the next /24 is served


# --- reflection and amplification: what one datagram can make a node do --------------------


def shared_bits(a: bytes, b: bytes) -> int:
    """Leading bits ``a`` and ``b`` have in common (160 if equal)."""
    return 160 - (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).bit_length()


def flip_bit(node: bytes, bit: int) -> bytes:
    """``node`` with its ``bit``-th bit from the top flipped."""
    return (int.from_bytes(node, "big") ^ (1 << (159 - bit))).to_bytes(20, "big")


@contextlib.contextmanager
def records_examined(storage: dht.RecordStorage, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Count every record ``storage`` looks at (each passes ``_live``)."""
    seen = {"count": 0}
    live = dht.RecordStorage._live

    def counting(self: dht.RecordStorage, key: bytes, now: int) -> bytes | None:
        if self is storage:
            seen["count"] += 1
        return live(self, key, now)

    monkeypatch.setattr(dht.RecordStorage, "_live", counting)
    yield seen


async def fill(storage: dht.RecordStorage, count: int) -> None:
    for key, value in many_records(count):
        assert storage.offer(key, value)


async def test_a_ping_from_an_unverified_source_draws_no_more_than_it_sent(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = world()
    async with running(w, "10.0.0.1", "a") as a, running(w, "10.0.0.2", "b") as b:
        await b.bootstrap([a.local_address])
        await fill(a.storage, 2000)
        # Ids chosen so that a newcomer would be owed as many of a's records
        # as can be: right next to a's own id, and at random.
        crafted = [flip_bit(a.node_id, 159), flip_bit(a.node_id, 1)]
        crafted += [hashlib.blake2b(bytes([i]), digest_size=20).digest() for i in range(30)]
        with records_examined(a.storage, monkeypatch) as examined:
            for index, claimed in enumerate(crafted):
                host = f"10.66.{index}.1"  # each from a network of its own
                victim = await w.interface(host).open_datagram(Address(host, 5000))
                ping = b"\x00" + bytes(20) + umsgpack.packb(["ping", [claimed]])
                await victim.send(ping, a.local_address)
                received = 0
                with trio.move_on_after(60):
                    while True:
                        data, _ = await victim.receive()
                        received += len(data)
                assert 0 < received <= len(ping), (index, received)
                await victim.aclose()
        # Work bounded by what was asked, not by what the node holds.
        assert examined["count"] == 0


def newcomer_of(
    w: MemoryNetwork, host: str, node: bytes
) -> contextlib.AbstractAsyncContextManager[dht.DhtNode]:
    """A DHT node with the id ``node`` (chosen, as an attacker may)."""
    return dht.open_dht(w.interface(host), Address(host, PORT), node_id=node, wall_clock=wall_clock)


async def test_a_verified_newcomer_gets_the_records_it_should_hold_within_bounds(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = world()
    async with running(w, "10.0.0.1", "a") as a:
        await fill(a.storage, 2000)
        held = dict(a.storage)
        newcomer = flip_bit(a.node_id, 150)
        # What Kademlia's replication owes the newcomer: the records it is
        # closer to than a, while a knows no node closer than itself (a
        # knows no other node here).
        own, new = int.from_bytes(a.node_id, "big"), int.from_bytes(newcomer, "big")
        owed = {k for k in held if new ^ int.from_bytes(k, "big") < own ^ int.from_bytes(k, "big")}
        assert len(owed) > dht.MAX_HANDOVER_RECORDS
        async with newcomer_of(w, "10.0.0.9", newcomer) as n:
            with records_examined(a.storage, monkeypatch) as examined:
                # The newcomer joins through a: its requests prove nothing
                # about its address, so a answers them and hands over nothing.
                assert await n.bootstrap([a.local_address]) == 1
                await trio.sleep(10)
                assert n.storage.count == 0
                assert examined["count"] == 0
                # a asks the newcomer something, and it answers: verified.
                assert await a.bootstrap([n.local_address]) == 1
                await trio.sleep(10)
                assert 0 < examined["count"] <= dht.MAX_HANDOVER_EXAMINED
            handed = dict(n.storage)
            assert set(handed) <= owed
            assert len(handed) == dht.MAX_HANDOVER_RECORDS
            assert sum(len(v) for v in handed.values()) <= dht.MAX_HANDOVER_BYTES
            # Nearest first: nothing owed and left behind is nearer the newcomer.
            nearest_left = max(shared_bits(newcomer, k) for k in owed - set(handed))
            assert min(shared_bits(newcomer, k) for k in handed) >= nearest_left
            # Once only: asked again, it is not new any more.
            assert await a.bootstrap([n.local_address]) == 1
            await trio.sleep(10)
            assert n.storage.count == len(handed)


async def test_a_verified_newcomer_gets_every_record_owed_when_they_are_few(
    autojump_clock: trio.testing.MockClock,
) -> None:
    w = world()
    async with running(w, "10.0.0.1", "a") as a:
        await fill(a.storage, 40)
        newcomer = flip_bit(a.node_id, 0)  # the far half of the id space
        own, new = int.from_bytes(a.node_id, "big"), int.from_bytes(newcomer, "big")
        owed = {
            k
            for k, _ in a.storage
            if new ^ int.from_bytes(k, "big") < own ^ int.from_bytes(k, "big")
        }
        assert 0 < len(owed) < dht.MAX_HANDOVER_RECORDS
        async with newcomer_of(w, "10.0.0.9", newcomer) as n:
            assert await a.bootstrap([n.local_address]) == 1
            await trio.sleep(10)
            assert {k for k, _ in n.storage} == owed


# --- failing soft: contacts that vanish, and bugs in background work ------------------------


async def test_publishing_when_no_contact_answers_reports_false_and_keeps_a_copy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The package's set_digest takes max() of the nodes its crawl found, and
    # raises when none answered; that ended `serve`.
    w = world()
    async with running(w, "10.0.0.1", "a") as a:
        async with running(w, "10.0.0.2", "b") as b:
            await a.bootstrap([b.local_address])
        assert [c.address.host for c in a.contacts()] == ["10.0.0.2"]  # b is gone, not yet missed
        record = contact("a", "10.0.0.1")
        assert not await a.publish(record)
        key = records.dht_key(records.RecordKind.CONTACT, node_id("a"))
        assert a.storage.get(key) == records.encode_record(record)


def discovery_of(node: dht.DhtNode, name: str, **options: Any) -> Discovery:
    host = node.local_address.host
    return Discovery(
        node, identity(name), [records.RecordAddress.from_host_port(host, PORT)], **options
    )


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_record_nobody_took_is_published_again_with_backoff(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    w = world()
    holders = [records.RecordAddress.from_host_port("10.0.0.7", PORT)]
    key = records.dht_key(records.RecordKind.ROOT, node_id("a"))
    caplog.set_level(logging.INFO)
    async with running(w, "10.0.0.1", "a") as a, trio.open_nursery() as nursery:
        async with running(w, "10.0.0.2", "b") as b:
            discovery = discovery_of(
                a,
                "a",
                options=DiscoveryOptions(bootstrap=(b.local_address,)),
                root_holders=lambda: holders,
            )
            await nursery.start(discovery.run)
            await trio.sleep(5)
            assert b.storage.get(key) is not None
        # a's only contact is gone; its holders change.
        holders.append(records.RecordAddress.from_host_port("10.0.0.8", PORT))
        discovery.root_holders_may_have_changed()
        await trio.sleep(5)
        assert "DHT: no node took this node's root pointer; trying again in 30 s" in warnings(
            caplog
        )
        await trio.sleep(30)
        assert warnings(caplog)[-1].endswith("trying again in 60 s")
        # b comes back (empty-handed); the next try reaches it.
        async with running(w, "10.0.0.2", "b") as b:
            await trio.sleep(60)
            pointer = b.storage.get(key)
            assert pointer is not None
            assert records.decode_record(pointer).addresses == tuple(holders)  # type: ignore[union-attr]
            # Taken: the next publish is a refresh period away, not a backoff.
            caplog.clear()
            await trio.sleep(discovery.options.refresh_period / 2)
            assert not warnings(caplog)
        nursery.cancel_scope.cancel()


async def test_a_step_that_raises_is_logged_and_the_node_goes_on(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    w = world()
    broken = {"holders"}

    def friends() -> list[FriendContact]:
        if "friends" in broken:
            raise RuntimeError("the friend list is unreadable")
        return []

    def holders() -> list[records.RecordAddress]:
        if "holders" in broken:
            raise RuntimeError("the peer list is unreadable")
        return [records.RecordAddress.from_host_port("10.0.0.7", PORT)]

    def errors() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]

    key = records.dht_key(records.RecordKind.ROOT, node_id("a"))
    async with (
        running(w, "10.0.0.2", "b") as b,
        running(w, "10.0.0.1", "a") as a,
        trio.open_nursery() as nursery,
    ):
        discovery = discovery_of(
            a,
            "a",
            options=DiscoveryOptions(bootstrap=(b.local_address,), refresh_period=600),
            friends=friends,
            root_holders=holders,
        )
        await nursery.start(discovery.run)
        await trio.sleep(5)
        assert errors() == [
            "DHT: publishing this node's root pointer failed: RuntimeError: "
            "the peer list is unreadable; trying again in 30 s"
        ]
        # One failing step stops no other: the contact record is out.
        assert b.storage.get(records.dht_key(records.RecordKind.CONTACT, node_id("a")))
        broken = {"friends"}
        await trio.sleep(30)
        assert b.storage.get(key) is not None
        await trio.sleep(600)
        assert errors()[-1] == (
            "DHT: following friends failed: RuntimeError: the friend list is unreadable; "
            "trying again at the next refresh"
        )
        broken = set()
        caplog.clear()
        await trio.sleep(600)
        assert not errors()
        nursery.cancel_scope.cancel()


async def test_a_failure_in_a_background_task_or_a_datagram_does_not_stop_the_node(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    w = world()
    serve_ping = dht._Protocol.rpc_ping

    def bug() -> None:
        raise RuntimeError("a bug")

    def ping_with_a_bug(protocol: object, sender: tuple[str, int], nodeid: bytes) -> object:
        if sender[0] == "10.6.6.6":
            raise RuntimeError("a bug in ping")
        return serve_ping(protocol, sender, nodeid)

    monkeypatch.setattr(dht._Protocol, "rpc_ping", ping_with_a_bug)
    async with running(w, "10.0.0.1", "a") as a:
        # Something started in the node's asyncio loop that nobody awaits.
        a._loop.call_soon(bug)
        await trio.sleep(1)
        # A request that meets a bug while it is served.
        odd = await w.interface("10.6.6.6").open_datagram(Address("10.6.6.6", 5000))
        await odd.send(b"\x00" + bytes(20) + umsgpack.packb(["ping", [bytes(20)]]), a.local_address)
        await trio.sleep(1)
        async with running(w, "10.0.0.2", "b") as b:
            assert await b.bootstrap([a.local_address]) == 1  # a still serves
        await odd.aclose()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(
        e.startswith("DHT: a background task") and "RuntimeError: a bug;" in e for e in errors
    )
    assert (
        "DHT: handling a datagram from 10.6.6.6:5000 failed: RuntimeError: a bug in ping; dropped"
    ) in errors


def count_lookups(
    node: dht.DhtNode,
    lookups: list[tuple[float, records.RecordKind]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Note in ``lookups`` the time and kind of each lookup ``node`` makes
    (a :meth:`~dht.DhtNode.keep` is one)."""
    real_lookup, real_keep = node.lookup, node.keep

    async def lookup(kind: records.RecordKind, of: bytes) -> records.Record | None:
        lookups.append((trio.current_time(), kind))
        return await real_lookup(kind, of)

    async def keep(
        kind: records.RecordKind, of: bytes, kept: Sequence[bytes] = ()
    ) -> records.Record | None:
        lookups.append((trio.current_time(), kind))
        return await real_keep(kind, of, kept)

    monkeypatch.setattr(node, "lookup", lookup)
    monkeypatch.setattr(node, "keep", keep)


def lookup_hours(
    lookups: list[tuple[float, records.RecordKind]], started: float, kind: records.RecordKind
) -> list[int]:
    """The hours after ``started`` at which records of ``kind`` were looked up."""
    return [round((t - started) / 3600) for t, k in lookups if k == kind]


async def test_a_friend_that_answers_costs_a_ping_and_a_silent_one_is_looked_up_less_often(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = world()
    lookups: list[tuple[float, records.RecordKind]] = []
    async with running(w, "10.0.0.1", "a") as a, running(w, "10.0.0.3", "c") as c:
        count_lookups(a, lookups, monkeypatch)
        follower = discovery_of(a, "a", friends=lambda: [FriendContact(node_id("b"))])
        async with running(w, "10.0.0.2", "b") as b:
            await b.bootstrap([a.local_address, c.local_address])
            holders = [records.RecordAddress.from_host_port("10.0.0.3", PORT)]
            await discovery_of(b, "b").publish()
            await discovery_of(b, "b", root_holders=lambda: holders).publish_root_pointer()
            await follower.follow_friends()
            assert follower.followed[node_id("b")].addresses[0].host == "10.0.0.2"
            assert len(lookups) == 1  # its contact record; it answers, so no root pointer
            # It answers where its record says: a ping each time, no lookup.
            for _ in range(3):
                await trio.sleep(3600)
                await follower.follow_friends()
            assert len(lookups) == 1
            # Half a contact record's lifetime on, its record is read again.
            await trio.sleep(FOLLOW_RECHECK)
            await follower.follow_friends()
            assert len(lookups) == 2
        # b is off: looked up after 1, 2, 4 ... refresh periods, at most
        # FOLLOW_RECHECK apart; its root pointer is stored again at once,
        # then at most every FOLLOW_RECHECK.
        lookups.clear()
        started = trio.current_time()
        for _ in range(40):
            await follower.follow_friends()
            await trio.sleep(3600)

        contact = lookup_hours(lookups, started, records.RecordKind.CONTACT)
        assert contact == [0, 1, 3, 7, 15, 27, 39]
        assert lookup_hours(lookups, started, records.RecordKind.ROOT) == [0, 15, 27, 39]


async def test_a_silent_friend_without_a_root_pointer_is_not_asked_for_one_each_time(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Most nodes back nothing up, so publish no root pointer; while such a
    # friend stays silent, nobody can publish one for it.
    w = world()
    lookups: list[tuple[float, records.RecordKind]] = []
    async with running(w, "10.0.0.1", "a") as a, running(w, "10.0.0.3", "c") as c:
        count_lookups(a, lookups, monkeypatch)
        follower = discovery_of(a, "a", friends=lambda: [FriendContact(node_id("b"))])
        async with running(w, "10.0.0.2", "b") as b:
            await b.bootstrap([a.local_address, c.local_address])
            await discovery_of(b, "b").publish()
        started = trio.current_time()

        for _ in range(16):
            await follower.follow_friends()
            await trio.sleep(3600)
        # Looked up with its contact record (hours 0, 1, 3, 7, 15), once
        # FOLLOW_RECHECK has passed.
        assert lookup_hours(lookups, started, records.RecordKind.CONTACT) == [0, 1, 3, 7, 15]
        assert lookup_hours(lookups, started, records.RecordKind.ROOT) == [0, 15]
        # Back, it publishes one; silent again, its pointer is kept at once.
        async with running(w, "10.0.0.2", "b") as b:
            await b.bootstrap([a.local_address, c.local_address])
            await discovery_of(b, "b").publish()
            await follower.follow_friends()
            holders = [records.RecordAddress.from_host_port("10.0.0.3", PORT)]
            await discovery_of(b, "b", root_holders=lambda: holders).publish_root_pointer()
        lookups.clear()
        started = trio.current_time()
        await follower.follow_friends()
        assert lookup_hours(lookups, started, records.RecordKind.ROOT) == [0]
        assert node_id("b") in follower.kept_pointers
