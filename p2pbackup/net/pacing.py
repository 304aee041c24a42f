"""Pacing: spacing transfers so that they average at most a given rate (pure).

Nouns:

* **pace** — :class:`Pace`: at most ``rate`` bytes a second on average, with
  up to ``burst`` bytes sent at once after a quiet spell (a token bucket
  that waits instead of refusing). Repair and audits go through one, so
  that they never fill a home's uplink (or a friend's, which a download
  from it uses); so do a relay's circuits, and the streams of a network
  with bandwidth limits (:mod:`p2pbackup.net.limits`).
* **delay** — how long a transfer of some bytes must wait before it starts,
  given the transfers booked before it: :meth:`Pace.book` books it and
  returns the wait. Transfers booked from several tasks line up in the
  order they were booked.

The clock is passed in (``now``, seconds on any monotonic origin), so
virtual time works as real time does. :class:`p2pbackup.dht.ratelimit`
refuses requests over its rate; a pace never refuses, it only delays.
"""

from __future__ import annotations

import math

import attrs


@attrs.define
class Pace:
    """At most ``rate`` bytes a second (None: no limit), bursts of ``burst`` bytes."""

    rate: float | None
    burst: float = 1 << 20
    #: When the bytes booked so far will have gone at the rate (the
    #: "theoretical arrival time" of the generic cell rate algorithm).
    _booked_until: float = -math.inf

    def __attrs_post_init__(self) -> None:
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"a pace needs a rate > 0 bytes/s, not {self.rate}")
        if not self.burst >= 0:
            raise ValueError(f"a pace needs a burst >= 0 bytes, not {self.burst}")

    def book(self, size: int, now: float) -> float:
        """Book ``size`` bytes to start at ``now`` or later; the seconds to
        wait before they start (0 when within the burst)."""
        if self.rate is None:
            return 0.0
        start = max(self._booked_until, now)
        self._booked_until = start + size / self.rate
        # Within the burst, bytes go at once; beyond it they wait until the
        # bytes booked before them are within a burst of done.
        return max(0.0, start - now - self.burst / self.rate)
