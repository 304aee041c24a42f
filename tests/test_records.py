"""Signed DHT records: round trips, hostile bytes, forgeries, staleness, and the
newest-valid-wins rule that replaces kademlia's majority vote."""

from __future__ import annotations

import contextlib
import hashlib

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pbackup.core import crypto
from p2pbackup.core.keys import node_id_for
from p2pbackup.dht import records
from p2pbackup.dht.records import (
    MAX_ADDRESSES,
    MAX_LIFETIME,
    MAX_RECORD_SIZE,
    MAX_RELAYS,
    ContactRecord,
    RecordAddress,
    RecordKind,
    RelayAddress,
    RootPointer,
    accept_store,
    choose_newest,
    decode_record,
    dht_key,
    dht_key_string,
    encode_record,
    newer,
    sign_contact,
    sign_root_pointer,
    verify_record,
)
from p2pbackup.errors import (
    FormatError,
    IntegrityError,
    RecordExpiredError,
    RecordKeyError,
    SignatureError,
)

SEED = bytes(range(32))
OTHER_SEED = bytes(range(1, 33))
NOW = 1_800_000_000
LIFETIME = 3600
ADDRESSES = (RecordAddress("192.0.2.7", 4000), RecordAddress("2001:db8::1", 4001))


def contact(
    seed: bytes = SEED, *, sequence: int = 1, now: int = NOW, **kw: object
) -> ContactRecord:
    fields: dict[str, object] = {
        "addresses": ADDRESSES,
        "storage_offered": 10**9,
        "lifetime": LIFETIME,
    }
    fields.update(kw)
    return sign_contact(seed, sequence=sequence, now=now, **fields)  # type: ignore[arg-type]


def root(seed: bytes = SEED, *, sequence: int = 1) -> RootPointer:
    return sign_root_pointer(
        seed, addresses=ADDRESSES, sequence=sequence, now=NOW, lifetime=LIFETIME
    )


def key_of(record: records.Record) -> bytes:
    return dht_key(records.record_kind(record), record.node_id)


# --- keys --------------------------------------------------------------------------------


def test_dht_key_strings_are_the_documented_ones() -> None:
    node_id = bytes.fromhex("00ff10" + "ab" * 17)
    assert dht_key_string(RecordKind.CONTACT, node_id) == "p2pbackup:contact:00ff10" + "ab" * 17
    assert dht_key_string(RecordKind.ROOT, node_id) == "p2pbackup:root:00ff10" + "ab" * 17
    # What kademlia.utils.digest gives for the string, so a stock client finds it.
    expected = hashlib.sha1(b"p2pbackup:contact:00ff10" + b"ab" * 17).digest()
    assert dht_key(RecordKind.CONTACT, node_id) == expected


def test_dht_key_matches_the_kademlia_package() -> None:
    from kademlia import utils  # a dependency of the package, read here only

    node_id = node_id_for(crypto.signing_public_key(SEED))
    for kind in RecordKind:
        assert dht_key(kind, node_id) == utils.digest(dht_key_string(kind, node_id))


# --- round trips -------------------------------------------------------------------------

hosts = st.one_of(
    st.ip_addresses().map(str),
    st.from_regex(r"[a-z][a-z0-9-]{0,20}[a-z0-9](\.[a-z][a-z0-9]{0,10}){0,3}", fullmatch=True),
)
addresses = st.lists(
    st.builds(RecordAddress, hosts, st.integers(1, 65535)), min_size=1, max_size=MAX_ADDRESSES
)
u64 = st.integers(0, 2**64 - 1)


