"""Codecs: round trips, canonical bytes, pinned layouts, and hostile input that only ever
yields FormatError."""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable
from typing import Any

import attrs
import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pbackup.core import formats
from p2pbackup.core.fields import MAX_UINT
from p2pbackup.core.formats import (
    MAX_BLOCK_SIZE,
    MAX_CHUNK_SIZE,
    MAX_PACK_SIZE,
    MAX_U32,
    MAX_XATTR_NAME_LENGTH,
    MIN_BLOCK_SIZE,
    MIN_INT,
    SHARD_HEADER_SIZE,
    TREE_VERSION,
    SignedEnvelope,
    decode_index_segment,
    decode_pack_header,
    decode_root_record,
    decode_shard_header,
    decode_signed_envelope,
    decode_snapshot,
    decode_tree,
    encode_index_segment,
    encode_pack_header,
    encode_root_record,
    encode_shard_header,
    encode_signed_envelope,
    encode_snapshot,
    encode_tree,
    envelope_signed_bytes,
    parse_id_hex,
    shard_id,
    shard_id_hex,
)
from p2pbackup.core.keys import node_id_for
from p2pbackup.errors import FormatError
from p2pbackup.model import (
    BlobEntry,
    BlobType,
    FriendRecord,
    IndexSegment,
    NodeKind,
    PackHeader,
    PackRecord,
    PeerRecord,
    RepositoryConfig,
    RootRecord,
    ShardHeader,
    ShardLocation,
    Snapshot,
    Tree,
    TreeNode,
)

# --- Strategies ---------------------------------------------------------------

ids = st.binary(min_size=32, max_size=32)
uints = st.integers(0, MAX_UINT)
block_sizes = st.sampled_from([1 << e for e in range(9, 21)])
texts = st.text(max_size=12)
nonempty_texts = st.text(min_size=1, max_size=12)
names = st.binary(min_size=1, max_size=24).filter(
    lambda n: b"/" not in n and b"\x00" not in n and n not in (b".", b"..")
)


@st.composite
def codes(draw: st.DrawFn) -> tuple[int, int]:
    k = draw(st.integers(1, 254))
    return k, draw(st.integers(k + 1, 255))


