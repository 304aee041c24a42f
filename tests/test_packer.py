"""Packs: padding buckets, layout, and tamper detection."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pbackup.core import blobs, crypto, packer
from p2pbackup.errors import DecryptionError, FormatError, IntegrityError
from p2pbackup.model import BlobType

KEY = bytes(range(32))
DEDUP = bytes(range(32, 64))


@given(st.integers(min_value=0, max_value=1 << 40))
def test_padme_never_shrinks_and_overhead_is_bounded(length: int) -> None:
    padded = packer.padme(length)
    assert padded >= length
    if length >= 256:
        # Padmé's worst case is below 12 %; at pack sizes it is a few percent.
        assert padded - length <= length * 0.12


def test_padme_leaves_few_distinct_sizes() -> None:
    sizes = {packer.padme(n) for n in range(8 << 20, 16 << 20, 997)}
    # 8 MiB of distinct lengths collapse into a few dozen buckets.
    assert len(sizes) < 40
    assert packer.padme((16 << 20) + 1) - ((16 << 20) + 1) <= (16 << 20) * 0.04


def _build(payloads: list[bytes]) -> tuple[bytes, list[bytes]]:
    builder = packer.PackBuilder()
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
    assert len(pack) == packer.padme(len(pack))
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
