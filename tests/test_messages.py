"""Wire messages: round trips of every type, framing fed in any pieces, and hostile
input that only ever yields RemoteProtocolError."""

from __future__ import annotations

import contextlib
import typing
from collections.abc import Iterator

import attrs
import msgpack
import pytest
import trio
import trio.testing
from hypothesis import assume, given
from hypothesis import strategies as st

from p2pbackup.core.fields import MAX_UINT
from p2pbackup.errors import LocalProtocolError, RemoteProtocolError
from p2pbackup.wire import messages
from p2pbackup.wire.messages import (
    MAX_AUDIT_BLOCKS,
    MAX_BLOCK_INDEX,
    MAX_FRAME_SIZE,
    MAX_LEASE_SECONDS,
    MAX_LIST_LIMIT,
    MAX_PROOF_HASHES,
    MAX_REFUSAL_TEXT,
    MAX_SHARD_SIZE,
    MESSAGE_TYPES,
    PIECE_SIZE,
    REQUEST_TYPES,
    RESPONSE_TYPES,
    AllDeleted,
    Audit,
    AuditProof,
    Delegate,
    Delegated,
    DelegateRevoked,
    DeleteAll,
    Deleted,
    DeleteShard,
    DialBack,
    DialBackResult,
    DirectAddresses,
    DirectConnect,
    DirectReady,
    DirectSync,
    FrameDecoder,
    GetRepairLog,
    GetRoot,
    GetShard,
    GetUsage,
    GrantStored,
    HasShard,
    LeaseRenewed,
    Leaving,
    ListShards,
    Message,
    Noted,
    PutGrant,
    PutRoot,
    PutShard,
    Ready,
    RefusalCode,
    Refused,
    RelayAccept,
    RelayConnect,
    RelayIncoming,
    RelayJoined,
    RelayPing,
    RelayPong,
    RelayReserve,
    RelayReserved,
    RenewLease,
    RepairLogData,
    RevokeDelegate,
    RootData,
    RootStored,
    ShardData,
    ShardEntry,
    ShardList,
    ShardPiece,
    ShardStatus,
    Stored,
    Usage,
    audit_answer_fits,
    decode_message,
    delete_all_statement,
    delete_statement,
    encode_frame,
    encode_frames,
    encode_message,
    is_request,
    piece_frame_head,
    put_statement,
    renew_statement,
)
from p2pbackup.wire.rpc import MessageChannel

# --- Strategies: one per message type -------------------------------------------

ids = st.binary(min_size=32, max_size=32)
signatures = st.binary(min_size=64, max_size=64)
nonces = st.binary(min_size=16, max_size=64)
sizes = st.integers(0, MAX_SHARD_SIZE)
block_sizes = st.sampled_from([1 << e for e in range(9, 21)])
leases = st.integers(1, MAX_LEASE_SECONDS)
uints = st.integers(0, MAX_UINT)
small_data = st.binary(max_size=300)
node_ids = st.binary(min_size=20, max_size=20)
circuits = st.binary(min_size=16, max_size=16)


@st.composite
def audit_proofs(draw: st.DrawFn) -> AuditProof:
    count = draw(st.integers(0, 6))
    blocks = draw(st.lists(small_data, min_size=count, max_size=count))
    proofs = draw(st.lists(st.lists(ids, max_size=5).map(tuple), min_size=count, max_size=count))
    return AuditProof(draw(nonces), tuple(blocks), tuple(proofs))


