"""The cryptographic primitives of p2pbackup: a thin façade over libsodium.

This is the only module that imports ``nacl`` (PyNaCl); everything else calls
the functions below, so the choice of primitives lives in one place.

Nouns:

* **key** — 32 secret bytes for the AEAD (:data:`KEY_SIZE`).
* **sealed message** — the output of :func:`seal`:
  ``nonce (24) || ciphertext || tag (16)``, XChaCha20-Poly1305-IETF with a
  random nonce (192 bits, so random nonces never collide in practice). The
  *aad* (associated data) is authenticated but not stored: the opener must
  supply the same aad, which binds a ciphertext to its context.
* **hash** — BLAKE2b (libsodium ``crypto_generichash``), 16–64 bytes of
  output, optionally keyed (a MAC / keyed id) and personalised (domain
  separation, up to 16 bytes, zero-padded as BLAKE2b specifies). Output is
  byte-for-byte what ``hashlib.blake2b`` gives for the same parameters.
* **derived key** — see :func:`derive_key`; a persisted construction.
* **seed** — the 32-byte secret an Ed25519 signing key is expanded from;
  signatures are 64-byte detached Ed25519 signatures.
* **X25519 private key** — 32 random bytes (clamping is applied by libsodium).
  :func:`x25519` turns a private key and a peer's public key into a 32-byte
  shared secret (Noise's DH), refusing low-order public keys.
* **ChaCha20-Poly1305 nonce** — the 12-byte explicit nonce of the IETF AEAD
  that Noise uses (:func:`chacha20poly1305_encrypt`); unlike :func:`seal`, the
  caller supplies it and must never repeat one under a key.

Performance: the bulk operations (:func:`seal`, :func:`unseal`,
:func:`hash_bytes`, :meth:`Hasher.update`) call libsodium through cffi
directly rather than through ``nacl.bindings``, because the bindings insist on
``bytes`` inputs (a full copy of every memoryview), zero-fill their output
buffers and then copy them out again, which about doubles the cost of sealing
a chunk (docs/performance.md#crypto). cffi releases the GIL for the duration of
each libsodium call, so two threads seal or hash on two cores at once.
"""

from __future__ import annotations

import ctypes
import hashlib
import sys
from typing import Any, Final

import nacl.bindings
import nacl.exceptions

# cffi handles of PyNaCl's bundled libsodium. Private to PyNaCl but what all of
# nacl.bindings is built on; used only where copies of large buffers matter.
from nacl._sodium import ffi, lib  # type: ignore[import-not-found]

from p2pbackup.errors import DecryptionError, KeyAgreementError, SignatureError
from p2pbackup.model import BytesLike

KEY_SIZE: Final = 32
NONCE_SIZE: Final = 24
TAG_SIZE: Final = 16
#: Bytes :func:`seal` adds to a plaintext: nonce and Poly1305 tag.
SEAL_OVERHEAD: Final = NONCE_SIZE + TAG_SIZE
SIGNATURE_SIZE: Final = 64
PUBLIC_KEY_SIZE: Final = 32
SEED_SIZE: Final = 32

HASH_SIZE_MIN: Final = 16
HASH_SIZE_MAX: Final = 64
HASH_KEY_MIN: Final = 16
HASH_KEY_MAX: Final = 64
PERSON_SIZE: Final = 16

#: BLAKE2b personalisation of :func:`derive_key`. Changing it changes every key
#: derived from every recovery key ever issued: never change it.
KDF_PERSON: Final = b"p2pbackup.kdf.v1"

_HASH_STATE_SIZE: Final = 384

assert lib.crypto_aead_xchacha20poly1305_ietf_npubbytes() == NONCE_SIZE
assert lib.crypto_aead_xchacha20poly1305_ietf_abytes() == TAG_SIZE
assert lib.crypto_aead_xchacha20poly1305_ietf_keybytes() == KEY_SIZE
assert lib.crypto_generichash_statebytes() <= _HASH_STATE_SIZE


# --- zero-copy output buffers ------------------------------------------------

# Below this size, a copy costs less than thinking about it.
_ZERO_COPY_MIN = 4096


