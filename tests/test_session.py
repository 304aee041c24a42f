"""Tests of p2pbackup.wire.session: handshakes with identities, the plaintext stream.

Sessions run over trio's in-memory streams (optionally wrapped to record,
tamper with or dribble the raw bytes) and over real TCP on 127.0.0.1.
"""

from __future__ import annotations

import array
import hashlib
import os
from collections.abc import Awaitable, Callable
from functools import partial

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pbackup.core import crypto, keys
from p2pbackup.core.keys import Keyring
from p2pbackup.errors import (
    HandshakeError,
    PeerAuthenticationError,
    PeerIdentityError,
    RemoteProtocolError,
)
from p2pbackup.model import BytesLike
from p2pbackup.wire.noise import MAX_PLAINTEXT_SIZE
from p2pbackup.wire.session import (
    IDENTITY_PROOF_SIZE,
    STATIC_KEY_STATEMENT,
    Identity,
    SecureStream,
    encode_identity_proof,
    secure_initiator,
    secure_responder,
    verify_identity_proof,
)

ALICE = Identity.from_keyring(Keyring.from_master_secret(bytes(range(32))))
BOB = Identity.from_keyring(Keyring.from_master_secret(bytes(range(1, 33))))
MALLORY = Identity.generate()


# --- transports that misbehave on purpose ------------------------------------------


class Wrapper(trio.abc.Stream):
    """A stream that forwards to ``inner``; subclasses change one thing."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data: BytesLike) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


class Recording(Wrapper):
    """Appends every byte it sends to ``wire``."""

    def __init__(self, inner: trio.abc.Stream, wire: bytearray) -> None:
        super().__init__(inner)
        self.wire = wire

    async def send_all(self, data: BytesLike) -> None:
        self.wire += data
        await self.inner.send_all(data)


class Dribbling(Wrapper):
    """Delivers at most one byte per receive."""

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(1)


class Tampering(Wrapper):
    """Flips bit 6 of byte ``position`` of its ``send``-th send (0-based).

    With ``close``, closes right after: a corrupted length must then end in
    an error rather than a wait for bytes that never come.
    """

    def __init__(self, inner: trio.abc.Stream, send: int, position: int, close: bool) -> None:
        super().__init__(inner)
        self.target = send
        self.position = position
        self.close = close
        self.sends = 0

    async def send_all(self, data: BytesLike) -> None:
        index, self.sends = self.sends, self.sends + 1
        if index != self.target:
            await self.inner.send_all(data)
            return
        changed = bytearray(data)
        changed[self.position] ^= 0x40
        await self.inner.send_all(changed)
        if self.close:
            await self.inner.aclose()


def memory_pair(
    wrap: Callable[[trio.abc.Stream, str], trio.abc.Stream] = lambda stream, side: stream,
) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    client, server = trio.testing.memory_stream_pair()
    return wrap(client, "client"), wrap(server, "server")


async def connect(
    client_transport: trio.abc.Stream,
    server_transport: trio.abc.Stream,
    client: Identity = ALICE,
    server: Identity = BOB,
    expected: bytes | None = None,
) -> tuple[SecureStream, SecureStream]:
    results: dict[str, SecureStream] = {}

    async def respond() -> None:
        results["server"] = await secure_responder(server_transport, server)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(respond)
            results["client"] = await secure_initiator(
                client_transport, client, expected_node_id=expected
            )
    return results["client"], results["server"]


async def failing_handshake(
    client_transport: trio.abc.Stream,
    server_transport: trio.abc.Stream,
    client: Identity = ALICE,
    server: Identity = BOB,
    expected: bytes | None = None,
) -> dict[str, BaseException | SecureStream]:
    """Both sides' outcome: a SecureStream or the exception it raised."""
    outcome: dict[str, BaseException | SecureStream] = {}

    async def side(name: str, run: Callable[[], Awaitable[SecureStream]]) -> None:
        try:
            outcome[name] = await run()
        except (RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            outcome[name] = exc

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(side, "server", lambda: secure_responder(server_transport, server))
            nursery.start_soon(
                side,
                "client",
                lambda: secure_initiator(client_transport, client, expected_node_id=expected),
            )
    return outcome


async def receive_exactly(stream: trio.abc.Stream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some()
        assert chunk, f"end of stream after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


async def exchange(a: trio.abc.Stream, b: trio.abc.Stream, a_to_b: bytes, b_to_a: bytes) -> None:
    """Both directions at once; each side checks what it got."""

    async def one_way(sender: trio.abc.Stream, receiver: trio.abc.Stream, data: bytes) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender.send_all, data)
            got = await receive_exactly(receiver, len(data))
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one_way, a, b, a_to_b)
            nursery.start_soon(one_way, b, a, b_to_a)