@st.composite
def geometries(draw: st.DrawFn) -> dict[str, int]:
    k, n = draw(codes())
    size = draw(st.one_of(st.integers(0, 4096), st.integers(0, MAX_PACK_SIZE)))
    return {"k": k, "n": n, "size": size, "shard_size": -(-size // k)}


@st.composite
def blob_entries(draw: st.DrawFn, pack_size: int = MAX_PACK_SIZE) -> BlobEntry:
    offset = draw(st.integers(0, pack_size))
    return BlobEntry(
        type=draw(st.sampled_from(BlobType)),
        blob_id=draw(ids),
        offset=offset,
        length=draw(st.integers(0, pack_size - offset)),
        raw_length=draw(st.integers(0, formats.MAX_BLOB_RAW_LENGTH)),
    )


pack_headers = st.builds(PackHeader, entries=st.lists(blob_entries(), max_size=5).map(tuple))


xattr_names = st.binary(min_size=1, max_size=MAX_XATTR_NAME_LENGTH).filter(
    lambda name: b"\x00" not in name
)
xattr_lists = st.lists(
    st.tuples(xattr_names, st.binary(max_size=64)), max_size=3, unique_by=lambda pair: pair[0]
).map(lambda pairs: tuple(sorted(pairs)))


@st.composite
def tree_nodes(draw: st.DrawFn) -> TreeNode:
    kind = draw(st.sampled_from(NodeKind))
    link = st.binary(min_size=1, max_size=40).filter(lambda t: b"\x00" not in t)
    device = kind in (NodeKind.CHARDEV, NodeKind.BLOCKDEV)
    return TreeNode(
        name=draw(names),
        kind=kind,
        mode=draw(st.integers(0, MAX_U32)),
        mtime_ns=draw(st.integers(MIN_INT, MAX_UINT)),
        size=draw(uints),
        content=tuple(draw(st.lists(ids, max_size=3))) if kind is NodeKind.FILE else (),
        subtree=draw(ids) if kind is NodeKind.DIR else None,
        link_target=draw(link) if kind is NodeKind.SYMLINK else None,
        uid=draw(st.integers(0, MAX_U32)),
        gid=draw(st.integers(0, MAX_U32)),
        hardlink_group=draw(uints),
        rdev=draw(uints) if device else 0,
        xattrs=draw(xattr_lists),
    )


trees = st.lists(tree_nodes(), max_size=6, unique_by=lambda node: node.name).map(
    lambda nodes: Tree(tuple(sorted(nodes, key=lambda node: node.name)))
)

snapshots = st.builds(
    Snapshot,
    time_ns=uints,
    hostname=texts,
    paths=st.lists(names.map(lambda n: b"/" + n), max_size=3).map(tuple),
    tags=st.lists(nonempty_texts, max_size=3).map(tuple),
    tree=ids,
    file_count=uints,
    total_size=uints,
)


@st.composite
def pack_records(draw: st.DrawFn) -> PackRecord:
    geometry = draw(geometries())
    n = geometry["n"]
    location = st.builds(
        ShardLocation, index=st.integers(0, n - 1), peer_id=nonempty_texts, merkle_root=ids
    )
    return PackRecord(
        pack_id=draw(ids),
        size=geometry["size"],
        k=geometry["k"],
        n=n,
        shard_size=geometry["shard_size"],
        block_size=draw(block_sizes),
        shards=tuple(draw(st.lists(location, max_size=4))),
        blobs=tuple(draw(st.lists(blob_entries(geometry["size"]), max_size=3))),
    )


index_segments = st.builds(IndexSegment, packs=st.lists(pack_records(), max_size=3).map(tuple))


@st.composite
def configs(draw: st.DrawFn) -> RepositoryConfig:
    k, n = draw(codes())
    chunk_min, chunk_avg, chunk_max = sorted(
        draw(st.lists(st.integers(1, MAX_CHUNK_SIZE), min_size=3, max_size=3))
    )
    return RepositoryConfig(
        k=k,
        n=n,
        pack_size=draw(st.integers(1, MAX_PACK_SIZE)),
        chunk_min=chunk_min,
        chunk_avg=chunk_avg,
        chunk_max=chunk_max,
        block_size=draw(block_sizes),
    )


@st.composite
def friend_records(draw: st.DrawFn) -> FriendRecord:
    public_key = draw(st.binary(min_size=32, max_size=32))
    return FriendRecord(
        node_id=node_id_for(public_key),
        public_key=public_key,
        addresses=tuple(draw(st.lists(nonempty_texts, max_size=3))),
        added_at=draw(uints),
    )


root_records = st.builds(
    RootRecord,
    sequence=uints,
    time_ns=uints,
    config=configs(),
    peers=st.lists(st.builds(PeerRecord, nonempty_texts, nonempty_texts, texts), max_size=3).map(
        tuple
    ),
    index_packs=st.lists(pack_records(), max_size=2).map(tuple),
    snapshots=st.lists(ids, max_size=3).map(tuple),
    friends=st.lists(friend_records(), max_size=2).map(tuple),
    instance=st.sampled_from([b"", bytes(range(16))]),
    settings=st.binary(max_size=64),
    names=st.lists(st.tuples(nonempty_texts, st.text(min_size=1, max_size=32)), max_size=2).map(
        tuple
    ),
    delegates=st.lists(st.binary(min_size=20, max_size=20), max_size=2).map(tuple),
)


@st.composite
def shard_headers(draw: st.DrawFn) -> ShardHeader:
    geometry = draw(geometries())
    return ShardHeader(
        pack_id=draw(st.none() | ids),
        index=draw(st.integers(0, geometry["n"] - 1)),
        k=geometry["k"],
        n=geometry["n"],
        pack_size=geometry["size"],
        shard_size=geometry["shard_size"],
        block_size=draw(block_sizes),
    )


# --- Codec table ----------------------------------------------------------------


@attrs.frozen
class Codec:
    name: str
    magic: bytes
    encode: Callable[[Any], bytes]
    decode: Callable[[bytes], Any]
    values: st.SearchStrategy[Any]
    #: The versions its encoder writes.
    versions: tuple[int, ...] = (1,)


def _encode_envelope(envelope: SignedEnvelope) -> bytes:
    return encode_signed_envelope(
        envelope.kind, envelope.signer_public_key, envelope.payload, envelope.signature
    )


envelopes = st.builds(
    SignedEnvelope,
    kind=st.binary(min_size=4, max_size=4),
    signer_public_key=ids,
    payload=st.binary(max_size=200),
    signature=st.binary(min_size=64, max_size=64),
)

CODECS = [
    Codec(
        "shard header", b"P2PS", encode_shard_header, decode_shard_header, shard_headers(), (1, 2)
    ),
    Codec("pack header", b"P2PP", encode_pack_header, decode_pack_header, pack_headers),
    Codec("tree", b"P2PT", encode_tree, decode_tree, trees, (1, TREE_VERSION)),
    Codec("snapshot", b"P2PN", encode_snapshot, decode_snapshot, snapshots),
    Codec("index segment", b"P2PI", encode_index_segment, decode_index_segment, index_segments),
    Codec("root record", b"P2PR", encode_root_record, decode_root_record, root_records, (4,)),
    Codec("signed envelope", b"P2PE", _encode_envelope, decode_signed_envelope, envelopes),
]
BY_NAME = {codec.name: codec for codec in CODECS}
codec_params = pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)


def _accepts_only_canonical(codec: Codec, data: bytes) -> None:
    """Decoding raises FormatError, or yields a value that encodes back to ``data``."""
    try:
        value = codec.decode(data)
    except FormatError as error:
        assert str(error).startswith(codec.name + ":"), str(error)
        return
    expected = data[:SHARD_HEADER_SIZE] if codec.name == "shard header" else data
    assert codec.encode(value) == expected


# --- Round trips and determinism ------------------------------------------------


@codec_params
@given(data=st.data())
def test_round_trip(codec: Codec, data: st.DataObject) -> None:
    value = data.draw(codec.values)
    encoded = codec.encode(value)
    assert encoded.startswith(codec.magic) and encoded[4] in codec.versions
    decoded = codec.decode(encoded)
    assert decoded == value
    assert codec.encode(decoded) == encoded
    # A value rebuilt field by field from scratch encodes to the same bytes.
    assert codec.encode(attrs.evolve(value)) == encoded


@codec_params
@given(data=st.data())
def test_random_mutations_only_raise_format_error(codec: Codec, data: st.DataObject) -> None:
    encoded = bytearray(codec.encode(data.draw(codec.values)))
    for _ in range(3):
        position = data.draw(st.integers(0, len(encoded) - 1))
        encoded[position] = data.draw(st.integers(0, 255))
    _accepts_only_canonical(codec, bytes(encoded))


@codec_params
@given(garbage=st.binary(max_size=300))
def test_random_bytes_only_raise_format_error(codec: Codec, garbage: bytes) -> None:
    _accepts_only_canonical(codec, garbage)
    _accepts_only_canonical(codec, codec.magic + b"\x01" + garbage)


def _rid(rng: random.Random) -> bytes:
    return rng.randbytes(32)


def _sample_record(rng: random.Random) -> PackRecord:
    return PackRecord(
        pack_id=_rid(rng),
        size=1000,
        k=3,
        n=5,
        shard_size=334,
        block_size=512,
        shards=(ShardLocation(0, "peer-a", _rid(rng)), ShardLocation(4, "peer-b", _rid(rng))),
        blobs=(BlobEntry(BlobType.DATA, _rid(rng), 0, 600, 900),),
    )


_SAMPLES: dict[str, Callable[[random.Random], bytes]] = {
    "shard header": lambda rng: encode_shard_header(ShardHeader(None, 2, 3, 5, 1000, 334, 512)),
    "pack header": lambda rng: encode_pack_header(
        PackHeader((BlobEntry(BlobType.TREE, _rid(rng), 0, 300, 280),))
    ),
    "tree": lambda rng: encode_tree(
        Tree(
            (
                TreeNode(b"bin", NodeKind.SYMLINK, 0o777, -5, link_target=b"usr/bin"),
                TreeNode(b"docs", NodeKind.DIR, 0o755, 10**18, subtree=_rid(rng)),
                TreeNode(b"\xffx", NodeKind.FILE, 0o644, 7, 70000, (_rid(rng),), uid=1000),
            )
        )
    ),
    "snapshot": lambda rng: encode_snapshot(
        Snapshot(1_700_000_000 * 10**9, "host", (b"/home",), ("daily",), _rid(rng), 3, 4096)
    ),
    "index segment": lambda rng: encode_index_segment(IndexSegment((_sample_record(rng),))),
    "root record": lambda rng: encode_root_record(
        RootRecord(
            7,
            1_700_000_000 * 10**9,
            RepositoryConfig(4, 10, 16 << 20, 256 << 10, 1 << 20, 4 << 20, 16384),
            (PeerRecord("peer-a", "dir", "/mnt/a"),),
            (_sample_record(rng),),
            (_rid(rng),),
            instance=rng.randbytes(16),
            settings=b'version = 1\n[backup]\npaths = ["/home/me"]\ninterval = "6h"\n',
            names=(("peer-a", "disk-1"),),
            delegates=(bytes(range(20)),),
        )
    ),
    "signed envelope": lambda rng: encode_signed_envelope(
        b"ROOT", _rid(rng), b"payload", rng.randbytes(64)
    ),
}


@codec_params
def test_every_byte_mutation_and_truncation_only_raises_format_error(codec: Codec) -> None:
    encoded = _SAMPLES[codec.name](random.Random(1))
    assert codec.decode(encoded) is not None
    mutated = bytearray(encoded)
    for position in range(len(encoded)):
        for flip in (0x01, 0x80, 0xFF):
            mutated[position] ^= flip
            _accepts_only_canonical(codec, bytes(mutated))
            mutated[position] ^= flip
    for length in range(len(encoded)):
        with pytest.raises(FormatError, match=codec.name):
            codec.decode(encoded[:length])


# --- Pinned layouts ---------------------------------------------------------------


def test_shard_header_layout_is_pinned() -> None:
    header = ShardHeader(
        pack_id=None,
        index=2,
        k=3,
        n=5,
        pack_size=1000,
        shard_size=334,
        block_size=16384,
    )
    encoded = encode_shard_header(header)
    assert SHARD_HEADER_SIZE == len(encoded) == 64
    assert encoded == (
        b"P2PS\x02\x02\x03\x05"
        + (1000).to_bytes(8, "big")
        + (334).to_bytes(8, "big")
        + (16384).to_bytes(4, "big")
        + bytes(4)
        + bytes(32)  # no pack id: shards of one pack cannot be matched up
    )


def test_version_1_shard_header_layout_is_pinned() -> None:
    """Shards written before version 2 named their pack; they still read."""
    header = ShardHeader(
        pack_id=bytes(range(32)),
        index=2,
        k=3,
        n=5,
        pack_size=1000,
        shard_size=334,
        block_size=16384,
    )
    encoded = encode_shard_header(header)
    assert SHARD_HEADER_SIZE == len(encoded) == 64
    assert encoded[:32] == (
        b"P2PS\x01\x02\x03\x05"
        + (1000).to_bytes(8, "big")
        + (334).to_bytes(8, "big")
        + (16384).to_bytes(4, "big")
        + bytes(4)
    )
    assert encoded[32:] == header.pack_id


def test_tree_layout_is_pinned() -> None:
    node = TreeNode(b"a", NodeKind.FILE, 0o644, 5, 3, (b"\x07" * 32,))
    # array(1) [ array(1) [ array(11) [ bin8 "a", 0, uint16 420, 5, 3, array(1) [ bin8 id ],
    #   nil, nil, 0, 0, 0 ] ] ]
    expected = (
        b"P2PT\x01\x91\x91\x9b\xc4\x01a\x00\xcd\x01\xa4\x05\x03\x91\xc4\x20"
        + b"\x07" * 32
        + b"\xc0\xc0\x00\x00\x00"
    )
    assert encode_tree(Tree((node,))) == expected


def test_envelope_layout_is_pinned() -> None:
    key, signature = b"k" * 32, b"s" * 64
    encoded = encode_signed_envelope(b"ROOT", key, b"hello", signature)
    assert encoded == b"P2PE\x01ROOT" + key + (5).to_bytes(4, "big") + b"hello" + signature
    signed = envelope_signed_bytes(b"ROOT", key, b"hello")
    assert signed == b"p2pbackup signed envelope\x00" + encoded[: -len(signature)]


# --- Prefix errors ------------------------------------------------------------------


@codec_params
def test_prefix_errors_are_named(codec: Codec) -> None:
    encoded = _SAMPLES[codec.name](random.Random(2))
    with pytest.raises(FormatError, match=f"^{codec.name}: unknown version 7$"):
        codec.decode(codec.magic + b"\x07" + encoded[5:])
    with pytest.raises(FormatError, match=f"^{codec.name}: unknown version 0$"):
        codec.decode(codec.magic + b"\x00" + encoded[5:])
    with pytest.raises(FormatError, match=f"^{codec.name}: bad magic b'XXXX'"):
        codec.decode(b"XXXX" + encoded[4:])
    if codec.name == "root record":  # zeros after it are padding; nothing else is
        with pytest.raises(FormatError, match=r"^root record: padding after the body is not zero$"):
            codec.decode(encoded + b"\x00\x01")
    elif codec.name != "shard header":  # the shard's data follows its header
        with pytest.raises(FormatError, match=f"^{codec.name}: .*trailing"):
            codec.decode(encoded + b"\x00")


def test_wrong_structure_is_named_in_bad_magic() -> None:
    snapshot = _SAMPLES["snapshot"](random.Random(3))
    with pytest.raises(FormatError, match=r"^tree: bad magic b'P2PN', expected b'P2PT' \(that is"):
        decode_tree(snapshot)


def test_shard_header_truncation_message() -> None:
    encoded = _SAMPLES["shard header"](random.Random(4))
    with pytest.raises(FormatError, match=r"^shard header: truncated \(got 12 of 64 bytes\)$"):
        decode_shard_header(encoded[:12])


# --- Shard headers ------------------------------------------------------------------


def _header(**changes: Any) -> ShardHeader:
    base = ShardHeader(bytes(32), 0, 3, 5, 1000, 334, 512)
    return attrs.evolve(base, **changes)


def test_shard_header_allows_data_after_it() -> None:
    encoded = encode_shard_header(_header())
    assert decode_shard_header(encoded + b"shard data") == _header()
    assert decode_shard_header(memoryview(encoded + b"x")) == _header()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"k": 0, "shard_size": 0, "pack_size": 0}, "k=0"),
        ({"k": 5, "shard_size": 200}, "k=5, n=5"),
        ({"k": 6, "n": 5, "shard_size": 167}, "k=6"),
        ({"index": 5}, "shard index 5"),
        ({"shard_size": 333}, "shard size 333"),
        ({"shard_size": 335}, "shard size 335"),
        ({"pack_size": MAX_PACK_SIZE + 3, "shard_size": (MAX_PACK_SIZE + 3) // 3}, "pack size"),
        ({"block_size": 1000}, "block size 1000"),
        ({"block_size": MIN_BLOCK_SIZE // 2}, "block size"),
        ({"block_size": MAX_BLOCK_SIZE * 2}, "block size"),
    ],
)
def test_shard_header_rejects_inconsistent_geometry(changes: dict[str, int], message: str) -> None:
    with pytest.raises(FormatError, match=message):
        encode_shard_header(_header(**changes))
    # The same header forged on the wire is refused by the decoder.
    valid = bytearray(encode_shard_header(_header()))
    forged = _header(**changes)
    valid[5:28] = bytes([forged.index, forged.k, forged.n]) + (
        forged.pack_size.to_bytes(8, "big")
        + forged.shard_size.to_bytes(8, "big")
        + forged.block_size.to_bytes(4, "big")
    )
    with pytest.raises(FormatError, match=message):
        decode_shard_header(bytes(valid))


def test_shard_header_rejects_bad_ids_and_reserved_bytes() -> None:
    with pytest.raises(FormatError, match="pack id"):
        encode_shard_header(_header(pack_id=bytes(31)))
    with pytest.raises(FormatError, match="cannot encode"):
        encode_shard_header(_header(index=-1))
    encoded = bytearray(encode_shard_header(_header()))
    encoded[30] = 1
    with pytest.raises(FormatError, match="reserved"):
        decode_shard_header(bytes(encoded))
    # Version 2's pack id place is reserved too: nothing may hide a pack id there.
    encoded = bytearray(encode_shard_header(_header(pack_id=None)))
    encoded[40] = 1
    with pytest.raises(FormatError, match="reserved"):
        decode_shard_header(bytes(encoded))


def test_empty_pack_header_is_valid() -> None:
    header = _header(pack_size=0, shard_size=0)
    assert decode_shard_header(encode_shard_header(header)) == header


# --- Shard ids ------------------------------------------------------------------------


def test_shard_ids_are_distinct_and_stable() -> None:
    pack_a, pack_b = bytes(32), b"\x01" + bytes(31)
    all_ids = {shard_id(pack, i) for pack in (pack_a, pack_b) for i in range(255)}
    assert len(all_ids) == 510
    assert all(len(i) == 32 for i in all_ids)
    assert shard_id(pack_a, 3) == shard_id(bytes(32), 3)
    assert shard_id(pack_a, 3) not in (pack_a, pack_b)
    assert parse_id_hex(shard_id_hex(pack_a, 3)) == shard_id(pack_a, 3)


@pytest.mark.parametrize(("pack_id", "index"), [(bytes(31), 0), (bytes(32), 255), (bytes(32), -1)])
def test_shard_id_rejects_bad_arguments(pack_id: bytes, index: int) -> None:
    with pytest.raises(ValueError):
        shard_id(pack_id, index)


@pytest.mark.parametrize("text", ["", "ab", "g" * 64, "A" * 64, "0" * 63, "0" * 65, " " + "0" * 63])
def test_parse_id_hex_rejects(text: str) -> None:
    with pytest.raises(FormatError, match=r"^shard: "):
        parse_id_hex(text, what="shard")


# --- Hostile msgpack bodies -----------------------------------------------------------

_ID = b"\x07" * 32


def _node(**changes: Any) -> list[Any]:
    fields: dict[str, Any] = {
        "name": b"a",
        "kind": 0,
        "mode": 0o644,
        "mtime": 0,
        "size": 0,
        "content": [],
        "subtree": None,
        "link": None,
        "uid": 0,
        "gid": 0,
        "hardlink": 0,
    }
    fields.update(changes)
    return list(fields.values())


def _tree_bytes(*nodes: list[Any], version: int = 1) -> bytes:
    body: bytes = msgpack.packb([list(nodes)], use_bin_type=True)
    return b"P2PT" + bytes([version]) + body


def _node_v2(rdev: int = 0, xattrs: Any = (), **changes: Any) -> list[Any]:
    return [*_node(**changes), rdev, [list(pair) for pair in xattrs]]


def test_a_tree_that_needs_nothing_new_is_still_written_as_version_1() -> None:
    plain = Tree((TreeNode(b"a", NodeKind.FILE, 0o644, 0),))
    assert encode_tree(plain)[4] == 1
    assert encode_tree(plain) == _tree_bytes(_node())  # an old tree's id is kept


@pytest.mark.parametrize(
    "node",
    [
        TreeNode(b"p", NodeKind.FIFO, 0o600, 0),
        TreeNode(b"d", NodeKind.CHARDEV, 0o600, 0, rdev=os.makedev(1, 3)),
        TreeNode(b"f", NodeKind.FILE, 0o644, 0, xattrs=((b"user.tag", b"red"),)),
        TreeNode(
            b"acl",
            NodeKind.DIR,
            0o750,
            0,
            subtree=_ID,
            xattrs=((b"system.posix_acl_access", b"\x02\x00"), (b"user.x", b"")),
        ),
    ],
)
def test_fifos_devices_and_extended_attributes_need_version_2(node: TreeNode) -> None:
    data = encode_tree(Tree((node,)))
    assert data[4] == TREE_VERSION
    assert decode_tree(data).nodes == (node,)


@pytest.mark.parametrize(
    ("node", "message"),
    [
        (_node_v2(), "version 2 for a tree that version 1 holds"),
        (_node_v2(rdev=5, xattrs=[(b"user.a", b"")]), "a file has no device number"),
        (_node_v2(kind=3, rdev=5), "a fifo has no device number"),
        (_node_v2(kind=3, content=[_ID]), "a fifo has no content"),
        (_node_v2(xattrs=[(b"user.b", b""), (b"user.a", b"")]), "user.a' is out of order"),
        (_node_v2(xattrs=[(b"user.a", b""), (b"user.a", b"")]), "user.a' is duplicated"),
        (_node_v2(xattrs=[(b"", b"")]), "extended attribute 0: name: expected 1 to 255"),
        (_node_v2(xattrs=[(b"user.\x00", b"")]), "contains a NUL"),
        (_node_v2(xattrs=[(b"user.a", bytes(65537))]), "value: expected at most 65536 bytes"),
        (_node_v2(xattrs=[[b"user.a"]]), "expected 2 fields, got 1"),
    ],
)
def test_version_2_nodes_are_checked(node: list[Any], message: str) -> None:
    with pytest.raises(FormatError, match=message):
        decode_tree(_tree_bytes(node, version=2))


def test_unknown_tree_versions_are_refused() -> None:
    with pytest.raises(FormatError, match="tree: unknown version 3"):
        decode_tree(_tree_bytes(_node_v2(kind=3), version=3))
    with pytest.raises(FormatError, match="expected 13 fields, got 11"):
        decode_tree(_tree_bytes(_node(kind=3), version=2))


def test_hand_built_tree_decodes() -> None:
    tree = decode_tree(_tree_bytes(_node(), _node(name=b"b", kind=1, subtree=_ID)))
    assert [node.name for node in tree.nodes] == [b"a", b"b"]
    assert tree.nodes[1].kind is NodeKind.DIR


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (b"", "expected 1 to 4096 bytes, got 0 bytes"),
        (b".", "not allowed"),
        (b"..", "not allowed"),
        (b"a/b", "contains '/'"),
        (b"/", "contains '/'"),
        (b"../../etc/passwd", "contains '/'"),
        (b"a\x00b", "NUL"),
        (b"x" * 4097, "got 4097 bytes"),
        ("a", "expected 1 to 4096 bytes, got string"),
        (None, "expected 1 to 4096 bytes, got nil"),
    ],
)
def test_hostile_names_are_rejected(name: object, message: str) -> None:
    with pytest.raises(FormatError, match=f"^tree: node 0: name: .*{message}"):
        decode_tree(_tree_bytes(_node(name=name)))
    if isinstance(name, bytes):
        node = TreeNode(name, NodeKind.FILE, 0, 0)
        with pytest.raises(FormatError, match="name"):
            encode_tree(Tree((node,)))