def _make_bytes_allocator() -> Any:
    if sys.implementation.name != "cpython":
        return None
    # Our own prototype (PYFUNCTYPE keeps the GIL, as the C API requires), so
    # that nothing set on the shared ctypes.pythonapi attribute affects us.
    prototype = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_ssize_t)
    return prototype(("PyBytes_FromStringAndSize", ctypes.pythonapi))


_bytes_from_null = _make_bytes_allocator()


class _Output:
    """A buffer libsodium writes into, finished as an immutable ``bytes``.

    On CPython a large output is a fresh, uninitialised ``bytes`` object that
    libsodium fills in place — how CPython's own C code builds bytes (e.g.
    ``hashlib``, ``zlib``): nothing else holds a reference until it is
    returned, so its immutability is never observed to change. Small outputs,
    and other interpreters, use a cffi buffer and one copy.
    """

    __slots__ = ("_cdata", "_obj", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._obj: bytes | None = None
        if size >= _ZERO_COPY_MIN and _bytes_from_null is not None:
            self._obj = _bytes_from_null(None, size)
            self._cdata = ffi.from_buffer("unsigned char[]", self._obj)
        else:
            self._cdata = ffi.new("unsigned char[]", max(size, 1))

    @property
    def pointer(self) -> Any:
        return self._cdata

    def finish(self) -> bytes:
        if self._obj is not None:
            return self._obj
        return bytes(ffi.buffer(self._cdata, self.size))


def _view(data: BytesLike) -> Any:
    """A read-only cffi pointer into ``data`` without copying it."""
    return ffi.from_buffer("unsigned char[]", data)


def _require_len(name: str, value: BytesLike, expected: int) -> None:
    if len(value) != expected:
        raise ValueError(f"{name} must be {expected} bytes, got {len(value)}")


# --- randomness --------------------------------------------------------------


def random_bytes(n: int) -> bytes:
    """``n`` bytes from libsodium's CSPRNG."""
    if n < 0:
        raise ValueError(f"cannot make {n} random bytes")
    out = _Output(n)
    lib.randombytes(out.pointer, n)
    return out.finish()


# --- hashing -----------------------------------------------------------------


def _check_hash_params(size: int, key: BytesLike) -> None:
    if not HASH_SIZE_MIN <= size <= HASH_SIZE_MAX:
        raise ValueError(f"hash size must be {HASH_SIZE_MIN}..{HASH_SIZE_MAX}, got {size}")
    if key and not HASH_KEY_MIN <= len(key) <= HASH_KEY_MAX:
        raise ValueError(
            f"hash key must be empty or {HASH_KEY_MIN}..{HASH_KEY_MAX} bytes, got {len(key)}"
        )


def _padded_person(person: bytes) -> Any:
    if len(person) > PERSON_SIZE:
        raise ValueError(f"personalisation is at most {PERSON_SIZE} bytes, got {len(person)}")
    if not person:
        return ffi.NULL
    buf = ffi.new("unsigned char[]", PERSON_SIZE)
    ffi.memmove(buf, person, len(person))
    return buf


#: Inputs shorter than this are hashed by the standard library's BLAKE2b (the
#: same function): a call costs a fraction of libsodium's through cffi, and it
#: keeps the GIL below 2 KiB instead of handing it to another thread and
#: waiting to get it back. libsodium is faster from a few KiB up
#: (docs/performance.md#crypto).
_SMALL_HASH_INPUT: Final = 4096


def hash_bytes(data: BytesLike, *, size: int = 32, key: bytes = b"", person: bytes = b"") -> bytes:
    """BLAKE2b of ``data``: ``size`` bytes, optionally keyed and personalised."""
    _check_hash_params(size, key)
    if len(person) > PERSON_SIZE:
        raise ValueError(f"personalisation is at most {PERSON_SIZE} bytes, got {len(person)}")
    if len(data) < _SMALL_HASH_INPUT:
        return hashlib.blake2b(data, digest_size=size, key=key, person=person).digest()
    out = ffi.new("unsigned char[]", size)
    src = _view(data)
    rc = lib.crypto_generichash_blake2b_salt_personal(
        out, size, src, len(src), _view(key) if key else ffi.NULL, len(key), ffi.NULL,
        _padded_person(person),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError("libsodium BLAKE2b failed")
    return bytes(ffi.buffer(out, size))


class Hasher:
    """Incremental BLAKE2b; same output as :func:`hash_bytes` over the concatenation.

    :meth:`digest` may be called any number of times and :meth:`update` may
    continue afterwards, as with ``hashlib``. Not safe to share between threads.
    """

    __slots__ = ("_size", "_state")

    def __init__(self, *, size: int = 32, key: bytes = b"") -> None:
        _check_hash_params(size, key)
        self._size = size
        self._state = ffi.new("unsigned char[]", _HASH_STATE_SIZE)
        rc = lib.crypto_generichash_blake2b_init_salt_personal(
            self._state, _view(key) if key else ffi.NULL, len(key), size, ffi.NULL, ffi.NULL
        )
        if rc != 0:
            raise RuntimeError("libsodium BLAKE2b init failed")

    def update(self, data: BytesLike) -> None:
        src = _view(data)
        lib.crypto_generichash_blake2b_update(self._state, src, len(src))

    def digest(self) -> bytes:
        # Finalising consumes a libsodium state, so finalise a copy.
        state = ffi.new("unsigned char[]", _HASH_STATE_SIZE)
        ffi.memmove(state, self._state, _HASH_STATE_SIZE)
        out = ffi.new("unsigned char[]", self._size)
        if lib.crypto_generichash_blake2b_final(state, out, self._size) != 0:
            raise RuntimeError("libsodium BLAKE2b final failed")
        return bytes(ffi.buffer(out, self._size))


# --- key derivation ----------------------------------------------------------


def derive_key(master: bytes, context: str, *, size: int = 32) -> bytes:
    """A subkey of ``master`` for ``context``; distinct contexts give independent keys.

    The construction is persisted (the recovery key must rebuild the same keys
    forever), so it is fixed exactly::

        BLAKE2b(message  = UTF-8 bytes of context,
                key      = master,               # 16..64 bytes
                digest   = size bytes,           # 16..64
                salt     = 16 zero bytes,
                person   = b"p2pbackup.kdf.v1")

    i.e. ``hashlib.blake2b(context.encode(), key=master, digest_size=size,
    person=b"p2pbackup.kdf.v1").digest()``. BLAKE2b keyed with ``master`` is
    a PRF, and the context is the whole message, so contexts that differ in
    any way give independent keys. The digest size is part of BLAKE2b's
    parameter block, so the same context at two sizes also gives unrelated
    keys rather than one being a prefix of the other.
    """
    if not context:
        raise ValueError("key derivation needs a non-empty context")
    if not HASH_KEY_MIN <= len(master) <= HASH_KEY_MAX:
        raise ValueError(f"master key must be {HASH_KEY_MIN}..{HASH_KEY_MAX} bytes")
    return hash_bytes(context.encode("utf-8"), size=size, key=master, person=KDF_PERSON)


# --- authenticated encryption ------------------------------------------------


def seal(key: bytes, plaintext: BytesLike, *, aad: bytes = b"") -> bytes:
    """Encrypt and authenticate: ``nonce || ciphertext || tag`` (XChaCha20-Poly1305)."""
    _require_len("key", key, KEY_SIZE)
    src = _view(plaintext)
    out = _Output(NONCE_SIZE + len(src) + TAG_SIZE)
    nonce = out.pointer
    # Through random_bytes, the one source of randomness (the simulator
    # draws it from its seed), not libsodium's randombytes straight in.
    ffi.memmove(nonce, random_bytes(NONCE_SIZE), NONCE_SIZE)
    rc = lib.crypto_aead_xchacha20poly1305_ietf_encrypt(
        nonce + NONCE_SIZE,
        ffi.NULL,
        src,
        len(src),
        _view(aad),
        len(aad),
        ffi.NULL,
        nonce,
        _view(key),
    )
    if rc != 0:
        raise RuntimeError("libsodium encryption failed")
    return out.finish()


def unseal(key: bytes, sealed: BytesLike, *, aad: bytes = b"") -> bytes:
    """The plaintext of a :func:`seal` output; :class:`DecryptionError` on any failure."""
    _require_len("key", key, KEY_SIZE)
    src = _view(sealed)
    if len(src) < SEAL_OVERHEAD:
        raise DecryptionError(
            f"sealed message is truncated: {len(src)} bytes, "
            f"shorter than the {SEAL_OVERHEAD}-byte overhead"
        )
    out = _Output(len(src) - SEAL_OVERHEAD)
    rc = lib.crypto_aead_xchacha20poly1305_ietf_decrypt(
        out.pointer, ffi.NULL, ffi.NULL, src + NONCE_SIZE, len(src) - NONCE_SIZE,
        _view(aad), len(aad), src, _view(key),
    )  # fmt: skip
    if rc != 0:
        raise DecryptionError(
            "decryption failed: the data was modified, truncated, "
            "or sealed under another key or context"
        )
    return out.finish()


# --- signatures and key agreement -------------------------------------------


def signing_public_key(seed: bytes) -> bytes:
    """The Ed25519 public key of the signing key expanded from ``seed``."""
    _require_len("signing seed", seed, SEED_SIZE)
    public, _secret = nacl.bindings.crypto_sign_seed_keypair(bytes(seed))
    return public


def sign(seed: bytes, message: bytes) -> bytes:
    """A detached 64-byte Ed25519 signature of ``message``."""
    _require_len("signing seed", seed, SEED_SIZE)
    _public, secret = nacl.bindings.crypto_sign_seed_keypair(bytes(seed))
    # PyNaCl exposes only the combined form, signature || message.
    return nacl.bindings.crypto_sign(bytes(message), secret)[:SIGNATURE_SIZE]


def verify(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Return if ``signature`` is ``public_key``'s on ``message``; else :class:`SignatureError`."""
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise SignatureError(f"public key must be {PUBLIC_KEY_SIZE} bytes, got {len(public_key)}")
    if len(signature) != SIGNATURE_SIZE:
        raise SignatureError(f"signature must be {SIGNATURE_SIZE} bytes, got {len(signature)}")
    try:
        nacl.bindings.crypto_sign_open(bytes(signature) + bytes(message), bytes(public_key))
    except nacl.exceptions.CryptoError:
        raise SignatureError("signature does not verify") from None


def x25519_public_key(private_key: bytes) -> bytes:
    """The X25519 public key for ``private_key``."""
    _require_len("X25519 private key", private_key, KEY_SIZE)
    return nacl.bindings.crypto_scalarmult_base(bytes(private_key))


# --- X25519 key agreement and ChaCha20-Poly1305 (Noise) ----------------------

#: Nonce of the IETF ChaCha20-Poly1305 AEAD (:func:`chacha20poly1305_encrypt`).
CHACHA_NONCE_SIZE: Final = 12
X25519_KEY_SIZE: Final = 32

assert lib.crypto_aead_chacha20poly1305_ietf_npubbytes() == CHACHA_NONCE_SIZE
assert lib.crypto_aead_chacha20poly1305_ietf_abytes() == TAG_SIZE
assert lib.crypto_aead_chacha20poly1305_ietf_keybytes() == KEY_SIZE
assert lib.crypto_scalarmult_bytes() == X25519_KEY_SIZE


def x25519_generate() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair: ``(private, public)``."""
    private = random_bytes(X25519_KEY_SIZE)
    return private, x25519_public_key(private)


def x25519(private_key: bytes, public_key: BytesLike) -> bytes:
    """The X25519 shared secret of ``private_key`` and the peer's ``public_key``.

    A public key of small order gives an all-zero secret that the peer can
    predict without knowing any private key; libsodium refuses it, and so do
    we: :class:`KeyAgreementError`. (Noise lets a DH function do either; the
    refusal is what makes a forged ephemeral key fail loudly rather than
    silently yield a known key.)
    """
    _require_len("X25519 private key", private_key, X25519_KEY_SIZE)
    if len(public_key) != X25519_KEY_SIZE:
        raise KeyAgreementError(
            f"X25519 public key must be {X25519_KEY_SIZE} bytes, got {len(public_key)}"
        )
    out = ffi.new("unsigned char[]", X25519_KEY_SIZE)
    if lib.crypto_scalarmult(out, _view(private_key), _view(public_key)) != 0:
        raise KeyAgreementError(
            "X25519 public key is a low-order point: the shared secret would be all zeros"
        )
    return bytes(ffi.buffer(out, X25519_KEY_SIZE))


def _check_chacha_params(key: bytes, nonce: BytesLike) -> None:
    _require_len("key", key, KEY_SIZE)
    _require_len("ChaCha20-Poly1305 nonce", nonce, CHACHA_NONCE_SIZE)


def _writable(name: str, out: bytearray | memoryview, expected: int) -> Any:
    if len(out) != expected:
        raise ValueError(f"{name} must be {expected} bytes, got {len(out)}")
    return ffi.from_buffer("unsigned char[]", out, require_writable=True)


def chacha20poly1305_encrypt(
    key: bytes, nonce: BytesLike, ad: BytesLike, plaintext: BytesLike
) -> bytes:
    """``ciphertext || tag`` under ChaCha20-Poly1305-IETF (RFC 8439).

    The caller owns nonce uniqueness: the 96-bit nonce is explicit, as Noise
    needs it, and reusing one under the same key is catastrophic.
    """
    _check_chacha_params(key, nonce)
    src = _view(plaintext)
    out = _Output(len(src) + TAG_SIZE)
    _chacha_encrypt(key, nonce, ad, src, out.pointer)
    return out.finish()


def chacha20poly1305_encrypt_into(
    key: bytes,
    nonce: BytesLike,
    ad: BytesLike,
    plaintext: BytesLike,
    out: bytearray | memoryview,
) -> None:
    """:func:`chacha20poly1305_encrypt` into ``out``, exactly ``len(plaintext) + 16`` bytes.

    Lets a caller lay several messages and their frame headers out in one
    buffer, with no copy of any of them. ``out`` may be ``plaintext`` itself
    (in place) but must not overlap it otherwise.
    """
    _check_chacha_params(key, nonce)
    src = _view(plaintext)
    _chacha_encrypt(key, nonce, ad, src, _writable("output", out, len(src) + TAG_SIZE))


def _chacha_encrypt(key: bytes, nonce: BytesLike, ad: BytesLike, src: Any, dst: Any) -> None:
    rc = lib.crypto_aead_chacha20poly1305_ietf_encrypt(
        dst, ffi.NULL, src, len(src), _view(ad), len(ad), ffi.NULL, _view(nonce), _view(key)
    )
    if rc != 0:
        raise RuntimeError("libsodium encryption failed")


def chacha20poly1305_decrypt(
    key: bytes, nonce: BytesLike, ad: BytesLike, ciphertext: BytesLike
) -> bytes:
    """The plaintext of ``ciphertext || tag``; :class:`DecryptionError` on any failure."""
    _check_chacha_params(key, nonce)
    src = _view(ciphertext)
    _check_tagged(len(src))
    out = _Output(len(src) - TAG_SIZE)
    _chacha_decrypt(key, nonce, ad, src, out.pointer)
    return out.finish()


def chacha20poly1305_decrypt_into(
    key: bytes,
    nonce: BytesLike,
    ad: BytesLike,
    ciphertext: BytesLike,
    out: bytearray | memoryview,
) -> None:
    """:func:`chacha20poly1305_decrypt` into ``out``, exactly ``len(ciphertext) - 16`` bytes.

    On failure ``out`` holds no plaintext (libsodium clears it). ``out`` may
    start where ``ciphertext`` does (in place) but must not overlap it otherwise.
    """
    _check_chacha_params(key, nonce)
    src = _view(ciphertext)
    _check_tagged(len(src))
    _chacha_decrypt(key, nonce, ad, src, _writable("output", out, len(src) - TAG_SIZE))


def _check_tagged(size: int) -> None:
    if size < TAG_SIZE:
        raise DecryptionError(
            f"ciphertext is truncated: {size} bytes, shorter than the {TAG_SIZE}-byte tag"
        )


def _chacha_decrypt(key: bytes, nonce: BytesLike, ad: BytesLike, src: Any, dst: Any) -> None:
    rc = lib.crypto_aead_chacha20poly1305_ietf_decrypt(
        dst, ffi.NULL, ffi.NULL, src, len(src), _view(ad), len(ad), _view(nonce), _view(key)
    )
    if rc != 0:
        raise DecryptionError(
            "decryption failed: the ciphertext was modified or truncated, "
            "or encrypted under another key, nonce or associated data"
        )
