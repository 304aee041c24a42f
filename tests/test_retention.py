"""Retention policies (pure), the [forget] table, and serve applying it."""

from __future__ import annotations

import datetime
import functools
import json
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pbackup.app import daemon, operations
from p2pbackup.engine.backup import Backup
from p2pbackup.engine.retention import (
    KeepDuration,
    RetentionPolicy,
    apply_policy,
    parse_group_by,
)
from p2pbackup.errors import UsageError
from p2pbackup.model import Snapshot
from p2pbackup.net.memory import MemoryNetwork
from p2pbackup.node.schedule import BackupSchedule, parse_home_config

from .cli_helpers import make_world
from .engine_helpers import make_setup

UTC = datetime.UTC
HOUR = 3600 * 10**9
#: 2024-01-01 00:00 UTC.
EPOCH_2024 = 1_704_067_200 * 10**9


def _snap(
    time_ns: int, *, paths: tuple[bytes, ...] = (b"/a",), tags: tuple[str, ...] = ()
) -> Snapshot:
    return Snapshot(time_ns=time_ns, hostname="h", paths=paths, tags=tags, tree=b"t" * 32)


def _rows(times: list[int], tags: tuple[str, ...] = ()) -> list[tuple[bytes, Snapshot]]:
    return [(i.to_bytes(32, "big"), _snap(t, tags=tags)) for i, t in enumerate(times)]


times_st = st.lists(
    st.integers(min_value=0, max_value=3 * 365 * 24).map(lambda h: EPOCH_2024 + h * HOUR),
    min_size=1,
    max_size=40,
    unique=True,
)
counts = st.integers(min_value=0, max_value=6)


@st.composite
def policies(draw: st.DrawFn) -> RetentionPolicy:
    policy = RetentionPolicy(
        keep_last=draw(counts),
        keep_hourly=draw(counts),
        keep_daily=draw(counts),
        keep_weekly=draw(counts),
        keep_monthly=draw(counts),
        keep_yearly=draw(counts),
        keep_within=draw(st.sampled_from([KeepDuration(), KeepDuration.parse("3d")])),
    )
    if policy.empty:
        policy = RetentionPolicy(keep_last=1)
    return policy


def _single(policy: RetentionPolicy, name: str) -> RetentionPolicy:
    """``policy`` with only its rule ``name``."""
    return RetentionPolicy(**{f"keep_{name}": getattr(policy, f"keep_{name}")})


@settings(max_examples=150, deadline=None)
@given(times=times_st, policy=policies())
def test_the_kept_set_holds_each_rules_picks_and_nothing_is_lost(
    times: list[int], policy: RetentionPolicy
) -> None:
    rows = _rows(times)
    decision = apply_policy(policy, rows, tz=UTC)
    kept, removed = set(decision.kept), set(decision.removed)
    assert kept | removed == {sid for sid, _ in rows} and not kept & removed
    for name in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
        if getattr(policy, f"keep_{name}"):
            alone = apply_policy(_single(policy, name), rows, tz=UTC)
            assert set(alone.kept) <= kept, name
    # The newest snapshot is always kept: every rule picks it first.
    newest = max(rows, key=lambda r: r[1].time_ns)[0]
    assert newest in kept
    for group in decision.groups:
        assert all(k.reasons for k in group.keep)


@settings(max_examples=100, deadline=None)
@given(times=times_st, n=st.integers(min_value=1, max_value=50))
def test_keep_last_n_keeps_exactly_the_n_newest(times: list[int], n: int) -> None:
    rows = _rows(times)
    decision = apply_policy(RetentionPolicy(keep_last=n), rows, tz=UTC)
    newest = sorted(rows, key=lambda r: r[1].time_ns, reverse=True)[:n]
    assert set(decision.kept) == {sid for sid, _ in newest}


@settings(max_examples=100, deadline=None)
@given(times=times_st, n=st.integers(min_value=1, max_value=10))
def test_keep_daily_keeps_the_newest_of_each_of_the_n_newest_days(times: list[int], n: int) -> None:
    rows = _rows(times)
    decision = apply_policy(RetentionPolicy(keep_daily=n), rows, tz=UTC)
    by_day: dict[datetime.date, tuple[int, bytes]] = {}
    for sid, snap in rows:
        day = datetime.datetime.fromtimestamp(snap.time_ns / 1e9, UTC).date()
        by_day[day] = max(by_day.get(day, (-1, b"")), (snap.time_ns, sid))
    expected = {sid for _day, (_t, sid) in sorted(by_day.items(), reverse=True)[:n]}
    assert set(decision.kept) == expected


def test_a_policy_that_keeps_nothing_is_refused() -> None:
    with pytest.raises(UsageError, match="keeps nothing"):
        apply_policy(RetentionPolicy(), _rows([EPOCH_2024]), tz=UTC)
    with pytest.raises(UsageError, match="negative"):
        RetentionPolicy(keep_daily=-1)