@given(addresses, u64, u64, st.integers(1, MAX_LIFETIME), st.booleans())
def test_round_trip(
    addrs: list[RecordAddress], offered: int, sequence: int, lifetime: int, is_contact: bool
) -> None:
    record: records.Record
    if is_contact:
        record = sign_contact(
            SEED,
            addresses=addrs,
            storage_offered=offered,
            sequence=sequence,
            now=NOW,
            lifetime=lifetime,
        )
    else:
        record = sign_root_pointer(
            SEED, addresses=addrs, sequence=sequence, now=NOW, lifetime=lifetime
        )
    data = encode_record(record)
    assert len(data) <= MAX_RECORD_SIZE
    assert decode_record(data) == record
    verify_record(decode_record(data), key=key_of(record), now=NOW)


relays = st.lists(
    st.builds(
        RelayAddress,
        st.binary(min_size=20, max_size=20),
        st.builds(RecordAddress, hosts, st.integers(1, 65535)),
    ),
    max_size=MAX_RELAYS,
    unique_by=lambda relay: relay.node_id,
)


@given(addresses, relays, u64)
def test_round_trip_with_relays(
    addrs: list[RecordAddress], hops: list[RelayAddress], sequence: int
) -> None:
    record = contact(addresses=addrs, relays=hops, sequence=sequence)
    data = encode_record(record)
    # Version 2 only when relays are named: a record without them reads as
    # it did before relays existed.
    assert data[4] == (records.RELAY_VERSION if hops else records.VERSION)
    assert len(data) <= MAX_RECORD_SIZE
    assert decode_record(data) == record
    verify_record(decode_record(data), key=key_of(record), now=NOW)


RELAY = RelayAddress(b"\x07" * 20, RecordAddress("198.51.100.3", 47470))


def test_a_record_without_relays_is_the_version_1_layout() -> None:
    # The bytes the encoder wrote before version 2 existed.
    data = encode_record(contact())
    assert hashlib.sha256(data).hexdigest() == (
        "8f96f090a1276557b5de7063fa8554a99cb66f667b94f42010ba7ff690ec1a07"
    )


def test_relays_are_signed() -> None:
    record = contact(relays=[RELAY])
    moved = attrs.evolve(
        record, relays=(RelayAddress(RELAY.node_id, RecordAddress("203.0.113.9", 1)),)
    )
    with pytest.raises(SignatureError):
        verify_record(moved, key=key_of(record), now=NOW)
    with pytest.raises(SignatureError):
        verify_record(attrs.evolve(record, relays=()), key=key_of(record), now=NOW)


def test_bad_relays_are_refused() -> None:
    own_id = contact().node_id
    other = RelayAddress(b"\x08" * 20, RELAY.address)
    with pytest.raises(FormatError, match="at most"):
        contact(relays=[RELAY, other, RelayAddress(b"\x09" * 20, RELAY.address)])
    with pytest.raises(FormatError, match="itself or named twice"):
        contact(relays=[RELAY, RELAY])
    with pytest.raises(FormatError, match="itself or named twice"):
        contact(relays=[RelayAddress(own_id, RELAY.address)])
    with pytest.raises(FormatError, match="relay node id"):
        contact(relays=[RelayAddress(b"\x07" * 19, RELAY.address)])
    with pytest.raises(FormatError, match="port"):
        contact(relays=[RelayAddress(RELAY.node_id, RecordAddress("a", 0))])


def test_version_2_needs_relays_and_a_contact_record() -> None:
    data = bytearray(encode_record(contact(relays=[RELAY])))
    count_at = len(data) - crypto.SIGNATURE_SIZE - (20 + 1 + len("198.51.100.3") + 2) - 1
    assert data[count_at] == 1
    for count in (0, MAX_RELAYS + 1):
        data[count_at] = count
        with pytest.raises(FormatError, match="relays"):
            decode_record(bytes(data))
    pointer = bytearray(encode_record(root()))
    pointer[4] = records.RELAY_VERSION
    with pytest.raises(FormatError, match="root record has no version 2"):
        decode_record(bytes(pointer))


def test_kinds_are_distinct_on_the_wire() -> None:
    c, r = contact(), root()
    assert isinstance(decode_record(encode_record(c)), ContactRecord)
    assert isinstance(decode_record(encode_record(r)), RootPointer)
    assert key_of(c) != key_of(r)


