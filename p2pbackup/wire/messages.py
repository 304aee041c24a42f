"""The storage protocol's messages, their codec and their framing (sans-IO).

Nouns:

* **message** — one frozen attrs value below. Messages travel inside an
  authenticated encrypted session; this module sees only the session's
  plaintext bytes and never does I/O.
* **request** — a message that opens an exchange (client → server); exactly
  the classes in :data:`REQUEST_TYPES`. One exchange at a time per session.
* **response** — a message that answers a request (server → client); the
  classes in :data:`RESPONSE_TYPES`. :class:`Refused` answers any request.
* **piece** — a :class:`ShardPiece`: 1 to :data:`PIECE_SIZE` bytes of a shard
  inside a streamed transfer, in either direction. A piece is neither a request
  nor a response: it is only valid inside an upload or a download.
* **type code** and **version** — each message class has one type code, and
  each (type code, version) pair one exact field layout. Versions are per
  message, so a message can grow a field without a new protocol.
* **body** — one msgpack array ``[type code, version, field, ...]``: ids and
  data are bin, text is str, enums are their integer values, ``None`` is nil,
  tuples and nested values are arrays. No maps, no extension types, no floats.
* **frame** — a 4-byte big-endian body length, then the body. A body is at most
  :data:`MAX_FRAME_SIZE` bytes; a longer length is refused as soon as its four
  bytes arrive, before any of the body is buffered
  (:class:`~p2pbackup.core.framing.FrameReader` cuts the stream).
* **field kind** — a field's wire type and bounds (``_Int``, ``_Bytes``, ...).
  Each message's wire form is declared once, as a **spec** in ``_SPECS``
  (class, type code, version, one kind per attrs field, in order); both the
  encoder and the decoder are driven by that one declaration.
* **statement** — the exact bytes an owner signs to let one host store, renew
  or delete its shards (:func:`put_statement`, :func:`renew_statement`,
  :func:`delete_statement`, :func:`delete_all_statement`). The signing
  itself is ``crypto.sign``.

Exchanges (C = client, S = server)::

    PutShard    → Ready, C sends pieces totalling size, → Stored | Refused
                → Stored at once (already held: puts are idempotent) | Refused
    GetShard    → ShardData(size), S sends pieces totalling size | Refused
    HasShard    → ShardStatus | Refused
    Audit       → AuditProof | Refused
    ListShards  → ShardList | Refused
    RenewLease  → LeaseRenewed | Refused
    DeleteShard → Deleted | Refused
    PutRoot     → RootStored | Refused
    GetRoot     → RootData | Refused
    GetUsage    → Usage | Refused
    DeleteAll   → AllDeleted | Refused
    Leaving     → Noted | Refused
    DialBack    → DialBackResult (S dialled each address) | Refused
    Delegate    → Delegated | Refused
    RevokeDelegate → DelegateRevoked | Refused
    PutGrant    → GrantStored | Refused
    GetRepairLog → RepairLogData | Refused

Delegation (docs/delegation.md): a delegate opens its session to a
storage node with ``Delegate(certificate)``; once ``Delegated``, the
session acts for the certificate's owner, and only audits, lease renewals,
puts, reads, presence checks and usage are answered, each after the
certificate is checked again (expiry, revocation). ``RevokeDelegate`` is an
owner telling a node to refuse certificates it issued for one delegate
before a time; ``PutGrant`` an owner handing its delegate a repair grant
and a fresh certificate; ``GetRepairLog`` an owner asking its delegate
what it changed (a repair log signed by the delegate, or none).

``DeleteAll`` is an owner forgetting itself on a host: every shard and the
root record, in one signed request (``p2pbackup leave``). ``Leaving`` goes
the other way: a host tells an owner it stores for that it is leaving the
network, on a session it opens to the owner's node; the owner records it and
moves its shards away. It needs no signature: the session proves who sent
it, and it can only make its receiver stop relying on that sender.

Relay exchanges (docs/protocol.md, "Relays"; N = a node that cannot be
reached, R = its relay, a friend; D = a friend of R dialling N)::

    N: RelayReserve → RelayReserved | Refused; then on that session, for
       its life: N sends RelayPing → RelayPong, R sends RelayIncoming
    D: RelayConnect(N) → RelayJoined | Refused; then the session carries
       N's bytes (R sent RelayIncoming to N, and N answered on a new session)
    N: RelayAccept(circuit) → RelayJoined | Refused; then the session
       carries D's bytes

Direct upgrade (docs/nat.md): the first exchange on D's and N's own session
through the circuit, before any other request::

    D: DirectConnect(D's addresses) → DirectAddresses(N's addresses) | Refused
    D: DirectSync (no answer; both dial) — only when both offered addresses
    on the direct connection, after its handshake, N sends DirectReady

Errors: decoding anything that is not a well-formed frame of a known message
within its bounds raises :class:`~p2pbackup.errors.RemoteProtocolError` (the
peer broke the protocol) and nothing else; encoding a message that breaks its
own bounds raises :class:`~p2pbackup.errors.LocalProtocolError` (we would
have). Every message names the message type, the field and the problem.

The decoder is not canonical (it accepts, say, a small integer in a wider
msgpack encoding): nothing hashes or signs message bytes, signatures cover
statements rebuilt from the decoded fields.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeAlias

import attrs
import msgpack

from p2pbackup.core.crypto import SIGNATURE_SIZE
from p2pbackup.core.fields import MAX_UINT, FieldChecks
from p2pbackup.core.formats import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE
from p2pbackup.core.framing import FrameReader, length_prefix
from p2pbackup.core.merkle import HASH_SIZE
from p2pbackup.errors import LocalProtocolError, RemoteProtocolError
from p2pbackup.model import ID_SIZE, NODE_ID_SIZE, BytesLike

# --- Limits -----------------------------------------------------------------

#: Version of the protocol as a whole: of its statements and of its
#: specification (docs). Each message also carries its own version.
PROTOCOL_VERSION = 1
#: Most data in one :class:`ShardPiece`.
PIECE_SIZE = 1 << 20
#: Largest frame body: a full piece plus room for the message around it and
#: for an audit answer of about a piece's worth of blocks with their proofs.
MAX_FRAME_SIZE = PIECE_SIZE + (64 << 10)
#: Largest shard a host stores (a shard is never larger than its pack).
MAX_SHARD_SIZE = 1 << 30
#: Longest lease one request may ask for: ten years, leap days included.
MAX_LEASE_SECONDS = 3653 * 86400
#: Audit challenges: nonce length, block indices per challenge.
MIN_NONCE_SIZE = 16
MAX_NONCE_SIZE = 64
MAX_AUDIT_BLOCKS = 64
#: Highest block index a shard can have (MAX_SHARD_SIZE at the smallest block).
MAX_BLOCK_INDEX = MAX_SHARD_SIZE // MIN_BLOCK_SIZE - 1
#: Hashes in one Merkle proof: at most log2 of the most blocks a shard has (21).
MAX_PROOF_HASHES = (MAX_BLOCK_INDEX + 1).bit_length() - 1
#: Shards in one listing page, and in one lease renewal.
MAX_LIST_LIMIT = 10_000
MAX_RENEW_SHARDS = 1000
#: A root record as stored on peers.
MAX_ROOT_SIZE = 1 << 20
#: Characters of a refusal's explanation.
MAX_REFUSAL_TEXT = 1000
#: Addresses in one dial-back request (a contact record holds at most 8),
#: and characters of one (``host:port``, a DNS name at its longest).
MAX_DIAL_BACK_ADDRESSES = 8
MAX_ADDRESS_TEXT = 262
#: Addresses one side offers for a direct upgrade.
MAX_DIRECT_ADDRESSES = 4
#: Bytes of a relay circuit's id (random, chosen by the relay).
CIRCUIT_ID_SIZE = 16
#: Longest keepalive interval a relay may ask for.
MAX_KEEPALIVE_SECONDS = 3600
#: A sealed delegation certificate (about 200 bytes) and a sealed repair
#: grant (about 400 bytes a pack at n = 10: some 2 500 packs fit).
MAX_CERTIFICATE_SIZE = 1024
MAX_GRANT_SIZE = MAX_ROOT_SIZE

#: Width of a frame's length prefix.
LENGTH_PREFIX_SIZE = 4


# --- Messages ---------------------------------------------------------------


class RefusalCode(enum.IntEnum):
    """Why a server refused a request."""

    #: The request makes no sense (a range past the end, a wrong piece count...).
    BAD_REQUEST = 1
    #: No such shard (or root) for this owner.
    NOT_FOUND = 2
    #: Over the owner's quota or out of disk.
    FULL = 3
    #: A signature that does not verify, or a shard of another owner; a
    #: delegation certificate that grants nothing here, or a request a
    #: delegate may not make (docs/delegation.md).
    FORBIDDEN = 4
    #: A different shard is already stored under that id.
    CONFLICT = 5
    #: Uploaded data failed its declared Merkle root.
    INTEGRITY = 6
    #: Try again later.
    BUSY = 7
    #: The server failed; not the client's fault.
    INTERNAL = 8


# Requests.


@attrs.frozen
class PutShard:
    """Store a shard. Pieces totalling ``size`` follow only after :class:`Ready`.

    ``signature`` signs :func:`put_statement` for this host. ``merkle_root`` is
    over blocks of ``block_size``; the host checks the data against it before
    answering :class:`Stored`.
    """

    shard_id: bytes
    size: int
    block_size: int
    merkle_root: bytes
    lease_seconds: int
    signature: bytes


@attrs.frozen
class ShardPiece:
    """Part of a shard being uploaded or downloaded (never empty)."""

    data: bytes = attrs.field(repr=lambda data: f"<{len(data)} bytes>")


@attrs.frozen
class GetShard:
    """Read ``length`` bytes (all, if None) from ``offset``; the server clamps
    the range to the shard and announces the real size in :class:`ShardData`."""

    shard_id: bytes
    offset: int
    length: int | None


@attrs.frozen
class HasShard:
    shard_id: bytes


@attrs.frozen
class Audit:
    """Prove possession of blocks ``indices`` of a shard, bound to ``nonce``.

    The answer carries the blocks themselves, so it fits a frame only if
    :func:`audit_answer_fits`: the requester chooses indices accordingly, and a
    server refuses (``BAD_REQUEST``) a challenge that does not fit rather than
    fail to encode its answer.
    """

    shard_id: bytes
    nonce: bytes
    indices: tuple[int, ...]


@attrs.frozen
class ListShards:
    """The caller's own shards with ids above ``after`` (from the start if None)."""

    after: bytes | None
    limit: int


