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

from p2pbackup import node, operations, snapshots
from p2pbackup.backup import Backup
from p2pbackup.errors import RepositoryLockedError, UsageError
from p2pbackup.exclude import ExcludeRules
from p2pbackup.net import Address, MemoryNetwork
from p2pbackup.schedule import MIN_INTERVAL, parse_config, parse_interval

from .cli_helpers import CLI, base_env, make_world
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
        assert "excluded 2 files and directories by pattern" in summary.lines()
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
            node.serve,
            setup.home,
            node.ServeOptions(listen=Address("me", 1)),
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
        [*CLI, "--home", str(world.home), "serve", "--listen", "127.0.0.1:0"],
        stdout=subprocess.DEVNULL,
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
        _out, err = process.communicate(timeout=10)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    saved = [e for e in entries if "scheduled backup saved snapshot" in e["message"]]
    assert saved and saved[0]["level"] == "INFO" and saved[0]["logger"] == "p2pbackup.node"
    assert oct(log.stat().st_mode & 0o777) == "0o600"
    assert b"Traceback" not in err
    assert b"ERROR" not in err