STRATEGIES: dict[type[Message], st.SearchStrategy[Message]] = {
    PutShard: st.builds(PutShard, ids, sizes, block_sizes, ids, leases, signatures),
    ShardPiece: st.builds(ShardPiece, st.binary(min_size=1, max_size=300)),
    GetShard: st.builds(GetShard, ids, uints, st.none() | uints),
    HasShard: st.builds(HasShard, ids),
    Audit: st.builds(
        Audit,
        ids,
        nonces,
        st.lists(st.integers(0, MAX_BLOCK_INDEX), min_size=1, max_size=64).map(tuple),
    ),
    ListShards: st.builds(ListShards, st.none() | ids, st.integers(1, MAX_LIST_LIMIT)),
    RenewLease: st.builds(
        RenewLease, st.lists(ids, min_size=1, max_size=8).map(tuple), leases, signatures
    ),
    DeleteShard: st.builds(DeleteShard, ids, signatures),
    PutRoot: st.builds(PutRoot, small_data),
    GetRoot: st.just(GetRoot()),
    GetUsage: st.just(GetUsage()),
    Ready: st.just(Ready()),
    Stored: st.builds(Stored, ids, uints),
    ShardData: st.builds(ShardData, sizes),
    ShardStatus: st.builds(ShardStatus, st.booleans()),
    AuditProof: audit_proofs(),
    ShardList: st.builds(
        ShardList,
        st.lists(st.builds(ShardEntry, ids, sizes, uints), max_size=6).map(tuple),
        st.booleans(),
    ),
    LeaseRenewed: st.builds(LeaseRenewed, uints, st.lists(ids, max_size=6).map(tuple)),
    Deleted: st.builds(Deleted, st.booleans()),
    RootStored: st.just(RootStored()),
    RootData: st.builds(RootData, st.none() | small_data),
    Usage: st.builds(Usage, uints, st.none() | uints),
    DeleteAll: st.builds(DeleteAll, signatures),
    Leaving: st.just(Leaving()),
    AllDeleted: st.builds(AllDeleted, uints, st.booleans()),
    Noted: st.builds(Noted, st.booleans()),
    Refused: st.builds(Refused, st.sampled_from(RefusalCode), st.text(max_size=40)),
    DialBack: st.builds(
        DialBack, st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=8).map(tuple)
    ),
    DialBackResult: st.builds(
        DialBackResult, st.lists(st.booleans(), min_size=1, max_size=8).map(tuple)
    ),
    RelayReserve: st.just(RelayReserve()),
    RelayConnect: st.builds(RelayConnect, node_ids),
    RelayAccept: st.builds(RelayAccept, circuits),
    RelayPing: st.just(RelayPing()),
    RelayReserved: st.builds(RelayReserved, st.integers(1, messages.MAX_KEEPALIVE_SECONDS)),
    RelayIncoming: st.builds(RelayIncoming, circuits, node_ids),
    RelayJoined: st.builds(RelayJoined, st.none() | st.text(max_size=40)),
    DirectConnect: st.builds(DirectConnect, st.lists(st.text(max_size=30), max_size=4).map(tuple)),
    DirectAddresses: st.builds(
        DirectAddresses, st.lists(st.text(max_size=30), max_size=4).map(tuple)
    ),
    DirectSync: st.just(DirectSync()),
    DirectReady: st.just(DirectReady()),
    RelayPong: st.just(RelayPong()),
    Delegate: st.builds(Delegate, st.binary(min_size=1, max_size=300)),
    Delegated: st.builds(Delegated, node_ids, uints),
    RevokeDelegate: st.builds(RevokeDelegate, node_ids, uints),
    DelegateRevoked: st.just(DelegateRevoked()),
    PutGrant: st.builds(
        PutGrant, st.binary(min_size=1, max_size=300), st.binary(min_size=1, max_size=300)
    ),
    GrantStored: st.builds(GrantStored, uints),
    GetRepairLog: st.just(GetRepairLog()),
    RepairLogData: st.builds(RepairLogData, st.none() | st.binary(min_size=1, max_size=300)),
}
any_message = st.one_of(*STRATEGIES.values())

ID = bytes(range(32))
SIG = bytes(range(64))

#: One message per type with every optional field set and every array non-empty,
#: so that each field can be swapped for a wrong one.
EXAMPLES: dict[type[Message], Message] = {
    PutShard: PutShard(ID, 1000, 4096, ID, 3600, SIG),
    ShardPiece: ShardPiece(b"piece"),
    GetShard: GetShard(ID, 10, 20),
    HasShard: HasShard(ID),
    Audit: Audit(ID, b"n" * 16, (0, 5)),
    ListShards: ListShards(ID, 100),
    RenewLease: RenewLease((ID, ID), 60, SIG),
    DeleteShard: DeleteShard(ID, SIG),
    PutRoot: PutRoot(b"root"),
    GetRoot: GetRoot(),
    GetUsage: GetUsage(),
    Ready: Ready(),
    Stored: Stored(ID, 1_700_000_000),
    ShardData: ShardData(5),
    ShardStatus: ShardStatus(True),
    AuditProof: AuditProof(b"n" * 16, (b"block",), ((ID, ID),)),
    ShardList: ShardList((ShardEntry(ID, 7, 99),), True),
    LeaseRenewed: LeaseRenewed(99, (ID,)),
    Deleted: Deleted(False),
    RootStored: RootStored(),
    RootData: RootData(b"root"),
    Usage: Usage(5, 10),
    DeleteAll: DeleteAll(SIG),
    Leaving: Leaving(),
    AllDeleted: AllDeleted(12, True),
    Noted: Noted(True),
    Refused: Refused(RefusalCode.FULL, "over quota"),
    DialBack: DialBack(("203.0.113.5:4001", "192.168.1.20:4001")),
    DialBackResult: DialBackResult((True, False)),
    RelayReserve: RelayReserve(),
    RelayConnect: RelayConnect(ID[:20]),
    RelayAccept: RelayAccept(ID[:16]),
    RelayPing: RelayPing(),
    RelayReserved: RelayReserved(15),
    RelayIncoming: RelayIncoming(ID[:16], ID[:20]),
    RelayJoined: RelayJoined("203.0.113.5:47470"),
    DirectConnect: DirectConnect(("203.0.113.5:47470",)),
    DirectAddresses: DirectAddresses(()),
    DirectSync: DirectSync(),
    DirectReady: DirectReady(),
    RelayPong: RelayPong(),
    Delegate: Delegate(b"certificate"),
    Delegated: Delegated(ID[:20], 1_700_000_000),
    RevokeDelegate: RevokeDelegate(ID[:20], 1_700_000_000),
    DelegateRevoked: DelegateRevoked(),
    PutGrant: PutGrant(b"grant", b"certificate"),
    GrantStored: GrantStored(3),
    GetRepairLog: GetRepairLog(),
    RepairLogData: RepairLogData(b"log"),
}
#: Fields that may be nil.
OPTIONAL_FIELDS = {
    (GetShard, 2),
    (ListShards, 0),
    (RootData, 0),
    (Usage, 1),
    (RepairLogData, 0),
    (RelayJoined, 0),
}

