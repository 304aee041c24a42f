"""Tests of p2pbackup.core.crypto: AEAD, hashing, key derivation, signatures."""

from __future__ import annotations

import hashlib
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pbackup.core import crypto
from p2pbackup.errors import DecryptionError, KeyAgreementError, SignatureError

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


# --- seal / unseal -------------------------------------------------------------


@given(plaintext=st.binary(max_size=5000), aad=st.binary(max_size=64))
def test_seal_round_trip(plaintext: bytes, aad: bytes) -> None:
    sealed = crypto.seal(KEY, plaintext, aad=aad)
    assert len(sealed) == len(plaintext) + crypto.SEAL_OVERHEAD
    assert crypto.unseal(KEY, sealed, aad=aad) == plaintext


def test_seal_accepts_views_and_returns_bytes() -> None:
    # 64 KiB crosses the size above which output buffers are built in place.
    plaintext = crypto.random_bytes(64 * 1024)
    for form in (plaintext, bytearray(plaintext), memoryview(plaintext)):
        sealed = crypto.seal(KEY, form)
        assert type(sealed) is bytes
        opened = crypto.unseal(KEY, memoryview(sealed))
        assert type(opened) is bytes
        assert opened == plaintext


def test_seal_output_does_not_hide_plaintext_layout() -> None:
    plaintext = b"attack at dawn" * 10
    first, second = crypto.seal(KEY, plaintext), crypto.seal(KEY, plaintext)
    # Random nonces: the same plaintext never seals the same way twice.
    assert first[: crypto.NONCE_SIZE] != second[: crypto.NONCE_SIZE]
    assert first != second
    assert plaintext not in first


def test_large_outputs_are_independent_objects() -> None:
    # Guards the in-place construction of large outputs: one result must never
    # alias another or change after it was returned.
    plaintext = bytes(100_000)
    first = crypto.seal(KEY, plaintext)
    snapshot = bytes(bytearray(first))
    second = crypto.seal(KEY, plaintext)
    assert first == snapshot
    assert first is not second and first != second
    assert crypto.unseal(KEY, first) == crypto.unseal(KEY, second) == plaintext


def test_tampering_with_any_byte_is_detected() -> None:
    sealed = crypto.seal(KEY, b"twenty bytes of text", aad=b"ctx")
    for position in range(len(sealed)):
        for flip in (0x01, 0x80):
            damaged = bytearray(sealed)
            damaged[position] ^= flip
            with pytest.raises(DecryptionError):
                crypto.unseal(KEY, bytes(damaged), aad=b"ctx")


def test_wrong_key_or_aad_is_detected() -> None:
    sealed = crypto.seal(KEY, b"secret", aad=b"blob 1")
    with pytest.raises(DecryptionError):
        crypto.unseal(OTHER_KEY, sealed, aad=b"blob 1")
    with pytest.raises(DecryptionError):
        crypto.unseal(KEY, sealed, aad=b"blob 2")
    with pytest.raises(DecryptionError):
        crypto.unseal(KEY, sealed)


def test_truncation_and_extension_are_detected() -> None:
    sealed = crypto.seal(KEY, b"some plaintext")
    for length in range(len(sealed)):
        with pytest.raises(DecryptionError):
            crypto.unseal(KEY, sealed[:length])
    with pytest.raises(DecryptionError):
        crypto.unseal(KEY, sealed + b"\x00")


def test_empty_plaintext_is_still_authenticated() -> None:
    sealed = crypto.seal(KEY, b"")
    assert len(sealed) == crypto.SEAL_OVERHEAD
    assert crypto.unseal(KEY, sealed) == b""
    with pytest.raises(DecryptionError):
        crypto.unseal(OTHER_KEY, sealed)


def test_key_of_wrong_length_is_a_usage_error() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        crypto.seal(b"short", b"x")
    with pytest.raises(ValueError, match="32 bytes"):
        crypto.unseal(b"short", bytes(64))


def test_sealing_in_parallel_threads() -> None:
    results: dict[int, bool] = {}

    def work(index: int) -> None:
        key = bytes([index]) * 32
        plaintext = bytes([index]) * 300_000
        ok = all(
            crypto.unseal(key, crypto.seal(key, plaintext, aad=b"t"), aad=b"t") == plaintext
            for _ in range(5)
        )
        results[index] = ok

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {0: True, 1: True, 2: True, 3: True}


# --- random bytes ------------------------------------------------------------------


def test_random_bytes() -> None:
    assert crypto.random_bytes(0) == b""
    small, large = crypto.random_bytes(32), crypto.random_bytes(100_000)
    assert len(small) == 32 and len(large) == 100_000
    assert small != crypto.random_bytes(32)
    # Not a constant fill: a CSPRNG output of this size uses every byte value.
    assert len(set(large)) == 256
    with pytest.raises(ValueError):
        crypto.random_bytes(-1)


