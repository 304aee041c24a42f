"""The simulator: scenarios read and written, runs that repeat, faults that bite.

The parser is checked as a codec (any scenario written and read back is the
same) and for its one-line refusals; runs go through the CLI, as a user
runs them, at the shipped scenarios' small sizes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pbackup.errors import UsageError
from p2pbackup.sim import report, world
from p2pbackup.sim import scenario as sc

from .cli_helpers import CLI, base_env, cli_error, cli_ok, interruptible

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
    (("[nodes]", "[workload]\ndelegates = 6\n[nodes]"), "delegates = 6 must be less than"),
    (("[nodes]", "[workload]\ndelegates = -1\n[nodes]"), "delegates must be a whole number"),
    (("[nodes]", "[forget]\nkeep_daily = -1\n[nodes]"), "keep_daily"),
    (("[nodes]", "[forget]\nkeep_hourly = {a = 1}\n[nodes]"), "keep_hourly must be a plain"),
    (("[nodes]", "[forget]\nkeep_tag = [1]\n[nodes]"), "[forget] keep_tag must be a list of"),
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
        workload=sc.Workload(
            owners=owners,
            files=draw(st.integers(1, 60)),
            delegates=draw(st.integers(0, count - 1)),
        ),
        maintenance=draw(
            st.sampled_from(
                [(), (("repair_interval", "6h"),), (("audit_period", "2d"), ("grace", "3d"))]
            )
        ),
        forget=draw(
            st.sampled_from(
                [(), (("keep_last", 3), ("prune", True)), (("keep_tag", ("a", "b,c")),)]
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


# -- runs -----------------------------------------------------------------------------


def run_small(name: str, out: Path, *extra: str) -> dict[str, Any]:
    result = cli_ok(
        "sim",
        SIMULATIONS / f"{name}.toml",
        "--small",
        "--json",
        "--out",
        out,
        *extra,
        timeout=900,
    )
    summary: dict[str, Any] = json.loads(result.stdout)
    assert set(report.SUMMARY_KEYS) <= set(summary)
    return summary


def events(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_circle_of_friends_restores_exactly_with_its_plots(tmp_path: Path) -> None:
    summary = run_small("circle-of-friends", tmp_path)
    assert summary["restore_exact"] is True and summary["packs_lost"] == 0
    assert summary["packs"] > 0 and summary["snapshots"] >= summary["nodes"]
    assert summary["audit_bytes"] > 0
    for plot in ("redundancy.png", "traffic.png", "online.png"):
        assert (tmp_path / plot).read_bytes().startswith(b"\x89PNG")
    figures = json.loads((tmp_path / "figures.json").read_text())
    # Machines sleep: fewer are up at night than by day.
    online = figures["series"]["online"]
    assert min(online) < max(online) <= summary["nodes"]


@pytest.mark.slow
def test_a_disaster_loses_nodes_and_repair_rebuilds_what_they_held(tmp_path: Path) -> None:
    summary = run_small("disaster", tmp_path)
    assert summary["departed"] == round(0.3 * summary["nodes"])
    assert summary["repair_bytes"] > 0
    assert summary["packs_lost"] == 0 and summary["restore_exact"] is True


@pytest.mark.slow
def test_the_cheater_is_caught_and_disqualified(tmp_path: Path) -> None:
    summary = run_small("cheater", tmp_path)
    [cheat] = [e for e in events(tmp_path) if e["event"] == "cheat"]
    assert summary["disqualified"] == cheat["nodes"]
    assert summary["packs_lost"] == 0 and summary["restore_exact"] is True


@pytest.mark.slow
def test_a_partition_heals_and_nothing_is_lost(tmp_path: Path) -> None:
    summary = run_small("partition", tmp_path)
    kinds = [e["event"] for e in events(tmp_path)]
    assert kinds.index("partition") < kinds.index("heal")
    assert summary["packs_lost"] == 0 and summary["restore_exact"] is True


@pytest.mark.slow
def test_a_lost_home_is_recovered_from_its_key_while_friends_leave(tmp_path: Path) -> None:
    summary = run_small("home-lost", tmp_path)
    log = events(tmp_path)
    [lost] = [e for e in log if e["event"] == "lose_home"]
    [recovered] = [e for e in log if e["event"] == "recovered"]
    [restored] = [e for e in log if e["event"] == "home_restored"]
    assert recovered["node"] == restored["node"] == lost["node"]
    assert recovered["t"] > lost["t"] and recovered["snapshots"] >= 1
    # Through the DHT: friends kept the pointer through the night every
    # machine was off.
    assert recovered["via"] == "dht"
    # The owner's files, restored from the snapshot taken before the loss.
    assert restored["exact"] is True
    assert summary["departed"] >= 2 and summary["restore_exact"] is True


@pytest.mark.slow
def test_delegates_keep_an_absent_home_alive_and_without_them_packs_are_lost(
    tmp_path: Path,
) -> None:
    kept = run_small("away-for-months", tmp_path / "kept")
    log = events(tmp_path / "kept")
    [chosen] = [e for e in log if e["event"] == "delegates"]
    assert chosen == {**chosen, "node": "node00", "delegates": ["node01", "node02"]}
    [restored] = [e for e in log if e["event"] == "home_restored"]
    assert restored["exact"] is True
    assert kept["departed"] == 4 and kept["packs"] > 0
    assert kept["packs_lost"] == 0 and kept["restore_exact"] is True
    assert kept["worst_redundancy"] >= 0

    # The same run without delegates: nobody repairs while the owner is away.
    alone = run_small("away-for-months-alone", tmp_path / "alone")
    assert not [e for e in events(tmp_path / "alone") if e["event"] == "delegates"]
    assert alone["departed"] == 5  # the four friends, and the home never recovered
    # Back, the owner finds too little to recover from, again and again.
    tries = [e["event"] for e in events(tmp_path / "alone") if e["event"].startswith("recover")]
    assert tries and set(tries) <= {"recover_incomplete", "recover_failed"}
    assert alone["packs_lost"] > 0 and alone["restore_exact"] is False
    assert alone["worst_redundancy"] < 0


@pytest.mark.slow
def test_the_neighbourhood_churns(tmp_path: Path) -> None:
    summary = run_small("neighbourhood", tmp_path, "--seed", "3")
    assert summary["seed"] == 3 and summary["virtual_days"] == 2
    assert summary["restore_exact"] is True and summary["packs_lost"] == 0


TINY = """
version = 1
name = "tiny"
days = 1.5
seed = 4
[nodes]
count = 5
online_hours = 20
[workload]
owners = 2
files = 6
tree_kib = 96
[repository]
k = 2
n = 4
pack_kib = 64
[[faults]]
day = 0.6
kind = "corrupt"
nodes = [4]
[[faults]]
day = 1.0
kind = "depart"
nodes = [3]
"""


def test_one_scenario_and_seed_give_one_event_log_and_one_set_of_figures(
    tmp_path: Path,
) -> None:
    scenario = sc.parse(TINY)
    runs = []
    for attempt in ("a", "b"):
        # One work directory, as the CLI's runs one after another get: the
        # owners' snapshots record their trees' paths.
        shutil.rmtree(tmp_path / "work", ignore_errors=True)
        outcome = world.run(scenario, tmp_path / "work", tmp_path / f"{attempt}.jsonl")
        runs.append(
            (
                (tmp_path / f"{attempt}.jsonl").read_text(),
                report.figures_document(outcome.summary, outcome.figures),
            )
        )
    assert runs[0] == runs[1]
    assert '"event": "corrupt"' in runs[0][0] and runs[0][1]["summary"]["restore_exact"]


def test_two_processes_give_one_event_log_and_one_set_of_figures(tmp_path: Path) -> None:
    # Separate Pythons (other hash seeds, other addresses, other real times)
    # share nothing but the scenario and its seed. The nonces of sealed
    # blobs and the times of the directories above the owners' trees once
    # made the packs' sizes, and all that followed, differ by the first
    # index pack of this scenario.
    outputs = []
    for attempt in ("a", "b"):
        out = tmp_path / attempt
        env = base_env(PYTHONHASHSEED=str(len(outputs) + 1))
        cheater = SIMULATIONS / "cheater.toml"
        cli_ok("sim", cheater, "--small", "--days", "0.25", "--json", "--out", out, env=env)
        outputs.append(((out / "events.jsonl").read_text(), (out / "figures.json").read_text()))
    assert outputs[0] == outputs[1]
    assert json.loads(outputs[0][1])["summary"]["packs"] > 40


def test_the_owners_forget_and_prune_as_their_forget_table_says(tmp_path: Path) -> None:
    # The trees change each midnight, for three and a half days: without a
    # policy every snapshot stays, with one each owner keeps its last 2 and
    # its friends hold fewer packs; the latest snapshot still restores exactly.
    scenario = sc.parse(TINY).resized(days=3.5)
    kept = world.run(scenario, tmp_path / "kept").summary
    pruned = world.run(
        attrs.evolve(scenario, forget=(("keep_last", 2), ("prune", True))), tmp_path / "pruned"
    ).summary
    assert kept["snapshots"] > 2 * scenario.workload.owners
    assert pruned["snapshots"] == 2 * scenario.workload.owners
    assert pruned["packs"] < kept["packs"]
    assert pruned["restore_exact"] is True and pruned["packs_lost"] == 0


def test_a_run_too_short_for_any_snapshot_restores_nothing(tmp_path: Path) -> None:
    # Null, not false: nothing was restored, nothing differed.
    outcome = world.run(sc.parse(TINY).resized(days=0.01), tmp_path / "work")
    assert outcome.summary["snapshots"] == 0 and outcome.summary["restore_exact"] is None


@pytest.mark.parametrize("checkpoints", range(6))
def test_a_machine_switched_off_as_its_node_starts_is_no_node_failure(
    checkpoints: int, tmp_path: Path
) -> None:
    # Off after a few checkpoints, the node may be between two of them, its
    # listener's start already returned and its DHT port still to bind on a
    # host that is down (found by the circle's full year, day 210).
    events = io.StringIO()
    simulation = world.World(sc.parse(MINIMAL), tmp_path, world.EventLog(events))

    async def start_and_stop() -> None:
        machine = simulation.add_machine(owner=False)
        async with trio.open_nursery() as nursery:
            simulation._nursery = nursery
            simulation.start(machine)
            for _ in range(checkpoints):
                await trio.lowlevel.checkpoint()
            await simulation.stop(machine)
            assert not machine.up and not simulation.net.is_alive(machine.name)

    with world.virtual_machine(1, tmp_path):
        trio.run(start_and_stop, clock=trio.testing.MockClock(autojump_threshold=0))
    assert (simulation.node_failures, events.getvalue()) == (0, "")


def test_a_bad_scenario_file_is_one_line_from_the_cli(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(MINIMAL.replace("count = 6", "count = 6\ncolour = 'blue'"))
    message = cli_error("sim", path)
    assert message.startswith(f"{path}: unknown key 'colour' in [nodes]")
    assert cli_error("sim", tmp_path / "missing.toml").startswith("cannot read the scenario")


def _work_directories_of(pid: int) -> set[str]:
    """The simulator's work directories a process has files open in."""
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        for part in Path(target).parents:
            if part.name.startswith("p2pbackup-sim-"):
                found.add(str(part))
    return found


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_run_stopped_by_a_signal_takes_its_homes_away(signum: int, tmp_path: Path) -> None:
    # The homes live on tmpfs: a run killed and left behind holds memory.
    run = subprocess.Popen(
        [*CLI, "sim", SIMULATIONS / "cheater.toml", "--small", "--json"],
        env=base_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=interruptible,
    )
    try:
        deadline = time.monotonic() + 60
        work: set[str] = set()
        while not work and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.2)
            work = _work_directories_of(run.pid)
        assert work, "the run opened nothing in a work directory"
        run.send_signal(signum)
        _out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 130
    assert err.decode().strip().splitlines()[-1] == "p2pbackup: interrupted"
    assert not any(Path(path).exists() for path in work)


def test_the_virtual_machine_lists_in_the_backup_and_puts_the_lister_back(
    tmp_path: Path,
) -> None:
    from p2pbackup.engine import lister

    command = lister.LISTER_COMMAND
    assert command is not None
    with world.virtual_machine(1, tmp_path):
        # A lister is another process, whose pace virtual time cannot wait for.
        assert lister.LISTER_COMMAND is None
    assert lister.LISTER_COMMAND is command
