"""Per-source rate limits: how much work one address may ask of a node (pure).

Nouns:

* **source** — whatever a request is charged to: for the DHT, the sender's
  **network** (:func:`source_network`): its IPv4 /24 or IPv6 /64, not its
  address and port. A host that changes port is still one host, and one
  host usually holds a whole IPv6 /64 (and an attacker easily many IPv4
  addresses of one /24): charged per address, it would be any number of
  sources.
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
import functools
import ipaddress
from collections.abc import Hashable
from typing import Final

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


#: Prefix lengths of the network a source address is charged to.
IPV4_SOURCE_PREFIX: Final = 24
IPV6_SOURCE_PREFIX: Final = 64


@functools.lru_cache(maxsize=4096)
def source_network(host: str) -> str:
    """The source a datagram from ``host`` is charged to: its /24 (IPv4) or
    /64 (IPv6) network in CIDR notation. An IPv4 address seen through a
    dual-stack socket (``::ffff:a.b.c.d``) counts as that IPv4 address; a
    host that is not an IP address (the simulator's names) is its own source.
    Asked for every datagram received, mostly from the same few hosts: the
    answers are cached."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = IPV4_SOURCE_PREFIX if address.version == 4 else IPV6_SOURCE_PREFIX
    return str(ipaddress.ip_network((address, prefix), strict=False))
