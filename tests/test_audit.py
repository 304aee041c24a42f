"""Audit challenges and verdicts (pure): the derivation of the blocks asked,
and the verification of answers, which no tampering may pass."""

from __future__ import annotations

import collections
import random

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pbackup.core import erasure, formats, merkle
from p2pbackup.maintenance.audit import (
    AUDIT_PERIOD,
    DEFAULT_POLICY,
    AuditedShard,
    AuditPolicy,
    Challenge,
    FailureReason,
    Outcome,
    Verdict,
    derive_indices,
    verify,
)
from p2pbackup.wire.messages import MAX_NONCE_SIZE, MIN_NONCE_SIZE, AuditProof

NONCES = st.binary(min_size=MIN_NONCE_SIZE, max_size=MAX_NONCE_SIZE)
BLOCK_SIZES = st.sampled_from([16, 64, 100, 512])


# -- deriving the blocks asked --------------------------------------------------------------


@given(NONCES, st.integers(1, 5000), st.integers(0, 64))
def test_indices_are_a_function_of_the_nonce(nonce: bytes, leaf_count: int, count: int) -> None:
    indices = derive_indices(nonce, leaf_count, count)
    assert indices == derive_indices(nonce, leaf_count, count)
    assert len(indices) == min(count, leaf_count)
    assert list(indices) == sorted(set(indices))
    assert all(0 <= index < leaf_count for index in indices)


@given(NONCES, st.integers(1, 64))
def test_asking_for_every_block_gets_every_block(nonce: bytes, leaf_count: int) -> None:
    assert derive_indices(nonce, leaf_count, leaf_count + 5) == tuple(range(leaf_count))


def test_every_block_is_as_likely_to_be_asked() -> None:
    rng = random.Random(5)
    counts: collections.Counter[int] = collections.Counter()
    pairs: collections.Counter[tuple[int, ...]] = collections.Counter()
    for _ in range(6000):
        nonce = rng.randbytes(32)
        counts.update(derive_indices(nonce, 10, 1))
        pairs[derive_indices(nonce, 4, 2)] += 1
    assert sorted(counts) == list(range(10))
    assert all(500 <= c <= 700 for c in counts.values()), counts  # 600 expected
    assert len(pairs) == 6  # every pair of four blocks, each about 1000 times
    assert all(850 <= c <= 1150 for c in pairs.values()), pairs


def test_nonces_out_of_the_wires_bounds_are_refused() -> None:
    for size in (0, MIN_NONCE_SIZE - 1, MAX_NONCE_SIZE + 1):
        with pytest.raises(ValueError, match="nonce"):
            derive_indices(bytes(size), 10, 2)
    with pytest.raises(ValueError):
        derive_indices(bytes(32), 0, 1)


# -- verifying answers ------------------------------------------------------------------------


def shard_of(data: bytes, block_size: int) -> AuditedShard:
    return AuditedShard(bytes(32), merkle.merkle_root(data, block_size), len(data), block_size)


def honest_answer(data: bytes, shard: AuditedShard, challenge: Challenge) -> AuditProof:
    answers = merkle.prove_blocks(
        lambda offset, length: data[offset : offset + length],
        len(data),
        shard.block_size,
        challenge.indices,
    )
    return AuditProof(challenge.nonce, tuple(b for b, _ in answers), tuple(p for _, p in answers))


def challenge_of(shard: AuditedShard, nonce: bytes, blocks: int) -> Challenge:
    policy = AuditPolicy(challenge_bytes=blocks * shard.block_size)
    return Challenge.for_shard(shard, nonce, policy)


@given(st.binary(max_size=3000), BLOCK_SIZES, NONCES, st.integers(1, 8))
def test_an_honest_answer_is_healthy(data: bytes, block_size: int, nonce: bytes, n: int) -> None:
    shard = shard_of(data, block_size)
    challenge = challenge_of(shard, nonce, n)
    assert verify(shard, challenge, honest_answer(data, shard, challenge)) == Verdict.healthy()


def _flip(data: bytes, position: int) -> bytes:
    if not data:
        return b"\x01"
    position %= len(data)
    return data[:position] + bytes([data[position] ^ 0x01]) + data[position + 1 :]