#: The wire type codes, as the protocol specification gives them.
TYPE_CODES: dict[type[Message], int] = {
    PutShard: 0x01,
    GetShard: 0x02,
    HasShard: 0x03,
    Audit: 0x04,
    ListShards: 0x05,
    RenewLease: 0x06,
    DeleteShard: 0x07,
    PutRoot: 0x08,
    GetRoot: 0x09,
    GetUsage: 0x0A,
    DeleteAll: 0x0B,
    Leaving: 0x0C,
    ShardPiece: 0x20,
    Ready: 0x40,
    Stored: 0x41,
    ShardData: 0x42,
    ShardStatus: 0x43,
    AuditProof: 0x44,
    ShardList: 0x45,
    LeaseRenewed: 0x46,
    Deleted: 0x47,
    RootStored: 0x48,
    RootData: 0x49,
    Usage: 0x4A,
    AllDeleted: 0x4B,
    Noted: 0x4C,
    Refused: 0x4F,
    DialBack: 0x0D,
    DialBackResult: 0x4D,
    RelayReserve: 0x18,
    RelayConnect: 0x19,
    RelayAccept: 0x1A,
    RelayPing: 0x1B,
    RelayReserved: 0x58,
    RelayIncoming: 0x59,
    RelayJoined: 0x5A,
    DirectConnect: 0x1C,
    DirectAddresses: 0x5C,
    DirectSync: 0x1D,
    DirectReady: 0x5D,
    RelayPong: 0x5B,
    Delegate: 0x0E,
    Delegated: 0x4E,
    RevokeDelegate: 0x10,
    DelegateRevoked: 0x50,
    PutGrant: 0x11,
    GrantStored: 0x51,
    GetRepairLog: 0x12,
    RepairLogData: 0x52,
}


def wire(message: Message) -> tuple[object, ...]:
    """The msgpack array a message encodes to."""
    value = msgpack.unpackb(encode_message(message), use_list=False)
    assert isinstance(value, tuple)
    return value


def body_of(*items: object) -> bytes:
    body = msgpack.packb(list(items), use_bin_type=True)
    assert isinstance(body, bytes)
    return body


def framed(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def decode_all(decoder: FrameDecoder) -> Iterator[Message]:
    while (message := decoder.next_message()) is not None:
        yield message


def remote_error(data: bytes) -> str:
    """The message of the RemoteProtocolError that a decoder raises on ``data``."""
    decoder = FrameDecoder()
    decoder.feed(data)
    with pytest.raises(RemoteProtocolError) as info:
        list(decode_all(decoder))
    return str(info.value)


# --- Coverage of the type tables -------------------------------------------------


def test_every_message_type_has_a_strategy_an_example_and_a_code() -> None:
    assert set(typing.get_args(Message)) == set(MESSAGE_TYPES)
    assert set(STRATEGIES) == set(MESSAGE_TYPES)
    assert set(EXAMPLES) == set(MESSAGE_TYPES)
    assert set(TYPE_CODES) == set(MESSAGE_TYPES)


#: Messages whose fields changed, and the version they are written at now.
NEWER_VERSIONS = {RelayJoined: 2}


def test_type_codes_are_pinned_and_versions_are_as_documented() -> None:
    for cls, example in EXAMPLES.items():
        code, version, *_ = wire(example)
        assert (code, version) == (TYPE_CODES[cls], NEWER_VERSIONS.get(cls, 1)), cls.__name__


def test_relay_joined_tells_the_observed_address_or_nothing() -> None:
    assert wire(RelayJoined("203.0.113.5:4001")) == (0x5A, 2, "203.0.113.5:4001")
    assert wire(RelayJoined()) == (0x5A, 2, None)
    assert decode_message(body_of(0x5A, 2, "[2001:db8::1]:9")) == RelayJoined("[2001:db8::1]:9")


def test_the_usage_answer_keeps_its_version_1_shape() -> None:
    # ``offered`` took the place of the per-owner quota without a new version:
    # the same two fields (u63, u63 or nil), as older peers wrote them.
    assert encode_message(Usage(5, 10)) == bytes.fromhex("944a01050a")
    assert encode_message(Usage(5, None)) == bytes.fromhex("944a0105c0")
    assert decode_message(bytes.fromhex("944a01050a")) == Usage(used=5, offered=10)


def test_requests_responses_and_the_piece_partition_the_types() -> None:
    assert not set(REQUEST_TYPES) & set(RESPONSE_TYPES)
    assert {*REQUEST_TYPES, *RESPONSE_TYPES, ShardPiece} == set(MESSAGE_TYPES)
    for cls, example in EXAMPLES.items():
        assert is_request(example) == (cls in REQUEST_TYPES)
    assert not is_request(ShardPiece(b"x"))
    assert not is_request(Refused(RefusalCode.BUSY, ""))


# --- Round trips -----------------------------------------------------------------


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda cls: cls.__name__)
@given(data=st.data())
def test_every_message_round_trips(cls: type[Message], data: st.DataObject) -> None:
    message = data.draw(STRATEGIES[cls])
    assert type(message) is cls
    decoded = decode_message(encode_message(message))
    assert decoded == message
    assert type(decoded) is cls
    decoder = FrameDecoder()
    decoder.feed(encode_frame(message))
    assert decoder.next_message() == message
    assert decoder.next_message() is None
    assert decoder.at_frame_boundary()


