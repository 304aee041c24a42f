"""Tests of p2pbackup.wire.noise: published vectors, interop, tampering, misuse.

The independent implementation is the ``noiseprotocol`` package (a test-only
dependency, imported as ``noise``; it runs on ``cryptography``/OpenSSL, not on
libsodium), so agreement with it checks more than our own round trips could.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from noise.connection import Keypair, NoiseConnection  # type: ignore[import-untyped]

from p2pbackup.core import crypto
from p2pbackup.errors import (
    DecryptionError,
    HandshakeError,
    LocalProtocolError,
    RemoteProtocolError,
)
from p2pbackup.wire.noise import (
    MAX_MESSAGE_SIZE,
    MAX_NONCE,
    MAX_PLAINTEXT_SIZE,
    PROTOCOL_NAME,
    CipherState,
    HandshakeState,
)

VECTORS = json.loads(
    (Path(__file__).parent / "vectors" / "noise_xx_25519_chachapoly_blake2b.json").read_text()
)["vectors"]

PROLOGUE = b"test prologue"
INIT_STATIC = bytes(range(32))
RESP_STATIC = bytes(range(100, 132))


def pair(prologue: bytes = PROLOGUE) -> tuple[HandshakeState, HandshakeState]:
    return (
        HandshakeState.initiator(INIT_STATIC, prologue=prologue),
        HandshakeState.responder(RESP_STATIC, prologue=prologue),
    )


def run_handshake(
    initiator: HandshakeState,
    responder: HandshakeState,
    payloads: tuple[bytes, bytes, bytes] = (b"", b"", b""),
    mangle: Callable[[int, bytes], bytes] = lambda index, message: message,
) -> list[bytes]:
    """Three messages; ``mangle(index, message)`` plays the network. Returns what was read."""
    read = []
    for index, payload in enumerate(payloads):
        writer, reader = (initiator, responder) if index % 2 == 0 else (responder, initiator)
        read.append(reader.read_message(mangle(index, writer.write_message(payload))))
    return read


# --- published test vectors ------------------------------------------------------


@pytest.mark.parametrize("vector", VECTORS, ids=[v["source"] for v in VECTORS])
def test_published_vectors(vector: dict[str, Any]) -> None:
    h = bytes.fromhex
    assert vector["protocol_name"].encode() == PROTOCOL_NAME
    initiator = HandshakeState.initiator(
        h(vector["init_static"]),
        prologue=h(vector["init_prologue"]),
        ephemeral_private=h(vector["init_ephemeral"]),
    )
    responder = HandshakeState.responder(
        h(vector["resp_static"]),
        prologue=h(vector["resp_prologue"]),
        ephemeral_private=h(vector["resp_ephemeral"]),
    )
    messages = vector["messages"]
    assert len(messages) > 3
    sides = (initiator, responder)
    for index, message in enumerate(messages[:3]):
        writer, reader = sides[index % 2], sides[1 - index % 2]
        ciphertext = writer.write_message(h(message["payload"]))
        assert ciphertext.hex() == message["ciphertext"], f"handshake message {index + 1}"
        assert reader.read_message(ciphertext) == h(message["payload"])
    assert initiator.is_complete and responder.is_complete
    assert initiator.remote_static == crypto.x25519_public_key(h(vector["resp_static"]))
    assert responder.remote_static == crypto.x25519_public_key(h(vector["init_static"]))
    assert initiator.handshake_hash == responder.handshake_hash
    if "handshake_hash" in vector:
        assert initiator.handshake_hash.hex() == vector["handshake_hash"]
    ciphers = (initiator.split(), responder.split())
    for index, message in enumerate(messages[3:], start=3):
        (send, _), (_, receive) = ciphers[index % 2], ciphers[1 - index % 2]
        ciphertext = send.encrypt_with_ad(b"", h(message["payload"]))
        assert ciphertext.hex() == message["ciphertext"], f"transport message {index + 1}"
        assert receive.decrypt_with_ad(b"", ciphertext) == h(message["payload"])


# --- interoperability with noiseprotocol -----------------------------------------


def theirs(*, initiator: bool, static: bytes, prologue: bytes = PROLOGUE) -> Any:
    connection = NoiseConnection.from_name(PROTOCOL_NAME)
    if initiator:
        connection.set_as_initiator()
    else:
        connection.set_as_responder()
    connection.set_prologue(prologue)
    connection.set_keypair_from_private_bytes(Keypair.STATIC, static)
    connection.start_handshake()
    return connection


def interoperate(
    ours_initiates: bool, handshake_payloads: tuple[bytes, bytes, bytes], messages: list[bytes]
) -> None:
    if ours_initiates:
        ours = HandshakeState.initiator(INIT_STATIC, prologue=PROLOGUE)
        other = theirs(initiator=False, static=RESP_STATIC)
    else:
        ours = HandshakeState.responder(RESP_STATIC, prologue=PROLOGUE)
        other = theirs(initiator=True, static=INIT_STATIC)
    for index, payload in enumerate(handshake_payloads):
        if (index % 2 == 0) == ours_initiates:
            assert other.read_message(ours.write_message(payload)) == payload
        else:
            assert ours.read_message(bytes(other.write_message(payload))) == payload
    assert ours.is_complete and other.handshake_finished
    assert ours.handshake_hash == other.get_handshake_hash()
    other_static = RESP_STATIC if ours_initiates else INIT_STATIC
    assert ours.remote_static == crypto.x25519_public_key(other_static)
    send, receive = ours.split()
    for message in messages:
        sealed = send.encrypt_with_ad(b"", message)
        assert len(sealed) == len(message) + crypto.TAG_SIZE
        assert other.decrypt(sealed) == message
        assert receive.decrypt_with_ad(b"", other.encrypt(message)) == message


EDGE_MESSAGES = [b"", b"x", bytes(range(256)) * 10, b"\xa5" * MAX_PLAINTEXT_SIZE, b""]


@pytest.mark.parametrize("ours_initiates", [True, False], ids=["we-initiate", "they-initiate"])
def test_interop_with_noiseprotocol(ours_initiates: bool) -> None:
    interoperate(ours_initiates, (b"one", b"two", b"three"), EDGE_MESSAGES)


@given(
    ours_initiates=st.booleans(),
    handshake_payloads=st.tuples(
        st.binary(max_size=300), st.binary(max_size=300), st.binary(max_size=300)
    ),
    messages=st.lists(st.binary(max_size=2000), max_size=6),
)
def test_interop_with_noiseprotocol_any_payloads(
    ours_initiates: bool, handshake_payloads: tuple[bytes, bytes, bytes], messages: list[bytes]
) -> None:
    interoperate(ours_initiates, handshake_payloads, messages)


def test_interop_refuses_a_different_prologue() -> None:
    ours = HandshakeState.initiator(INIT_STATIC, prologue=PROLOGUE)
    other = theirs(initiator=False, static=RESP_STATIC, prologue=b"another prologue")
    other.read_message(ours.write_message())
    with pytest.raises(HandshakeError, match="message 2"):
        ours.read_message(bytes(other.write_message()))


# --- our own round trips -------------------------------------------------------------


def test_handshake_learns_keys_and_agrees() -> None:
    initiator, responder = pair()
    assert initiator.is_my_turn and not responder.is_my_turn
    assert run_handshake(initiator, responder, (b"a", b"bb", b"ccc")) == [b"a", b"bb", b"ccc"]
    assert initiator.remote_static == responder.static_public
    assert responder.remote_static == initiator.static_public
    assert initiator.handshake_hash == responder.handshake_hash
    i_send, i_receive = initiator.split()
    r_send, r_receive = responder.split()
    assert r_receive.decrypt_with_ad(b"", i_send.encrypt_with_ad(b"", b"ping")) == b"ping"
    assert i_receive.decrypt_with_ad(b"", r_send.encrypt_with_ad(b"", b"pong")) == b"pong"


def test_sessions_differ_every_time() -> None:
    # Fresh ephemeral keys: same static keys and payloads, different everything else.
    first, second = pair(), pair()
    messages_first = run_handshake(*first)
    messages_second = run_handshake(*second)
    assert messages_first == messages_second == [b"", b"", b""]
    assert first[0].handshake_hash != second[0].handshake_hash


def test_message_one_payload_travels_in_clear() -> None:
    # A property of XX worth pinning: nothing secret may go in message 1.
    initiator, _ = pair()
    assert initiator.write_message(b"visible").endswith(b"visible")


def test_prologue_mismatch_fails_the_handshake() -> None:
    initiator = HandshakeState.initiator(INIT_STATIC, prologue=b"p2pbackup/noise/1")
    responder = HandshakeState.responder(RESP_STATIC, prologue=b"p2pbackup/noise/2")
    responder.read_message(initiator.write_message())
    with pytest.raises(HandshakeError):
        initiator.read_message(responder.write_message())


# --- tampering --------------------------------------------------------------------


def _flip(position: int) -> Callable[[bytes], bytes]:
    def flip(message: bytes) -> bytes:
        changed = bytearray(message)
        changed[position] ^= 0x40
        return bytes(changed)

    return flip


def _expect_failure(target: int, change: Callable[[bytes], bytes]) -> None:
    """The handshake with message ``target`` changed must fail, never complete."""
    initiator, responder = pair()

    def mangle(index: int, message: bytes) -> bytes:
        return change(message) if index == target else message

    with pytest.raises(HandshakeError):
        run_handshake(initiator, responder, (b"p1", b"p2", b"p3"), mangle)
    assert not (initiator.is_complete and responder.is_complete)


def _truncate(size: int) -> Callable[[bytes], bytes]:
    return lambda message: message[:size]


def _lengths() -> list[int]:
    initiator, responder = pair()
    sizes: list[int] = []

    def measure(index: int, message: bytes) -> bytes:
        sizes.append(len(message))
        return message

    run_handshake(initiator, responder, (b"p1", b"p2", b"p3"), measure)
    return sizes


@pytest.mark.parametrize("target", [0, 1, 2])
def test_any_flipped_bit_in_any_handshake_message_fails(target: int) -> None:
    # Message 1 is not authenticated on arrival, but everything it holds is
    # hashed: the change surfaces when message 2 is read.
    for position in range(_lengths()[target]):
        _expect_failure(target, _flip(position))


@pytest.mark.parametrize("target", [0, 1, 2])
def test_truncated_or_extended_handshake_messages_fail(target: int) -> None:
    for size in range(_lengths()[target]):
        _expect_failure(target, _truncate(size))
    _expect_failure(target, lambda message: message + b"\x00")


def test_truncation_is_reported_as_such() -> None:
    initiator, responder = pair()
    with pytest.raises(HandshakeError, match="truncated"):
        responder.read_message(initiator.write_message()[:31])


def test_oversize_handshake_message_is_refused() -> None:
    _, responder = pair()
    with pytest.raises(HandshakeError, match="65535"):
        responder.read_message(bytes(MAX_MESSAGE_SIZE + 1))


@pytest.mark.parametrize(
    "bad_key",
    [bytes(32), (1).to_bytes(32, "little")],
    ids=["zero", "order-4"],
)
def test_low_order_ephemeral_keys_fail_the_handshake(bad_key: bytes) -> None:
    initiator, responder = pair()
    # As message 1: the responder notices when it mixes the DH into message 2.
    responder.read_message(bad_key)
    with pytest.raises(HandshakeError, match="low-order"):
        responder.write_message()
    # As message 2's ephemeral key: the initiator notices on reading it.
    initiator, responder = pair()
    responder.read_message(initiator.write_message())
    message = responder.write_message()
    with pytest.raises(HandshakeError, match="low-order"):
        initiator.read_message(bad_key + message[32:])


def test_transport_tampering_is_detected() -> None:
    initiator, responder = pair()
    run_handshake(initiator, responder)
    send, _ = initiator.split()
    _, receive = responder.split()
    sealed = send.encrypt_with_ad(b"", b"shard bytes")
    for position in range(len(sealed)):
        with pytest.raises(DecryptionError):
            receive.decrypt_with_ad(b"", _flip(position)(sealed))
    with pytest.raises(DecryptionError):
        receive.decrypt_with_ad(b"", sealed[:-1])
    # Failures do not advance the counter: the genuine message still opens.
    assert receive.nonce == 0
    assert receive.decrypt_with_ad(b"", sealed) == b"shard bytes"
    # ...but only once: a replay is a decryption failure.
    with pytest.raises(DecryptionError):
        receive.decrypt_with_ad(b"", sealed)


def test_reordered_transport_messages_fail() -> None:
    initiator, responder = pair()
    run_handshake(initiator, responder)
    send, _ = initiator.split()
    _, receive = responder.split()
    first, second = send.encrypt_with_ad(b"", b"1"), send.encrypt_with_ad(b"", b"2")
    with pytest.raises(DecryptionError):
        receive.decrypt_with_ad(b"", second)
    assert receive.decrypt_with_ad(b"", first) == b"1"


# --- misuse -------------------------------------------------------------------------


def test_out_of_turn_calls_are_local_errors() -> None:
    initiator, responder = pair()
    with pytest.raises(LocalProtocolError, match="out of turn"):
        initiator.read_message(bytes(32))
    with pytest.raises(LocalProtocolError, match="out of turn"):
        responder.write_message()
    with pytest.raises(LocalProtocolError, match="not complete"):
        initiator.split()
    # The refusals changed nothing: the handshake still works.
    run_handshake(initiator, responder)
    with pytest.raises(LocalProtocolError, match="complete"):
        initiator.write_message()
    with pytest.raises(LocalProtocolError, match="complete"):
        responder.read_message(bytes(48))
    initiator.split()
    with pytest.raises(LocalProtocolError, match="already taken"):
        initiator.split()


def test_a_failed_handshake_stays_failed() -> None:
    initiator, responder = pair()
    responder.read_message(initiator.write_message())
    message = bytearray(responder.write_message())
    message[40] ^= 1
    with pytest.raises(HandshakeError):
        initiator.read_message(bytes(message))
    with pytest.raises(LocalProtocolError, match="failed"):
        initiator.write_message()


def test_oversize_payload_is_refused_before_anything_changes() -> None:
    initiator, responder = pair()
    with pytest.raises(LocalProtocolError, match="65535"):
        initiator.write_message(bytes(MAX_MESSAGE_SIZE - 31))
    responder.read_message(initiator.write_message(bytes(MAX_MESSAGE_SIZE - 32)))
    # Message 2 adds e (32), encrypted s (48) and a tag (16).
    with pytest.raises(LocalProtocolError, match="65535"):
        responder.write_message(bytes(MAX_MESSAGE_SIZE - 95))
    assert len(responder.write_message(bytes(MAX_MESSAGE_SIZE - 96))) == MAX_MESSAGE_SIZE


def test_nonce_exhaustion_is_refused() -> None:
    initiator, responder = pair()
    run_handshake(initiator, responder)
    send, _ = initiator.split()
    _, receive = responder.split()
    send.set_nonce(MAX_NONCE - 1)
    receive.set_nonce(MAX_NONCE - 1)
    # The last usable nonce works, and interoperates (it is 2^64-2, little-endian).
    assert receive.decrypt_with_ad(b"", send.encrypt_with_ad(b"", b"last")) == b"last"
    with pytest.raises(LocalProtocolError, match="every nonce"):
        send.encrypt_with_ad(b"", b"one too many")
    assert send.nonce == MAX_NONCE
    with pytest.raises(RemoteProtocolError, match="2\\^64-1"):
        receive.decrypt_with_ad(b"", bytes(16))
    with pytest.raises(ValueError):
        send.set_nonce(MAX_NONCE + 1)


def test_cipher_state_repr_hides_the_key() -> None:
    key = bytes(range(32))
    assert key.hex() not in repr(CipherState(key))
    with pytest.raises(ValueError, match="32 bytes"):
        CipherState(key[:16])


def test_in_place_variants_match_and_interoperate() -> None:
    initiator, responder = pair()
    run_handshake(initiator, responder)
    send, receive = initiator.split()
    r_send, r_receive = responder.split()
    message = bytes(range(200)) * 5
    framed = bytearray(3 + len(message) + crypto.TAG_SIZE)
    send.encrypt_into(b"", message, memoryview(framed)[3:])
    assert send.nonce == 1
    opened = bytearray(len(message))
    r_receive.decrypt_into(b"", memoryview(framed)[3:], opened)
    assert opened == message and r_receive.nonce == 1
    # A failed decrypt_into does not advance the counter.
    with pytest.raises(DecryptionError):
        r_receive.decrypt_into(b"", bytes(len(framed) - 3), opened)
    assert r_receive.nonce == 1
    sealed = r_send.encrypt_with_ad(b"", message)
    receive.decrypt_into(b"", sealed, opened)
    assert opened == message
    with pytest.raises(LocalProtocolError, match="no key"):
        CipherState().encrypt_into(b"", b"x", bytearray(17))


def test_in_place_variants_interoperate_with_noiseprotocol() -> None:
    ours = HandshakeState.initiator(INIT_STATIC, prologue=PROLOGUE)
    other = theirs(initiator=False, static=RESP_STATIC)
    other.read_message(ours.write_message())
    ours.read_message(bytes(other.write_message()))
    other.read_message(ours.write_message())
    send, receive = ours.split()
    message = b"\x5a" * MAX_PLAINTEXT_SIZE
    out = bytearray(MAX_MESSAGE_SIZE)
    send.encrypt_into(b"", message, out)
    assert other.decrypt(bytes(out)) == message
    opened = bytearray(MAX_PLAINTEXT_SIZE)
    receive.decrypt_into(b"", other.encrypt(message), opened)
    assert opened == message
