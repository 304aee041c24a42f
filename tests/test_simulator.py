"""The simulator: scenarios read and written, runs that repeat, faults that bite.

The parser is checked as a codec (any scenario written and read back is the
same) and for its one-line refusals; runs go through the CLI, as a user
runs them, at the shipped scenarios' small sizes.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pbackup.errors import UsageError
from p2pbackup.sim import scenario as sc

SIMULATIONS = Path(__file__).resolve().parent.parent / "simulations"
SHIPPED = sorted(SIMULATIONS.glob("*.toml"))

MINIMAL = """
version = 1
name = "minimal"
days = 10
[nodes]
count = 6
"""


# -- scenarios ------------------------------------------------------------------------


def test_a_minimal_scenario_takes_the_defaults() -> None:
    s = sc.parse(MINIMAL)
    assert (s.name, s.days, s.nodes.count, s.nodes.friends) == ("minimal", 10.0, 6, None)
    assert s.repository == sc.Repository() and s.workload == sc.Workload()
    assert s.small == sc.Small(nodes=6, days=4.0)
    assert s.faults == ()


def test_every_shipped_scenario_parses_and_has_a_small_size() -> None:
    assert len(SHIPPED) >= 6
    for path in SHIPPED:
        s = sc.parse(path.read_text(), str(path))
        small = s.small_size()
        assert small.days <= 10 and small.nodes.count <= 12, path


BAD = [
    (("version = 1", "version = 2"), "this p2pbackup reads version = 1"),
    (("count = 6", "count = 6\ncolour = 1"), "unknown key 'colour' in [nodes]"),
    (("count = 6", "count = 2"), "at least 3 other nodes"),
    (("count = 6", "count = -1"), "count must be a whole number"),
    (("days = 10", "days = 'ten'"), "days must be a number"),
    (("[nodes]", "[workload]\nowners = 9\n[nodes]"), "owners = 9 is more than the nodes"),
    (("[nodes]", "[links]\nloss = 2\n[nodes]"), "[links] loss must be from 0 to 1"),
    (("[nodes]", "[maintenance]\nrepair_interval = 'soon'\n[nodes]"), "repair_interval 'soon'"),
    (("[nodes]", "[[faults]]\nday = 1\nkind = 'flood'\ncount = 1\n[nodes]"), "kind must be"),
    (("[nodes]", "[[faults]]\nday = 1\nkind = 'holiday'\ncount = 1\n[nodes]"), "needs duration"),
    (("[nodes]", "[[faults]]\nday = 1\nkind = 'depart'\nnodes = [9]\n[nodes]"), "names node 9"),
    (("[nodes]", "[[faults]]\nday = 1\nkind = 'depart'\n[nodes]"), "one of nodes, count or"),
    (('name = "minimal"', "name = "), "not valid TOML"),
]


@pytest.mark.parametrize(("edit", "message"), BAD)
def test_bad_scenarios_are_refused_in_one_line(edit: tuple[str, str], message: str) -> None:
    text = MINIMAL.replace(*edit)
    assert text != MINIMAL
    with pytest.raises(UsageError) as info:
        sc.parse(text, "x.toml")
    assert str(info.value).startswith("x.toml: ")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def _days() -> st.SearchStrategy[float]:
    return st.floats(0.01, 1000, allow_nan=False).map(lambda d: round(d, 3))


@st.composite
def scenarios(draw: st.DrawFn) -> sc.Scenario:
    count = draw(st.integers(4, 200))
    owners = draw(st.integers(1, count))
    faults = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(sc.FAULT_KINDS))
        how = draw(st.sampled_from(["nodes", "count", "fraction"]))
        if kind == "join":
            how = "count"
        limit = owners if kind == "lose_home" else count
        faults.append(
            sc.Fault(
                day=draw(_days()),
                kind=kind,
                nodes=(
                    tuple(draw(st.lists(st.integers(0, limit - 1), min_size=1, max_size=3)))
                    if how == "nodes"
                    else ()
                ),
                count=draw(st.integers(1, 5)) if how == "count" else None,
                fraction=draw(st.floats(0, 1)) if how == "fraction" else None,
                duration=draw(_days()),
                share=draw(st.floats(0, 1)),
                friends=draw(st.none() | st.integers(1, 9)),
            )
        )
    return sc.Scenario(
        name=draw(st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1)),
        description=draw(st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]))),
        days=draw(_days()),
        seed=draw(st.integers(0, 2**32)),
        nodes=sc.Nodes(
            count=count,
            friends=draw(st.none() | st.integers(3, count - 1)),
            online_hours=draw(st.floats(1, 24)),
            holidays_per_year=draw(st.floats(0, 12)),
            churn_per_month=draw(st.floats(0, 10)),
        ),
        links=sc.Links(
            latency_ms=draw(st.floats(0, 500)),
            uplink_kbps=draw(st.floats(0, 1e6)),
            loss=draw(st.floats(0, 1)),
        ),
        repository=sc.Repository(
            k=2, n=draw(st.integers(3, 20)), pack_kib=draw(st.integers(1, 4096))
        ),
        workload=sc.Workload(owners=owners, files=draw(st.integers(1, 60))),
        maintenance=draw(
            st.sampled_from(
                [(), (("repair_interval", "6h"),), (("audit_period", "2d"), ("grace", "3d"))]
            )
        ),
        faults=tuple(faults),
        small=sc.Small(nodes=draw(st.integers(4, 12)), days=draw(_days())),
    )


@given(scenarios())
@settings(max_examples=200, deadline=None)
def test_a_scenario_written_and_read_back_is_the_same(s: sc.Scenario) -> None:
    assert sc.parse(sc.dumps(s)) == s


def test_the_small_size_scales_every_day() -> None:
    s = sc.parse(
        MINIMAL
        + "[small]\nnodes = 4\ndays = 2\n"
        + "[[faults]]\nday = 5\nkind = 'holiday'\ncount = 1\nduration = 4\n"
    )
    small = s.small_size()
    assert (small.days, small.nodes.count) == (2.0, 4)
    assert small.faults[0] == attrs.evolve(s.faults[0], day=1.0, duration=0.8)