def test_unsorted_and_duplicate_names_are_rejected() -> None:
    with pytest.raises(FormatError, match="out of order"):
        decode_tree(_tree_bytes(_node(name=b"b"), _node(name=b"a")))
    with pytest.raises(FormatError, match="duplicated"):
        decode_tree(_tree_bytes(_node(name=b"a"), _node(name=b"a")))
    unsorted = Tree((TreeNode(b"b", NodeKind.FILE, 0, 0), TreeNode(b"a", NodeKind.FILE, 0, 0)))
    with pytest.raises(FormatError, match="out of order"):
        encode_tree(unsorted)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": 1}, "only a directory, has a subtree"),
        ({"subtree": _ID}, "only a directory, has a subtree"),
        ({"kind": 2}, "only a symlink, has a link target"),
        ({"link": b"x"}, "only a symlink, has a link target"),
        ({"kind": 1, "subtree": _ID, "content": [_ID]}, "dir has no content"),
        ({"kind": 2, "link": b""}, "link target: expected 1 to 4096 bytes, got 0 bytes"),
        ({"kind": 2, "link": b"a\x00"}, "link target: contains a NUL"),
        ({"kind": 1, "subtree": b"\x07" * 31}, "subtree: expected 32 bytes, got 31 bytes"),
        ({"content": [_ID, b"short"]}, "chunk 1: expected 32 bytes"),
        ({"kind": 9}, "unknown NodeKind 9"),
        ({"kind": 3}, "a version 1 tree holds no fifo"),
        ({"kind": True}, "kind: expected an integer, got boolean"),
        ({"mode": 1.5}, "mode: expected an integer, got float"),
        ({"size": -1}, "size: -1 is out of range"),
        ({"uid": 1 << 32}, "uid: 4294967296 is out of range"),
        ({"mtime": "now"}, "mtime: expected an integer, got string"),
        ({"content": {}}, "expected an array, got map"),
    ],
)
def test_inconsistent_nodes_are_rejected(changes: dict[str, Any], message: str) -> None:
    # Named by the node's place and name first, then the field.
    with pytest.raises(FormatError, match=re.escape("tree: node 1 (b'b'): ") + ".*" + message):
        decode_tree(_tree_bytes(_node(), _node(name=b"b", **changes)))