def test_from_host_port_canonicalises() -> None:
    assert RecordAddress.from_host_port("2001:DB8:0::1", 80).host == "2001:db8::1"
    assert RecordAddress.from_host_port("Node.Example.ORG", 80).host == "node.example.org"
    for host, port in [
        ("", 1),
        ("a b", 1),
        ("x" * 256, 1),
        ("ok", 0),
        ("ok", 65536),
        ("1.2.3.04", 1),
        ("é.fr", 1),
    ]:
        with pytest.raises(FormatError):
            RecordAddress.from_host_port(host, port)


@pytest.mark.parametrize(
    "address",
    [
        RecordAddress("2001:DB8::1", 1),  # not canonical text
        RecordAddress("Example.com", 1),  # not lowercase
        RecordAddress("1.2.3.999", 1),  # mistyped IP
        RecordAddress("a..b", 1),
        RecordAddress("ok", 0),
    ],
)
def test_encoder_refuses_what_the_decoder_would(address: RecordAddress) -> None:
    with pytest.raises(FormatError):
        contact(addresses=[address])


def test_encoder_refuses_bad_counts_and_numbers() -> None:
    with pytest.raises(FormatError, match="address count"):
        contact(addresses=[])
    with pytest.raises(FormatError, match="address count"):
        contact(addresses=[RecordAddress("a", 1)] * (MAX_ADDRESSES + 1))
    with pytest.raises(FormatError, match="sequence"):
        contact(sequence=2**64)
    with pytest.raises(FormatError, match="storage offered"):
        contact(storage_offered=-1)
    with pytest.raises(FormatError, match="lifetime"):
        contact(lifetime=MAX_LIFETIME + 1)


# --- size ----------------------------------------------------------------------------------


def _long_host(tag: int) -> str:
    label = "a" * 62
    return ".".join([f"{tag}{label}"] * 3 + ["b" * 63])  # 255 characters


def test_largest_record_is_far_under_the_kademlia_limit() -> None:
    big = [RecordAddress(_long_host(i), 65535) for i in range(MAX_ADDRESSES)]
    assert len(big[0].host) == 255
    hops = [RelayAddress(bytes([i]) * 20, big[i]) for i in range(MAX_RELAYS)]
    data = encode_record(contact(addresses=big, relays=hops))
    assert len(data) <= MAX_RECORD_SIZE < 8192
    verify_record(decode_record(data), key=key_of(contact()), now=NOW)


def test_oversize_input_is_refused_before_parsing() -> None:
    with pytest.raises(FormatError, match="limit"):
        decode_record(encode_record(contact()) + bytes(MAX_RECORD_SIZE))


# --- malformed bytes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: b"XXXX" + d[4:], "magic"),
        (lambda d: d[:4] + b"\x03" + d[5:], "version"),
        (lambda d: d[:4] + b"\x02" + d[5:], "truncated in relay count"),
        (lambda d: d[:5] + b"\x09" + d[6:], "kind"),
        (lambda d: d[:-1], r"stray|truncated"),
        (lambda d: d + b"\0", r"stray|truncated"),
        (lambda d: d[:10], "truncated"),
        (lambda d: b"", "truncated"),
    ],
)
def test_malformed_is_format_error(mutate: object, message: str) -> None:
    data = encode_record(contact())
    with pytest.raises(FormatError, match=message):
        decode_record(mutate(data))  # type: ignore[operator]


def test_absurd_address_count_is_refused() -> None:
    record = contact()
    data = bytearray(encode_record(record))
    count_at = records._HEAD.size + 8
    assert data[count_at] == len(ADDRESSES)
    for count in (0, MAX_ADDRESSES + 1, 255):
        data[count_at] = count
        with pytest.raises(FormatError, match=r"address count|truncated"):
            decode_record(bytes(data))