@st.composite
def tampered(draw: st.DrawFn, answer: AuditProof) -> AuditProof:
    """``answer`` changed in one of the ways a cheating holder might."""
    blocks, proofs = list(answer.blocks), [list(p) for p in answer.proofs]
    at = draw(st.integers(0, len(blocks) - 1))
    other = draw(st.integers(0, len(blocks) - 1))
    way = draw(
        st.sampled_from(
            [
                "flip block",
                "cut block",
                "grow block",
                "flip hash",
                "drop hash",
                "add hash",
                "cut hash",
                "nonce",
                "drop block",
                "add block",
                "swap blocks",
                "swap proofs",
                "zero block",
            ]
        )
    )
    nonce = answer.nonce
    if way == "flip block":
        blocks[at] = _flip(blocks[at], draw(st.integers(0, 10_000)))
    elif way == "cut block":
        blocks[at] = blocks[at][: draw(st.integers(0, max(0, len(blocks[at]) - 1)))]
    elif way == "grow block":
        blocks[at] += draw(st.binary(min_size=1, max_size=8))
    elif way == "flip hash" and proofs[at]:
        level = draw(st.integers(0, len(proofs[at]) - 1))
        proofs[at][level] = _flip(proofs[at][level], draw(st.integers(0, 31)))
    elif way == "drop hash" and proofs[at]:
        del proofs[at][draw(st.integers(0, len(proofs[at]) - 1))]
    elif way == "add hash":
        proofs[at].insert(
            draw(st.integers(0, len(proofs[at]))), draw(st.binary(min_size=32, max_size=32))
        )
    elif way == "cut hash" and proofs[at]:
        proofs[at][0] = proofs[at][0][:31]
    elif way == "nonce":
        nonce = _flip(nonce, draw(st.integers(0, 63)))
    elif way == "drop block":
        del blocks[at]
        if draw(st.booleans()):
            del proofs[at]
    elif way == "add block":
        blocks.append(draw(st.binary(max_size=8)))
        proofs.append([])
    elif way == "swap blocks":
        blocks[at], blocks[other] = blocks[other], blocks[at]
    elif way == "swap proofs":
        proofs[at], proofs[other] = proofs[other], proofs[at]
    elif way == "zero block":
        blocks[at] = bytes(len(blocks[at]))
    return AuditProof(nonce, tuple(blocks), tuple(tuple(p) for p in proofs))


@given(st.data(), st.binary(max_size=3000), BLOCK_SIZES, NONCES, st.integers(1, 8))
def test_any_tampering_with_an_answer_fails_it(
    data: st.DataObject, content: bytes, block_size: int, nonce: bytes, blocks: int
) -> None:
    shard = shard_of(content, block_size)
    challenge = challenge_of(shard, nonce, blocks)
    honest = honest_answer(content, shard, challenge)
    changed = data.draw(tampered(honest))
    verdict = verify(shard, challenge, changed)
    if changed == honest:  # e.g. two equal blocks swapped: nothing was changed
        assert verdict.passed
    else:
        assert verdict.outcome is Outcome.FAILED, (changed, verdict)
        assert verdict.reason in (FailureReason.WRONG_BLOCK, FailureReason.BAD_PROOF)


@given(st.binary(min_size=1, max_size=3000), BLOCK_SIZES, NONCES, st.data())
def test_an_answer_from_other_bytes_of_the_same_size_fails(
    content: bytes, block_size: int, nonce: bytes, data: st.DataObject
) -> None:
    other = data.draw(st.binary(min_size=len(content), max_size=len(content)))
    shard = shard_of(content, block_size)
    challenge = challenge_of(shard, nonce, 2)
    answer = honest_answer(other, shard_of(other, block_size), challenge)
    # Even where the blocks asked are alike, the proofs carry the other bytes' tree.
    assert verify(shard, challenge, answer).passed == (other == content)


def test_another_shards_blocks_are_named_as_such() -> None:
    rng = random.Random(3)
    ours, theirs = rng.randbytes(10_000), rng.randbytes(10_000)
    shard, decoy = shard_of(ours, 512), shard_of(theirs, 512)
    challenge = challenge_of(shard, rng.randbytes(32), 4)
    answer = honest_answer(theirs, decoy, challenge)
    assert verify(shard, challenge, answer, {decoy.root}).reason is FailureReason.WRONG_SHARD
    # Bytes that are no shard of ours are just wrong.
    verdict = verify(shard, challenge, answer, {b"x" * 32})
    assert verdict.reason is FailureReason.WRONG_BLOCK
    assert verdict.detail.startswith(f"block {challenge.indices[0]} does not match")


