"""Signed DHT records: what a node publishes about itself, and who may overwrite it.

Nouns:

* **record** — a value a node stores in the DHT about itself, signed with its
  Ed25519 identity key. Two **kinds**:

  - **contact record** (:class:`ContactRecord`): node id, public key, the
    addresses it can be reached at, the storage it offers to others, and
    the **relays** it keeps a reservation at (none for a node that can be
    reached directly).
  - **root pointer** (:class:`RootPointer`): the addresses where the node's
    root record (DESIGN.md "Root record") can be fetched.

* **record address** (:class:`RecordAddress`) — host (an IPv4 or IPv6 literal
  in its canonical text form, or a lowercase DNS name) and TCP port.
* **relay** (:class:`RelayAddress`) — a friend that is reachable and joins
  whoever asks it to this node (:mod:`p2pbackup.wire.relay`): the relay's
  node id, which the dialler checks in its handshake with the relay, and one
  of its addresses. A record names at most :data:`MAX_RELAYS`.
* **sequence** — a counter the owner bumps on every new record of a kind; a
  higher sequence supersedes a lower one, whatever the majority of the DHT
  serves.
* **expiry** — unix seconds after which the record is dead: ``expiry <= now``
  is expired. The owner republishes before expiry; nobody else keeps it alive.
* **DHT key string** — the documented text a record is stored under,
  ``p2pbackup:contact:<hex node id>`` or ``p2pbackup:root:<hex node id>``;
  the **DHT key** is its SHA-1 digest, exactly what the kademlia package's
  ``digest()`` computes, so a stock client can ``get`` it.
* **valid** — decodes, is signed by the key it carries, that key hashes to its
  node id, it sits under the DHT key of its own node id and kind, and it has
  not expired (nor claims an expiry absurdly far away).

Layout (big-endian, fixed and therefore canonical)::

    magic "P2PD" | version u8 | kind u8 | node id 20 | public key 32
    | sequence u64 | expiry u64 | [contact only: storage offered u64]
    | address count u8 (1..8) | count x (host length u8, host ASCII, port u16)
    | [version 2 only: relay count u8 (1..2)
    |  | count x (relay node id 20, host length u8, host ASCII, port u16)]
    | signature 64

Version 2 exists only for contact records that name relays; a contact record
without relays, and every root pointer, is written as version 1, byte for
byte as before relays existed. So nodes of before version 2 still read the
record of every node reachable directly, and each record has exactly one
encoding (a version 2 record with no relays is refused).

The signature covers ``b"p2pbackup record v1\\0" + kind name + b"\\0"`` followed
by every byte before the signature, so a signature on one kind (or on any other
p2pbackup message) is never a signature on another.

Pure: no I/O and no clock; callers pass ``now``.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import re
import struct
from collections.abc import Iterable, Sequence
from typing import Final, NoReturn, TypeAlias

import attrs

from p2pbackup.core import crypto
from p2pbackup.core.keys import node_id_for
from p2pbackup.errors import (
    FormatError,
    IntegrityError,
    RecordExpiredError,
    RecordKeyError,
    SignatureError,
)
from p2pbackup.model import NODE_ID_SIZE

MAGIC: Final = b"P2PD"
#: The version of records without relays (and of every root pointer).
VERSION: Final = 1
#: The version of contact records that name relays.
RELAY_VERSION: Final = 2
#: Relays one contact record may name.
MAX_RELAYS: Final = 2
#: Far below the ~8 KiB the kademlia package accepts for a whole request, which
#: also carries the key, the sender's id and framing. The largest record the
#: layout allows (8 addresses and 2 relays, all with 255-char hosts) is
#: about 2.8 KiB.
MAX_RECORD_SIZE: Final = 4096
MAX_ADDRESSES: Final = 8
MAX_HOST_LENGTH: Final = 255
MAX_U64: Final = 2**64 - 1
#: A record claiming to live longer than this is refused: a node that lost its
#: key or moved must not be pinned to an old record for years by its own past.
MAX_LIFETIME: Final = 30 * 24 * 3600

SIGNATURE_DOMAIN: Final = b"p2pbackup record v1\0"

_HEAD = struct.Struct(f">4sBB{NODE_ID_SIZE}s{crypto.PUBLIC_KEY_SIZE}sQQ")
_U64 = struct.Struct(">Q")
_U8 = struct.Struct(">B")
_PORT = struct.Struct(">H")
_MIN_SIZE = _HEAD.size + _U8.size + crypto.SIGNATURE_SIZE

# RFC 1123 labels; underscore allowed because real-world names carry it.
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")


class RecordKind(enum.IntEnum):
    """What a record says; the byte after the version."""

    CONTACT = 1
    ROOT = 2

    @property
    def label(self) -> str:
        """The kind's name in DHT key strings and in the signed domain."""
        return "contact" if self is RecordKind.CONTACT else "root"


