"""A shard store in memory, for tests and the simulator.

Nouns are those of :mod:`p2pbackup.stores.shardstore`; the only one of its
own is the **capacity**, the most bytes a memory store holds.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence

import attrs
import trio

from p2pbackup.errors import ShardNotFoundError, StoreFullError
from p2pbackup.model import BytesLike
from p2pbackup.stores.shardstore import (
    STALE_TEMP_SECONDS,
    ShardRoot,
    Space,
    answer_audit,
    check_range,
    check_shard_id,
    conflict,
    slice_range,
)
from p2pbackup.wire.messages import AuditProof


# eq=False: a store is a resource, equal only to itself (and hashable).
@attrs.define(eq=False)
class MemoryShardStore:
    """A shard store in memory, for tests and the simulator.

    ``capacity`` (bytes, None for unlimited) bounds :meth:`usage`; an operation
    that would exceed it raises StoreFullError and changes nothing.
    """

    capacity: int | None = None
    _shards: dict[bytes, bytes] = attrs.field(factory=dict, init=False, repr=False)
    _root: bytes | None = attrs.field(default=None, init=False, repr=False)
    _used: int = attrs.field(default=0, init=False)

    def _reserve(self, added: int, freed: int = 0) -> None:
        if self.capacity is not None and self._used - freed + added > self.capacity:
            raise StoreFullError(
                f"memory store is full: {added} more bytes would exceed its "
                f"capacity of {self.capacity} bytes ({self._used} used)"
            )
        self._used += added - freed

    # Each method yields to the scheduler first and then acts without another
    # checkpoint, so every operation is atomic with respect to other tasks.

    async def put(
        self, shard_id: bytes, data: BytesLike, root: ShardRoot | None = None
    ) -> int | None:
        await trio.lowlevel.checkpoint()
        check_shard_id(shard_id)
        existing = self._shards.get(shard_id)
        if existing is not None:
            if existing == data:
                return None
            raise conflict(shard_id, "in the memory store")
        self._reserve(len(data))
        self._shards[shard_id] = bytes(data)
        return None

    async def get(self, shard_id: bytes, offset: int = 0, length: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        check_shard_id(shard_id)
        check_range(offset, length)
        return slice_range(self._shard(shard_id), offset, length)

    def _shard(self, shard_id: bytes) -> bytes:
        data = self._shards.get(shard_id)
        if data is None:
            raise ShardNotFoundError(f"shard {shard_id.hex()} is not in the memory store")
        return data

    async def has(self, shard_id: bytes) -> bool:
        await trio.lowlevel.checkpoint()
        check_shard_id(shard_id)
        return shard_id in self._shards

    async def delete(self, shard_id: bytes) -> None:
        await trio.lowlevel.checkpoint()
        check_shard_id(shard_id)
        data = self._shards.pop(shard_id, None)
        if data is not None:
            self._used -= len(data)

    async def audit(
        self, shard_id: bytes, nonce: bytes, indices: Sequence[int], block_size: int
    ) -> AuditProof:
        await trio.lowlevel.checkpoint()
        check_shard_id(shard_id)
        data = memoryview(self._shard(shard_id))
        return answer_audit(
            lambda offset, length: data[offset : offset + length],
            len(data),
            nonce,
            indices,
            block_size,
        )

    async def list(self) -> builtins.list[bytes]:
        await trio.lowlevel.checkpoint()
        return sorted(self._shards)

    async def put_root(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self._reserve(len(data), freed=len(self._root or b""))
        self._root = bytes(data)

    async def get_root(self) -> bytes | None:
        await trio.lowlevel.checkpoint()
        return self._root

    async def usage(self) -> int:
        await trio.lowlevel.checkpoint()
        return self._used

    async def space(self) -> Space:
        await trio.lowlevel.checkpoint()
        room = None if self.capacity is None else self.capacity - self._used
        return Space.with_room(self._used, room)

    async def collect_garbage(self, older_than: float = STALE_TEMP_SECONDS) -> int:
        return 0  # every put is whole or absent

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()  # nothing held open