# --- identities ---------------------------------------------------------------------


def test_identity_from_keyring_and_repr() -> None:
    keyring = Keyring.from_master_secret(bytes(range(32)))
    assert ALICE.node_id == keyring.node_id == keys.node_id_for(ALICE.signing_public)
    assert ALICE.transport_public == crypto.x25519_public_key(ALICE.transport_private)
    text = repr(ALICE)
    assert ALICE.signing_seed.hex() not in text
    assert ALICE.transport_private.hex() not in text
    assert ALICE.signing_public.hex() in text


def test_identity_proof_round_trip_and_rejections() -> None:
    proof = encode_identity_proof(ALICE)
    assert len(proof) == IDENTITY_PROOF_SIZE and proof[0] == 1
    assert verify_identity_proof(proof, ALICE.transport_public, peer="p") == ALICE.signing_public
    # Bound to the transport key: the same proof does not cover another key.
    with pytest.raises(PeerAuthenticationError, match=ALICE.node_id.hex()):
        verify_identity_proof(proof, BOB.transport_public, peer="p")
    for bad, why in [
        (b"", "no identity proof"),
        (b"\x02" + proof[1:], "version 2"),
        (proof[:-1], "96-byte"),
        (proof + b"\x00", "98-byte"),
    ]:
        with pytest.raises(PeerAuthenticationError, match=why):
            verify_identity_proof(bad, ALICE.transport_public, peer="p")
    # The statement is domain-separated: a signature over the bare key fails.
    bare = b"\x01" + ALICE.signing_public + crypto.sign(ALICE.signing_seed, ALICE.transport_public)
    with pytest.raises(PeerAuthenticationError):
        verify_identity_proof(bare, ALICE.transport_public, peer="p")
    assert STATIC_KEY_STATEMENT.endswith(b"\0")


# --- handshakes ------------------------------------------------------------------------


async def test_node_ids_are_learned_both_ways() -> None:
    client, server = await connect(*memory_pair(), expected=BOB.node_id)
    assert client.remote_node_id == BOB.node_id
    assert client.remote_signing_key == BOB.signing_public
    assert server.remote_node_id == ALICE.node_id
    assert server.remote_signing_key == ALICE.signing_public
    assert client.handshake_hash == server.handshake_hash
    await exchange(client, server, b"hello bob", b"hello alice")


async def test_expected_node_id_mismatch_fails_clearly_and_closes() -> None:
    client_transport, server_transport = memory_pair()
    outcome = await failing_handshake(
        client_transport, server_transport, server=MALLORY, expected=BOB.node_id
    )
    error = outcome["client"]
    assert isinstance(error, PeerIdentityError)
    assert f"is node {MALLORY.node_id.hex()}, expected {BOB.node_id.hex()}" in str(error)
    # The initiator stops before message 3: Mallory never learns who dialled.
    assert isinstance(outcome["server"], HandshakeError)
    assert "before handshake message 3" in str(outcome["server"])
    with pytest.raises(trio.ClosedResourceError):
        await client_transport.send_all(b"x")


