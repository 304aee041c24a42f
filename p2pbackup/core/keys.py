"""The master secret, the recovery key that writes it down, and the keys derived from it.

Nouns:

* **master secret** — 32 random bytes made at ``init``. Every other key is
  derived from it, so it alone rebuilds a node.
* **recovery key** — the master secret as text for a human to keep on paper.
* **keyring** — every key derived from the master secret (:class:`Keyring`).

Recovery key, version 1
-----------------------
Alphabet: Crockford's base32, ``0123456789ABCDEFGHJKMNPQRSTVWXYZ`` (no I, L,
O, U). The 280-bit number

    version (5 bits, = 1) || master secret (256 bits) || checksum (19 bits)

is written as 56 base32 digits, most significant first, so the first
character is the version (``1``). The **checksum** is the first 19 bits of
``BLAKE2b-128(person="p2pbackup.rk.v1", data=version byte || secret)``.
The 56 digits are cut into 14 **groups** of 4, and each group gets a fifth
**check character**, so a key is 14 groups of 5 joined by dashes (70
characters plus 13 dashes); the secret 00 01 02 … 1f is written::

    1000W-G40RM-40M33-0E20Y-9185W-GR380-E1W8J-
    124G2-K2GAA-HC5RZ-R34DC-1P70Q-X3RFN-SRRBY

Each character is an element of GF(32) (polynomial x^5 + x^2 + 1, primitive
element a). Group ``g`` (1-based) with characters ``c1..c5`` is valid when

    a·c1 + a²·c2 + a³·c3 + a⁴·c4 + a⁵·c5 = g      (in GF(32))

Because every coefficient is non-zero, *every* single mistyped character
makes its own group fail, so the group is always named; because the
coefficients are distinct, swapping any two characters inside a group is
always caught too; because the right-hand side is the group's position, a
group moved to another position fails, and two swapped groups are reported
as such. The whole-key checksum then catches what slips past the group
checks (two or more typos in one group: a 1 in 2^19 chance of passing).

Reading is forgiving: case is ignored, whitespace and dashes (ASCII and
Unicode dashes) anywhere are ignored, and the look-alikes ``O`` → ``0``,
``I``/``L`` → ``1`` and ``U`` → ``V`` are read as the digit they resemble
(Crockford's rule; a wrong guess is still caught by the group check).

A later version may change everything after the first group but must keep
the first group's layout (version digit first, same check), so that this code
reports "unsupported version" for it rather than a typo.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Final

import attrs

from p2pbackup.core import crypto
from p2pbackup.errors import RecoveryKeyError
from p2pbackup.model import NODE_ID_SIZE

MASTER_SECRET_SIZE: Final = 32

ALPHABET: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
RECOVERY_KEY_VERSION: Final = 1
GROUP_COUNT: Final = 14
GROUP_DATA: Final = 4
GROUP_SIZE: Final = GROUP_DATA + 1
KEY_CHARS: Final = GROUP_COUNT * GROUP_SIZE
CHECKSUM_BITS: Final = 19
_VERSION_BITS: Final = 5
_SECRET_BITS: Final = MASTER_SECRET_SIZE * 8
_CHECKSUM_PERSON: Final = b"p2pbackup.rk.v1"

assert _VERSION_BITS + _SECRET_BITS + CHECKSUM_BITS == GROUP_COUNT * GROUP_DATA * 5

# Key derivation contexts (persisted: changing one changes that key for every
# existing recovery key).
CONTEXT_IDENTITY: Final = "identity/ed25519-seed"
CONTEXT_TRANSPORT: Final = "transport/x25519-private"
CONTEXT_DATA: Final = "data/xchacha20poly1305"
CONTEXT_DEDUP: Final = "dedup/blake2b-key"
CONTEXT_RECORD: Final = "record/xchacha20poly1305"
CONTEXT_CHUNKER: Final = "chunker/gear-seed"

#: The chunker seed lies in [1, CHUNKER_SEED_MAX].
CHUNKER_SEED_MAX: Final = 2**31 - 1


def generate_master_secret() -> bytes:
    """A fresh random master secret."""
    return crypto.random_bytes(MASTER_SECRET_SIZE)


def _check_secret(secret: bytes) -> None:
    if len(secret) != MASTER_SECRET_SIZE:
        raise ValueError(f"master secret must be {MASTER_SECRET_SIZE} bytes, got {len(secret)}")


# --- GF(32) ------------------------------------------------------------------


def _gf32_tables() -> tuple[list[int], list[int]]:
    exp = [0] * 62
    log = [0] * 32
    x = 1
    for i in range(31):
        exp[i] = exp[i + 31] = x
        log[x] = i
        x <<= 1
        if x & 0b100000:
            x ^= 0b100101  # x^5 + x^2 + 1
    # The polynomial is primitive: a's powers run through every non-zero element.
    assert sorted(exp[:31]) == list(range(1, 32))
    return exp, log


_EXP, _LOG = _gf32_tables()


def _mul_alpha_power(power: int, value: int) -> int:
    """a^power · value in GF(32)."""
    return 0 if value == 0 else _EXP[_LOG[value] + power % 31]


def _syndrome(group: Sequence[int]) -> int:
    result = 0
    for j, value in enumerate(group):
        result ^= _mul_alpha_power(j + 1, value)
    return result


def _check_digit(data: Sequence[int], position: int) -> int:
    """The fifth character that makes ``data`` a valid group at 1-based ``position``."""
    rest = _syndrome(data) ^ position
    return _mul_alpha_power(31 - GROUP_SIZE, rest)  # divide by a^5


# --- writing -----------------------------------------------------------------


def _checksum(secret: bytes) -> int:
    digest = crypto.hash_bytes(
        bytes([RECOVERY_KEY_VERSION]) + secret, size=16, person=_CHECKSUM_PERSON
    )
    return int.from_bytes(digest, "big") >> (128 - CHECKSUM_BITS)


def format_recovery_key(secret: bytes) -> str:
    """The recovery key for ``secret``: 14 dash-separated groups of 5 characters."""
    _check_secret(secret)
    number = (RECOVERY_KEY_VERSION << (_SECRET_BITS + CHECKSUM_BITS)) | (
        int.from_bytes(secret, "big") << CHECKSUM_BITS
    )
    number |= _checksum(secret)
    digits = [(number >> (5 * i)) & 31 for i in reversed(range(GROUP_COUNT * GROUP_DATA))]
    groups = []
    for g in range(GROUP_COUNT):
        data = digits[g * GROUP_DATA : (g + 1) * GROUP_DATA]
        group = [*data, _check_digit(data, g + 1)]
        groups.append("".join(ALPHABET[v] for v in group))
    return "-".join(groups)


# --- reading -----------------------------------------------------------------


def _reading_table() -> dict[str, int]:
    table = {}
    for value, char in enumerate(ALPHABET):
        table[char] = table[char.lower()] = value
    for look_alike, char in {"O": "0", "I": "1", "L": "1", "U": "V"}.items():
        table[look_alike] = table[look_alike.lower()] = ALPHABET.index(char)
    return table


_READ: Final = _reading_table()


def _is_separator(char: str) -> bool:
    return char.isspace() or char == "-" or unicodedata.category(char) == "Pd"


def _normalise(text: str) -> list[int]:
    values: list[int] = []
    for char in text:
        if _is_separator(char):
            continue
        value = _READ.get(char)
        if value is None:
            group = len(values) // GROUP_SIZE + 1
            raise RecoveryKeyError(
                f"recovery key contains {char!r} (in group {group}), "
                "which is not a recovery-key character",
                group=group,
            )
        values.append(value)
    return values


def _group(values: Sequence[int], index: int) -> Sequence[int]:
    return values[index * GROUP_SIZE : (index + 1) * GROUP_SIZE]


def _group_text(values: Sequence[int], index: int) -> str:
    return "".join(ALPHABET[v] for v in _group(values, index))


def _first_bad_group(values: Sequence[int]) -> int | None:
    """0-based index of the first complete group that fails its check."""
    for index in range(min(len(values), KEY_CHARS) // GROUP_SIZE):
        if _syndrome(_group(values, index)) != index + 1:
            return index
    return None


def _check_version(values: Sequence[int]) -> None:
    # Only trust the version digit when its group checks: a typo in it is a typo.
    if len(values) < GROUP_SIZE or _syndrome(values[:GROUP_SIZE]) != 1:
        return
    if values[0] != RECOVERY_KEY_VERSION:
        raise RecoveryKeyError(
            f"recovery key has version {ALPHABET[values[0]]!r}, which this p2pbackup "
            f"cannot read (it reads version {ALPHABET[RECOVERY_KEY_VERSION]!r})",
            group=1,
        )


def _check_length(values: Sequence[int]) -> None:
    if len(values) == KEY_CHARS:
        return
    problem = "too short" if len(values) < KEY_CHARS else "too long"
    if len(values) % GROUP_SIZE == 0:
        message = (
            f"recovery key is {problem}: expected {GROUP_COUNT} groups, "
            f"got {len(values) // GROUP_SIZE}"
        )
    else:
        message = (
            f"recovery key is {problem}: expected {KEY_CHARS} characters "
            f"({GROUP_COUNT} groups of {GROUP_SIZE}), got {len(values)}"
        )
    bad = _first_bad_group(values)
    if bad is not None:
        raise RecoveryKeyError(
            f"{message}; the first group that fails its check is group {bad + 1} "
            f"({_group_text(values, bad)!r})",
            group=bad + 1,
        )
    if len(values) > KEY_CHARS:
        raise RecoveryKeyError(f"{message}; all {GROUP_COUNT} groups check, so the rest is extra")
    # Every complete group checks, so what is missing comes after them.
    missing = len(values) // GROUP_SIZE + 1
    raise RecoveryKeyError(
        f"{message}; {_intact_prefix(missing - 1)}group {missing} is missing or incomplete",
        group=missing,
    )


def _intact_prefix(groups: int) -> str:
    if groups == 0:
        return ""
    if groups == 1:
        return "group 1 checks, so "
    return f"groups 1 to {groups} check, so "


def _check_groups(values: Sequence[int]) -> None:
    bad = _first_bad_group(values)
    if bad is None:
        return
    # A valid group in the wrong place has its own position as syndrome;
    # a single typo can never make two groups each name the other's position.
    home = _syndrome(_group(values, bad)) - 1
    if 0 <= home < GROUP_COUNT and _syndrome(_group(values, home)) == bad + 1:
        raise RecoveryKeyError(
            f"recovery key: groups {bad + 1} and {home + 1} are swapped",
            group=bad + 1,
        )
    raise RecoveryKeyError(
        f"recovery key: group {bad + 1} ({_group_text(values, bad)!r}) has a typo",
        group=bad + 1,
    )


def _decode(values: Sequence[int]) -> bytes:
    number = 0
    for index in range(GROUP_COUNT):
        for value in _group(values, index)[:GROUP_DATA]:
            number = (number << 5) | value
    secret = ((number >> CHECKSUM_BITS) & ((1 << _SECRET_BITS) - 1)).to_bytes(
        MASTER_SECRET_SIZE, "big"
    )
    if number & ((1 << CHECKSUM_BITS) - 1) != _checksum(secret):
        raise RecoveryKeyError(
            "recovery key checksum does not match: every group checks on its own, "
            "so more than one character in some group is wrong; compare the key "
            "with the written copy character by character"
        )
    return secret


def parse_recovery_key(text: str) -> bytes:
    """The master secret written as ``text``; :class:`RecoveryKeyError` if it is damaged."""
    values = _normalise(text)
    if not values:
        raise RecoveryKeyError("recovery key is empty")
    _check_version(values)
    _check_length(values)
    _check_groups(values)
    return _decode(values)


# --- keyring -----------------------------------------------------------------


def node_id_for(public_key: bytes) -> bytes:
    """The node id of the peer whose Ed25519 identity key is ``public_key``."""
    if len(public_key) != crypto.PUBLIC_KEY_SIZE:
        raise ValueError(
            f"public key must be {crypto.PUBLIC_KEY_SIZE} bytes, got {len(public_key)}"
        )
    return crypto.hash_bytes(public_key, size=NODE_ID_SIZE)


def _chunker_seed(secret: bytes) -> int:
    raw = crypto.derive_key(secret, CONTEXT_CHUNKER, size=16)
    return int.from_bytes(raw, "big") % CHUNKER_SEED_MAX + 1


@attrs.frozen
class Keyring:
    """Every key of one node, all derived from its master secret.

    Build it with :meth:`from_master_secret`; secrets are left out of ``repr``.
    """

    master_secret: bytes = attrs.field(repr=False)
    #: Ed25519 seed of the node's identity (signs records and shards).
    identity_seed: bytes = attrs.field(repr=False)
    identity_public: bytes = attrs.field(repr=bytes.hex)
    #: X25519 static key of the transport (Noise).
    transport_private: bytes = attrs.field(repr=False)
    transport_public: bytes = attrs.field(repr=bytes.hex)
    #: Seals chunks, trees and other blobs.
    data_key: bytes = attrs.field(repr=False)
    #: Keys the BLAKE2b blob ids.
    dedup_key: bytes = attrs.field(repr=False)
    #: Seals the root record.
    record_key: bytes = attrs.field(repr=False)
    #: Seeds the chunker's gear table; hidden too, as it shapes chunk boundaries.
    chunker_seed: int = attrs.field(repr=False)
    node_id: bytes = attrs.field(repr=bytes.hex)

    @classmethod
    def from_master_secret(cls, secret: bytes) -> Keyring:
        _check_secret(secret)
        secret = bytes(secret)
        identity_seed = crypto.derive_key(secret, CONTEXT_IDENTITY)
        identity_public = crypto.signing_public_key(identity_seed)
        transport_private = crypto.derive_key(secret, CONTEXT_TRANSPORT)
        return cls(
            master_secret=secret,
            identity_seed=identity_seed,
            identity_public=identity_public,
            transport_private=transport_private,
            transport_public=crypto.x25519_public_key(transport_private),
            data_key=crypto.derive_key(secret, CONTEXT_DATA),
            dedup_key=crypto.derive_key(secret, CONTEXT_DEDUP),
            record_key=crypto.derive_key(secret, CONTEXT_RECORD),
            chunker_seed=_chunker_seed(secret),
            node_id=node_id_for(identity_public),
        )
