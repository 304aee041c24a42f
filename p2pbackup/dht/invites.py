"""Invite codes: how a friend reaches this node and knows it is this node.

Nouns:

* **invite** (:class:`Invite`) — a node's Ed25519 identity public key and 1 to
  :data:`MAX_ADDRESSES` addresses (:class:`~p2pbackup.dht.records.RecordAddress`)
  it can be reached at. The node id is not written down: it is the BLAKE2b-160
  of the key (:func:`p2pbackup.core.keys.node_id_for`), so a code cannot pair one
  node's id with another node's key, and the id is covered by the checksum
  through the key it follows from. A friend who adds the code dials the
  addresses and accepts only a peer that proves that key in the handshake:
  the addresses are hints, the key is the authority.
* **invite code** — the text a user pastes in a chat: ``p2pb-`` followed by the
  binary invite in lowercase RFC 4648 base32 without padding (``a-z``,
  ``2-7``). One IPv4 address makes a 77-character code.
* **checksum** — the last 4 bytes: ``BLAKE2b(every byte before it,
  digest_size=4, person=b"p2pb-invite")``. It catches a mistyped, missing or
  extra character (a damaged code passes with odds of 1 in 2^32); it is no
  defence against someone who hands out a forged code, which only the way the
  code travels (a friend's chat) can give.

Binary layout, version 1 (big-endian)::

    version u8 = 1 | public key 32 | address count u8 (1..4)
    | per address: type u8 | host | port u16 (1..65535)
    | checksum 4

Address types: ``4`` — an IPv4 address, 4 bytes; ``6`` — an IPv6 address, 16
bytes; ``0`` — a DNS name: length u8 then lowercase ASCII, checked as
:class:`~p2pbackup.dht.records.RecordAddress` checks names. A later version keeps
the version byte first and the checksum rule, so that this code reports an
unknown version, not damage.

Reading is forgiving where it cannot change the meaning: surrounding
whitespace is stripped, upper case is read as lower case, and whitespace and
dashes inside the body (a chat client's line breaks or hyphenation) are
ignored; the prefix must be there, whole (its dash may be a Unicode dash).
Writing is canonical: one invite has one code, and a body whose unused final
bits are not zero is refused as damaged, so every code that decodes
re-encodes to itself (modulo the forgiven noise).

Pure: no I/O, no clock. Every failure is a
:class:`~p2pbackup.errors.FormatError` whose message says what to do.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import struct
import unicodedata
from collections.abc import Sequence
from typing import Final, NoReturn

import attrs

from p2pbackup.core import crypto
from p2pbackup.core.keys import node_id_for
from p2pbackup.dht.records import RecordAddress
from p2pbackup.errors import FormatError

PREFIX: Final = "p2pb-"
VERSION: Final = 1
MAX_ADDRESSES: Final = 4
CHECKSUM_SIZE: Final = 4
CHECKSUM_PERSON: Final = b"p2pb-invite"

ADDRESS_DNS: Final = 0
ADDRESS_IPV4: Final = 4
ADDRESS_IPV6: Final = 6

#: Base32 digits that stand for 5 bits each; the remaining ones are padding.
_ALPHABET: Final = frozenset("abcdefghijklmnopqrstuvwxyz234567")
#: Body lengths (mod 8) that no whole number of bytes encodes to.
_IMPOSSIBLE_LENGTHS: Final = frozenset({1, 3, 6})
_DAMAGED: Final = (
    "the invite code is damaged: a character is wrong, missing or extra — copy it again"
)

_HEAD = struct.Struct(f">B{crypto.PUBLIC_KEY_SIZE}sB")
_PORT = struct.Struct(">H")
_U8 = struct.Struct(">B")


@attrs.frozen
class Invite:
    """A node's identity key and where to reach it; see the module docstring."""

    public_key: bytes = attrs.field(repr=bytes.hex)
    addresses: tuple[RecordAddress, ...]

    @property
    def node_id(self) -> bytes:
        """The node id the key stands for (BLAKE2b-160 of it)."""
        return node_id_for(self.public_key)


