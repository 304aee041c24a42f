"""Tests of p2pbackup.core.compression: zstd where it pays, raw otherwise, bounded output."""

from __future__ import annotations

import random
import struct
import threading
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pbackup.core import compression
from p2pbackup.core.compression import METHOD_NONE, METHOD_ZSTD
from p2pbackup.errors import FormatError

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _text(size: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(2, 9)).hex() for _ in range(300)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words).encode() + b" "
    return bytes(out[:size])


def _noise(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


@given(data=st.binary(max_size=4000), level=st.sampled_from([1, 3, 6]))
def test_round_trip(data: bytes, level: int) -> None:
    method, payload = compression.compress(data, level=level)
    assert compression.decompress(method, payload, max_size=len(data)) == data


@given(data=st.binary(max_size=300).map(lambda b: b * 20))
def test_round_trip_of_repetitive_data(data: bytes) -> None:
    method, payload = compression.compress(data)
    assert compression.decompress(method, payload, max_size=len(data)) == data
    if len(data) >= 1000:
        assert method == METHOD_ZSTD and len(payload) < len(data)


def test_compressible_data_is_compressed() -> None:
    data = _text(500_000)
    for form in (data, bytearray(data), memoryview(data)):
        method, payload = compression.compress(form)
        assert method == METHOD_ZSTD
        assert type(payload) is bytes
        assert payload.startswith(ZSTD_MAGIC) and len(payload) < len(data) // 2
        assert compression.decompress(method, memoryview(payload), max_size=len(data)) == data


def test_incompressible_data_is_stored_raw() -> None:
    for size in (10, 5000, 1 << 20):
        data = _noise(size)
        for probe in (True, False):
            method, payload = compression.compress(data, probe=probe)
            assert (method, payload) == (METHOD_NONE, data)
        assert compression.decompress(METHOD_NONE, payload, max_size=size) == data
    # Raw bytes are handed back without a copy; other buffers become bytes.
    data = _noise(100_000)
    assert compression.compress(data)[1] is data
    assert compression.compress(bytearray(data)) == (METHOD_NONE, data)


def test_empty_input() -> None:
    assert compression.compress(b"") == (METHOD_NONE, b"")
    assert compression.decompress(METHOD_NONE, b"", max_size=0) == b""


def test_small_savings_are_not_worth_it() -> None:
    noise = _noise(64_000)
    # ~500 bytes saved of 64.5 kB is under 1/64: stored raw.
    assert compression.compress(noise + bytes(500), probe=False)[0] == METHOD_NONE
    # ~3000 bytes saved of 67 kB is over 1/64: compressed.
    assert compression.compress(noise + bytes(3000), probe=False)[0] == METHOD_ZSTD


def test_probe_skips_noise_but_not_mixed_data() -> None:
    noise = _noise(1 << 20)
    assert compression.compress(noise)[0] == METHOD_NONE
    # Text between noisy stretches is still found by the sampled slices.
    mixed = noise[:300_000] + _text(500_000) + noise[:248_576]
    method, payload = compression.compress(mixed)
    assert method == METHOD_ZSTD
    assert compression.decompress(method, payload, max_size=len(mixed)) == mixed


def test_output_over_max_size_is_refused() -> None:
    data = _text(10_000)
    method, payload = compression.compress(data)
    assert compression.decompress(method, payload, max_size=10_000) == data
    with pytest.raises(FormatError, match="more than 9999"):
        compression.decompress(method, payload, max_size=9_999)
    with pytest.raises(FormatError, match="more than 9999"):
        compression.decompress(METHOD_NONE, data, max_size=9_999)


def test_decompression_bomb_allocates_nothing_large() -> None:
    bomb_size = 64 << 20
    method, bomb = compression.compress(bytes(bomb_size))
    assert method == METHOD_ZSTD and len(bomb) < 10_000
    tracemalloc.start()
    try:
        with pytest.raises(FormatError):
            compression.decompress(method, bomb, max_size=1 << 20)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def _frame_claiming(size: int, frame: bytes) -> bytes:
    # RFC 8878 frame header: magic, descriptor, content size. Rewrite a
    # single-segment frame's descriptor to an 8-byte content-size field.
    descriptor = frame[4]
    assert descriptor & 0x20, "expected a single-segment frame"
    field_size = {0: 1, 1: 2, 2: 4, 3: 8}[descriptor >> 6]
    body = frame[5 + field_size :]
    return ZSTD_MAGIC + bytes([0xE0 | (descriptor & 0x1F)]) + struct.pack("<Q", size) + body


def test_lying_header_is_refused_before_allocation() -> None:
    _method, frame = compression.compress(_text(3000))
    with pytest.raises(FormatError, match="declares 1099511627776 bytes"):
        compression.decompress(METHOD_ZSTD, _frame_claiming(1 << 40, frame), max_size=1 << 30)
    # A header that claims less than the frame holds is corrupt, not truncated output.
    with pytest.raises(FormatError):
        compression.decompress(METHOD_ZSTD, _frame_claiming(1000, frame), max_size=1 << 30)


def test_frame_without_content_size_is_refused() -> None:
    _method, frame = compression.compress(_text(3000))
    field_size = {0: 1, 1: 2, 2: 4, 3: 8}[frame[4] >> 6]
    # Descriptor 0: no content size, not single-segment, so a window byte (8 KiB).
    streaming = ZSTD_MAGIC + b"\x00\x18" + frame[5 + field_size :]
    with pytest.raises(FormatError, match="does not record"):
        compression.decompress(METHOD_ZSTD, streaming, max_size=1 << 20)


def test_corrupt_payloads_are_format_errors() -> None:
    data = _text(20_000)
    _method, frame = compression.compress(data)
    bad_payloads = [
        b"",
        b"abc",
        _noise(100),
        frame[:3],
        frame[:10],
        frame[:-1],
        frame + b"\x00",
        frame + frame,
        frame[:20] + bytes(len(frame) - 20),
    ]
    for payload in bad_payloads:
        with pytest.raises(FormatError):
            compression.decompress(METHOD_ZSTD, payload, max_size=1 << 20)


def test_unknown_method() -> None:
    for method in (2, 255, -1):
        with pytest.raises(FormatError, match=f"unknown compression method {method}"):
            compression.decompress(method, b"payload", max_size=100)


def test_parallel_threads() -> None:
    failures: list[int] = []

    def work(index: int) -> None:
        level = (1, 3, 6, 3)[index]
        for round_ in range(6):
            data = _text(150_000, seed=index * 100 + round_)
            method, payload = compression.compress(data, level=level)
            if method != METHOD_ZSTD:
                failures.append(index)
            if compression.decompress(method, payload, max_size=len(data)) != data:
                failures.append(index)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
