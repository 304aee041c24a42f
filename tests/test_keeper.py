"""The keeper's decisions (pure), its loop's resilience, and the
``[maintenance]`` table of config.toml."""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from p2pbackup.app.service import error_message
from p2pbackup.engine.repository import Repository
from p2pbackup.errors import PeerUnavailableError, RepositoryLockedError, UsageError
from p2pbackup.maintenance import keeper
from p2pbackup.maintenance.audit import FailureReason, Verdict
from p2pbackup.maintenance.auditor import AuditReport, ShardResult
from p2pbackup.maintenance.keeper import (
    KeeperState,
    MaintenanceOptions,
    found_something,
    next_round,
    repair_due,
)
from p2pbackup.maintenance.repair import ShardState
from p2pbackup.maintenance.repairer import ShardKey, audit_verdicts
from p2pbackup.model import ShardAudit
from p2pbackup.node.schedule import parse_home_config

from .cli_helpers import cli_error, make_world

HOUR = 3600.0
DAY = 24 * HOUR
PACK = b"p" * 32


# -- when a repair pass is due -----------------------------------------------------------------


def test_a_repair_pass_runs_first_then_every_interval_or_after_findings() -> None:
    interval = 6 * HOUR
    assert repair_due(KeeperState(), 0.0, interval)
    done = KeeperState(last_repair=1000.0)
    assert not repair_due(done, 1000.0 + interval - 1, interval)
    assert repair_due(done, 1000.0 + interval, interval)
    assert repair_due(KeeperState(last_repair=1000.0, findings=True), 1001.0, interval)


def result(peer: str, verdict: Verdict) -> ShardResult:
    return ShardResult(PACK, 0, peer, verdict)


def test_only_failures_and_disqualifications_call_for_a_pass_at_once() -> None:
    healthy = AuditReport((result("a", Verdict.healthy()),))
    asleep = AuditReport((result("a", Verdict.unanswered("down")),), unreachable={"b": "down"})
    failed = AuditReport((result("a", Verdict.failed(FailureReason.MISSING, "gone")),))
    assert not found_something(None)
    assert not found_something(healthy)
    assert not found_something(asleep)  # sleeping is not lying
    assert found_something(failed)
    assert found_something(AuditReport((), disqualified=("a",)))


def test_the_next_round_comes_with_the_next_audit_or_pass_within_bounds() -> None:
    options = MaintenanceOptions(repair_interval=6 * HOUR)
    state = KeeperState(last_repair=0.0)
    assert next_round(2000.0, state, 0.0, options) == 2000.0
    assert next_round(5.0, state, 0.0, options) == keeper.MIN_SLEEP
    assert next_round(10 * DAY, state, 0.0, options) == keeper.MAX_SLEEP
    # The pass comes due before the next audit.
    assert next_round(10 * DAY, state, 6 * HOUR - 1800, options) == 1800.0
    # Audits off: only the passes (and the upper bound) wake it.
    off = attrs.evolve(options, audits=False)
    assert next_round(1.0, state, 6 * HOUR - 1800, off) == 1800.0


# -- what audits say for repair ----------------------------------------------------------------


def test_a_shard_whose_last_audit_failed_counts_as_failed() -> None:
    audits = {
        (PACK, 0): ShardAudit("a", due_at=10, audited_at=5, passed=False, reason="missing"),
        (PACK, 1): ShardAudit("b", due_at=10, audited_at=5, passed=True),
        (PACK, 2): ShardAudit("c", due_at=10),  # not audited yet
    }
    assert audit_verdicts(audits) == {ShardKey(PACK, 0, "a"): ShardState.FAILED}


# -- the config --------------------------------------------------------------------------------


def test_the_maintenance_table_sets_the_keepers_options() -> None:
    config = parse_home_config(
        'version = 1\n[maintenance]\naudit_period = "2d"\nrepair_interval = "3h"\n'
        'grace = "36h"\nrepair_rate = "512K"\n',
        "c",
    )
    options = config.maintenance
    assert options.enabled
    assert options.audit.period == 2 * DAY
    assert options.repair_interval == 3 * HOUR
    assert options.repair.grace == 36 * HOUR
    assert options.repair_rate == 512 * 1024
    off = parse_home_config(
        'version = 1\n[maintenance]\nenabled = false\nrepair_rate = "unlimited"\ngrace = 0\n', "c"
    )
    assert not off.maintenance.enabled
    assert off.maintenance.repair_rate is None and off.maintenance.repair.grace == 0
    assert parse_home_config("version = 1\n", "c").maintenance == MaintenanceOptions()