def test_keep_within_counts_back_from_the_newest_in_the_calendar() -> None:
    assert KeepDuration.parse("1y6m") == KeepDuration(1, 6, 0, 0, "1y6m")
    march_31 = datetime.datetime(2024, 3, 31, 12, tzinfo=UTC)
    assert KeepDuration.parse("1m").before(march_31) == datetime.datetime(
        2024, 2, 29, 12, tzinfo=UTC
    )
    assert KeepDuration.parse("2d12h").before(march_31) == datetime.datetime(
        2024, 3, 29, tzinfo=UTC
    )
    for bad in ("", "7", "7w", "d7", "1.5d"):
        with pytest.raises(UsageError, match="not a duration"):
            KeepDuration.parse(bad)
    # Five days of one snapshot a day, the newest long ago: --keep-within 2d
    # keeps the newest three (counted from the newest, not from now).
    rows = _rows([EPOCH_2024 + d * 24 * HOUR for d in range(5)])
    decision = apply_policy(RetentionPolicy(keep_within=KeepDuration.parse("2d")), rows, tz=UTC)
    assert set(decision.kept) == {rows[2][0], rows[3][0], rows[4][0]}


def test_keep_tag_keeps_every_snapshot_with_all_its_tags() -> None:
    rows = [
        (b"1" * 32, _snap(EPOCH_2024, tags=("a", "b"))),
        (b"2" * 32, _snap(EPOCH_2024 + HOUR, tags=("a",))),
        (b"3" * 32, _snap(EPOCH_2024 + 2 * HOUR, tags=("a", "b"))),
    ]
    policy = RetentionPolicy.from_options(keep_tag=["a,b"])
    decision = apply_policy(policy, rows, tz=UTC, group_by=())
    assert set(decision.kept) == {b"1" * 32, b"3" * 32}


def test_groups_are_kept_apart_by_paths_and_tags() -> None:
    rows = [
        (b"1" * 32, _snap(EPOCH_2024, paths=(b"/a",))),
        (b"2" * 32, _snap(EPOCH_2024 + HOUR, paths=(b"/a",))),
        (b"3" * 32, _snap(EPOCH_2024 + 2 * HOUR, paths=(b"/b",))),
        (b"4" * 32, _snap(EPOCH_2024 + 3 * HOUR, paths=(b"/a",), tags=("x",))),
    ]
    decision = apply_policy(RetentionPolicy(keep_last=1), rows, tz=UTC)
    assert len(decision.groups) == 3
    assert decision.removed == [b"1" * 32]
    one_group = apply_policy(RetentionPolicy(keep_last=1), rows, tz=UTC, group_by=())
    assert one_group.kept == [b"4" * 32]
    assert parse_group_by("tags,host") == ("host", "tags")
    with pytest.raises(UsageError, match="not one of"):
        parse_group_by("paths,colour")


# -- config.toml ---------------------------------------------------------------------


def test_the_forget_table_states_a_policy() -> None:
    config = parse_home_config(
        'version = 1\n[forget]\nkeep_daily = 7\nkeep_within = "2d"\nkeep_tag = ["keep"]\n'
        'group_by = "paths"\nprune = true\n',
        "config.toml",
    )
    assert config.forget is not None
    assert config.forget.policy == RetentionPolicy.from_options(
        keep_daily=7, keep_within="2d", keep_tag=["keep"]
    )
    assert config.forget.group_by == ("paths",) and config.forget.prune


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ("keep_daily = -1", "keep_daily must be a whole number"),
        ('keep_daily = "7"', "keep_daily must be a whole number"),
        ("prune = true", "keeps nothing"),
        ('keep_within = "7x"', "is not a duration"),
        ("keep_dayly = 7", "unknown [forget] settings keep_dayly"),
        ('keep_last = 1\ngroup_by = "colour"', "not one of"),
    ],
)
def test_a_bad_forget_table_names_what_is_wrong(table: str, problem: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_home_config(f"version = 1\n[forget]\n{table}\n", "config.toml")
    assert problem in str(caught.value)
    assert str(caught.value).startswith("config.toml: ") and "[forget]" in str(caught.value)


async def test_serve_forgets_by_the_config_after_a_scheduled_run(tmp_path: Path) -> None:
    setup = await make_setup(tmp_path, k=1, n=3, peers=3)
    source = tmp_path / "src"
    source.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "f").write_text("other")
    async with operations.open_repository(setup.home) as repo:
        for i in range(3):
            (source / "file").write_text(f"version {i}")
            await Backup(repo).run([source], ["nightly"])
        await Backup(repo).run([other], ["nightly"])  # another group: left alone
        await Backup(repo).run([source])  # no tag: another group too
    setup.home.config_path.write_text(
        f'version = 1\n[backup]\npaths = ["{source}"]\ninterval = "1h"\ntags = ["nightly"]\n'
        "[forget]\nkeep_last = 2\nprune = true\n"
    )
    (source / "file").write_text("version 3")
    schedule = BackupSchedule(paths=(str(source),), interval=3600.0, tags=("nightly",))
    network = MemoryNetwork().interface("me")
    with trio.move_on_after(30) as waited:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(
                    daemon.run_scheduled_backups,
                    setup.home,
                    schedule,
                    network,
                    after_each=nursery.cancel_scope.cancel,
                )
            )
    assert not waited.cancelled_caught
    async with operations.open_repository(setup.home, access="read") as repo:
        rows = repo.index.snapshots()
    nightly = [s for _, s in rows if s.tags == ("nightly",) and s.paths == (bytes(source),)]
    assert len(nightly) == 2  # of 4: two forgotten
    assert len(rows) == 4  # the other groups untouched