async def test_a_proof_over_another_transport_key_fails() -> None:
    # Mallory replays Bob's identity proof but must use her own Noise key.
    impostor = attrs.evolve(BOB, transport_private=MALLORY.transport_private)
    outcome = await failing_handshake(*memory_pair(), server=impostor)
    error = outcome["client"]
    assert isinstance(error, PeerAuthenticationError)
    assert BOB.node_id.hex() in str(error) and "signature" in str(error)
    # The other way round: an impostor initiator is caught by the responder.
    outcome = await failing_handshake(
        *memory_pair(), client=attrs.evolve(ALICE, transport_private=MALLORY.transport_private)
    )
    assert isinstance(outcome["server"], PeerAuthenticationError)


@pytest.mark.parametrize(
    ("side", "send", "position"),
    [
        ("client", 0, 5),  # message 1: its ephemeral key
        ("server", 0, 10),  # message 2: its ephemeral key
        ("server", 0, 50),  # message 2: the encrypted static key
        ("server", 0, 120),  # message 2: the identity proof
        ("client", 1, 10),  # message 3: the encrypted static key
        ("client", 1, 100),  # message 3: the identity proof
    ],
)
async def test_tampered_handshake_fails_as_a_protocol_error(
    side: str, send: int, position: int
) -> None:
    def wrap(stream: trio.abc.Stream, name: str) -> trio.abc.Stream:
        return Tampering(stream, send, position, close=False) if name == side else stream

    client_transport, server_transport = memory_pair(wrap)
    outcome = await failing_handshake(client_transport, server_transport)
    # The side that reads the damage fails; its peer sees the connection drop.
    reader = "client" if side == "server" or send == 0 else "server"
    assert isinstance(outcome[reader], HandshakeError), outcome
    other = outcome["client" if reader == "server" else "server"]
    if isinstance(other, SecureStream):
        # Only when message 3 was damaged: the initiator is done once it has
        # sent it (XX), and learns of the failure as a closed connection.
        assert reader == "server"
        assert await other.receive_some() == b""


async def test_a_silent_peer_stalls_until_the_callers_deadline() -> None:
    client_transport, _server_transport = memory_pair()
    with pytest.raises(trio.TooSlowError), trio.fail_after(0.2):
        await secure_initiator(client_transport, ALICE)
    with pytest.raises(trio.ClosedResourceError):
        await client_transport.send_all(b"x")


# --- the stream ---------------------------------------------------------------------------


async def test_five_megabytes_each_way_over_memory_streams() -> None:
    client, server = await connect(*memory_pair())
    await exchange(client, server, os.urandom(5_000_000), os.urandom(5_000_001))
    await client.aclose()
    assert await server.receive_some() == b""
    assert await server.receive_some() == b""
    await server.aclose()


async def test_receive_some_respects_max_bytes() -> None:
    client, server = await connect(*memory_pair())
    data = os.urandom(300_000)  # five transport messages, the last partial
    await client.send_all(data)
    pieces = []
    for limit in [1, 2, 1000, MAX_PLAINTEXT_SIZE, 70_000, None, None]:
        piece = await server.receive_some(limit)
        assert piece and (limit is None or len(piece) <= limit)
        pieces.append(bytes(piece))
        if sum(map(len, pieces)) == len(data):
            break
    assert b"".join(pieces) == data
    assert [len(piece) for piece in pieces[:3]] == [1, 2, 1000]
    with pytest.raises(ValueError):
        await server.receive_some(0)
    with pytest.raises(TypeError):
        await server.receive_some(1.5)  # type: ignore[arg-type]


async def test_empty_sends_send_nothing_and_views_are_accepted() -> None:
    wire = bytearray()
    client, server = await connect(*memory_pair(lambda s, side: Recording(s, wire)))
    before = len(wire)
    await client.send_all(b"")
    assert len(wire) == before
    await client.send_all(memoryview(b"abcdef")[1:4])
    await client.send_all(bytearray(b"xyz"))
    assert await receive_exactly(server, 6) == b"bcdxyz"


async def test_views_of_any_shape_are_sent_as_their_bytes() -> None:
    client, server = await connect(*memory_pair())
    numbers = array.array("i", range(1000))
    await client.send_all(memoryview(numbers))
    assert await receive_exactly(server, len(numbers) * numbers.itemsize) == numbers.tobytes()


