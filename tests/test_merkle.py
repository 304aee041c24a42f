"""Merkle trees: shape, sensitivity to every byte, proofs that verify and proofs that must not."""

from __future__ import annotations

import hashlib
import itertools
import random

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pbackup.core.merkle import (
    DEFAULT_BLOCK_SIZE,
    MerkleBuilder,
    MerkleTree,
    block_count,
    get_block,
    merkle_root,
    proof_length,
    prove_blocks,
    root_from_proof,
    verify_block,
    verify_root,
)
from p2pbackup.errors import MerkleError

BLOCK_SIZES = st.sampled_from([16, 64, 100, 512])


def _random_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _reference_root(data: bytes, block_size: int) -> bytes:
    """RFC 6962's recursive definition (split at the largest power of two below n)."""

    def leaf(block: bytes) -> bytes:
        return hashlib.blake2b(block, digest_size=32, person=b"p2pb-merkle-leaf").digest()

    def node(left: bytes, right: bytes) -> bytes:
        return hashlib.blake2b(left + right, digest_size=32, person=b"p2pb-merkle-node").digest()

    def subtree(blocks: list[bytes]) -> bytes:
        if len(blocks) == 1:
            return leaf(blocks[0])
        split = 1 << ((len(blocks) - 1).bit_length() - 1)
        return node(subtree(blocks[:split]), subtree(blocks[split:]))

    blocks = [data[i : i + block_size] for i in range(0, len(data), block_size)] or [b""]
    return subtree(blocks)


@pytest.mark.parametrize(
    ("size", "block_size", "expected"),
    [(0, 512, 1), (1, 512, 1), (511, 512, 1), (512, 512, 1), (513, 512, 2), (1024, 512, 2),
     (1025, 512, 3), (10, 1, 10), (DEFAULT_BLOCK_SIZE * 3, DEFAULT_BLOCK_SIZE, 3)],
)  # fmt: skip
def test_block_count(size: int, block_size: int, expected: int) -> None:
    assert block_count(size, block_size) == expected


def test_block_count_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        block_count(10, 0)
    with pytest.raises(ValueError):
        block_count(-1, 512)


@given(st.binary(max_size=2000), BLOCK_SIZES)
def test_root_matches_rfc6962_shape(data: bytes, block_size: int) -> None:
    root = merkle_root(data, block_size)
    assert len(root) == 32
    assert root == _reference_root(data, block_size)
    assert MerkleTree.build(data, block_size).root == root


def test_empty_data_is_one_empty_block() -> None:
    tree = MerkleTree.build(b"", 512)
    assert tree.leaf_count == 1
    assert tree.proof(0) == ()
    assert tree.root == _reference_root(b"", 512)
    verify_block(tree.root, index=0, leaf_count=1, block=b"", proof=())
    assert merkle_root(b"\x00", 512) != tree.root


def test_every_flipped_byte_changes_the_root() -> None:
    data = bytearray(_random_bytes(1, 3 * 64 + 17))
    root = merkle_root(bytes(data), 64)
    for i in range(len(data)):
        data[i] ^= 0x01
        assert merkle_root(bytes(data), 64) != root, f"byte {i}"
        data[i] ^= 0x01


def test_length_and_block_size_change_the_root() -> None:
    data = _random_bytes(2, 1000)
    root = merkle_root(data, 64)
    assert merkle_root(data + b"\x00", 64) != root
    assert merkle_root(data[:-1], 64) != root
    assert merkle_root(data, 128) != root
    # Same leaves, one more: promotion must not make n and n+1 blocks collide.
    exact = _random_bytes(3, 64 * 4)
    assert merkle_root(exact, 64) != merkle_root(exact + exact[-64:], 64)


def test_leaf_cannot_pose_as_inner_node() -> None:
    left, right = _random_bytes(4, 64), _random_bytes(5, 64)
    tree = MerkleTree.build(left + right, 64)
    forged = tree.levels[0][0] + tree.levels[0][1]  # the two leaf hashes as one "block"
    assert merkle_root(forged, 64) != tree.root


def test_memoryview_of_wide_items_counts_bytes() -> None:
    data = _random_bytes(6, 4096)
    wide = np.frombuffer(data, dtype=np.uint32).data
    assert merkle_root(wide, 512) == merkle_root(data, 512)
    assert get_block(wide, 7, 512) == data[7 * 512 :]


@given(st.integers(0, 2**32), st.integers(0, 3000), BLOCK_SIZES)
def test_every_block_proves_and_nothing_else_does(seed: int, size: int, block_size: int) -> None:
    data = _random_bytes(seed, size)
    tree = MerkleTree.build(data, block_size)
    count = tree.leaf_count
    assert count == block_count(size, block_size)
    for index in range(count):
        block = get_block(data, index, block_size)
        proof = tree.proof(index)
        assert len(proof) == proof_length(index, count)
        verify_block(tree.root, index=index, leaf_count=count, block=block, proof=proof)
        _assert_forgeries_fail(tree, index, block, proof)


