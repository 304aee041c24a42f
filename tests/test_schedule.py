"""Exclusions, the scheduled-backup config, and serve running the schedule."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import trio

from p2pbackup.app import daemon, operations
from p2pbackup.app.home import Home
from p2pbackup.core.exclude import ExcludeRules
from p2pbackup.engine import snapshots
from p2pbackup.engine.backup import Backup
from p2pbackup.errors import RepositoryLockedError, UsageError
from p2pbackup.net.memory import MemoryNetwork
from p2pbackup.net.network import Address
from p2pbackup.node.schedule import (
    MIN_INTERVAL,
    HomeConfig,
    StorageOffer,
    load_config,
    load_schedule,
    parse_config,
    parse_duration,
    parse_home_config,
    parse_interval,
    parse_size,
)

from .cli_helpers import CLI, base_env, cli_error, make_world
from .engine_helpers import make_setup


def test_name_patterns_match_anywhere_and_path_patterns_whole_paths() -> None:
    rules = ExcludeRules.from_patterns(["*.tmp", ".cache", "/home/me/Downloads", "/srv/*/log"])
    assert rules.excludes(b"/home/me/a.tmp")
    assert rules.excludes(b"/deep/down/.cache")
    assert not rules.excludes(b"/home/me/.cache-not")
    assert rules.excludes(b"/home/me/Downloads")
    assert not rules.excludes(b"/home/you/Downloads")
    assert rules.excludes(b"/srv/web/log")
    assert not rules.excludes(b"/home/me/notes.txt")
    # Names that are not UTF-8 are matched by their bytes.
    assert ExcludeRules.from_patterns(["caf\udce9*"]).excludes(b"/x/caf\xe9-menu")
    assert not ExcludeRules().excludes(b"/anything")
    with pytest.raises(UsageError, match="may not be empty"):
        ExcludeRules.from_patterns([" "])


async def test_an_excluded_directory_is_left_out_whole(tmp_path: Path) -> None:
    setup = await make_setup(tmp_path, k=1, n=3, peers=3)
    source = tmp_path / "src"
    (source / "keep").mkdir(parents=True)
    (source / "keep" / "a.txt").write_text("a")
    (source / "keep" / "b.tmp").write_text("b")
    (source / "node_modules" / "deep").mkdir(parents=True)
    (source / "node_modules" / "deep" / "big").write_bytes(os.urandom(100_000))
    async with operations.open_repository(setup.home) as repo:
        rules = ExcludeRules.from_patterns(["*.tmp", "node_modules"])
        summary = await Backup(repo, exclude=rules).run([source])
        assert summary.excluded == 2
        assert "excluded 2 files and directories" in summary.lines()
        assert summary.bytes_read == 1  # only a.txt was read
        _, snap = snapshots.resolve(repo.index, "latest")
        names = {os.path.basename(path) async for path, _node in snapshots.walk(repo, snap)}
    assert b"a.txt" in names and b"b.tmp" not in names and b"node_modules" not in names


GOOD = """
version = 1

