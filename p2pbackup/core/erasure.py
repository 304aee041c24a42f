"""Systematic k-of-n Reed-Solomon erasure coding over GF(2^8).

Nouns:

* **field** — GF(2^8) with primitive polynomial 0x11d and generator 2, the
  field ``reedsolo.RSCodec`` uses by default. Addition is XOR.
* **shard** — one of the ``n`` equal-length byte strings a buffer is coded
  into. Shards ``0 .. k-1`` are **data shards**: the (zero-padded) input cut
  into ``k`` consecutive slices. Shards ``k .. n-1`` are **parity shards**.
* **column** — the ``n`` bytes at one offset ``j`` of every shard. Each column
  is a codeword of ``reedsolo.RSCodec(n - k)``: the ``k`` data bytes followed
  by reedsolo's ``n - k`` parity bytes, in reedsolo's order. The code is
  therefore exactly the one reedsolo defines, applied column-wise.
* **generator matrix** — the ``n × k`` matrix ``G`` with ``shard_i = Σ_j
  G[i, j] · data_shard_j``: identity on top, the **parity matrix** below. Any
  ``k`` rows of ``G`` form an invertible matrix (Reed-Solomon is MDS), and its
  inverse is the **decoding matrix** for that set of present shards.
* **pair table** — for one coefficient ``c``, a 65536-entry ``uint16`` table
  mapping two bytes ``(a, b)`` read as one native ``uint16`` to ``(c·a, c·b)``.
  Lookups through pair tables multiply two bytes at once; that is what makes
  the numpy code within reach of zfec's C.

Parameters: ``1 <= k < n <= 255`` (a codeword has at most 255 symbols; ``k ==
n`` is refused because a code without parity survives no loss). The shard
length for ``size`` bytes is ``ceil(size / k)``, so an empty input codes into
``n`` empty shards, and decoding them with ``size=0`` gives ``b""`` back.
"""

from __future__ import annotations

import functools
import numbers
import threading
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import numpy.typing as npt
import reedsolo

from p2pbackup.errors import ErasureError, NotEnoughShardsError
from p2pbackup.model import MAX_SHARDS, BytesLike

_PRIM = 0x11D

#: uint16 words per column block: 1 MiB of every input shard per block. Small
#: blocks keep more in cache and win alone, but every numpy call releases and
#: retakes the GIL, so beside the backup's other threads small blocks lose far
#: more than large ones (docs/performance.md#erasure).
_BLOCK_WORDS = 1 << 19

_U8 = npt.NDArray[np.uint8]
_U16 = npt.NDArray[np.uint16]

# reedsolo keeps its field tables in module globals; serialise our use of it.
_REEDSOLO_LOCK = threading.Lock()


# --- the field ---------------------------------------------------------------


def _build_exp_log() -> tuple[_U8, npt.NDArray[np.intp]]:
    exp = np.zeros(510, dtype=np.uint8)
    log = np.zeros(256, dtype=np.intp)
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        x <<= 1  # multiplying by the generator 2
        if x & 0x100:
            x ^= _PRIM
    # Doubled so that exp[log a + log b] needs no modulo.
    exp[255:] = exp[:255]
    return exp, log


def _build_mul_table() -> _U8:
    exp, log = _build_exp_log()
    table: _U8 = exp[log[:, None] + log[None, :]]
    table[0, :] = 0
    table[:, 0] = 0
    table.setflags(write=False)
    return table


#: _MUL[a, b] is a·b in the field.
_MUL = _build_mul_table()


def _build_inverse_table() -> _U8:
    rows, cols = np.nonzero(_MUL == 1)
    inverse = np.zeros(256, dtype=np.uint8)
    inverse[rows] = cols
    inverse.setflags(write=False)
    return inverse


#: _INV[a] is 1/a (and _INV[0] is 0, never used as a divisor).
_INV = _build_inverse_table()


def _matmul(a: _U8, b: _U8) -> _U8:
    """The field product of matrices ``a`` (r × k) and ``b`` (k × c)."""
    products = _MUL[a[:, :, None], b[None, :, :]]
    result: _U8 = np.bitwise_xor.reduce(products, axis=1).astype(np.uint8)
    return result


def _invert(matrix: _U8) -> _U8:
    """Invert a square matrix over the field by Gauss-Jordan elimination."""
    size = matrix.shape[0]
    work = np.concatenate([matrix, np.eye(size, dtype=np.uint8)], axis=1)
    for col in range(size):
        pivots = np.nonzero(work[col:, col])[0]
        if pivots.size == 0:
            raise ErasureError("the chosen shards do not determine the data (singular matrix)")
        pivot = col + int(pivots[0])
        work[[col, pivot]] = work[[pivot, col]]
        work[col] = _MUL[_INV[work[col, col]], work[col]]
        factors = work[:, col].copy()
        factors[col] = 0
        work ^= _MUL[factors[:, None], work[col][None, :]]
    return np.ascontiguousarray(work[:, size:])


