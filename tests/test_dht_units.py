"""Unit tests of the DHT adapter (p2pbackup.dht.adapter) without a network.

Each weakness of the ``kademlia`` package that issue 4 lists has a test here:

* unauthenticated, blindly overwriting stores → :class:`RecordStorage` takes
  only valid signed records, newer than the one held, and the protocol answers
  a refused store with False;
* every node republishes every key forever → ``iter_older_than`` is empty;
* oversize values → refused by the storage and by the request checks;
* one missed reply evicts a contact → eviction after ``MISSED_REPLIES_TO_EVICT``;
* pickled state → the routing state is versioned JSON;
* unchecked requests and answers → malformed datagrams get no answer and raise
  nothing (a fuzz feeds arbitrary bytes and msgpack).

The protocol is driven by calling ``datagram_received`` on it directly, with a
transport that records what it sends; an asyncio loop (``trio_asyncio``) is
open around it because the package may start asyncio tasks and timers.
Also here: the small address and sequence helpers of p2pbackup.dht.discovery.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import math
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import kademlia.network
import kademlia.node
import pytest
import trio
import trio_asyncio
import umsgpack
from hypothesis import assume, given
from hypothesis import strategies as st

from p2pbackup.core import keys
from p2pbackup.dht import adapter as dht
from p2pbackup.dht import discovery, records
from p2pbackup.dht.records import RecordAddress, RecordKind
from p2pbackup.errors import FormatError, UsageError
from p2pbackup.net.network import Address
from p2pbackup.wire.session import Identity

NOW = 1_800_000_000
LIFETIME = 3600
ADDRESSES = (RecordAddress("192.0.2.7", 4000),)
PEER = ("10.0.0.9", 4000)

ALICE = Identity.generate()
BOB = Identity.generate()


class FakeClock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def node_id(identity: Identity) -> bytes:
    return keys.node_id_for(identity.signing_public)


def contact_key(identity: Identity) -> bytes:
    return records.dht_key(RecordKind.CONTACT, node_id(identity))


def contact(
    identity: Identity = ALICE,
    *,
    sequence: int = 1,
    now: int = NOW,
    lifetime: int = LIFETIME,
    storage_offered: int = 0,
) -> records.ContactRecord:
    return records.sign_contact(
        identity.signing_seed,
        addresses=ADDRESSES,
        storage_offered=storage_offered,
        sequence=sequence,
        now=now,
        lifetime=lifetime,
    )


def encoded(identity: Identity = ALICE, **kw: Any) -> bytes:
    return records.encode_record(contact(identity, **kw))


def packb(value: object) -> bytes:
    data: bytes = umsgpack.packb(value)
    return data


def flip_bit(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 1]) + data[index + 1 :]


# --- record storage -----------------------------------------------------------------------


def test_a_valid_record_is_stored_and_returned() -> None:
    storage = dht.RecordStorage(FakeClock())
    value = encoded()
    assert storage.offer(contact_key(ALICE), value)
    assert storage.get(contact_key(ALICE)) == value
    assert storage[contact_key(ALICE)] == value
    assert list(storage) == [(contact_key(ALICE), value)]
    assert storage.refused == 0


def test_setitem_is_offer() -> None:
    # The package stores with ``storage[key] = value``; that must not bypass the checks.
    storage = dht.RecordStorage(FakeClock())
    storage[contact_key(ALICE)] = b"anything at all"
    storage[contact_key(BOB)] = encoded(BOB)
    assert storage.get(contact_key(ALICE)) is None
    assert storage.get(contact_key(BOB)) == encoded(BOB)
    assert storage.refused == 1


def test_a_missing_key_is_a_key_error_and_get_gives_the_default() -> None:
    storage = dht.RecordStorage(FakeClock())
    with pytest.raises(KeyError):
        storage[contact_key(ALICE)]
    assert storage.get(contact_key(ALICE)) is None
    assert storage.get(contact_key(ALICE), b"default") == b"default"


def forged_under_alices_id() -> bytes:
    """Bob's signature on a record that claims Alice's node id."""
    record = contact(BOB)
    return records.encode_record(attrs.evolve(record, node_id=node_id(ALICE)))


def forged_with_alices_key() -> bytes:
    """Alice's node id and public key, but a signature made with Bob's key."""
    honest = contact(ALICE)
    bobs_signature = records.sign_contact(
        BOB.signing_seed,
        addresses=ADDRESSES,
        storage_offered=0,
        sequence=1,
        now=NOW,
        lifetime=LIFETIME,
    ).signature
    return records.encode_record(attrs.evolve(honest, signature=bobs_signature))


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        pytest.param(contact_key(ALICE), "a record", "a str value", id="str value"),
        pytest.param(contact_key(ALICE), bytearray(encoded()), "bytearray", id="bytearray"),
        pytest.param(contact_key(ALICE), None, "NoneType", id="None value"),
        pytest.param(contact_key(ALICE), 42, "int", id="int value"),
        pytest.param(
            contact_key(ALICE),
            b"\0" * (records.MAX_RECORD_SIZE + 1),
            f"{records.MAX_RECORD_SIZE + 1} bytes",
            id="oversize",
        ),
        pytest.param(contact_key(ALICE), b"", "truncated", id="empty"),
        pytest.param(contact_key(ALICE), b"garbage" * 30, "magic", id="garbage"),
        pytest.param(b"k" * 19, encoded(), "not 20 bytes", id="short key"),
        pytest.param("p2pbackup:contact:00", encoded(), "not 20 bytes", id="str key"),
        pytest.param(contact_key(BOB), encoded(ALICE), "DHT key", id="another node's key"),
        pytest.param(
            records.dht_key(RecordKind.ROOT, node_id(ALICE)),
            encoded(ALICE),
            "DHT key",
            id="own id, wrong kind",
        ),
        pytest.param(contact_key(ALICE), forged_under_alices_id(), "hash", id="forged id"),
        pytest.param(contact_key(ALICE), forged_with_alices_key(), "signature", id="forged sig"),
        pytest.param(
            contact_key(ALICE), flip_bit(encoded(), len(encoded()) - 1), "signature", id="bit flip"
        ),
        pytest.param(
            contact_key(ALICE),
            encoded(now=NOW - 2 * LIFETIME),
            "expired",
            id="expired",
        ),
        pytest.param(
            contact_key(ALICE),
            encoded(now=NOW - LIFETIME),
            "expired",
            id="expires exactly now",
        ),
    ],
)
def test_bad_values_are_refused_counted_and_logged(
    key: object, value: object, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    storage = dht.RecordStorage(FakeClock())
    with caplog.at_level(logging.INFO, logger="p2pbackup.dht.adapter"):
        assert not storage.offer(key, value)
    assert storage.refused == 1
    assert storage.count == 0
    assert list(storage) == []
    messages = [r.getMessage() for r in caplog.records if r.name == "p2pbackup.dht.adapter"]
    assert len(messages) == 1
    assert messages[0].startswith("DHT storage refused")
    assert reason.lower() in messages[0].lower()


def test_a_bad_value_does_not_replace_the_one_held() -> None:
    storage = dht.RecordStorage(FakeClock())
    value = encoded(sequence=5)
    assert storage.offer(contact_key(ALICE), value)
    for bad in [
        b"garbage",
        forged_under_alices_id(),
        flip_bit(encoded(sequence=9), len(encoded()) - 1),
        encoded(sequence=9, now=NOW - 2 * LIFETIME),
    ]:
        assert not storage.offer(contact_key(ALICE), bad)
    assert storage.get(contact_key(ALICE)) == value
    assert storage.refused == 4


@pytest.mark.parametrize("sequence", [4, 5], ids=["older", "equal"])
def test_an_older_or_equal_sequence_is_refused_and_the_held_one_stays(
    sequence: int, caplog: pytest.LogCaptureFixture
) -> None:
    storage = dht.RecordStorage(FakeClock())
    held = encoded(sequence=5)
    assert storage.offer(contact_key(ALICE), held)
    # Different bytes (another storage offer, a later expiry): still not newer.
    challenger = encoded(sequence=sequence, storage_offered=10**9, now=NOW + 60)
    assert challenger != held
    with caplog.at_level(logging.INFO, logger="p2pbackup.dht.adapter"):
        assert not storage.offer(contact_key(ALICE), challenger)
    assert storage.get(contact_key(ALICE)) == held
    assert storage.refused == 1
    assert "not newer" in caplog.text


def test_a_newer_sequence_replaces_the_one_held() -> None:
    storage = dht.RecordStorage(FakeClock())
    assert storage.offer(contact_key(ALICE), encoded(sequence=5))
    newer = encoded(sequence=6, storage_offered=7)
    assert storage.offer(contact_key(ALICE), newer)
    assert storage.get(contact_key(ALICE)) == newer
    assert storage.count == 1


def test_the_same_record_again_is_accepted_without_a_refusal() -> None:
    storage = dht.RecordStorage(FakeClock())
    value = encoded(sequence=5)
    assert storage.offer(contact_key(ALICE), value)
    assert storage.offer(contact_key(ALICE), value)  # a replica re-sent: fine
    assert storage.refused == 0
    assert storage.count == 1


def test_a_record_past_its_expiry_is_no_longer_returned_and_is_dropped() -> None:
    clock = FakeClock()
    storage = dht.RecordStorage(clock)
    key = contact_key(ALICE)
    assert storage.offer(key, encoded(lifetime=100))
    clock.now = NOW + 99
    assert storage.get(key) is not None
    clock.now = NOW + 100  # expiry <= now: dead
    assert storage.get(key) is None
    assert storage.count == 0  # dropped, not just hidden
    with pytest.raises(KeyError):
        storage[key]
    assert list(storage) == []


def test_an_expired_record_held_does_not_block_an_older_sequence() -> None:
    # Once the held record is dead, nothing is held: any valid record is taken.
    clock = FakeClock()
    storage = dht.RecordStorage(clock)
    assert storage.offer(contact_key(ALICE), encoded(sequence=9, lifetime=100))
    clock.now = NOW + 200
    replacement = encoded(sequence=3, now=NOW + 200)
    assert storage.offer(contact_key(ALICE), replacement)
    assert storage.get(contact_key(ALICE)) == replacement


def test_iteration_yields_only_live_records() -> None:
    clock = FakeClock()
    storage = dht.RecordStorage(clock)
    assert storage.offer(contact_key(ALICE), encoded(ALICE, lifetime=100))
    assert storage.offer(contact_key(BOB), encoded(BOB, lifetime=1000))
    assert {key for key, _ in storage} == {contact_key(ALICE), contact_key(BOB)}
    clock.now = NOW + 500
    assert list(storage) == [(contact_key(BOB), encoded(BOB, lifetime=1000))]
    assert storage.count == 1


def test_in_range_yields_the_live_records_between_two_keys_in_order() -> None:
    clock = FakeClock()
    storage = dht.RecordStorage(clock)
    people = [Identity.generate() for _ in range(12)]
    for index, person in enumerate(people):
        assert storage.offer(contact_key(person), encoded(person, lifetime=100 + 100 * (index % 2)))
    keys = sorted(contact_key(person) for person in people)
    assert [k for k, _ in storage.in_range(keys[0], keys[-1])] == keys
    assert [k for k, _ in storage.in_range(keys[3], keys[7])] == keys[3:8]  # both ends included
    assert list(storage.in_range(keys[5], keys[4])) == []
    everything = list(storage.in_range(bytes(20), bytes([255]) * 20))
    assert everything == [(k, storage.get(k)) for k in keys]
    # Half expire; walking over them drops them, and the rest still come in order.
    clock.now = NOW + 150
    live = [k for k in keys if storage.get(k) is not None]
    assert 0 < len(live) < len(keys)
    assert [k for k, _ in storage.in_range(keys[0], keys[-1])] == live
    assert storage.count == len(live)
    # A caller that stops early looked at no more than it took.
    walk = storage.in_range(keys[0], keys[-1])
    assert next(walk)[0] == live[0]


@given(
    own=st.integers(0, 2**160 - 1),
    new=st.integers(0, 2**160 - 1),
    contacts=st.lists(st.integers(0, 2**160 - 1), max_size=8),
    keys=st.lists(st.integers(0, 2**160 - 1), max_size=30),
    low_bits=st.integers(0, 2**160 - 1),
)
def test_handover_ranges_hold_every_owed_key_once_nearest_first(
    own: int, new: int, contacts: list[int], keys: list[int], low_bits: int
) -> None:
    assume(new != own and own not in contacts and new not in contacts)
    # Keys at every depth beside both nodes too, where random ones seldom fall.
    for bit in range(160):
        below = low_bits & ((1 << bit) - 1)
        keys += [own ^ (1 << bit) ^ below, new ^ (1 << bit) ^ below]
    occupied = {dht._shared_bits(own, c) for c in contacts}
    ranges = list(dht._handover_ranges(own, new, occupied))

    def where(key: int) -> list[int]:
        return [i for i, (low, high) in enumerate(ranges) if low <= key <= high]

    for key in keys:
        distance = own ^ key
        owed = new ^ key < distance and all(c ^ key > distance for c in contacts)
        found = where(key)
        assert len(found) <= 1  # the ranges do not overlap
        if owed:
            assert found, hex(key)
    # Nearest the newcomer first: a later range holds no key nearer it.
    placed = [(where(k)[0], dht._shared_bits(new, k)) for k in keys if where(k)]
    for first, nearness in placed:
        assert all(n <= nearness for later, n in placed if later > first)


@pytest.mark.parametrize("seconds", [0, 0.0, 3600, -1])
def test_nothing_is_ever_due_for_republishing_by_others(seconds: float) -> None:
    # The package republishes whatever iter_older_than yields, from every node,
    # forever; only a record's owner may keep it alive.
    clock = FakeClock()
    storage = dht.RecordStorage(clock)
    assert storage.offer(contact_key(ALICE), encoded())
    clock.now = NOW + LIFETIME - 1
    assert list(storage.iter_older_than(seconds)) == []


def test_the_cap_refuses_new_keys_until_others_expire(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    storage = dht.RecordStorage(clock, max_records=2)
    carol = Identity.generate()
    assert storage.offer(contact_key(ALICE), encoded(ALICE, lifetime=100))
    assert storage.offer(contact_key(BOB), encoded(BOB, lifetime=1000))
    with caplog.at_level(logging.INFO, logger="p2pbackup.dht.adapter"):
        assert not storage.offer(contact_key(carol), encoded(carol, lifetime=1000))
    assert storage.refused == 1
    assert "2 records held" in caplog.text
    assert storage.get(contact_key(carol)) is None
    # A key already held may still be updated while full.
    newer_bob = encoded(BOB, sequence=2, lifetime=1000)
    assert storage.offer(contact_key(BOB), newer_bob)
    # Alice's record expires: room for Carol.
    clock.now = NOW + 150
    carols = encoded(carol, now=NOW + 150)
    assert storage.offer(contact_key(carol), carols)
    assert storage.get(contact_key(carol)) == carols
    assert storage.get(contact_key(BOB)) == newer_bob
    assert storage.count == 2


def test_the_storage_follows_its_wall_clock_not_the_real_one() -> None:
    # A record from 2027 is expired for a clock set to 2030.
    storage = dht.RecordStorage(FakeClock(NOW + 10**8))
    assert not storage.offer(contact_key(ALICE), encoded())


@pytest.mark.parametrize("empty", [True, False])
def test_the_package_server_keeps_this_storage(empty: bool) -> None:
    # Server does ``storage or ForgetfulStorage()``: a storage that is falsy
    # when empty would silently be replaced by one that stores anything.
    storage = dht.RecordStorage(FakeClock())
    if not empty:
        assert storage.offer(contact_key(ALICE), encoded())
    assert kademlia.network.Server(storage=storage).storage is storage
    server = dht._Server(ksize=20, alpha=3, node_id=node_id(ALICE), storage=storage)
    assert server.storage is storage
    assert server._create_protocol().storage is storage


# --- the protocol, fed datagrams by hand ---------------------------------------------------


class NoResponse:
    """What :meth:`Harness.request` gives when the protocol sent nothing."""


NO_RESPONSE = NoResponse()


@attrs.define
class FakeTransport:
    """The one transport method the package calls, recording what it sends."""

    sent: list[tuple[bytes, tuple[str, int]]] = attrs.Factory(list)

    def sendto(self, data: bytes, address: tuple[str, int]) -> None:
        self.sent.append((bytes(data), address))

    def close(self) -> None:
        pass


@attrs.define
class Harness:
    protocol: Any  # dht._Protocol; the package is untyped
    transport: FakeTransport
    storage: dht.RecordStorage
    clock: FakeClock
    own_id: bytes

    def feed(self, datagram: bytes, sender: tuple[str, int] = PEER) -> list[bytes]:
        """Deliver ``datagram``; the datagrams sent in response."""
        before = len(self.transport.sent)
        self.protocol.datagram_received(datagram, sender)
        sent = self.transport.sent[before:]
        assert all(address == sender for _, address in sent)
        return [data for data, _ in sent]

    def request(self, name: object, args: object, *, sender: tuple[str, int] = PEER) -> object:
        """Send a request; the decoded answer, or NO_RESPONSE."""
        msg_id = os.urandom(20)
        sent = self.feed(b"\x00" + msg_id + packb([name, args]), sender)
        if not sent:
            return NO_RESPONSE
        [answer] = sent
        assert answer[:21] == b"\x01" + msg_id
        return umsgpack.unpackb(answer[21:])


@contextlib.asynccontextmanager
async def harness(*, max_records: int = 100) -> AsyncIterator[Harness]:
    clock = FakeClock()
    storage = dht.RecordStorage(clock, max_records=max_records)
    own_id = os.urandom(20)
    async with trio_asyncio.open_loop():
        protocol = dht._Server(
            ksize=20, alpha=3, node_id=own_id, storage=storage
        )._create_protocol()
        transport = FakeTransport()
        protocol.connection_made(transport)
        try:
            yield Harness(protocol, transport, storage, clock, own_id)
        finally:
            # Requests of ours still waiting would die noisily with the loop.
            dht._fail_outstanding(protocol)


SENDER_ID = os.urandom(20)


async def test_a_ping_is_answered_with_the_own_node_id() -> None:
    async with harness() as h:
        msg_id = os.urandom(20)
        sent = h.feed(b"\x00" + msg_id + packb(["ping", [SENDER_ID]]))
        assert sent == [b"\x01" + msg_id + packb(h.own_id)]
        assert h.protocol.malformed == 0
        # The sender is now a contact.
        assert not h.protocol.router.is_new_node(kademlia.node.Node(SENDER_ID))


async def test_a_stun_request_is_answered_with_the_senders_address() -> None:
    async with harness() as h:
        assert h.request("stun", []) == list(PEER)


async def test_a_valid_store_is_answered_true_and_held() -> None:
    async with harness() as h:
        value = encoded()
        assert h.request("store", [SENDER_ID, contact_key(ALICE), value]) is True
        assert h.storage.get(contact_key(ALICE)) == value


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(b"any value a stock client sets", id="garbage"),
        pytest.param(encoded(BOB), id="under another key"),
        pytest.param(forged_under_alices_id(), id="forged"),
        pytest.param(encoded(now=NOW - 2 * LIFETIME), id="expired"),
    ],
)
async def test_a_refused_store_is_answered_false_and_not_held(value: bytes) -> None:
    # The stock package answers True and stores anything.
    async with harness() as h:
        assert h.request("store", [SENDER_ID, contact_key(ALICE), value]) is False
        assert h.storage.get(contact_key(ALICE)) is None
        assert h.storage.refused == 1
        assert h.protocol.malformed == 0  # well-formed, just not acceptable


async def test_a_stale_store_is_answered_false_and_the_newer_record_stays() -> None:
    async with harness() as h:
        newer = encoded(sequence=2)
        assert h.request("store", [SENDER_ID, contact_key(ALICE), newer]) is True
        assert h.request("store", [SENDER_ID, contact_key(ALICE), encoded(sequence=1)]) is False
        assert h.storage.get(contact_key(ALICE)) == newer


async def test_find_value_on_a_held_key_returns_the_value() -> None:
    async with harness() as h:
        value = encoded()
        assert h.storage.offer(contact_key(ALICE), value)
        answer = h.request("find_value", [SENDER_ID, contact_key(ALICE)])
        assert answer == {"value": value}


async def test_find_value_on_a_missing_key_returns_contacts() -> None:
    async with harness() as h:
        known = kademlia.node.Node(os.urandom(20), "10.0.0.7", 4001)
        h.protocol.router.add_contact(known)
        answer = h.request("find_value", [SENDER_ID, contact_key(ALICE)])
        assert answer == [[known.id, "10.0.0.7", 4001]]


async def test_find_value_does_not_return_an_expired_record() -> None:
    async with harness() as h:
        assert h.storage.offer(contact_key(ALICE), encoded(lifetime=100))
        h.clock.now = NOW + 100
        assert h.request("find_value", [SENDER_ID, contact_key(ALICE)]) == []


async def test_find_node_returns_contacts_but_not_the_asker() -> None:
    async with harness() as h:
        known = kademlia.node.Node(os.urandom(20), "10.0.0.7", 4001)
        h.protocol.router.add_contact(known)
        assert h.request("ping", [SENDER_ID]) == h.own_id
        answer = h.request("find_node", [SENDER_ID, os.urandom(20)])
        assert answer == [[known.id, "10.0.0.7", 4001]]


NODE_ID = os.urandom(20)
KEY = os.urandom(20)


def request_bytes(payload: object, kind: bytes = b"\x00") -> bytes:
    return kind + os.urandom(20) + packb(payload)


MALFORMED: list[Any] = [
    pytest.param(b"", id="empty"),
    pytest.param(b"\x00" * 21, id="too short"),
    pytest.param(b"\x02" + os.urandom(20) + packb(["ping", [NODE_ID]]), id="kind 2"),
    pytest.param(b"\xff" + os.urandom(20) + packb(["ping", [NODE_ID]]), id="kind ff"),
    pytest.param(b"\x00" + os.urandom(20) + b"\xc1", id="reserved msgpack code"),
    pytest.param(b"\x00" + os.urandom(20) + b"\x92\xa4ping", id="truncated msgpack"),
    pytest.param(b"\x00" + os.urandom(20) + b"\xa2\xff\xfe", id="invalid utf-8 string"),
    pytest.param(b"\x00" + os.urandom(20) + b"\x81\x90\x01\x81\x90\x02", id="unhashable key"),
    pytest.param(request_bytes("ping"), id="not a list"),
    pytest.param(request_bytes({"ping": [NODE_ID]}), id="a map"),
    pytest.param(request_bytes(["ping"]), id="list of one"),
    pytest.param(request_bytes(["ping", [NODE_ID], 1]), id="list of three"),
    pytest.param(request_bytes(["ping", NODE_ID]), id="arguments not a list"),
    pytest.param(request_bytes(["ping", {"a": 1}]), id="arguments a map"),
    pytest.param(request_bytes(["shutdown", []]), id="unknown request"),
    pytest.param(request_bytes(["__init__", []]), id="dunder request"),
    pytest.param(request_bytes(["_accept_response", [b"x", 1, 2]]), id="private method"),
    pytest.param(request_bytes(["call_ping", [NODE_ID]]), id="outgoing method"),
    pytest.param(request_bytes([b"ping", [NODE_ID]]), id="name as bytes"),
    pytest.param(request_bytes([None, [NODE_ID]]), id="name None"),
    pytest.param(request_bytes([["ping"], [NODE_ID]]), id="name a list"),
    pytest.param(request_bytes(["ping", []]), id="ping without arguments"),
    pytest.param(request_bytes(["ping", [NODE_ID, NODE_ID]]), id="ping with two"),
    pytest.param(request_bytes(["ping", [NODE_ID[:19]]]), id="ping id 19 bytes"),
    pytest.param(request_bytes(["ping", [NODE_ID + b"!"]]), id="ping id 21 bytes"),
    pytest.param(request_bytes(["ping", [NODE_ID.hex()]]), id="ping id as str"),
    pytest.param(request_bytes(["ping", [True]]), id="ping id bool"),
    pytest.param(request_bytes(["ping", [None]]), id="ping id None"),
    pytest.param(request_bytes(["ping", [2**64 - 1]]), id="ping id int"),
    pytest.param(request_bytes(["stun", [NODE_ID]]), id="stun with an argument"),
    pytest.param(request_bytes(["find_node", [NODE_ID]]), id="find_node of one"),
    pytest.param(request_bytes(["find_node", [NODE_ID, KEY[:19]]]), id="find_node key 19"),
    pytest.param(request_bytes(["find_node", [NODE_ID, KEY.hex()]]), id="find_node key str"),
    pytest.param(request_bytes(["find_value", [NODE_ID, "p2pbackup:contact:00"]]), id="fv str"),
    pytest.param(request_bytes(["find_value", [NODE_ID, False]]), id="find_value key bool"),
    pytest.param(request_bytes(["store", [NODE_ID, KEY]]), id="store without value"),
    pytest.param(request_bytes(["store", [NODE_ID, "key", b"v"]]), id="store key str"),
    pytest.param(request_bytes(["store", [NODE_ID, KEY, "value"]]), id="store value str"),
    pytest.param(request_bytes(["store", [NODE_ID, KEY, 4000]]), id="store value int"),
    pytest.param(request_bytes(["store", [NODE_ID, KEY, True]]), id="store value bool"),
    pytest.param(
        request_bytes(["store", [NODE_ID, KEY, b"\0" * (records.MAX_RECORD_SIZE + 1)]]),
        id="store value oversize",
    ),
    pytest.param(request_bytes(["store", [NODE_ID[:19], KEY, b"v"]]), id="store id 19"),
    pytest.param(request_bytes(NODE_ID, kind=b"\x01"), id="answer to nothing"),
    pytest.param(request_bytes(True, kind=b"\x01"), id="store answer to nothing"),
]


@pytest.mark.parametrize("datagram", MALFORMED)
async def test_malformed_datagrams_get_no_answer_and_are_counted(
    datagram: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async with harness() as h:
        with caplog.at_level(logging.INFO, logger="p2pbackup.dht.adapter"):
            assert h.feed(datagram) == []
        assert h.protocol.malformed == 1
        assert "ignored" in caplog.text
        # Nothing was learnt from it: no contact, nothing stored.
        assert not any(bucket.get_nodes() for bucket in h.protocol.router.buckets)
        assert h.storage.count == 0
        # And the protocol still serves the next, well-formed request.
        assert h.request("ping", [SENDER_ID]) == h.own_id


# u-msgpack-python raises more than UnpackException on hostile input; one
# such datagram must not end the DHT node.
UNPACKER_CRASHES: list[Any] = [
    pytest.param(b"\x91" * 5000, id="deeply nested arrays (RecursionError)"),
    pytest.param(
        b"\xc7\x0c\xff" + (0).to_bytes(4, "big") + (2**62).to_bytes(8, "big"),
        id="timestamp out of range (OverflowError)",
    ),
]


@pytest.mark.parametrize("payload", UNPACKER_CRASHES)
async def test_payloads_that_crash_the_msgpack_decoder_are_dropped(payload: bytes) -> None:
    async with harness() as h:
        for kind in (b"\x00", b"\x01"):
            assert h.feed(kind + os.urandom(20) + payload) == []
        assert h.protocol.malformed == 2


async def test_an_answer_to_a_request_of_ours_completes_it() -> None:
    async with harness() as h:
        peer_id = os.urandom(20)
        future = h.protocol.ping(PEER, h.own_id)
        [(request, address)] = h.transport.sent
        assert address == PEER
        assert umsgpack.unpackb(request[21:]) == ["ping", [h.own_id]]
        assert h.feed(b"\x01" + request[1:21] + packb(peer_id)) == []
        assert future.done()
        assert future.result() == (True, peer_id)
        assert h.protocol.malformed == 0
        # The same answer again is an answer to nothing.
        assert h.feed(b"\x01" + request[1:21] + packb(peer_id)) == []
        assert h.protocol.malformed == 1


PEER_NODE_ID = os.urandom(20)

#: (call, a malformed answer to it) for the protocol's outgoing requests.
BAD_ANSWERS: list[Any] = [
    pytest.param("find_node", {"value": b"x"}, id="find_node: a value"),
    pytest.param("find_node", [[NODE_ID, "10.0.0.1", True]], id="find_node: port bool"),
    pytest.param("find_node", [[NODE_ID, "10.0.0.1", 0]], id="find_node: port 0"),
    pytest.param("find_node", [[NODE_ID, "10.0.0.1", 70000]], id="find_node: port 70000"),
    pytest.param("find_node", [[NODE_ID[:19], "10.0.0.1", 4000]], id="find_node: id 19"),
    pytest.param("find_node", [[NODE_ID, "", 4000]], id="find_node: empty host"),
    pytest.param("find_node", [[NODE_ID, b"10.0.0.1", 4000]], id="find_node: host bytes"),
    pytest.param("find_node", [[NODE_ID, "10.0.0.1"]], id="find_node: contact of two"),
    pytest.param("find_node", "nodes", id="find_node: str"),
    pytest.param(
        "find_node",
        [[os.urandom(20), "10.0.0.1", 4000]] * (dht.MAX_CONTACTS_IN_ANSWER + 1),
        id="find_node: too many contacts",
    ),
    pytest.param("find_value", {"value": "text"}, id="find_value: str value"),
    pytest.param("find_value", {"value": b"v", "extra": 1}, id="find_value: extra field"),
    pytest.param(
        "find_value",
        {"value": b"\0" * (records.MAX_RECORD_SIZE + 1)},
        id="find_value: oversize value",
    ),
    pytest.param("find_value", [[NODE_ID, "10.0.0.1", -1]], id="find_value: port -1"),
    pytest.param("find_value", None, id="find_value: nil"),
    pytest.param("store", "yes", id="store: str"),
    pytest.param("store", 1, id="store: int"),
]


async def answer_call(h: Harness, call: str, answer: object) -> Any:
    """Make one outgoing call to PEER (id PEER_NODE_ID), answer it with
    ``answer``, and return what the call returns."""
    loop = asyncio_loop()
    node = kademlia.node.Node(PEER_NODE_ID, *PEER)
    if call == "store":
        coroutine = h.protocol.call_store(node, KEY, encoded())
    elif call == "ping":
        coroutine = h.protocol.call_ping(node)
    else:
        coroutine = getattr(h.protocol, f"call_{call}")(node, kademlia.node.Node(KEY))
    results: list[Any] = []

    async def run() -> None:
        results.append(await loop.run_aio_coroutine(coroutine))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        with trio.fail_after(5):
            while not h.transport.sent:
                await trio.sleep(0)
        [(request, _)] = h.transport.sent
        h.feed(b"\x01" + request[1:21] + packb(answer))
    [result] = results
    return result


def asyncio_loop() -> Any:
    return trio_asyncio.current_loop.get()


@pytest.mark.parametrize(("call", "answer"), BAD_ANSWERS)
async def test_a_malformed_answer_counts_as_no_answer(call: str, answer: object) -> None:
    async with harness() as h:
        assert await answer_call(h, call, answer) == (False, None)
        assert h.protocol.malformed == 1


@pytest.mark.parametrize(
    ("call", "answer"),
    [
        ("find_node", [[NODE_ID, "10.0.0.1", 4000]]),
        ("find_node", []),
        ("find_value", {"value": b"a record"}),
        ("find_value", [[NODE_ID, "2001:db8::1", 65535]]),
        ("store", False),
        ("ping", PEER_NODE_ID),
    ],
)
async def test_a_well_formed_answer_is_passed_on(call: str, answer: object) -> None:
    async with harness() as h:
        assert await answer_call(h, call, answer) == (True, answer)
        assert h.protocol.malformed == 0
        # A peer that answered is a contact.
        assert not h.protocol.router.is_new_node(kademlia.node.Node(PEER_NODE_ID))


async def test_a_ping_answered_by_another_node_is_no_answer() -> None:
    async with harness() as h:
        assert await answer_call(h, "ping", os.urandom(20)) == (False, None)


# --- fuzz ----------------------------------------------------------------------------------

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=40)
    | st.sampled_from([NODE_ID, KEY, encoded()]),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=5) | st.integers(0, 9), children, max_size=4)
    ),
    max_leaves=20,
)
request_names = st.sampled_from(
    ["ping", "stun", "store", "find_node", "find_value", "", "rpc_ping", "welcome_if_new"]
)
payloads = (
    msgpack_values
    | st.tuples(request_names, st.lists(msgpack_values, max_size=4)).map(list)
    | st.tuples(msgpack_values, msgpack_values).map(list)
)


@given(
    kind=st.sampled_from([b"\x00", b"\x01", b"\x02"]),
    payload=payloads,
)
async def test_fuzz_msgpack_structures_never_raise(kind: bytes, payload: object) -> None:
    async with harness() as h:
        h.feed(kind + os.urandom(20) + packb(payload))
        # Whatever came in, nothing in storage unless it was a valid record.
        for key, value in h.storage:
            assert records.choose_newest([value], key=key, now=NOW) is not None


# --- the codec ------------------------------------------------------------------------------

#: What a stock node sends and reads: requests, answers, and values within them.
wire_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=300)
    | st.binary(max_size=70_000)
    | st.sampled_from([NODE_ID, KEY, encoded()]),
    lambda children: (
        st.lists(children, max_size=20)
        | st.lists(children, max_size=20).map(tuple)
        | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=40,
)


@given(value=wire_values)
def test_the_codec_writes_and_reads_what_the_stock_one_does(value: object) -> None:
    # The adapter encodes with the C msgpack; a stock kademlia node (u-msgpack)
    # must get the very bytes it would have sent itself, and read them back.
    data = dht._encode(value)
    assert data == umsgpack.packb(value)
    assert dht._decode(data) == umsgpack.unpackb(data)


async def test_every_request_reads_as_the_stock_one() -> None:
    async with harness() as h:
        h.protocol.ping(PEER, h.own_id)
        h.protocol.store(PEER, h.own_id, KEY, encoded())
        h.protocol.find_node(PEER, h.own_id, KEY)
        h.protocol.find_value(PEER, h.own_id, KEY)
        assert [umsgpack.unpackb(request[21:]) for request, _ in h.transport.sent] == [
            ["ping", [h.own_id]],
            ["store", [h.own_id, KEY, encoded()]],
            ["find_node", [h.own_id, KEY]],
            ["find_value", [h.own_id, KEY]],
        ]
        assert len({request[1:21] for request, _ in h.transport.sent}) == 4
        assert all(request[:1] == b"\x00" for request, _ in h.transport.sent)


@given(data=st.binary(max_size=200), prefix=st.sampled_from([b"", b"\x00", b"\x01"]))
async def test_fuzz_arbitrary_bytes_never_raise(data: bytes, prefix: bytes) -> None:
    async with harness() as h:
        h.feed(prefix + data)


# --- patient eviction ----------------------------------------------------------------------


def eviction_setup() -> tuple[Any, kademlia.node.Node]:
    protocol = dht._Server(
        ksize=20, alpha=3, node_id=os.urandom(20), storage=dht.RecordStorage(FakeClock())
    )._create_protocol()
    node = kademlia.node.Node(os.urandom(20), "10.0.0.7", 4001)
    protocol.router.add_contact(node)
    return protocol, node


def in_table(protocol: Any, node: kademlia.node.Node) -> bool:
    return not protocol.router.is_new_node(node)


def test_a_contact_is_evicted_only_after_several_missed_replies(
    caplog: pytest.LogCaptureFixture,
) -> None:
    protocol, node = eviction_setup()
    missed = (False, None)
    for _ in range(dht.MISSED_REPLIES_TO_EVICT - 1):
        assert protocol.handle_call_response(missed, node) == missed
        assert in_table(protocol, node)  # the stock package evicts on the first miss
    with caplog.at_level(logging.INFO, logger="p2pbackup.dht.adapter"):
        protocol.handle_call_response(missed, node)
    assert not in_table(protocol, node)
    assert f"missed {dht.MISSED_REPLIES_TO_EVICT} replies" in caplog.text


def test_patience_is_more_than_one_miss() -> None:
    assert dht.MISSED_REPLIES_TO_EVICT >= 2


def test_a_reply_in_between_resets_the_count() -> None:
    protocol, node = eviction_setup()
    missed, answered = (False, None), (True, b"anything")
    for _ in range(3):
        for _ in range(dht.MISSED_REPLIES_TO_EVICT - 1):
            protocol.handle_call_response(missed, node)
            assert in_table(protocol, node)  # only because the count starts again
        assert protocol.handle_call_response(answered, node) == answered
    for _ in range(dht.MISSED_REPLIES_TO_EVICT):
        protocol.handle_call_response(missed, node)
    assert not in_table(protocol, node)


def test_misses_are_counted_per_contact() -> None:
    protocol, node = eviction_setup()
    other = kademlia.node.Node(os.urandom(20), "10.0.0.8", 4001)
    protocol.router.add_contact(other)
    for _ in range(dht.MISSED_REPLIES_TO_EVICT - 1):
        protocol.handle_call_response((False, None), node)
        protocol.handle_call_response((False, None), other)
    protocol.handle_call_response((True, None), other)
    protocol.handle_call_response((False, None), node)
    assert not in_table(protocol, node)
    assert in_table(protocol, other)


def test_a_miss_from_a_stranger_is_not_remembered() -> None:
    protocol, _ = eviction_setup()
    stranger = kademlia.node.Node(os.urandom(20), "10.0.0.9", 4001)
    for _ in range(dht.MISSED_REPLIES_TO_EVICT + 1):
        assert protocol.handle_call_response((False, None), stranger) == (False, None)
    assert in_table(protocol, stranger) is False
    assert stranger.id not in protocol._missed  # no memory spent on strangers


def test_an_evicted_contact_that_returns_starts_afresh() -> None:
    protocol, node = eviction_setup()
    for _ in range(dht.MISSED_REPLIES_TO_EVICT):
        protocol.handle_call_response((False, None), node)
    protocol.router.add_contact(node)
    protocol.handle_call_response((False, None), node)
    assert in_table(protocol, node)


# --- routing state ------------------------------------------------------------------------

hosts = (
    st.ip_addresses().map(str)
    | st.from_regex(r"[a-z0-9](?:[a-z0-9.-]{0,30}[a-z0-9])?", fullmatch=True)
    | st.just("x" * 255)
)
contacts = st.builds(
    dht.Contact,
    node_id=st.binary(min_size=20, max_size=20),
    address=st.builds(Address, host=hosts, port=st.integers(1, 65535)),
)


@given(
    own=st.binary(min_size=20, max_size=20),
    neighbours=st.lists(contacts, max_size=25),
    kept=st.lists(st.binary(max_size=records.MAX_RECORD_SIZE), max_size=4),
)
def test_routing_state_round_trips(
    own: bytes, neighbours: list[dht.Contact], kept: list[bytes]
) -> None:
    data = dht.encode_routing_state(own, neighbours, kept)
    assert dht.decode_routing_state(data) == (own, neighbours, kept)


def test_a_version_1_routing_state_is_read_with_no_kept_records() -> None:
    document = state_document(version=1)
    del document["kept"]
    assert dht.decode_routing_state(as_bytes(document)) == (
        bytes(20),
        [dht.Contact(bytes(range(20)), Address("10.0.0.1", 4000))],
        [],
    )


def test_routing_state_is_versioned_json() -> None:
    own = bytes(range(20))
    neighbour = dht.Contact(bytes(range(1, 21)), Address("2001:db8::5", 4000))
    data = dht.encode_routing_state(own, [neighbour])
    document = json.loads(data)  # JSON: readable, and nothing a pickle loader would run
    assert data.isascii()
    assert not data.startswith(b"\x80")  # a pickle protocol 2+ stream begins with PROTO
    assert document == {
        "format": "p2pbackup-dht-state",
        "version": 2,
        "node_id": own.hex(),
        "neighbours": [{"node_id": bytes(range(1, 21)).hex(), "host": "2001:db8::5", "port": 4000}],
        "kept": [],
    }


@attrs.define
class FakeNeighbours:
    """Stands in for a DhtNode where only its id and neighbours are read."""

    node_id: bytes
    contacts: list[dht.Contact]

    def neighbours(self) -> list[dht.Contact]:
        return list(self.contacts)


def test_an_unchanged_routing_state_is_not_written_again(tmp_path: Path) -> None:
    # A node saves every few minutes; rewriting (and fsyncing) the same
    # bytes each time is disk wear for nothing.
    path = tmp_path / "dht-state.json"
    node = FakeNeighbours(bytes(20), [dht.Contact(bytes(range(20)), Address("10.0.0.1", 4000))])
    saved = dht.save_routing_state(path, node)  # type: ignore[arg-type]
    assert saved == path.read_bytes()
    path.write_bytes(b"left alone")
    assert dht.save_routing_state(path, node, saved) == saved  # type: ignore[arg-type]
    assert path.read_bytes() == b"left alone"
    node.contacts.append(dht.Contact(bytes(range(1, 21)), Address("10.0.0.2", 4000)))
    changed = dht.save_routing_state(path, node, saved)  # type: ignore[arg-type]
    assert changed != saved and path.read_bytes() == changed
    # A node that knows nobody keeps the file it had.
    assert dht.save_routing_state(path, FakeNeighbours(bytes(20), []), changed) == changed  # type: ignore[arg-type]
    assert path.read_bytes() == changed


def state_document(**changes: object) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(
        dht.encode_routing_state(
            bytes(20), [dht.Contact(bytes(range(20)), Address("10.0.0.1", 4000))]
        )
    )
    document.update(changes)
    return document


def neighbour(**changes: object) -> dict[str, Any]:
    entry: dict[str, Any] = {"node_id": "ab" * 20, "host": "10.0.0.1", "port": 4000}
    entry.update(changes)
    return entry


def without(document: dict[str, Any], field: str) -> dict[str, Any]:
    return {k: v for k, v in document.items() if k != field}


def as_bytes(document: object) -> bytes:
    return json.dumps(document).encode()


MALFORMED_STATES: list[Any] = [
    pytest.param(b"", id="empty"),
    pytest.param(b"\x80\x04\x95", id="a pickle"),
    pytest.param(b"\xff\xfe{", id="not utf-8"),
    pytest.param(b"{", id="truncated json"),
    pytest.param(b"[]", id="a list"),
    pytest.param(b"null", id="null"),
    pytest.param(as_bytes({}), id="empty object"),
    pytest.param(as_bytes(state_document(format="kademlia")), id="other format"),
    pytest.param(as_bytes(without(state_document(), "format")), id="no format"),
    pytest.param(as_bytes(state_document(version=3)), id="version 3"),
    pytest.param(as_bytes(state_document(kept="ab")), id="kept a string"),
    pytest.param(as_bytes(state_document(kept=["zz"])), id="kept not hex"),
    pytest.param(as_bytes(state_document(kept=[5])), id="kept a number"),
    pytest.param(as_bytes(state_document(kept=["00" * 4097])), id="kept record too large"),
    pytest.param(as_bytes(state_document(kept=["00"] * 257)), id="too many kept"),
    pytest.param(as_bytes(state_document(version="1")), id="version as str"),
    pytest.param(as_bytes(without(state_document(), "version")), id="no version"),
    pytest.param(as_bytes(without(state_document(), "node_id")), id="no node id"),
    pytest.param(as_bytes(without(state_document(), "neighbours")), id="no neighbours"),
    pytest.param(as_bytes(state_document(node_id="zz" * 20)), id="node id not hex"),
    pytest.param(as_bytes(state_document(node_id="ab" * 19)), id="node id 19 bytes"),
    pytest.param(as_bytes(state_document(node_id="ab" * 21)), id="node id 21 bytes"),
    pytest.param(as_bytes(state_document(node_id="abc")), id="node id odd hex"),
    pytest.param(as_bytes(state_document(node_id=12)), id="node id a number"),
    pytest.param(as_bytes(state_document(neighbours={"a": 1})), id="neighbours a map"),
    pytest.param(as_bytes(state_document(neighbours="10.0.0.1")), id="neighbours a str"),
    pytest.param(as_bytes(state_document(neighbours=[1])), id="neighbour a number"),
    pytest.param(as_bytes(state_document(neighbours=[neighbour(node_id="ab" * 19)])), id="n id 19"),
    pytest.param(as_bytes(state_document(neighbours=[neighbour(node_id="xy" * 20)])), id="n id xy"),
    pytest.param(as_bytes(state_document(neighbours=[neighbour(port=0)])), id="port 0"),
    pytest.param(as_bytes(state_document(neighbours=[neighbour(port="4000")])), id="port str"),
    pytest.param(as_bytes(state_document(neighbours=[neighbour(port=True)])), id="port bool"),
    pytest.param(as_bytes(state_document(neighbours=[neighbour(port=4000.5)])), id="port float"),
    pytest.param(as_bytes(state_document(neighbours=[neighbour(host=7)])), id="host a number"),
    pytest.param(as_bytes(state_document(neighbours=[neighbour(host="h" * 256)])), id="host long"),
    pytest.param(as_bytes(state_document(neighbours=[without(neighbour(), "port")])), id="no port"),
    pytest.param(as_bytes(state_document(neighbours=[without(neighbour(), "host")])), id="no host"),
]

#: Malformed states that escape decode_routing_state as the wrong error (bugs).
MISCLASSIFIED_STATES: list[Any] = [
    pytest.param(as_bytes(state_document(neighbours=[neighbour(port=70000)])), id="port 70000"),
    pytest.param(as_bytes(state_document(neighbours=[neighbour(port=-1)])), id="port -1"),
    pytest.param(as_bytes(state_document(neighbours=[neighbour(host="")])), id="host empty"),
    pytest.param(as_bytes(state_document(neighbours=[neighbour(host="a b")])), id="host space"),
]


@pytest.mark.parametrize("data", MALFORMED_STATES)
def test_malformed_routing_state_is_a_format_error(data: bytes) -> None:
    with pytest.raises(FormatError) as caught:
        dht.decode_routing_state(data)
    assert "routing state" in str(caught.value)


@pytest.mark.parametrize("data", MISCLASSIFIED_STATES)
def test_routing_state_with_an_invalid_address_is_a_format_error(data: bytes) -> None:
    with pytest.raises(FormatError, match="routing state"):
        dht.decode_routing_state(data)


def test_load_routing_state_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    assert dht.load_routing_state(tmp_path / "dht-state.json", bytes(20)) == []


def test_load_routing_state_reads_its_own_file(tmp_path: Path) -> None:
    path = tmp_path / "dht-state.json"
    neighbours = [dht.Contact(bytes(range(20)), Address("10.0.0.1", 4000))]
    path.write_bytes(dht.encode_routing_state(bytes(20), neighbours))
    assert dht.load_routing_state(path, bytes(20)) == neighbours


@pytest.mark.parametrize(
    "data",
    [b"garbage", b"", b"\x80\x04\x95pickled", as_bytes(state_document(version=3))],
)
def test_load_routing_state_ignores_a_damaged_file_with_a_warning(
    tmp_path: Path, data: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "dht-state.json"
    path.write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="p2pbackup.dht.adapter"):
        assert dht.load_routing_state(path, bytes(20)) == []
    assert f"ignoring {path}" in caplog.text


def test_load_routing_state_ignores_a_file_with_an_invalid_port(tmp_path: Path) -> None:
    path = tmp_path / "dht-state.json"
    path.write_bytes(as_bytes(state_document(neighbours=[neighbour(port=70000)])))
    assert dht.load_routing_state(path, bytes(20)) == []


def test_load_routing_state_ignores_another_nodes_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "dht-state.json"
    others = bytes([7]) * 20
    path.write_bytes(
        dht.encode_routing_state(others, [dht.Contact(bytes(20), Address("10.0.0.1", 4000))])
    )
    with caplog.at_level(logging.WARNING, logger="p2pbackup.dht.adapter"):
        assert dht.load_routing_state(path, bytes(20)) == []
    assert others.hex() in caplog.text


def test_load_routing_state_of_a_directory_is_empty(tmp_path: Path) -> None:
    assert dht.load_routing_state(tmp_path, bytes(20)) == []


# --- addresses and sequences -------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "wildcard"),
    [
        ("0.0.0.0", True),
        ("::", True),
        ("0:0:0:0:0:0:0:0", True),
        ("127.0.0.1", False),
        ("192.0.2.1", False),
        ("::1", False),
        ("2001:db8::1", False),
        ("localhost", False),
        ("example.org", False),
        ("", False),
        ("*", False),
        ("0.0.0", False),
    ],
)
def test_is_wildcard(host: str, wildcard: bool) -> None:
    assert dht.is_wildcard(host) is wildcard


@given(previous=st.integers(0, 2**62), now=st.floats(0, 4e9, allow_nan=False))
def test_next_sequence_is_above_the_previous_and_the_clock(previous: int, now: float) -> None:
    sequence = discovery.next_sequence(previous, now)
    assert sequence > previous
    assert sequence >= math.floor(now * 1000)


def test_next_sequence_counts_milliseconds() -> None:
    assert discovery.next_sequence(0, 1_800_000_000.25) == 1_800_000_000_250
    # A clock that stepped back still moves the sequence on.
    assert discovery.next_sequence(1_800_000_000_250, 1_700_000_000.0) == 1_800_000_000_251
    # A node that lost its state outnumbers what it signed a second earlier.
    assert discovery.next_sequence(0, 1_800_000_001.0) > 1_800_000_000_250


def test_an_explicit_advertise_wins() -> None:
    chosen = discovery.advertised_addresses(
        Address("0.0.0.0", 0),
        4000,
        [Address("Backup.Example.ORG", 5000), Address("2001:DB8::7", 5001)],
    )
    assert chosen == [RecordAddress("backup.example.org", 5000), RecordAddress("2001:db8::7", 5001)]


def test_a_specific_listen_host_is_published_with_the_bound_port() -> None:
    # The listen address may say port 0; what counts is the port actually bound.
    assert discovery.advertised_addresses(Address("192.0.2.5", 0), 4000) == [
        RecordAddress("192.0.2.5", 4000)
    ]


def test_a_wildcard_listen_host_publishes_a_real_address() -> None:
    [chosen] = discovery.advertised_addresses(Address("0.0.0.0", 0), 4000)
    assert not dht.is_wildcard(chosen.host)
    assert chosen.port == 4000
    assert ":" not in chosen.host  # the listener's family


def test_both_families_publish_one_address_of_each_family_that_routes_out() -> None:
    chosen = discovery.advertised_addresses(Address("::", 0), 4000)
    assert chosen and all(not dht.is_wildcard(a.host) and a.port == 4000 for a in chosen)
    families = [":" in a.host for a in chosen]
    assert sorted(set(families)) == sorted(families)  # never two of one family
    # A family with no route out is left out (unless neither has one).
    if len(chosen) > 1:
        assert all(not ipaddress.ip_address(a.host).is_loopback for a in chosen)


@pytest.mark.parametrize(
    ("listen", "port", "advertise"),
    [
        pytest.param(Address("0.0.0.0", 0), 4000, [Address("1.2.3", 80)], id="bad ip"),
        pytest.param(Address("0.0.0.0", 0), 4000, [Address("exa!mple.org", 80)], id="bad name"),
        pytest.param(Address("0.0.0.0", 0), 4000, [Address("10.0.0.1", 0)], id="advertise port 0"),
        pytest.param(Address("192.0.2.5", 0), 0, [], id="bound port 0"),
        pytest.param(Address("h" * 256, 0), 4000, [], id="host too long"),
    ],
)
def test_an_address_that_cannot_go_into_a_record_is_a_usage_error(
    listen: Address, port: int, advertise: list[Address]
) -> None:
    with pytest.raises(UsageError, match="cannot publish"):
        discovery.advertised_addresses(listen, port, advertise)