def test_wrong_field_counts_are_rejected() -> None:
    with pytest.raises(FormatError, match="expected 11 fields, got 10"):
        decode_tree(_tree_bytes(_node()[:10]))
    with pytest.raises(FormatError, match="expected 11 fields, got 12"):
        decode_tree(_tree_bytes([*_node(), 0]))
    with pytest.raises(FormatError, match="tree: expected an array, got integer"):
        decode_tree(b"P2PT\x01\x05")


def test_negative_mtime_survives() -> None:
    node = TreeNode(b"old", NodeKind.FILE, 0o644, MIN_INT)
    assert decode_tree(encode_tree(Tree((node,)))).nodes[0].mtime_ns == MIN_INT


def test_non_canonical_encoding_is_rejected() -> None:
    canonical = _tree_bytes(_node())
    # The same value with mode 0o644 as a uint32 instead of a uint16.
    body = canonical[5:]
    wide = body.replace(b"\xcd\x01\xa4", b"\xce\x00\x00\x01\xa4")
    assert msgpack.unpackb(wide) == msgpack.unpackb(body)
    with pytest.raises(FormatError, match="canonical"):
        decode_tree(b"P2PT\x01" + wide)


@pytest.mark.parametrize(
    "body",
    [
        b"\xdd\xff\xff\xff\xff",  # an array claiming 4 billion items
        b"\x91\xdd\x7f\xff\xff\xff",
        b"\x91\xc6\xff\xff\xff\xff",  # a 4 GiB bin
        b"\x91\xdb\xff\xff\xff\xff",  # a 4 GiB str
        b"\x91\xc1",  # reserved type byte
        b"\x91\xa2\xff\xfe",  # invalid UTF-8
        b"\x91\xd4\x01\x00",  # an ext type
        b"\x91" * 5000 + b"\xc0",  # nesting deeper than the unpacker's stack
        b"\x81\x01\x02",  # a map
        b"",
    ],
)
def test_hostile_bodies_fail_cleanly(body: bytes) -> None:
    with pytest.raises(FormatError, match=r"^tree: "):
        decode_tree(b"P2PT\x01" + body)


