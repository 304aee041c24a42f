"""The durability model against its closed forms, its invariants, and the
``sim durability`` and ``sim sweep`` commands.

Every run is seeded, so each check is deterministic; the statistical ones
allow four standard errors (or the model's 99 % interval), so that a change
of seed would pass them too in all but rare cases.
"""

from __future__ import annotations

import json
import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pbackup.errors import UsageError
from p2pbackup.sim import closedform, durability
from p2pbackup.sim.durability import DurabilityModel, DurabilityParams, RepairModel
from tests.cli_helpers import cli_error, cli_ok

# -- closed forms ---------------------------------------------------------------


def test_binomial_availability_matches_the_issues_figures() -> None:
    assert closedform.binomial_availability(4, 8, 0.8) == pytest.approx(0.9896, abs=5e-5)
    assert closedform.binomial_availability(3, 10, 0.6) == pytest.approx(0.9877, abs=5e-5)


def test_poisson_form_tends_to_the_binomial_for_small_churn() -> None:
    # The Poisson law has the larger variance, so it loses more packs; the
    # gap closes as p falls with p·n fixed.
    gaps = []
    for n in (20, 200, 2000):
        p = 2.0 / n
        exact = closedform.binomial_loss(n - 4, n, p)
        poisson = 1 - closedform.poisson_survival(n - 4, n, p)
        assert poisson > exact
        gaps.append(poisson / exact - 1)
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.01


def test_poisson_rate_interval_known_values() -> None:
    # Garwood's interval for 0 and 10 events (tables of the Poisson law).
    assert closedform.poisson_rate_interval(0, 1.0) == (0.0, pytest.approx(3.689, abs=1e-3))
    low, high = closedform.poisson_rate_interval(10, 2.0)
    assert low == pytest.approx(4.795 / 2, abs=1e-3)
    assert high == pytest.approx(18.390 / 2, abs=1e-3)


@given(st.integers(0, 300), st.floats(0.5, 1e6))
def test_poisson_rate_interval_holds_the_estimate(count: int, exposure: float) -> None:
    low, high = closedform.poisson_rate_interval(count, exposure)
    assert 0 <= low <= count / exposure <= high
    assert high > 0


@given(st.integers(1, 12), st.integers(1, 12), st.floats(0, 1), st.floats(0, 1))
def test_binomial_availability_is_monotone(k: int, extra: int, a: float, b: float) -> None:
    n = k + extra
    low, high = sorted((a, b))
    assert (
        closedform.binomial_availability(k, n, low)
        <= closedform.binomial_availability(k, n, high) + 1e-12
    )
    if k > 1:
        assert (
            closedform.binomial_availability(k, n, a)
            <= closedform.binomial_availability(k - 1, n, a) + 1e-12
        )


# -- the model against them -----------------------------------------------------


def _run(params: DurabilityParams, seed: int = 1) -> durability.DurabilityResult:
    return durability.simulate(params, random.Random(seed))


@pytest.mark.parametrize(("k", "n", "a"), [(4, 8, 0.8), (3, 10, 0.6)])
def test_available_share_matches_the_binomial(k: int, n: int, a: float) -> None:
    # No node ends (lifetimes of a million years): only sleep makes packs
    # unreadable, and each node sleeps independently of the others.
    params = DurabilityParams(
        k=k,
        n=n,
        nodes=2000,
        packs=2000,
        node_mttf_days=3.65e8,
        years=0.2,
        repair=None,
        availability=a,
        samples=40,
    )
    result = _run(params)
    expected = closedform.binomial_availability(k, n, a)
    assert result.available_fraction is not None
    error = math.sqrt(expected * (1 - expected) / (params.packs * params.samples))
    assert abs(result.available_fraction - expected) < 4 * error + 1e-3
    assert result.packs_lost == 0


def _one_period(k: int, n: int, p: float, packs: int) -> tuple[int, DurabilityParams]:
    """Packs lost over one period in which each node ends with chance p."""
    mttf = 1000.0
    days = -math.log1p(-p) * mttf
    params = DurabilityParams(
        k=k,
        n=n,
        nodes=4000,
        packs=packs,
        node_mttf_days=mttf,
        years=days / closedform.YEAR_DAYS,
        repair=None,
        samples=0,
    )
    return _run(params).packs_lost, params


def test_loss_over_one_period_matches_the_binomial() -> None:
    lost, params = _one_period(4, 8, 0.2, 5000)
    expected = closedform.binomial_loss(4, 8, 0.2)
    error = math.sqrt(expected * (1 - expected) / params.packs)
    assert abs(lost / params.packs - expected) < 4 * error