@attrs.frozen
class RecordAddress:
    """Where a node can be reached: host (IP literal or DNS name) and TCP port."""

    host: str
    port: int

    @classmethod
    def from_host_port(cls, host: str, port: int) -> RecordAddress:
        """The address in canonical form (lowercase names, canonical IP text);
        :class:`FormatError` if it cannot go into a record."""
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            host = host.lower()
        address = cls(host, port)
        _check_address(address)
        return address


@attrs.frozen
class RelayAddress:
    """A relay a node can be reached through: the relay's node id and address."""

    node_id: bytes = attrs.field(repr=bytes.hex)
    address: RecordAddress


@attrs.frozen
class ContactRecord:
    """How to reach a node, and what it offers, signed by that node."""

    node_id: bytes
    public_key: bytes
    addresses: tuple[RecordAddress, ...]
    storage_offered: int
    sequence: int
    expiry: int
    signature: bytes = attrs.field(repr=lambda s: s.hex())
    #: Where the node keeps a relay reservation (none: reach it directly).
    relays: tuple[RelayAddress, ...] = ()


@attrs.frozen
class RootPointer:
    """Where a node's root record can be fetched, signed by that node."""

    node_id: bytes
    public_key: bytes
    addresses: tuple[RecordAddress, ...]
    sequence: int
    expiry: int
    signature: bytes = attrs.field(repr=lambda s: s.hex())


Record: TypeAlias = ContactRecord | RootPointer


def record_kind(record: Record) -> RecordKind:
    """The kind of ``record``."""
    return RecordKind.CONTACT if isinstance(record, ContactRecord) else RecordKind.ROOT


# --- DHT keys ------------------------------------------------------------------------------


def dht_key_string(kind: RecordKind, node_id: bytes) -> str:
    """The documented key string a record of ``kind`` for ``node_id`` lives under."""
    if len(node_id) != NODE_ID_SIZE:
        raise FormatError(f"DHT record: node id must be {NODE_ID_SIZE} bytes, got {len(node_id)}")
    return f"p2pbackup:{kind.label}:{node_id.hex()}"


def dht_key(kind: RecordKind, node_id: bytes) -> bytes:
    """The 20-byte DHT key: SHA-1 of the key string, as kademlia's ``digest()``."""
    # SHA-1 only because the kademlia package addresses values that way; the
    # record's authenticity rests on the Ed25519 signature, not on this hash.
    return hashlib.sha1(dht_key_string(kind, node_id).encode("ascii")).digest()


# --- signing -------------------------------------------------------------------------------


def sign_contact(
    identity_seed: bytes,
    *,
    addresses: Sequence[RecordAddress],
    storage_offered: int,
    sequence: int,
    now: int,
    lifetime: int,
    relays: Sequence[RelayAddress] = (),
) -> ContactRecord:
    """A contact record of the node whose identity seed is ``identity_seed``,
    valid from ``now`` for ``lifetime`` seconds, naming ``relays``."""
    public_key = crypto.signing_public_key(identity_seed)
    unsigned = ContactRecord(
        node_id=node_id_for(public_key),
        public_key=public_key,
        addresses=tuple(addresses),
        storage_offered=storage_offered,
        sequence=sequence,
        expiry=_expiry(now, lifetime),
        signature=bytes(crypto.SIGNATURE_SIZE),
        relays=tuple(relays),
    )
    return attrs.evolve(unsigned, signature=_sign(identity_seed, unsigned))