# --- Other structures' semantic checks ----------------------------------------------------


def test_pack_record_checks() -> None:
    record = _sample_record(random.Random(5))
    segment = IndexSegment((record,))
    assert decode_index_segment(encode_index_segment(segment)) == segment
    bad = [
        (attrs.evolve(record, shard_size=333), "shard size 333"),
        (attrs.evolve(record, k=5), "k=5, n=5"),
        (attrs.evolve(record, shards=(ShardLocation(5, "p", _ID),)), "shard index 5"),
        (
            attrs.evolve(record, shards=(ShardLocation(0, "", _ID),)),
            "peer id: expected 1 to 4096 characters, got 0",
        ),
        (attrs.evolve(record, blobs=(BlobEntry(BlobType.DATA, _ID, 900, 101, 1),)), "run past"),
        (attrs.evolve(record, pack_id=b"x"), "pack id"),
        (attrs.evolve(record, block_size=4096 + 512), "block size"),
    ]
    for value, message in bad:
        with pytest.raises(FormatError, match=f"^index segment: pack 0.*{message}"):
            encode_index_segment(IndexSegment((value,)))


def test_root_record_config_checks() -> None:
    encoded = _SAMPLES["root record"](random.Random(6))
    record = decode_root_record(encoded)
    config = record.config
    bad = [
        (attrs.evolve(config, chunk_min=config.chunk_avg + 1), "min <= avg <= max"),
        (attrs.evolve(config, chunk_max=MAX_CHUNK_SIZE + 1), "chunk max"),
        (attrs.evolve(config, pack_size=0), "pack size"),
        (attrs.evolve(config, k=10), "k=10, n=10"),
        (attrs.evolve(config, block_size=100), "block size 100"),
    ]
    for value, message in bad:
        with pytest.raises(FormatError, match=f"^root record: config.*{message}"):
            encode_root_record(attrs.evolve(record, config=value))
    with pytest.raises(FormatError, match="snapshot 0: expected 32 bytes"):
        encode_root_record(attrs.evolve(record, snapshots=(b"short",)))
    with pytest.raises(FormatError, match="peer 0: kind: expected 1 to 4096 characters, got 0"):
        encode_root_record(attrs.evolve(record, peers=(PeerRecord("p", "", "x"),)))
    key = bytes(range(32))
    friend = FriendRecord(node_id_for(key), key, ("h:1",), 5)
    assert decode_root_record(
        encode_root_record(attrs.evolve(record, friends=(friend,)))
    ).friends == (friend,)
    with pytest.raises(FormatError, match="friend 0: node id is not the hash of its public key"):
        encode_root_record(attrs.evolve(record, friends=(attrs.evolve(friend, node_id=bytes(20)),)))
    with pytest.raises(FormatError, match="friend 0: public key"):
        encode_root_record(
            attrs.evolve(record, friends=(attrs.evolve(friend, public_key=key[:31]),))
        )


