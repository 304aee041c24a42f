"""A pack's shards as stored: what their headers say, and checking them read back."""

from __future__ import annotations

import attrs
import pytest

from p2pbackup.core import crypto, formats, merkle, packer
from p2pbackup.engine import shards
from p2pbackup.errors import IntegrityError
from p2pbackup.model import BlobType, PackRecord, ShardLocation

KEY = bytes(range(32))
TARGET = 256 << 10
BLOCK = 4096


def coded_pack() -> tuple[shards.CodedPack, packer.PackBuilder]:
    builder = packer.PackBuilder(TARGET)
    builder.add(BlobType.DATA, bytes(32), crypto.seal(KEY, b"x" * 70_000), 70_000)
    return shards.finish_pack(builder, KEY, 2, 4, BLOCK), builder


def record_of(coded: shards.CodedPack, builder: packer.PackBuilder) -> PackRecord:
    return PackRecord(
        pack_id=coded.pack_id,
        size=coded.size,
        k=2,
        n=4,
        shard_size=coded.shard_size,
        block_size=BLOCK,
        shards=tuple(ShardLocation(i, f"p{i}", root) for i, root in enumerate(coded.roots)),
        blobs=builder.entries,
    )


def test_shard_headers_name_no_pack_and_a_bucketed_size() -> None:
    coded, builder = coded_pack()
    record = record_of(coded, builder)
    assert coded.size == 128 << 10  # 70 kB of blob: the 128 KiB bucket of 256 KiB
    for index, payload in enumerate(coded.payloads):
        raw = bytes(payload)
        header = formats.decode_shard_header(raw)
        assert header.pack_id is None and header.index == index
        assert coded.pack_id not in raw
        assert shards.verify_shard(record, record.shards[index], raw) == raw[64:]


def test_a_shard_with_a_version_1_header_still_reads() -> None:
    """Shards written before headers stopped naming their pack."""
    coded, builder = coded_pack()
    old_roots = []
    for payload in coded.payloads:
        header = formats.decode_shard_header(payload)
        payload[:64] = formats.encode_shard_header(attrs.evolve(header, pack_id=coded.pack_id))
        assert bytes(payload[4:5]) == b"\x01"
        old_roots.append(merkle.merkle_root(payload, BLOCK))
    record = record_of(attrs.evolve(coded, roots=old_roots), builder)
    raw = bytes(coded.payloads[1])
    assert shards.verify_shard(record, record.shards[1], raw) == raw[64:]
    # One naming another pack is refused, root or no root.
    with pytest.raises(IntegrityError, match="does not match the index"):
        shards.verify_shard(attrs.evolve(record, pack_id=bytes(32)), record.shards[1], raw)
