"""A pack's shards as they are stored: coded from a finished pack, and checked
when one is read back.

* **coded pack** — a pack erasure-coded into its n **payloads**, each the
  bytes one peer stores: a versioned shard header, then the shard's data. Its
  **roots** are the Merkle roots over each whole payload, header included:
  what a host verifies on upload and answers audits against, and what the
  index keeps to check a shard read back.
* **rebuilt shard** — a shard coded again from any k others of its pack
  (:func:`rebuild_shards`): the same bytes as the original, header and all,
  so the same Merkle root.

The functions here run in worker threads and do no I/O: joining, hashing and
coding a pack takes tens of milliseconds, which on the event loop would stall
every upload in flight. They import the erasure code (numpy) when they run,
not with the module, so that commands which code nothing start without it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs

from p2pbackup.core import formats, merkle, packer
from p2pbackup.errors import IntegrityError
from p2pbackup.model import BytesLike, PackRecord, ShardHeader, ShardLocation


@attrs.define(eq=False)
class CodedPack:
    """A pack coded into its shards, ready to upload (module docstring)."""

    pack_id: bytes
    #: Bytes of the pack before coding.
    size: int
    #: Shard i's stored bytes; emptied by :meth:`release` once sent.
    payloads: list[memoryview]
    roots: list[bytes]
    #: Bytes of each shard's data, without its header.
    shard_size: int

    @property
    def stored_size(self) -> int:
        """Bytes one stored shard takes, header included."""
        return formats.SHARD_HEADER_SIZE + self.shard_size

    def release(self, index: int) -> None:
        """Shard ``index`` is sent: let its bytes go."""
        self.payloads[index] = memoryview(b"")


def finish_pack(
    builder: packer.PackBuilder, data_key: bytes, k: int, n: int, block_size: int
) -> CodedPack:
    """A new pack of ``builder``'s blobs, coded ``k``-of-``n``."""
    parts, _header = builder.finish_parts(data_key)
    ident = packer.new_pack_id()
    pack_size = sum(len(part) for part in parts)
    payloads, roots, shard_size = encode_pack(parts, pack_size, k, n, block_size)
    # The blobs are dropped here: only the shards live on, so memory stays
    # bounded by the shards of the packs in flight.
    return CodedPack(ident, pack_size, payloads, roots, shard_size)


def encode_pack(
    parts: list[bytes], pack_size: int, k: int, n: int, block_size: int
) -> tuple[list[memoryview], list[bytes], int]:
    """The n payloads of a pack, their roots, and the shard size.

    Each shard is coded straight into the buffer that will be stored, behind
    its header, from the pack's parts: the pack is never joined, there is no
    parity array beside the shards, and no copy of a shard (each a memcpy
    under the GIL) puts the header in front.
    """
    from p2pbackup.core import erasure  # numpy: see the module docstring

    shard_size = erasure.shard_length(pack_size, k)
    head = formats.SHARD_HEADER_SIZE
    payloads = erasure.unfilled_buffers(n, head + shard_size)
    erasure.encode_parts_into(parts, k, n, [payload[head:] for payload in payloads])
    roots: list[bytes] = []
    for index in range(n):
        payloads[index][:head] = _header(None, index, k, n, pack_size, shard_size, block_size)
        # Over the whole stored shard, header included (module docstring).
        roots.append(merkle.merkle_root(payloads[index], block_size))
    return payloads, roots, shard_size


def _header(
    pack_id: bytes | None,
    index: int,
    k: int,
    n: int,
    pack_size: int,
    shard_size: int,
    block_size: int,
) -> bytes:
    """A shard header: version 2 (naming no pack) for ``pack_id`` None."""
    return formats.encode_shard_header(
        ShardHeader(
            pack_id=pack_id,
            index=index,
            k=k,
            n=n,
            pack_size=pack_size,
            shard_size=shard_size,
            block_size=block_size,
        )
    )


@attrs.frozen
class RebuiltShard:
    """A shard coded again (module docstring): its stored bytes and root."""

    payload: bytes = attrs.field(repr=lambda p: f"<{len(p)} bytes>")
    root: bytes = attrs.field(repr=lambda r: r.hex()[:16])


def rebuild_shards(
    record: PackRecord, good: Mapping[int, BytesLike], wanted: Sequence[int]
) -> dict[int, RebuiltShard]:
    """Shards ``wanted`` of the pack ``record`` describes, from the data of
    any k of its other shards (``good``: index → data, verified)."""
    from p2pbackup.core import erasure  # numpy: see the module docstring

    data = erasure.reconstruct(good, record.k, record.n, wanted)
    known = {location.index: location.merkle_root for location in record.shards}
    geometry = (record.k, record.n, record.size, record.shard_size, record.block_size)
    rebuilt = {}
    for index, shard in data.items():
        payload = _header(None, index, *geometry) + shard
        root = merkle.merkle_root(payload, record.block_size)
        if index in known and root != known[index]:
            # Written before headers stopped naming the pack: rebuilt as it was.
            older = _header(record.pack_id, index, *geometry) + shard
            older_root = merkle.merkle_root(older, record.block_size)
            if older_root == known[index]:
                payload, root = older, older_root
        rebuilt[index] = RebuiltShard(payload, root)
    return rebuilt


def verify_shard(record: PackRecord, location: ShardLocation, raw: bytes) -> bytes:
    """The data of a stored shard, once its root and header match the index."""
    merkle.verify_root(raw, record.block_size, location.merkle_root)
    header = formats.decode_shard_header(raw)
    expected = (location.index, record.k, record.n, record.size, record.shard_size)
    got = (header.index, header.k, header.n, header.pack_size, header.shard_size)
    # Headers since version 2 name no pack; the Merkle root, which the index
    # kept for this very shard, binds it to its pack all the same.
    if got != expected or header.pack_id not in (None, record.pack_id):
        raise IntegrityError("shard header does not match the index")
    data = raw[formats.SHARD_HEADER_SIZE :]
    if len(data) != record.shard_size:
        raise IntegrityError(f"shard is {len(data)} bytes, expected {record.shard_size}")
    return data