# --- the code's matrices -------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _generator_matrix(k: int, n: int) -> _U8:
    """``G`` (n × k): identity over the parity matrix that reedsolo defines.

    Parity is linear in the message, so reedsolo's parity for the unit message
    ``e_j`` is column ``j`` of the parity matrix.
    """
    matrix = np.zeros((n, k), dtype=np.uint8)
    matrix[:k] = np.eye(k, dtype=np.uint8)
    with _REEDSOLO_LOCK:
        codec = reedsolo.RSCodec(n - k)
        for j in range(k):
            unit = bytearray(k)
            unit[j] = 1
            codeword = codec.encode(unit)
            matrix[k:, j] = np.frombuffer(bytes(codeword[k:]), dtype=np.uint8)
    matrix.setflags(write=False)
    return matrix


@functools.lru_cache(maxsize=1024)
def _decoding_matrix(k: int, n: int, present: tuple[int, ...]) -> _U8:
    """The inverse of the rows ``present`` of ``G``: present shards → data shards."""
    inverse = _invert(_generator_matrix(k, n)[list(present)])
    inverse.setflags(write=False)
    return inverse


def _rebuild_matrix(k: int, n: int, present: tuple[int, ...], wanted: Sequence[int]) -> _U8:
    """Coefficients that turn the ``present`` shards into the ``wanted`` ones."""
    rows = _generator_matrix(k, n)[list(wanted)]
    return _matmul(rows, _decoding_matrix(k, n, present))


@functools.lru_cache(maxsize=256)
def _pair_table(coefficient: int) -> _U16:
    # Viewing every uint16 as its two native-order bytes makes the table
    # correct on either endianness.
    pairs = np.arange(65536, dtype=np.uint16).view(np.uint8)
    table: _U16 = _MUL[coefficient][pairs].view(np.uint16)
    table.setflags(write=False)
    return table


# --- the vectorised kernel ---------------------------------------------------


def _apply(
    matrix: _U8, inputs: Sequence[_U16], out: Sequence[_U16] | _U16 | None = None
) -> Sequence[_U16] | _U16:
    """Return ``matrix · inputs`` over the field, two bytes per uint16 word.

    ``inputs`` are equal-length word arrays, one per column of ``matrix``;
    the result goes into ``out`` (one word array per row, e.g. views into the
    caller's buffers) or a new array. Work goes block by block so that each
    input block is widened to indices once and then looked up by every output
    row while it is in cache.
    """
    rows, cols = matrix.shape
    width = inputs[0].shape[0] if cols else 0
    if out is None:
        out = np.zeros((rows, width), dtype=np.uint16)
    else:
        # Every row is written by its first term; a row without any stays zero.
        for row in range(rows):
            if not matrix[row].any():
                out[row][:] = 0
    terms = _column_terms(matrix)
    # Columns whose coefficients are all 1 are XORed in as they are.
    needs_index = [any(c > 1 for _, c, _ in column) for column in terms]
    tables = {c: _pair_table(c) for c in np.unique(matrix).tolist() if c > 1}
    index = np.empty(min(width, _BLOCK_WORDS), dtype=np.intp)
    scratch = np.empty(min(width, _BLOCK_WORDS), dtype=np.uint16)
    for start in range(0, width, _BLOCK_WORDS):
        stop = min(start + _BLOCK_WORDS, width)
        idx = index[: stop - start]
        tmp = scratch[: stop - start]
        for source, column, widen in zip(inputs, terms, needs_index, strict=True):
            block = source[start:stop]
            if widen:
                np.copyto(idx, block)
            for row, c, first in column:
                dst = out[row][start:stop]
                if c == 1:
                    product = block
                else:
                    product = dst if first else tmp
                    np.take(tables[c], idx, out=product, mode="clip")
                if first:
                    if product is not dst:
                        np.copyto(dst, product)
                else:
                    np.bitwise_xor(dst, product, out=dst)
    return out


def _column_terms(matrix: _U8) -> list[list[tuple[int, int, bool]]]:
    """Per input column: (output row, coefficient, is the row's first term)."""
    seen: set[int] = set()
    terms: list[list[tuple[int, int, bool]]] = []
    for col in range(matrix.shape[1]):
        column = []
        for row in range(matrix.shape[0]):
            c = int(matrix[row, col])
            if c:
                column.append((row, c, row not in seen))
                seen.add(row)
        terms.append(column)
    return terms