def sign_root_pointer(
    identity_seed: bytes,
    *,
    addresses: Sequence[RecordAddress],
    sequence: int,
    now: int,
    lifetime: int,
) -> RootPointer:
    """A root pointer of the node whose identity seed is ``identity_seed``,
    valid from ``now`` for ``lifetime`` seconds."""
    public_key = crypto.signing_public_key(identity_seed)
    unsigned = RootPointer(
        node_id=node_id_for(public_key),
        public_key=public_key,
        addresses=tuple(addresses),
        sequence=sequence,
        expiry=_expiry(now, lifetime),
        signature=bytes(crypto.SIGNATURE_SIZE),
    )
    return attrs.evolve(unsigned, signature=_sign(identity_seed, unsigned))


def _expiry(now: int, lifetime: int) -> int:
    if not 0 < lifetime <= MAX_LIFETIME:
        raise FormatError(f"DHT record: lifetime must be 1..{MAX_LIFETIME} seconds, got {lifetime}")
    return now + lifetime


def _sign(seed: bytes, record: Record) -> bytes:
    return crypto.sign(seed, signed_bytes(record))


def signed_bytes(record: Record) -> bytes:
    """What the signature of ``record`` covers: domain, kind, then every field but
    the signature in the record layout."""
    return SIGNATURE_DOMAIN + record_kind(record).label.encode("ascii") + b"\0" + _body(record)


# --- encoding ------------------------------------------------------------------------------


def encode_record(record: Record) -> bytes:
    """The record's bytes; :class:`FormatError` for a record its decoder would refuse."""
    if len(record.signature) != crypto.SIGNATURE_SIZE:
        _fail(f"signature must be {crypto.SIGNATURE_SIZE} bytes, got {len(record.signature)}")
    return _body(record) + record.signature


def record_version(record: Record) -> int:
    """The layout version ``record`` is written in: 2 if it names relays, else 1."""
    return RELAY_VERSION if isinstance(record, ContactRecord) and record.relays else VERSION


def _body(record: Record) -> bytes:
    _check_record(record)
    parts = [
        _HEAD.pack(
            MAGIC,
            record_version(record),
            record_kind(record),
            record.node_id,
            record.public_key,
            record.sequence,
            record.expiry,
        )
    ]
    if isinstance(record, ContactRecord):
        parts.append(_U64.pack(record.storage_offered))
    parts.append(_U8.pack(len(record.addresses)))
    parts += [_address_bytes(address) for address in record.addresses]
    if isinstance(record, ContactRecord) and record.relays:
        parts.append(_U8.pack(len(record.relays)))
        for relay in record.relays:
            parts += [relay.node_id, _address_bytes(relay.address)]
    return b"".join(parts)


def _address_bytes(address: RecordAddress) -> bytes:
    host = address.host.encode("ascii")
    return _U8.pack(len(host)) + host + _PORT.pack(address.port)


