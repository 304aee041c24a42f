"""Per-source rate limits: how much work one address may ask of a node (pure).

Nouns:

* **source** — whatever a request is charged to: for the DHT, the sender's
  host (not host and port: a host that changes port is still one host).
* **bucket** — a token bucket per source: it holds at most ``burst`` tokens,
  refills at ``rate`` tokens a second, and each request takes one. A request
  that finds the bucket empty is refused.
* **table** — the buckets currently tracked; at most ``max_sources`` of them.
  When it is full, the bucket idle the longest is dropped (a source that has
  been quiet that long is back to a full bucket anyway), so a flood of forged
  source addresses costs bounded memory.

The clock is passed in (``now``, seconds, any monotonic origin), so the
simulator's virtual time works the same as the real one.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable

import attrs

from p2pbackup.errors import UsageError


@attrs.frozen
class RateLimit:
    """A sustained ``rate`` per second with bursts of up to ``burst``."""

    rate: float
    burst: float
    max_sources: int = 4096

    def __attrs_post_init__(self) -> None:
        if not (self.rate > 0 and self.burst >= 1 and self.max_sources >= 1):
            raise UsageError(
                f"a rate limit needs rate > 0, burst >= 1 and max_sources >= 1, not {self}"
            )


@attrs.define
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets for many sources under one :class:`RateLimit`."""

    def __init__(self, limit: RateLimit) -> None:
        self.limit = limit
        # Ordered by last use: the first entry is the one idle the longest.
        self._buckets: collections.OrderedDict[Hashable, _Bucket] = collections.OrderedDict()
        self.refused = 0

    def allow(self, source: Hashable, now: float) -> bool:
        """Charge one request to ``source`` at ``now``; False if it must be refused."""
        limit = self.limit
        bucket = self._buckets.pop(source, None)
        if bucket is None:
            bucket = _Bucket(limit.burst, now)
            while len(self._buckets) >= limit.max_sources:
                self._buckets.popitem(last=False)
        else:
            # A clock that steps back (it should not) must not mint tokens.
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(limit.burst, bucket.tokens + elapsed * limit.rate)
            bucket.updated = max(bucket.updated, now)
        self._buckets[source] = bucket
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return True
        self.refused += 1
        return False

    def __len__(self) -> int:
        return len(self._buckets)
