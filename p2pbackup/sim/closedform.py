"""Closed forms the durability model is checked against (pure).

Nouns:

* **availability** a — the chance that one node is online at a given moment.
  A k-of-n pack is **available** when at least k of the nodes holding its
  shards are online: :func:`binomial_availability`,
  Σ_{i≥k} C(n,i) a^i (1−a)^{n−i}, the nodes being independent.
* **churn** p — the chance that one node is gone for good by the end of a
  period. A pack is **lost** over the period when more than n − k of its
  shards are gone: exactly :func:`binomial_loss`; in the Poisson form that
  Storj's durability paper states, :func:`poisson_survival`,
  e^{−λ} Σ_{i≤n−k} λ^i/i! with λ = p·n (close to the binomial when p is
  small and n large, and above it otherwise: the Poisson law has the
  larger variance).
* **loss per pack-year** — packs lost divided by the years packs were
  exposed (a pack stops counting once lost); :func:`analytic_loss_per_pack_year`
  estimates it for the model's parameters, :func:`poisson_rate_interval`
  gives the exact (Garwood) confidence interval of a simulated one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from p2pbackup.sim.durability import DurabilityParams

#: Days in a year, for rates per pack-year.
YEAR_DAYS = 365.25


def binomial_tail(n: int, q: float, at_least: int) -> float:
    """P(X ≥ ``at_least``) for X ~ Binomial(n, q)."""
    if at_least <= 0:
        return 1.0
    if q <= 0 or q >= 1:
        return 1.0 if q >= 1 and at_least <= n else 0.0
    # In logarithms: C(n, i) overflows a float for n in the thousands.
    log_q, log_not = math.log(q), math.log1p(-q)
    log_n = math.lgamma(n + 1)
    return math.fsum(
        math.exp(
            log_n - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_q + (n - i) * log_not
        )
        for i in range(at_least, n + 1)
    )


def binomial_availability(k: int, n: int, a: float) -> float:
    """The chance that at least k of n independent nodes, each online with
    probability ``a``, are online: Σ_{i≥k} C(n,i) a^i (1−a)^{n−i}."""
    return binomial_tail(n, a, k)


def binomial_loss(k: int, n: int, p: float) -> float:
    """The chance that more than n − k of n shards are gone when each is gone
    independently with probability ``p``."""
    return binomial_tail(n, p, n - k + 1)


def poisson_survival(k: int, n: int, p: float) -> float:
    """The Poisson form of a pack's survival over a period of churn ``p``:
    e^{−λ} Σ_{i≤n−k} λ^i/i!, λ = p·n."""
    lam = p * n
    return math.exp(-lam) * math.fsum(lam**i / math.factorial(i) for i in range(n - k + 1))


def churn(days: float, mttf_days: float) -> float:
    """The chance that a node of exponential lifetime (mean ``mttf_days``)
    is gone within ``days``."""
    return -math.expm1(-days / mttf_days)


def no_repair_loss_per_pack_year(k: int, n: int, mttf_days: float, years: float) -> float:
    """Loss per pack-year of packs never repaired, over ``years``: the chance
    F(Y) that a pack is lost by the end, divided by its expected exposure
    ∫₀^Y (1 − F(t)) dt (trapezoids over 2,000 steps)."""
    days = years * YEAR_DAYS
    steps = 2000
    survival = [
        1 - binomial_loss(k, n, churn(days * i / steps, mttf_days)) for i in range(steps + 1)
    ]
    exposure_days = days / steps * (math.fsum(survival) - (survival[0] + survival[-1]) / 2)
    return (1 - survival[-1]) / (exposure_days / YEAR_DAYS)


def repair_window_days(
    k: int,
    threshold: int,
    detect_days: float,
    grace_days: float,
    repair_days: float,
    urgent_spares: int,
) -> float:
    """How long a pack that just fell below its threshold r stays exposed:
    the loss is noticed ``detect_days`` after it, then repair waits out the
    grace period (unless r − 1 − k spare shards is urgent already) and takes
    ``repair_days``."""
    urgent = threshold - 1 - k < urgent_spares
    wait = detect_days if urgent else max(detect_days, grace_days)
    return wait + repair_days


def repaired_loss_per_pack_year(
    k: int, n: int, threshold: int, mttf_days: float, window_days: float
) -> float:
    """Loss per pack-year with repair to n whenever fewer than r shards are
    left, as a renewal cycle.

    Approximation: a cycle runs from n shards down to r − 1 (each of the j
    shards left failing at rate 1/mttf: Σ_{j=r}^{n} mttf/j days), then a
    repair window W (:func:`repair_window_days`) during which the pack is
    lost if more than r − 1 − k of its r − 1 shards fail (binomial with
    churn over W); after the window it is whole again. Losses outside a
    window cannot happen (r > k). It ignores that a second failure within
    the window can make repair urgent and shorten it (so it errs high), that
    a node asleep at the end of the grace period is waited for once more,
    and any repair that cannot start because too few holders are online.
    """
    descent = math.fsum(mttf_days / j for j in range(threshold, n + 1))
    cycle_days = descent + window_days
    loss = binomial_tail(threshold - 1, churn(window_days, mttf_days), threshold - k)
    return loss / (cycle_days / YEAR_DAYS)


def analytic_loss_per_pack_year(params: DurabilityParams) -> float:
    """The closed-form estimate of the loss per pack-year for ``params``:
    :func:`no_repair_loss_per_pack_year` without repair, else
    :func:`repaired_loss_per_pack_year` over the window of
    :func:`repair_window_days` (each states its approximation). Both take
    every node as always online: diurnal availability enters only the
    simulation, and the transfer time of a repair only through its
    ``repair_days``."""
    k, n = params.k, params.n
    repair = params.repair
    if repair is None:
        return no_repair_loss_per_pack_year(k, n, params.node_mttf_days, params.years)
    r = repair.policy.threshold(k, n)
    window = repair_window_days(
        k,
        r,
        params.detect_days,
        repair.policy.grace / 86400.0,
        repair.repair_days,
        repair.policy.urgent_spares,
    )
    return repaired_loss_per_pack_year(k, n, r, params.node_mttf_days, window)


def poisson_rate_interval(
    count: int, exposure: float, confidence: float = 0.95
) -> tuple[float, float]:
    """The exact (Garwood) confidence interval of a rate: ``count`` events
    over ``exposure`` (pack-years), from the Poisson law of the count.

    The bounds solve P(X ≥ count | λ_lo) = α/2 and P(X ≤ count | λ_hi) = α/2
    by bisection; with no events the lower bound is 0.
    """
    if exposure <= 0:
        return 0.0, math.inf
    alpha = 1 - confidence
    upper = _solve(lambda lam: _poisson_cdf(count, lam) - alpha / 2, count)
    lower = (
        0.0
        if count == 0
        else _solve(lambda lam: _poisson_cdf(count - 1, lam) - (1 - alpha / 2), count)
    )
    return lower / exposure, upper / exposure


def _poisson_cdf(count: int, lam: float) -> float:
    """P(X ≤ count) for X ~ Poisson(λ), summed in log space."""
    if lam == 0:
        return 1.0
    log_lam = math.log(lam)
    return math.fsum(math.exp(i * log_lam - lam - math.lgamma(i + 1)) for i in range(count + 1))


def _solve(decreasing: Callable[[float], float], count: int) -> float:
    """The λ where ``decreasing(λ)`` (a Poisson CDF less a level, falling in
    λ) crosses 0."""
    low, high = 0.0, 2.0 * count + 10.0
    while decreasing(high) > 0:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        if decreasing(mid) > 0:
            low = mid
        else:
            high = mid
    return (low + high) / 2
