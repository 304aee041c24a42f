"""The node's roles: what goes wrong in one is logged and it goes on; a
failure that ends the node is its last log line (app/daemon.py)."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest
import trio
import trio.testing

from p2pbackup.app import daemon, operations
from p2pbackup.app.home import Home
from p2pbackup.errors import PeerUnavailableError, RepositoryLockedError
from p2pbackup.net.memory import MemoryNetwork
from p2pbackup.net.network import Address, Network
from p2pbackup.node import control
from p2pbackup.node.schedule import BackupSchedule
from p2pbackup.node.shardhost import ShardHost

from .engine_helpers import make_setup


async def quick(
    request: control.ControlRequest, write: control.LineSink, progress: control.LineSink | None
) -> control.Outcome:
    return control.Outcome(0)


@pytest.mark.parametrize(
    ("failure", "last_line"),
    [
        (ValueError("max() arg is an empty sequence"), "serve stopped by an unexpected error"),
        (PeerUnavailableError("cannot reach 192.0.2.1:1: refused"), "serve stopped: cannot reach"),
    ],
)
async def test_a_role_that_fails_ends_the_node_with_a_last_log_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    failure: Exception,
    last_line: str,
) -> None:
    setup = await make_setup(tmp_path, k=1, n=2)
    go = trio.Event()

    async def failing_role(host: object, friends: object) -> None:
        await go.wait()
        raise failure

    monkeypatch.setattr(daemon, "_collect_expired", failing_role)
    options = daemon.ServeOptions(listen=Address("me", 1))
    serve = functools.partial(
        daemon.serve, setup.home, options, network=MemoryNetwork().interface("me"), control=quick
    )
    with pytest.raises(BaseExceptionGroup) as raised:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve)
            assert setup.home.control_path.exists()
            go.set()
    assert raised.group_contains(type(failure))
    last = caplog.records[-1]
    assert last.levelno == logging.CRITICAL and last.getMessage().startswith(last_line)
    assert (last.exc_info is not None) == isinstance(failure, ValueError)  # a bug's traceback
    # Left behind: the CLI then says that serve stopped, instead of quietly
    # running the commands itself.
    assert setup.home.control_path.exists()


async def test_a_node_stopped_by_cancellation_removes_its_control_socket(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    setup = await make_setup(tmp_path, k=1, n=2)
    options = daemon.ServeOptions(listen=Address("me", 1))
    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(
                daemon.serve,
                setup.home,
                options,
                network=MemoryNetwork().interface("me"),
                control=quick,
            )
        )
        assert setup.home.control_path.exists()
        nursery.cancel_scope.cancel()
    assert not setup.home.control_path.exists()
    assert "serve stopped" not in caplog.text


async def test_scheduled_backups_go_on_whatever_one_run_meets(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    autojump_clock: trio.testing.MockClock,
) -> None:
    failures: list[BaseException] = [
        RepositoryLockedError("HOME is in use by another p2pbackup process (pid 7)"),
        PermissionError(13, "Permission denied", "/home/me/secret"),
        ExceptionGroup("peers", [PeerUnavailableError("cannot reach 192.0.2.1:1: refused")]),
        ExceptionGroup(
            "peers",
            [PeerUnavailableError("node a is down"), PeerUnavailableError("node b is down")],
        ),
        ValueError("max() arg is an empty sequence"),
    ]
    runs = 0

    @contextlib.asynccontextmanager
    async def failing_repository(home: Home, *, network: Network) -> AsyncIterator[None]:
        nonlocal runs
        runs += 1
        if runs <= len(failures):
            raise failures[runs - 1]
        yield

    monkeypatch.setattr(operations, "open_repository", failing_repository)
    schedule = BackupSchedule(paths=("/home/me",), interval=3600)
    # Runs that fail are tried again after 10, 20, 40 minutes, then hourly.
    with trio.move_on_after(600 + 1200 + 2400 + 3600 + 1):
        await daemon.run_scheduled_backups(
            Home(tmp_path), schedule, MemoryNetwork().interface("me")
        )
    assert runs == len(failures)
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert said[:4] == [
        (
            "WARNING",
            "scheduled backup skipped: HOME is in use by another p2pbackup process (pid 7)",
        ),
        ("ERROR", "scheduled backup failed: Permission denied: /home/me/secret"),
        ("ERROR", "scheduled backup failed: cannot reach 192.0.2.1:1: refused"),
        ("ERROR", "scheduled backup failed: node a is down; node b is down"),
    ]
    assert said[4] == ("ERROR", "scheduled backup failed by an unexpected error (a bug)")
    assert caplog.records[4].exc_info is not None


async def test_expired_shards_are_collected_again_after_a_failure(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Host:
        rounds = 0

        def collect_expired(self, spare: frozenset[bytes]) -> int:
            self.rounds += 1
            if self.rounds == 1:
                raise OSError(5, "Input/output error")
            return 3

    caplog.set_level(logging.INFO)
    host = Host()
    monkeypatch.setattr(daemon, "EXPIRY_INTERVAL", 0.01)
    with trio.move_on_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(daemon._collect_expired, cast(ShardHost, host), frozenset)
            while host.rounds < 3:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert "deleting shards whose lease expired failed; trying again in an hour" in caplog.text
    assert "removed 3 shards whose lease expired" in caplog.text


async def test_the_clock_serve_is_given_is_the_shard_hosts_and_the_dhts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A simulation passes a virtual clock: leases and DHT records must age
    # by it, not by the machine's.
    setup = await make_setup(tmp_path, k=1, n=2)
    options = daemon.ServeOptions(listen=Address("me", 1))
    opened = ShardHost.open
    clocks = []

    def open_host(root: Path, **kwargs: object) -> ShardHost:
        clocks.append(kwargs.get("clock"))
        return opened(root, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ShardHost, "open", open_host)

    def clock() -> float:
        return 2_500_000_000.0

    async with trio.open_nursery() as nursery:
        serving = await nursery.start(
            functools.partial(
                daemon.serve,
                setup.home,
                options,
                network=MemoryNetwork().interface("me"),
                clock=clock,
            )
        )
        assert serving.discovery is not None
        assert serving.discovery.node.wall_clock is clock
        nursery.cancel_scope.cancel()
    assert clocks == [clock]


def test_a_failed_scheduled_backup_is_tried_again_sooner_than_the_interval() -> None:
    day = 86400.0
    assert daemon.schedule_retry(0, day) == day
    assert [daemon.schedule_retry(n, day) for n in (1, 2, 3)] == [600.0, 1200.0, 2400.0]
    assert daemon.schedule_retry(9, day) == day  # never longer than the interval
    assert daemon.schedule_retry(1, 300.0) == 300.0


async def test_scheduled_backups_retry_a_failure_within_minutes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    # A laptop that wakes before its friends' machines: the first run finds
    # no peer; the next must not wait a whole day.
    started: list[float] = []

    @contextlib.asynccontextmanager
    async def no_peers(home: Home, *, network: Network) -> AsyncIterator[None]:
        started.append(trio.current_time())
        raise PeerUnavailableError("storing needs at least 3 peers; 0 usable")
        yield

    monkeypatch.setattr(operations, "open_repository", no_peers)
    schedule = BackupSchedule(paths=("/home/me",), interval=86400)
    with trio.move_on_after(3600):
        await daemon.run_scheduled_backups(
            Home(tmp_path), schedule, MemoryNetwork().interface("me")
        )
    assert started == [0.0, 600.0, 1800.0]
