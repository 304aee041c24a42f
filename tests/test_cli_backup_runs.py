"""backup --dry-run, --skip-if-unchanged / --force-snapshot, and the
scheduled runs of ``serve`` that find nothing changed."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

from .cli_helpers import CLI, all_shards, base_env, make_source, make_world


def test_backup_dry_run_says_what_would_be_stored_and_stores_nothing(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=1, n=2)
    source = make_source(tmp_path / "src", big=200_000)

    planned = json.loads(world.ok("backup", source, "--dry-run", "--json").stdout)
    assert planned["dry_run"] is True
    assert planned["files_new"] >= 10 and planned["files_changed"] == 0
    assert planned["bytes_new"] >= 200_000 and planned["packs_written"] >= 1
    assert planned["bytes_stored"] > planned["bytes_new"] // 2  # k=1, n=2: doubled, compressed
    assert all_shards(world.peers) == set()
    assert world.ok("snapshots").lines == ["no snapshots yet"]
    lines = world.ok("backup", source, "--dry-run").lines
    assert any(line.startswith("would store about ") for line in lines)
    assert lines[-1] == "--dry-run: nothing was stored"

    world.backup(source)
    shards = all_shards(world.peers)
    again = json.loads(world.ok("backup", source, "--dry-run", "--json").stdout)
    assert again["files_new"] == 0 and again["files_changed"] == 0
    assert again["files_unchanged"] == planned["files_new"] and again["bytes_new"] == 0
    (source / "docs" / "note1.txt").write_text("changed")
    (source / "added.txt").write_text("new file")
    changed = json.loads(world.ok("backup", source, "--dry-run", "--json").stdout)
    assert (changed["files_new"], changed["files_changed"]) == (1, 1)
    assert 0 < changed["bytes_new"] < 1000
    assert all_shards(world.peers) == shards
    assert len(json.loads(world.ok("snapshots", "--json").stdout)) == 1
    # The dry run left the file cache alone: the real backup reads the file anew.
    real = json.loads(world.ok("backup", source, "--json").stdout)
    assert (real["files_new"], real["files_changed"]) == (1, 1)

    # forget and prune have their dry runs too.
    assert world.ok("forget", "latest", "--dry-run").lines[-1] == "--dry-run: nothing was changed"
    assert len(json.loads(world.ok("snapshots", "--json").stdout)) == 2
    assert json.loads(world.ok("prune", "--dry-run", "--json").stdout)["dry_run"] is True
    assert all_shards(world.peers) >= shards


def test_skip_if_unchanged_makes_no_snapshot_when_nothing_changed(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=1, n=2)
    source = make_source(tmp_path / "src", big=50_000)
    first = world.backup(source)

    skipped = world.ok("backup", source, "--skip-if-unchanged")
    assert skipped.lines[-1] == f"nothing changed since snapshot {first[:12]}; no new snapshot"
    summary = json.loads(world.ok("backup", source, "--skip-if-unchanged", "--json").stdout)
    assert summary["unchanged_since"] == first and summary["snapshot_id"] == ""
    assert [s["id"] for s in json.loads(world.ok("snapshots", "--json").stdout)] == [first]

    # Without the option (or with --force-snapshot) a backup makes one anyway, as restic does.
    second = world.backup(source)
    forced = world.ok("backup", source, "--force-snapshot").lines[-1]
    assert len({first, second, forced}) == 3

    # A change to a file's content or metadata is a change.
    (source / "docs" / "note2.txt").write_text("edited")
    made = world.ok("backup", source, "--skip-if-unchanged").lines[-1]
    assert made not in (first, second, forced) and len(made) == 64
    (source / "run.sh").chmod(0o700)
    assert len(world.ok("backup", source, "--skip-if-unchanged").lines[-1]) == 64
    # Files appearing beside the target change its parent's mtime only: no
    # change, and nothing is stored (not even the trees above the target).
    (tmp_path / "beside.txt").write_text("not backed up")
    shards = all_shards(world.peers)
    skipped_again = world.ok("backup", source, "--skip-if-unchanged").lines[-1]
    assert skipped_again.startswith("nothing changed since snapshot")
    assert all_shards(world.peers) == shards
    # Another set of paths has its own parent.
    other = tmp_path / "other"
    other.mkdir()
    (other / "f").write_text("x")
    assert len(world.ok("backup", other, "--skip-if-unchanged").lines[-1]) == 64
    assert (
        "not allowed with argument"
        in world.run("backup", source, "--skip-if-unchanged", "--force-snapshot").stderr
    )


def _serve(home: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*CLI, "--home", str(home), "serve", "--listen", "127.0.0.1:0", "--no-ui"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=base_env(),
    )


def _wait_for(log: Path, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {log}: {log.read_text() if log.exists() else ''}")


def _stop(process: subprocess.Popen[bytes]) -> bytes:
    process.terminate()
    _out, err = process.communicate(timeout=20)
    assert b"Traceback" not in err, err
    return err


def test_scheduled_runs_skip_when_nothing_changed_and_a_restart_waits(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=1, n=2)
    source = tmp_path / "src"
    source.mkdir()
    (source / "f").write_text("x")
    first = world.backup(source)
    (world.home / "config.toml").write_text(
        f'version = 1\n[backup]\npaths = ["{source}"]\ninterval = "1d"\n'
    )
    log = world.home / "serve.log"
    process = _serve(world.home)
    try:
        _wait_for(log, f"nothing changed since snapshot {first[:12]}; no new snapshot")
    finally:
        _stop(process)
    assert [s["id"] for s in json.loads(world.ok("snapshots", "--json").stdout)] == [first]

    # A restart within the interval does not back up at once, changed or not.
    (source / "f").write_text("changed")
    process = _serve(world.home)
    try:
        _wait_for(log, "the last run was recent")
        time.sleep(2)
    finally:
        _stop(process)
    assert log.read_text().count("scheduled backup") == 2
    assert len(json.loads(world.ok("snapshots", "--json").stdout)) == 1


def test_quiet_prints_the_id_alone_and_verbose_names_each_file_read(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=1, n=2)
    source = make_source(tmp_path / "src", big=100_000)
    quiet = world.ok("backup", "--quiet", source)
    assert len(quiet.lines) == 1 and len(quiet.lines[0]) == 64, quiet.lines
    assert quiet.stderr == ""
    (source / "docs" / "note1.txt").write_text("changed")
    (source / "added.txt").write_text("new file")
    loud = world.ok("backup", "--verbose", source).lines
    told = [line for line in loud if line.startswith(("new ", "changed "))]
    assert told == [f"new      {source / 'added.txt'}", f"changed  {source / 'docs' / 'note1.txt'}"]
    assert loud[-2] == "snapshot saved:"


def test_progress_says_how_far_along_once_the_scan_has_counted(tmp_path: Path) -> None:
    from p2pbackup.core.exclude import ExcludeRules
    from p2pbackup.engine.backup import BackupSummary, progress_text
    from p2pbackup.engine.listing import ScanTotals, scan
    from p2pbackup.engine.progress import fraction_line

    source = make_source(tmp_path / "src", big=100_000)
    (source / "skip.tmp").write_text("left out")
    exclude = ExcludeRules.from_patterns(["*.tmp"])
    totals = scan([bytes(source)], exclude, threading.Event())
    world = make_world(tmp_path / "w", k=1, n=2)
    summary = json.loads(world.ok("backup", "--exclude", "*.tmp", "--json", source).stdout)
    # The scan counts what the walk then meets.
    assert totals == ScanTotals(summary["files_new"], summary["total_size"])
    stop = threading.Event()
    stop.set()
    assert scan([bytes(source)], exclude, stop) is None

    half = BackupSummary(files_new=3, bytes_read=500)
    assert progress_text(half, None, 2.0) == "3 files, 500 B (counting…)"
    line = progress_text(half, ScanTotals(10, 1000), 2.0)
    assert line == "3 of 10 files, 500 B of 1000 B (50 %, ETA 0:02)"
    assert fraction_line(0, 100, 1.0) == "0 %"
    assert fraction_line(25, 100, 3600.0) == "25 %, ETA 3:00:00"
    assert fraction_line(150, 100, 1.0) == "100 %, ETA 0:00"


def test_a_hard_link_counts_as_its_first_name_does(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=1, n=2)
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.txt").write_text("one file, two names\n")
    (source / "b.txt").hardlink_to(source / "a.txt")
    (source / "c.txt").write_text("another\n")

    first = world.ok("backup", source).lines
    assert first[0] == "files: 3 new, 0 changed, 0 unchanged; 1 directory, 0 symlinks", first
    again = world.ok("backup", source).lines
    assert again[0] == "files: 0 new, 0 changed, 3 unchanged; 1 directory, 0 symlinks", again
    (source / "a.txt").write_text("one file, two names, changed\n")
    changed = world.ok("backup", source).lines
    assert changed[0] == "files: 0 new, 2 changed, 1 unchanged; 1 directory, 0 symlinks", changed
