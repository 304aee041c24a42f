"""Content-defined chunking: cut a byte stream into chunks whose boundaries
follow the content, so an insertion early in a file moves only nearby cuts.

Nouns:

* **chunk** — a run of consecutive input bytes; concatenating a file's chunks in
  order gives the file back. Every chunk but a file's last is between
  ``min_size`` and ``max_size`` bytes long; the last may be shorter.
* **cut point** — where one chunk ends and the next begins. FastCDC 2020 puts a
  cut where a rolling *gear hash* of the preceding bytes matches a mask.
* **gear table** — the 256 random words that hash each byte. The **seed**
  (from the user's keyring) is XORed into the table, so two users cut the same
  file at different places and a host cannot fingerprint files by chunk size.
* **chunker params** — :class:`ChunkerParams`: the three sizes and the seed.
  They are part of the repository format: changing any of them (or
  :data:`NORMALIZED_CHUNKING`) moves every cut and defeats deduplication
  against earlier snapshots.

The cutting itself is pyfastcdc's Cython FastCDC, which releases the GIL while
it scans for a cut point, so :func:`iter_chunks` run in a worker thread
(``trio.to_thread.run_sync``) does not stall the event loop. This is the only
module that imports pyfastcdc.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import BinaryIO

import attrs
from pyfastcdc.cy import FastCDC

from p2pbackup.errors import UsageError

#: FastCDC's normalisation level (the paper's NC): how much harder a cut is
#: before the average size and easier after it. Level 2 halves the spread of
#: chunk sizes compared with level 1 (fewer tiny and huge chunks, so packs fill
#: evenly) at a negligible cost in deduplication, as the FastCDC paper reports.
#: Part of the format, like the params.
NORMALIZED_CHUNKING = 2

#: Seeds pyfastcdc accepts go up to 2**63 - 1; the keyring hands out 31-bit
#: seeds, and 0 selects pyfastcdc's published gear table (unkeyed).
MAX_SEED = 2**31 - 1

# pyfastcdc's own bounds; checked here so a bad config fails with our message.
_MIN_SIZE_RANGE = (64, 1 << 20)
_AVG_SIZE_RANGE = (256, 4 << 20)
_MAX_SIZE_RANGE = (1024, 16 << 20)


def _check_range(name: str, value: int, bounds: tuple[int, int]) -> None:
    low, high = bounds
    if not low <= value <= high:
        raise UsageError(f"chunk {name} {value} is outside the supported range [{low}, {high}]")


def _check_min(_instance: object, _attribute: object, value: int) -> None:
    _check_range("min_size", value, _MIN_SIZE_RANGE)


def _check_avg(_instance: object, _attribute: object, value: int) -> None:
    _check_range("avg_size", value, _AVG_SIZE_RANGE)


def _check_max(_instance: object, _attribute: object, value: int) -> None:
    _check_range("max_size", value, _MAX_SIZE_RANGE)


def _check_seed(_instance: object, _attribute: object, value: int) -> None:
    if not 0 <= value <= MAX_SEED:
        raise UsageError(f"chunker seed {value} is outside [0, {MAX_SEED}]")


@attrs.frozen
class ChunkerParams:
    """The sizes (bytes) and gear-table seed that fix where chunks are cut.

    ``avg_size`` is FastCDC's nominal average: it picks the mask width (rounded
    to a power of two) and the point where cuts become easier. Because no cut
    is looked for in the first ``min_size`` bytes, real chunks average about
    ``avg_size + min_size`` (measured for :data:`DEFAULT_PARAMS`).
    """

    min_size: int = attrs.field(validator=_check_min)
    avg_size: int = attrs.field(validator=_check_avg)
    max_size: int = attrs.field(validator=_check_max)
    seed: int = attrs.field(default=0, validator=_check_seed)

    def __attrs_post_init__(self) -> None:
        if not self.min_size <= self.avg_size <= self.max_size:
            raise UsageError(
                "chunk sizes must satisfy min_size <= avg_size <= max_size, got "
                f"{self.min_size}, {self.avg_size}, {self.max_size}"
            )


#: ~1 MiB average chunks: on random data these params give a mean of ~1016 KiB
#: (median ~966 KiB, standard deviation ~300 KiB, largest seen ~2.7 MiB).
DEFAULT_PARAMS = ChunkerParams(min_size=256 * 1024, avg_size=832 * 1024, max_size=4 * 1024 * 1024)


@functools.lru_cache(maxsize=8)
def _fastcdc(params: ChunkerParams) -> FastCDC:
    # Built once per params: with a seed, pyfastcdc's constructor XORs the
    # 256-word gear tables in an interpreted loop (holding the GIL), which was
    # the largest cost of a small file (docs/performance.md#chunker). The
    # object is read-only after construction (every cut_* call has its own
    # chunker state), so threads share it.
    return FastCDC(
        params.avg_size,
        min_size=params.min_size,
        max_size=params.max_size,
        normalized_chunking=NORMALIZED_CHUNKING,
        seed=params.seed,
    )


#: Inputs up to this size are read whole and cut in memory: pyfastcdc's stream
#: mode allocates a ``2 * max_size`` buffer per call, which costs more than the
#: whole work for the many small files of a home directory
#: (docs/performance.md#chunker).
SMALL_INPUT = 1 << 20


class _PrefixedReader:
    """A stream that first returns ``head`` (already read), then the rest of ``tail``."""

    def __init__(self, head: bytes, tail: BinaryIO) -> None:
        self._head = memoryview(head)
        self._tail = tail

    def _consume(self, count: int) -> None:
        # An empty slice would still pin the whole head in memory.
        self._head = self._head[count:] if count < len(self._head) else memoryview(b"")

    def read(self, size: int) -> bytes:
        if self._head:
            piece = bytes(self._head[:size])
            self._consume(len(piece))
            return piece
        return self._tail.read(size)


class _PrefixedReadinto(_PrefixedReader):
    """The same, for tails with ``readinto`` (pyfastcdc prefers it: no copy)."""

    def readinto(self, buffer: memoryview) -> int:
        if self._head:
            count = min(len(buffer), len(self._head))
            buffer[:count] = self._head[:count]
            self._consume(count)
            return count
        return self._tail.readinto(buffer)  # type: ignore[attr-defined, no-any-return]


def _read_up_to(stream: BinaryIO, size: int) -> bytes:
    parts: list[bytes] = []
    remaining = size
    while remaining > 0:
        # Growing reads: a small file costs one small buffer, not ``size`` bytes
        # (a 1 MiB allocation per file is an mmap and page faults each time).
        piece = stream.read(min(remaining, max(64 * 1024, size - remaining)))
        if not piece:
            break
        parts.append(piece)
        remaining -= len(piece)
    return b"".join(parts)


def iter_chunks(stream: BinaryIO, params: ChunkerParams) -> Iterator[bytes]:
    """Yield the chunks of ``stream`` (read to its end), in order.

    Memory stays bounded whatever the stream's length: a small input is read
    whole (below :data:`SMALL_INPUT` and ``max_size`` bytes); a larger one is cut by
    pyfastcdc's stream mode, which keeps one ``2 * max_size`` buffer that it
    refills with ``readinto`` (or ``read``), plus the one chunk being yielded.
    """
    for chunk in iter_chunk_views(stream, params):
        # A view is overwritten when the next chunk is cut: copy it out now.
        yield chunk if isinstance(chunk, bytes) else bytes(chunk)


def iter_chunk_views(stream: BinaryIO, params: ChunkerParams) -> Iterator[bytes | memoryview]:
    """The chunks of :func:`iter_chunks`, each valid only until the next is taken.

    A large input's chunks are views into pyfastcdc's reused buffer. A caller
    that is done with each chunk before asking for the next (the backup hashes
    and seals it) saves copying every byte once, with the GIL held.
    """
    small = min(SMALL_INPUT, params.max_size)
    head = _read_up_to(stream, small)
    if len(head) < small:
        yield from chunk_bytes(head, params)
        return
    reader = _PrefixedReadinto if hasattr(stream, "readinto") else _PrefixedReader
    source = reader(head, stream)
    for chunk in _fastcdc(params).cut_stream(source):
        yield chunk.data


def chunk_bytes(data: bytes, params: ChunkerParams) -> list[bytes]:
    """Cut in-memory ``data`` into chunks (the same cuts :func:`iter_chunks` makes)."""
    if 0 < len(data) <= params.min_size:
        return [data]  # FastCDC never cuts before min_size: one chunk, as it would say
    chunks = [chunk.data for chunk in _fastcdc(params).cut_buf(data)]
    if len(chunks) == 1 and len(chunks[0]) == len(data):
        return [data]  # the common small file: no copy
    return [bytes(chunk) for chunk in chunks]