def test_a_root_record_from_before_friends_reads_with_none() -> None:
    record = decode_root_record(_SAMPLES["root record"](random.Random(6)))
    body = (
        record.sequence,
        record.time_ns,
        tuple(attrs.astuple(record.config)),
        tuple((p.peer_id, p.kind, p.location) for p in record.peers),
        tuple(formats._pack_record_body(p) for p in record.index_packs),
        tuple(record.snapshots),
    )
    old = b"P2PR\x01" + msgpack.packb(body, use_bin_type=True)
    assert decode_root_record(old) == attrs.evolve(
        record, instance=b"", settings=b"", names=(), delegates=()
    )
    assert record.friends == ()


def test_a_version_3_root_record_reads_without_delegates() -> None:
    record = decode_root_record(_SAMPLES["root record"](random.Random(6)))
    assert record.delegates == (bytes(range(20)),)
    body = msgpack.unpackb(encode_root_record(record)[5:])
    old = b"P2PR\x03" + msgpack.packb(body[:10], use_bin_type=True)
    assert decode_root_record(old) == attrs.evolve(record, delegates=())
    # Version 3 had ten fields: an eleventh there is damage.
    with pytest.raises(FormatError, match="root record: expected 10 fields, got 11"):
        decode_root_record(b"P2PR\x03" + msgpack.packb(body, use_bin_type=True))
    with pytest.raises(FormatError, match="root record: delegate"):
        decode_root_record(b"P2PR\x04" + msgpack.packb([*body[:10], [b"short"]], use_bin_type=True))