@attrs.frozen
class RenewLease:
    """Extend the leases of ``shard_ids``; ``signature`` signs :func:`renew_statement`."""

    shard_ids: tuple[bytes, ...]
    lease_seconds: int
    signature: bytes


@attrs.frozen
class DeleteShard:
    """Delete a shard; ``signature`` signs :func:`delete_statement`."""

    shard_id: bytes
    signature: bytes


@attrs.frozen
class PutRoot:
    """Store the owner's (signed, encrypted) root record, replacing any other."""

    data: bytes = attrs.field(repr=lambda data: f"<{len(data)} bytes>")


@attrs.frozen
class GetRoot:
    pass


@attrs.frozen
class GetUsage:
    pass


@attrs.frozen
class DeleteAll:
    """Delete every shard and the root record the caller keeps here;
    ``signature`` signs :func:`delete_all_statement`."""

    signature: bytes


@attrs.frozen
class Leaving:
    """The caller, which stores shards for the receiver, is leaving the network."""


@attrs.frozen
class Delegate:
    """Act for the owner of ``certificate`` (a sealed delegation certificate
    naming the caller as delegate) for the rest of this session."""

    certificate: bytes = attrs.field(repr=lambda data: f"<{len(data)} bytes>")


@attrs.frozen
class RevokeDelegate:
    """Refuse, from now on, the caller's certificates for node ``delegate``
    issued before ``before`` (unix seconds, the caller's clock)."""

    delegate: bytes
    before: int


