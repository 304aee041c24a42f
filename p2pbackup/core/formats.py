"""Byte layouts of every persisted or replicated structure.

Nouns:

* **format** — one structure's byte layout: a 4-byte **magic** naming what
  the bytes are, a 1-byte **version**, then a **body**.
* **binary format** — a fixed ``struct`` layout (the shard header, which a
  holder reads without any library beyond ``struct``) or a length-prefixed
  layout (the signed envelope).
* **msgpack format** — the body is one msgpack array holding the model
  class's fields in declaration order; nested classes are nested arrays, enums
  are their integer values, ``None`` is nil, names and ids are bin, text is
  str. Every msgpack format is **canonical**: encoding is deterministic (blob
  ids are hashes of these bytes) and a decoder accepts only the exact bytes its
  encoder would produce for the value it returns.
* **limit** — a bound on a size or count (the ``MAX_*`` constants below), so
  that hostile bytes can neither make a reader allocate absurd memory nor slip
  nonsense into the index.

Magics: ``P2PS`` shard header, ``P2PP`` pack header, ``P2PT`` tree, ``P2PN``
snapshot, ``P2PI`` index segment, ``P2PR`` root record, ``P2PE`` signed
envelope, ``P2PC`` delegation certificate, ``P2PG`` repair grant, ``P2PL``
repair log.

Decoders raise :class:`~p2pbackup.errors.FormatError`, and nothing else, on
any input, with a message that starts with the format's name ("tree: unknown
version 7"); :mod:`p2pbackup.core.fields` checks each field. Encoders
refuse, with the same errors, any value their decoder would reject, so
nothing unreadable is ever written.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from collections.abc import Callable
from typing import TypeVar

import attrs
import msgpack

from p2pbackup.core.crypto import PUBLIC_KEY_SIZE, SIGNATURE_SIZE
from p2pbackup.core.fields import FieldChecks
from p2pbackup.core.keys import node_id_for
from p2pbackup.errors import FormatError
from p2pbackup.model import (
    ID_SIZE,
    INSTANCE_ID_SIZE,
    MAX_SHARDS,
    NODE_ID_SIZE,
    BlobEntry,
    BlobType,
    BytesLike,
    DelegationCertificate,
    FriendRecord,
    GrantPack,
    GrantPeer,
    GrantShard,
    IndexSegment,
    LogEntry,
    NodeKind,
    PackHeader,
    PackRecord,
    PeerRecord,
    RepairGrant,
    RepairLog,
    RepositoryConfig,
    RootRecord,
    ShardHeader,
    ShardLocation,
    Snapshot,
    Tree,
    TreeNode,
)

_T = TypeVar("_T")

# --- Limits -----------------------------------------------------------------

#: Integers are stored in SQLite, whose integers are signed 64-bit: from
#: MIN_INT to :data:`p2pbackup.core.fields.MAX_UINT`.
MIN_INT = -(1 << 63)
#: uid, gid and mode are 32-bit on every platform we back up.
MAX_U32 = (1 << 32) - 1
#: Largest pack (and so largest erasure-coded unit).
MAX_PACK_SIZE = 1 << 30
#: Merkle block sizes allowed in shard headers and records (powers of two).
MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 1 << 20
#: Largest plaintext of one blob (compression lets it exceed its sealed length).
MAX_BLOB_RAW_LENGTH = 1 << 32
#: Largest content-defined chunk a repository may be configured for.
MAX_CHUNK_SIZE = 64 << 20
#: One path component; names longer than this are refused.
MAX_NAME_LENGTH = 4096
#: A symlink target (Linux PATH_MAX).
MAX_LINK_TARGET_LENGTH = 4096
#: One backed-up path named in a snapshot.
MAX_PATH_LENGTH = 65536
#: Host names, peer ids, peer kinds and locations.
MAX_TEXT_LENGTH = 4096
#: One snapshot tag.
MAX_TAG_LENGTH = 256
#: Entries in one directory.
MAX_TREE_NODES = 1 << 20
#: Chunks of one file (16 TiB at a 1 MiB average chunk).
MAX_FILE_CHUNKS = 1 << 24
#: Extended attributes of one entry, and the sizes Linux allows each name
#: (XATTR_NAME_MAX) and value (XATTR_SIZE_MAX).
MAX_XATTRS = 1024
MAX_XATTR_NAME_LENGTH = 255
MAX_XATTR_VALUE_LENGTH = 65536
#: Blobs in one pack.
MAX_PACK_BLOBS = 1 << 20
#: Shard locations of one pack (repair may list an index on several peers).
MAX_SHARD_LOCATIONS = 4 * MAX_SHARDS
#: Pack records in one index segment.
MAX_SEGMENT_PACKS = 1 << 20
#: Paths and tags of one snapshot.
MAX_SNAPSHOT_PATHS = 1 << 16
MAX_SNAPSHOT_TAGS = 1024
#: Peers, index packs and snapshots named by one root record.
MAX_PEERS = 4096
#: The most delegates a root record names (a grant names them all too).
MAX_ROOT_DELEGATES = 64
#: Addresses kept per friend (the invite's, and ones found since).
MAX_FRIEND_ADDRESSES = 8
MAX_ROOT_INDEX_PACKS = 1 << 16
MAX_ROOT_SNAPSHOTS = 1 << 16
#: Payload of one signed envelope.
MAX_ENVELOPE_PAYLOAD = 64 << 20
#: Longest a delegation certificate may be valid: a year. An owner renews
#: its certificates with every grant it hands out, so they can be short.
MAX_CERTIFICATE_LIFETIME = 366 * 86400
#: Packs one repair grant names (as many as one index segment holds).
MAX_GRANT_PACKS = MAX_SEGMENT_PACKS

# --- Magics and versions ----------------------------------------------------

SHARD_HEADER_MAGIC = b"P2PS"
PACK_HEADER_MAGIC = b"P2PP"
TREE_MAGIC = b"P2PT"
SNAPSHOT_MAGIC = b"P2PN"
INDEX_SEGMENT_MAGIC = b"P2PI"
ROOT_RECORD_MAGIC = b"P2PR"
ENVELOPE_MAGIC = b"P2PE"
CERTIFICATE_MAGIC = b"P2PC"
GRANT_MAGIC = b"P2PG"
LOG_MAGIC = b"P2PL"
#: The version of every format that has had only one.
FORMAT_VERSION = 1
#: Shard headers: 1 named the pack in clear; 2 (written now) does not.
SHARD_HEADER_VERSION = 2
#: Repair logs: 2 (written now) adds when the delegate last acted.
LOG_VERSION = 2
#: Root records: 1 had six or seven fields; 2 adds the writing home's
#: instance id and may be padded with zeros; 3 the settings and peer names;
#: 4 (written now) the delegates.
ROOT_RECORD_VERSION = 4
#: The most bytes of ``config.toml`` a root record carries.
MAX_ROOT_SETTINGS = 64 * 1024
#: The longest name of a peer (``peer rename``).
MAX_PEER_NAME = 32
#: Trees: version 2 adds fifos and devices (with ``rdev``) and extended
#: attributes. A tree that needs none of them is still written as version 1,
#: so an unchanged directory keeps its tree id across the upgrade.
TREE_VERSION = 2
_TREE_VERSIONS = (FORMAT_VERSION, TREE_VERSION)
#: Node kinds a version-1 tree can hold.
_V1_KINDS = frozenset({NodeKind.FILE, NodeKind.DIR, NodeKind.SYMLINK})

_MAGIC_NAMES = {
    SHARD_HEADER_MAGIC: "shard header",
    PACK_HEADER_MAGIC: "pack header",
    TREE_MAGIC: "tree",
    SNAPSHOT_MAGIC: "snapshot",
    INDEX_SEGMENT_MAGIC: "index segment",
    ROOT_RECORD_MAGIC: "root record",
    ENVELOPE_MAGIC: "signed envelope",
    CERTIFICATE_MAGIC: "delegation certificate",
    GRANT_MAGIC: "repair grant",
    LOG_MAGIC: "repair log",
}
_PREFIX_SIZE = 5

# --- Errors and prefix ------------------------------------------------------


#: The checks of decoded fields, raising FormatError.
_check = FieldChecks(FormatError)
_fail = _check.fail


def _check_prefix(
    what: str,
    data: bytes,
    magic: bytes,
    minimum: int,
    versions: tuple[int, ...] = (FORMAT_VERSION,),
) -> None:
    """Magic, then version (one of ``versions``), then length: the order in
    which a reader cares."""
    if len(data) >= 4 and data[:4] != magic:
        got = data[:4]
        known = _MAGIC_NAMES.get(got)
        hint = f" (that is a {known})" if known else ""
        _fail(what, f"bad magic {got!r}, expected {magic!r}{hint}")
    if len(data) >= _PREFIX_SIZE and data[4] not in versions:
        _fail(what, f"unknown version {data[4]}")
    if len(data) < minimum:
        _fail(what, f"truncated (got {len(data)} of {minimum} bytes)")


# --- Shard header (fixed binary layout) -------------------------------------

# magic, version, index, k, n, pack_size, shard_size, block_size, reserved,
# pack_id. Big-endian, no implicit padding. Version 2 has the same 64 bytes
# with the pack id's place zero: a shard's header names no pack, so that
# shards of one pack on different peers cannot be matched up (the pack id is
# a secret of the owner's; shard ids are hashes of it, docs/privacy.md).
_SHARD_HEADER = struct.Struct(">4sBBBBQQI4s32s")
#: Bytes in front of every stored shard's data (either version).
SHARD_HEADER_SIZE = _SHARD_HEADER.size
_RESERVED = bytes(4)
_NO_PACK_ID = bytes(ID_SIZE)


def encode_shard_header(header: ShardHeader) -> bytes:
    """Version 2, or version 1 for a header that names its pack (as shards
    written before did)."""
    what = "shard header"
    if header.pack_id is None:
        version, pack_id = SHARD_HEADER_VERSION, _NO_PACK_ID
    else:
        # struct would silently pad a short id with zeros or cut a long one.
        version, pack_id = 1, _id(header.pack_id, f"{what}: pack id")
    try:
        data = _SHARD_HEADER.pack(
            SHARD_HEADER_MAGIC,
            version,
            header.index,
            header.k,
            header.n,
            header.pack_size,
            header.shard_size,
            header.block_size,
            _RESERVED,
            pack_id,
        )
    except struct.error as exc:
        _fail(what, f"cannot encode ({exc})")
    return _checked(data, decode_shard_header)


def decode_shard_header(buf: BytesLike) -> ShardHeader:
    """Header from the first :data:`SHARD_HEADER_SIZE` bytes of ``buf``."""
    what = "shard header"
    data = bytes(memoryview(buf)[:SHARD_HEADER_SIZE])
    _check_prefix(what, data, SHARD_HEADER_MAGIC, SHARD_HEADER_SIZE, (1, SHARD_HEADER_VERSION))
    (_, version, index, k, n, pack_size, shard_size, block_size, reserved, pack_id) = (
        _SHARD_HEADER.unpack(data)
    )
    if reserved != _RESERVED or (version == SHARD_HEADER_VERSION and pack_id != _NO_PACK_ID):
        _fail(what, "reserved bytes are not zero")
    _check_geometry(what, size=pack_size, k=k, n=n, shard_size=shard_size, block_size=block_size)
    _check_shard_index(what, index, n)
    return ShardHeader(
        pack_id=pack_id if version == 1 else None,
        index=index,
        k=k,
        n=n,
        pack_size=pack_size,
        shard_size=shard_size,
        block_size=block_size,
    )


# --- Shard ids --------------------------------------------------------------

_SHARD_ID_PERSON = b"p2pb-shard-id"


def shard_id(pack_id: bytes, index: int) -> bytes:
    """The 32-byte id under which shard ``index`` of a pack is stored on a peer.

    A hash rather than ``pack_id + index`` gives every store one fixed-size
    key, and the personalisation keeps it from ever equalling a pack, blob or
    tree id (a holder must not be able to pass off one object as another).
    """
    if len(pack_id) != ID_SIZE:
        raise ValueError(f"pack id must be {ID_SIZE} bytes, got {len(pack_id)}")
    if not 0 <= index < MAX_SHARDS:
        raise ValueError(f"shard index must be in [0, {MAX_SHARDS - 1}], got {index}")
    hasher = hashlib.blake2b(digest_size=ID_SIZE, person=_SHARD_ID_PERSON)
    hasher.update(pack_id)
    hasher.update(bytes([index]))
    return hasher.digest()


def shard_id_hex(pack_id: bytes, index: int) -> str:
    return shard_id(pack_id, index).hex()


def parse_id_hex(text: str, *, what: str = "id") -> bytes:
    """A 32-byte id from its 64 lowercase hex digits (as file names carry it)."""
    if len(text) != 2 * ID_SIZE or text != text.lower():
        _fail(what, f"expected {2 * ID_SIZE} lowercase hex digits, got {text[:80]!r}")
    try:
        return bytes.fromhex(text)
    except ValueError:
        _fail(what, f"not hexadecimal: {text[:80]!r}")


# --- Signed envelope (length-prefixed binary layout) ------------------------

#: Envelope kind of a root record replicated to peers.
ENVELOPE_KIND_ROOT = b"ROOT"

# magic, version, kind, signer public key, payload length; then the payload,
# then the signature.
_ENVELOPE_HEAD = struct.Struct(">4sB4s32sI")
_ENVELOPE_DOMAIN = b"p2pbackup signed envelope\x00"


@attrs.frozen
class SignedEnvelope:
    """A payload, the kind of thing it is, who signed it and the signature."""

    kind: bytes
    signer_public_key: bytes
    payload: bytes
    signature: bytes

    def signed_bytes(self) -> bytes:
        return envelope_signed_bytes(self.kind, self.signer_public_key, self.payload)


def envelope_signed_bytes(kind: bytes, signer_public_key: bytes, payload: bytes) -> bytes:
    """Exactly the bytes the signer signs.

    A domain prefix keeps an envelope signature from ever verifying as a
    signature over some other message the same key signs (DHT records, RPCs);
    the head binds kind, key, version and length along with the payload.
    """
    return _ENVELOPE_DOMAIN + _envelope_head(kind, signer_public_key, payload) + payload


def encode_signed_envelope(
    kind: bytes, signer_public_key: bytes, payload: bytes, signature: bytes
) -> bytes:
    head = _envelope_head(kind, signer_public_key, payload)
    if len(signature) != SIGNATURE_SIZE:
        _fail("signed envelope", f"signature must be {SIGNATURE_SIZE} bytes, got {len(signature)}")
    return head + bytes(payload) + bytes(signature)


def decode_signed_envelope(data: BytesLike) -> SignedEnvelope:
    what = "signed envelope"
    raw = bytes(data)
    _check_prefix(what, raw, ENVELOPE_MAGIC, _ENVELOPE_HEAD.size + SIGNATURE_SIZE)
    _, _, kind, key, length = _ENVELOPE_HEAD.unpack_from(raw)
    if length > MAX_ENVELOPE_PAYLOAD:
        _fail(what, f"payload of {length} bytes exceeds the limit of {MAX_ENVELOPE_PAYLOAD}")
    expected = _ENVELOPE_HEAD.size + length + SIGNATURE_SIZE
    if len(raw) < expected:
        _fail(what, f"truncated (got {len(raw)} of {expected} bytes)")
    if len(raw) > expected:
        _fail(what, f"{len(raw) - expected} trailing bytes")
    start = _ENVELOPE_HEAD.size
    return SignedEnvelope(
        kind=kind,
        signer_public_key=key,
        payload=raw[start : start + length],
        signature=raw[start + length :],
    )


def _envelope_head(kind: bytes, signer_public_key: bytes, payload: bytes) -> bytes:
    what = "signed envelope"
    if len(kind) != 4:
        _fail(what, f"kind must be 4 bytes, got {len(kind)}")
    if len(signer_public_key) != PUBLIC_KEY_SIZE:
        _fail(what, f"public key must be {PUBLIC_KEY_SIZE} bytes, got {len(signer_public_key)}")
    if len(payload) > MAX_ENVELOPE_PAYLOAD:
        _fail(what, f"payload of {len(payload)} bytes exceeds the limit of {MAX_ENVELOPE_PAYLOAD}")
    return _ENVELOPE_HEAD.pack(
        ENVELOPE_MAGIC, FORMAT_VERSION, bytes(kind), bytes(signer_public_key), len(payload)
    )


# --- msgpack plumbing -------------------------------------------------------


def _checked(data: bytes, decode: Callable[[bytes], object]) -> bytes:
    """Encoded bytes, after proving that the decoder accepts them."""
    decode(data)
    return data


def _seal(what: str, magic: bytes, body: object, version: int = FORMAT_VERSION) -> bytes:
    try:
        packed = msgpack.packb(body, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        _fail(what, f"cannot encode ({exc})")
    assert isinstance(packed, bytes)
    return magic + bytes([version]) + packed


def _open(
    what: str,
    data: BytesLike,
    magic: bytes,
    build: Callable[[object, str], _T],
    versions: tuple[int, ...] = (FORMAT_VERSION,),
    *,
    padded: tuple[int, ...] = (),
) -> _T:
    """Check the prefix, unpack the body with limits, build and check canonical
    form. In the versions listed in ``padded`` the body may be followed by
    zero bytes (padding); in the others, by nothing."""
    raw = bytes(data)
    _check_prefix(what, raw, magic, _PREFIX_SIZE, versions)
    body = raw[_PREFIX_SIZE:]
    unpacked, used = _unpack(what, body, padded=raw[4] in padded)
    value = build(unpacked, what)
    # Any encoding of the same msgpack value other than ours (a wider int, a
    # str8 where fixstr fits) would give one value two blob ids.
    if msgpack.packb(unpacked, use_bin_type=True) != body[:used]:
        _fail(what, "body is not in canonical encoding")
    return value


def _unpack(what: str, body: bytes, *, padded: bool = False) -> tuple[object, int]:
    """The msgpack value at the start of ``body`` and the bytes it took."""
    # No container or string can hold more items than the body has bytes, so
    # bounding every length by the body's size stops a 5-byte header from
    # claiming a 4-billion-item array.
    limit = len(body)
    unpacker = msgpack.Unpacker(
        None,
        max_buffer_size=max(1, limit),
        use_list=False,
        raw=False,
        strict_map_key=True,
        max_bin_len=limit,
        max_str_len=limit,
        max_array_len=limit,
        max_map_len=0,
        max_ext_len=0,
    )
    unpacker.feed(body)
    try:
        value: object = unpacker.unpack()
    except msgpack.OutOfData:
        _fail(what, "truncated body")
    # Hostile bytes can make the unpacker fail in many ways (bad UTF-8, a
    # reserved type byte, nesting too deep, a map key type); all of them are
    # one thing to the caller: a body that does not parse.
    except Exception as exc:
        _fail(what, f"malformed body ({type(exc).__name__}: {exc})")
    used = unpacker.tell()
    trailing = len(body) - used
    if trailing and not padded:
        _fail(what, f"{trailing} trailing bytes after the body")
    if padded and body[used:].count(0) != trailing:
        _fail(what, "padding after the body is not zero")
    return value, used


def _id(value: object, what: str) -> bytes:
    return _check.binary(value, what, min_length=ID_SIZE, max_length=ID_SIZE)


def _no_nul(value: bytes, what: str) -> bytes:
    if b"\x00" in value:
        _fail(what, "contains a NUL byte")
    return value


# --- Shared semantic checks -------------------------------------------------


def _check_code(what: str, k: int, n: int) -> None:
    if not 1 <= k < n <= MAX_SHARDS:
        _fail(what, f"erasure code k={k}, n={n} is not 1 <= k < n <= {MAX_SHARDS}")


def _check_shard_index(what: str, index: int, n: int) -> None:
    if not 0 <= index < n:
        _fail(what, f"shard index {index} is not below n={n}")


def _check_block_size(what: str, block_size: int) -> None:
    power_of_two = block_size & (block_size - 1) == 0
    if not (MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE and power_of_two):
        _fail(
            what,
            f"block size {block_size} is not a power of two in "
            f"[{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}]",
        )


def _check_geometry(
    what: str, *, size: int, k: int, n: int, shard_size: int, block_size: int
) -> None:
    """Code parameters, pack size and shard size that the erasure code agrees with."""
    _check_code(what, k, n)
    if size > MAX_PACK_SIZE:
        _fail(what, f"pack size {size} exceeds the limit of {MAX_PACK_SIZE}")
    # erasure pads a pack to k * ceil(size / k) before splitting it.
    expected = -(-size // k)
    if shard_size != expected:
        _fail(
            what,
            f"shard size {shard_size} does not fit pack size {size} with k={k} "
            f"(expected {expected})",
        )
    _check_block_size(what, block_size)


def _check_name(value: object, what: str) -> bytes:
    """A directory entry name that cannot lead a restore outside its target."""
    name = _check.binary(value, what, min_length=1, max_length=MAX_NAME_LENGTH)
    if name in (b".", b".."):
        _fail(what, f"{name!r} is not allowed")
    if b"/" in name:
        _fail(what, f"{name!r} contains '/'")
    return _no_nul(name, what)


# --- Blob entries and pack headers -------------------------------------------


def _blob_entry_body(entry: BlobEntry) -> tuple[object, ...]:
    return (int(entry.type), entry.blob_id, entry.offset, entry.length, entry.raw_length)


def _blob_entry(value: object, what: str, *, pack_size: int = MAX_PACK_SIZE) -> BlobEntry:
    type_, blob_id, offset, length, raw_length = _check.fields(value, what, 5)
    entry = BlobEntry(
        type=_check.member(BlobType, type_, f"{what}: type"),
        blob_id=_id(blob_id, f"{what}: blob id"),
        offset=_check.integer(offset, f"{what}: offset", high=MAX_PACK_SIZE),
        length=_check.integer(length, f"{what}: length", high=MAX_PACK_SIZE),
        raw_length=_check.integer(raw_length, f"{what}: raw length", high=MAX_BLOB_RAW_LENGTH),
    )
    if entry.offset + entry.length > pack_size:
        _fail(what, f"bytes {entry.offset}+{entry.length} run past the pack's {pack_size}")
    return entry


def encode_pack_header(header: PackHeader) -> bytes:
    body = (tuple(_blob_entry_body(e) for e in header.entries),)
    return _checked(_seal("pack header", PACK_HEADER_MAGIC, body), decode_pack_header)


def decode_pack_header(data: BytesLike) -> PackHeader:
    return _open("pack header", data, PACK_HEADER_MAGIC, _pack_header)


def _pack_header(value: object, what: str) -> PackHeader:
    (entries,) = _check.fields(value, what, 1)
    return PackHeader(
        entries=_check.items(entries, f"{what}: entry", _blob_entry, max_length=MAX_PACK_BLOBS)
    )


# --- Trees ------------------------------------------------------------------


def _tree_version(tree: Tree) -> int:
    """The lowest tree version that can hold every node of ``tree``."""
    for node in tree.nodes:
        if node.kind not in _V1_KINDS or node.rdev or node.xattrs:
            return TREE_VERSION
    return FORMAT_VERSION


def _tree_node_body(node: TreeNode, version: int) -> tuple[object, ...]:
    body = (
        node.name,
        int(node.kind),
        node.mode,
        node.mtime_ns,
        node.size,
        tuple(node.content),
        node.subtree,
        node.link_target,
        node.uid,
        node.gid,
        node.hardlink_group,
    )
    if version == FORMAT_VERSION:
        return body
    return (*body, node.rdev, tuple((name, value) for name, value in node.xattrs))


def _tree_node(value: object, what: str, version: int) -> TreeNode:
    fields = _check.fields(value, what, 11 if version == FORMAT_VERSION else 13)
    name = _check_name(fields[0], f"{what}: name")
    try:
        return _tree_node_fields(name, fields, version)
    except FormatError as exc:
        # The fields are checked under their bare names; the node's place and
        # (printable) name, easier to find, are written only into a problem:
        # a restore decodes tens of thousands of nodes that have none.
        raise FormatError(f"{what} ({name[:80]!r}): {exc}") from None


def _tree_node_fields(name: bytes, fields: tuple[object, ...], version: int) -> TreeNode:
    node = TreeNode(
        name=name,
        kind=_check.member(NodeKind, fields[1], "kind"),
        mode=_check.integer(fields[2], "mode", high=MAX_U32),
        mtime_ns=_check.integer(fields[3], "mtime", low=MIN_INT),
        size=_check.integer(fields[4], "size"),
        content=_check.items(fields[5], "chunk", _id, max_length=MAX_FILE_CHUNKS),
        subtree=_check.optional(fields[6], "subtree", _id),
        link_target=_check.optional(fields[7], "link target", _link_target),
        uid=_check.integer(fields[8], "uid", high=MAX_U32),
        gid=_check.integer(fields[9], "gid", high=MAX_U32),
        hardlink_group=_check.integer(fields[10], "hardlink group"),
    )
    if version != FORMAT_VERSION:
        node = attrs.evolve(
            node,
            rdev=_check.integer(fields[11], "device number"),
            xattrs=_xattrs(fields[12], "extended attribute"),
        )
    elif node.kind not in _V1_KINDS:
        raise FormatError(f"a version 1 tree holds no {node.kind.name.lower()}")
    problem = _node_kind_problem(node)
    if problem is not None:
        raise FormatError(problem)
    return node


def _xattrs(value: object, what: str) -> tuple[tuple[bytes, bytes], ...]:
    pairs = _check.items(value, what, _xattr, max_length=MAX_XATTRS)
    for previous, pair in itertools.pairwise(pairs):
        if pair[0] <= previous[0]:
            problem = "duplicated" if pair[0] == previous[0] else "out of order"
            _fail(what, f"name {pair[0][:80]!r} is {problem}")
    return pairs


def _xattr(value: object, what: str) -> tuple[bytes, bytes]:
    name, data = _check.fields(value, what, 2)
    name = _no_nul(
        _check.binary(name, f"{what}: name", min_length=1, max_length=MAX_XATTR_NAME_LENGTH),
        f"{what}: name",
    )
    return name, _check.binary(data, f"{what}: value", max_length=MAX_XATTR_VALUE_LENGTH)


def _link_target(value: object, what: str) -> bytes:
    target = _check.binary(value, what, min_length=1, max_length=MAX_LINK_TARGET_LENGTH)
    return _no_nul(target, what)


def _node_kind_problem(node: TreeNode) -> str | None:
    """What a node holds that its kind does not, if anything."""
    kind = node.kind.name.lower()
    if node.kind is not NodeKind.FILE and node.content:
        return f"a {kind} has no content chunks"
    if (node.kind is NodeKind.DIR) != (node.subtree is not None):
        return "a directory, and only a directory, has a subtree"
    if (node.kind is NodeKind.SYMLINK) != (node.link_target is not None):
        return "a symlink, and only a symlink, has a link target"
    if node.rdev and node.kind not in (NodeKind.CHARDEV, NodeKind.BLOCKDEV):
        return f"a {kind} has no device number"
    return None


def encode_tree(tree: Tree, *, checked: bool = True) -> bytes:
    """A tree's bytes; ``checked=False`` leaves out the proof that they
    decode, for a backup that proves it only of the trees it stores (an
    unchanged directory's tree is stored already, and was proved then)."""
    version = _tree_version(tree)
    body = (tuple(_tree_node_body(node, version) for node in tree.nodes),)
    encoded = _seal("tree", TREE_MAGIC, body, version)
    return _checked(encoded, decode_tree) if checked else encoded


def decode_tree(data: BytesLike) -> Tree:
    raw = bytes(data)
    version = raw[4] if len(raw) > 4 else FORMAT_VERSION

    def build(value: object, what: str) -> Tree:
        return _tree(value, what, version)

    return _open("tree", raw, TREE_MAGIC, build, _TREE_VERSIONS)


def _tree(value: object, what: str, version: int) -> Tree:
    (nodes,) = _check.fields(value, what, 1)

    def build_node(item: object, where: str) -> TreeNode:
        return _tree_node(item, where, version)

    tree = Tree(nodes=_check.items(nodes, f"{what}: node", build_node, max_length=MAX_TREE_NODES))
    if version != FORMAT_VERSION and _tree_version(tree) == FORMAT_VERSION:
        _fail(what, f"version {version} for a tree that version {FORMAT_VERSION} holds")
    for previous, node in zip(tree.nodes, tree.nodes[1:], strict=False):
        if node.name <= previous.name:
            problem = "duplicated" if node.name == previous.name else "out of order"
            _fail(what, f"name {node.name[:80]!r} is {problem}")
    return tree


# --- Snapshots --------------------------------------------------------------


def encode_snapshot(snapshot: Snapshot) -> bytes:
    body = (
        snapshot.time_ns,
        snapshot.hostname,
        tuple(snapshot.paths),
        tuple(snapshot.tags),
        snapshot.tree,
        snapshot.file_count,
        snapshot.total_size,
    )
    return _checked(_seal("snapshot", SNAPSHOT_MAGIC, body), decode_snapshot)


def decode_snapshot(data: BytesLike) -> Snapshot:
    return _open("snapshot", data, SNAPSHOT_MAGIC, _snapshot)


def _snapshot(value: object, what: str) -> Snapshot:
    time_ns, hostname, paths, tags, tree, file_count, total_size = _check.fields(value, what, 7)
    return Snapshot(
        time_ns=_check.integer(time_ns, f"{what}: time"),
        hostname=_check.text(hostname, f"{what}: hostname", max_length=MAX_TEXT_LENGTH),
        paths=_check.items(paths, f"{what}: path", _snapshot_path, max_length=MAX_SNAPSHOT_PATHS),
        tags=_check.items(tags, f"{what}: tag", _tag, max_length=MAX_SNAPSHOT_TAGS),
        tree=_id(tree, f"{what}: tree"),
        file_count=_check.integer(file_count, f"{what}: file count"),
        total_size=_check.integer(total_size, f"{what}: total size"),
    )


def _snapshot_path(value: object, what: str) -> bytes:
    return _no_nul(_check.binary(value, what, min_length=1, max_length=MAX_PATH_LENGTH), what)


def _tag(value: object, what: str) -> str:
    return _check.text(value, what, min_length=1, max_length=MAX_TAG_LENGTH)


# --- Pack records and index segments ----------------------------------------


def _pack_record_body(record: PackRecord) -> tuple[object, ...]:
    return (
        record.pack_id,
        record.size,
        record.k,
        record.n,
        record.shard_size,
        record.block_size,
        tuple((s.index, s.peer_id, s.merkle_root) for s in record.shards),
        tuple(_blob_entry_body(b) for b in record.blobs),
    )


def _pack_record(value: object, what: str) -> PackRecord:
    fields = _check.fields(value, what, 8)
    pack_id = _id(fields[0], f"{what}: pack id")
    what = f"{what} ({pack_id.hex()[:16]})"
    size = _check.integer(fields[1], f"{what}: size", high=MAX_PACK_SIZE)
    k = _check.integer(fields[2], f"{what}: k", high=MAX_SHARDS)
    n = _check.integer(fields[3], f"{what}: n", high=MAX_SHARDS)
    shard_size = _check.integer(fields[4], f"{what}: shard size", high=MAX_PACK_SIZE)
    block_size = _check.integer(fields[5], f"{what}: block size", high=MAX_BLOCK_SIZE)
    _check_geometry(what, size=size, k=k, n=n, shard_size=shard_size, block_size=block_size)

    def location(item: object, where: str) -> ShardLocation:
        return _shard_location(item, where, n=n)

    def blob(item: object, where: str) -> BlobEntry:
        return _blob_entry(item, where, pack_size=size)

    return PackRecord(
        pack_id=pack_id,
        size=size,
        k=k,
        n=n,
        shard_size=shard_size,
        block_size=block_size,
        shards=_check.items(fields[6], f"{what}: shard", location, max_length=MAX_SHARD_LOCATIONS),
        blobs=_check.items(fields[7], f"{what}: blob", blob, max_length=MAX_PACK_BLOBS),
    )


def _shard_location(value: object, what: str, *, n: int) -> ShardLocation:
    index, peer_id, merkle_root = _check.fields(value, what, 3)
    location = ShardLocation(
        index=_check.integer(index, f"{what}: index", high=MAX_SHARDS - 1),
        peer_id=_check.text(peer_id, f"{what}: peer id", min_length=1, max_length=MAX_TEXT_LENGTH),
        merkle_root=_id(merkle_root, f"{what}: Merkle root"),
    )
    _check_shard_index(what, location.index, n)
    return location


def encode_index_segment(segment: IndexSegment) -> bytes:
    body = (tuple(_pack_record_body(p) for p in segment.packs),)
    return _checked(_seal("index segment", INDEX_SEGMENT_MAGIC, body), decode_index_segment)


def decode_index_segment(data: BytesLike) -> IndexSegment:
    return _open("index segment", data, INDEX_SEGMENT_MAGIC, _index_segment)


def _index_segment(value: object, what: str) -> IndexSegment:
    (packs,) = _check.fields(value, what, 1)
    return IndexSegment(
        packs=_check.items(packs, f"{what}: pack", _pack_record, max_length=MAX_SEGMENT_PACKS)
    )


# --- Root records -----------------------------------------------------------


def encode_root_record(record: RootRecord, *, padded_size: int = 0) -> bytes:
    """Version 4 (with the home's settings, its peers' names and its
    delegates), followed
    by zeros up to ``padded_size`` bytes if it is longer: so that a record's
    size says little (docs/privacy.md). The one exception to canonical form:
    the same record, padded otherwise, is other bytes."""
    config = record.config
    body = (
        record.sequence,
        record.time_ns,
        (
            config.k,
            config.n,
            config.pack_size,
            config.chunk_min,
            config.chunk_avg,
            config.chunk_max,
            config.block_size,
        ),
        tuple((p.peer_id, p.kind, p.location) for p in record.peers),
        tuple(_pack_record_body(p) for p in record.index_packs),
        tuple(record.snapshots),
        tuple((f.node_id, f.public_key, f.addresses, f.added_at) for f in record.friends),
        record.instance,
        record.settings,
        tuple(record.names),
        tuple(record.delegates),
    )
    encoded = _seal("root record", ROOT_RECORD_MAGIC, body, ROOT_RECORD_VERSION)
    padding = bytes(max(0, padded_size - len(encoded)))
    return _checked(encoded + padding, decode_root_record)


def decode_root_record(data: BytesLike) -> RootRecord:
    """A root record of any version (version 1: no instance id, no padding;
    versions 1 and 2: no settings; versions 1 to 3: no delegates)."""
    raw = bytes(data)
    version = raw[4] if len(raw) > 4 else ROOT_RECORD_VERSION

    def build(value: object, what: str) -> RootRecord:
        return _root_record(value, what, version)

    versions = (1, 2, 3, ROOT_RECORD_VERSION)
    return _open("root record", raw, ROOT_RECORD_MAGIC, build, versions, padded=(2, 3, 4))


def _root_record(value: object, what: str, version: int) -> RootRecord:
    fields = _check.array(value, what)
    if version == 1:
        # Six fields: written before friends were part of the record; none
        # then. No instance id in either.
        if len(fields) == 6:
            fields = (*fields, ())
        fields = (*_check.fields(fields, what, 7), b"")
    if version in (1, 2):
        fields = (*_check.fields(fields, what, 8), b"", ())
    if version in (1, 2, 3):
        fields = (*_check.fields(fields, what, 10), ())
    (
        sequence,
        time_ns,
        config,
        peers,
        index_packs,
        snapshots,
        friends,
        instance,
        settings,
        names,
        delegates,
    ) = _check.fields(fields, what, 11)
    return RootRecord(
        sequence=_check.integer(sequence, f"{what}: sequence"),
        time_ns=_check.integer(time_ns, f"{what}: time"),
        config=_config(config, f"{what}: config"),
        peers=_check.items(peers, f"{what}: peer", _peer_record, max_length=MAX_PEERS),
        index_packs=_check.items(
            index_packs, f"{what}: index pack", _pack_record, max_length=MAX_ROOT_INDEX_PACKS
        ),
        snapshots=_check.items(snapshots, f"{what}: snapshot", _id, max_length=MAX_ROOT_SNAPSHOTS),
        friends=_check.items(friends, f"{what}: friend", _friend_record, max_length=MAX_PEERS),
        instance=_instance(instance, f"{what}: instance id"),
        settings=_check.binary(settings, f"{what}: settings", max_length=MAX_ROOT_SETTINGS),
        names=_check.items(names, f"{what}: name", _peer_name, max_length=MAX_PEERS),
        delegates=_check.items(
            delegates, f"{what}: delegate", _node_id, max_length=MAX_ROOT_DELEGATES
        ),
    )


def _peer_name(value: object, what: str) -> tuple[str, str]:
    peer_id, name = _check.fields(value, what, 2)
    return (
        _check.text(peer_id, f"{what}: peer id", min_length=1, max_length=MAX_TEXT_LENGTH),
        _check.text(name, f"{what}: name", min_length=1, max_length=MAX_PEER_NAME),
    )


def _instance(value: object, what: str) -> bytes:
    """A home's instance id: empty (written before homes had one) or
    :data:`~p2pbackup.model.INSTANCE_ID_SIZE` bytes."""
    instance = _check.binary(value, what, max_length=INSTANCE_ID_SIZE)
    if len(instance) not in (0, INSTANCE_ID_SIZE):
        _fail(what, f"must be empty or {INSTANCE_ID_SIZE} bytes, got {len(instance)}")
    return instance


def _friend_record(value: object, what: str) -> FriendRecord:
    node_id, public_key, addresses, added_at = _check.fields(value, what, 4)
    friend = FriendRecord(
        node_id=_check.binary(
            node_id, f"{what}: node id", min_length=NODE_ID_SIZE, max_length=NODE_ID_SIZE
        ),
        public_key=_check.binary(public_key, f"{what}: public key", min_length=32, max_length=32),
        addresses=_check.items(
            addresses,
            f"{what}: address",
            lambda v, w: _check.text(v, w, min_length=1, max_length=MAX_TEXT_LENGTH),
            max_length=MAX_FRIEND_ADDRESSES,
        ),
        added_at=_check.integer(added_at, f"{what}: added at"),
    )
    # The id is the key's hash: a record binding a key to another id is damaged.
    if node_id_for(friend.public_key) != friend.node_id:
        _fail(what, "node id is not the hash of its public key")
    return friend


def _config(value: object, what: str) -> RepositoryConfig:
    k, n, pack_size, chunk_min, chunk_avg, chunk_max, block_size = _check.fields(value, what, 7)
    config = RepositoryConfig(
        k=_check.integer(k, f"{what}: k", high=MAX_SHARDS),
        n=_check.integer(n, f"{what}: n", high=MAX_SHARDS),
        pack_size=_check.integer(pack_size, f"{what}: pack size", low=1, high=MAX_PACK_SIZE),
        chunk_min=_check.integer(chunk_min, f"{what}: chunk min", low=1, high=MAX_CHUNK_SIZE),
        chunk_avg=_check.integer(chunk_avg, f"{what}: chunk avg", low=1, high=MAX_CHUNK_SIZE),
        chunk_max=_check.integer(chunk_max, f"{what}: chunk max", low=1, high=MAX_CHUNK_SIZE),
        block_size=_check.integer(block_size, f"{what}: block size", high=MAX_BLOCK_SIZE),
    )
    _check_code(what, config.k, config.n)
    _check_block_size(what, config.block_size)
    if not config.chunk_min <= config.chunk_avg <= config.chunk_max:
        _fail(
            what,
            f"chunk sizes {config.chunk_min}/{config.chunk_avg}/{config.chunk_max} "
            "are not min <= avg <= max",
        )
    return config


def _peer_record(value: object, what: str) -> PeerRecord:
    peer_id, kind, location = _check.fields(value, what, 3)
    return PeerRecord(
        peer_id=_check.text(peer_id, f"{what}: peer id", min_length=1, max_length=MAX_TEXT_LENGTH),
        kind=_check.text(kind, f"{what}: kind", min_length=1, max_length=MAX_TEXT_LENGTH),
        location=_check.text(location, f"{what}: location", max_length=MAX_TEXT_LENGTH),
    )


# --- Delegation: certificates and repair grants -----------------------------


def _node_id(value: object, what: str) -> bytes:
    return _check.binary(value, what, min_length=NODE_ID_SIZE, max_length=NODE_ID_SIZE)


def encode_delegation_certificate(certificate: DelegationCertificate) -> bytes:
    """The certificate's bytes (unsigned: :mod:`p2pbackup.core.delegation`
    signs them into an envelope)."""
    body = (
        certificate.owner,
        certificate.owner_public_key,
        certificate.delegate,
        certificate.issued_at,
        certificate.expiry,
    )
    return _checked(
        _seal("delegation certificate", CERTIFICATE_MAGIC, body),
        decode_delegation_certificate,
    )


def decode_delegation_certificate(data: BytesLike) -> DelegationCertificate:
    return _open("delegation certificate", data, CERTIFICATE_MAGIC, _delegation_certificate)


def _delegation_certificate(value: object, what: str) -> DelegationCertificate:
    owner, public_key, delegate, issued_at, expiry = _check.fields(value, what, 5)
    certificate = DelegationCertificate(
        owner=_node_id(owner, f"{what}: owner"),
        owner_public_key=_check.binary(
            public_key,
            f"{what}: owner's public key",
            min_length=PUBLIC_KEY_SIZE,
            max_length=PUBLIC_KEY_SIZE,
        ),
        delegate=_node_id(delegate, f"{what}: delegate"),
        issued_at=_check.integer(issued_at, f"{what}: issued at"),
        expiry=_check.integer(expiry, f"{what}: expiry"),
    )
    if node_id_for(certificate.owner_public_key) != certificate.owner:
        _fail(what, "owner is not the hash of the owner's public key")
    if certificate.delegate == certificate.owner:
        _fail(what, "an owner cannot be its own delegate")
    lifetime = certificate.expiry - certificate.issued_at
    if not 0 < lifetime <= MAX_CERTIFICATE_LIFETIME:
        _fail(
            what,
            f"valid for {lifetime} s, not 1 to {MAX_CERTIFICATE_LIFETIME} s after it is issued",
        )
    return certificate


def encode_repair_grant(grant: RepairGrant) -> bytes:
    """The grant's bytes (unsigned: :mod:`p2pbackup.core.delegation` signs them)."""
    body = (
        grant.owner,
        grant.sequence,
        grant.issued_at,
        tuple((peer.node_id, tuple(peer.addresses)) for peer in grant.peers),
        tuple(
            (
                pack.pack_id,
                pack.size,
                pack.k,
                pack.n,
                pack.shard_size,
                pack.block_size,
                tuple((s.index, s.peer, s.merkle_root) for s in pack.shards),
            )
            for pack in grant.packs
        ),
        tuple(grant.delegates),
    )
    return _checked(_seal("repair grant", GRANT_MAGIC, body), decode_repair_grant)


def decode_repair_grant(data: BytesLike) -> RepairGrant:
    return _open("repair grant", data, GRANT_MAGIC, _repair_grant)


def _repair_grant(value: object, what: str) -> RepairGrant:
    owner, sequence, issued_at, peers, packs, delegates = _check.fields(value, what, 6)
    grant_peers = _check.items(peers, f"{what}: peer", _grant_peer, max_length=MAX_PEERS)
    _strictly_ascending(what, "peer", [peer.node_id for peer in grant_peers])

    def pack(item: object, where: str) -> GrantPack:
        return _grant_pack(item, where, peers=len(grant_peers))

    grant_packs = _check.items(packs, f"{what}: pack", pack, max_length=MAX_GRANT_PACKS)
    _strictly_ascending(what, "pack", [p.pack_id for p in grant_packs])
    grant = RepairGrant(
        owner=_node_id(owner, f"{what}: owner"),
        sequence=_check.integer(sequence, f"{what}: sequence"),
        issued_at=_check.integer(issued_at, f"{what}: issued at"),
        peers=grant_peers,
        packs=grant_packs,
        delegates=_check.items(delegates, f"{what}: delegate", _node_id, max_length=MAX_PEERS),
    )
    _strictly_ascending(what, "delegate", list(grant.delegates))
    if grant.owner in grant.delegates:
        _fail(what, "an owner cannot be its own delegate")
    if any(peer.node_id == grant.owner for peer in grant.peers):
        _fail(what, "the owner is named as a peer holding its own shards")
    return grant


def _strictly_ascending(what: str, noun: str, keys: list[bytes]) -> None:
    """One value, one encoding: items sorted by their key, each once."""
    for previous, key in itertools.pairwise(keys):
        if key <= previous:
            problem = "duplicated" if key == previous else "out of order"
            _fail(what, f"{noun} {key.hex()[:16]} is {problem}")


def _grant_peer(value: object, what: str) -> GrantPeer:
    node_id, addresses = _check.fields(value, what, 2)
    return GrantPeer(
        node_id=_node_id(node_id, f"{what}: node id"),
        addresses=_check.items(
            addresses,
            f"{what}: address",
            lambda v, w: _check.text(v, w, min_length=1, max_length=MAX_TEXT_LENGTH),
            max_length=MAX_FRIEND_ADDRESSES,
        ),
    )


def _grant_pack(value: object, what: str, *, peers: int) -> GrantPack:
    pack_id, size, k, n, shard_size, block_size, shards = _check.fields(value, what, 7)
    pack_id = _id(pack_id, f"{what}: pack id")
    what = f"{what} ({pack_id.hex()[:16]})"
    size = _check.integer(size, f"{what}: size", high=MAX_PACK_SIZE)
    k = _check.integer(k, f"{what}: k", high=MAX_SHARDS)
    n = _check.integer(n, f"{what}: n", high=MAX_SHARDS)
    shard_size = _check.integer(shard_size, f"{what}: shard size", high=MAX_PACK_SIZE)
    block_size = _check.integer(block_size, f"{what}: block size", high=MAX_BLOCK_SIZE)
    _check_geometry(what, size=size, k=k, n=n, shard_size=shard_size, block_size=block_size)

    def shard(item: object, where: str) -> GrantShard:
        index, peer, root = _check.fields(item, where, 3)
        located = GrantShard(
            index=_check.integer(index, f"{where}: index", high=MAX_SHARDS - 1),
            peer=_check.integer(peer, f"{where}: peer", high=max(0, peers - 1)),
            merkle_root=_id(root, f"{where}: Merkle root"),
        )
        if peers == 0:
            _fail(where, "names a peer, but the grant names none")
        _check_shard_index(where, located.index, n)
        return located

    pack = GrantPack(
        pack_id=pack_id,
        size=size,
        k=k,
        n=n,
        shard_size=shard_size,
        block_size=block_size,
        shards=_check.items(shards, f"{what}: shard", shard, max_length=MAX_SHARDS),
    )
    _strictly_ascending(what, "shard", [bytes([s.index]) for s in pack.shards])
    return pack


def encode_repair_log(log: RepairLog) -> bytes:
    """The log's bytes, version 2 (unsigned: :mod:`p2pbackup.core.delegation`
    signs them)."""
    body = (
        log.delegate,
        log.owner,
        log.grant_sequence,
        log.made_at,
        tuple((e.pack_id, e.index, e.holder, e.merkle_root) for e in log.entries),
        log.acted_at,
    )
    return _checked(_seal("repair log", LOG_MAGIC, body, LOG_VERSION), decode_repair_log)


def decode_repair_log(data: BytesLike) -> RepairLog:
    """A repair log of either version (version 1: no time of the last pass)."""
    raw = bytes(data)
    version = raw[4] if len(raw) > 4 else LOG_VERSION

    def build(value: object, what: str) -> RepairLog:
        if version == 1:
            value = (*_check.fields(value, what, 5), 0)
        return _repair_log(value, what)

    return _open("repair log", raw, LOG_MAGIC, build, (1, LOG_VERSION))


def _repair_log(value: object, what: str) -> RepairLog:
    delegate, owner, grant_sequence, made_at, entries, acted_at = _check.fields(value, what, 6)

    def entry(item: object, where: str) -> LogEntry:
        pack_id, index, holder, root = _check.fields(item, where, 4)
        return LogEntry(
            pack_id=_id(pack_id, f"{where}: pack id"),
            index=_check.integer(index, f"{where}: index", high=MAX_SHARDS - 1),
            holder=_node_id(holder, f"{where}: holder"),
            merkle_root=_id(root, f"{where}: Merkle root"),
        )

    log = RepairLog(
        delegate=_node_id(delegate, f"{what}: delegate"),
        owner=_node_id(owner, f"{what}: owner"),
        grant_sequence=_check.integer(grant_sequence, f"{what}: grant sequence"),
        made_at=_check.integer(made_at, f"{what}: made at"),
        entries=_check.items(
            entries, f"{what}: entry", entry, max_length=MAX_GRANT_PACKS * MAX_SHARDS
        ),
        acted_at=_check.integer(acted_at, f"{what}: acted at"),
    )
    _strictly_ascending(what, "entry", [e.pack_id + bytes([e.index]) for e in log.entries])
    if log.delegate == log.owner:
        _fail(what, "an owner cannot be its own delegate")
    return log
