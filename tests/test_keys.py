"""Tests of p2pbackup.core.keys: recovery keys and the keyring derived from a master secret."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pbackup.core import crypto, keys
from p2pbackup.errors import RecoveryKeyError

SECRET = bytes(range(32))
# Persisted format: a recovery key written down today must parse forever.
SECRET_KEY_TEXT = (
    "1000W-G40RM-40M33-0E20Y-9185W-GR380-E1W8J-124G2-K2GAA-HC5RZ-R34DC-1P70Q-X3RFN-SRRBY"
)
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _random_key(seed: int) -> tuple[bytes, str]:
    secret = random.Random(seed).randbytes(32)
    return secret, keys.format_recovery_key(secret)


def _error(text: str) -> RecoveryKeyError:
    with pytest.raises(RecoveryKeyError) as caught:
        keys.parse_recovery_key(text)
    return caught.value


# --- format --------------------------------------------------------------------------


def test_recovery_key_known_answer() -> None:
    assert keys.format_recovery_key(SECRET) == SECRET_KEY_TEXT
    assert keys.parse_recovery_key(SECRET_KEY_TEXT) == SECRET


@given(secret=st.binary(min_size=32, max_size=32))
def test_recovery_key_round_trip(secret: bytes) -> None:
    text = keys.format_recovery_key(secret)
    groups = text.split("-")
    assert len(groups) == 14
    assert all(len(group) == 5 and set(group) <= set(ALPHABET) for group in groups)
    assert text[0] == "1"  # the version
    assert keys.parse_recovery_key(text) == secret


def test_generated_secrets_are_fresh_and_round_trip() -> None:
    first, second = keys.generate_master_secret(), keys.generate_master_secret()
    assert len(first) == keys.MASTER_SECRET_SIZE and first != second
    assert keys.parse_recovery_key(keys.format_recovery_key(first)) == first


def test_format_rejects_wrong_length() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        keys.format_recovery_key(bytes(31))


# --- forgiving input -----------------------------------------------------------------


def test_case_spaces_newlines_and_dashes_are_ignored() -> None:
    bare = SECRET_KEY_TEXT.replace("-", "")
    variants = [
        SECRET_KEY_TEXT.lower(),
        bare,
        " ".join(SECRET_KEY_TEXT.split("-")),
        "\n".join(bare[i : i + 10] for i in range(0, len(bare), 10)) + "\n",
        SECRET_KEY_TEXT.replace("-", " – "),  # an en dash from a word processor
        "  " + SECRET_KEY_TEXT + "\t",
    ]
    for text in variants:
        assert keys.parse_recovery_key(text) == SECRET


def test_look_alike_letters_read_as_digits() -> None:
    assert keys.parse_recovery_key(SECRET_KEY_TEXT.replace("0", "O")) == SECRET
    assert keys.parse_recovery_key(SECRET_KEY_TEXT.replace("0", "o")) == SECRET
    assert keys.parse_recovery_key(SECRET_KEY_TEXT.replace("1", "I")) == SECRET
    assert keys.parse_recovery_key(SECRET_KEY_TEXT.replace("1", "l")) == SECRET
    secret, text = next((s, t) for s, t in (_random_key(seed) for seed in range(100)) if "V" in t)
    assert keys.parse_recovery_key(text.replace("V", "U")) == secret


# --- typos ---------------------------------------------------------------------------


def test_every_single_substitution_names_its_group() -> None:
    _secret, text = _random_key(7)
    bare = text.replace("-", "")
    for position, original in enumerate(bare):
        group = position // 5 + 1
        for replacement in ALPHABET:
            if replacement == original:
                continue
            damaged = bare[:position] + replacement + bare[position + 1 :]
            error = _error(damaged)
            assert error.group == group, (position, replacement, str(error))
            assert f"group {group} " in str(error)


def test_typo_message_shows_the_group() -> None:
    text = "1000W-ZZZZZ" + SECRET_KEY_TEXT[11:]
    error = _error(text)
    assert str(error) == "recovery key: group 2 ('ZZZZZ') has a typo"
    assert error.group == 2


def test_swapped_characters_within_a_group_are_caught() -> None:
    _secret, text = _random_key(11)
    bare = text.replace("-", "")
    for position in range(len(bare) - 1):
        if position % 5 == 4 or bare[position] == bare[position + 1]:
            continue
        swapped = bare[:position] + bare[position + 1] + bare[position] + bare[position + 2 :]
        assert _error(swapped).group == position // 5 + 1


def test_two_typos_in_one_group_are_caught_by_the_checksum() -> None:
    _secret, text = _random_key(3)
    bare = text.replace("-", "")
    caught_by_checksum = 0
    for first in ALPHABET:
        for second in ALPHABET:
            damaged = bare[:10] + first + second + bare[12:]
            if damaged == bare:
                continue
            error = _error(damaged)
            if error.group is None:
                assert "checksum" in str(error)
                caught_by_checksum += 1
            else:
                assert error.group == 3
    # About 1 in 32 double typos passes the group check; the checksum stops them.
    assert caught_by_checksum > 0


# --- structure -----------------------------------------------------------------------


def test_swapped_groups_are_reported() -> None:
    _secret, text = _random_key(5)
    groups = text.split("-")
    for i in range(14):
        for j in range(i + 1, 14):
            swapped = list(groups)
            swapped[i], swapped[j] = swapped[j], swapped[i]
            error = _error("-".join(swapped))
            assert str(error) == f"recovery key: groups {i + 1} and {j + 1} are swapped"
            assert error.group == i + 1


def test_missing_group() -> None:
    _secret, text = _random_key(9)
    groups = text.split("-")
    for missing in range(14):
        error = _error("-".join(groups[:missing] + groups[missing + 1 :]))
        assert str(error).startswith("recovery key is too short: expected 14 groups, got 13")
        # Groups before the gap are intact, so the hint never points before it.
        assert error.group is not None and error.group >= missing + 1
    error = _error("-".join(groups[:13]))
    assert error.group == 14 and "group 14 is missing" in str(error)


def test_missing_character() -> None:
    error = _error(SECRET_KEY_TEXT[:-1])
    assert str(error).startswith(
        "recovery key is too short: expected 70 characters (14 groups of 5), got 69"
    )
    assert error.group == 14
    error = _error(SECRET_KEY_TEXT[:20] + SECRET_KEY_TEXT[21:])
    assert "too short" in str(error) and error.group == 4


def test_extra_group() -> None:
    groups = SECRET_KEY_TEXT.split("-")
    error = _error("-".join([*groups, groups[0]]))
    assert str(error).startswith("recovery key is too long: expected 14 groups, got 15")
    error = _error("-".join([*groups[:5], groups[2], *groups[5:]]))
    assert "too long" in str(error) and error.group == 6


def test_invalid_character() -> None:
    error = _error(SECRET_KEY_TEXT[:12] + "ö" + SECRET_KEY_TEXT[13:])
    assert str(error) == (
        "recovery key contains 'ö' (in group 3), which is not a recovery-key character"
    )
    assert error.group == 3
    assert _error("1000W!" + SECRET_KEY_TEXT[6:]).group == 2


def test_empty_input() -> None:
    assert str(_error("")) == "recovery key is empty"
    assert str(_error(" \n - \t")) == "recovery key is empty"


def test_unsupported_version_is_not_called_a_typo() -> None:
    # Find the check character that makes a version-2 first group valid.
    rest = SECRET_KEY_TEXT[5:]
    messages = [str(_error("2000" + check + rest)) for check in ALPHABET]
    versioned = [m for m in messages if "version" in m]
    assert versioned == [
        "recovery key has version '2', which this p2pbackup cannot read (it reads version '1')"
    ]


# --- keyring ---------------------------------------------------------------------------


def _kdf(context: str) -> bytes:
    return hashlib.blake2b(
        context.encode(), key=SECRET, digest_size=32, person=b"p2pbackup.kdf.v1"
    ).digest()


def test_keyring_follows_the_documented_derivation() -> None:
    keyring = keys.Keyring.from_master_secret(SECRET)
    assert keyring.master_secret == SECRET
    assert keyring.identity_seed == _kdf("identity/ed25519-seed")
    assert keyring.transport_private == _kdf("transport/x25519-private")
    assert keyring.data_key == _kdf("data/xchacha20poly1305")
    assert keyring.dedup_key == _kdf("dedup/blake2b-key")
    assert keyring.record_key == _kdf("record/xchacha20poly1305")
    seed_bytes = hashlib.blake2b(
        b"chunker/gear-seed", key=SECRET, digest_size=16, person=b"p2pbackup.kdf.v1"
    ).digest()
    assert keyring.chunker_seed == int.from_bytes(seed_bytes, "big") % (2**31 - 1) + 1
    assert keyring.identity_public == crypto.signing_public_key(keyring.identity_seed)
    assert keyring.transport_public == crypto.x25519_public_key(keyring.transport_private)
    assert keyring.node_id == hashlib.blake2b(keyring.identity_public, digest_size=20).digest()


def test_keyring_known_answer() -> None:
    # Persisted: the recovery key must rebuild exactly these keys forever.
    keyring = keys.Keyring.from_master_secret(SECRET)
    expected = {
        "identity_seed": "6d09129338f5c393bef72d2a890c7b4e48ea00f0a6f0a367f6e9a11fb880d5e0",
        "identity_public": "7db1199423d64c35a4a23bd916e8fc9aef5ee41769f21f567d72551535865ddc",
        "transport_private": "74e7b6f9a9398afbc7eb79aafa31a99dfb39cb9468a8fd9bb88a0a7cb45685fc",
        "transport_public": "325cc754e5f6bb0e1aec169f557c6189d14f7722be174e2533d0f2193f516f36",
        "data_key": "a318d2f4f407fac9cfacb93067482040c43111ffdd39f96ba021746605ed9e0a",
        "dedup_key": "33dc1a3821445e9b20e9bf2964cd780d0865a8f6e0ba517fc116e6d58094595b",
        "record_key": "9ac2020eb021aa9aa496166ff455620cfd311a3a8fc32a7a4b35b6f0875a20f3",
        "node_id": "c4c61ef8410583eac3aed88a6dc21259b78ffffb",
    }
    assert {name: getattr(keyring, name).hex() for name in expected} == expected
    assert keyring.chunker_seed == 1887308229


def test_keyring_keys_are_distinct_and_usable() -> None:
    keyring = keys.Keyring.from_master_secret(keys.generate_master_secret())
    secrets = [
        keyring.master_secret,
        keyring.identity_seed,
        keyring.transport_private,
        keyring.data_key,
        keyring.dedup_key,
        keyring.record_key,
    ]
    assert len(set(secrets)) == len(secrets)
    assert 1 <= keyring.chunker_seed <= 2**31 - 1
    assert len(keyring.node_id) == 20
    signature = crypto.sign(keyring.identity_seed, b"hello")
    crypto.verify(keyring.identity_public, b"hello", signature)
    assert keys.node_id_for(keyring.identity_public) == keyring.node_id
    # Rebuilding from the recovery key gives the same node.
    recovered = keys.parse_recovery_key(keys.format_recovery_key(keyring.master_secret))
    assert keys.Keyring.from_master_secret(recovered) == keyring


def test_keyring_repr_hides_secrets() -> None:
    keyring = keys.Keyring.from_master_secret(SECRET)
    text = repr(keyring)
    assert keyring.node_id.hex() in text and keyring.identity_public.hex() in text
    for secret in (
        keyring.master_secret,
        keyring.identity_seed,
        keyring.transport_private,
        keyring.data_key,
        keyring.dedup_key,
        keyring.record_key,
    ):
        assert secret.hex() not in text and repr(secret) not in text
    assert str(keyring.chunker_seed) not in text


def test_wrong_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="master secret must be 32 bytes"):
        keys.Keyring.from_master_secret(bytes(16))
    with pytest.raises(ValueError):
        keys.node_id_for(bytes(31))
