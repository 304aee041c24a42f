"""Packs: padding buckets, layout, and tamper detection."""

from __future__ import annotations

import random

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from p2pbackup.core import blobs, crypto, erasure, packer
from p2pbackup.errors import DecryptionError, FormatError, IntegrityError
from p2pbackup.model import BlobEntry, BlobType

KEY = bytes(range(32))
DEDUP = bytes(range(32, 64))


MIB = 1 << 20
TARGET = 12 * MIB


def test_buckets_halve_from_the_target_down_to_the_smallest() -> None:
    assert packer.pack_buckets(TARGET) == [
        48 << 10, 96 << 10, 192 << 10, 384 << 10, 768 << 10,
        3 * MIB // 2, 3 * MIB, 6 * MIB, 12 * MIB,
    ]  # fmt: skip
    assert packer.pack_buckets(256 << 10) == [32 << 10, 64 << 10, 128 << 10, 256 << 10]
    # A target that is not a power of two halves rounding up; a tiny one is its
    # own only bucket.
    assert packer.pack_buckets(100_001) == [50_001, 100_001]
    assert packer.pack_buckets(1000) == [1000]


@given(st.integers(1, 64 * MIB), st.integers(1, 64 * MIB))
def test_a_pack_is_padded_to_the_smallest_bucket_it_fits(length: int, target: int) -> None:
    padded = packer.pack_bucket(length, target)
    assert padded >= length
    if length > target:
        # Larger than the target (one huge blob): whole targets.
        assert padded % target == 0 and padded - length < target
        return
    buckets = packer.pack_buckets(target)
    assert padded in buckets
    smaller = [size for size in buckets if size < padded]
    assert not smaller or smaller[-1] < length
    # Each bucket at most doubles what it holds, above the smallest.
    assert padded == buckets[0] or padded < 2 * length + 2


def test_sizes_within_ten_percent_share_a_bucket_away_from_its_edges() -> None:
    # The promise docs/privacy.md makes: a bucket b holds everything in
    # (b/2, b], so any two sizes in [0.55 b, 0.9 b] (ten percent apart at
    # most... and more) leave the same pack size.
    for bucket in packer.pack_buckets(TARGET)[1:]:
        low, high = int(0.55 * bucket), int(0.9 * bucket)
        assert packer.pack_bucket(low, TARGET) == packer.pack_bucket(high, TARGET) == bucket
    # The brief's measured case: one 1,234,567-byte file.
    assert packer.pack_bucket(1_234_567 + 200, TARGET) == 3 * MIB // 2


def _build(payloads: list[bytes]) -> tuple[bytes, list[bytes]]:
    builder = packer.PackBuilder(TARGET)
    ids = []
    for payload in payloads:
        ident = blobs.blob_id(DEDUP, payload)
        ids.append(ident)
        builder.add(
            BlobType.DATA, ident, blobs.seal_blob(KEY, BlobType.DATA, ident, payload), len(payload)
        )
    parts, _ = builder.finish_parts(KEY)
    return b"".join(parts), ids


@given(st.lists(st.binary(max_size=3000), max_size=6))
def test_pack_round_trip(payloads: list[bytes]) -> None:
    pack, ids = _build(payloads)
    assert len(pack) == packer.MIN_PACK_BUCKET * 3 // 2  # the smallest bucket of 12 MiB
    header = packer.read_pack_header(KEY, pack)
    assert [e.blob_id for e in header.entries] == ids
    for entry, payload in zip(header.entries, payloads, strict=True):
        assert entry.raw_length == len(payload)
        sealed = packer.blob_bytes(pack, entry)
        assert blobs.open_blob(KEY, DEDUP, BlobType.DATA, entry.blob_id, sealed) == payload


def test_pack_bytes_reveal_no_plaintext() -> None:
    secret = b"the quick brown fox jumps over the lazy dog " * 200
    pack, _ = _build([secret])
    assert b"quick brown" not in pack
    assert b"\0" * 64 not in pack  # padding is random, not zeros