@settings(max_examples=25)
@given(
    sends=st.lists(st.integers(0, 140_000), min_size=1, max_size=4),
    limits=st.lists(st.one_of(st.none(), st.integers(1, 100_000)), max_size=12),
)
def test_any_split_of_sends_and_receives_reassembles(
    sends: list[int], limits: list[int | None]
) -> None:
    data = os.urandom(sum(sends))

    async def main() -> None:
        client, server = await connect(*memory_pair())

        async def send() -> None:
            position = 0
            for size in sends:
                await client.send_all(data[position : position + size])
                position += size
            await client.aclose()

        received = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            turn = 0
            while True:
                # The given limits first, then whole messages (bounded run time).
                limit = limits[turn] if turn < len(limits) else None
                turn += 1
                piece = await server.receive_some(limit)
                if not piece:
                    break
                assert limit is None or len(piece) <= limit
                received += piece
        assert received == data

    trio.run(main)


@settings(max_examples=25)
@given(cuts=st.lists(st.integers(0, 200_000), max_size=5))
def test_parts_are_sent_as_the_messages_of_their_concatenation(cuts: list[int]) -> None:
    """send_all_parts never joins its parts, yet the wire carries the same
    Noise messages as one send of the joined bytes: each full but the last."""
    data = os.urandom(200_000)
    bounds = sorted(cuts)
    parts = [data[a:b] for a, b in zip([0, *bounds], [*bounds, len(data)], strict=True)]

    async def main() -> None:
        joined_wire, parts_wire = bytearray(), bytearray()
        client, server = await connect(*memory_pair(lambda s, side: Recording(s, joined_wire)))
        other, other_server = await connect(*memory_pair(lambda s, side: Recording(s, parts_wire)))
        start_joined, start_parts = len(joined_wire), len(parts_wire)
        await client.send_all(data)
        await other.send_all_parts([memoryview(part) for part in parts])
        assert await receive_exactly(server, len(data)) == data
        assert await receive_exactly(other_server, len(data)) == data
        assert _message_sizes(parts_wire[start_parts:]) == _message_sizes(
            joined_wire[start_joined:]
        )

    trio.run(main)


def _message_sizes(wire: bytes | bytearray) -> list[int]:
    sizes, position = [], 0
    while position < len(wire):
        size = int.from_bytes(wire[position : position + 2], "big")
        sizes.append(size)
        position += 2 + size
    return sizes


async def test_a_bad_frame_among_good_ones_breaks_the_session() -> None:
    # 300 kB leave in one transport send of five frames; the third is damaged.
    position = 2 * (2 + MAX_PLAINTEXT_SIZE + 16) + 100
    client, server = await connect(
        *memory_pair(
            lambda stream, side: (
                Tampering(stream, 2, position, close=False) if side == "client" else stream
            )
        )
    )
    await client.send_all(os.urandom(300_000))
    with pytest.raises(RemoteProtocolError, match="does not authenticate"):
        await receive_exactly(server, 300_000)


async def test_end_of_stream_inside_a_handshake_frame() -> None:
    client_transport, server_transport = memory_pair()
    await client_transport.send_all(b"\x00\x20" + bytes(5))
    await client_transport.aclose()
    with pytest.raises(HandshakeError, match="mid-message during handshake message 1"):
        await secure_responder(server_transport, BOB)


async def test_byte_at_a_time_arrival() -> None:
    client, server = await connect(*memory_pair(lambda stream, side: Dribbling(stream)))
    assert client.remote_node_id == BOB.node_id
    data = os.urandom(3000)
    await exchange(client, server, data, data[::-1] + b"tail")
    await client.aclose()
    assert await server.receive_some() == b""