def test_decoded_values_have_their_declared_python_types() -> None:
    refused = decode_message(encode_message(Refused(RefusalCode.CONFLICT, "taken")))
    assert isinstance(refused, Refused)
    assert type(refused.code) is RefusalCode
    proof = decode_message(encode_message(EXAMPLES[AuditProof]))
    assert isinstance(proof, AuditProof)
    assert type(proof.blocks) is tuple and type(proof.proofs[0]) is tuple
    listing = decode_message(encode_message(EXAMPLES[ShardList]))
    assert isinstance(listing, ShardList)
    assert type(listing.entries[0]) is ShardEntry


def test_a_full_piece_fits_a_frame_and_comes_back_as_bytes() -> None:
    data = bytes(range(256)) * (PIECE_SIZE // 256)
    frame = encode_frame(ShardPiece(data))
    assert len(frame) - 4 <= MAX_FRAME_SIZE
    decoder = FrameDecoder()
    # Fed in session-sized reads, as the channel does.
    for start in range(0, len(frame), 256 * 1024):
        decoder.feed(memoryview(frame)[start : start + 256 * 1024])
    piece = decoder.next_message()
    assert isinstance(piece, ShardPiece)
    assert type(piece.data) is bytes and piece.data == data
    assert decoder.at_frame_boundary() and decoder.buffered == 0


@given(
    st.one_of(
        st.sampled_from([1, 255, 256, 65535, 65536, PIECE_SIZE - 1, PIECE_SIZE]),
        st.integers(1, PIECE_SIZE),
    )
)
def test_a_piece_frame_head_and_the_data_are_the_pieces_frame(length: int) -> None:
    data = bytes([length % 251]) * length
    head = piece_frame_head(length)
    assert head + data == encode_frame(ShardPiece(data))


@pytest.mark.parametrize("length", [0, -1, PIECE_SIZE + 1])
def test_a_piece_frame_head_refuses_what_a_piece_cannot_hold(length: int) -> None:
    with pytest.raises(LocalProtocolError, match="a piece holds"):
        piece_frame_head(length)


def test_bounds_are_inclusive() -> None:
    edge_cases: list[Message] = [
        ShardPiece(b"\xff" * PIECE_SIZE),
        PutShard(ID, MAX_SHARD_SIZE, 1 << 20, ID, MAX_LEASE_SECONDS, SIG),
        PutShard(ID, 0, 512, ID, 1, SIG),
        ListShards(None, MAX_LIST_LIMIT),
        ListShards(None, 1),
        Audit(ID, b"n" * 64, tuple(range(64))),
        Audit(ID, b"n" * 16, (MAX_BLOCK_INDEX,)),
        RenewLease((ID,) * 1000, 1, SIG),
        # 4000 bytes of UTF-8, the most a refusal can carry.
        Refused(RefusalCode.INTERNAL, "\U0001f600" * MAX_REFUSAL_TEXT),
        Usage(MAX_UINT, 0),
        ShardList(tuple(ShardEntry(ID, MAX_SHARD_SIZE, MAX_UINT) for _ in range(10_000)), False),
        RelayReserved(1),
        RelayReserved(messages.MAX_KEEPALIVE_SECONDS),
    ]
    for message in edge_cases:
        assert decode_message(encode_message(message)) == message


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (body_of(0x58, 1, 0), "RelayReserved (v1) field 'keepalive'"),
        (body_of(0x58, 1, messages.MAX_KEEPALIVE_SECONDS + 1), "field 'keepalive'"),
        (body_of(0x19, 1, b"x" * 21), "RelayConnect (v1) field 'node_id'"),
        (body_of(0x1A, 1, b"x" * 15), "RelayAccept (v1) field 'circuit'"),
        (body_of(0x59, 1, b"c" * 16, b"p" * 19), "RelayIncoming (v1) field 'peer'"),
        (body_of(0x5A, 1), "RelayJoined: unknown version 1"),
        (body_of(0x5A, 2, b"bytes"), "RelayJoined (v2) field 'observed'"),
        (body_of(0x1C, 1, ["a:1"] * 5), "DirectConnect (v1) field 'addresses'"),
        (body_of(0x5C, 1, ["x" * 263]), "DirectAddresses (v1) field 'addresses'"),
    ],
)
def test_relay_messages_keep_their_bounds(body: bytes, problem: str) -> None:
    assert problem in remote_error(framed(body))


def test_relay_messages_are_requests_the_relay_takes() -> None:
    assert set(messages.RELAY_REQUEST_TYPES) <= set(REQUEST_TYPES)
    assert set(messages.RELAY_RESPONSE_TYPES) <= set(RESPONSE_TYPES)


