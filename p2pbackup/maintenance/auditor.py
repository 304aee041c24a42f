"""Audits run: which shards are due, asking their holders, recording verdicts.

Nouns (those of challenges and verdicts are :mod:`~p2pbackup.maintenance.audit`'s):

* **schedule** — when each placed shard is next audited: the ``due_at`` of
  its :class:`~p2pbackup.model.ShardAudit` row in the index. A shard not yet
  scheduled gets a random moment within the next audit period
  (:meth:`~p2pbackup.maintenance.audit.AuditPolicy.first_due`), an audited
  one a random moment between half a period and a period after its audit
  (:meth:`~p2pbackup.maintenance.audit.AuditPolicy.next_due`). A shard
  whose peer did not answer is tried again :data:`RETRY_SECONDS` later.
* **pass** — one round of audits over some shards: first every peer is
  probed (as a backup does: the answers count toward each peer's uptime and
  last contact), then each peer that answered is asked about its shards —
  peers at once, a peer's shards one after another, each challenge within
  its deadline and asked again when it times out. Each verdict is written to
  the index as it comes, with the peer's reputation
  (:mod:`~p2pbackup.maintenance.reputation`), so that a pass cut short
  loses nothing, and the bytes it cost (challenges sent, blocks and proofs
  received) are counted per peer and day under the purpose ``audit``. A
  peer that ran out of re-asks (too slow) or stopped
  answering is left alone for the rest of the pass, its other shards still
  due: one slow peer costs a pass one deadline's worth of re-asks, not one
  per shard. A disqualified peer is not audited at all.
* **report** — :class:`AuditReport`: each shard's verdict, and the peers
  that were unreachable or disqualified by the pass.

The clock (unix seconds) and the randomness are handed in. Nonces must be
unpredictable to the holders: the daemon passes ``random.SystemRandom()``;
tests pass a seeded ``random.Random`` and trio's virtual clock.
"""

from __future__ import annotations

import collections
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NoReturn

import attrs
import trio

from p2pbackup.core import formats
from p2pbackup.core.merkle import HASH_SIZE
from p2pbackup.engine.index import Index, PlacedShard
from p2pbackup.engine.repository import PROBE_SECONDS, Repository
from p2pbackup.errors import PeerUnavailableError, ShardNotFoundError, StoreError
from p2pbackup.maintenance.audit import (
    DEFAULT_POLICY,
    NONCE_SIZE,
    AuditedShard,
    AuditPolicy,
    Challenge,
    FailureReason,
    Outcome,
    Verdict,
    verify,
)
from p2pbackup.maintenance.reputation import DEFAULT_REPUTATION, ReputationPolicy
from p2pbackup.model import ShardAudit
from p2pbackup.stores.shardstore import ShardStore
from p2pbackup.wire.messages import AuditProof

#: Seconds before a shard whose peer did not answer is tried again.
RETRY_SECONDS = 3600
#: Bounds of the sleep between two passes of :func:`run_audits`: it wakes
#: when the next shard comes due, but at least this often (new shards get
#: their schedule) and at most this often.
MAX_SLEEP = 3600.0
MIN_SLEEP = 60.0

#: The purpose audit traffic is counted under in the index.
PURPOSE = "audit"

#: Unix seconds now.
Clock = Callable[[], float]


@attrs.frozen
class ShardResult:
    """The audit of shard ``index`` of a pack on ``peer_id``."""

    pack_id: bytes
    index: int
    peer_id: str
    verdict: Verdict
    #: Times the challenge was asked (more than once after timeouts).
    asks: int = 1
    #: Bytes of the answer received: blocks and proof hashes.
    received: int = 0
    #: Bytes of the challenges sent: shard id, nonce and block indices, each ask.
    sent: int = 0