@attrs.frozen
class PutGrant:
    """Keep the caller's repair ``grant`` (sealed) and the ``certificate``
    that lets the receiver act on it; a grant replaces one of lower sequence."""

    grant: bytes = attrs.field(repr=lambda data: f"<{len(data)} bytes>")
    certificate: bytes = attrs.field(repr=lambda data: f"<{len(data)} bytes>")


@attrs.frozen
class GetRepairLog:
    """The repair log the receiver, the caller's delegate, keeps for it."""


# Relay requests (docs/protocol.md, "Relays").


@attrs.frozen
class RelayReserve:
    """Keep this session as a reservation: join the relay's friends who ask
    for the sender to it, through :class:`RelayIncoming`."""


@attrs.frozen
class RelayConnect:
    """Join this session to node ``node_id``, which holds a reservation here."""

    node_id: bytes


@attrs.frozen
class RelayAccept:
    """This session is the reserved node's end of circuit ``circuit``."""

    circuit: bytes


@attrs.frozen
class RelayPing:
    """A reservation's keepalive (it also keeps NAT mappings open)."""


# Responses.


@attrs.frozen
class Ready:
    """Send the pieces of the shard announced by :class:`PutShard`."""


@attrs.frozen
class Stored:
    """The shard is stored and verified; its lease ends at ``lease_expiry``
    (unix seconds)."""

    shard_id: bytes
    lease_expiry: int


@attrs.frozen
class ShardData:
    """Pieces totalling ``size`` bytes follow."""

    size: int


@attrs.frozen
class ShardStatus:
    present: bool


@attrs.frozen
class AuditProof:
    """Per index of the challenge, in order: the block and its Merkle proof."""

    nonce: bytes
    blocks: tuple[bytes, ...] = attrs.field(repr=lambda blocks: f"<{len(blocks)} blocks>")
    proofs: tuple[tuple[bytes, ...], ...] = attrs.field(
        repr=lambda proofs: f"<{len(proofs)} proofs>"
    )


@attrs.frozen
class ShardEntry:
    """One shard in a :class:`ShardList` (not a message of its own)."""

    shard_id: bytes
    size: int
    lease_expiry: int


@attrs.frozen
class ShardList:
    """A page of the caller's shards in ascending id order; ``more`` if the
    listing goes on after the last entry."""

    entries: tuple[ShardEntry, ...]
    more: bool


@attrs.frozen
class LeaseRenewed:
    """Leases end at ``lease_expiry`` now, except for ``missing`` shards,
    which the host does not hold."""

    lease_expiry: int
    missing: tuple[bytes, ...]


@attrs.frozen
class Deleted:
    existed: bool


@attrs.frozen
class RootStored:
    pass


@attrs.frozen
class RootData:
    """The owner's root record, or None if the host holds none."""

    data: bytes | None


@attrs.frozen
class Usage:
    """Bytes the caller stores here, and the most this node offers it now:
    ``used`` plus the room left for the caller — the least of what its
    per-owner quota, its capacity and its disk still allow (None: no bound
    the node knows of). The room is an estimate of the moment; a put may still
    be refused as full.

    Nodes of before this meaning sent the per-owner quota in this field
    (never below the offer): read from such a node the offer is an upper bound.
    """

    used: int
    offered: int | None


@attrs.frozen
class AllDeleted:
    """The caller's ``shards`` shards here are deleted, and its root record
    if it had one (``root``)."""

    shards: int
    root: bool


@attrs.frozen
class Noted:
    """The leaving node is recorded; ``known``: it holds shards of ours (it is
    one of our peers), so they will be moved."""

    known: bool


@attrs.frozen
class DialBack:
    """Dial me back at these addresses (``host:port``) and say which answer as me.

    Answered only for friends. Only addresses in the asker's contact record or
    at the host its connection came from are dialled; the others count as not
    reached."""

    addresses: tuple[str, ...]


@attrs.frozen
class DialBackResult:
    """For each address of the :class:`DialBack`, in order: whether the asker
    answered there (a completed handshake as the asker's node)."""

    reachable: tuple[bool, ...]


@attrs.frozen
class Delegated:
    """The session acts for node ``owner`` now, until ``expiry`` at most."""

    owner: bytes
    expiry: int


@attrs.frozen
class DelegateRevoked:
    """The revocation is recorded."""


@attrs.frozen
class GrantStored:
    """The receiver holds the caller's grant of sequence ``sequence``."""

    sequence: int


@attrs.frozen
class RepairLogData:
    """A sealed repair log, or None if the delegate has repaired nothing for
    the caller (or is none of its delegates)."""

    data: bytes | None = attrs.field(repr=lambda data: "None" if data is None else "<log>")


@attrs.frozen
class RelayReserved:
    """The reservation holds while a :class:`RelayPing` comes at least every
    ``keepalive`` seconds."""

    keepalive: int


@attrs.frozen
class RelayIncoming:
    """Sent by a relay on a reservation: node ``peer`` asks for this node;
    open a new session to the relay and send ``RelayAccept(circuit)``."""

    circuit: bytes
    peer: bytes


@attrs.frozen
class RelayJoined:
    """From the next byte on, this session carries the other end's bytes.

    ``observed`` (version 2): the address (``host:port``) the relay sees this
    session come from, which is where the world sees the node (its router's
    public address); None when the relay cannot tell."""

    observed: str | None = None


