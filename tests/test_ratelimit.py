"""Per-source token buckets (p2pbackup.dht.ratelimit): bursts, refill, clocks that
misbehave, independent sources, a bounded table, and the rate bound as a property;
and the network a source address is charged to."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pbackup.dht.ratelimit import RateLimit, RateLimiter, source_network
from p2pbackup.errors import UsageError

#: Slack for float arithmetic in token counts; far below one request.
EPSILON = 1e-6


def drain(limiter: RateLimiter, source: str, now: float, tries: int = 1000) -> int:
    """How many requests ``source`` gets through at ``now`` before the first refusal."""
    allowed = 0
    while allowed < tries and limiter.allow(source, now):
        allowed += 1
    return allowed


# --- the bucket ----------------------------------------------------------------------------


def test_a_burst_is_allowed_then_refused() -> None:
    limiter = RateLimiter(RateLimit(rate=1.0, burst=5))
    assert [limiter.allow("a", 100.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert limiter.refused == 2


def test_a_fractional_burst_allows_only_whole_requests() -> None:
    limiter = RateLimiter(RateLimit(rate=0.001, burst=2.5))
    assert drain(limiter, "a", 0.0) == 2


def test_tokens_come_back_at_the_rate() -> None:
    limiter = RateLimiter(RateLimit(rate=2.0, burst=4))
    assert drain(limiter, "a", 0.0) == 4
    assert not limiter.allow("a", 0.25)  # half a token: not yet
    assert limiter.allow("a", 0.5)  # one token (the refused try did not spend any)
    assert not limiter.allow("a", 0.5)
    assert drain(limiter, "a", 2.0) == 3  # 1.5 s later: three more


def test_refill_stops_at_the_burst() -> None:
    limiter = RateLimiter(RateLimit(rate=10.0, burst=3))
    assert drain(limiter, "a", 0.0) == 3
    # A day of silence still buys only one burst.
    assert drain(limiter, "a", 86_400.0) == 3


def test_a_clock_stepping_back_mints_no_tokens() -> None:
    limiter = RateLimiter(RateLimit(rate=1.0, burst=2))
    assert drain(limiter, "a", 1000.0) == 2
    assert not limiter.allow("a", 10.0)  # stepped back 990 s
    assert not limiter.allow("a", 1000.5)  # back where it was: still only half a token
    # Nor does the step back lose the time that really passed afterwards.
    assert limiter.allow("a", 1001.0)
    assert not limiter.allow("a", 1001.0)


def test_a_clock_stepping_back_and_forth_mints_no_tokens() -> None:
    limiter = RateLimiter(RateLimit(rate=1.0, burst=1))
    assert limiter.allow("a", 50.0)
    # Oscillating around 50 must not count every forward step afresh.
    for step in range(20):
        assert not limiter.allow("a", 49.0 if step % 2 else 50.5)
    assert limiter.allow("a", 51.0)


def test_sources_are_independent() -> None:
    limiter = RateLimiter(RateLimit(rate=1.0, burst=3))
    assert drain(limiter, "10.0.0.1", 0.0) == 3
    assert drain(limiter, "10.0.0.2", 0.0) == 3
    assert not limiter.allow("10.0.0.1", 0.0)
    assert limiter.refused == 3  # one per drain, plus the last try
    assert len(limiter) == 2


def test_refused_counts_every_refusal_and_nothing_else() -> None:
    limiter = RateLimiter(RateLimit(rate=1.0, burst=1))
    assert limiter.refused == 0
    assert limiter.allow("a", 0.0)
    assert limiter.allow("b", 0.0)
    assert limiter.refused == 0
    for _ in range(4):
        limiter.allow("a", 0.0)
    assert limiter.refused == 4


# --- the table ----------------------------------------------------------------------------


def test_the_table_never_exceeds_max_sources() -> None:
    limiter = RateLimiter(RateLimit(rate=1.0, burst=1, max_sources=8))
    for i in range(100):
        assert limiter.allow(f"10.0.{i // 256}.{i % 256}", float(i))  # each new: full bucket
        assert len(limiter) <= 8
    assert len(limiter) == 8


def test_the_longest_idle_source_is_evicted() -> None:
    limiter = RateLimiter(RateLimit(rate=0.001, burst=1, max_sources=3))
    assert limiter.allow("a", 0.0)
    assert limiter.allow("b", 1.0)
    assert limiter.allow("c", 2.0)
    # "a" is used again (refused, but used): now "b" is the longest idle.
    assert not limiter.allow("a", 3.0)
    assert limiter.allow("d", 4.0)  # evicts "b"
    assert len(limiter) == 3
    # "a" and "c" are still tracked: their buckets are still empty.
    assert not limiter.allow("a", 5.0)
    assert not limiter.allow("c", 5.0)
    # "b" was forgotten: it starts again with a full bucket.
    assert limiter.allow("b", 5.0)


def test_one_source_at_the_limit_stays_one_entry() -> None:
    limiter = RateLimiter(RateLimit(rate=1.0, burst=1, max_sources=1))
    for t in range(10):
        limiter.allow("a", float(t))
    assert len(limiter) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate": 0.0, "burst": 1.0},
        {"rate": -1.0, "burst": 1.0},
        {"rate": 1.0, "burst": 0.5},
        {"rate": 1.0, "burst": 0.0},
        {"rate": 1.0, "burst": 1.0, "max_sources": 0},
        {"rate": float("nan"), "burst": 1.0},
        {"rate": 1.0, "burst": float("nan")},
    ],
)
def test_invalid_limits_are_usage_errors(kwargs: dict[str, float]) -> None:
    with pytest.raises(UsageError, match="rate limit"):
        RateLimit(**kwargs)  # type: ignore[arg-type]


# --- the bound ----------------------------------------------------------------------------

limits = st.builds(
    RateLimit,
    rate=st.floats(0.01, 100.0, allow_nan=False),
    burst=st.floats(1.0, 20.0, allow_nan=False),
)
requests = st.lists(
    # (source, seconds since the previous request): time never goes back.
    st.tuples(st.sampled_from(["a", "b", "c"]), st.floats(0.0, 2.0, allow_nan=False)),
    max_size=120,
)


@given(limit=limits, steps=requests, start=st.floats(0.0, 1e6, allow_nan=False))
def test_no_source_ever_gets_more_than_burst_plus_rate_times_time(
    limit: RateLimit, steps: list[tuple[str, float]], start: float
) -> None:
    # max_sources (4096) exceeds the sources used: no eviction resets a bucket.
    limiter = RateLimiter(limit)
    now = start
    allowed: dict[str, list[float]] = {}
    for source, delay in steps:
        now += delay
        if limiter.allow(source, now):
            allowed.setdefault(source, []).append(now)
    for times in allowed.values():
        # Windows between allowed requests are the tightest ones there are.
        for i, t0 in enumerate(times):
            for j in range(i, len(times)):
                t1 = times[j]
                assert j - i + 1 <= limit.burst + limit.rate * (t1 - t0) + EPSILON


@given(limit=limits, steps=requests)
def test_refused_plus_allowed_is_every_request(
    limit: RateLimit, steps: list[tuple[str, float]]
) -> None:
    limiter = RateLimiter(limit)
    now = 0.0
    allowed = 0
    for source, delay in steps:
        now += delay
        allowed += limiter.allow(source, now)
    assert allowed + limiter.refused == len(steps)


# --- the source network --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "network"),
    [
        ("203.0.113.7", "203.0.113.0/24"),
        ("203.0.113.250", "203.0.113.0/24"),
        ("203.0.114.7", "203.0.114.0/24"),
        ("127.0.0.1", "127.0.0.0/24"),
        ("2001:db8:1:2::7", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::7", "2001:db8:1:3::/64"),
        ("2001:DB8:1:2:0:0:0:7", "2001:db8:1:2::/64"),
        # An IPv4 peer seen through a dual-stack socket is that IPv4 address,
        # not a member of ::/64 with every other IPv4 peer.
        ("::ffff:203.0.113.7", "203.0.113.0/24"),
        ("fe80::1%eth0", "fe80::/64"),
        ("::1", "::/64"),
        ("alice", "alice"),  # the simulator's names: each its own
    ],
)
def test_a_source_is_charged_to_its_network(host: str, network: str) -> None:
    assert source_network(host) == network


@given(st.ip_addresses(v=4))
def test_every_ipv4_address_of_a_slash_24_is_one_source(address: ipaddress.IPv4Address) -> None:
    base = ipaddress.IPv4Address(int(address) >> 8 << 8)
    assert source_network(str(address)) == source_network(str(base)) == f"{base}/24"


@given(st.ip_addresses(v=6))
def test_every_ipv6_address_of_a_slash_64_is_one_source(address: ipaddress.IPv6Address) -> None:
    if address.ipv4_mapped is not None:
        return
    base = ipaddress.IPv6Address(int(address) >> 64 << 64)
    assert source_network(str(address)) == source_network(str(base)) == f"{base}/64"
