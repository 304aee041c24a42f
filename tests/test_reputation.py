"""Reputation: decaying audit counts, the score, disqualification, standing."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pbackup.maintenance.reputation import (
    DECAY,
    DEFAULT_REPUTATION,
    DISQUALIFY_BELOW,
    ReputationPolicy,
    ShardHealth,
    Standing,
    shard_health,
)
from p2pbackup.model import PeerAudits, ShardAudit


def run(outcomes: list[bool], policy: ReputationPolicy = DEFAULT_REPUTATION) -> PeerAudits:
    audits: PeerAudits | None = None
    for now, passed in enumerate(outcomes, start=1):
        audits = policy.after_audit(audits, passed=passed, now=now, failure=f"failure at {now}")
    assert audits is not None
    return audits


def test_a_new_peer_starts_with_a_full_memory_of_passes() -> None:
    first = DEFAULT_REPUTATION.initial()
    assert first.score == 1.0 and first.passed == pytest.approx(1 / (1 - DECAY))
    one_failure = run([False])
    assert one_failure.score == pytest.approx(DECAY)  # one early failure does not sink it
    assert not one_failure.disqualified
    assert PeerAudits(0.0, 0.0).score == 1.0  # never audited: nothing against it


@given(st.integers(0, 300))
def test_failures_in_a_row_from_a_clean_record_decay_the_score_geometrically(m: int) -> None:
    assert run([True] * 50 + [False] * m).score == pytest.approx(DECAY**m)


def test_eleven_failures_in_a_row_disqualify_with_the_defaults() -> None:
    assert (DECAY, DISQUALIFY_BELOW) == (0.99, 0.90)
    ten = run([True] * 500 + [False] * 10)
    assert ten.score > DISQUALIFY_BELOW and not ten.disqualified
    eleven = run([True] * 500 + [False] * 11)
    assert eleven.disqualified and eleven.disqualified_at == 511
    assert eleven.last_failure == "failure at 511"


@pytest.mark.parametrize(("rate", "disqualified"), [(0.02, False), (0.05, False), (0.2, True)])
def test_the_score_follows_a_steady_failure_rate(rate: float, disqualified: bool) -> None:
    rng = random.Random(11)
    audits = run([rng.random() >= rate for _ in range(3000)])
    assert audits.disqualified == disqualified
    if not disqualified:
        assert audits.score == pytest.approx(1 - rate, abs=0.04)


def test_old_failures_fade() -> None:
    audits = run([False] * 5 + [True] * 500)
    assert audits.score > 0.99
    assert (audits.audits, audits.failures) == (505, 5)  # the totals do not decay
    assert audits.last_failure == "failure at 5"  # kept while it passes
    assert audits.last_audit == 505


def test_disqualification_stays() -> None:
    audits = run([False] * 20 + [True] * 2000)
    assert audits.score > 0.99
    assert audits.disqualified_at == 11


def test_a_stricter_policy() -> None:
    storj = ReputationPolicy(decay=0.999, disqualify_below=0.96)
    assert not run([True] * 10 + [False] * 40, storj).disqualified
    assert run([True] * 10 + [False] * 41, storj).disqualified
    for decay in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="decay"):
            ReputationPolicy(decay=decay)


def test_standing_in_words() -> None:
    fresh = Standing.of("peer", None, last_contact=None, uptime=1.0, now=100)
    assert fresh.describe() == "not audited yet"
    assert (fresh.score, fresh.silent_for, fresh.disqualified) == (1.0, None, False)
    fine = Standing.of("peer", run([True, False, True]), last_contact=40, uptime=0.5, now=100)
    assert fine.silent_for == 60
    assert fine.describe() == "audit score 0.99 (3 audits, 1 failed)"
    bad = Standing.of("peer", run([False] * 12), last_contact=40, uptime=1.0, now=100)
    assert bad.disqualified
    assert bad.score == pytest.approx(0.99**12)  # 0.886
    assert bad.describe() == (
        "DISQUALIFIED: failed audits brought its score to 0.88; its shards "
        "count as lost and it gets no new ones (last failure: failure at 12)"
    )


def test_shard_health() -> None:
    clean, banned = PeerAudits(1.0, 0.0), PeerAudits(1.0, 9.0, disqualified_at=5)
    passed = ShardAudit("p", due_at=9, audited_at=3, passed=True)
    failed = ShardAudit("p", due_at=9, audited_at=3, passed=False, reason="missing")
    scheduled = ShardAudit("p", due_at=9)
    assert shard_health(None, None) is ShardHealth.UNAUDITED
    assert shard_health(scheduled, clean) is ShardHealth.UNAUDITED
    assert shard_health(passed, clean) is ShardHealth.HEALTHY
    assert shard_health(failed, None) is ShardHealth.FAILED
    assert shard_health(passed, banned) is ShardHealth.PEER_DISQUALIFIED
    assert [h.lost for h in ShardHealth] == [False, False, True, True]