@attrs.frozen
class RelayPong:
    """The answer to :class:`RelayPing`."""


# The direct upgrade of a relayed session (docs/nat.md, "Direct upgrade").


@attrs.frozen
class DirectConnect:
    """The first request on a session through a relay: the dialler's
    addresses to try a direct connection at (none: it will not try now)."""

    addresses: tuple[str, ...]


@attrs.frozen
class DirectAddresses:
    """The answer to :class:`DirectConnect`: the reached node's addresses
    (none: it will not try)."""

    addresses: tuple[str, ...]


@attrs.frozen
class DirectSync:
    """Dial now: the reached node dials at once, the dialler half a round
    trip later, so that both connection attempts cross. No answer."""


@attrs.frozen
class DirectReady:
    """Sent by the reached node, as the first message on the direct session
    once its handshake completed: the dialler may move to it."""


@attrs.frozen
class Refused:
    """The request was refused; ``message`` explains it to a human."""

    code: RefusalCode
    message: str


Message: TypeAlias = (
    PutShard
    | ShardPiece
    | GetShard
    | HasShard
    | Audit
    | ListShards
    | RenewLease
    | DeleteShard
    | PutRoot
    | GetRoot
    | GetUsage
    | DeleteAll
    | Leaving
    | Ready
    | Stored
    | ShardData
    | ShardStatus
    | AuditProof
    | ShardList
    | LeaseRenewed
    | Deleted
    | RootStored
    | RootData
    | Usage
    | AllDeleted
    | Noted
    | Refused
    | DialBack
    | DialBackResult
    | Delegate
    | Delegated
    | RevokeDelegate
    | DelegateRevoked
    | PutGrant
    | GrantStored
    | GetRepairLog
    | RepairLogData
    | RelayReserve
    | RelayConnect
    | RelayAccept
    | RelayPing
    | RelayReserved
    | RelayIncoming
    | RelayJoined
    | RelayPong
    | DirectConnect
    | DirectAddresses
    | DirectSync
    | DirectReady
)

#: Requests that open a relay exchange (the storage server hands them to its relay).
RELAY_REQUEST_TYPES: tuple[type[Message], ...] = (
    RelayReserve,
    RelayConnect,
    RelayAccept,
    RelayPing,
)
#: What a relay answers or sends on a reservation.
RELAY_RESPONSE_TYPES: tuple[type[Message], ...] = (
    RelayReserved,
    RelayIncoming,
    RelayJoined,
    RelayPong,
)

#: Messages that open an exchange.
REQUEST_TYPES: tuple[type[Message], ...] = (
    PutShard,
    GetShard,
    HasShard,
    Audit,
    ListShards,
    RenewLease,
    DeleteShard,
    PutRoot,
    GetRoot,
    GetUsage,
    DeleteAll,
    Leaving,
    DialBack,
    Delegate,
    RevokeDelegate,
    PutGrant,
    GetRepairLog,
    *RELAY_REQUEST_TYPES,
    DirectConnect,
    DirectSync,
)
#: Messages that answer one.
RESPONSE_TYPES: tuple[type[Message], ...] = (
    Ready,
    Stored,
    ShardData,
    ShardStatus,
    AuditProof,
    ShardList,
    LeaseRenewed,
    Deleted,
    RootStored,
    RootData,
    Usage,
    AllDeleted,
    Noted,
    Refused,
    DialBackResult,
    Delegated,
    DelegateRevoked,
    GrantStored,
    RepairLogData,
    *RELAY_RESPONSE_TYPES,
    DirectAddresses,
    DirectReady,
)
#: Every message class: requests, the piece, responses.
MESSAGE_TYPES: tuple[type[Message], ...] = (*REQUEST_TYPES, ShardPiece, *RESPONSE_TYPES)


def audit_answer_fits(index_count: int, block_size: int) -> bool:
    """Whether an :class:`AuditProof` for ``index_count`` blocks of ``block_size``
    bytes always fits a frame.

    The blocks take at most a piece's worth; the frame's margin beyond a piece
    holds the worst case of everything else (64 proofs of 21 hashes, the
    nonce, msgpack headers: under 48 KiB).
    """
    return 1 <= index_count <= MAX_AUDIT_BLOCKS and index_count * block_size <= PIECE_SIZE


def is_request(message: Message) -> bool:
    """True if ``message`` may open an exchange (a server accepts nothing else there)."""
    return isinstance(message, REQUEST_TYPES)


# --- Field kinds ------------------------------------------------------------


class _Problem(Exception):
    """A value breaking its field's rules. Never leaves this module: the encoder
    turns it into a LocalProtocolError, the decoder into a RemoteProtocolError."""


#: The checks of decoded fields (and of fields about to be encoded).
_check = FieldChecks(_Problem)


def _plain_int(value: object) -> object:
    """``value`` as msgpack would write it, if it is an integer: an IntEnum
    member is its integer, but a bool stays a bool (a distinct msgpack type)."""
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else value


class _Kind(Protocol):
    """A field's wire type and bounds, in both directions."""

    def decode(self, value: object, what: str) -> object:
        """The field's value from what msgpack unpacked; _Problem if not allowed."""
        ...

    def encode(self, value: object, what: str) -> object:
        """What msgpack should pack for the field's value; _Problem if not allowed."""
        ...


@attrs.frozen
class _Int:
    low: int
    high: int
    power_of_two: bool = False

    def decode(self, value: object, what: str) -> object:
        number = _check.integer(value, what, low=self.low, high=self.high)
        if self.power_of_two and number & (number - 1):
            _check.fail(what, f"{number} is not a power of two")
        return number

    def encode(self, value: object, what: str) -> object:
        return self.decode(_plain_int(value), what)