def test_the_largest_audit_answers_that_fit_do_fit_a_frame() -> None:
    assert MAX_PROOF_HASHES == 21  # a 1 GiB shard of 512-byte blocks
    for exponent in range(9, 21):
        block_size = 1 << exponent
        count = min(MAX_AUDIT_BLOCKS, PIECE_SIZE // block_size)
        assert audit_answer_fits(count, block_size)
        assert not audit_answer_fits(count + 1, block_size)
        proof = AuditProof(
            b"n" * 64, (b"b" * block_size,) * count, ((ID,) * MAX_PROOF_HASHES,) * count
        )
        assert decode_message(encode_message(proof)) == proof
    assert not audit_answer_fits(0, 512)
    too_deep = AuditProof(b"n" * 16, (b"b",), ((ID,) * (MAX_PROOF_HASHES + 1),))
    with pytest.raises(
        LocalProtocolError, match="'proofs' item 0: expected at most 21 items, got 22 items"
    ):
        encode_message(too_deep)


# --- Framing fed in pieces -------------------------------------------------------


@given(st.lists(any_message, min_size=1, max_size=5))
def test_byte_at_a_time_feeding_yields_the_same_messages(batch: list[Message]) -> None:
    stream = encode_frames(batch)
    boundaries = set()
    position = 0
    for message in batch:
        position += len(encode_frame(message))
        boundaries.add(position)
    decoder = FrameDecoder()
    got: list[Message] = []
    for i in range(len(stream)):
        assert decoder.next_message() is None
        decoder.feed(stream[i : i + 1])
        got.extend(decode_all(decoder))
        assert decoder.at_frame_boundary() == (i + 1 in boundaries)
    assert got == batch
    assert decoder.buffered == 0


@given(st.lists(any_message, min_size=1, max_size=6), st.data())
def test_arbitrary_split_points_yield_the_same_messages(
    batch: list[Message], data: st.DataObject
) -> None:
    stream = encode_frames(batch)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    decoder = FrameDecoder()
    got: list[Message] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        chunk = stream[start:end]
        decoder.feed(bytearray(chunk) if start % 2 else chunk)
        got.extend(decode_all(decoder))
        assert decoder.buffered == end - sum(len(encode_frame(m)) for m in got)
    assert got == batch
    assert decoder.at_frame_boundary()


def test_a_truncated_stream_is_not_at_a_frame_boundary() -> None:
    frame = encode_frame(EXAMPLES[PutShard])
    for cut in (1, 3, 4, 5, len(frame) - 1):
        decoder = FrameDecoder()
        decoder.feed(frame + frame[:cut])
        assert decoder.next_message() == EXAMPLES[PutShard]
        assert decoder.next_message() is None
        assert not decoder.at_frame_boundary()
        assert decoder.buffered == cut
    fresh = FrameDecoder()
    assert fresh.at_frame_boundary() and fresh.next_message() is None


def test_an_oversize_length_is_refused_before_the_body_arrives() -> None:
    decoder = FrameDecoder()
    prefix = (MAX_FRAME_SIZE + 1).to_bytes(4, "big")
    decoder.feed(prefix[:3])
    assert decoder.next_message() is None
    decoder.feed(prefix[3:])
    with pytest.raises(RemoteProtocolError, match=r"frame of 1114113 bytes exceeds"):
        decoder.next_message()
    # Broken for good: even a valid frame after it is not read.
    decoder.feed(encode_frame(Ready()))
    with pytest.raises(RemoteProtocolError, match="already broken"):
        decoder.next_message()
    with pytest.raises(RemoteProtocolError):
        decoder.next_message()


def test_the_largest_allowed_length_waits_for_its_body() -> None:
    decoder = FrameDecoder()
    decoder.feed(MAX_FRAME_SIZE.to_bytes(4, "big") + b"\x00" * 1000)
    assert decoder.next_message() is None
    assert decoder.buffered == 1004


# --- Hostile bodies --------------------------------------------------------------


def test_unknown_type_and_unknown_version() -> None:
    assert "unknown message type 127" in remote_error(framed(body_of(0x7F, 1)))
    assert "unknown message type 0" in remote_error(framed(body_of(0, 1)))
    fields = wire(EXAMPLES[PutShard])[2:]
    assert "PutShard: unknown version 2" in remote_error(framed(body_of(0x01, 2, *fields)))
    assert "PutShard: unknown version 0" in remote_error(framed(body_of(0x01, 0)))


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"", "malformed"),
        (msgpack.packb(5), "expected an array, got integer"),
        (msgpack.packb({}), "expected an array, got map"),
        (body_of(0x40), "expected a type code and a version"),
        (body_of("Ready", 1), "type code: expected an integer, got string"),
        # msgpack true is not the integer 1, here or anywhere.
        (body_of(True, 1), "type code: expected an integer, got boolean"),
        (body_of(0x40, True), "version: expected an integer, got boolean"),
        (body_of(0x40, 1.0), "version: expected an integer, got float"),
        (body_of(0x40, 1) + b"\xc0", "trailing bytes"),
        (body_of(0x40, 1, None), "Ready (v1): expected 0 fields, got 1"),
        (body_of(0x43, 1), "ShardStatus (v1): expected 1 fields, got 0"),
        (body_of(0x43, 1, msgpack.ExtType(1, b"x")), "malformed"),
        (body_of(0x43, 1, msgpack.ExtType(1, b"")), "extension type 1 is not allowed"),
        (b"\xc1", "malformed"),
        (b"\x91" * 5000 + b"\x01", "malformed"),
        (body_of(0x20, 1, b"x" * (PIECE_SIZE + 1)), "'data': expected 1 to 1048576 bytes"),
        (body_of(0x20, 1, b""), "'data': expected 1 to 1048576 bytes, got 0"),
        (body_of(0x4F, 1, 99, "x"), "'code': unknown RefusalCode 99"),
        (body_of(0x4F, 1, 0, "x"), "'code': unknown RefusalCode 0"),
        (body_of(0x4F, 1, 1, "x" * 1001), "'message': expected at most 1000 characters, got 1001"),
        (body_of(0x4F, 1, 1, b"\xff"), "'message': expected a string, got bytes"),
        (b"\x93\x4f\x01\xa1\xff", "malformed"),  # invalid UTF-8
        (body_of(0x01, 1, ID, 1, 1000, ID, 60, SIG), "'block_size': 1000 is not a power of two"),
        (body_of(0x01, 1, ID, 1, 256, ID, 60, SIG), "'block_size': 256 is out of range"),
        (body_of(0x01, 1, ID, -1, 512, ID, 60, SIG), "'size': -1 is out of range"),
        (body_of(0x01, 1, ID, 1 << 63, 512, ID, 60, SIG), "'size'"),
        (body_of(0x01, 1, ID[:31], 1, 512, ID, 60, SIG), "'shard_id': expected 32 bytes, got 31"),
        (body_of(0x01, 1, ID, 1, 512, ID, 0, SIG), "'lease_seconds': 0 is out of range"),
        (body_of(0x04, 1, ID, b"n" * 15, [1]), "'nonce': expected 16 to 64 bytes, got 15"),
        (body_of(0x04, 1, ID, b"n" * 16, []), "'indices': expected 1 to 64 items, got 0 items"),
        (
            body_of(0x04, 1, ID, b"n" * 16, list(range(65))),
            "'indices': expected 1 to 64 items, got 65 items",
        ),
        (body_of(0x04, 1, ID, b"n" * 16, [0, True]), "'indices' item 1: expected an integer"),
        (body_of(0x05, 1, None, 0), "'limit': 0 is out of range"),
        (body_of(0x06, 1, [], 60, SIG), "'shard_ids': expected 1 to 1000 items, got 0 items"),
        (body_of(0x43, 1, 1), "'present': expected a boolean, got integer"),
        (body_of(0x44, 1, b"n" * 16, [b"b"], []), "1 blocks but 0 proofs"),
        (body_of(0x44, 1, b"n" * 16, [b"b"], [[ID[:5]]]), "'proofs' item 0 item 0"),
        (body_of(0x45, 1, [[ID, True, 5]], False), "'entries' item 0 field 'size': expected an"),
        (body_of(0x45, 1, [[ID, 1]], False), "'entries' item 0: expected 3 fields, got 2"),
        (body_of(0x45, 1, [b"entry"], False), "'entries' item 0: expected an array, got bytes"),
    ],
)
def test_malformed_bodies_are_remote_protocol_errors(body: bytes, problem: str) -> None:
    assert problem in remote_error(framed(body))
    with pytest.raises(RemoteProtocolError):
        decode_message(body)