@pytest.mark.parametrize(
    ("setting", "problem"),
    [
        ('audit_period = "7"', r"\[maintenance\]: audit_period '7' is under 3600 s; write"),
        ('audit_period = "weekly"', r"audit_period 'weekly' is not a number with s, m, h or d"),
        ("audit_period = inf", r"audit_period inf is not a finite duration"),
        ('repair_interval = "10m"', r"repair_interval '10m' is under 3600 s"),
        ("repair_interval = true", r"repair_interval must be seconds or text such as \"6h\""),
        ('grace = "-1d"', r"grace '-1d' is not a number with s, m, h or d"),
        ('repair_rate = "fast"', r"repair_rate: 'fast' is not a size .*or \"unlimited\"\)"),
        ("repair_rate = 0", r"repair_rate: size 0 must be positive"),
        ('enabled = "yes"', r"\[maintenance\] enabled must be true or false, got 'yes'"),
        ("audits = false", r"unknown \[maintenance\] settings audits"),
    ],
)  # fmt: skip
def test_a_bad_maintenance_setting_names_the_key(setting: str, problem: str) -> None:
    with pytest.raises(UsageError, match=r"^c: .*" + problem):
        parse_home_config(f"version = 1\n[maintenance]\n{setting}\n", "c")
    with pytest.raises(UsageError, match=r"^c: \[maintenance\] must be a table"):
        parse_home_config("version = 1\nmaintenance = 3\n", "c")


def test_serve_refuses_a_bad_maintenance_setting_before_it_starts(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=1, n=3)
    config = world.home / "config.toml"
    config.write_text('version = 1\n[maintenance]\ngrace = "3 days"\n')
    message = cli_error("serve", "--listen", "127.0.0.1:0", home=world.home)
    assert message == f"{config}: [maintenance]: grace '3 days' is not a number with s, m, h or d"


# -- the loop ----------------------------------------------------------------------------------


class Failing:
    """Opens the repository by failing, as told, once per round."""

    def __init__(self, failures: list[BaseException]) -> None:
        self.failures = failures
        self.rounds = 0

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[Repository]:
        self.rounds += 1
        await trio.lowlevel.checkpoint()
        raise self.failures[min(self.rounds, len(self.failures)) - 1]
        yield  # pragma: no cover


async def test_a_round_that_fails_is_logged_and_the_loop_goes_on(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    opener = Failing(
        [
            RepositoryLockedError("/home/me is in use by another p2pbackup process"),
            PeerUnavailableError("cannot reach node1:1: refused"),
            ValueError("max() arg is an empty sequence"),
        ]
    )
    options = MaintenanceOptions(start_delay=10.0)
    caplog.set_level(logging.INFO, logger=keeper.__name__)
    with trio.move_on_after(10.0 + keeper.LOCKED_RETRY + 2 * keeper.MAX_SLEEP + 1):
        await keeper.keep(
            opener, options, clock=lambda: 0.0, rng=random.Random(1), explain=error_message
        )
    assert opener.rounds == 4  # the bug did not end it either
    lines = [(r.levelno, r.getMessage(), r.exc_info is not None) for r in caplog.records]
    assert lines[:3] == [
        (
            logging.WARNING,
            "maintenance round skipped: /home/me is in use by another p2pbackup process",
            False,
        ),
        (logging.ERROR, "maintenance round failed: cannot reach node1:1: refused", False),
        (logging.ERROR, "maintenance round failed by an unexpected error (a bug)", True),
    ]


async def test_cancellation_ends_the_loop(autojump_clock: trio.testing.MockClock) -> None:
    opener = Failing([trio.Cancelled._create()])  # type: ignore[attr-defined]
    with pytest.raises(trio.Cancelled):
        await keeper.keep(
            opener,
            MaintenanceOptions(start_delay=0.0),
            clock=lambda: 0.0,
            rng=random.Random(1),
            explain=error_message,
        )
    assert opener.rounds == 1