@attrs.frozen
class _Bool:
    def decode(self, value: object, what: str) -> object:
        return _check.boolean(value, what)

    encode = decode


@attrs.frozen
class _Bytes:
    min_length: int
    max_length: int

    def decode(self, value: object, what: str) -> object:
        return _check.binary(value, what, min_length=self.min_length, max_length=self.max_length)

    encode = decode


@attrs.frozen
class _Text:
    max_length: int

    def decode(self, value: object, what: str) -> object:
        return _check.text(value, what, max_length=self.max_length)

    def encode(self, value: object, what: str) -> object:
        text = _check.text(value, what, max_length=self.max_length)
        # msgpack would fail on a lone surrogate anyway, less clearly.
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise _Problem(f"{what}: not encodable as UTF-8") from None
        return text


@attrs.frozen
class _Optional:
    inner: _Kind

    def decode(self, value: object, what: str) -> object:
        return _check.optional(value, what, self.inner.decode)

    def encode(self, value: object, what: str) -> object:
        return _check.optional(value, what, self.inner.encode)


@attrs.frozen
class _Array:
    item: _Kind
    min_length: int
    max_length: int

    def decode(self, value: object, what: str) -> object:
        return self._items(value, what, self.item.decode)

    def encode(self, value: object, what: str) -> object:
        return self._items(
            tuple(value) if isinstance(value, list) else value, what, self.item.encode
        )

    def _items(
        self, value: object, what: str, convert: Callable[[object, str], object]
    ) -> tuple[object, ...]:
        items = _check.array(value, what, min_length=self.min_length, max_length=self.max_length)
        return tuple(convert(item, f"{what} item {i}") for i, item in enumerate(items))


@attrs.frozen
class _Enum:
    enum_type: type[enum.IntEnum]

    def decode(self, value: object, what: str) -> object:
        return _check.member(self.enum_type, value, what)

    def encode(self, value: object, what: str) -> object:
        return int(_check.member(self.enum_type, _plain_int(value), what))


@attrs.frozen
class _Fields:
    """An ordered list of named field kinds: a message's body after its type
    code and version, or a nested value such as :class:`ShardEntry`."""

    cls: type[Any]
    kinds: tuple[tuple[str, _Kind], ...]

    @classmethod
    def of(cls, target: type[Any], **kinds: _Kind) -> _Fields:
        names = tuple(field.name for field in attrs.fields(target))
        if names != tuple(kinds):
            # A programming error in this module, caught at import.
            raise LocalProtocolError(
                f"{target.__name__}: wire fields {tuple(kinds)} do not match the class {names}"
            )
        return cls(target, tuple(kinds.items()))

    def decode_values(self, values: object, what: str) -> Any:
        fields = _check.fields(values, what, len(self.kinds))
        return self.cls(
            *(
                kind.decode(value, f"{what} field {name!r}")
                for (name, kind), value in zip(self.kinds, fields, strict=True)
            )
        )

    def encode_values(self, value: object, what: str) -> list[object]:
        if type(value) is not self.cls:
            raise _Problem(f"{what}: expected a {self.cls.__name__}, got {type(value).__name__}")
        return [
            kind.encode(getattr(value, name), f"{what} field {name!r}") for name, kind in self.kinds
        ]


@attrs.frozen
class _Record:
    """A nested attrs value, as an array of its fields."""

    fields: _Fields

    def decode(self, value: object, what: str) -> object:
        return self.fields.decode_values(value, what)

    def encode(self, value: object, what: str) -> object:
        return tuple(self.fields.encode_values(value, what))


_SHARD_ID = _Bytes(ID_SIZE, ID_SIZE)
_HASH = _Bytes(HASH_SIZE, HASH_SIZE)
_SIGNATURE = _Bytes(SIGNATURE_SIZE, SIGNATURE_SIZE)
_SHARD_SIZE = _Int(0, MAX_SHARD_SIZE)
_BLOCK_SIZE = _Int(MIN_BLOCK_SIZE, MAX_BLOCK_SIZE, power_of_two=True)
_LEASE_SECONDS = _Int(1, MAX_LEASE_SECONDS)
_UNIX_TIME = _Int(0, MAX_UINT)
_NONCE = _Bytes(MIN_NONCE_SIZE, MAX_NONCE_SIZE)
_NODE_ID = _Bytes(NODE_ID_SIZE, NODE_ID_SIZE)
_CIRCUIT_ID = _Bytes(CIRCUIT_ID_SIZE, CIRCUIT_ID_SIZE)
_DIRECT_ADDRESSES = _Array(_Text(MAX_ADDRESS_TEXT), 0, MAX_DIRECT_ADDRESSES)
_SHARD_ENTRY = _Record(
    _Fields.of(ShardEntry, shard_id=_SHARD_ID, size=_SHARD_SIZE, lease_expiry=_UNIX_TIME)
)


# --- Specs: each message's wire form, declared once ------------------------


@attrs.frozen
class _Spec:
    code: int
    version: int
    fields: _Fields
    #: Rules between fields, beyond each field's own: a problem or None.
    check: Callable[[Any], str | None] | None = None

    @property
    def name(self) -> str:
        return f"{self.fields.cls.__name__} (v{self.version})"


def _audit_proof_check(proof: AuditProof) -> str | None:
    if len(proof.blocks) != len(proof.proofs):
        return f"{len(proof.blocks)} blocks but {len(proof.proofs)} proofs"
    return None