def test_a_version_1_root_record_reads_without_instance_id() -> None:
    key = bytes(range(32))
    friend = FriendRecord(node_id_for(key), key, ("h:1",), 5)
    record = attrs.evolve(
        decode_root_record(_SAMPLES["root record"](random.Random(6))), friends=(friend,)
    )
    body = msgpack.unpackb(encode_root_record(record)[5:])
    old = b"P2PR\x01" + msgpack.packb(body[:7], use_bin_type=True)
    assert decode_root_record(old) == attrs.evolve(
        record, instance=b"", settings=b"", names=(), delegates=()
    )
    # Version 1 had no instance id: an eighth field there is damage.
    with pytest.raises(FormatError, match="root record: expected 7 fields, got 8"):
        decode_root_record(b"P2PR\x01" + msgpack.packb(body[:8], use_bin_type=True))


def test_a_version_2_root_record_reads_without_settings() -> None:
    record = decode_root_record(_SAMPLES["root record"](random.Random(6)))
    assert record.settings.startswith(b"version = 1")
    body = msgpack.unpackb(encode_root_record(record)[5:])
    old = b"P2PR\x02" + msgpack.packb(body[:8], use_bin_type=True)
    assert decode_root_record(old) == attrs.evolve(record, settings=b"", names=(), delegates=())
    # Version 2 had no settings: a ninth field there is damage.
    with pytest.raises(FormatError, match="root record: expected 8 fields, got 9"):
        decode_root_record(b"P2PR\x02" + msgpack.packb(body[:9], use_bin_type=True))
    # Settings are bounded.
    with pytest.raises(FormatError, match="root record: settings"):
        encode_root_record(attrs.evolve(record, settings=bytes(formats.MAX_ROOT_SETTINGS + 1)))


