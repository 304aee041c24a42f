"""Packs: many sealed blobs in one padded, opaque byte string.

Layout of a pack (all of it looks like random bytes to anyone without the
data key — which matters, because the code is systematic and the first k
shards *are* the pack's bytes)::

    sealed blob 0 | sealed blob 1 | ... | sealed header | random padding | sealed trailer

* **sealed header** — ``seal(data_key, encode_pack_header(...))``: the table of
  contents (type, id, offset, lengths of each blob), so an index can be rebuilt
  from the packs alone.
* **padding** — random bytes bringing the total length to a Padmé bucket, so a
  pack's size says little about what it holds (at most ~12 % overhead on tiny
  packs, under 4 % at the default 12 MiB).
* **sealed trailer** — fixed size; holds the header's offset and length.

A **pack id** is the BLAKE2b-256 of the finished pack's bytes.
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


def padme(length: int) -> int:
    """The Padmé bucket for ``length``: leaks O(log log L) bits of the size.

    Rounds up by clearing the low bits below the top ``floor(log2(log2 L)) + 1``
    significant bits (Nikitin et al., "Reducing Metadata Leakage from Encrypted
    Files and Communication with PURBs", 2019).
    """
    if length < 2:
        return length
    exponent = length.bit_length() - 1
    significant = exponent.bit_length()
    mask = (1 << (exponent - significant)) - 1
    return (length + mask) & ~mask


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
    """Accumulates sealed blobs and finishes them into a pack."""

    def __init__(self) -> None:
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
        total = padme(body + TRAILER_SIZE)
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


def blob_bytes(pack: BytesLike, entry: BlobEntry) -> memoryview:
    """The sealed bytes of one blob of a pack."""
    view = memoryview(pack)
    if entry.offset + entry.length > len(view):
        raise FormatError(f"blob {entry.blob_id.hex()[:16]}: lies beyond the end of its pack")
    return view[entry.offset : entry.offset + entry.length]
