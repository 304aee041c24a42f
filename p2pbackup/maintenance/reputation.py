"""Reputation (pure): what audits say of a peer over time, and what follows.

Nouns:

* **peer audits** — :class:`~p2pbackup.model.PeerAudits`, as the index keeps
  them: the peer's passed and failed audits, each multiplied by the
  **decay** λ for every audit counted after it, so that an audit ``m``
  audits old weighs λ^m. A peer starts as if it had passed a full memory of
  audits (``1 / (1 − λ)``), Storj's benefit of the doubt: one early failure
  does not sink a new friend.
* **score** — the decayed share of audits passed,
  ``passed / (passed + failed)``; 1 before any audit. Steadily failing a
  share p of audits brings it to 1 − p; failing every audit from a perfect
  record brings it to λ^m after m of them.
* **disqualified** — a peer whose score fell below the **threshold**. It
  gets no new shards (placement leaves it out), its shards count as lost
  (repair rebuilds them elsewhere) and it is no longer audited. It stays
  disqualified until its owner removes it and adds it again: a friend who
  fixed their disk starts afresh, a peer that lost our data does not earn
  its way back by answering for what little it kept.
* **standing** — :class:`Standing`: the score, the counts, whether the peer
  is disqualified, and what contacts say (last contact, uptime): what
  ``status`` shows and repair decides with.
* **shard health** — :class:`ShardHealth`: what audits say of one shard on
  its peer; a failed shard and every shard of a disqualified peer count as
  lost.

Only audits that were answered count (:attr:`Verdict.counts
<p2pbackup.maintenance.audit.Verdict.counts>`): a peer that sleeps is not
a peer that lies; its absences show in its uptime instead.
docs/maintenance.md gives the reasoning behind λ and the threshold.
"""

from __future__ import annotations

import enum
import math

import attrs

from p2pbackup.model import PeerAudits, ShardAudit

#: λ: a verdict's weight is multiplied by this for each audit counted after
#: it (a memory of about 100 audits; Storj uses 0.999 over far more audits).
DECAY = 0.99
#: Score below which a peer is disqualified (Storj: 0.96). Steady loss of
#: more than one audited shard in ten, or 11 failures in a row from a clean
#: record, gets there.
DISQUALIFY_BELOW = 0.90


@attrs.frozen
class ReputationPolicy:
    """The decay λ and the threshold (module docstring), and the record
    they make of a peer's audits."""

    decay: float = attrs.field(default=DECAY)
    disqualify_below: float = DISQUALIFY_BELOW

    @decay.validator
    def _check_decay(self, _attribute: object, value: float) -> None:
        if not 0 < value < 1:
            raise ValueError(f"the decay must lie strictly between 0 and 1, got {value}")

    def initial(self) -> PeerAudits:
        """A peer's record before its first audit (module docstring)."""
        return PeerAudits(passed=1 / (1 - self.decay), failed=0.0)

    def after_audit(
        self, audits: PeerAudits | None, *, passed: bool, now: int, failure: str = ""
    ) -> PeerAudits:
        """The peer's record once one more audit, answered at unix second
        ``now``, is counted; ``failure`` says what a failed one found."""
        before = self.initial() if audits is None else audits
        after = attrs.evolve(
            before,
            passed=before.passed * self.decay + (1.0 if passed else 0.0),
            failed=before.failed * self.decay + (0.0 if passed else 1.0),
            audits=before.audits + 1,
            failures=before.failures + (0 if passed else 1),
            last_audit=now,
            last_failure=before.last_failure if passed else failure,
        )
        if after.disqualified_at is None and after.score < self.disqualify_below:
            after = attrs.evolve(after, disqualified_at=now)
        return after


#: The policy of the defaults above.
DEFAULT_REPUTATION = ReputationPolicy()


@attrs.frozen
class Standing:
    """What audits and contacts say of one peer now (module docstring)."""

    peer_id: str
    #: The audit score (1 before any audit).
    score: float
    audits: int
    failures: int
    #: Unix seconds of the last audit counted, of the disqualification, of
    #: the last answer to anything (None: never).
    last_audit: int | None
    disqualified_at: int | None
    last_contact: int | None
    #: Seconds since the last contact (None: never heard from).
    silent_for: int | None
    #: Share of the times it was asked that it answered (1 if never asked).
    uptime: float
    #: What the last failed audit found ("" if none failed).
    last_failure: str = ""

    @classmethod
    def of(
        cls,
        peer_id: str,
        audits: PeerAudits | None,
        *,
        last_contact: int | None,
        uptime: float,
        now: int,
    ) -> Standing:
        record = audits if audits is not None else PeerAudits(passed=0.0, failed=0.0)
        return cls(
            peer_id=peer_id,
            score=record.score,
            audits=record.audits,
            failures=record.failures,
            last_audit=record.last_audit,
            disqualified_at=record.disqualified_at,
            last_contact=last_contact,
            silent_for=None if last_contact is None else max(0, now - last_contact),
            uptime=uptime,
            last_failure=record.last_failure,
        )

    @property
    def disqualified(self) -> bool:
        return self.disqualified_at is not None

    @property
    def score_text(self) -> str:
        """The score in two decimals, rounded down: a score just under the
        threshold never reads as the threshold."""
        return f"{math.floor(self.score * 100) / 100:.2f}"

    def describe(self) -> str:
        """The standing in words, dates aside (the caller formats those)."""
        if self.disqualified:
            last = f" (last failure: {self.last_failure})" if self.last_failure else ""
            return (
                f"DISQUALIFIED: failed audits brought its score to {self.score_text}; "
                f"its shards count as lost and it gets no new ones{last}"
            )
        if not self.audits:
            return "not audited yet"
        return f"audit score {self.score_text} ({self.audits} audits, {self.failures} failed)"


class ShardHealth(enum.Enum):
    """What audits say of one shard on its peer (module docstring)."""

    #: Never audited yet: trusted as the host took it (it verified the root
    #: on upload).
    UNAUDITED = "unaudited"
    #: Its last audit passed.
    HEALTHY = "healthy"
    #: Its last audit failed: it counts as lost.
    FAILED = "failed"
    #: Its peer is disqualified: it counts as lost, whatever it last showed.
    PEER_DISQUALIFIED = "peer disqualified"

    @property
    def lost(self) -> bool:
        return self in (ShardHealth.FAILED, ShardHealth.PEER_DISQUALIFIED)


def shard_health(audit: ShardAudit | None, peer: PeerAudits | None) -> ShardHealth:
    """The health of a shard from its audit row and its peer's record."""
    if peer is not None and peer.disqualified:
        return ShardHealth.PEER_DISQUALIFIED
    if audit is None or audit.passed is None:
        return ShardHealth.UNAUDITED
    return ShardHealth.HEALTHY if audit.passed else ShardHealth.FAILED