def _fail(problem: str) -> NoReturn:
    raise FormatError(f"invite code: {problem}")


# --- binary ------------------------------------------------------------------------------


def _checksum(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=CHECKSUM_SIZE, person=CHECKSUM_PERSON).digest()


def _encode_address(index: int, address: RecordAddress) -> bytes:
    what = f"address {index + 1} ({address.host!r}, port {address.port})"
    if not 1 <= address.port <= 65535:
        _fail(f"{what}: the port must be 1..65535")
    try:
        canonical = RecordAddress.from_host_port(address.host, address.port)
    except FormatError as exc:
        _fail(f"{what}: {str(exc).removeprefix('DHT record: ')}")
    if canonical != address:
        _fail(f"{what}: write it as {canonical.host!r}")
    try:
        ip = ipaddress.ip_address(address.host)
    except ValueError:
        name = address.host.encode("ascii")
        return _U8.pack(ADDRESS_DNS) + _U8.pack(len(name)) + name + _PORT.pack(address.port)
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        # The scope names an interface of this machine; it means nothing on a friend's.
        _fail(f"{what}: a scoped IPv6 address only works on this machine's own link")
    kind = ADDRESS_IPV4 if ip.version == 4 else ADDRESS_IPV6
    return _U8.pack(kind) + ip.packed + _PORT.pack(address.port)


def encode_invite_bytes(invite: Invite) -> bytes:
    """The binary invite, checksum included; :class:`FormatError` for one
    that :func:`decode_invite_bytes` would refuse."""
    if len(invite.public_key) != crypto.PUBLIC_KEY_SIZE:
        _fail(
            f"the public key must be {crypto.PUBLIC_KEY_SIZE} bytes, got {len(invite.public_key)}"
        )
    if not 1 <= len(invite.addresses) <= MAX_ADDRESSES:
        _fail(f"an invite carries 1 to {MAX_ADDRESSES} addresses, not {len(invite.addresses)}")
    parts = [_HEAD.pack(VERSION, invite.public_key, len(invite.addresses))]
    parts += [_encode_address(i, a) for i, a in enumerate(invite.addresses)]
    body = b"".join(parts)
    return body + _checksum(body)


def decode_invite_bytes(data: bytes) -> Invite:
    """The invite in ``data`` (checksum included); :class:`FormatError` if it is
    damaged, of another version or malformed."""
    if len(data) < 1 + CHECKSUM_SIZE:
        _fail(f"it is far too short ({len(data)} bytes) — copy the whole code again")
    body, checksum = data[:-CHECKSUM_SIZE], data[-CHECKSUM_SIZE:]
    if _checksum(body) != checksum:
        raise FormatError(_DAMAGED)
    # Only now is the version byte trustworthy: a typo in it was caught above.
    if body[0] != VERSION:
        _fail(
            f"version {body[0]} is not one this p2pbackup reads (it reads version {VERSION}); "
            "the code comes from a newer p2pbackup — upgrade to use it"
        )
    if len(body) < _HEAD.size:
        _fail(f"truncated: {len(body)} bytes before the checksum, at least {_HEAD.size} needed")
    _version, public_key, count = _HEAD.unpack_from(body)
    if not 1 <= count <= MAX_ADDRESSES:
        _fail(f"it carries {count} addresses; an invite carries 1 to {MAX_ADDRESSES}")
    reader = _Reader(body, _HEAD.size)
    addresses = tuple(reader.address(i) for i in range(count))
    if reader.offset != len(body):
        _fail(f"{len(body) - reader.offset} stray bytes after the addresses")
    return Invite(bytes(public_key), addresses)