# Type codes: requests from 0x01, the piece 0x20, responses from 0x40; the
# relay's requests from 0x18, its answers from 0x58.
_SPECS: tuple[_Spec, ...] = (
    _Spec(
        0x01,
        1,
        _Fields.of(
            PutShard,
            shard_id=_SHARD_ID,
            size=_SHARD_SIZE,
            block_size=_BLOCK_SIZE,
            merkle_root=_HASH,
            lease_seconds=_LEASE_SECONDS,
            signature=_SIGNATURE,
        ),
    ),
    _Spec(
        0x02,
        1,
        _Fields.of(
            GetShard,
            shard_id=_SHARD_ID,
            offset=_Int(0, MAX_UINT),
            length=_Optional(_Int(0, MAX_UINT)),
        ),
    ),
    _Spec(0x03, 1, _Fields.of(HasShard, shard_id=_SHARD_ID)),
    _Spec(
        0x04,
        1,
        _Fields.of(
            Audit,
            shard_id=_SHARD_ID,
            nonce=_NONCE,
            indices=_Array(_Int(0, MAX_BLOCK_INDEX), 1, MAX_AUDIT_BLOCKS),
        ),
    ),
    _Spec(
        0x05,
        1,
        _Fields.of(ListShards, after=_Optional(_SHARD_ID), limit=_Int(1, MAX_LIST_LIMIT)),
    ),
    _Spec(
        0x06,
        1,
        _Fields.of(
            RenewLease,
            shard_ids=_Array(_SHARD_ID, 1, MAX_RENEW_SHARDS),
            lease_seconds=_LEASE_SECONDS,
            signature=_SIGNATURE,
        ),
    ),
    _Spec(0x07, 1, _Fields.of(DeleteShard, shard_id=_SHARD_ID, signature=_SIGNATURE)),
    _Spec(0x08, 1, _Fields.of(PutRoot, data=_Bytes(0, MAX_ROOT_SIZE))),
    _Spec(0x09, 1, _Fields.of(GetRoot)),
    _Spec(0x0A, 1, _Fields.of(GetUsage)),
    _Spec(0x0B, 1, _Fields.of(DeleteAll, signature=_SIGNATURE)),
    _Spec(0x0C, 1, _Fields.of(Leaving)),
    _Spec(0x20, 1, _Fields.of(ShardPiece, data=_Bytes(1, PIECE_SIZE))),
    _Spec(0x40, 1, _Fields.of(Ready)),
    _Spec(0x41, 1, _Fields.of(Stored, shard_id=_SHARD_ID, lease_expiry=_UNIX_TIME)),
    _Spec(0x42, 1, _Fields.of(ShardData, size=_SHARD_SIZE)),
    _Spec(0x43, 1, _Fields.of(ShardStatus, present=_Bool())),
    _Spec(
        0x44,
        1,
        _Fields.of(
            AuditProof,
            nonce=_NONCE,
            blocks=_Array(_Bytes(0, MAX_BLOCK_SIZE), 0, MAX_AUDIT_BLOCKS),
            proofs=_Array(_Array(_HASH, 0, MAX_PROOF_HASHES), 0, MAX_AUDIT_BLOCKS),
        ),
        check=_audit_proof_check,
    ),
    _Spec(
        0x45,
        1,
        _Fields.of(ShardList, entries=_Array(_SHARD_ENTRY, 0, MAX_LIST_LIMIT), more=_Bool()),
    ),
    _Spec(
        0x46,
        1,
        _Fields.of(
            LeaseRenewed,
            lease_expiry=_UNIX_TIME,
            missing=_Array(_SHARD_ID, 0, MAX_RENEW_SHARDS),
        ),
    ),
    _Spec(0x47, 1, _Fields.of(Deleted, existed=_Bool())),
    _Spec(0x48, 1, _Fields.of(RootStored)),
    _Spec(0x49, 1, _Fields.of(RootData, data=_Optional(_Bytes(0, MAX_ROOT_SIZE)))),
    _Spec(0x4A, 1, _Fields.of(Usage, used=_Int(0, MAX_UINT), offered=_Optional(_Int(0, MAX_UINT)))),
    _Spec(0x4B, 1, _Fields.of(AllDeleted, shards=_Int(0, MAX_UINT), root=_Bool())),
    _Spec(0x4C, 1, _Fields.of(Noted, known=_Bool())),
    _Spec(
        0x4F,
        1,
        _Fields.of(Refused, code=_Enum(RefusalCode), message=_Text(MAX_REFUSAL_TEXT)),
    ),
    # Reachability: dial-back.
    _Spec(
        0x0D,
        1,
        _Fields.of(
            DialBack,
            addresses=_Array(_Text(MAX_ADDRESS_TEXT), 1, MAX_DIAL_BACK_ADDRESSES),
        ),
    ),
    _Spec(
        0x4D,
        1,
        _Fields.of(DialBackResult, reachable=_Array(_Bool(), 1, MAX_DIAL_BACK_ADDRESSES)),
    ),
    # Delegation (docs/delegation.md); 0x0F + 0x40 is Refused, so it is skipped.
    _Spec(0x0E, 1, _Fields.of(Delegate, certificate=_Bytes(1, MAX_CERTIFICATE_SIZE))),
    _Spec(0x4E, 1, _Fields.of(Delegated, owner=_NODE_ID, expiry=_UNIX_TIME)),
    _Spec(0x10, 1, _Fields.of(RevokeDelegate, delegate=_NODE_ID, before=_UNIX_TIME)),
    _Spec(0x50, 1, _Fields.of(DelegateRevoked)),
    _Spec(
        0x11,
        1,
        _Fields.of(
            PutGrant,
            grant=_Bytes(1, MAX_GRANT_SIZE),
            certificate=_Bytes(1, MAX_CERTIFICATE_SIZE),
        ),
    ),
    _Spec(0x51, 1, _Fields.of(GrantStored, sequence=_Int(0, MAX_UINT))),
    _Spec(0x12, 1, _Fields.of(GetRepairLog)),
    _Spec(0x52, 1, _Fields.of(RepairLogData, data=_Optional(_Bytes(1, MAX_GRANT_SIZE)))),
    _Spec(0x18, 1, _Fields.of(RelayReserve)),
    _Spec(0x19, 1, _Fields.of(RelayConnect, node_id=_NODE_ID)),
    _Spec(0x1A, 1, _Fields.of(RelayAccept, circuit=_CIRCUIT_ID)),
    _Spec(0x1B, 1, _Fields.of(RelayPing)),
    _Spec(0x58, 1, _Fields.of(RelayReserved, keepalive=_Int(1, MAX_KEEPALIVE_SECONDS))),
    _Spec(0x59, 1, _Fields.of(RelayIncoming, circuit=_CIRCUIT_ID, peer=_NODE_ID)),
    _Spec(0x5A, 2, _Fields.of(RelayJoined, observed=_Optional(_Text(MAX_ADDRESS_TEXT)))),
    _Spec(0x5B, 1, _Fields.of(RelayPong)),
    _Spec(0x1C, 1, _Fields.of(DirectConnect, addresses=_DIRECT_ADDRESSES)),
    _Spec(0x5C, 1, _Fields.of(DirectAddresses, addresses=_DIRECT_ADDRESSES)),
    _Spec(0x1D, 1, _Fields.of(DirectSync)),
    _Spec(0x5D, 1, _Fields.of(DirectReady)),
)