def test_what_a_failure_says() -> None:
    data = random.Random(4).randbytes(2000)
    shard = shard_of(data, 512)  # four blocks, the last of 464 bytes
    challenge = Challenge(shard.shard_id, bytes(16), (1, 3))
    honest = honest_answer(data, shard, challenge)
    short = attrs.evolve(honest, blocks=(honest.blocks[0], honest.blocks[1][:100]))
    assert verify(shard, challenge, short) == Verdict.failed(
        FailureReason.WRONG_BLOCK, "block 3 is 100 bytes; the shard's is 464"
    )
    assert verify(shard, challenge, attrs.evolve(honest, nonce=bytes(17))) == Verdict.failed(
        FailureReason.BAD_PROOF, "the answer names another challenge"
    )
    one = attrs.evolve(honest, blocks=honest.blocks[:1])
    assert verify(shard, challenge, one).detail == "1 blocks and 2 proofs for 2 blocks asked"
    longer = attrs.evolve(honest, proofs=(honest.proofs[0], (*honest.proofs[1], bytes(32))))
    assert (
        verify(shard, challenge, longer).detail == "Merkle proof for block 3: 3 hashes, expected 2"
    )
    assert verify(shard, challenge, honest).describe() == "healthy"
    with pytest.raises(ValueError):
        verify(shard, attrs.evolve(challenge, shard_id=b"y" * 32), honest)


# -- the policy ---------------------------------------------------------------------------------


def test_blocks_per_challenge() -> None:
    def blocks(block_size: int, size: int, policy: AuditPolicy = DEFAULT_POLICY) -> int:
        return policy.blocks_per_challenge(AuditedShard(bytes(32), bytes(32), size, block_size))

    assert blocks(64 << 10, 4 << 20) == 2  # 128 KiB of the default 64 KiB blocks
    assert blocks(4096, 4 << 20) == 32
    assert blocks(1 << 20, 8 << 20) == 1  # at least one
    assert blocks(64 << 10, 1000) == 1  # no more than the shard has
    assert blocks(512, 1 << 30, AuditPolicy(challenge_bytes=1 << 30)) == 64  # what a frame holds
    assert blocks(64 << 10, 1 << 30, AuditPolicy(challenge_bytes=1 << 30)) == 16


def test_deadlines_follow_storj() -> None:
    shard = AuditedShard(bytes(32), bytes(32), 100 << 20, 1 << 20)
    challenge = Challenge(shard.shard_id, bytes(16), (0,))
    assert DEFAULT_POLICY.deadline(shard, challenge) == 15.0  # max(15 s, 1 MiB at 150 kB/s)
    fast = AuditPolicy(min_deadline=1.0)
    assert fast.deadline(shard, challenge) == pytest.approx((1 << 20) / 150_000)
    last = AuditedShard(bytes(32), bytes(32), 1000, 512)  # the last block has 488 bytes
    assert fast.deadline(last, Challenge(last.shard_id, bytes(16), (1,))) == 1.0


@given(st.floats(0, 1, exclude_max=True), st.integers(0, 2_000_000_000))
def test_due_times_stay_within_the_period(draw: float, now: int) -> None:
    assert now <= DEFAULT_POLICY.first_due(now, draw) <= now + AUDIT_PERIOD
    assert now + AUDIT_PERIOD / 2 - 1 <= DEFAULT_POLICY.next_due(now, draw) <= now + AUDIT_PERIOD


def test_audits_of_100_gb_take_under_one_percent_of_a_10_mbit_uplink() -> None:
    """The figure docs/maintenance.md states, from the defaults themselves."""
    pack = 12 << 20  # the default pack size, 3-of-6
    stored = formats.SHARD_HEADER_SIZE + erasure.shard_length(pack, 3)
    shard = AuditedShard(bytes(32), bytes(32), stored, merkle.DEFAULT_BLOCK_SIZE)
    shards = 100e9 / stored
    blocks = DEFAULT_POLICY.blocks_per_challenge(shard)
    hashes = merkle.proof_length(0, shard.leaf_count)
    answer = blocks * (merkle.DEFAULT_BLOCK_SIZE + hashes * merkle.HASH_SIZE)
    mean_interval = 0.75 * DEFAULT_POLICY.period  # next_due: half a period to a period
    share = shards * answer / mean_interval / (10e6 / 8)
    assert 0.005 < share < 0.006  # 0.55 %