def decode_record(data: bytes) -> Record:
    """The record in ``data``; :class:`FormatError` for anything malformed.

    Decoding checks the layout only; :func:`verify_record` decides whether to
    believe it.
    """
    if len(data) > MAX_RECORD_SIZE:
        _fail(f"{len(data)} bytes is over the {MAX_RECORD_SIZE}-byte limit")
    if len(data) < _MIN_SIZE:
        _fail(f"truncated: {len(data)} bytes, at least {_MIN_SIZE} needed")
    magic, version, kind_byte, node_id, public_key, sequence, expiry = _HEAD.unpack_from(data)
    if magic != MAGIC:
        _fail(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version not in (VERSION, RELAY_VERSION):
        _fail(f"unknown version {version}")
    try:
        kind = RecordKind(kind_byte)
    except ValueError:
        _fail(f"unknown kind {kind_byte}")
    if version == RELAY_VERSION and kind is not RecordKind.CONTACT:
        _fail(f"a {kind.label} record has no version {version}")
    reader = _Reader(data, _HEAD.size, len(data) - crypto.SIGNATURE_SIZE)
    storage_offered = reader.u64("storage offered") if kind is RecordKind.CONTACT else 0
    count = reader.u8("address count")
    if not 1 <= count <= MAX_ADDRESSES:
        _fail(f"address count must be 1..{MAX_ADDRESSES}, got {count}")
    addresses = tuple(reader.address(f"address {i}") for i in range(count))
    relays: tuple[RelayAddress, ...] = ()
    if version == RELAY_VERSION:
        relay_count = reader.u8("relay count")
        if not 1 <= relay_count <= MAX_RELAYS:
            _fail(f"a version {version} record names 1..{MAX_RELAYS} relays, not {relay_count}")
        relays = tuple(
            RelayAddress(reader.take(NODE_ID_SIZE, f"relay {i}"), reader.address(f"relay {i}"))
            for i in range(relay_count)
        )
    if reader.offset != reader.end:
        _fail(f"{reader.end - reader.offset} stray bytes before the signature")
    signature = bytes(data[reader.end :])
    record: Record
    if kind is RecordKind.CONTACT:
        record = ContactRecord(
            node_id, public_key, addresses, storage_offered, sequence, expiry, signature, relays
        )
    else:
        record = RootPointer(node_id, public_key, addresses, sequence, expiry, signature)
    _check_record(record)
    return record


@attrs.define
class _Reader:
    """A cursor over the variable part, stopping where the signature begins."""

    data: bytes
    offset: int
    end: int

    def take(self, size: int, what: str) -> bytes:
        if self.offset + size > self.end:
            _fail(f"truncated in {what}")
        chunk = bytes(self.data[self.offset : self.offset + size])
        self.offset += size
        return chunk

    def u8(self, what: str) -> int:
        value: int = _U8.unpack(self.take(_U8.size, what))[0]
        return value

    def u64(self, what: str) -> int:
        value: int = _U64.unpack(self.take(_U64.size, what))[0]
        return value

    def address(self, what: str) -> RecordAddress:
        raw_host = self.take(self.u8(what), what)
        port: int = _PORT.unpack(self.take(_PORT.size, what))[0]
        try:
            host = raw_host.decode("ascii")
        except UnicodeDecodeError:
            _fail(f"{what}: host is not ASCII")
        return RecordAddress(host, port)


def _fail(problem: str) -> NoReturn:
    raise FormatError(f"DHT record: {problem}")


def _check_record(record: Record) -> None:
    if len(record.node_id) != NODE_ID_SIZE:
        _fail(f"node id must be {NODE_ID_SIZE} bytes, got {len(record.node_id)}")
    if len(record.public_key) != crypto.PUBLIC_KEY_SIZE:
        _fail(f"public key must be {crypto.PUBLIC_KEY_SIZE} bytes, got {len(record.public_key)}")
    fields = [("sequence", record.sequence), ("expiry", record.expiry)]
    if isinstance(record, ContactRecord):
        fields.append(("storage offered", record.storage_offered))
    for name, value in fields:
        if not 0 <= value <= MAX_U64:
            _fail(f"{name} must be 0..{MAX_U64}, got {value}")
    if not 1 <= len(record.addresses) <= MAX_ADDRESSES:
        _fail(f"address count must be 1..{MAX_ADDRESSES}, got {len(record.addresses)}")
    for address in record.addresses:
        _check_address(address)
    if isinstance(record, ContactRecord):
        _check_relays(record)


def _check_relays(record: ContactRecord) -> None:
    if len(record.relays) > MAX_RELAYS:
        _fail(f"a record names at most {MAX_RELAYS} relays, not {len(record.relays)}")
    seen = {record.node_id}
    for relay in record.relays:
        if len(relay.node_id) != NODE_ID_SIZE:
            _fail(f"relay node id must be {NODE_ID_SIZE} bytes, got {len(relay.node_id)}")
        if relay.node_id in seen:
            # A node is no relay to itself, and one relay named twice is one.
            _fail(f"relay {relay.node_id.hex()} is the node itself or named twice")
        seen.add(relay.node_id)
        _check_address(relay.address)


def _check_address(address: RecordAddress) -> None:
    host, port = address.host, address.port
    if not 1 <= port <= 65535:
        _fail(f"port of {host!r} must be 1..65535, got {port}")
    if not 1 <= len(host) <= MAX_HOST_LENGTH or not host.isascii():
        _fail(f"host {host[:40]!r} must be 1..{MAX_HOST_LENGTH} ASCII characters")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        # One text per address, so equal records have equal bytes.
        if str(ip) != host:
            _fail(f"IP address {host!r} is not in canonical form {str(ip)!r}")
        return
    labels = host.split(".")
    if not all(_LABEL.match(label) for label in labels):
        _fail(f"host {host[:40]!r} is neither an IP address nor a lowercase DNS name")
    if labels[-1].isdigit():
        # An all-digit top label is a mistyped IP address, never a real name.
        _fail(f"host {host!r} looks like a malformed IP address")


# --- verification --------------------------------------------------------------------------


def verify_record(record: Record, *, key: bytes, now: int) -> None:
    """Return if ``record`` is valid under DHT key ``key`` at ``now``; else
    :class:`RecordKeyError`, :class:`~p2pbackup.errors.SignatureError` or
    :class:`RecordExpiredError`, naming the node and what is wrong."""
    message = signed_bytes(record)  # also refuses a record that cannot be encoded
    kind = record_kind(record)
    who = f"{kind.label} record of node {record.node_id.hex()}"
    if node_id_for(record.public_key) != record.node_id:
        raise RecordKeyError(f"{who}: node id is not the hash of its public key")
    if key != dht_key(kind, record.node_id):
        raise RecordKeyError(f"{who}: stored under DHT key {key.hex()}, not its own")
    try:
        crypto.verify(record.public_key, message, record.signature)
    except SignatureError as error:
        raise SignatureError(f"{who}: {error}") from None
    if record.expiry <= now:
        raise RecordExpiredError(f"{who}: expired at {record.expiry} (now {now})")
    if record.expiry > now + MAX_LIFETIME:
        raise RecordExpiredError(
            f"{who}: expiry {record.expiry} is more than {MAX_LIFETIME} s after now ({now})"
        )


def _valid(value: Record | bytes | None, *, key: bytes, now: int) -> Record | None:
    if value is None:
        return None
    try:
        record = decode_record(value) if isinstance(value, bytes) else value
        verify_record(record, key=key, now=now)
    except IntegrityError:
        return None
    return record


def _rank(record: Record) -> tuple[int, int, bytes]:
    return (record.sequence, record.expiry, encode_record(record))


def newer(a: Record, b: Record) -> bool:
    """Whether ``a`` supersedes ``b``: higher sequence, then later expiry, then
    greater bytes, so every node picks the same one. Validity is not checked."""
    return _rank(a) > _rank(b)


def choose_newest(values: Iterable[Record | bytes], *, key: bytes, now: int) -> Record | None:
    """The newest valid record among ``values`` (as answered by DHT lookups for
    ``key``), or ``None``. Invalid ones are ignored however many serve them."""
    best: Record | None = None
    for value in values:
        record = _valid(value, key=key, now=now)
        if record is not None and (best is None or newer(record, best)):
            best = record
    return best


def store_refusal(existing: bytes | None, incoming: bytes, *, key: bytes, now: int) -> str | None:
    """Why a node's DHT storage must not replace ``existing`` under ``key`` with
    ``incoming``, or ``None`` if it should. Only a valid record with a strictly
    higher sequence than the valid one held is taken; an invalid or expired
    ``existing`` counts as nothing held."""
    try:
        record = decode_record(incoming)
        verify_record(record, key=key, now=now)
    except IntegrityError as error:
        return str(error)
    held = _valid(existing, key=key, now=now)
    # Same sequence, other bytes: the owner signed two records with one number
    # (or someone replays the older); first come stays rather than flip-flopping.
    if held is not None and record.sequence <= held.sequence:
        return (
            f"{record_kind(record).label} record of node {record.node_id.hex()}: "
            f"sequence {record.sequence} is not newer than the {held.sequence} held"
        )
    return None


def accept_store(existing: bytes | None, incoming: bytes, *, key: bytes, now: int) -> bool:
    """Whether a node's DHT storage should replace ``existing`` under ``key`` with
    ``incoming`` (see :func:`store_refusal`)."""
    return store_refusal(existing, incoming, key=key, now=now) is None
