"""Secure sessions: Noise XX over any trio stream, bound to node identities.

The thin trio layer over :mod:`p2pbackup.wire.noise`. :func:`secure_initiator` (the
dialling side) and :func:`secure_responder` (the accepting side) run the
handshake over a ``trio.abc.Stream`` and return a :class:`SecureStream`, a
``trio.abc.Stream`` of plaintext whose every byte crosses the wire encrypted
and authenticated.

Nouns:

* **identity** (:class:`Identity`) — a node's long-term keys: the Ed25519
  signing key that *is* the node (its node id is the BLAKE2b-160 of the public
  key, :func:`p2pbackup.core.keys.node_id_for`) and the X25519 static key Noise
  uses (the *transport key*).
* **frame** — how Noise messages travel: a 2-byte big-endian length, then the
  message (at most 65535 bytes), as §13 of the Noise specification suggests.
* **identity proof** — the payload of handshake messages 2 (responder) and 3
  (initiator): ``version (1) || Ed25519 public key (32) || signature (64)``,
  the signature over :data:`STATIC_KEY_STATEMENT` followed by the sender's
  X25519 static public key. Noise proves the peer holds that static key; the
  signature proves the node owns it. Together: the peer is that node. Message
  1 carries no payload.
* **prologue** — :data:`PROLOGUE`, the version of this wire. Both sides mix it
  into the handshake, so peers of different versions fail the handshake
  instead of misreading each other.

Failures: a peer that sends malformed or unauthentic bytes raises
:class:`~p2pbackup.errors.RemoteProtocolError` (during the handshake its
subclasses :class:`~p2pbackup.errors.HandshakeError`,
:class:`~p2pbackup.errors.PeerAuthenticationError` for a bad identity proof,
:class:`~p2pbackup.errors.PeerIdentityError` for the wrong node), and the
transport stream is closed. The handshake itself sets no timeout: a peer that
goes silent stalls it forever, so callers wrap it in ``trio.fail_after``.
Nothing here logs or shows a key.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from typing import Final

import attrs
import trio

from p2pbackup.core import crypto, keys
from p2pbackup.core.framing import FrameReader, length_prefix
from p2pbackup.core.keys import Keyring
from p2pbackup.errors import (
    DecryptionError,
    HandshakeError,
    PeerAuthenticationError,
    PeerIdentityError,
    RemoteProtocolError,
    SignatureError,
)
from p2pbackup.model import BytesLike
from p2pbackup.wire.noise import MAX_PLAINTEXT_SIZE, CipherState, HandshakeState

#: Mixed into every handshake: the version of this wire protocol.
PROLOGUE: Final = b"p2pbackup/noise/1"
#: What an identity signs about its X25519 static key; the key follows it.
STATIC_KEY_STATEMENT: Final = b"p2pbackup noise static key v1\0"
IDENTITY_PROOF_VERSION: Final = 1
IDENTITY_PROOF_SIZE: Final = 1 + crypto.PUBLIC_KEY_SIZE + crypto.SIGNATURE_SIZE

_HEADER_SIZE: Final = 2
_TAG_SIZE: Final = crypto.TAG_SIZE
# Bulk traffic pays per call (event loop, syscalls) far more than per byte
# copied, so both directions move several Noise messages at a time: a send
# seals up to _SEND_BATCH_MESSAGES full messages into one buffer for one transport
# send, a receive asks the transport for up to _RECEIVE_SIZE bytes and opens
# every whole frame among them, up to _RECEIVE_CAP plaintext bytes.
_SEND_BATCH_MESSAGES: Final = 16
_RECEIVE_SIZE: Final = 256 * 1024
_RECEIVE_CAP: Final = 1024 * 1024


@attrs.frozen
class Identity:
    """A node's long-term keys, as a session needs them. Secrets stay out of ``repr``."""

    signing_seed: bytes = attrs.field(repr=False)
    signing_public: bytes = attrs.field(repr=bytes.hex)
    transport_private: bytes = attrs.field(repr=False)
    transport_public: bytes = attrs.field(repr=bytes.hex)

    @classmethod
    def from_keyring(cls, keyring: Keyring) -> Identity:
        return cls(
            signing_seed=keyring.identity_seed,
            signing_public=keyring.identity_public,
            transport_private=keyring.transport_private,
            transport_public=keyring.transport_public,
        )

    @classmethod
    def from_secrets(cls, signing_seed: bytes, transport_private: bytes) -> Identity:
        """The identity of an Ed25519 seed and an X25519 private key."""
        return cls(
            signing_seed=signing_seed,
            signing_public=crypto.signing_public_key(signing_seed),
            transport_private=transport_private,
            transport_public=crypto.x25519_public_key(transport_private),
        )

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity (tests, throwaway peers)."""
        return cls.from_secrets(
            crypto.random_bytes(crypto.SEED_SIZE), crypto.random_bytes(crypto.X25519_KEY_SIZE)
        )

    @property
    def node_id(self) -> bytes:
        return keys.node_id_for(self.signing_public)


# --- identity proof (pure) ----------------------------------------------------


def encode_identity_proof(identity: Identity) -> bytes:
    """The handshake payload that binds ``identity``'s transport key to its node."""
    signature = crypto.sign(identity.signing_seed, STATIC_KEY_STATEMENT + identity.transport_public)
    return bytes([IDENTITY_PROOF_VERSION]) + identity.signing_public + signature