#: One value of every msgpack type the decoder can meet, in small and odd forms.
WRONG_VALUES: list[object] = [True, False, 7, -1, 1.5, "text", b"bytes", None, (), (1,), {}]


def _kind(value: object) -> type:
    return tuple if isinstance(value, list) else type(value)


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda cls: cls.__name__)
def test_every_field_of_the_wrong_type_is_refused_by_name(cls: type[Message]) -> None:
    code, version, *fields = wire(EXAMPLES[cls])
    names = attrs.fields(cls)
    for i, original in enumerate(fields):
        name = names[i].name
        candidates: list[tuple[object, object]] = [
            (wrong, wrong) for wrong in WRONG_VALUES if _kind(wrong) is not _kind(original)
        ]
        # Inside arrays too: the first item swapped for a wrong one.
        if isinstance(original, tuple) and original:
            candidates += [
                ((wrong, *original[1:]), wrong)
                for wrong in WRONG_VALUES
                if _kind(wrong) is not _kind(original[0])
            ]
        for replacement, wrong in candidates:
            changed = [*fields]
            changed[i] = replacement
            frame = framed(body_of(code, version, *changed))
            if wrong is None and replacement is None and (cls, i) in OPTIONAL_FIELDS:
                decoder = FrameDecoder()
                decoder.feed(frame)
                assert getattr(decoder.next_message(), name) is None
                continue
            assert f"field {name!r}" in remote_error(frame), (cls.__name__, name, replacement)