@pytest.mark.parametrize(
    "record",
    [contact(), contact(relays=[RELAY]), root()],
    ids=["contact", "contact with a relay", "root"],
)
def test_every_single_byte_mutation_is_caught(record: records.Record) -> None:
    data = encode_record(record)
    key = key_of(record)
    for i in range(len(data)):
        for flip in (0x01, 0x80, 0xFF):
            mutated = bytearray(data)
            mutated[i] ^= flip
            try:
                decoded = decode_record(bytes(mutated))
            except FormatError:
                continue
            # Canonical: what decodes re-encodes to the same bytes, so the
            # mutation changed content, and the signature must not cover it.
            assert encode_record(decoded) == bytes(mutated)
            with pytest.raises(IntegrityError):
                verify_record(decoded, key=key, now=NOW)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_format_error(data: bytes) -> None:
    with contextlib.suppress(FormatError):
        decode_record(data)


@given(st.integers(0, 200), st.binary(min_size=1, max_size=8))
def test_spliced_bytes_only_raise_format_error(at: int, junk: bytes) -> None:
    data = encode_record(contact())
    with contextlib.suppress(FormatError):
        decode_record(data[:at] + junk + data[at:])


# --- verification --------------------------------------------------------------------------


def test_valid_record_verifies() -> None:
    record = contact()
    verify_record(record, key=key_of(record), now=NOW)
    verify_record(record, key=key_of(record), now=NOW + LIFETIME - 1)


def test_forged_with_another_key() -> None:
    honest = contact()
    # The forger keeps the victim's id and key but can only sign with its own seed.
    forged = attrs.evolve(
        honest,
        addresses=(RecordAddress("203.0.113.66", 6666),),
        signature=crypto.sign(OTHER_SEED, records.signed_bytes(honest)),
    )
    with pytest.raises(SignatureError, match="signature"):
        verify_record(forged, key=key_of(honest), now=NOW)


def test_altered_content_breaks_signature() -> None:
    honest = contact()
    altered = attrs.evolve(honest, sequence=honest.sequence + 1)
    with pytest.raises(SignatureError):
        verify_record(altered, key=key_of(honest), now=NOW)


def test_node_id_must_be_hash_of_key() -> None:
    honest = contact()
    victim_id = node_id_for(crypto.signing_public_key(OTHER_SEED))
    # Signed properly by the attacker, but claiming the victim's node id.
    unsigned = attrs.evolve(honest, node_id=victim_id)
    claimed = attrs.evolve(unsigned, signature=crypto.sign(SEED, records.signed_bytes(unsigned)))
    with pytest.raises(RecordKeyError, match="hash of its public key"):
        verify_record(claimed, key=dht_key(RecordKind.CONTACT, victim_id), now=NOW)


def test_stored_under_another_nodes_key() -> None:
    mine, theirs = contact(), contact(OTHER_SEED)
    with pytest.raises(RecordKeyError, match="DHT key"):
        verify_record(mine, key=key_of(theirs), now=NOW)


def test_stored_under_the_other_kinds_key() -> None:
    record = contact()
    with pytest.raises(RecordKeyError, match="DHT key"):
        verify_record(record, key=dht_key(RecordKind.ROOT, record.node_id), now=NOW)


def test_expired() -> None:
    record = contact()
    with pytest.raises(RecordExpiredError, match="expired"):
        verify_record(record, key=key_of(record), now=record.expiry)


def test_expiry_far_in_the_future_is_refused() -> None:
    record = contact(now=NOW + 10 * MAX_LIFETIME)
    with pytest.raises(RecordExpiredError, match="after now"):
        verify_record(record, key=key_of(record), now=NOW)


# --- newest valid wins ---------------------------------------------------------------------


