"""The Noise protocol ``Noise_XX_25519_ChaChaPoly_BLAKE2b``, sans-IO.

An implementation of the Noise Protocol Framework, revision 34
(https://noiseprotocol.org/noise.html), for the one protocol p2pbackup speaks:
handshake pattern XX, DH 25519, cipher ChaChaPoly, hash BLAKE2b. Bytes go in
and bytes come out; framing, sockets and time belong to the caller
(:mod:`p2pbackup.wire.session`). Section numbers below refer to the specification.

Nouns (the specification's, §5):

* **cipher state** (:class:`CipherState`) — a 32-byte key ``k`` (or none yet)
  and a 64-bit message counter ``n`` that is the AEAD nonce. After the
  handshake each direction of a session has its own.
* **symmetric state** (:class:`SymmetricState`) — the cipher state plus the
  chaining key ``ck`` (fed by every DH result) and the handshake hash ``h``
  (fed by everything sent or received).
* **handshake state** (:class:`HandshakeState`) — the symmetric state plus the
  local key pairs (static ``s``, ephemeral ``e``), the remote public keys
  (``rs``, ``re``), the role and the position in the message pattern.
* **message pattern** — XX's three messages, as tokens::

      -> e
      <- e, ee, s, es
      -> s, se

  The initiator writes messages 1 and 3, the responder message 2. After
  message 3 both sides :meth:`~HandshakeState.split` the symmetric state into
  two cipher states, one per direction.
* **payload** — application bytes carried by a handshake message, encrypted
  once a key exists (messages 2 and 3; message 1's is sent in clear).
* **handshake hash** — ``h`` at the end of the handshake: a value both sides
  share that identifies the session (a channel binding).
* **prologue** — bytes both sides mix in before the first message; a mismatch
  makes the handshake fail. Callers put their wire version there.

Every Noise message is at most :data:`MAX_MESSAGE_SIZE` bytes. Bytes from the
peer that do not parse or do not authenticate raise :class:`HandshakeError`
or :class:`RemoteProtocolError`; calling a method out of turn raises
:class:`LocalProtocolError`. A handshake that failed once stays failed.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Final

from p2pbackup.core import crypto
from p2pbackup.errors import (
    DecryptionError,
    HandshakeError,
    KeyAgreementError,
    LocalProtocolError,
    RemoteProtocolError,
)
from p2pbackup.model import BytesLike

PROTOCOL_NAME: Final = b"Noise_XX_25519_ChaChaPoly_BLAKE2b"

#: Noise's limit on any one message, handshake or transport (§3).
MAX_MESSAGE_SIZE: Final = 65535
TAG_SIZE: Final = crypto.TAG_SIZE
#: The largest plaintext one transport message can carry.
MAX_PLAINTEXT_SIZE: Final = MAX_MESSAGE_SIZE - TAG_SIZE
DH_SIZE: Final = crypto.X25519_KEY_SIZE
HASH_SIZE: Final = 64
KEY_SIZE: Final = crypto.KEY_SIZE
#: The counter value Noise reserves (§5.1): a cipher state never uses it.
MAX_NONCE: Final = 2**64 - 1

# ChaChaPoly's nonce (§12.3): 32 zero bits, then the counter in little-endian.
_NONCE = struct.Struct("<4xQ")

# Tokens of the XX pattern (§7.5), one tuple per message; the initiator sends
# the even-numbered ones (counting from 0).
_XX: Final = (("e",), ("e", "ee", "s", "es"), ("s", "se"))


def _hash(data: bytes) -> bytes:
    return hashlib.blake2b(data).digest()


def _hkdf(chaining_key: bytes, input_key_material: bytes) -> tuple[bytes, bytes]:
    """HKDF with two outputs (§4.3), HMAC-BLAKE2b (block size 128, as §4.3 needs)."""
    temp_key = hmac.digest(chaining_key, input_key_material, "blake2b")
    output1 = hmac.digest(temp_key, b"\x01", "blake2b")
    output2 = hmac.digest(temp_key, output1 + b"\x02", "blake2b")
    return output1, output2


class CipherState:
    """One direction's AEAD key and nonce counter (§5.1).

    Not a value: every encryption advances the counter, so a cipher state must
    have exactly one user. Its repr shows no key.
    """

    __slots__ = ("_key", "_nonce")

    def __init__(self, key: bytes | None = None) -> None:
        if key is not None and len(key) != KEY_SIZE:
            raise ValueError(f"cipher key must be {KEY_SIZE} bytes, got {len(key)}")
        self._key = key
        self._nonce = 0

    @property
    def has_key(self) -> bool:
        return self._key is not None

    @property
    def nonce(self) -> int:
        """The counter the next message will use."""
        return self._nonce

    def set_nonce(self, nonce: int) -> None:
        """Jump the counter (§5.1 SetNonce); for tests and out-of-order transports."""
        if not 0 <= nonce <= MAX_NONCE:
            raise ValueError(f"nonce must be in 0..2^64-1, got {nonce}")
        self._nonce = nonce

    def encrypt_with_ad(self, ad: BytesLike, plaintext: BytesLike) -> bytes:
        """The encryption of ``plaintext`` (§5.1 EncryptWithAd).

        Without a key the plaintext passes unchanged (only during a handshake).
        """
        key = self._key
        if key is None:
            return bytes(plaintext)
        out = crypto.chacha20poly1305_encrypt(key, self._next_nonce_out(), ad, plaintext)
        self._nonce += 1
        return out

    def encrypt_into(
        self, ad: BytesLike, plaintext: BytesLike, out: bytearray | memoryview
    ) -> None:
        """:meth:`encrypt_with_ad` into ``out`` (``len(plaintext) + 16`` bytes); needs a key.

        For bulk traffic: a caller lays out many messages and their frame
        headers in one buffer and copies none of them.
        """
        key = self._require_key()
        crypto.chacha20poly1305_encrypt_into(key, self._next_nonce_out(), ad, plaintext, out)
        self._nonce += 1

    def decrypt_with_ad(self, ad: BytesLike, ciphertext: BytesLike) -> bytes:
        """The plaintext of ``ciphertext`` (§5.1 DecryptWithAd); :class:`DecryptionError`.

        A failed decryption leaves the counter where it was, as §5.1 says.
        """
        key = self._key
        if key is None:
            return bytes(ciphertext)
        out = crypto.chacha20poly1305_decrypt(key, self._next_nonce_in(), ad, ciphertext)
        self._nonce += 1
        return out

    def decrypt_into(
        self, ad: BytesLike, ciphertext: BytesLike, out: bytearray | memoryview
    ) -> None:
        """:meth:`decrypt_with_ad` into ``out`` (``len(ciphertext) - 16`` bytes); needs a key."""
        key = self._require_key()
        crypto.chacha20poly1305_decrypt_into(key, self._next_nonce_in(), ad, ciphertext, out)
        self._nonce += 1

    def _require_key(self) -> bytes:
        if self._key is None:
            raise LocalProtocolError("cipher state has no key yet")
        return self._key

    def _next_nonce_out(self) -> bytes:
        if self._nonce >= MAX_NONCE:
            raise LocalProtocolError(
                "cipher state has used every nonce (2^64-1 messages): "
                "the session must end before another message can be sent"
            )
        return _NONCE.pack(self._nonce)

    def _next_nonce_in(self) -> bytes:
        if self._nonce >= MAX_NONCE:
            raise RemoteProtocolError(
                "peer sent more messages than a session allows (2^64-1): "
                "every nonce of the cipher state is used"
            )
        return _NONCE.pack(self._nonce)


class SymmetricState:
    """Chaining key, handshake hash and the handshake's cipher state (§5.2)."""

    __slots__ = ("_chaining_key", "_cipher", "_hash")

    def __init__(self, protocol_name: bytes) -> None:
        if len(protocol_name) <= HASH_SIZE:
            h = protocol_name.ljust(HASH_SIZE, b"\0")
        else:
            h = _hash(protocol_name)
        self._hash = h
        self._chaining_key = h
        self._cipher = CipherState()

    @property
    def handshake_hash(self) -> bytes:
        return self._hash

    @property
    def has_key(self) -> bool:
        return self._cipher.has_key

    def mix_key(self, input_key_material: bytes) -> None:
        self._chaining_key, temp_key = _hkdf(self._chaining_key, input_key_material)
        # HASHLEN is 64: the cipher key is the first 32 bytes (§5.2).
        self._cipher = CipherState(temp_key[:KEY_SIZE])

    def mix_hash(self, data: BytesLike) -> None:
        self._hash = _hash(self._hash + bytes(data))

    def encrypt_and_hash(self, plaintext: BytesLike) -> bytes:
        ciphertext = self._cipher.encrypt_with_ad(self._hash, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: BytesLike) -> bytes:
        plaintext = self._cipher.decrypt_with_ad(self._hash, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        """The initiator's sending and the responder's sending cipher states (§5.2)."""
        key1, key2 = _hkdf(self._chaining_key, b"")
        return CipherState(key1[:KEY_SIZE]), CipherState(key2[:KEY_SIZE])


def _message_overhead(index: int, has_key: bool) -> int:
    """Bytes message ``index`` adds to its payload, given whether a key exists at its start."""
    overhead = 0
    for token in _XX[index]:
        if token == "e":
            overhead += DH_SIZE
        elif token == "s":
            overhead += DH_SIZE + (TAG_SIZE if has_key else 0)
        else:
            has_key = True
    return overhead + (TAG_SIZE if has_key else 0)


class HandshakeState:
    """One side of an XX handshake (§5.3): write and read messages in turn.

    Build it with :meth:`initiator` or :meth:`responder`. The initiator calls
    :meth:`write_message`, :meth:`read_message`, :meth:`write_message`; the
    responder the mirror image. Then :attr:`is_complete` is true and
    :meth:`split` hands over the two cipher states of the session.
    """

    __slots__ = (
        "_ephemeral_private",
        "_ephemeral_public",
        "_failed",
        "_initiator",
        "_message_index",
        "_remote_ephemeral",
        "_remote_static",
        "_split",
        "_split_taken",
        "_static_private",
        "_static_public",
        "_symmetric",
    )

    def __init__(
        self,
        *,
        initiator: bool,
        static_private: bytes,
        prologue: bytes = b"",
        ephemeral_private: bytes | None = None,
    ) -> None:
        self._initiator = initiator
        self._static_private = bytes(static_private)
        self._static_public = crypto.x25519_public_key(self._static_private)
        self._ephemeral_private = ephemeral_private
        self._ephemeral_public: bytes | None = None
        self._remote_static: bytes | None = None
        self._remote_ephemeral: bytes | None = None
        self._message_index = 0
        self._failed = False
        self._split: tuple[CipherState, CipherState] | None = None
        self._split_taken = False
        self._symmetric = SymmetricState(PROTOCOL_NAME)
        self._symmetric.mix_hash(prologue)

    @classmethod
    def initiator(
        cls, static_private: bytes, *, prologue: bytes = b"", ephemeral_private: bytes | None = None
    ) -> HandshakeState:
        """The side that writes first. ``ephemeral_private`` is for test vectors only."""
        return cls(
            initiator=True,
            static_private=static_private,
            prologue=prologue,
            ephemeral_private=ephemeral_private,
        )

    @classmethod
    def responder(
        cls, static_private: bytes, *, prologue: bytes = b"", ephemeral_private: bytes | None = None
    ) -> HandshakeState:
        """The side that reads first. ``ephemeral_private`` is for test vectors only."""
        return cls(
            initiator=False,
            static_private=static_private,
            prologue=prologue,
            ephemeral_private=ephemeral_private,
        )

    # -- state ------------------------------------------------------------------

    @property
    def is_initiator(self) -> bool:
        return self._initiator

    @property
    def is_complete(self) -> bool:
        return self._message_index == len(_XX)

    @property
    def is_my_turn(self) -> bool:
        """Whether the next step is :meth:`write_message` (else :meth:`read_message`)."""
        return not self.is_complete and (self._message_index % 2 == 0) == self._initiator

    @property
    def static_public(self) -> bytes:
        return self._static_public

    @property
    def remote_static(self) -> bytes | None:
        """The peer's static public key, once its message carrying it is read."""
        return self._remote_static

    @property
    def handshake_hash(self) -> bytes:
        """``h``: identifies the session once :attr:`is_complete` (§11.2)."""
        return self._symmetric.handshake_hash

    def split(self) -> tuple[CipherState, CipherState]:
        """``(send, receive)`` cipher states for this side; once, after the handshake.

        Handing them out twice would let two users share a nonce counter, so a
        second call is refused.
        """
        if self._split is None:
            raise LocalProtocolError("handshake is not complete: nothing to split yet")
        if self._split_taken:
            raise LocalProtocolError("the session's cipher states were already taken")
        self._split_taken = True
        initiator_sends, responder_sends = self._split
        if self._initiator:
            return initiator_sends, responder_sends
        return responder_sends, initiator_sends

    def _check_turn(self, writing: bool) -> None:
        if self._failed:
            raise LocalProtocolError("handshake already failed; start a new one")
        if self.is_complete:
            raise LocalProtocolError("handshake is complete; use the split cipher states")
        if self.is_my_turn != writing:
            expected = "write" if self.is_my_turn else "read"
            raise LocalProtocolError(
                f"out of turn: handshake message {self._message_index + 1} is ours to {expected}"
            )

    def _finish_message(self) -> None:
        self._message_index += 1
        if self.is_complete:
            self._split = self._symmetric.split()

    # -- DH ---------------------------------------------------------------------

    def _dh(self, token: str) -> bytes:
        # Which local and remote key each token pairs depends on the role (§7.1:
        # "es" is the initiator's ephemeral with the responder's static).
        local_first, remote_first = token[0], token[1]
        if not self._initiator:
            local_first, remote_first = remote_first, local_first
        local = self._ephemeral_private if local_first == "e" else self._static_private
        remote = self._remote_ephemeral if remote_first == "e" else self._remote_static
        assert local is not None and remote is not None  # the pattern guarantees both
        return crypto.x25519(local, remote)

    # -- writing ----------------------------------------------------------------

    def write_message(self, payload: BytesLike = b"") -> bytes:
        """The next handshake message, carrying ``payload``."""
        self._check_turn(writing=True)
        size = len(payload) + _message_overhead(self._message_index, self._symmetric.has_key)
        if size > MAX_MESSAGE_SIZE:
            raise LocalProtocolError(
                f"handshake message {self._message_index + 1} would be {size} bytes, "
                f"more than Noise's {MAX_MESSAGE_SIZE}"
            )
        try:
            parts: list[bytes] = []
            for token in _XX[self._message_index]:
                if token == "e":
                    if self._ephemeral_private is None:
                        self._ephemeral_private = crypto.random_bytes(DH_SIZE)
                    self._ephemeral_public = crypto.x25519_public_key(self._ephemeral_private)
                    parts.append(self._ephemeral_public)
                    self._symmetric.mix_hash(self._ephemeral_public)
                elif token == "s":
                    parts.append(self._symmetric.encrypt_and_hash(self._static_public))
                else:
                    self._symmetric.mix_key(self._dh(token))
            parts.append(self._symmetric.encrypt_and_hash(payload))
        except KeyAgreementError as exc:
            # Only the peer's keys can be unusable: ours are made here.
            self._failed = True
            raise HandshakeError(f"peer's handshake key is unusable: {exc}") from None
        except BaseException:
            self._failed = True
            raise
        self._finish_message()
        return b"".join(parts)

    # -- reading ----------------------------------------------------------------

    def read_message(self, message: BytesLike) -> bytes:
        """The payload of the peer's next handshake ``message``."""
        self._check_turn(writing=False)
        number = self._message_index + 1
        try:
            payload = self._read(memoryview(message).cast("B"), number)
        except BaseException:
            self._failed = True
            raise
        self._finish_message()
        return payload

    def _read(self, message: memoryview, number: int) -> bytes:
        if len(message) > MAX_MESSAGE_SIZE:
            raise HandshakeError(
                f"handshake message {number} is {len(message)} bytes, "
                f"more than Noise's {MAX_MESSAGE_SIZE}"
            )
        minimum = _message_overhead(self._message_index, self._symmetric.has_key)
        if len(message) < minimum:
            raise HandshakeError(
                f"handshake message {number} is truncated: {len(message)} bytes, "
                f"at least {minimum} expected"
            )
        offset = 0
        for token in _XX[self._message_index]:
            if token == "e":
                self._remote_ephemeral = bytes(message[offset : offset + DH_SIZE])
                offset += DH_SIZE
                self._symmetric.mix_hash(self._remote_ephemeral)
            elif token == "s":
                size = DH_SIZE + (TAG_SIZE if self._symmetric.has_key else 0)
                sealed = message[offset : offset + size]
                offset += size
                try:
                    self._remote_static = self._symmetric.decrypt_and_hash(sealed)
                except DecryptionError:
                    raise HandshakeError(
                        f"handshake message {number}: the peer's static key does not "
                        "authenticate (tampered message, or another protocol or prologue)"
                    ) from None
            else:
                try:
                    self._symmetric.mix_key(self._dh(token))
                except KeyAgreementError as exc:
                    raise HandshakeError(
                        f"handshake message {number}: peer's key is unusable: {exc}"
                    ) from None
        try:
            return self._symmetric.decrypt_and_hash(message[offset:])
        except DecryptionError:
            raise HandshakeError(
                f"handshake message {number}: payload does not authenticate "
                "(tampered message, or another protocol, prologue or key)"
            ) from None
