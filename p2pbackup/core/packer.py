"""Packs: many sealed blobs in one padded, opaque byte string.

Layout of a pack (all of it looks like random bytes to anyone without the
data key — which matters, because the code is systematic and the first k
shards *are* the pack's bytes)::

    sealed blob 0 | sealed blob 1 | ... | sealed header | random padding | sealed trailer

* **sealed header** — ``seal(data_key, encode_pack_header(...))``: the table of
  contents (type, id, offset, lengths of each blob), so an index can be rebuilt
  from the packs alone.
* **padding** — random bytes bringing the total length to the pack's
  **bucket**, so that a pack's size says little about what it holds.
* **sealed trailer** — fixed size; holds the header's offset and length.

Sizes:

* the **target** — the repository's pack size (``RepositoryConfig.pack_size``):
  a builder takes blobs while they fit in it (:meth:`PackBuilder.fits`), so
  every pack closed because the next blob did not fit is a **full pack**;
* the **buckets** — the sizes a pack is padded to (:func:`pack_buckets`): the
  target, and the target halved again and again down to at least
  :data:`MIN_PACK_BUCKET` (for 12 MiB: 12 MiB, 6 MiB … 96 KiB, 48 KiB). A pack
  is padded to the smallest bucket it fits in, so a full pack is exactly the
  target, and a pack of one blob larger than the target (a chunk size above
  the pack size) is padded to a whole number of targets (:func:`pack_bucket`).

Why halving: a peer sees only which bucket a pack fell in, and two packs
whose contents differ by under 10 % fall in the same bucket unless a bucket's
edge lies between them (docs/privacy.md states for which sizes that holds);
each bucket at most doubles what it holds (docs/performance.md#padding).

A **pack id** is 32 random bytes (:func:`new_pack_id`).
"""

from __future__ import annotations

import struct

from p2pbackup.core import crypto, formats
from p2pbackup.errors import FormatError
from p2pbackup.model import BlobEntry, BlobType, BytesLike, PackHeader

_TRAILER_PLAIN = struct.Struct("<BQQ")
_TRAILER_VERSION = 1
#: Size of the sealed trailer at the very end of every pack.
TRAILER_SIZE = _TRAILER_PLAIN.size + crypto.SEAL_OVERHEAD
_HEADER_AAD = b"p2pbackup-pack-header"
_TRAILER_AAD = b"p2pbackup-pack-trailer"


#: The smallest bucket is the target halved while the half stays at least this.
MIN_PACK_BUCKET = 32 * 1024
#: The most a sealed pack header grows by per blob: a 5-item array of the
#: type, the 32-byte id (bin8), offset and length (each below 2**32, as packs
#: are at most MAX_PACK_SIZE) and raw length (up to 2**32, a uint64).
_HEADER_ENTRY_BOUND = 1 + 1 + (2 + 32) + 5 + 5 + 9
#: The rest of a sealed pack header at most: magic and version, the outer
#: array, the entries' array header (up to 2**32 items), and the seal.
_HEADER_FIXED_BOUND = 5 + 1 + 5 + crypto.SEAL_OVERHEAD