def _assert_forgeries_fail(
    tree: MerkleTree, index: int, block: bytes, proof: tuple[bytes, ...]
) -> None:
    count = tree.leaf_count

    def rejects(**changes: object) -> None:
        args: dict[str, object] = {"index": index, "leaf_count": count, "block": block}
        args["proof"] = proof
        args.update(changes)
        with pytest.raises(MerkleError):
            verify_block(tree.root, **args)  # type: ignore[arg-type]

    rejects(block=block + b"\x00")
    if block:
        rejects(block=bytes([block[0] ^ 0x80]) + block[1:])
        rejects(block=block[:-1])
    for level in range(len(proof)):
        bad = bytearray(proof[level])
        bad[level % 32] ^= 0x01
        rejects(proof=(*proof[:level], bytes(bad), *proof[level + 1 :]))
        rejects(proof=(*proof[:level], proof[level][:31], *proof[level + 1 :]))
    rejects(proof=(*proof, tree.root))
    if proof:
        rejects(proof=proof[:-1])
    if len(set(proof)) > 1:
        rejects(proof=proof[::-1])
    for other in {index - 1, index + 1, count - 1 - index} - {index}:
        if 0 <= other < count:
            rejects(index=other)
    rejects(index=count)
    rejects(index=-1)
    rejects(leaf_count=0)
    if count > 1:
        rejects(leaf_count=2 * count)  # one more level: the proof is too short
    with pytest.raises(MerkleError):
        verify_block(b"\x00" * 32, index=index, leaf_count=count, block=block, proof=proof)


def test_proof_of_promoted_leaf_skips_levels() -> None:
    data = _random_bytes(7, 5 * 16)  # 5 leaves: leaf 4 is promoted twice
    tree = MerkleTree.build(data, 16)
    assert [len(level) for level in tree.levels] == [5, 3, 2, 1]
    assert tree.proof(4) == (tree.levels[2][0],)
    assert len(tree.proof(0)) == 3
    verify_block(tree.root, index=4, leaf_count=5, block=data[64:], proof=tree.proof(4))


def test_proof_index_out_of_range() -> None:
    tree = MerkleTree.build(b"abc", 512)
    with pytest.raises(IndexError):
        tree.proof(1)
    with pytest.raises(IndexError):
        tree.proof(-1)
    with pytest.raises(IndexError):
        get_block(b"abc", 1, 512)


def test_verify_root() -> None:
    data = _random_bytes(8, 5000)
    root = merkle_root(data, 512)
    verify_root(data, 512, root)
    verify_root(memoryview(data), 512, root)
    with pytest.raises(MerkleError, match="root mismatch"):
        verify_root(data[:-1], 512, root)
    with pytest.raises(MerkleError):
        verify_root(data, 1024, root)


# -- the streaming builder ----------------------------------------------------------------


@given(st.binary(max_size=3000), BLOCK_SIZES, st.lists(st.integers(0, 3000), max_size=8))
def test_builder_matches_merkle_root_for_any_split(
    data: bytes, block_size: int, cuts: list[int]
) -> None:
    builder = MerkleBuilder(block_size)
    bounds = [0, *sorted(min(cut, len(data)) for cut in cuts), len(data)]
    for start, end in itertools.pairwise(bounds):
        builder.update(memoryview(data)[start:end])  # empty pieces included
    assert builder.size == len(data)
    assert builder.root() == merkle_root(data, block_size)
    assert builder.leaf_count == block_count(len(data), block_size)
    assert builder.tree() == MerkleTree.build(data, block_size)


def test_builder_of_nothing_is_the_empty_block() -> None:
    builder = MerkleBuilder(512)
    assert builder.root() == merkle_root(b"", 512) == _reference_root(b"", 512)
    builder.update(b"")
    assert builder.root() == merkle_root(b"", 512)
    assert builder.leaf_count == 1


def test_builder_byte_at_a_time_and_root_midway() -> None:
    data = _random_bytes(9, 16 * 5 + 3)
    builder = MerkleBuilder(16)
    for i in range(len(data)):
        builder.update(data[i : i + 1])
        if i in (15, 16, 47):  # exactly at, just past and at another block boundary
            assert builder.root() == merkle_root(data[: i + 1], 16)
    assert builder.root() == merkle_root(data, 16)


def test_builder_keeps_leaf_hashes_not_data() -> None:
    builder = MerkleBuilder(64)
    builder.update(_random_bytes(10, 64 * 100 + 5))
    assert len(builder._leaves) == 100
    assert len(builder._partial) == 5


def test_builder_rejects_bad_block_size() -> None:
    with pytest.raises(ValueError):
        MerkleBuilder(0)


def test_tree_from_leaves_needs_a_leaf() -> None:
    with pytest.raises(ValueError):
        MerkleTree.from_leaves([])


@given(st.binary(max_size=2000), BLOCK_SIZES, st.data())
def test_proving_blocks_answers_what_the_tree_holds(
    data: bytes, block_size: int, draw: st.DataObject
) -> None:
    count = block_count(len(data), block_size)
    indices = draw.draw(st.lists(st.integers(0, count - 1), max_size=5))
    reads: list[tuple[int, int]] = []

    def read(offset: int, length: int) -> bytes:
        reads.append((offset, length))
        return data[offset : offset + length]

    answers = prove_blocks(read, len(data), block_size, indices)
    tree = MerkleTree.build(data, block_size)
    assert answers == [(get_block(data, i, block_size), tree.proof(i)) for i in indices]
    for index, (block, proof) in zip(indices, answers, strict=True):
        assert root_from_proof(index=index, leaf_count=count, block=block, proof=proof) == tree.root
    assert all(offset >= 0 and offset + length <= len(data) for offset, length in reads)
    with pytest.raises(IndexError):
        prove_blocks(read, len(data), block_size, [count])