[backup]
paths = ["/home/me", "/etc"]
interval = "6h"
exclude = ["*.tmp"]
tags = ["scheduled"]
"""


def test_a_config_parses_to_a_schedule() -> None:
    schedule = parse_config(GOOD, "config.toml")
    assert schedule is not None
    assert schedule.paths == ("/home/me", "/etc")
    assert schedule.interval == 6 * 3600
    assert schedule.exclude.excludes(b"/home/me/x.tmp")
    assert schedule.tags == ("scheduled",)
    assert parse_config("version = 1\n", "c") is None  # nothing scheduled
    assert parse_interval(90, "c") == 90
    assert parse_interval("1.5d", "c") == 1.5 * 86400
    assert parse_interval(" 90 m ", "c") == 5400


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("version = ", "not valid TOML"),
        ("[backup]\npaths=['/a']\ninterval='1h'", "version = None"),
        ("version = 2", "reads version = 1"),
        ("version = 1\ncolour = 'blue'", "unknown settings colour"),
        ("version = 1\n[backup]\npaths=['/a']", "needs an interval"),
        ("version = 1\n[backup]\npaths=['/a']\ninterval='6'", "under 60 s"),
        ("version = 1\n[backup]\npaths=['/a']\ninterval='6 hours'", "not a number with"),
        ("version = 1\n[backup]\npaths=['/a']\ninterval=true", "must be seconds"),
        ("version = 1\n[backup]\npaths=[]\ninterval='1h'", "at least one path"),
        ("version = 1\n[backup]\npaths=['rel']\ninterval='1h'", "must be absolute"),
        ("version = 1\n[backup]\npaths='/a'\ninterval='1h'", "list of non-empty strings"),
        ("version = 1\n[backup]\npaths=['/a']\ninterval='1h'\nevery='x'", "unknown [backup]"),
        ("version = 1\n[backup]\npaths=['/a']\ninterval='1h'\nexclude=['']", "list of non-empty"),
    ],
)
def test_a_bad_config_names_what_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(UsageError, match=rf"^c.*{problem}".replace("[", r"\[")):
        parse_config(text, "c")
    assert MIN_INTERVAL == 60


def test_the_storage_table_states_what_the_home_offers() -> None:
    config = parse_home_config(
        GOOD + '\n[storage]\ncapacity = "200G"\nper_friend = 1000\n', "config.toml"
    )
    assert config.storage == StorageOffer(capacity=200 << 30, per_friend=1000)
    assert config.backup == parse_config(GOOD, "config.toml")  # the tables are apart
    only = parse_home_config('version = 1\n[storage]\nper_friend = "1.5M"\n', "c")
    assert only == HomeConfig(backup=None, storage=StorageOffer(per_friend=3 << 19))
    assert parse_home_config("version = 1\n", "c") == HomeConfig()
    assert parse_config('version = 1\n[storage]\ncapacity = "1T"\n', "c") is None


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ('capacity = "lots"', r"\[storage\] capacity: 'lots' is not a size \(examples"),
        ('per_friend = "0G"', r"\[storage\] per_friend: size '0G' must be positive"),
        ("per_friend = -5", r"\[storage\] per_friend: size -5 must be positive"),
        ("capacity = true", r"\[storage\] capacity must be a size such as \"200G\""),
        ("capacity = 1.5", r"\[storage\] capacity must be a size"),
        ('quota = "1G"', r"unknown \[storage\] settings quota"),
    ],
)
def test_a_bad_storage_size_names_the_key(table: str, problem: str) -> None:
    with pytest.raises(UsageError, match=rf"^c: {problem}"):
        parse_home_config(f"version = 1\n[storage]\n{table}\n", "c")
    with pytest.raises(UsageError, match=r"^c: \[storage\] must be a table"):
        parse_home_config("version = 1\nstorage = 3\n", "c")


@pytest.mark.parametrize(
    ("text", "size"),
    [("1000", 1000), ("500M", 500 << 20), ("20g", 20 << 30), ("1T", 1 << 40),
     ("1.5G", 3 << 29), ("500MiB", 500 << 20), ("500MB", 500 << 20), (" 2K ", 2048)],
)  # fmt: skip
def test_sizes_read_as_the_command_line_reads_them(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "-1G", "0", "nan", "inf", "12 parsecs"])
def test_a_bad_size_is_refused(text: str) -> None:
    with pytest.raises(UsageError, match="size"):
        parse_size(text)


def test_a_missing_config_is_empty(tmp_path: Path) -> None:
    assert load_config(tmp_path / "config.toml") == HomeConfig()
    assert load_schedule(tmp_path / "config.toml") is None
    (tmp_path / "config.toml").write_text(GOOD + '[storage]\ncapacity = "1G"\n')
    assert load_config(tmp_path / "config.toml").storage.capacity == 1 << 30
    assert load_schedule(tmp_path / "config.toml") == parse_config(GOOD, "x")


def test_serve_refuses_a_bad_storage_size_naming_the_key(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=1, n=3)
    config = world.home / "config.toml"
    config.write_text('version = 1\n[storage]\nper_friend = "50 gigs"\n')
    message = cli_error("serve", "--listen", "127.0.0.1:0", home=world.home)
    assert message == (
        f"{config}: [storage] per_friend: '50 gigs' is not a size (examples: 500M, 20G, 1T)"
    )


async def test_serve_backs_up_on_schedule(tmp_path: Path, nursery: trio.Nursery) -> None:
    setup = await make_setup(tmp_path, k=1, n=3, peers=3)
    source = tmp_path / "src"
    source.mkdir()
    (source / "file").write_text("scheduled")
    (source / "skip.tmp").write_text("no")
    setup.home.config_path.write_text(
        f'version = 1\n[backup]\npaths = ["{source}"]\ninterval = "1h"\n'
        'exclude = ["*.tmp"]\ntags = ["nightly"]\n'
    )
    world = MemoryNetwork()
    await nursery.start(
        functools.partial(
            daemon.serve,
            setup.home,
            daemon.ServeOptions(listen=Address("me", 1)),
            network=world.interface("me"),
        )
    )
    with trio.fail_after(30):
        while True:
            try:
                async with operations.open_repository(setup.home) as repo:
                    rows = repo.index.snapshots()
                    if rows:
                        break
            except RepositoryLockedError:
                pass  # the scheduled backup holds the home right now
            await trio.sleep(0.05)
    [(_, snap)] = rows
    assert snap.tags == ("nightly",)
    assert snap.file_count == 1  # skip.tmp excluded


@pytest.mark.slow
def test_serve_logs_json_lines_to_the_home(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=1, n=3)
    source = tmp_path / "src"
    source.mkdir()
    (source / "f").write_text("x")
    (world.home / "config.toml").write_text(
        f'version = 1\n[backup]\npaths = ["{source}"]\ninterval = "1d"\n'
    )
    process = subprocess.Popen(
        [
            *CLI,
            "--home",
            str(world.home),
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-level",
            "info",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=base_env(),
    )
    try:
        log = world.home / "serve.log"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if log.exists() and "scheduled backup saved snapshot" in log.read_text():
                break
            time.sleep(0.2)
    finally:
        process.terminate()
        out, err = process.communicate(timeout=10)
    # serve says what it loaded, as it starts.
    assert f"scheduled backup of {source} every 1d (from config.toml)\n".encode() in out
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    saved = [e for e in entries if "scheduled backup saved snapshot" in e["message"]]
    assert saved and saved[0]["level"] == "INFO" and saved[0]["logger"] == "p2pbackup.app.daemon"
    assert oct(log.stat().st_mode & 0o777) == "0o600"
    assert b"Traceback" not in err
    assert b"ERROR" not in err
    # --log-level info: stderr gets what the file gets, in its own format.
    assert b"p2pbackup serve: INFO: scheduled backup saved snapshot" in err


def test_every_rotated_log_file_stays_private(tmp_path: Path) -> None:
    import logging

    from p2pbackup.cli import main as cli

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    old_umask = os.umask(0o022)
    try:
        log = tmp_path / "serve.log"
        cli._log_to_file(log, logging.DEBUG, max_bytes=2000)
        for i in range(100):
            logging.getLogger("p2pbackup.test").debug("line %d of the log, padded %s", i, "x" * 40)
    finally:
        os.umask(old_umask)
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    files = sorted(tmp_path.glob("serve.log*"))
    assert [f.name for f in files] == ["serve.log", "serve.log.1", "serve.log.2", "serve.log.3"]
    assert all(oct(f.stat().st_mode & 0o777) == "0o600" for f in files), files
    last = json.loads(log.read_text().splitlines()[-1])
    assert last["level"] == "DEBUG" and last["message"].startswith("line 99 of the log")


def test_durations_take_a_unit_or_mean_seconds_and_may_be_zero() -> None:
    assert parse_duration("0") == 0
    assert parse_duration("90") == 90
    assert parse_duration(" 36h ") == 36 * 3600
    assert parse_duration("3d") == 3 * 86400
    assert parse_duration("1.5m") == 90
    for bad in ("", "soon", "-1d", "3 days", "3w"):
        with pytest.raises(UsageError, match="is not a duration"):
            parse_duration(bad)


def test_a_home_held_by_its_own_serve_says_so_and_not_another_process(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    home.path.mkdir()
    # Another process (here: this one, without a serve) holds the home.
    with home.locked(), pytest.raises(RepositoryLockedError) as raised, home.locked():
        pass
    assert "is in use by another p2pbackup process" in str(raised.value)
    # The home's own serve holds it (a scheduled backup running in it).
    with home.serving(), home.locked():
        for attempt in (home.locked, home.removing):
            with pytest.raises(RepositoryLockedError) as raised, attempt():
                pass
            message = str(raised.value)
            assert message.startswith(f"this home's `serve` (pid {os.getpid()}) is writing to")
            assert "wait for it to finish" in message and "another" not in message
            assert "kill" not in message
