"""The shard-store interface: what the engine asks of every place shards live.

Nouns:

* **shard id** — 32 opaque bytes that name a shard (the engine chooses them).
* **owner** — the node whose shards a namespace holds, as bytes (its node id).
* **shard store** — :class:`ShardStore`: one owner's namespace on one peer.
  Shards are *write-once*: an id, once stored, always means the same bytes
  until it is deleted. Beside the shards sits one mutable object, the owner's
  **root record** (opaque bytes here), which is replaced whole and atomically.
* **usage** — the bytes a store holds for its owner: the lengths of its shards
  plus the length of its root record.
* **offer** — the most bytes the store would hold for its owner now: the
  usage plus the **room** left for more (the least of what the peer's quotas
  and its disk still allow). :class:`Space` is the pair (used, offered);
  ``offered`` is None when nothing bounds it (a memory store without a
  capacity). An offer is an estimate of the moment, not a promise: a put
  may still be refused as full.
* **shard root** — :class:`ShardRoot`: the Merkle root of a shard's bytes,
  with the block size it was computed over.
* **audit answer** — a :class:`~p2pbackup.wire.messages.AuditProof`, the
  storage protocol's own: some blocks of a shard, each with its Merkle proof,
  computed from the bytes the store holds *now*, so that a store whose bytes
  rotted (a folder on a failing disk as much as a node) answers with proofs
  that fail against the root its owner kept.

Stores verify nothing they read: the engine checks Merkle roots and AEAD tags,
so a corrupted shard is returned as it is.

The argument checks every store applies live here too, and the storage
node's shard host with them. Misuse by code — a shard id that is not 32
bytes, a negative offset or length — raises ``ValueError``; the shard host,
which checks what a peer sent, passes its own error class instead.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Sequence
from typing import Protocol

import attrs

from p2pbackup.core.merkle import prove_blocks
from p2pbackup.errors import StoreError, StoreRequestError
from p2pbackup.model import ID_SIZE, BytesLike
from p2pbackup.wire.messages import MAX_AUDIT_BLOCKS, AuditProof

#: Temp files older than this are a crash's leftovers, whoever wrote them; a
#: younger one may belong to another process writing to the same store now.
STALE_TEMP_SECONDS = 3600.0


@attrs.frozen
class Space:
    """What a store holds for its owner and the most it offers (module docstring)."""

    used: int
    #: Used plus the room left; None: unbounded.
    offered: int | None

    @property
    def room(self) -> int | None:
        """Bytes more the store would take now (None: unbounded)."""
        return None if self.offered is None else max(0, self.offered - self.used)

    @classmethod
    def with_room(cls, used: int, room: int | None) -> Space:
        return cls(used, None if room is None else used + max(0, room))


@attrs.frozen
class ShardRoot:
    """The Merkle root of a shard's bytes cut into ``block_size`` blocks."""

    block_size: int
    root: bytes