@attrs.frozen
class AuditReport:
    """What one pass found (module docstring)."""

    results: tuple[ShardResult, ...]
    #: Peers with shards to audit that did not answer the probe, and why.
    unreachable: Mapping[str, str] = attrs.field(factory=dict)
    #: Peers this pass disqualified.
    disqualified: tuple[str, ...] = ()

    def count(self, outcome: Outcome) -> int:
        return sum(1 for result in self.results if result.verdict.outcome is outcome)

    @property
    def failures(self) -> list[ShardResult]:
        return [r for r in self.results if r.verdict.outcome is Outcome.FAILED]

    def by_peer(self) -> dict[str, list[ShardResult]]:
        grouped: dict[str, list[ShardResult]] = collections.defaultdict(list)
        for result in self.results:
            grouped[result.peer_id].append(result)
        return dict(grouped)

    def lines(self) -> list[str]:
        peers = len(self.by_peer().keys() | self.unreachable.keys())
        lines = [
            f"audited {len(self.results)} shards on {peers} peers: "
            f"{self.count(Outcome.HEALTHY)} healthy, {self.count(Outcome.FAILED)} failed, "
            f"{self.count(Outcome.UNANSWERED)} unanswered"
        ]
        for peer_id, results in sorted(self.by_peer().items()):
            reasons = collections.Counter(
                r.verdict.reason.value for r in results if r.verdict.reason is not None
            )
            if reasons:
                found = ", ".join(f"{reason} {count}" for reason, count in sorted(reasons.items()))
                lines.append(f"peer {peer_id[:16]}: {sum(reasons.values())} failed ({found})")
        for peer_id, why in sorted(self.unreachable.items()):
            lines.append(f"peer {peer_id[:16]} unreachable ({why}); its shards wait")
        for peer_id in self.disqualified:
            lines.append(
                f"peer {peer_id[:16]} DISQUALIFIED by failed audits: its shards count as "
                "lost and it gets no new ones"
            )
        return lines

    def to_json(self) -> dict[str, object]:
        return {
            "shards": len(self.results),
            "healthy": self.count(Outcome.HEALTHY),
            "failed": self.count(Outcome.FAILED),
            "unanswered": self.count(Outcome.UNANSWERED),
            "received_bytes": sum(r.received for r in self.results),
            "failures": [
                {
                    "pack": r.pack_id.hex(),
                    "index": r.index,
                    "peer": r.peer_id,
                    "reason": None if r.verdict.reason is None else r.verdict.reason.value,
                    "detail": r.verdict.detail,
                }
                for r in self.failures
            ],
            "unreachable": dict(self.unreachable),
            "disqualified": list(self.disqualified),
        }


async def audit_once(
    repo: Repository,
    *,
    clock: Clock = time.time,
    rng: random.Random | None = None,
    policy: AuditPolicy = DEFAULT_POLICY,
    reputation: ReputationPolicy = DEFAULT_REPUTATION,
) -> AuditReport:
    """Audit every placed shard now, due or not, on every peer not
    disqualified; record the verdicts and the peers' reputations."""
    index = repo.index
    excluded = index.disqualified_peers()
    shards = [s for s in index.placed_shards() if s.peer_id not in excluded]
    auditor = _Pass(repo, clock, rng or random.SystemRandom(), policy, reputation)
    return await auditor.run(shards)