@given(
    message=any_message,
    edits=st.lists(
        st.tuples(
            st.sampled_from(["set", "insert", "delete"]), st.integers(0), st.integers(0, 255)
        ),
        min_size=1,
        max_size=6,
    ),
    fix_length=st.booleans(),
    split=st.integers(0, 64),
)
def test_mutated_frames_raise_nothing_but_remote_protocol_errors(
    message: Message, edits: list[tuple[str, int, int]], fix_length: bool, split: int
) -> None:
    frame = bytearray(encode_frame(message))
    # With the length repaired, the mutations reach the body decoder instead of
    # mostly leaving the decoder waiting for bytes.
    start = 4 if fix_length else 0
    for op, position, byte in edits:
        where = start + position % (len(frame) - start + 1)
        if op == "insert":
            frame.insert(where, byte)
        elif where < len(frame):
            if op == "set":
                frame[where] = byte
            else:
                del frame[where]
    if fix_length:
        frame[:4] = (len(frame) - 4).to_bytes(4, "big")
    decoder = FrameDecoder()
    try:
        decoder.feed(frame[:split])
        list(decode_all(decoder))
        decoder.feed(frame[split:])
        for decoded in decode_all(decoder):
            # Whatever parses is a well-formed message that encodes again.
            assert decode_message(encode_message(decoded)) == decoded
    except RemoteProtocolError:
        with pytest.raises(RemoteProtocolError):
            decoder.next_message()


@given(st.binary(max_size=200))
def test_random_bytes_raise_nothing_but_remote_protocol_errors(data: bytes) -> None:
    decoder = FrameDecoder()
    decoder.feed(data)
    with contextlib.suppress(RemoteProtocolError):
        list(decode_all(decoder))
    with contextlib.suppress(RemoteProtocolError):
        decode_message(data)


# --- Encoding refuses what decoding would -------------------------------------------


@pytest.mark.parametrize(
    ("message", "problem"),
    [
        (PutShard(ID[:31], 1, 512, ID, 60, SIG), "'shard_id': expected 32 bytes, got 31"),
        (PutShard(ID, -1, 512, ID, 60, SIG), "'size': -1 is out of range"),
        (PutShard(ID, MAX_SHARD_SIZE + 1, 512, ID, 60, SIG), "'size'"),
        (PutShard(ID, True, 512, ID, 60, SIG), "'size': expected an integer, got boolean"),
        (PutShard(ID, 1, 768, ID, 60, SIG), "'block_size': 768 is not a power of two"),
        (PutShard(ID, 1, 2 << 20, ID, 60, SIG), "'block_size'"),
        (PutShard(ID, 1, 512, ID, 0, SIG), "'lease_seconds'"),
        (PutShard(ID, 1, 512, ID, MAX_LEASE_SECONDS + 1, SIG), "'lease_seconds'"),
        (PutShard(ID, 1, 512, ID, 60, SIG[:63]), "'signature': expected 64 bytes"),
        (PutShard(ID, 1, 512, "x" * 32, 60, SIG), "'merkle_root': expected 32 bytes, got"),  # type: ignore[arg-type]
        (ShardPiece(b""), "'data'"),
        (ShardPiece(b"x" * (PIECE_SIZE + 1)), "'data'"),
        (ShardPiece(bytearray(b"x")), "'data': expected 1 to 1048576 bytes, got bytearray"),  # type: ignore[arg-type]
        (GetShard(ID, -5, None), "'offset'"),
        (GetShard(ID, 0, -1), "'length'"),
        (Audit(ID, b"n" * 16, ()), "'indices': expected 1 to 64 items, got 0 items"),
        (Audit(ID, b"n" * 16, tuple(range(65))), "'indices': expected 1 to 64 items, got 65 items"),
        (Audit(ID, b"n" * 16, (MAX_BLOCK_INDEX + 1,)), "'indices' item 0"),
        (Audit(ID, b"n" * 65, (1,)), "'nonce'"),
        (ListShards(None, 0), "'limit'"),
        (ListShards(None, MAX_LIST_LIMIT + 1), "'limit'"),
        (ListShards(ID[:4], 1), "'after'"),
        (RenewLease((), 60, SIG), "'shard_ids': expected 1 to 1000 items, got 0 items"),
        (
            RenewLease((ID,) * 1001, 60, SIG),
            "'shard_ids': expected 1 to 1000 items, got 1001 items",
        ),
        (PutRoot(b"x" * ((1 << 20) + 1)), "'data'"),
        (ShardStatus(1), "'present': expected a boolean, got integer"),  # type: ignore[arg-type]
        (AuditProof(b"n" * 16, (b"a", b"b"), ((),)), "2 blocks but 1 proofs"),
        (AuditProof(b"n" * 16, (b"a" * (1 << 20),) * 2, ((), ())), "over the frame limit"),
        (ShardList((ShardEntry(ID, -1, 0),), False), "'entries' item 0 field 'size'"),
        (ShardList(((ID, 1, 0),), False), "'entries' item 0: expected a ShardEntry, got tuple"),  # type: ignore[arg-type]
        (
            Refused(RefusalCode.BUSY, "x" * (MAX_REFUSAL_TEXT + 1)),
            "'message': expected at most 1000 characters, got 1001",
        ),
        (Refused(99, "x"), "'code': unknown RefusalCode 99"),  # type: ignore[arg-type]
        (Refused(RefusalCode.BUSY, "\ud800"), "'message': not encodable as UTF-8"),
        (Usage(-1, None), "'used'"),
        (Stored(ID, 1.5), "'lease_expiry': expected an integer, got float"),  # type: ignore[arg-type]
    ],
)
def test_encoding_out_of_bounds_values_is_a_local_protocol_error(
    message: Message, problem: str
) -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode_frame(message)
    assert problem in str(info.value)
    with pytest.raises(LocalProtocolError):
        encode_message(message)