class ShardStore(Protocol):
    """One owner's namespace on one peer (async; see the module docstring)."""

    async def put(
        self, shard_id: bytes, data: BytesLike, root: ShardRoot | None = None
    ) -> int | None:
        """Store a shard. Putting an id again with identical bytes does nothing;
        with different bytes raises StoreError and keeps the stored shard.
        StoreFullError when there is no room. ``root``, when the caller has
        computed it, saves a store that must declare it (a remote one) the work.

        Returns the shard's lease expiry (unix seconds) on a store that keeps
        shards under leases (a node), None on one that keeps them until
        deleted (a folder, memory)."""

    async def get(self, shard_id: bytes, offset: int = 0, length: int | None = None) -> bytes:
        """The shard's bytes from ``offset``, at most ``length`` of them (all
        to the end when None). A range past the end returns what exists: a
        shorter tail, or b"" when ``offset`` is at or beyond the end.
        ShardNotFoundError when the shard is absent."""
        ...

    async def has(self, shard_id: bytes) -> bool: ...

    async def delete(self, shard_id: bytes) -> None:
        """Remove a shard; deleting an absent shard is not an error."""

    async def audit(
        self, shard_id: bytes, nonce: bytes, indices: Sequence[int], block_size: int
    ) -> AuditProof:
        """The audit answer (module docstring) for blocks ``indices`` of the
        shard cut into ``block_size``-byte blocks, ``nonce`` echoed.

        A remote store's node cuts the shard in the block size declared when
        it was put (``block_size`` is not sent). ShardNotFoundError when the
        shard is absent; StoreError when an index lies past the blocks the
        store holds or more than the wire's ``MAX_AUDIT_BLOCKS`` are asked.
        The answer is not checked here: its asker verifies it."""
        ...

    async def list(self) -> builtins.list[bytes]:
        """Every stored shard id, sorted."""
        ...

    async def put_root(self, data: bytes) -> None:
        """Replace the owner's root record atomically."""

    async def get_root(self) -> bytes | None:
        """The owner's root record, or None if none was ever put."""
        ...

    async def usage(self) -> int:
        """Bytes held for the owner: its shards plus its root record."""
        ...

    async def space(self) -> Space:
        """The usage and the offer (module docstring): what the store would
        still take, by the peer's own reckoning."""
        ...

    async def collect_garbage(self, older_than: float = STALE_TEMP_SECONDS) -> int:
        """Remove half-written shards left over ``older_than`` seconds ago by
        writers that died, where this store can see them; return how many.
        ``older_than=0`` removes every leftover, safe only while the owner's
        lock keeps every other writer out. A remote node collects its own."""
        ...

    async def aclose(self) -> None:
        """Let go of what the store holds open (connections); it is not used after."""


# -- the checks every store applies ---------------------------------------------------


def check_shard_id(shard_id: object, error: type[Exception] = ValueError) -> None:
    """``error`` unless ``shard_id`` is 32 bytes."""
    if not isinstance(shard_id, bytes) or len(shard_id) != ID_SIZE:
        got = len(shard_id) if isinstance(shard_id, bytes) else type(shard_id).__name__
        raise error(f"a shard id is {ID_SIZE} bytes, got {got}")


def check_range(offset: int, length: int | None, error: type[Exception] = ValueError) -> None:
    """``error`` unless ``offset`` and ``length`` (None: to the end) are not negative."""
    if offset < 0 or (length is not None and length < 0):
        raise error(f"bad shard range: offset {offset}, length {length}")


def slice_range(data: bytes, offset: int, length: int | None) -> bytes:
    """The bytes of ``data`` in a checked range (past the end: what exists)."""
    return data[offset:] if length is None else data[offset : offset + length]


def check_audit_size(indices: Sequence[int]) -> None:
    """StoreRequestError if an audit asks for more blocks than the wire carries."""
    if len(indices) > MAX_AUDIT_BLOCKS:
        raise StoreRequestError(
            f"an audit asks for {len(indices)} blocks; a store answers at most "
            f"{MAX_AUDIT_BLOCKS} at a time"
        )


def answer_audit(
    read: Callable[[int, int], BytesLike],
    size: int,
    nonce: bytes,
    indices: Sequence[int],
    block_size: int,
) -> AuditProof:
    """A store's audit answer from its ``size`` bytes of a shard, which
    ``read(offset, length)`` returns (see :meth:`ShardStore.audit`)."""
    check_audit_size(indices)
    try:
        answers = prove_blocks(read, size, block_size, indices)
    except IndexError as error:
        raise StoreRequestError(f"cannot answer the audit: {error}") from None
    return AuditProof(
        nonce,
        tuple(block for block, _proof in answers),
        tuple(proof for _block, proof in answers),
    )


def conflict(shard_id: bytes, where: str, error: type[StoreError] = StoreError) -> StoreError:
    """The error for a put of other bytes under an id stored ``where`` ("in
    <the place>", and what is known of the stored shard)."""
    return error(
        f"conflict: another shard is stored under id {shard_id.hex()} {where}; "
        "shards are write-once, the stored one was kept"
    )