def verify_identity_proof(payload: bytes, remote_static: bytes, *, peer: str) -> bytes:
    """The Ed25519 public key that ``payload`` proves owns ``remote_static``.

    ``remote_static`` must be the key Noise authenticated, never one the peer
    merely claims. :class:`PeerAuthenticationError` names ``peer`` otherwise.
    """
    if not payload:
        raise PeerAuthenticationError(f"{peer} sent no identity proof in its handshake")
    if payload[0] != IDENTITY_PROOF_VERSION:
        raise PeerAuthenticationError(
            f"{peer} sent an identity proof of version {payload[0]}; "
            f"this node reads version {IDENTITY_PROOF_VERSION}"
        )
    if len(payload) != IDENTITY_PROOF_SIZE:
        raise PeerAuthenticationError(
            f"{peer} sent a {len(payload)}-byte identity proof; "
            f"version {IDENTITY_PROOF_VERSION} has {IDENTITY_PROOF_SIZE} bytes"
        )
    signing_public = payload[1 : 1 + crypto.PUBLIC_KEY_SIZE]
    signature = payload[1 + crypto.PUBLIC_KEY_SIZE :]
    try:
        crypto.verify(signing_public, STATIC_KEY_STATEMENT + remote_static, signature)
    except SignatureError:
        raise PeerAuthenticationError(
            f"{peer} claims to be node {keys.node_id_for(signing_public).hex()}, "
            "but that node's signature does not cover the transport key it used"
        ) from None
    return signing_public


# --- frames --------------------------------------------------------------------


def _frame(message: bytes) -> bytes:
    return length_prefix(len(message), _HEADER_SIZE) + message


class _TransportReader:
    """Frames from a transport stream; bytes beyond whole frames wait in :attr:`buffer`.

    The buffer outlives the handshake: the peer may send its first transport
    message right behind its last handshake message, in one segment.
    """

    __slots__ = ("_frames", "_stream")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        # No limit of our own: a 2-byte length is at most a Noise message.
        self._frames = FrameReader(prefix_size=_HEADER_SIZE, error=RemoteProtocolError)

    @property
    def buffer(self) -> bytearray:
        return self._frames.buffer

    def whole_frames(self, limit: int) -> list[tuple[int, int]]:
        """``(start, end)`` in :attr:`buffer` of the messages of the whole frames there.

        The first frame always; more while their messages hold at most
        ``limit`` plaintext bytes in all (counting each as a transport message).
        """
        frames = self._frames
        spans: list[tuple[int, int]] = []
        position = total = 0
        while (span := frames.frame_at(position)) is not None:
            start, end = span
            total += max(end - start - _TAG_SIZE, 0)
            if spans and total > limit:
                break
            spans.append(span)
            position = end
        return spans

    async def fill(self, during: str) -> bool:
        """Receive more; ``False`` at a clean end of stream (no partial frame left)."""
        data = await self._stream.receive_some(_RECEIVE_SIZE)
        if data:
            self._frames.feed(data)
            return True
        if self._frames.buffered:
            raise RemoteProtocolError(
                f"connection closed mid-message {during} "
                f"({self._frames.buffered} bytes of an unfinished frame)"
            )
        return False

    def consume(self, end: int) -> None:
        self._frames.consume(end)


# --- the handshake -------------------------------------------------------------


