"""Merkle trees over the fixed-size blocks of a shard's data.

Nouns:

* **block** — a shard's data cut into ``block_size`` pieces; the last block may
  be shorter. Empty data is one empty block, so every shard has a root.
* **leaf** — BLAKE2b-256 of one block, personalised ``p2pb-merkle-leaf``.
* **node** — BLAKE2b-256 of the concatenation of two child hashes,
  personalised ``p2pb-merkle-node``. The distinct personalisations mean an
  inner node can never be passed off as a leaf (or the reverse), which is the
  second-preimage attack that RFC 6962 guards against with its 0x00/0x01
  prefixes.
* **level** — the hashes at one height; level 0 holds the leaves. Adjacent
  hashes are paired left to right; an odd hash at the end of a level is
  *promoted* unchanged to the next level. Unlike Bitcoin's duplication of the
  last hash, promotion gives no two leaf sequences the same root, and it yields
  exactly RFC 6962's tree shape (left subtree = the largest power of two).
* **root** — the single hash at the top level (32 bytes). Because leaves and
  nodes are domain-separated, the root also commits to the number of leaves.
* **proof** — the sibling hashes from the leaf up to the root, skipping the
  levels at which the leaf's ancestor was promoted (it has no sibling there).
* **builder** — :class:`MerkleBuilder`: the leaves of data that arrives in
  pieces of any size, hashed block by block as the blocks complete, so that a
  stream's root needs memory for its leaf hashes only (32 bytes per block).

Audits ask a holder for a few blocks and their proofs (:func:`prove_blocks`);
the owner checks them with :func:`verify_block` (or :func:`root_from_proof`)
against the root it kept. Downloads are checked with :func:`verify_root`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import attrs

from p2pbackup.core import crypto
from p2pbackup.errors import MerkleError
from p2pbackup.model import BytesLike

#: Block size used for new shards unless the repository says otherwise.
#: 64 KiB rather than 16: hashing a shard takes a quarter of the calls (each
#: of which releases and retakes the GIL beside the backup's other threads),
#: and an audit of a few blocks still moves only a few hundred KiB.
DEFAULT_BLOCK_SIZE = 64 * 1024
#: Size in bytes of every leaf, node and root.
HASH_SIZE = 32

_LEAF_PERSON = b"p2pb-merkle-leaf"
_NODE_PERSON = b"p2pb-merkle-node"
# Inner nodes hash 64 bytes each: copying a personalised hashlib hasher is
# cheaper for them than a call into libsodium.
_NODE_HASHER = hashlib.blake2b(digest_size=HASH_SIZE, person=_NODE_PERSON)


def block_count(data_size: int, block_size: int) -> int:
    """Number of blocks (leaves) for ``data_size`` bytes; empty data is one block."""
    _check_block_size(block_size)
    if data_size < 0:
        raise ValueError(f"data size must not be negative, got {data_size}")
    return max(1, -(-data_size // block_size))


def leaf_hash(block: BytesLike) -> bytes:
    """Hash of one block as it appears at level 0."""
    # libsodium's BLAKE2b (AVX2) hashes blocks faster than hashlib's, and
    # leaves are nearly all of a tree's hashing (docs/performance.md#merkle).
    return crypto.hash_bytes(block, size=HASH_SIZE, person=_LEAF_PERSON)


def node_hash(left: bytes, right: bytes) -> bytes:
    """Hash of an inner node from its two children."""
    hasher = _NODE_HASHER.copy()
    hasher.update(left)
    hasher.update(right)
    return hasher.digest()


def get_block(data: BytesLike, index: int, block_size: int) -> bytes:
    """Block ``index`` of ``data`` (what an audit answer carries)."""
    view = _byte_view(data)
    count = block_count(len(view), block_size)
    if not 0 <= index < count:
        raise IndexError(f"block {index} out of range (data has {count} blocks)")
    start = index * block_size
    return bytes(view[start : start + block_size])


def merkle_root(data: BytesLike, block_size: int) -> bytes:
    """Root of the tree over ``data`` cut into ``block_size`` blocks."""
    level = _leaves(data, block_size)
    while len(level) > 1:
        level = _next_level(level)
    return level[0]


def verify_root(data: BytesLike, block_size: int, expected_root: bytes) -> None:
    """Raise :class:`MerkleError` unless ``data`` hashes to ``expected_root``."""
    if merkle_root(data, block_size) != expected_root:
        size = len(_byte_view(data))
        raise MerkleError(
            f"Merkle root mismatch: {size} bytes do not hash to {expected_root.hex()}"
        )


@attrs.frozen
class MerkleTree:
    """Every level of a Merkle tree, kept so that proofs can be served."""

    #: ``levels[0]`` are the leaves, ``levels[-1]`` is ``(root,)``.
    levels: tuple[tuple[bytes, ...], ...]

    @classmethod
    def build(cls, data: BytesLike, block_size: int) -> MerkleTree:
        return cls.from_leaves(_leaves(data, block_size))

    @classmethod
    def from_leaves(cls, leaves: Sequence[bytes]) -> MerkleTree:
        """The tree above ``leaves`` (leaf hashes, at least one)."""
        if not leaves:
            raise ValueError("a Merkle tree has at least one leaf")
        level = list(leaves)
        levels = [tuple(level)]
        while len(level) > 1:
            level = _next_level(level)
            levels.append(tuple(level))
        return cls(levels=tuple(levels))

    @property
    def root(self) -> bytes:
        return self.levels[-1][0]

    @property
    def leaf_count(self) -> int:
        return len(self.levels[0])

    def proof(self, index: int) -> tuple[bytes, ...]:
        """Sibling hashes from leaf ``index`` up to the root."""
        if not 0 <= index < self.leaf_count:
            raise IndexError(f"leaf {index} out of range (tree has {self.leaf_count} leaves)")
        siblings: list[bytes] = []
        for level in self.levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):
                siblings.append(level[sibling])
            index //= 2
        return tuple(siblings)


class MerkleBuilder:
    """The Merkle root of data fed in pieces of any size.

    Complete blocks are hashed as soon as they arrive; only the leaf hashes
    and one partial block are kept, so a 16 MiB shard in 64 KiB blocks costs
    8 KiB of hashes however it is cut. :meth:`root` equals
    ``merkle_root(everything fed, block_size)`` at any point.
    """

    def __init__(self, block_size: int) -> None:
        _check_block_size(block_size)
        self.block_size = block_size
        self._leaves: list[bytes] = []
        self._partial = bytearray()
        self._size = 0

    @property
    def size(self) -> int:
        """Bytes fed so far."""
        return self._size

    @property
    def leaf_count(self) -> int:
        """Number of leaves the data fed so far makes (empty data is one leaf)."""
        return block_count(self._size, self.block_size)

    def update(self, data: BytesLike) -> None:
        view = _byte_view(data)
        self._size += len(view)
        block_size = self.block_size
        if self._partial:
            take = min(len(view), block_size - len(self._partial))
            self._partial += view[:take]
            view = view[take:]
            if len(self._partial) < block_size:
                return
            self._leaves.append(leaf_hash(self._partial))
            self._partial.clear()
        # Whole blocks are hashed straight from the caller's buffer, uncopied.
        whole = len(view) - len(view) % block_size
        for start in range(0, whole, block_size):
            self._leaves.append(leaf_hash(view[start : start + block_size]))
        self._partial += view[whole:]

    def leaves(self) -> list[bytes]:
        """The leaf hashes of the data fed so far, the partial last block included."""
        if self._partial or not self._leaves:
            return [*self._leaves, leaf_hash(self._partial)]
        return list(self._leaves)

    def root(self) -> bytes:
        level = self.leaves()
        while len(level) > 1:
            level = _next_level(level)
        return level[0]

    def tree(self) -> MerkleTree:
        """The whole tree of the data fed so far (to serve proofs from)."""
        return MerkleTree.from_leaves(self.leaves())


def proof_length(index: int, leaf_count: int) -> int:
    """How many sibling hashes the proof of leaf ``index`` holds."""
    return sum(1 for side in _path(index, leaf_count) if side is not None)


def verify_block(
    root: bytes, *, index: int, leaf_count: int, block: BytesLike, proof: Sequence[bytes]
) -> None:
    """Raise :class:`MerkleError` unless ``block`` is leaf ``index`` under ``root``.

    ``leaf_count`` comes from the verifier's own knowledge of the shard size,
    never from the prover: it fixes the shape of the path, so a proof of the
    wrong length or for another position cannot verify.
    """
    if root_from_proof(index=index, leaf_count=leaf_count, block=block, proof=proof) != root:
        raise MerkleError(f"Merkle proof for block {index} does not match the root")


def root_from_proof(
    *, index: int, leaf_count: int, block: BytesLike, proof: Sequence[bytes]
) -> bytes:
    """The root that ``block`` and ``proof`` lead to as leaf ``index`` of
    ``leaf_count``; :class:`MerkleError` if the proof has not the shape that
    position needs (its length, or a hash of the wrong size).

    :func:`verify_block` compares it with the root it expects; an audit
    compares the roots of several blocks to tell a wrong shard from a wrong block.
    """
    if leaf_count < 1:
        raise MerkleError(f"Merkle proof: leaf count must be at least 1, got {leaf_count}")
    if not 0 <= index < leaf_count:
        raise MerkleError(f"Merkle proof: block {index} out of range ({leaf_count} blocks)")
    expected = proof_length(index, leaf_count)
    if len(proof) != expected:
        raise MerkleError(
            f"Merkle proof for block {index}: {len(proof)} hashes, expected {expected}"
        )
    current = leaf_hash(block)
    siblings = iter(proof)
    for side in _path(index, leaf_count):
        if side is None:
            continue
        sibling = next(siblings)
        if len(sibling) != HASH_SIZE:
            raise MerkleError(f"Merkle proof for block {index}: hash of {len(sibling)} bytes")
        current = node_hash(sibling, current) if side else node_hash(current, sibling)
    return current


#: Bytes :func:`prove_blocks` reads at a time to rebuild a tree.
PROVE_READ_SIZE = 1 << 20


def prove_blocks(
    read: Callable[[int, int], BytesLike], size: int, block_size: int, indices: Sequence[int]
) -> list[tuple[bytes, tuple[bytes, ...]]]:
    """Blocks ``indices`` of ``size`` bytes of data, each with its proof: what
    a holder answers to an audit.

    ``read(offset, length)`` returns the data's bytes in that range (from
    memory, or from a file). The tree is rebuilt from the bytes as they are
    now, :data:`PROVE_READ_SIZE` at a time, so memory holds the leaf hashes
    and the answer, not the data; damaged bytes give proofs that fail against
    the root of the bytes first stored, which is how their owner learns of
    the damage. IndexError for an index out of range.
    """
    count = block_count(size, block_size)
    for index in indices:
        if not 0 <= index < count:
            raise IndexError(f"block {index} out of range (data has {count} blocks)")
    builder = MerkleBuilder(block_size)
    for offset in range(0, size, PROVE_READ_SIZE):
        builder.update(read(offset, min(PROVE_READ_SIZE, size - offset)))
    tree = builder.tree()
    answers = []
    for index in indices:
        start = index * block_size
        block = bytes(read(start, max(0, min(block_size, size - start))))
        answers.append((block, tree.proof(index)))
    return answers


def _path(index: int, leaf_count: int) -> list[bool | None]:
    """Per level below the root: True if the sibling is on the left, False if
    on the right, None if the ancestor is promoted and has no sibling."""
    sides: list[bool | None] = []
    width = leaf_count
    while width > 1:
        if index % 2 == 1:
            sides.append(True)
        elif index + 1 < width:
            sides.append(False)
        else:
            sides.append(None)
        index //= 2
        width = (width + 1) // 2
    return sides


def _leaves(data: BytesLike, block_size: int) -> list[bytes]:
    view = _byte_view(data)
    count = block_count(len(view), block_size)
    return [leaf_hash(view[i * block_size : (i + 1) * block_size]) for i in range(count)]


def _next_level(level: list[bytes]) -> list[bytes]:
    paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
    if len(level) % 2:
        paired.append(level[-1])
    return paired


def _byte_view(data: BytesLike) -> memoryview:
    # A memoryview over e.g. a numpy array counts items, not bytes; blocks are bytes.
    return memoryview(data).cast("B")


def _check_block_size(block_size: int) -> None:
    if block_size < 1:
        raise ValueError(f"block size must be positive, got {block_size}")