def test_loss_over_one_period_matches_the_poisson_form() -> None:
    # 36-of-40 at p = 0.05: λ = 2. The Poisson form is an approximation of
    # the binomial law the model follows, so it may be off by their gap.
    lost, params = _one_period(36, 40, 0.05, 4000)
    poisson = 1 - closedform.poisson_survival(36, 40, 0.05)
    gap = abs(poisson - closedform.binomial_loss(36, 40, 0.05))
    error = math.sqrt(poisson * (1 - poisson) / params.packs)
    assert abs(lost / params.packs - poisson) < gap + 4 * error


def test_no_repair_matches_its_closed_form_per_pack_year() -> None:
    # Packs spread thin over many nodes, so that packs
    # seldom share a node and their losses are nearly independent, as the
    # Poisson interval assumes.
    params = DurabilityParams(
        k=4, n=8, nodes=8000, packs=3000, node_mttf_days=365, years=1, repair=None, samples=0
    )
    result = _run(params)
    low, high = closedform.poisson_rate_interval(result.packs_lost, result.pack_years, 0.99)
    assert low <= closedform.analytic_loss_per_pack_year(params) <= high


def _repaired(repair_days: float, *, availability: float = 1.0) -> DurabilityParams:
    repair = RepairModel.with_threshold(4, 8, 6, grace_days=3, repair_days=repair_days)
    return DurabilityParams(
        k=4,
        n=8,
        nodes=1000,
        packs=1000,
        node_mttf_days=100,
        years=2,
        repair=repair,
        availability=availability,
        samples=0,
    )


def test_repair_against_its_closed_form_and_slower_repair() -> None:
    fast = _run(_repaired(1), seed=3)
    slow = _run(_repaired(20), seed=3)
    # The closed form errs high (its docstring says why), within a factor 2.
    analytic = closedform.analytic_loss_per_pack_year(fast.params)
    low, high = closedform.poisson_rate_interval(fast.packs_lost, fast.pack_years, 0.99)
    assert low <= analytic <= 2 * high
    # More bandwidth (shorter repairs) loses fewer packs: by far more than
    # the noise here.
    assert fast.interval[1] < slow.interval[0]
    # Repair beats none at all, seen through the same node failures.
    bare = _run(attrs_evolve(fast.params, repair=None), seed=3)
    assert bare.node_failures == fast.node_failures
    assert bare.interval[0] > fast.interval[1]


def attrs_evolve(params: DurabilityParams, **changes: object) -> DurabilityParams:
    import attrs

    return attrs.evolve(params, **changes)


# -- invariants -----------------------------------------------------------------


def test_without_repair_packs_lost_are_exactly_those_short_of_living_holders() -> None:
    params = DurabilityParams(
        k=3, n=6, nodes=300, packs=600, node_mttf_days=400, years=1, repair=None, samples=0
    )
    model = DurabilityModel(params, random.Random(5))
    result = model.run()
    short = 0
    for copies in model.copies:
        assert len(copies) == params.n  # nothing moves without repair
        living = {i for i, node, _, _ in copies if model.death[node] > model.end}
        short += len(living) < params.k
    assert result.packs_lost == short > 0
    assert result.repair_bytes == 0 and result.repairs == 0


@pytest.mark.parametrize("availability", [1.0, 0.6])
def test_invariants_after_a_run_with_repair(availability: float) -> None:
    params = attrs_evolve(_repaired(2, availability=availability), packs=400, nodes=400)
    model = DurabilityModel(params, random.Random(7))
    result = model.run()
    assert 0 <= result.packs_lost <= params.packs
    assert 0 < result.pack_years <= params.packs * params.years
    assert result.interval[0] <= result.loss_per_pack_year <= result.interval[1]
    # Each repair moves k shards down and its rebuilt ones up.
    shard = params.shard_bytes
    assert result.repair_bytes == shard * (params.k * result.repairs + result.shards_rebuilt)
    for pack, copies in enumerate(model.copies):
        if model.lost_at[pack] is not None:
            continue
        nodes = [node for _, node, _, _ in copies]
        assert len(nodes) == len(set(nodes)), "two shards of a pack on one node"
        current = [i for i, _, is_current, _ in copies if is_current]
        assert len(current) == len(set(current)) and set(current) <= set(range(params.n))
        for node in nodes:
            if model.death[node] > model.end:
                assert pack in model.holdings[node]


def test_the_same_seed_gives_the_same_run() -> None:
    params = _repaired(1, availability=0.7)
    params = attrs_evolve(params, packs=200, nodes=200, years=1, samples=3)
    assert durability.summary(_run(params, 11)) == durability.summary(_run(params, 11))
    assert durability.summary(_run(params, 11)) != durability.summary(_run(params, 12))