def _describe(stream: trio.abc.Stream) -> str:
    """``peer at HOST:PORT`` when the stream is a socket; for error messages only."""
    candidate: object = stream
    # Unwrap simple wrappers (ours, trio's SSL) that expose transport_stream.
    for _ in range(4):
        sock = getattr(candidate, "socket", None)
        if sock is not None:
            try:
                address = sock.getpeername()
            except OSError:
                break
            if isinstance(address, tuple) and len(address) >= 2:
                host, port = address[0], address[1]
                return f"peer at [{host}]:{port}" if ":" in str(host) else f"peer at {host}:{port}"
            return f"peer at {address}"
        candidate = getattr(candidate, "transport_stream", None)
        if candidate is None:
            break
    return "peer"


async def _send(stream: trio.abc.Stream, message: bytes) -> None:
    await stream.send_all(_frame(message))


async def _read_handshake(
    reader: _TransportReader, handshake: HandshakeState, number: int, peer: str
) -> bytes:
    while not (spans := reader.whole_frames(0)):
        try:
            more = await reader.fill(f"during handshake message {number}")
        except RemoteProtocolError as exc:
            raise HandshakeError(f"{peer}: {exc}") from None
        if not more:
            raise HandshakeError(f"{peer} closed the connection before handshake message {number}")
    start, end = spans[0]
    try:
        payload = handshake.read_message(bytes(reader.buffer[start:end]))
    except HandshakeError as exc:
        raise HandshakeError(f"{peer}: {exc}") from None
    reader.consume(end)
    return payload


async def secure_initiator(
    stream: trio.abc.Stream, identity: Identity, *, expected_node_id: bytes | None = None
) -> SecureStream:
    """Run the handshake as the dialling side; the peer must be ``expected_node_id`` if given.

    Checks the peer's identity before revealing ours (message 3), so a wrong
    peer never learns who dialled. On any failure the stream is closed.
    Set a deadline around this call: the handshake has none of its own.
    """
    peer = _describe(stream)
    try:
        reader = _TransportReader(stream)
        handshake = HandshakeState.initiator(identity.transport_private, prologue=PROLOGUE)
        await _send(stream, handshake.write_message())
        payload = await _read_handshake(reader, handshake, 2, peer)
        assert handshake.remote_static is not None  # message 2 carries it
        remote_key = verify_identity_proof(payload, handshake.remote_static, peer=peer)
        remote_id = keys.node_id_for(remote_key)
        if expected_node_id is not None and remote_id != expected_node_id:
            raise PeerIdentityError(
                f"{peer} is node {remote_id.hex()}, expected {expected_node_id.hex()}"
            )
        await _send(stream, handshake.write_message(encode_identity_proof(identity)))
        return SecureStream._after_handshake(stream, reader, handshake, remote_key)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def secure_responder(stream: trio.abc.Stream, identity: Identity) -> SecureStream:
    """Run the handshake as the accepting side; learns the peer's node id.

    On any failure the stream is closed. Set a deadline around this call.
    """
    peer = _describe(stream)
    try:
        reader = _TransportReader(stream)
        handshake = HandshakeState.responder(identity.transport_private, prologue=PROLOGUE)
        first = await _read_handshake(reader, handshake, 1, peer)
        if first:
            raise HandshakeError(
                f"{peer} sent a {len(first)}-byte payload in handshake message 1, "
                "which carries none in this version"
            )
        await _send(stream, handshake.write_message(encode_identity_proof(identity)))
        payload = await _read_handshake(reader, handshake, 3, peer)
        assert handshake.remote_static is not None  # message 3 carries it
        remote_key = verify_identity_proof(payload, handshake.remote_static, peer=peer)
        return SecureStream._after_handshake(stream, reader, handshake, remote_key)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


# --- the session stream ---------------------------------------------------------