async def run_audits(
    repo: Repository,
    *,
    clock: Clock,
    rng: random.Random,
    policy: AuditPolicy = DEFAULT_POLICY,
    reputation: ReputationPolicy = DEFAULT_REPUTATION,
    on_report: Callable[[AuditReport], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Audit the shards as they come due, for ever (module docstring: schedule)."""
    task_status.started()
    while True:
        report = await audit_due(repo, clock=clock, rng=rng, policy=policy, reputation=reputation)
        if report is not None and on_report is not None:
            on_report(report)
        await trio.sleep(seconds_to_next(repo.index, clock()))


async def audit_due(
    repo: Repository,
    *,
    clock: Clock,
    rng: random.Random,
    policy: AuditPolicy = DEFAULT_POLICY,
    reputation: ReputationPolicy = DEFAULT_REPUTATION,
) -> AuditReport | None:
    """One pass over the shards due now (module docstring: schedule); None
    when none is due."""
    due = schedule(repo.index, clock(), policy, rng)
    if not due:
        return None
    return await _Pass(repo, clock, rng, policy, reputation).run(due)


def schedule(
    index: Index, now: float, policy: AuditPolicy, rng: random.Random
) -> list[PlacedShard]:
    """The shards due for an audit at ``now``, once the shards not yet
    scheduled are given their first due time (module docstring)."""
    due = index.shards_due_for_audit(now)
    first: list[tuple[bytes, int, ShardAudit]] = []
    for shard in index.shards_without_audit_row():
        due_at = policy.first_due(now, rng.random())
        first.append((shard.pack_id, shard.index, ShardAudit(shard.peer_id, due_at)))
        if due_at <= now:
            due.append(shard)
    if first:
        with index.transaction():
            index.set_shard_audits(first)
    # By pack and index, as the shards are (an audit pass goes in this order).
    due.sort(key=lambda shard: (shard.pack_id, shard.index))
    return due


def seconds_to_next(index: Index, now: float) -> float:
    """How long :func:`run_audits` sleeps: until the next shard comes due,
    within :data:`MIN_SLEEP` and :data:`MAX_SLEEP`."""
    due = index.next_audit_due()
    wait = due - now if due is not None else MAX_SLEEP
    return min(max(wait, MIN_SLEEP), MAX_SLEEP)


class _OtherRoots:
    """The roots of our shards, looked up in the index when a verdict needs them."""

    def __init__(self, index: Index) -> None:
        self._index = index

    def __contains__(self, root: object) -> bool:
        return isinstance(root, bytes) and self._index.has_shard_root(root)


class _Pass:
    """One pass over some shards (module docstring)."""

    def __init__(
        self,
        repo: Repository,
        clock: Clock,
        rng: random.Random,
        policy: AuditPolicy,
        reputation: ReputationPolicy,
    ) -> None:
        self.repo = repo
        self.index = repo.index
        self.clock = clock
        self.rng = rng
        self.policy = policy
        self.reputation = reputation
        self.results: list[ShardResult] = []
        self.disqualified: list[str] = []
        #: Every audit row, read when a pass first postpones a shard.
        self._schedule: dict[tuple[bytes, int], ShardAudit] | None = None

    def _now(self) -> int:
        return int(self.clock())

    async def run(self, shards: Iterable[PlacedShard]) -> AuditReport:
        by_peer: dict[str, list[PlacedShard]] = collections.defaultdict(list)
        for shard in shards:
            by_peer[shard.peer_id].append(shard)
        unreachable: dict[str, str] = {}
        if by_peer:
            answers = await self.repo.probe_peers(PROBE_SECONDS, seen_at=self._now())
            async with trio.open_nursery() as nursery:
                for peer_id, held in sorted(by_peer.items()):
                    answer = answers.get(peer_id)
                    if answer is None or not answer.answered:
                        unreachable[peer_id] = "not a peer" if answer is None else answer.problem
                        self._postpone(held)
                    else:
                        nursery.start_soon(self._audit_peer, peer_id, held)
        return AuditReport(tuple(self.results), unreachable, tuple(self.disqualified))

    async def _audit_peer(self, peer_id: str, shards: Sequence[PlacedShard]) -> None:
        try:
            store = self.repo.store(peer_id)
        except PeerUnavailableError as error:
            self._leave(shards, str(error))
            return
        for position, shard in enumerate(shards):
            result = await self._audit_shard(store, shard)
            self.results.append(result)
            if self._record(shard, result):
                return  # disqualified: its shards count as lost, unaudited
            verdict = result.verdict
            if not verdict.counts or verdict.reason is FailureReason.TOO_SLOW:
                self._leave(shards[position + 1 :], f"left for later: {verdict.describe()}")
                return

    async def _audit_shard(self, store: ShardStore, shard: PlacedShard) -> ShardResult:
        target = AuditedShard(
            formats.shard_id(shard.pack_id, shard.index),
            shard.merkle_root,
            formats.SHARD_HEADER_SIZE + shard.shard_size,
            shard.block_size,
        )
        challenge = Challenge.for_shard(target, self.rng.randbytes(NONCE_SIZE), self.policy)
        deadline = self.policy.deadline(target, challenge)
        asks = self.policy.re_asks + 1

        def result(verdict: Verdict, ask: int, answer: AuditProof | None = None) -> ShardResult:
            received = 0 if answer is None else _answer_size(answer)
            sent = ask * _challenge_size(target, challenge)
            return ShardResult(
                shard.pack_id, shard.index, shard.peer_id, verdict, ask, received, sent
            )

        # The same challenge each time: a holder that cannot answer it must
        # not get another by keeping silent.
        for ask in range(1, asks + 1):
            with trio.move_on_after(deadline):
                try:
                    answer = await store.audit(
                        target.shard_id, challenge.nonce, challenge.indices, target.block_size
                    )
                except ShardNotFoundError:
                    return result(
                        Verdict.failed(FailureReason.MISSING, "the peer does not have it"), ask
                    )
                except PeerUnavailableError as error:
                    return result(Verdict.unanswered(str(error)), ask)
                except StoreError as error:
                    return result(
                        Verdict.failed(
                            FailureReason.MISSING,
                            f"the peer cannot produce the blocks asked ({error})",
                        ),
                        ask,
                    )
                verdict = verify(target, challenge, answer, _OtherRoots(self.index))
                return result(verdict, ask, answer)
        return result(
            Verdict.failed(
                FailureReason.TOO_SLOW, f"no answer within {deadline:g} s, asked {asks} times"
            ),
            asks,
        )

    def _record(self, shard: PlacedShard, result: ShardResult) -> bool:
        """Write a verdict and its peer's new reputation to the index; whether
        this disqualified the peer."""
        verdict = result.verdict
        if not verdict.counts:
            self._postpone([shard])
            return False
        now = self._now()
        peer_id = shard.peer_id
        short = formats.shard_id(shard.pack_id, shard.index).hex()[:16]
        row = ShardAudit(
            peer_id,
            due_at=self.policy.next_due(now, self.rng.random()),
            audited_at=now,
            passed=verdict.passed,
            reason="" if verdict.passed else verdict.describe(),
        )
        with self.index.transaction():
            before = self.index.peer_audits().get(peer_id)
            after = self.reputation.after_audit(
                before,
                passed=verdict.passed,
                now=now,
                failure=f"shard {short}: {verdict.describe()}",
            )
            self.index.set_shard_audits([(shard.pack_id, shard.index, row)])
            self.index.set_peer_audits(peer_id, after)
            self.index.add_traffic(
                now // 86400, peer_id, PURPOSE, sent=result.sent, received=result.received
            )
            if verdict.reason is not FailureReason.TOO_SLOW:
                self.index.set_seen(peer_id, now)
        newly = after.disqualified and (before is None or not before.disqualified)
        if newly:
            self.disqualified.append(peer_id)
        return newly

    def _leave(self, shards: Sequence[PlacedShard], why: str) -> None:
        """Report ``shards`` unanswered and try them again later."""
        for shard in shards:
            verdict = Verdict.unanswered(why)
            self.results.append(ShardResult(shard.pack_id, shard.index, shard.peer_id, verdict, 0))
        self._postpone(shards)

    def _postpone(self, shards: Sequence[PlacedShard]) -> None:
        """Shards that are due and could not be audited: due again in
        :data:`RETRY_SECONDS` (a shard not yet due keeps its time)."""
        now = self._now()
        if self._schedule is None:
            self._schedule = self.index.shard_audits()
        later = []
        for shard in shards:
            audit = self._schedule.get((shard.pack_id, shard.index))
            if audit is not None and audit.peer_id == shard.peer_id and audit.due_at <= now:
                later.append(
                    (shard.pack_id, shard.index, attrs.evolve(audit, due_at=now + RETRY_SECONDS))
                )
        if later:
            with self.index.transaction():
                self.index.set_shard_audits(later)


def _challenge_size(target: AuditedShard, challenge: Challenge) -> int:
    # Block indices travel as 32-bit integers; the block size as one more.
    return len(target.shard_id) + len(challenge.nonce) + 4 * (len(challenge.indices) + 1)


def _answer_size(answer: AuditProof) -> int:
    hashes = sum(len(proof) for proof in answer.proofs)
    return sum(len(block) for block in answer.blocks) + HASH_SIZE * hashes
