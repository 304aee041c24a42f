"""Compression of blob plaintexts before encryption: zstd where it pays, else raw.

This is the only module that imports ``zstandard``.

Nouns:

* **method** — how a payload is stored: :data:`METHOD_NONE` (the plaintext
  as is) or :data:`METHOD_ZSTD` (one zstd frame that records its
  decompressed size). The method byte is persisted next to the payload.
* **payload** — the stored bytes for one plaintext.
* **probe** — a cheap trial compression of a small sample that lets
  :func:`compress` skip obviously incompressible inputs.

A zstd payload is kept only when it saves at least 1/64 of the input (and at
least one byte): below that the saving is not worth a decompression on every
restore. Frames are written with their content size and without zstd's own
checksum (the AEAD around every blob already authenticates it).

Level: :data:`DEFAULT_LEVEL` is 3, chosen with
``benchmarks/bench_compression.py``. Even on text alone it runs well above
the engine's throughput target per core (the engine compresses in two
threads), with room left for hashing, encryption and erasure coding, and it
stores fewer bytes of text than level 1. Level 6 saves hardly more and falls
below the target on text-heavy data. The table:
docs/performance.md#compression.

Probe: inputs of at least :data:`PROBE_MIN_INPUT` bytes are first sampled (four
4 KiB slices spread over the input, compressed together); if the sample saves
less than 1/32 the input is stored raw without a full compression. zstd
already skips through random data fast, so the gain is modest, with not one
byte of saving lost on the benchmark corpus. It can miss savings only
for input that is random in every sampled slice yet repeats itself at long
range (e.g. one random block stored twice within a chunk), a case chunk-level
deduplication mostly covers.

Thread safety: zstd contexts are not safe to share, and building one per call
costs more than compressing a small file, so each thread keeps its own
compressor per level and its own decompressor. zstandard releases the GIL
while it works, so threads compress on separate cores.
"""

from __future__ import annotations

import threading
from typing import Final

import zstandard

from p2pbackup.errors import FormatError
from p2pbackup.model import BytesLike

METHOD_NONE: Final = 0
METHOD_ZSTD: Final = 1
DEFAULT_LEVEL: Final = 3

#: zstd is kept only if it saves at least 1/MIN_SAVING_DIVISOR of the input.
MIN_SAVING_DIVISOR: Final = 64
#: Inputs shorter than this are compressed without a probe.
PROBE_MIN_INPUT: Final = 64 * 1024
PROBE_SLICES: Final = 4
PROBE_SLICE_SIZE: Final = 4096
#: A sample saving less than 1/PROBE_SAVING_DIVISOR marks the input incompressible.
PROBE_SAVING_DIVISOR: Final = 32

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    compressor = cache.get(level)
    if compressor is None:
        compressor = cache[level] = zstandard.ZstdCompressor(
            level=level, write_content_size=True, write_checksum=False
        )
    return compressor


def _decompressor() -> zstandard.ZstdDecompressor:
    decompressor: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if decompressor is None:
        decompressor = _local.decompressor = zstandard.ZstdDecompressor()
    return decompressor


def _saves_enough(original: int, compressed: int, divisor: int) -> bool:
    saving = original - compressed
    return saving > 0 and saving * divisor >= original


def _looks_incompressible(view: memoryview, compressor: zstandard.ZstdCompressor) -> bool:
    step = (len(view) - PROBE_SLICE_SIZE) // (PROBE_SLICES - 1)
    sample = b"".join(view[i * step : i * step + PROBE_SLICE_SIZE] for i in range(PROBE_SLICES))
    trial = compressor.compress(sample)
    return not _saves_enough(len(sample), len(trial), PROBE_SAVING_DIVISOR)


def compress(
    data: BytesLike, *, level: int = DEFAULT_LEVEL, probe: bool = True
) -> tuple[int, bytes | memoryview]:
    """``(METHOD_ZSTD, frame)`` if zstd saves at least 1/64, else ``(METHOD_NONE, data)``.

    Stored as it is, ``data`` comes back uncopied (as bytes, or a byte view of
    it): the caller copies it once, into whatever it builds.
    ``probe=False`` always tries the full compression (for benchmarks).
    """
    view = memoryview(data).cast("B")
    compressor = _compressor(level)
    if probe and len(view) >= PROBE_MIN_INPUT and _looks_incompressible(view, compressor):
        return METHOD_NONE, _as_bytes(data, view)
    if view:
        frame = compressor.compress(view)
        if _saves_enough(len(view), len(frame), MIN_SAVING_DIVISOR):
            return METHOD_ZSTD, frame
    return METHOD_NONE, _as_bytes(data, view)


def _as_bytes(data: BytesLike, view: memoryview) -> bytes | memoryview:
    # Neither bytes(view) nor a copy of a bytearray: the caller copies once anyway.
    return data if isinstance(data, bytes) else view


def decompress(method: int, payload: BytesLike, *, max_size: int) -> bytes:
    """The plaintext of a :func:`compress` result; :class:`FormatError` if it is not one.

    Never produces (or allocates for) more than ``max_size`` bytes: the size
    a frame declares is checked before anything is allocated.
    """
    if method == METHOD_NONE:
        if len(payload) > max_size:
            raise FormatError(f"stored payload is {len(payload)} bytes, more than {max_size}")
        return bytes(payload)
    if method != METHOD_ZSTD:
        raise FormatError(f"unknown compression method {method}")
    size = _declared_size(payload)
    if size > max_size:
        raise FormatError(f"zstd payload declares {size} bytes, more than {max_size}")
    try:
        return _decompressor().decompress(payload, allow_extra_data=False)
    except zstandard.ZstdError as error:
        raise FormatError(f"corrupt zstd payload: {error}") from None


def _declared_size(payload: BytesLike) -> int:
    try:
        size = zstandard.frame_content_size(payload)
    except zstandard.ZstdError:
        raise FormatError("corrupt zstd payload: no valid frame header") from None
    # Our frames always record their size; refusing others keeps the
    # allocation bounded by what the header declares.
    if size < 0 or size == zstandard.CONTENTSIZE_UNKNOWN:
        raise FormatError("zstd payload does not record its decompressed size")
    return size