def _to_words(rows: Sequence[_U8], length: int) -> list[_U16]:
    """View equal-length byte rows as uint16 words, padding odd lengths by a zero."""
    if length % 2 == 0:
        return [row.view(np.uint16) for row in rows]
    padded = np.zeros((len(rows), length + 1), dtype=np.uint8)
    for i, row in enumerate(rows):
        padded[i, :length] = row
    return list(padded.view(np.uint16))


def _word_rows_as_bytes(words: _U16, length: int) -> list[_U8]:
    return [row.view(np.uint8)[:length] for row in words]


# --- validation ----------------------------------------------------------------


def _check_code(k: int, n: int) -> None:
    if not (_is_int(k) and _is_int(n) and 1 <= k < n <= MAX_SHARDS):
        raise ErasureError(
            f"bad erasure code parameters k={k!r}, n={n!r}: need 1 <= k < n <= {MAX_SHARDS}"
        )


def _is_int(value: object) -> bool:
    # numbers.Integral admits numpy integers; bool is an int but never meant as one here.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_index(index: int, n: int) -> int:
    if not (_is_int(index) and 0 <= index < n):
        raise ErasureError(f"shard index {index!r} is out of range 0..{n - 1}")
    return int(index)


def _shard_arrays(shards: Mapping[int, BytesLike], n: int) -> tuple[dict[int, _U8], int]:
    """Validate indices and lengths; return the shards as byte arrays and their length."""
    arrays = {_check_index(i, n): np.frombuffer(s, dtype=np.uint8) for i, s in shards.items()}
    lengths = {a.shape[0] for a in arrays.values()}
    if len(lengths) > 1:
        raise ErasureError(f"shards have unequal lengths: {sorted(lengths)}")
    return arrays, lengths.pop() if lengths else 0


def _choose(arrays: Mapping[int, _U8], k: int) -> tuple[int, ...]:
    """Pick k present shards, data shards first (they need no arithmetic)."""
    if len(arrays) < k:
        raise NotEnoughShardsError(f"decoding needs {k} shards; {len(arrays)} were given")
    return tuple(sorted(arrays)[:k])


# --- public API ---------------------------------------------------------------