async def test_no_plaintext_crosses_the_wire() -> None:
    wire = bytearray()
    client, server = await connect(*memory_pair(lambda stream, side: Recording(stream, wire)))
    plaintext = b"".join(b"line %06d of the very secret backup manifest\n" % i for i in range(4000))
    await exchange(client, server, plaintext, plaintext[::-1])
    assert len(wire) > 2 * len(plaintext)
    assert plaintext[:64] not in wire
    window = 16
    on_wire = {bytes(wire[i : i + window]) for i in range(len(wire) - window + 1)}
    for text in (plaintext, plaintext[::-1]):
        leaked = [i for i in range(len(text) - window + 1) if text[i : i + window] in on_wire]
        assert not leaked, f"plaintext at offsets {leaked[:5]} appears on the wire"
    # XX encrypts the static keys and the identity proofs: a passive observer
    # learns neither node's identity.
    for identity in (ALICE, BOB):
        for secret_or_public in (
            identity.signing_public,
            identity.transport_public,
            identity.node_id,
        ):
            assert secret_or_public not in wire


@pytest.mark.parametrize("position", [0, 1, 2, 5, 20, 30])
async def test_tampered_transport_message_breaks_the_session(position: int) -> None:
    # The client's sends: message 1, message 3, then the 22-byte message's
    # 40-byte frame (2 header bytes, 22 ciphertext, 16 tag).
    client, server = await connect(
        *memory_pair(
            lambda stream, side: (
                Tampering(stream, 2, position, close=True) if side == "client" else stream
            )
        )
    )
    await client.send_all(b"twenty-two bytes long!")
    with pytest.raises(RemoteProtocolError) as caught:
        await server.receive_some()
    assert ALICE.node_id.hex()[:16] in str(caught.value)
    # Broken for good, and the transport is closed.
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some()
    with pytest.raises(trio.BrokenResourceError):
        await server.send_all(b"reply")
    with pytest.raises(trio.ClosedResourceError):
        await server.transport_stream.send_all(b"x")


async def test_end_of_stream_inside_a_frame_is_a_protocol_error() -> None:
    client, server = await connect(*memory_pair())
    await client.send_all(b"complete")
    await client.transport_stream.send_all(b"\x00\x30" + bytes(10))
    await client.transport_stream.aclose()
    assert await server.receive_some() == b"complete"
    with pytest.raises(RemoteProtocolError, match="mid-message"):
        await server.receive_some()


async def test_closed_stream_refuses_use() -> None:
    client, server = await connect(*memory_pair())
    await client.aclose()
    await client.aclose()  # idempotent
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"x")
    with pytest.raises(trio.ClosedResourceError):
        await client.receive_some()
    await server.aclose()


async def test_conforms_to_trio_stream_contract() -> None:
    async def maker() -> tuple[SecureStream, SecureStream]:
        return await connect(*memory_pair())

    async def clogged() -> tuple[SecureStream, SecureStream]:
        client, server = trio.testing.lockstep_stream_pair()
        return await connect(client, server)

    await trio.testing.check_two_way_stream(maker, clogged)


# --- real sockets -------------------------------------------------------------------------


async def test_over_tcp_on_loopback() -> None:
    served: list[SecureStream] = []
    done = trio.Event()

    refused: list[RemoteProtocolError] = []

    async def handler(stream: trio.SocketStream) -> None:
        try:
            secure = await secure_responder(stream, BOB)
        except RemoteProtocolError as exc:
            refused.append(exc)
            return
        served.append(secure)
        data = await receive_exactly(secure, 5_000_000)
        await secure.send_all(hashlib.sha256(data).digest() + data[:1000])
        await done.wait()
        await secure.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        # The wrong node first: refused, with the address in the message.
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        with pytest.raises(PeerIdentityError, match=f"peer at 127.0.0.1:{port} is node"):
            await secure_initiator(stream, ALICE, expected_node_id=MALLORY.node_id)

        stream = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(30):
            client = await secure_initiator(stream, ALICE, expected_node_id=BOB.node_id)
            assert client.remote_node_id == BOB.node_id
            data = os.urandom(5_000_000)
            await client.send_all(data)
            reply = await receive_exactly(client, 32 + 1000)
        assert reply == hashlib.sha256(data).digest() + data[:1000]
        assert served[-1].remote_node_id == ALICE.node_id
        assert len(refused) == 1 and "before handshake message 3" in str(refused[0])
        done.set()
        assert await client.receive_some() == b""
        await client.aclose()
        nursery.cancel_scope.cancel()