def test_tampered_pack_trailer_or_header_is_an_integrity_error() -> None:
    pack, _ = _build([b"a" * 1000, b"b" * 2000])
    for position in (len(pack) - 1, len(pack) - packer.TRAILER_SIZE, 0):
        broken = bytearray(pack)
        broken[position] ^= 1
        if position == 0:
            header = packer.read_pack_header(KEY, bytes(broken))
            with pytest.raises(IntegrityError):
                blobs.open_blob(
                    KEY,
                    DEDUP,
                    BlobType.DATA,
                    header.entries[0].blob_id,
                    packer.blob_bytes(bytes(broken), header.entries[0]),
                )
        else:
            with pytest.raises(DecryptionError):
                packer.read_pack_header(KEY, bytes(broken))
    with pytest.raises(FormatError):
        packer.read_pack_header(KEY, pack[:10])
    with pytest.raises(DecryptionError):
        packer.read_pack_header(crypto.random_bytes(32), pack)


def test_blob_moved_to_another_id_or_type_fails() -> None:
    payload = b"x" * 100
    ident = blobs.blob_id(DEDUP, payload)
    sealed = blobs.seal_blob(KEY, BlobType.DATA, ident, payload)
    with pytest.raises(DecryptionError):
        blobs.open_blob(KEY, DEDUP, BlobType.TREE, ident, sealed)
    with pytest.raises(DecryptionError):
        blobs.open_blob(KEY, DEDUP, BlobType.DATA, bytes(32), sealed)


@given(
    st.integers(2 * packer.MIN_PACK_BUCKET, 256 << 10),
    st.lists(st.integers(0, 40_000), min_size=1, max_size=60),
)
# Closed at 25 kB, below half the target: full all the same.
@example(64 << 10, [25_000, 40_000])
def test_a_pack_closed_because_the_next_blob_did_not_fit_is_exactly_the_target(
    target: int, lengths: list[int]
) -> None:
    """What `fits` admits never overflows the target, so every full pack is
    the target exactly: a peer sees one size for all of them."""
    builder = packer.PackBuilder(target)
    finished: list[tuple[int, bool]] = []
    for number, length in enumerate(lengths):
        if not builder.fits(length + crypto.SEAL_OVERHEAD):
            parts, _ = builder.finish_parts(KEY)
            finished.append((sum(len(part) for part in parts), True))
            builder = packer.PackBuilder(target)
        ident = number.to_bytes(32, "big")
        builder.add(BlobType.DATA, ident, crypto.seal(KEY, bytes(length)), length)
    parts, _ = builder.finish_parts(KEY)
    last = sum(len(part) for part in parts)
    assert last in packer.pack_buckets(target) or last % target == 0
    for size, full in finished:
        assert full and size == target


@given(
    st.integers(1, 8),
    st.binary(min_size=0, max_size=400),
    st.lists(st.tuples(st.integers(0, 400), st.integers(0, 400)), max_size=20),
    st.randoms(use_true_random=False),
)
def test_a_blob_from_a_packs_unjoined_pieces_is_its_slice_of_the_pack(
    k: int, pack: bytes, spans: list[tuple[int, int]], rnd: random.Random
) -> None:
    # decode_pieces from k of the shards, some rebuilt where a data shard is missing.
    n = k + 2
    shards = dict(enumerate(erasure.encode(pack, k, n)))
    for index in rnd.sample(range(n), 2):
        del shards[index]
    pieces = erasure.decode_pieces(shards, k, n, len(pack))
    assert b"".join(pieces) == pack == erasure.decode(shards, k, n, len(pack))
    for offset, length in spans:
        entry = BlobEntry(BlobType.DATA, b"\0" * 32, offset, length, length)
        if offset + length > len(pack):
            with pytest.raises(FormatError, match="beyond the end"):
                packer.blob_bytes(pieces, entry)
            continue
        assert bytes(packer.blob_bytes(pieces, entry)) == pack[offset : offset + length]
        assert bytes(packer.blob_bytes(pack, entry)) == pack[offset : offset + length]