def shard_length(size: int, k: int) -> int:
    """Length of every shard when ``size`` bytes are coded with ``k`` data shards."""
    if not _is_int(size) or size < 0:
        raise ErasureError(f"data size must be a non-negative integer, not {size!r}")
    if not _is_int(k) or k < 1:
        raise ErasureError(f"k must be a positive integer, not {k!r}")
    return -(-size // k)


def encode(data: BytesLike, k: int, n: int) -> list[bytes]:
    """Code ``data`` into ``n`` shards of :func:`shard_length` bytes; any ``k`` restore it."""
    return [bytes(view) for view in encode_views(data, k, n)]


def encode_views(data: BytesLike, k: int, n: int) -> list[memoryview]:
    """:func:`encode` without copying: the data shards are views into ``data``
    (or into its zero-padded copy) and the parity shards views into one array.

    For a caller that copies each shard once anyway (behind a header, onto a
    disk): it saves a quarter of the encoding time and a pack's worth of memory.
    """
    _check_code(k, n)
    flat = np.frombuffer(data, dtype=np.uint8)
    length = shard_length(flat.shape[0], k)
    if flat.shape[0] != k * length:
        flat = np.concatenate([flat, np.zeros(k * length - flat.shape[0], dtype=np.uint8)])
    rows = list(flat.reshape(k, length))
    parity = _apply(_generator_matrix(k, n)[k:], _to_words(rows, length))
    assert isinstance(parity, np.ndarray)
    return [row.data for row in rows + _word_rows_as_bytes(parity, length)]


def unfilled_buffers(count: int, size: int) -> list[memoryview]:
    """``count`` writable buffers of ``size`` bytes whose contents are undefined,
    for :func:`encode_into` (which writes every byte of its outputs).

    ``bytearray(size)`` would clear each one first, holding the GIL: for the
    shards of a pack that was as much work as the coding itself.
    """
    if count < 0 or size < 0:
        raise ErasureError(f"cannot make {count} buffers of {size} bytes")
    return [np.empty(size, dtype=np.uint8).data for _ in range(count)]


def encode_into(data: BytesLike, k: int, n: int, outputs: Sequence[memoryview]) -> None:
    """:func:`encode` into the caller's ``n`` writable buffers of
    :func:`shard_length` bytes each (e.g. each behind a header in the buffer
    that will be stored): no array of parity and no copy of it."""
    encode_parts_into((data,), k, n, outputs)


def encode_parts_into(
    parts: Sequence[BytesLike], k: int, n: int, outputs: Sequence[memoryview]
) -> None:
    """:func:`encode_into` of the concatenation of ``parts``, never made: each
    part is copied straight to its place in the data shards (a pack is coded
    from its blobs without being joined first)."""
    _check_code(k, n)
    sources = [np.frombuffer(part, dtype=np.uint8) for part in parts]
    size = sum(source.shape[0] for source in sources)
    length = shard_length(size, k)
    if len(outputs) != n:
        raise ErasureError(f"encode_into needs {n} output buffers, got {len(outputs)}")
    targets = [np.frombuffer(out, dtype=np.uint8) for out in outputs]
    if any(target.shape[0] != length for target in targets):
        raise ErasureError(f"every output buffer must be {length} bytes")
    if length % 2:
        # Words need an even length: go through the padded arrays instead.
        joined = b"".join(parts)
        for target, shard in zip(targets, encode_views(joined, k, n), strict=True):
            target[:] = np.frombuffer(shard, dtype=np.uint8)
        return
    position = 0
    for source in sources:
        offset = 0
        while offset < source.shape[0]:
            row, within = divmod(position, length)
            take = min(length - within, source.shape[0] - offset)
            targets[row][within : within + take] = source[offset : offset + take]
            position += take
            offset += take
    # The rest of the data shards is the code's zero padding.
    for row in range(k):
        start = min(max(position - row * length, 0), length)
        targets[row][start:] = 0
    words = [target.view(np.uint16) for target in targets]
    _apply(_generator_matrix(k, n)[k:], words[:k], words[k:])


def decode(shards: Mapping[int, BytesLike], k: int, n: int, size: int) -> bytes:
    """Return the ``size`` bytes that were encoded, from any ``k`` of the shards."""
    return b"".join(decode_pieces(shards, k, n, size))


def decode_pieces(shards: Mapping[int, BytesLike], k: int, n: int, size: int) -> list[memoryview]:
    """:func:`decode`'s bytes unjoined: in order, one piece per data shard
    (the last cut short), each a view of a shard given or rebuilt. A reader
    of one blob at a time needs no copy of the whole
    (:func:`p2pbackup.core.packer.blob_bytes`)."""
    _check_code(k, n)
    arrays, length = _shard_arrays(shards, n)
    present = _choose(arrays, k)
    if not _is_int(size) or not 0 <= size <= k * length:
        raise ErasureError(
            f"cannot decode {size!r} bytes from {k} shards of {length} bytes (at most {k * length})"
        )
    missing = [i for i in range(k) if i not in arrays]
    if missing:
        arrays = {**arrays, **_rebuild(arrays, k, n, present, missing, length)}
    return _data_pieces(arrays, k, length, size)


def reconstruct(
    shards: Mapping[int, BytesLike], k: int, n: int, wanted: Iterable[int]
) -> dict[int, bytes]:
    """Rebuild the shards listed in ``wanted`` (data or parity) from any ``k`` present ones.

    Wanted shards that are already present are returned as given.
    """
    _check_code(k, n)
    arrays, length = _shard_arrays(shards, n)
    wanted_list = [_check_index(i, n) for i in wanted]
    if len(set(wanted_list)) != len(wanted_list):
        raise ErasureError(f"wanted shard indices repeat: {wanted_list}")
    present = _choose(arrays, k)
    absent = [i for i in wanted_list if i not in arrays]
    rebuilt = _rebuild(arrays, k, n, present, absent, length) if absent else {}
    return {i: rebuilt[i].tobytes() if i in rebuilt else arrays[i].tobytes() for i in wanted_list}


def _rebuild(
    arrays: Mapping[int, _U8],
    k: int,
    n: int,
    present: tuple[int, ...],
    wanted: Sequence[int],
    length: int,
) -> dict[int, _U8]:
    """Compute the ``wanted`` shards (absent ones) from the ``present`` ones."""
    matrix = _rebuild_matrix(k, n, present, wanted)
    words = _apply(matrix, _to_words([arrays[i] for i in present], length))
    assert isinstance(words, np.ndarray)
    return dict(zip(wanted, _word_rows_as_bytes(words, length), strict=True))


def _data_pieces(arrays: Mapping[int, _U8], k: int, length: int, size: int) -> list[memoryview]:
    pieces = []
    for i in range(k):
        take = min(length, size - i * length)
        if take <= 0:
            break
        pieces.append(arrays[i][:take].data)
    return pieces