class SecureStream(trio.abc.Stream):
    """A ``trio.abc.Stream`` of plaintext over an authenticated Noise session.

    Made by :func:`secure_initiator` and :func:`secure_responder`. Each
    :meth:`send_all` becomes one or more Noise transport messages of at most
    :data:`~p2pbackup.wire.noise.MAX_PLAINTEXT_SIZE` plaintext bytes; each
    :meth:`receive_some` returns the plaintext of the whole messages that have
    arrived (up to ``max_bytes``, else up to 1 MiB), so message boundaries
    mean nothing to the reader, as on any byte stream. As with any trio
    stream, one task may send while another receives. A message that
    fails to authenticate, or an end of stream inside a frame, raises
    :class:`~p2pbackup.errors.RemoteProtocolError` and breaks the session for
    good (the transport is closed); so does a cancelled :meth:`send_all`,
    after which the peer could no longer decrypt what follows.
    """

    def __init__(
        self,
        transport_stream: trio.abc.Stream,
        *,
        reader: _TransportReader,
        send_cipher: CipherState,
        receive_cipher: CipherState,
        remote_signing_key: bytes,
        handshake_hash: bytes,
        peer: str,
    ) -> None:
        self.transport_stream = transport_stream
        #: The peer's Ed25519 identity key, as its handshake proved.
        self.remote_signing_key = remote_signing_key
        self.remote_node_id = keys.node_id_for(remote_signing_key)
        #: Identifies this session on both sides (a channel binding).
        self.handshake_hash = handshake_hash
        self._reader = reader
        self._send_cipher = send_cipher
        self._receive_cipher = receive_cipher
        self._peer = f"node {self.remote_node_id.hex()[:16]} ({peer})"
        self._pending: memoryview | None = None
        self._closed = False
        self._broken: str | None = None
        self._eof = False
        self._sending = False
        self._receiving = False

    @classmethod
    def _after_handshake(
        cls,
        stream: trio.abc.Stream,
        reader: _TransportReader,
        handshake: HandshakeState,
        remote_signing_key: bytes,
    ) -> SecureStream:
        send_cipher, receive_cipher = handshake.split()
        return cls(
            stream,
            reader=reader,
            send_cipher=send_cipher,
            receive_cipher=receive_cipher,
            remote_signing_key=remote_signing_key,
            handshake_hash=handshake.handshake_hash,
            peer=_describe(stream),
        )

    def __repr__(self) -> str:
        return f"<SecureStream with {self._peer}>"

    def _check_usable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("secure session is closed")
        if self._broken is not None:
            raise trio.BrokenResourceError(f"secure session is broken: {self._broken}")

    async def _break(self, reason: str) -> None:
        self._broken = reason
        await trio.aclose_forcefully(self.transport_stream)

    # -- sending ------------------------------------------------------------------

    async def send_all(self, data: BytesLike) -> None:
        await self.send_all_parts((data,))

    async def send_all_parts(self, parts: Sequence[BytesLike]) -> None:
        """Send the concatenation of ``parts``, which are never joined: each
        Noise message is sealed straight from the parts' memory (only one that
        straddles two parts is put together, at most one message's worth)."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this session")
        self._check_usable()
        self._sending = True
        views: list[memoryview] = []
        try:
            views = [_flat(part) for part in parts if len(part)]
            if not views:
                await trio.lowlevel.checkpoint()
                return
            batch: list[BytesLike] = []
            for chunk in _plaintext_chunks(views):
                batch.append(chunk)
                if len(batch) == _SEND_BATCH_MESSAGES:
                    await self._send_sealed(batch)
                    batch = []
            if batch:
                await self._send_sealed(batch)
        finally:
            self._sending = False
            for view in views:
                view.release()

    async def _send_sealed(self, chunks: list[BytesLike]) -> None:
        frames = self._seal(chunks)
        try:
            await self.transport_stream.send_all(frames)
        except BaseException:
            # The receiver's nonce now lags ours: nothing sent after this could
            # be decrypted, so the session is over.
            await self._break("an earlier send did not complete")
            raise

    def _seal(self, chunks: list[BytesLike]) -> bytearray:
        """The transport messages carrying ``chunks`` (one each), laid out in one buffer."""
        frames = bytearray(
            sum(len(chunk) for chunk in chunks) + len(chunks) * (_HEADER_SIZE + _TAG_SIZE)
        )
        cipher = self._send_cipher
        with memoryview(frames) as out:
            position = 0
            for chunk in chunks:
                size = len(chunk) + _TAG_SIZE
                frames[position] = size >> 8
                frames[position + 1] = size & 0xFF
                position += _HEADER_SIZE
                cipher.encrypt_into(b"", chunk, out[position : position + size])
                position += size
        return frames

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this session")
        self._check_usable()
        self._sending = True
        try:
            await self.transport_stream.wait_send_all_might_not_block()
        finally:
            self._sending = False

    # -- receiving ----------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)  # TypeError for 1.5, as trio streams do
            if max_bytes < 1:
                raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this session")
        self._check_usable()
        self._receiving = True
        try:
            pending = self._pending
            if pending is None:
                if self._eof:
                    await trio.lowlevel.checkpoint()
                    return b""
                plaintext = await self._open(_RECEIVE_CAP if max_bytes is None else max_bytes)
                if plaintext is None:
                    self._eof = True
                    return b""
                if max_bytes is None or len(plaintext) <= max_bytes:
                    return plaintext
                pending = memoryview(plaintext)
            else:
                await trio.lowlevel.checkpoint()
            if max_bytes is None or len(pending) <= max_bytes:
                self._pending = None
                return bytes(pending)
            self._pending = pending[max_bytes:]
            return bytes(pending[:max_bytes])
        finally:
            self._receiving = False

    async def _open(self, limit: int) -> bytes | bytearray | None:
        """Plaintext of the next whole frames (at least one, non-empty); ``None`` at EOF.

        ``limit`` bounds the plaintext opened beyond the first message.
        """
        reader = self._reader
        received = False
        while True:
            spans = reader.whole_frames(limit)
            if not spans:
                try:
                    more = await reader.fill(
                        f"(transport message {self._receive_cipher.nonce + 1})"
                    )
                except RemoteProtocolError as exc:
                    await self._break(str(exc))
                    raise RemoteProtocolError(f"{self._peer}: {exc}") from None
                if not more:
                    return None
                received = True
                continue
            if not received:
                # Served from the buffer: still a checkpoint, as trio streams
                # promise; taken before any state changes, so cancelling loses nothing.
                await trio.lowlevel.checkpoint()
                received = True
            plaintext = await self._decrypt(spans)
            reader.consume(spans[-1][1])
            # An empty message is legal Noise; returning b"" would read as EOF.
            if plaintext:
                return plaintext

    async def _decrypt(self, spans: list[tuple[int, int]]) -> bytes | bytearray:
        cipher = self._receive_cipher
        buffer = self._reader.buffer
        sizes = [end - start - _TAG_SIZE for start, end in spans]
        try:
            if min(sizes) < 0:
                raise DecryptionError("a transport frame is shorter than its tag")
            if len(spans) == 1:
                start, end = spans[0]
                with memoryview(buffer) as view:
                    return cipher.decrypt_with_ad(b"", view[start:end])
            plaintext = bytearray(sum(sizes))
            with memoryview(buffer) as view, memoryview(plaintext) as out:
                position = 0
                for (start, end), size in zip(spans, sizes, strict=True):
                    cipher.decrypt_into(b"", view[start:end], out[position : position + size])
                    position += size
            # Handed over as is (trio streams may return a bytearray): copying
            # it into bytes would cost as much as a third of the decryption.
            return plaintext
        except (DecryptionError, RemoteProtocolError):
            reason = f"transport message {cipher.nonce + 1} does not authenticate"
            await self._break(reason)
            raise RemoteProtocolError(
                f"{self._peer}: {reason} (tampered, truncated or replayed)"
            ) from None

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._pending = None
        await self.transport_stream.aclose()


def _flat(data: BytesLike) -> memoryview:
    view = memoryview(data)
    if view.ndim != 1 or view.format != "B":
        flat = view.cast("B")
        view.release()
        return flat
    return view


def _plaintext_chunks(views: list[memoryview]) -> Iterator[BytesLike]:
    """The plaintext of consecutive Noise messages: full ones, then the rest.

    The chunks are the same whether the data comes in one part or several: a
    chunk that straddles parts is joined (a small copy); every other one is a
    view of its part.
    """
    pending: list[memoryview] = []
    pending_size = 0
    for view in views:
        start = 0
        if pending:
            take = min(MAX_PLAINTEXT_SIZE - pending_size, len(view))
            pending.append(view[:take])
            pending_size += take
            start = take
            if pending_size < MAX_PLAINTEXT_SIZE:
                continue
            yield b"".join(pending)
            pending, pending_size = [], 0
        end = len(view)
        while end - start >= MAX_PLAINTEXT_SIZE:
            yield view[start : start + MAX_PLAINTEXT_SIZE]
            start += MAX_PLAINTEXT_SIZE
        if start < end:
            pending.append(view[start:end])
            pending_size += end - start
    if pending:
        yield pending[0] if len(pending) == 1 else b"".join(pending)