@attrs.define
class _Reader:
    """A cursor over the addresses, which end where the checksum begins."""

    data: bytes
    offset: int

    def take(self, size: int, what: str) -> bytes:
        if self.offset + size > len(self.data):
            _fail(f"truncated in {what}")
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def address(self, index: int) -> RecordAddress:
        what = f"address {index + 1}"
        kind = self.take(1, what)[0]
        if kind == ADDRESS_IPV4:
            host = str(ipaddress.IPv4Address(self.take(4, what)))
        elif kind == ADDRESS_IPV6:
            host = str(ipaddress.IPv6Address(self.take(16, what)))
        elif kind == ADDRESS_DNS:
            raw = self.take(self.take(1, what)[0], what)
            host = raw.decode("ascii", errors="replace")
            if not raw.isascii():
                _fail(f"{what}: the host name is not ASCII")
        else:
            _fail(f"{what} has unknown type {kind} (known: 0 name, 4 IPv4, 6 IPv6)")
        (port,) = _PORT.unpack(self.take(_PORT.size, what))
        if port == 0:
            _fail(f"{what} ({host}) has port 0, which nobody can dial")
        try:
            address = RecordAddress.from_host_port(host, port)
        except FormatError as exc:
            _fail(f"{what}: {str(exc).removeprefix('DHT record: ')}")
        if kind == ADDRESS_DNS and (address.host != host or _is_ip(host)):
            # One invite, one code: an IP address travels as its bytes, a
            # name in lower case.
            _fail(f"{what}: host {host!r} is not written in canonical form")
        return address


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# --- text --------------------------------------------------------------------------------


def encode_invite(invite: Invite) -> str:
    """The invite code: ``p2pb-`` and lowercase unpadded base32."""
    text = base64.b32encode(encode_invite_bytes(invite)).decode("ascii")
    return PREFIX + text.rstrip("=").lower()


def _is_dash(char: str) -> bool:
    # Chat clients and word processors turn "-" into Unicode dashes.
    return char == "-" or unicodedata.category(char) == "Pd"


def _is_noise(char: str) -> bool:
    """Characters a chat client may slip into a long word: spaces, breaks, dashes."""
    return char.isspace() or _is_dash(char)


def _body(text: str) -> str:
    """The base32 digits of a code, with the forgiven noise removed."""
    stripped = text.strip()
    head = stripped[: len(PREFIX)]
    if len(head) < len(PREFIX) or head[:-1].lower() != PREFIX[:-1] or not _is_dash(head[-1]):
        raise FormatError(f"not an invite code: it should start with {PREFIX}")
    digits = []
    for char in stripped[len(PREFIX) :]:
        if _is_noise(char):
            continue
        lowered = char.lower()
        if lowered not in _ALPHABET:
            raise FormatError(
                f"invite code contains {char!r}, which is not an invite-code character "
                "(letters a-z and digits 2-7) — copy the code again"
            )
        digits.append(lowered)
    return "".join(digits)


def decode_invite(text: str) -> Invite:
    """The invite a code stands for; :class:`FormatError` naming what is wrong."""
    body = _body(text)
    if not body:
        _fail(f"there is nothing after {PREFIX} — copy the whole code")
    if len(body) % 8 in _IMPOSSIBLE_LENGTHS:
        raise FormatError(_DAMAGED)
    try:
        data = base64.b32decode(body.upper() + "=" * (-len(body) % 8))
    except binascii.Error:  # pragma: no cover - the checks above leave nothing for it
        raise FormatError(_DAMAGED) from None
    # The last digit may carry bits beyond the last byte; base32 ignores them,
    # so two texts would decode alike. Only the canonical one is a code.
    if base64.b32encode(data).decode("ascii").rstrip("=").lower() != body:
        raise FormatError(_DAMAGED)
    return decode_invite_bytes(data)


def invite_for(public_key: bytes, addresses: Sequence[RecordAddress]) -> Invite:
    """An invite, checked: :class:`FormatError` if it could not be encoded."""
    invite = Invite(bytes(public_key), tuple(addresses))
    encode_invite_bytes(invite)
    return invite