def test_a_root_record_pads_with_zeros_to_the_size_asked() -> None:
    record = decode_root_record(_SAMPLES["root record"](random.Random(6)))
    plain = encode_root_record(record)
    padded = encode_root_record(record, padded_size=len(plain) + 1000)
    assert len(padded) == len(plain) + 1000 and padded.startswith(plain)
    assert decode_root_record(padded) == record
    # A size below the record's own is no padding, never a cut.
    assert encode_root_record(record, padded_size=10) == plain
    tampered = bytearray(padded)
    tampered[-1] = 1
    with pytest.raises(FormatError, match="root record: padding after the body is not zero"):
        decode_root_record(bytes(tampered))
    with pytest.raises(FormatError, match="root record: instance id: must be empty or 16"):
        encode_root_record(attrs.evolve(record, instance=bytes(8)))


def test_snapshot_checks() -> None:
    snapshot = decode_snapshot(_SAMPLES["snapshot"](random.Random(7)))
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tags": ("",)}, "tag 0: expected 1 to 256 characters, got 0"),
        ({"paths": (b"",)}, "path 0: expected 1 to 65536 bytes, got 0 bytes"),
        ({"paths": (b"/a\x00",)}, "path 0: contains a NUL"),
        ({"tree": b""}, "tree: expected 32 bytes"),
        ({"time_ns": -1}, "time: -1 is out of range"),
        ({"hostname": b"host"}, "hostname: expected a string, got bytes"),
        ({"hostname": "\udcff"}, "cannot encode"),
        ({"file_count": 1 << 64}, "cannot encode"),
    ]
    for changes, message in cases:
        with pytest.raises(FormatError, match=f"^snapshot: {message}"):
            encode_snapshot(attrs.evolve(snapshot, **changes))


def test_pack_header_checks() -> None:
    for entry, message in [
        (BlobEntry(BlobType.DATA, _ID, MAX_PACK_SIZE, 1, 0), "run past"),
        (BlobEntry(BlobType.DATA, _ID, 0, 0, formats.MAX_BLOB_RAW_LENGTH + 1), "raw length"),
        (BlobEntry(7, _ID, 0, 0, 0), "unknown BlobType 7"),  # type: ignore[arg-type]
    ]:
        with pytest.raises(FormatError, match=f"^pack header: entry 0: .*{message}"):
            encode_pack_header(PackHeader((entry,)))


# --- Signed envelopes ---------------------------------------------------------------------


def test_envelope_signed_bytes_bind_every_field() -> None:
    key = b"k" * 32
    base = envelope_signed_bytes(b"ROOT", key, b"payload")
    assert base != envelope_signed_bytes(b"TOOR", key, b"payload")
    assert base != envelope_signed_bytes(b"ROOT", b"j" * 32, b"payload")
    assert base != envelope_signed_bytes(b"ROOT", key, b"payloaD")
    envelope = decode_signed_envelope(encode_signed_envelope(b"ROOT", key, b"payload", bytes(64)))
    assert envelope.signed_bytes() == base
    # The signed bytes are never themselves a valid envelope (domain separation).
    with pytest.raises(FormatError):
        decode_signed_envelope(base)


def test_envelope_rejects_bad_sizes() -> None:
    key = b"k" * 32
    with pytest.raises(FormatError, match="kind must be 4 bytes"):
        encode_signed_envelope(b"ROO", key, b"", bytes(64))
    with pytest.raises(FormatError, match="public key must be 32 bytes"):
        encode_signed_envelope(b"ROOT", key[:-1], b"", bytes(64))
    with pytest.raises(FormatError, match="signature must be 64 bytes"):
        encode_signed_envelope(b"ROOT", key, b"", bytes(63))
    absurd = b"P2PE\x01ROOT" + key + (0xFFFFFFFF).to_bytes(4, "big") + bytes(64)
    with pytest.raises(FormatError, match="exceeds the limit"):
        decode_signed_envelope(absurd)
    short = b"P2PE\x01ROOT" + key + (10).to_bytes(4, "big") + bytes(64)
    with pytest.raises(FormatError, match=r"truncated \(got 109 of 119 bytes\)"):
        decode_signed_envelope(short)