def test_newer_orders_by_sequence_then_expiry_then_bytes() -> None:
    assert newer(contact(sequence=2), contact(sequence=1, now=NOW + 100))
    assert newer(contact(sequence=1, now=NOW + 1), contact(sequence=1))
    a = contact(sequence=1, storage_offered=1)
    b = contact(sequence=1, storage_offered=2)
    assert newer(a, b) != newer(b, a)
    assert not newer(a, a)


def test_choose_newest_ignores_an_invalid_majority() -> None:
    honest = contact(sequence=5)
    key = key_of(honest)
    stale = contact(sequence=3)
    expired = contact(sequence=9, now=NOW - 2 * LIFETIME)
    forged = attrs.evolve(
        contact(sequence=50),
        signature=crypto.sign(OTHER_SEED, records.signed_bytes(contact(sequence=50))),
    )
    other_node = contact(OTHER_SEED, sequence=99)
    majority = (
        [encode_record(forged)] * 5 + [encode_record(expired)] * 5 + [encode_record(other_node)] * 5
    )
    values = [
        *majority,
        encode_record(stale),
        encode_record(stale),
        b"garbage",
        encode_record(honest),
    ]
    assert choose_newest(values, key=key, now=NOW) == honest
    assert choose_newest(reversed(values), key=key, now=NOW) == honest
    assert choose_newest([forged, honest], key=key, now=NOW) == honest


def test_choose_newest_of_nothing_valid_is_none() -> None:
    record = contact()
    assert choose_newest([], key=key_of(record), now=NOW) is None
    assert choose_newest([encode_record(record)], key=key_of(record), now=record.expiry) is None


def test_choose_newest_tie_is_order_independent() -> None:
    a = contact(sequence=7, storage_offered=1)
    b = contact(sequence=7, storage_offered=2)
    key = key_of(a)
    assert choose_newest([a, b], key=key, now=NOW) == choose_newest([b, a], key=key, now=NOW)


# --- storage decisions ---------------------------------------------------------------------


def test_accept_store_first_valid_record() -> None:
    record = contact()
    assert accept_store(None, encode_record(record), key=key_of(record), now=NOW)


def test_accept_store_newer_replaces_and_stale_is_rejected() -> None:
    old, new = encode_record(contact(sequence=1)), encode_record(contact(sequence=2))
    key = key_of(contact())
    assert accept_store(old, new, key=key, now=NOW)
    assert not accept_store(new, old, key=key, now=NOW)
    assert not accept_store(new, new, key=key, now=NOW)


def test_accept_store_same_sequence_other_bytes_rejected() -> None:
    a = encode_record(contact(sequence=4, storage_offered=1))
    b = encode_record(contact(sequence=4, storage_offered=2))
    key = key_of(contact())
    assert a != b
    assert not accept_store(a, b, key=key, now=NOW)
    assert not accept_store(b, a, key=key, now=NOW)


def test_accept_store_rejects_invalid_incoming() -> None:
    honest = contact()
    key = key_of(honest)
    forged = attrs.evolve(
        contact(sequence=9),
        signature=crypto.sign(OTHER_SEED, records.signed_bytes(contact(sequence=9))),
    )
    for incoming in (
        b"",
        b"arbitrary kademlia set",
        encode_record(forged),
        encode_record(contact(sequence=9, now=NOW - 2 * LIFETIME)),  # expired
        encode_record(contact(OTHER_SEED, sequence=9)),  # another node's
        encode_record(root(sequence=9)),  # another kind
        encode_record(honest) + b"\0",
    ):
        assert not accept_store(None, incoming, key=key, now=NOW)
        assert not accept_store(encode_record(honest), incoming, key=key, now=NOW)


def test_accept_store_expired_holding_counts_as_nothing() -> None:
    held = encode_record(contact(sequence=9))
    lower = encode_record(contact(sequence=2, now=NOW + LIFETIME))
    key = key_of(contact())
    later = NOW + LIFETIME  # the held record has just expired
    assert accept_store(held, lower, key=key, now=later)
    assert accept_store(b"junk", lower, key=key, now=later)