_BY_WIRE: dict[tuple[int, int], _Spec] = {(s.code, s.version): s for s in _SPECS}
_NAME_BY_CODE: dict[int, str] = {s.code: s.fields.cls.__name__ for s in _SPECS}
#: Encoders write the newest version of each message.
_BY_CLASS: dict[type, _Spec] = {s.fields.cls: s for s in sorted(_SPECS, key=lambda s: s.version)}
if len(_BY_WIRE) != len(_SPECS) or set(_BY_CLASS) != set(MESSAGE_TYPES):
    raise LocalProtocolError("messages: type codes reused, or a message class without a spec")

# The unpacker's own limits only stop absurd allocations early; the specs
# then apply the real bound of every field.
_UNPACK_LIMITS = {
    "max_bin_len": MAX_FRAME_SIZE,
    "max_str_len": 4 * MAX_REFUSAL_TEXT,
    "max_array_len": MAX_LIST_LIMIT + 2,
    "max_map_len": 0,
    "max_ext_len": 0,
}


# --- Bodies -----------------------------------------------------------------


def _reject_extension(code: int, data: bytes) -> object:
    raise ValueError(f"extension type {code} is not allowed")


def _pack_body(message: Message) -> Any:
    """A msgpack Packer holding the body, checked against every bound."""
    spec = _BY_CLASS.get(type(message))
    if spec is None:
        raise LocalProtocolError(f"not a message: {type(message).__name__}")
    try:
        values = spec.fields.encode_values(message, spec.name)
        problem = spec.check(message) if spec.check is not None else None
    except _Problem as exc:
        raise LocalProtocolError(f"cannot encode: {exc}") from None
    if problem is not None:
        raise LocalProtocolError(f"cannot encode: {spec.name}: {problem}")
    # autoreset=False keeps the body in the packer, which hands out a view of
    # it: a 1 MiB piece is copied once into the packer and once into the frame.
    packer = msgpack.Packer(use_bin_type=True, autoreset=False)
    packer.pack([spec.code, spec.version, *values])
    size = len(packer.getbuffer())
    if size > MAX_FRAME_SIZE:
        raise LocalProtocolError(
            f"cannot encode: {spec.name} needs {size} bytes, over the frame limit "
            f"of {MAX_FRAME_SIZE}"
        )
    return packer


def encode_message(message: Message) -> bytes:
    """The body of ``message`` (no length prefix)."""
    return bytes(_pack_body(message).getbuffer())


def encode_frame(message: Message) -> bytes:
    """Length prefix and body of ``message``, ready for the session."""
    packer = _pack_body(message)
    with packer.getbuffer() as body:
        return b"".join((length_prefix(len(body), LENGTH_PREFIX_SIZE), body))


def piece_frame_head(length: int) -> bytes:
    """The bytes before the data in the frame of a ``length``-byte :class:`ShardPiece`.

    ``piece_frame_head(len(data)) + data == encode_frame(ShardPiece(data))``:
    a sender can hand the session the head and a view of the shard, and the
    piece is never copied into a frame of its own.
    """
    if not 1 <= length <= PIECE_SIZE:
        raise LocalProtocolError(
            f"cannot encode: a piece holds 1 to {PIECE_SIZE} bytes, not {length}"
        )
    spec = _BY_CLASS[ShardPiece]
    # msgpack's smallest bin header for the length, as the packer would write it.
    if length < 1 << 8:
        bin_head = struct.pack(">BB", 0xC4, length)
    elif length < 1 << 16:
        bin_head = struct.pack(">BH", 0xC5, length)
    else:
        bin_head = struct.pack(">BI", 0xC6, length)
    packed: bytes = msgpack.packb([spec.code, spec.version], use_bin_type=True)
    # [code, version] became a 2-item array; the piece makes it 3 (fixarray).
    body_head = bytes([packed[0] + 1]) + packed[1:] + bin_head
    return length_prefix(len(body_head) + length, LENGTH_PREFIX_SIZE) + body_head


def encode_frames(messages: Sequence[Message]) -> bytes:
    """Several frames back to back (for one send of a short exchange)."""
    return b"".join(encode_frame(message) for message in messages)


def decode_message(body: BytesLike) -> Message:
    """The message in one frame body; RemoteProtocolError for anything else."""
    try:
        return _decode(body)
    except _Problem as exc:
        raise RemoteProtocolError(str(exc)) from None


