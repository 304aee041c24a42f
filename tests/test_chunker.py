"""Tests for content-defined chunking (p2pbackup.core.chunker)."""

from __future__ import annotations

import hashlib
import io
import tracemalloc
from pathlib import Path
from typing import BinaryIO, cast

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyfastcdc.cy import FastCDC

from p2pbackup.core.chunker import (
    DEFAULT_PARAMS,
    MAX_SEED,
    NORMALIZED_CHUNKING,
    ChunkerParams,
    chunk_bytes,
    iter_chunk_views,
    iter_chunks,
)
from p2pbackup.errors import UsageError

MiB = 1024 * 1024
#: Small sizes so a few MiB of input give hundreds of chunks.
SMALL = ChunkerParams(min_size=2048, avg_size=8192, max_size=32768, seed=7)
#: The smallest sizes pyfastcdc allows, for property tests on short inputs.
TINY = ChunkerParams(min_size=64, avg_size=256, max_size=1024, seed=3)
KEYED_DEFAULT = ChunkerParams(
    min_size=DEFAULT_PARAMS.min_size,
    avg_size=DEFAULT_PARAMS.avg_size,
    max_size=DEFAULT_PARAMS.max_size,
    seed=123_456_789,
)


def random_bytes(size: int, seed: int) -> bytes:
    """Deterministic incompressible bytes, fast enough for tens of MiB."""
    words = np.random.PCG64(seed).random_raw((size + 7) // 8)
    return words.tobytes()[:size]


def as_binary_io(stream: object) -> BinaryIO:
    """Stand-in streams have only the read methods the chunker uses."""
    return cast(BinaryIO, stream)


def digests(chunks: list[bytes]) -> list[bytes]:
    return [hashlib.blake2b(chunk, digest_size=16).digest() for chunk in chunks]


class GeneratedStream:
    """A read-only stream of ``size`` pseudo-random bytes made on demand.

    It holds at most one read's worth of data at a time, so the rest of the
    memory traced while chunking it is the chunker's own.
    """

    def __init__(self, size: int, seed: int) -> None:
        self._remaining = size
        self._rng = np.random.PCG64(seed)
        self.largest_read = 0

    def _generate(self, n: int) -> bytes:
        n = min(n, self._remaining)
        self._remaining -= n
        return self._rng.random_raw((n + 7) // 8).tobytes()[:n]

    def read(self, n: int) -> bytes:
        self.largest_read = max(self.largest_read, n)
        return self._generate(n)


class GeneratedReadintoStream(GeneratedStream):
    """The same, with the ``readinto`` pyfastcdc prefers, in 64 KiB pieces."""

    PIECE = 64 * 1024

    def readinto(self, buffer: memoryview) -> int:
        piece = self._generate(min(len(buffer), self.PIECE))
        buffer[: len(piece)] = piece
        return len(piece)


class ShortReadStream(io.RawIOBase):
    """Hands out at most ``step`` bytes per read: a pipe or socket, say."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self._step, len(self._data) - self._pos)
        buffer[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


# --- params ---------------------------------------------------------------


def test_params_must_be_ordered() -> None:
    with pytest.raises(UsageError, match="min_size <= avg_size <= max_size"):
        ChunkerParams(min_size=8192, avg_size=4096, max_size=32768)
    with pytest.raises(UsageError, match="min_size <= avg_size <= max_size"):
        ChunkerParams(min_size=1024, avg_size=65536, max_size=32768)


@pytest.mark.parametrize(
    ("min_size", "avg_size", "max_size"),
    [
        (32, 256, 1024),
        (64, 128, 1024),
        (64, 256, 512),
        (64, 256, 32 * MiB),
        (2 * MiB, 3 * MiB, 8 * MiB),
    ],
)
def test_params_out_of_supported_range(min_size: int, avg_size: int, max_size: int) -> None:
    with pytest.raises(UsageError, match="outside the supported range"):
        ChunkerParams(min_size=min_size, avg_size=avg_size, max_size=max_size)


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1])
def test_seed_range(seed: int) -> None:
    with pytest.raises(UsageError, match="seed"):
        ChunkerParams(min_size=64, avg_size=256, max_size=1024, seed=seed)
    # The ends of the keyring's range are accepted.
    ChunkerParams(min_size=64, avg_size=256, max_size=1024, seed=MAX_SEED)
    ChunkerParams(min_size=64, avg_size=256, max_size=1024, seed=1)


def test_default_params_average_about_one_mib() -> None:
    chunks = chunk_bytes(random_bytes(64 * MiB, seed=1), KEYED_DEFAULT)
    sizes = [len(c) for c in chunks[:-1]]
    mean = sum(sizes) / len(sizes)
    assert 0.85 * MiB <= mean <= 1.15 * MiB, mean / MiB


# --- cutting --------------------------------------------------------------


def test_chunks_reassemble_and_respect_bounds() -> None:
    data = random_bytes(4 * MiB, seed=2)
    chunks = chunk_bytes(data, SMALL)
    assert b"".join(chunks) == data
    assert len(chunks) > 100
    for chunk in chunks[:-1]:
        assert SMALL.min_size <= len(chunk) <= SMALL.max_size
    assert 1 <= len(chunks[-1]) <= SMALL.max_size


def test_incompressible_runs_hit_max_size() -> None:
    # A constant run never matches the mask, so every cut is forced at max_size.
    data = b"\x00" * (10 * SMALL.max_size + 5)
    sizes = [len(c) for c in chunk_bytes(data, SMALL)]
    assert sizes == [SMALL.max_size] * 10 + [5]


@given(st.binary(max_size=20_000))
def test_property_reassemble_bounds_and_streaming(data: bytes) -> None:
    chunks = chunk_bytes(data, TINY)
    assert b"".join(chunks) == data
    assert all(TINY.min_size <= len(c) <= TINY.max_size for c in chunks[:-1])
    assert all(len(c) > 0 for c in chunks)
    assert list(iter_chunks(as_binary_io(ShortReadStream(data, step=333)), TINY)) == chunks


def test_deterministic_for_same_params() -> None:
    data = random_bytes(2 * MiB, seed=3)
    assert chunk_bytes(data, SMALL) == chunk_bytes(data, SMALL)


def test_different_seed_moves_boundaries() -> None:
    data = random_bytes(2 * MiB, seed=4)
    other = ChunkerParams(SMALL.min_size, SMALL.avg_size, SMALL.max_size, seed=SMALL.seed + 1)
    ours = set(digests(chunk_bytes(data, SMALL)))
    theirs = set(digests(chunk_bytes(data, other)))
    # Only a coincidental cut or two may survive a change of gear table.
    assert len(ours & theirs) < 0.1 * len(ours)


def test_insertion_leaves_later_chunks_unchanged() -> None:
    data = random_bytes(32 * MiB, seed=5)
    edited = data[:100_000] + b"an insertion early in the file" + data[100_000:]
    before = digests(chunk_bytes(data, KEYED_DEFAULT))
    after = digests(chunk_bytes(edited, KEYED_DEFAULT))
    shared = set(before) & set(after)
    assert len(shared) >= 0.8 * len(before)
    # Not a coincidence of identical inputs: the edited chunk did change.
    assert before[0] not in shared


def test_empty_input_yields_nothing() -> None:
    assert chunk_bytes(b"", SMALL) == []
    assert list(iter_chunks(io.BytesIO(b""), SMALL)) == []


@given(st.integers(min_value=0, max_value=3 * TINY.max_size), st.integers(0, 2**32))
def test_cuts_are_pyfastcdcs_on_either_side_of_min_size(length: int, seed: int) -> None:
    """The short cuts the chunker takes (no FastCDC for inputs within min_size,
    one FastCDC shared by every call) change no cut point."""
    data = random_bytes(length, seed)
    reference = FastCDC(
        TINY.avg_size,
        min_size=TINY.min_size,
        max_size=TINY.max_size,
        normalized_chunking=NORMALIZED_CHUNKING,
        seed=TINY.seed,
    )
    expected = [bytes(chunk.data) for chunk in reference.cut_buf(data)]
    assert chunk_bytes(data, TINY) == expected
    assert chunk_bytes(data, TINY) == expected  # the shared FastCDC, used again


@settings(max_examples=30)
@given(st.integers(0, 3 * 1024 * 1024), st.integers(0, 2**32))
def test_chunk_views_are_the_chunks_while_they_are_current(length: int, seed: int) -> None:
    data = random_bytes(length, seed)
    params = ChunkerParams(min_size=64 * 1024, avg_size=256 * 1024, max_size=1024 * 1024, seed=9)
    # Each view copied out before the next is taken, as the backup uses them.
    views = [bytes(v) for v in iter_chunk_views(io.BytesIO(data), params)]
    assert views == list(iter_chunks(io.BytesIO(data), params)) == chunk_bytes(data, params)


def test_one_byte_input_is_one_chunk() -> None:
    assert chunk_bytes(b"x", SMALL) == [b"x"]
    assert list(iter_chunks(io.BytesIO(b"x"), SMALL)) == [b"x"]


# --- streaming ------------------------------------------------------------


def test_streaming_from_file_matches_in_memory(tmp_path: Path) -> None:
    data = random_bytes(3 * MiB + 12345, seed=6)
    path = tmp_path / "input"
    path.write_bytes(data)
    with path.open("rb") as stream:
        streamed = list(iter_chunks(stream, SMALL))
    # Kept until the end: a view into the chunker's reused buffer would have
    # been overwritten by now, so equality also shows the chunks were copied.
    assert all(type(c) is bytes for c in streamed)
    assert streamed == chunk_bytes(data, SMALL)


def test_streaming_handles_short_reads() -> None:
    data = random_bytes(MiB, seed=7)
    streamed = list(iter_chunks(as_binary_io(ShortReadStream(data, step=1000)), SMALL))
    assert streamed == chunk_bytes(data, SMALL)


def traced_peak_while_chunking(stream: GeneratedStream, params: ChunkerParams) -> tuple[int, int]:
    """Chunk ``stream`` to its end; return (bytes seen, peak traced memory)."""
    total = 0
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for chunk in iter_chunks(as_binary_io(stream), params):
            total += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return total, peak - baseline


MEMORY_PARAMS = ChunkerParams(min_size=16 * 1024, avg_size=64 * 1024, max_size=256 * 1024, seed=9)


def test_streaming_memory_is_bounded() -> None:
    size = 64 * MiB
    total, peak = traced_peak_while_chunking(GeneratedReadintoStream(size, seed=8), MEMORY_PARAMS)
    assert total == size
    # pyfastcdc's 2*max_size buffer, the chunk being handed out, the stream's
    # 64 KiB pieces and slack: a whole-stream read would cost over 64 MiB.
    bound = 4 * MEMORY_PARAMS.max_size + 256 * 1024
    assert peak < bound, (peak, bound)


def test_streaming_memory_is_bounded_with_read_only_streams() -> None:
    size = 64 * MiB
    stream = GeneratedStream(size, seed=10)
    total, peak = traced_peak_while_chunking(stream, MEMORY_PARAMS)
    assert total == size
    assert stream.largest_read <= 2 * MEMORY_PARAMS.max_size
    # As above, plus reads of up to 2*max_size and their temporary copies.
    bound = 10 * MEMORY_PARAMS.max_size
    assert peak < bound, (peak, bound)


@given(st.integers(min_value=-3, max_value=3), st.booleans())
def test_inputs_either_side_of_the_whole_read_threshold_cut_alike(
    delta: int, read_only: bool
) -> None:
    # Inputs below max_size are read whole and cut in memory; longer ones are
    # streamed after that first read. Both paths must make the same cuts.
    data = np.random.default_rng(delta + 5).bytes(SMALL.max_size + delta)

    class ReadOnly:
        def __init__(self, raw: bytes) -> None:
            self._inner = io.BytesIO(raw)

        def read(self, size: int = -1) -> bytes:
            return self._inner.read(size)

    stream = cast(BinaryIO, ReadOnly(data)) if read_only else io.BytesIO(data)
    assert list(iter_chunks(stream, SMALL)) == chunk_bytes(data, SMALL)