def test_parameters_that_cannot_run_are_refused_in_one_line() -> None:
    with pytest.raises(UsageError, match="above K and at most N"):
        RepairModel.with_threshold(4, 8, 4, repair_days=1)
    with pytest.raises(UsageError, match="too few"):
        DurabilityParams(k=4, n=8, nodes=7, packs=1, node_mttf_days=1, years=1, repair=None)


# -- the command line -----------------------------------------------------------


def test_sim_durability_json() -> None:
    result = cli_ok(
        "sim",
        "durability",
        "--shards",
        "4/8",
        "--repair-threshold",
        "6",
        "--repair-days",
        "1",
        "--node-mttf-days",
        "365",
        "--years",
        "1",
        "--nodes",
        "300",
        "--packs",
        "300",
        "--seed",
        "4",
        "--json",
    )
    out = json.loads(result.stdout)
    low, high = out["simulated_loss_interval_95"]
    assert low <= out["simulated_loss_per_pack_year"] <= high
    assert out["analytic_loss_per_pack_year"] > 0
    assert out["repair_threshold"] == 6 and out["seed"] == 4 and out["repairs"] > 0
    again = cli_ok(
        "sim",
        "durability",
        "--shards",
        "4/8",
        "--no-repair",
        "--node-mttf-days",
        "365",
        "--years",
        "1",
        "--nodes",
        "300",
        "--packs",
        "300",
    )
    assert again.lines[1].startswith("packs lost: ")
    assert "by the closed form" in again.lines[2]


def test_sim_durability_says_what_is_missing() -> None:
    message = cli_error(
        "sim", "durability", "--shards", "4/8", "--node-mttf-days", "365", "--years", "1"
    )
    assert "--no-repair" in message and "--repair-days" in message
    message = cli_error(
        "sim",
        "durability",
        "--shards",
        "4/8",
        "--no-repair",
        "--repair-threshold",
        "6",
        "--node-mttf-days",
        "365",
        "--years",
        "1",
    )
    assert "--no-repair" in message


def test_sim_sweep_on_a_local_cluster_of_two_workers() -> None:
    result = cli_ok(
        "sim",
        "sweep",
        "--shards",
        "4/8,3/6",
        "--repair-threshold",
        "none,5,7",
        "--grace-days",
        "1,3",
        "--node-mttf-days",
        "365",
        "--years",
        "1",
        "--nodes",
        "200",
        "--packs",
        "200",
        "--workers",
        "2",
        "--json",
        timeout=90,
    )
    out = json.loads(result.stdout)
    points = out["points"]
    # 4/8: none once (grace changes nothing), 5 and 7 at two graces; 3/6:
    # none, and 5 at two graces (7 does not fit).
    assert [(p["shards"], p["repair_threshold"]) for p in points] == [
        ("4/8", None),
        ("4/8", 5),
        ("4/8", 5),
        ("4/8", 7),
        ("4/8", 7),
        ("3/6", None),
        ("3/6", 5),
        ("3/6", 5),
    ]
    # Each point is the run `sim durability` makes with the same seed.
    single = cli_ok(
        "sim",
        "durability",
        "--shards",
        "4/8",
        "--repair-threshold",
        "5",
        "--repair-days",
        "1",
        "--grace-days",
        "1",
        "--node-mttf-days",
        "365",
        "--years",
        "1",
        "--nodes",
        "200",
        "--packs",
        "200",
        "--json",
    )
    assert json.loads(single.stdout)["packs_lost"] == points[1]["packs_lost"]
    assert json.loads(single.stdout)["repair_bytes"] == points[1]["repair_bytes"]


def test_a_small_circle_with_sleeping_friends_keeps_repairing() -> None:
    # Five friends, 3-of-5: a friend's replacement is the only node a lost
    # shard can go to. Looked for again a whole day later each time, it was
    # asleep at that hour every time, the pack sat at k shards, and the
    # next end lost it (seed 1: all packs by the 15th year).
    repair = RepairModel.with_threshold(3, 5, 4, repair_days=1)
    params = DurabilityParams(
        k=3,
        n=5,
        nodes=5,
        packs=20,
        node_mttf_days=1095,
        years=30,
        repair=repair,
        availability=0.8,
        samples=0,
    )
    result = _run(params)
    assert result.packs_lost == 0
    assert result.repairs > 0


def test_sim_takes_a_scenario_path_beside_its_subcommands() -> None:
    from p2pbackup.cli import main as cli

    parser = cli.build_parser()
    args = parser.parse_args(["sim", "simulations/circle.toml"])
    assert (args.sim_command, args.scenario) == (cli.SIM_SCENARIO, "simulations/circle.toml")
    args = parser.parse_args(
        [
            "sim",
            "durability",
            "--shards",
            "3/6",
            "--no-repair",
            "--node-mttf-days",
            "9",
            "--years",
            "1",
        ]
    )
    assert args.sim_command == "durability"
