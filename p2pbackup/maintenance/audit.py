"""Audits (pure): a challenge about one shard a peer holds for us, and the
verdict on its answer.

Nouns:

* **audited shard** — :class:`AuditedShard`: what the owner knows of a shard
  it placed: its id, and the Merkle root, size and block size of the bytes
  stored (header and data). The index holds all of it; the owner never
  downloads the shard to audit it.
* **nonce** — fresh bytes the owner draws for each challenge from a random
  source the holder cannot predict (the auditor is handed one; the daemon's
  is the system's).
* **challenge** — :class:`Challenge`: the shard id, the nonce, and the
  **block indices** derived from the nonce and the shard's block count
  (:func:`derive_indices`): distinct, uniform, sorted. Derived rather than
  drawn beside the nonce, so that a challenge is one value (a log of nonces
  says which blocks were asked) and a re-ask is the same challenge again.
* **answer** — the storage protocol's
  :class:`~p2pbackup.wire.messages.AuditProof`: per index, in order, the
  block and its Merkle proof; the nonce echoed.
* **verdict** — :class:`Verdict`: **healthy** when every block leads to the
  root the owner kept; **failed**, with a :class:`FailureReason`, when the
  holder showed it does not hold the shard as stored; **unanswered** when
  the peer could not be reached, which says nothing about the shard.
* **deadline** — how long a holder has to answer one challenge: Storj's
  ``max(15 s, bytes asked ÷ 150 kB/s)``. A challenge that times out is asked
  again, the same one, up to :attr:`AuditPolicy.re_asks` times; then it
  counts as failed (:attr:`FailureReason.TOO_SLOW`). Asking the same
  challenge again means a holder cannot trade a challenge it cannot answer
  for another by staying silent.
* **policy** — :class:`AuditPolicy`: the audit period (every shard is
  audited at least once per period, at a random moment within it), the bytes
  asked per challenge, the deadline and the re-asks. docs/maintenance.md
  explains the defaults and what they cost.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Container, Iterator

import attrs

from p2pbackup.core import merkle
from p2pbackup.errors import MerkleError
from p2pbackup.model import ID_SIZE
from p2pbackup.wire.messages import (
    MAX_AUDIT_BLOCKS,
    MAX_NONCE_SIZE,
    MIN_NONCE_SIZE,
    PIECE_SIZE,
    AuditProof,
)

#: Bytes of the nonce the owner draws for each challenge.
NONCE_SIZE = 32
#: A week: every shard is audited at least this often (docs/maintenance.md).
AUDIT_PERIOD = 7 * 24 * 3600.0
#: Bytes of blocks one challenge asks for (two blocks of the default 64 KiB).
CHALLENGE_BYTES = 128 * 1024
#: Storj's deadline: at least this long, longer for large answers...
MIN_DEADLINE = 15.0
#: ...at this many bytes per second.
DEADLINE_RATE = 150_000.0
#: Times a challenge that timed out is asked again before it counts as failed.
RE_ASKS = 3

_PICK_PERSON = b"p2pb-audit-pick"


class Outcome(enum.Enum):
    HEALTHY = "healthy"
    FAILED = "failed"
    UNANSWERED = "unanswered"


class FailureReason(enum.Enum):
    """Why an audit failed; each is something only a holder that lost or
    altered the shard (or is lying about it) would show."""

    #: The holder says it has no such shard, or cannot produce the blocks
    #: asked (a shard cut short, an index it says is past its end).
    MISSING = "missing"
    #: A block and its proof do not lead to the root the owner kept: the
    #: holder's bytes are not those stored (corrupted, cut short, stale), or
    #: it tampered with the proof.
    WRONG_BLOCK = "wrong block"
    #: The answer is not a well-formed answer to this challenge: another
    #: nonce, blocks or proofs missing or extra, a proof of the wrong shape.
    BAD_PROOF = "bad proof"
    #: Every block leads to the root of another shard of ours: the holder
    #: answered from another shard it holds.
    WRONG_SHARD = "wrong shard"
    #: No answer within the deadline, however many times it was asked.
    TOO_SLOW = "too slow"


@attrs.frozen
class Verdict:
    """What one audit found (module docstring)."""

    outcome: Outcome
    reason: FailureReason | None = None
    #: The particulars, in words ("" for a healthy shard).
    detail: str = ""

    @classmethod
    def healthy(cls) -> Verdict:
        return cls(Outcome.HEALTHY)

    @classmethod
    def failed(cls, reason: FailureReason, detail: str) -> Verdict:
        return cls(Outcome.FAILED, reason, detail)

    @classmethod
    def unanswered(cls, detail: str) -> Verdict:
        return cls(Outcome.UNANSWERED, None, detail)

    @property
    def counts(self) -> bool:
        """Whether it says anything of the holder (healthy or failed)."""
        return self.outcome is not Outcome.UNANSWERED

    @property
    def passed(self) -> bool:
        return self.outcome is Outcome.HEALTHY

    def describe(self) -> str:
        if self.reason is None:
            return self.outcome.value + (f" ({self.detail})" if self.detail else "")
        return f"{self.reason.value}: {self.detail}"


@attrs.frozen
class AuditedShard:
    """What the owner knows of one shard it placed (module docstring)."""

    shard_id: bytes
    root: bytes
    #: Bytes stored: the shard's header and data.
    size: int
    block_size: int

    @property
    def leaf_count(self) -> int:
        return merkle.block_count(self.size, self.block_size)

    def block_length(self, index: int) -> int:
        """Bytes of block ``index`` (the last one may be shorter)."""
        return max(0, min(self.block_size, self.size - index * self.block_size))


@attrs.frozen
class AuditPolicy:
    """How often shards are audited and how hard (module docstring)."""

    #: Seconds within which every shard is audited again.
    period: float = AUDIT_PERIOD
    #: Bytes of blocks per challenge (at least one block is always asked).
    challenge_bytes: int = CHALLENGE_BYTES
    min_deadline: float = MIN_DEADLINE
    #: Bytes per second the deadline allows beyond its minimum.
    deadline_rate: float = DEADLINE_RATE
    re_asks: int = RE_ASKS

    def blocks_per_challenge(self, shard: AuditedShard) -> int:
        """Blocks one challenge about ``shard`` asks for: the policy's bytes'
        worth, at least one, at most every block, and never more than one
        answer frame carries."""
        wanted = max(1, self.challenge_bytes // shard.block_size)
        fits = max(1, PIECE_SIZE // shard.block_size)
        return min(wanted, fits, MAX_AUDIT_BLOCKS, shard.leaf_count)

    def deadline(self, shard: AuditedShard, challenge: Challenge) -> float:
        """Seconds the holder has to answer ``challenge``."""
        asked = sum(shard.block_length(index) for index in challenge.indices)
        return max(self.min_deadline, asked / self.deadline_rate)

    def first_due(self, now: float, draw: float) -> int:
        """When a shard not yet scheduled is first audited, from a uniform
        ``draw`` in [0, 1): anywhere within one period, so that the shards of
        a large backup spread over the period instead of coming due at once."""
        return int(now + self.period * draw)

    def next_due(self, now: float, draw: float) -> int:
        """When a shard audited ``now`` is audited again: between half a period
        and a period later (``draw`` uniform in [0, 1)), so that the moment
        cannot be foreseen and no shard waits longer than a period."""
        return int(now + self.period * (0.5 + 0.5 * draw))


#: The policy of the defaults above.
DEFAULT_POLICY = AuditPolicy()


@attrs.frozen
class Challenge:
    """One challenge about one shard (module docstring)."""

    shard_id: bytes
    nonce: bytes
    indices: tuple[int, ...]

    @classmethod
    def for_shard(cls, shard: AuditedShard, nonce: bytes, policy: AuditPolicy) -> Challenge:
        count = policy.blocks_per_challenge(shard)
        return cls(shard.shard_id, nonce, derive_indices(nonce, shard.leaf_count, count))


def derive_indices(nonce: bytes, leaf_count: int, count: int) -> tuple[int, ...]:
    """``count`` distinct block indices below ``leaf_count`` (all of them if
    fewer), sorted, each set of them equally likely, as a function of
    ``nonce`` alone.

    The draws are keyed BLAKE2b of a counter under the nonce; a partial
    Fisher–Yates shuffle of ``range(leaf_count)`` (kept sparse in a dict)
    picks without replacement in ``count`` draws.
    """
    if not MIN_NONCE_SIZE <= len(nonce) <= MAX_NONCE_SIZE:
        raise ValueError(f"a nonce is {MIN_NONCE_SIZE} to {MAX_NONCE_SIZE} bytes, got {len(nonce)}")
    if leaf_count < 1 or count < 0:
        raise ValueError(f"cannot pick {count} of {leaf_count} blocks")
    count = min(count, leaf_count)
    draws = _draws(nonce)
    moved: dict[int, int] = {}
    picked = []
    for position in range(count):
        chosen = position + _below(draws, leaf_count - position)
        picked.append(moved.get(chosen, chosen))
        moved[chosen] = moved.get(position, position)
    return tuple(sorted(picked))


def _draws(nonce: bytes) -> Iterator[int]:
    """Uniform 64-bit numbers, as many as asked, determined by ``nonce``."""
    counter = 0
    while True:
        digest = hashlib.blake2b(
            counter.to_bytes(8, "big"), key=nonce, digest_size=64, person=_PICK_PERSON
        ).digest()
        for start in range(0, 64, 8):
            yield int.from_bytes(digest[start : start + 8], "big")
        counter += 1


def _below(draws: Iterator[int], bound: int) -> int:
    """A uniform number in [0, bound): draws past the largest multiple of
    ``bound`` are thrown away, so that no remainder is likelier than another."""
    limit = (1 << 64) - (1 << 64) % bound
    while True:
        draw = next(draws)
        if draw < limit:
            return draw % bound


def verify(
    shard: AuditedShard,
    challenge: Challenge,
    answer: AuditProof,
    other_roots: Container[bytes] = frozenset(),
) -> Verdict:
    """The verdict on ``answer`` to ``challenge`` about ``shard``.

    Healthy only if every block asked, with its proof, leads to the root the
    owner kept. ``other_roots`` holds the roots of the owner's other shards,
    to name an answer from another shard for what it is.
    """
    if len(shard.shard_id) != ID_SIZE or challenge.shard_id != shard.shard_id:
        raise ValueError("the challenge is not about this shard")
    indices = challenge.indices
    if answer.nonce != challenge.nonce:
        return Verdict.failed(FailureReason.BAD_PROOF, "the answer names another challenge")
    if len(answer.blocks) != len(indices) or len(answer.proofs) != len(indices):
        return Verdict.failed(
            FailureReason.BAD_PROOF,
            f"{len(answer.blocks)} blocks and {len(answer.proofs)} proofs "
            f"for {len(indices)} blocks asked",
        )
    roots = []
    for index, block, proof in zip(indices, answer.blocks, answer.proofs, strict=True):
        try:
            roots.append(
                merkle.root_from_proof(
                    index=index, leaf_count=shard.leaf_count, block=block, proof=proof
                )
            )
        except MerkleError as error:
            return Verdict.failed(FailureReason.BAD_PROOF, str(error))
    if all(root == shard.root for root in roots):
        return Verdict.healthy()
    if len(set(roots)) == 1 and roots[0] in other_roots:
        return Verdict.failed(
            FailureReason.WRONG_SHARD, "the blocks answered are those of another of our shards"
        )
    index, block = next(
        (index, block)
        for index, block, root in zip(indices, answer.blocks, roots, strict=True)
        if root != shard.root
    )
    expected = shard.block_length(index)
    if len(block) != expected:
        detail = f"block {index} is {len(block)} bytes; the shard's is {expected}"
    else:
        detail = f"block {index} does not match the shard's Merkle root"
    return Verdict.failed(FailureReason.WRONG_BLOCK, detail)