def _decode(body: BytesLike) -> Message:
    if len(body) > MAX_FRAME_SIZE:
        raise _Problem(f"message of {len(body)} bytes exceeds the limit of {MAX_FRAME_SIZE}")
    try:
        value = msgpack.unpackb(
            body, use_list=False, raw=False, ext_hook=_reject_extension, **_UNPACK_LIMITS
        )
    except msgpack.ExtraData:
        raise _Problem("trailing bytes after the message body") from None
    # Hostile bytes make the unpacker fail in many ways (truncation, bad UTF-8,
    # a reserved type byte, nesting too deep, a limit); to the caller they are
    # one thing: a body that does not parse.
    except Exception as exc:
        raise _Problem(f"malformed message body ({type(exc).__name__}: {exc})") from None
    items = _check.array(value, "message")
    if len(items) < 2:
        raise _Problem(f"message: {len(items)} items, expected a type code and a version first")
    code = _check.integer(items[0], "message type code")
    version = _check.integer(items[1], "message version")
    fields = items[2:]
    spec = _BY_WIRE.get((code, version))
    if spec is None:
        name = _NAME_BY_CODE.get(code)
        if name is None:
            raise _Problem(f"unknown message type {code}")
        raise _Problem(f"{name}: unknown version {version}")
    message: Message = spec.fields.decode_values(fields, spec.name)
    if spec.check is not None and (problem := spec.check(message)) is not None:
        raise _Problem(f"{spec.name}: {problem}")
    return message


# --- Frames -----------------------------------------------------------------


class FrameDecoder:
    """Messages from a byte stream, fed in pieces of any size (h11-style).

    ``feed`` what the stream delivered, then call ``next_message`` until it
    returns None (it needs more bytes). The first protocol error breaks the
    decoder for good: every later call raises again, since the stream can no
    longer be trusted to be at a frame boundary.
    """

    def __init__(self) -> None:
        self._frames = FrameReader(
            prefix_size=LENGTH_PREFIX_SIZE, max_body_size=MAX_FRAME_SIZE, error=_Problem
        )
        self._error: str | None = None

    def feed(self, data: BytesLike) -> None:
        if self._error is None:
            self._frames.feed(data)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as messages."""
        return self._frames.buffered

    def take_buffered(self) -> bytes:
        """The bytes received beyond the last message returned, handed over
        (the decoder keeps none): the stream is someone else's from here."""
        frames = self._frames
        rest = bytes(frames.buffer)
        frames.consume(len(rest))
        return rest

    def at_frame_boundary(self) -> bool:
        """True when no partial frame is buffered: an end of stream here is clean."""
        return self.buffered == 0

    def next_message(self) -> Message | None:
        """The next whole message, or None if more bytes are needed."""
        if self._error is not None:
            raise RemoteProtocolError(f"stream already broken: {self._error}")
        try:
            return self._next()
        except _Problem as exc:
            self._error = str(exc)
            raise RemoteProtocolError(self._error) from None

    def _next(self) -> Message | None:
        frames = self._frames
        span = frames.next_frame()
        if span is None:
            return None
        start, end = span
        # Decoded in place; the views must be released before the buffer
        # changes size again.
        with memoryview(frames.buffer) as view, view[start:end] as body:
            message = _decode(body)
        frames.consume(end)
        return message


# --- Owner statements ---------------------------------------------------------

# Domain, version and operation come first and end in NUL, so that no
# statement of one operation (or of any other signed object of this key)
# is a statement of another; every field after them has a fixed width or a
# count, so that no two different requests share their bytes.
_STATEMENT_DOMAIN = b"p2pbackup storage v%d\x00" % PROTOCOL_VERSION
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_HOST_ID = _NODE_ID


def _statement_field(kind: _Kind, value: object, what: str) -> None:
    try:
        kind.encode(value, what)
    except _Problem as exc:
        raise LocalProtocolError(f"cannot build statement: {exc}") from None


def put_statement(
    host_id: bytes, shard_id: bytes, size: int, merkle_root: bytes, lease_seconds: int
) -> bytes:
    """What an owner signs to let host ``host_id`` store one shard."""
    _statement_field(_HOST_ID, host_id, "put: host id")
    _statement_field(_SHARD_ID, shard_id, "put: shard id")
    _statement_field(_SHARD_SIZE, size, "put: size")
    _statement_field(_HASH, merkle_root, "put: Merkle root")
    _statement_field(_LEASE_SECONDS, lease_seconds, "put: lease")
    return b"".join(
        (
            _STATEMENT_DOMAIN,
            b"put\x00",
            host_id,
            shard_id,
            _U64.pack(size),
            merkle_root,
            _U64.pack(lease_seconds),
        )
    )


def renew_statement(host_id: bytes, shard_ids: Sequence[bytes], lease_seconds: int) -> bytes:
    """What an owner signs to let host ``host_id`` extend these shards' leases."""
    ids = tuple(shard_ids)
    _statement_field(_HOST_ID, host_id, "renew: host id")
    _statement_field(_Array(_SHARD_ID, 1, MAX_RENEW_SHARDS), ids, "renew: shard ids")
    _statement_field(_LEASE_SECONDS, lease_seconds, "renew: lease")
    return b"".join(
        (
            _STATEMENT_DOMAIN,
            b"renew\x00",
            host_id,
            _U32.pack(len(ids)),
            *ids,
            _U64.pack(lease_seconds),
        )
    )


def delete_statement(host_id: bytes, shard_id: bytes) -> bytes:
    """What an owner signs to let host ``host_id`` delete one shard."""
    _statement_field(_HOST_ID, host_id, "delete: host id")
    _statement_field(_SHARD_ID, shard_id, "delete: shard id")
    return b"".join((_STATEMENT_DOMAIN, b"delete\x00", host_id, shard_id))


def delete_all_statement(host_id: bytes) -> bytes:
    """What an owner signs to let host ``host_id`` delete everything it keeps
    for the owner: its shards and its root record."""
    _statement_field(_HOST_ID, host_id, "delete all: host id")
    return b"".join((_STATEMENT_DOMAIN, b"delete-all\x00", host_id))