# --- hashing -----------------------------------------------------------------------


@given(
    # Both sides of the size below which the standard library does the hashing.
    data=st.one_of(st.binary(max_size=300), st.binary(min_size=4000, max_size=9000)),
    size=st.integers(16, 64),
    key=st.one_of(st.just(b""), st.binary(min_size=16, max_size=64)),
    person=st.binary(max_size=16),
)
def test_hash_bytes_is_standard_blake2b(data: bytes, size: int, key: bytes, person: bytes) -> None:
    expected = hashlib.blake2b(data, digest_size=size, key=key, person=person).digest()
    assert crypto.hash_bytes(data, size=size, key=key, person=person) == expected
    assert crypto.hash_bytes(memoryview(data), size=size, key=key, person=person) == expected


def test_hash_bytes_known_answer() -> None:
    # BLAKE2b-512("abc"), RFC 7693 appendix A.
    assert crypto.hash_bytes(b"abc", size=64).hex() == (
        "ba80a53f981c4d0d6a2797b69f12f6e94c212f14685ac4b74b12bb6fdbffa2d1"
        "7d87c5392aab792dc252d5de4533cc9518d38aa8dbf1925ab92386edd4009923"
    )


@given(
    parts=st.lists(st.binary(max_size=700), max_size=8),
    key=st.one_of(st.just(b""), st.binary(min_size=16, max_size=64)),
)
def test_hasher_matches_one_shot(parts: list[bytes], key: bytes) -> None:
    hasher = crypto.Hasher(size=32, key=key)
    for part in parts:
        hasher.update(memoryview(part))
    whole = b"".join(parts)
    assert hasher.digest() == crypto.hash_bytes(whole, key=key)
    # digest() leaves the hasher usable, like hashlib.
    assert hasher.digest() == crypto.hash_bytes(whole, key=key)
    hasher.update(b"more")
    assert hasher.digest() == crypto.hash_bytes(whole + b"more", key=key)


def test_hash_parameters_are_checked() -> None:
    with pytest.raises(ValueError):
        crypto.hash_bytes(b"x", size=15)
    with pytest.raises(ValueError):
        crypto.hash_bytes(b"x", size=65)
    with pytest.raises(ValueError):
        crypto.hash_bytes(b"x", key=b"too short")
    with pytest.raises(ValueError):
        crypto.hash_bytes(b"x", person=bytes(17))
    with pytest.raises(ValueError):
        crypto.Hasher(size=8)


# --- key derivation ------------------------------------------------------------------


def test_derive_key_is_the_documented_construction() -> None:
    master = bytes(range(32))
    for context, size in (("data", 32), ("identity/ed25519-seed", 32), ("x", 16), ("ü", 64)):
        expected = hashlib.blake2b(
            context.encode(), key=master, digest_size=size, person=b"p2pbackup.kdf.v1"
        ).digest()
        assert crypto.derive_key(master, context, size=size) == expected


def test_derive_key_known_answer() -> None:
    # Persisted format: recovery keys issued today must rebuild these forever.
    assert crypto.derive_key(bytes(range(32)), "data").hex() == (
        "077436efeeb35d2a98c5e2526864753db229b553e32e3f407bbdd9bb94cb7e0a"
    )


def test_derive_key_separates_contexts_and_sizes() -> None:
    master = crypto.random_bytes(32)
    keys = {crypto.derive_key(master, context) for context in ("a", "b", "a ", "A", "ab")}
    assert len(keys) == 5
    assert crypto.derive_key(master, "a") == crypto.derive_key(master, "a")
    assert crypto.derive_key(crypto.random_bytes(32), "a") != crypto.derive_key(master, "a")
    # A shorter key is not a prefix of a longer one.
    assert not crypto.derive_key(master, "a", size=64).startswith(crypto.derive_key(master, "a"))


def test_derive_key_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        crypto.derive_key(bytes(32), "")
    with pytest.raises(ValueError):
        crypto.derive_key(bytes(8), "data")


# --- signatures and X25519 ---------------------------------------------------------


def test_ed25519_known_answer() -> None:
    # RFC 8032 section 7.1, test 1.
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    public = crypto.signing_public_key(seed)
    assert public.hex() == "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    signature = crypto.sign(seed, b"")
    assert signature.hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555"
        "fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )
    crypto.verify(public, b"", signature)