def test_encoding_something_that_is_not_a_message_is_a_local_protocol_error() -> None:
    with pytest.raises(LocalProtocolError, match="not a message: ShardEntry"):
        encode_frame(ShardEntry(ID, 1, 1))  # type: ignore[arg-type]


# --- Owner statements ------------------------------------------------------------

HOST = bytes(range(100, 120))
OTHER_HOST = bytes(range(200, 220))


def test_statements_are_pinned() -> None:
    # Signatures made by one release must verify under the next.
    assert put_statement(HOST, ID, 1000, ID, 3600) == (
        b"p2pbackup storage v1\x00put\x00"
        + HOST
        + ID
        + (1000).to_bytes(8, "big")
        + ID
        + (3600).to_bytes(8, "big")
    )
    assert renew_statement(HOST, [ID, ID], 60) == (
        b"p2pbackup storage v1\x00renew\x00"
        + HOST
        + (2).to_bytes(4, "big")
        + ID
        + ID
        + (60).to_bytes(8, "big")
    )
    assert delete_statement(HOST, ID) == b"p2pbackup storage v1\x00delete\x00" + HOST + ID
    assert delete_all_statement(HOST) == b"p2pbackup storage v1\x00delete-all\x00" + HOST


put_args = st.tuples(ids, sizes, ids, leases)


@given(put_args, put_args)
def test_different_puts_give_different_statements(
    a: tuple[bytes, int, bytes, int], b: tuple[bytes, int, bytes, int]
) -> None:
    assume(a != b)
    assert put_statement(HOST, *a) != put_statement(HOST, *b)


@given(put_args, st.lists(ids, min_size=1, max_size=4), leases, ids)
def test_a_statement_is_bound_to_its_host_and_its_operation(
    put: tuple[bytes, int, bytes, int], renew_ids: list[bytes], lease: int, shard: bytes
) -> None:
    assert put_statement(HOST, *put) != put_statement(OTHER_HOST, *put)
    assert renew_statement(HOST, renew_ids, lease) != renew_statement(OTHER_HOST, renew_ids, lease)
    assert delete_statement(HOST, shard) != delete_statement(OTHER_HOST, shard)
    assert delete_all_statement(HOST) != delete_all_statement(OTHER_HOST)
    statements = {
        put_statement(HOST, *put),
        renew_statement(HOST, renew_ids, lease),
        delete_statement(HOST, shard),
        delete_all_statement(HOST),
    }
    assert len(statements) == 4


@given(st.lists(ids, min_size=1, max_size=4), st.lists(ids, min_size=1, max_size=4), leases)
def test_different_renewals_give_different_statements(
    a: list[bytes], b: list[bytes], lease: int
) -> None:
    assume(a != b)
    assert renew_statement(HOST, a, lease) != renew_statement(HOST, b, lease)
    assert renew_statement(HOST, a, lease) != renew_statement(
        HOST, a, lease % MAX_LEASE_SECONDS + 1
    )


def test_statements_refuse_malformed_inputs() -> None:
    with pytest.raises(LocalProtocolError, match="put: host id: expected 20 bytes, got 32"):
        put_statement(ID, ID, 1, ID, 60)
    with pytest.raises(LocalProtocolError, match="put: size"):
        put_statement(HOST, ID, -1, ID, 60)
    with pytest.raises(
        LocalProtocolError, match="renew: shard ids: expected 1 to 1000 items, got 0 items"
    ):
        renew_statement(HOST, [], 60)
    with pytest.raises(LocalProtocolError, match="renew: lease"):
        renew_statement(HOST, [ID], 0)
    with pytest.raises(LocalProtocolError, match="delete: shard id: expected 32 bytes, got 3"):
        delete_statement(HOST, b"abc")


def test_module_names_are_what_other_layers_use() -> None:
    assert messages.PROTOCOL_VERSION == 1
    assert MAX_FRAME_SIZE == PIECE_SIZE + 64 * 1024


@pytest.mark.parametrize("length", [1, 300, 70_000, PIECE_SIZE])
async def test_a_piece_sent_over_a_plain_stream_arrives_whole(length: int) -> None:
    """Without a secure session (no send_all_parts) the channel joins the head
    and the data itself; the peer reads the same message either way."""
    left, right = trio.testing.memory_stream_pair()
    sender, receiver = MessageChannel(left), MessageChannel(right)
    data = bytes(range(256)) * (length // 256) + bytes(length % 256)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.send_piece, memoryview(data))
        got = await receiver.receive()
    assert got == ShardPiece(data)