async def test_a_restarted_serve_waits_for_the_rest_of_the_interval(tmp_path: Path) -> None:
    setup = await make_setup(tmp_path, k=1, n=3, peers=3)
    assert daemon._rest_of_interval(setup.home, 3600.0) == 0.0  # never ran: now
    source = tmp_path / "src"
    source.mkdir()
    (source / "f").write_text("x")
    schedule = BackupSchedule(paths=(str(source),), interval=3600.0)
    network = MemoryNetwork().interface("me")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            functools.partial(
                daemon.run_scheduled_backups,
                setup.home,
                schedule,
                network,
                after_each=nursery.cancel_scope.cancel,
            )
        )
    assert 3500 < daemon._rest_of_interval(setup.home, 3600.0) <= 3600
    # A second start does not back up at once.
    ran = []
    with trio.move_on_after(1.0):
        await daemon.run_scheduled_backups(
            setup.home, schedule, network, after_each=lambda: ran.append(1)
        )
    assert ran == []
    async with operations.open_repository(setup.home, access="read") as repo:
        assert len(repo.index.snapshots()) == 1


# -- the command line ----------------------------------------------------------------


def test_forget_by_policy_through_the_cli(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=1, n=2)
    source = tmp_path / "src"
    source.mkdir()
    ids = []
    for i in range(4):
        (source / "f").write_text(f"v{i}")
        ids.append(world.backup(source, tags=["keep"] if i == 0 else ()))
    assert "keeps nothing" in world.error("forget", "--keep-within", "0d")
    assert "not both" in world.error("forget", ids[0], "--keep-last", "1")
    assert "needs the snapshots" in world.error("forget")

    dry = world.ok("forget", "--keep-last", "1", "--dry-run", "--prune")
    assert "remove 2 snapshots:" in dry.stdout
    assert "would forget 2 snapshots" in dry.stdout
    assert "--dry-run: nothing was changed" in dry.stdout
    assert "would delete" in dry.stdout
    assert len(json.loads(world.ok("snapshots", "--json").stdout)) == 4

    result = json.loads(world.ok("forget", "--keep-last", "1", "--prune", "--json").stdout)
    assert set(result["forgotten"]) == {ids[1], ids[2]}
    # The tagged snapshot is a group of its own: its one snapshot is its last.
    kept = {k["id"] for g in result["groups"] for k in g["keep"]}
    assert kept == {ids[0], ids[3]}
    assert result["prune"]["packs_deleted"] + result["prune"]["index_packs_replaced"] >= 1
    left = {s["id"] for s in json.loads(world.ok("snapshots", "--json").stdout)}
    assert left == {ids[0], ids[3]}
    # One group: the tagged one goes too, unless --keep-tag keeps it.
    out = world.ok("forget", "--keep-last", "1", "--keep-tag", "keep", "--group-by", "").stdout
    assert "no snapshot to forget" in out and "tag keep" in out


def test_prune_with_nothing_to_do_says_so_and_frees_nothing(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=1, n=2)
    source = tmp_path / "src"
    source.mkdir()
    (source / "f").write_text("one")
    world.backup(source)
    (source / "f").write_text("two")
    world.backup(source)
    first = json.loads(world.ok("prune", "--json").stdout)
    assert first["index_packs_replaced"] == 2  # two backups, two index segments: made one
    for _ in range(2):
        again = world.ok("prune")
        assert again.lines == [
            "nothing to prune: every pack holds live data and no shard is orphaned"
        ]
        assert json.loads(world.ok("prune", "--json").stdout)["bytes_freed"] == 0
    dry = json.loads(world.ok("prune", "--dry-run", "--json").stdout)
    assert dry["dry_run"] and dry["shards_deleted"] == 0