@given(message=st.binary(max_size=500))
def test_sign_verify_round_trip(message: bytes) -> None:
    seed = bytes(range(32))
    signature = crypto.sign(seed, message)
    assert len(signature) == crypto.SIGNATURE_SIZE
    crypto.verify(crypto.signing_public_key(seed), message, signature)


def test_forgeries_fail() -> None:
    seed, other_seed = bytes(range(32)), bytes(range(1, 33))
    public = crypto.signing_public_key(seed)
    message = b"renew lease for shard 42"
    signature = crypto.sign(seed, message)
    for position in range(len(signature)):
        forged = bytearray(signature)
        forged[position] ^= 0x01
        with pytest.raises(SignatureError):
            crypto.verify(public, message, bytes(forged))
    for position in range(len(message)):
        altered = bytearray(message)
        altered[position] ^= 0x20
        with pytest.raises(SignatureError):
            crypto.verify(public, bytes(altered), signature)
    with pytest.raises(SignatureError):
        crypto.verify(public, message + b"!", signature)
    with pytest.raises(SignatureError):
        crypto.verify(crypto.signing_public_key(other_seed), message, signature)
    with pytest.raises(SignatureError):
        crypto.verify(public, message, crypto.sign(other_seed, message))


def test_malformed_keys_and_signatures_are_signature_errors() -> None:
    seed = bytes(range(32))
    public = crypto.signing_public_key(seed)
    signature = crypto.sign(seed, b"m")
    with pytest.raises(SignatureError):
        crypto.verify(public[:31], b"m", signature)
    with pytest.raises(SignatureError):
        crypto.verify(public, b"m", signature[:63])
    with pytest.raises(SignatureError):
        crypto.verify(public, b"m", signature + b"\x00")
    with pytest.raises(SignatureError):
        crypto.verify(bytes(32), b"m", signature)


def test_x25519_known_answer() -> None:
    # RFC 7748 section 6.1, Alice.
    private = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    assert crypto.x25519_public_key(private).hex() == (
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )
    with pytest.raises(ValueError):
        crypto.x25519_public_key(private[:31])


# --- X25519 agreement and ChaCha20-Poly1305 (the Noise primitives) -----------

RFC7748_ALICE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
RFC7748_BOB = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")

# RFC 8439 section 2.8.2.
RFC8439_KEY = bytes(range(0x80, 0xA0))
RFC8439_NONCE = bytes.fromhex("070000004041424344454647")
RFC8439_AD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
RFC8439_PLAINTEXT = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip "
    b"for the future, sunscreen would be it."
)
RFC8439_SEALED = bytes.fromhex(
    "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6"
    "3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36"
    "92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
    "3ff4def08e4b7a9de576d26586cec64b6116"
    "1ae10b594f09e26a7e902ecbd0600691"
)


def test_x25519_agreement_known_answer() -> None:
    # RFC 7748 section 6.1: both sides reach the same secret.
    alice_public = crypto.x25519_public_key(RFC7748_ALICE)
    bob_public = crypto.x25519_public_key(RFC7748_BOB)
    shared = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    assert crypto.x25519(RFC7748_ALICE, bob_public).hex() == shared
    assert crypto.x25519(RFC7748_BOB, memoryview(alice_public)).hex() == shared


def test_x25519_generate_gives_matching_distinct_pairs() -> None:
    private, public = crypto.x25519_generate()
    other_private, other_public = crypto.x25519_generate()
    assert public == crypto.x25519_public_key(private)
    assert private != other_private
    assert crypto.x25519(private, other_public) == crypto.x25519(other_private, public)


@pytest.mark.parametrize(
    "public",
    [
        bytes(32),  # u = 0, order 2
        (1).to_bytes(32, "little"),  # u = 1, order 4
        # The two points of order 8 (libsodium's blocklist).
        bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
        bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    ],
)
def test_x25519_refuses_low_order_points(public: bytes) -> None:
    with pytest.raises(KeyAgreementError, match="low-order"):
        crypto.x25519(RFC7748_ALICE, public)


def test_x25519_rejects_wrong_sizes() -> None:
    with pytest.raises(KeyAgreementError, match="32 bytes"):
        crypto.x25519(RFC7748_ALICE, bytes(31))
    with pytest.raises(ValueError, match="private key"):
        crypto.x25519(RFC7748_ALICE[:31], crypto.x25519_public_key(RFC7748_BOB))


def test_chacha20poly1305_known_answer() -> None:
    sealed = crypto.chacha20poly1305_encrypt(
        RFC8439_KEY, RFC8439_NONCE, RFC8439_AD, RFC8439_PLAINTEXT
    )
    assert sealed == RFC8439_SEALED
    assert (
        crypto.chacha20poly1305_decrypt(RFC8439_KEY, RFC8439_NONCE, RFC8439_AD, sealed)
        == RFC8439_PLAINTEXT
    )