def pack_buckets(target: int) -> list[int]:
    """The sizes packs of a repository with pack size ``target`` are padded
    to, smallest first (module docstring)."""
    if target < 1:
        raise ValueError(f"pack target must be positive, got {target}")
    sizes = [target]
    while (half := -(-sizes[-1] // 2)) >= MIN_PACK_BUCKET and half < sizes[-1]:
        sizes.append(half)
    return sizes[::-1]


def pack_bucket(length: int, target: int) -> int:
    """The size a pack of ``length`` bytes (blobs, sealed header and
    trailer) is padded to: the smallest bucket it fits in, or above the
    target a whole number of targets."""
    if length > target:
        return -(-length // target) * target
    return next(size for size in pack_buckets(target) if size >= length)


#: Bytes of a pack id.
PACK_ID_SIZE = 32


def new_pack_id() -> bytes:
    """A fresh pack id: random, and only a name.

    Nothing ever recomputes it from the pack: each shard is checked against
    its Merkle root in the index and each blob by its AEAD tag. A pack's bytes
    are unique anyway (random nonces and padding), so hashing all of them,
    as packs written before did, bought nothing and cost as much CPU as
    the erasure code.
    """
    return crypto.random_bytes(PACK_ID_SIZE)


class PackBuilder:
    """Accumulates sealed blobs and finishes them into a pack padded to its
    bucket for the pack size ``target`` (module docstring)."""

    def __init__(self, target: int) -> None:
        if target < 1:
            raise ValueError(f"pack target must be positive, got {target}")
        self.target = target
        self._full = False
        self._parts: list[bytes] = []
        self._entries: list[BlobEntry] = []
        self._size = 0

    @property
    def size(self) -> int:
        """Bytes of sealed blobs added so far."""
        return self._size

    @property
    def entries(self) -> tuple[BlobEntry, ...]:
        return tuple(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def fits(self, length: int) -> bool:
        """Whether a sealed blob of ``length`` bytes still fits in the target
        with the header and trailer; an empty builder takes any blob.

        A builder that said no is **full**: it is padded to the whole target,
        whatever it holds, so that every full pack has the one size.
        """
        if not self._entries:
            return True
        count = len(self._entries) + 1
        header = _HEADER_FIXED_BOUND + count * _HEADER_ENTRY_BOUND
        if self._size + length + header + TRAILER_SIZE <= self.target:
            return True
        self._full = True
        return False

    def add(self, blob_type: BlobType, ident: bytes, sealed: bytes, raw_length: int) -> None:
        self._entries.append(BlobEntry(blob_type, ident, self._size, len(sealed), raw_length))
        self._parts.append(sealed)
        self._size += len(sealed)

    def finish_parts(self, data_key: bytes) -> tuple[list[bytes], PackHeader]:
        """The finished pack as the parts whose concatenation it is, and its
        header: a pack coded straight from its parts is never copied whole."""
        header = PackHeader(tuple(self._entries))
        sealed_header = crypto.seal(data_key, formats.encode_pack_header(header), aad=_HEADER_AAD)
        body = self._size + len(sealed_header)
        total = pack_bucket(body + TRAILER_SIZE, self.target)
        if self._full:
            total = max(total, self.target)
        trailer = crypto.seal(
            data_key,
            _TRAILER_PLAIN.pack(_TRAILER_VERSION, self._size, len(sealed_header)),
            aad=_TRAILER_AAD,
        )
        padding = crypto.random_bytes(total - body - TRAILER_SIZE)
        parts = [*self._parts, sealed_header, padding, trailer]
        # The parts are the caller's now; keeping them too would hold them longer.
        self._parts = []
        return parts, header


def read_pack_header(data_key: bytes, pack: BytesLike) -> PackHeader:
    """The table of contents of a pack (used when rebuilding an index from packs)."""
    view = memoryview(pack)
    if len(view) < TRAILER_SIZE:
        raise FormatError(f"pack: {len(view)} bytes is shorter than its trailer")
    plain = crypto.unseal(data_key, view[-TRAILER_SIZE:], aad=_TRAILER_AAD)
    version, offset, length = _TRAILER_PLAIN.unpack(plain)
    if version != _TRAILER_VERSION:
        raise FormatError(f"pack trailer: unknown version {version}")
    if offset + length > len(view) - TRAILER_SIZE:
        raise FormatError("pack trailer: header lies outside the pack")
    header_plain = crypto.unseal(data_key, view[offset : offset + length], aad=_HEADER_AAD)
    header = formats.decode_pack_header(header_plain)
    for entry in header.entries:
        if entry.offset + entry.length > offset:
            raise FormatError("pack header: a blob lies outside the blob area")
    return header


def blob_bytes(pack: BytesLike | list[memoryview], entry: BlobEntry) -> memoryview:
    """The sealed bytes of one blob of a pack: of the pack's bytes, or of the
    pieces :func:`p2pbackup.core.erasure.decode_pieces` gave (all of one
    length but the last), joined only for a blob that spans two of them."""
    start, end = entry.offset, entry.offset + entry.length
    pieces = pack if isinstance(pack, list) else [memoryview(pack)]
    piece_length = len(pieces[0]) if pieces else 0
    if end > sum(len(piece) for piece in pieces):
        raise FormatError(f"blob {entry.blob_id.hex()[:16]}: lies beyond the end of its pack")
    if entry.length == 0:
        return memoryview(b"")
    first, last = start // piece_length, (end - 1) // piece_length
    base = first * piece_length
    if first == last:
        return pieces[first][start - base : end - base]
    parts = [pieces[first][start - base :]]
    parts += pieces[first + 1 : last]
    parts.append(pieces[last][: end - last * piece_length])
    return memoryview(b"".join(parts))