@given(
    plaintext=st.binary(max_size=3000),
    ad=st.binary(max_size=80),
    nonce=st.binary(min_size=12, max_size=12),
)
def test_chacha20poly1305_matches_an_independent_implementation(
    plaintext: bytes, ad: bytes, nonce: bytes
) -> None:
    # `cryptography` (OpenSSL) comes with the test-only noiseprotocol package.
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    sealed = crypto.chacha20poly1305_encrypt(KEY, nonce, ad, plaintext)
    assert sealed == ChaCha20Poly1305(KEY).encrypt(nonce, plaintext, ad)
    assert crypto.chacha20poly1305_decrypt(KEY, nonce, ad, sealed) == plaintext


def test_chacha20poly1305_views_and_in_place_variants() -> None:
    plaintext = bytes(range(256)) * 300  # large: built in place
    nonce = bytes(12)
    sealed = crypto.chacha20poly1305_encrypt(KEY, nonce, b"ad", plaintext)
    assert type(sealed) is bytes and len(sealed) == len(plaintext) + crypto.TAG_SIZE
    again = crypto.chacha20poly1305_encrypt(
        KEY, memoryview(nonce), bytearray(b"ad"), memoryview(plaintext)
    )
    assert again == sealed
    # Into a slice of a larger buffer, after a two-byte header.
    frame = bytearray(b"hd" + bytes(len(sealed)) + b"tl")
    crypto.chacha20poly1305_encrypt_into(
        KEY, nonce, b"ad", plaintext, memoryview(frame)[2 : 2 + len(sealed)]
    )
    assert frame == b"hd" + sealed + b"tl"
    opened = crypto.chacha20poly1305_decrypt(KEY, nonce, b"ad", memoryview(frame)[2:-2])
    assert type(opened) is bytes and opened == plaintext
    out = bytearray(len(plaintext) + 2)
    crypto.chacha20poly1305_decrypt_into(
        KEY, nonce, b"ad", memoryview(frame)[2:-2], memoryview(out)[1:-1]
    )
    assert out == b"\0" + plaintext + b"\0"
    with pytest.raises(ValueError, match="output"):
        crypto.chacha20poly1305_encrypt_into(KEY, nonce, b"", b"abc", bytearray(18))
    with pytest.raises(ValueError, match="output"):
        crypto.chacha20poly1305_decrypt_into(KEY, nonce, b"ad", sealed, bytearray(10))
    # A read-only output is refused, not written through.
    with pytest.raises(BufferError):
        crypto.chacha20poly1305_decrypt_into(KEY, nonce, b"ad", sealed, memoryview(plaintext))


def test_failed_decrypt_into_leaves_no_plaintext() -> None:
    nonce = bytes(12)
    sealed = bytearray(crypto.chacha20poly1305_encrypt(KEY, nonce, b"", b"secret" * 10))
    sealed[0] ^= 1
    out = bytearray(b"\xff" * 60)
    with pytest.raises(DecryptionError):
        crypto.chacha20poly1305_decrypt_into(KEY, nonce, b"", sealed, out)
    assert b"secret" not in out


def test_chacha20poly1305_detects_any_change() -> None:
    nonce = bytes(range(12))
    sealed = crypto.chacha20poly1305_encrypt(KEY, nonce, b"context", b"attack at dawn")
    for i in range(len(sealed)):
        tampered = bytearray(sealed)
        tampered[i] ^= 0x01
        with pytest.raises(DecryptionError):
            crypto.chacha20poly1305_decrypt(KEY, nonce, b"context", bytes(tampered))
    other_nonce = bytes(range(1, 13))
    for key, nonce_, ad, data in [
        (OTHER_KEY, nonce, b"context", sealed),
        (KEY, other_nonce, b"context", sealed),
        (KEY, nonce, b"contexT", sealed),
        (KEY, nonce, b"context", sealed[:-1]),
        (KEY, nonce, b"context", sealed + b"\x00"),
    ]:
        with pytest.raises(DecryptionError):
            crypto.chacha20poly1305_decrypt(key, nonce_, ad, data)
    with pytest.raises(DecryptionError, match="truncated"):
        crypto.chacha20poly1305_decrypt(KEY, nonce, b"", sealed[:15])


def test_chacha20poly1305_parameter_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match="nonce"):
        crypto.chacha20poly1305_encrypt(KEY, bytes(24), b"", b"x")
    with pytest.raises(ValueError, match="key"):
        crypto.chacha20poly1305_decrypt(KEY[:16], bytes(12), b"", bytes(16))
