"""What a backup takes: --exclude-file, --exclude-if-present, --one-file-system,
--files-from (and their config.toml forms)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from p2pbackup.node.schedule import parse_home_config

from .cli_helpers import World, make_world


def _backed_up(world: World, root: Path) -> set[str]:
    """The paths under ``root`` in the latest snapshot, relative to it."""
    entries = json.loads(world.ok("ls", "latest", "--json").stdout)
    prefix = f"{root}/"
    return {e["path"].removeprefix(prefix) for e in entries if e["path"].startswith(prefix)}


def _tree(root: Path) -> Path:
    for name in ("keep/a.txt", "keep/b.log", "cache/data.bin", "cache/CACHEDIR.TAG",
                 "build/out.o", "notes.txt", "other/x.txt"):  # fmt: skip
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(name)
    return root


def test_exclude_file_and_exclude_if_present(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=1, n=2)
    source = _tree(tmp_path / "src")
    patterns = tmp_path / "excludes.txt"
    patterns.write_text(f"# build output\n*.log\n\n  {source}/build  \n")
    summary = json.loads(
        world.ok(
            "backup", source, "--exclude-file", patterns, "--exclude-if-present", "CACHEDIR.TAG",
            "--exclude", "x.txt", "--json",
        ).stdout
    )  # fmt: skip
    assert _backed_up(world, source) == {"keep", "keep/a.txt", "notes.txt", "other"}
    assert summary["excluded"] == 4  # b.log, build, cache, x.txt

    missing = world.error("backup", source, "--exclude-file", tmp_path / "nope.txt")
    assert "--exclude-file" in missing and "nope.txt" in missing
    assert "takes a file name" in world.error("backup", source, "--exclude-if-present", "a/b")


def test_files_from_lists_the_paths(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=1, n=2)
    source = _tree(tmp_path / "src")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# what matters\n{source}/keep\n\n{source}/notes.txt\n")
    world.ok("backup", "--files-from", listing)
    assert _backed_up(world, source) == {"keep", "keep/a.txt", "keep/b.log", "notes.txt"}
    snapshot = json.loads(world.ok("snapshots", "--json").stdout)[-1]
    assert snapshot["paths"] == [f"{source}/keep", f"{source}/notes.txt"]
    # With paths on the command line too.
    world.ok("backup", source / "other", "--files-from", listing)
    assert "other/x.txt" in _backed_up(world, source)

    listing.write_text("relative/path\n")
    assert "not an absolute path" in world.error("backup", "--files-from", listing)
    listing.write_text("# nothing\n")
    assert "list no path" in world.error("backup", "--files-from", listing)
    assert "backup needs the paths" in world.error("backup")


def _a_mount_point() -> tuple[Path, Path]:
    """A directory and a directory in it on another file system."""
    for parent in (Path("/dev"), Path("/run"), Path("/sys/fs")):
        try:
            device = os.lstat(parent).st_dev
            for child in sorted(parent.iterdir()):
                if child.is_dir() and not child.is_symlink() and os.lstat(child).st_dev != device:
                    return parent, child
        except OSError:
            continue
    pytest.skip("no mount point below /dev, /run or /sys/fs")


def test_one_file_system_stays_on_the_paths_file_systems(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=1, n=2)
    parent, mount = _a_mount_point()
    # Not crossing is tried alone: what is mounted (/dev/shm) may be large.
    summary = json.loads(world.ok("backup", parent, "--one-file-system", "--json").stdout)
    assert summary["excluded"] >= 1
    listed = {e["path"] for e in json.loads(world.ok("ls", "latest", "--json").stdout)}
    assert str(parent) in listed and str(mount) not in listed
    assert not any(path.startswith(f"{mount}/") for path in listed)
    # A path given is backed up even on another file system than its parent.
    world.ok("backup", mount, "--one-file-system")
    listed = {e["path"] for e in json.loads(world.ok("ls", "latest", "--json").stdout)}
    assert str(mount) in listed


def test_config_takes_the_same_selection() -> None:
    config = parse_home_config(
        'version = 1\n[backup]\npaths = ["/home/me"]\ninterval = "6h"\n'
        'exclude_if_present = ["CACHEDIR.TAG"]\none_file_system = true\n',
        "config.toml",
    )
    assert config.backup is not None
    rules = config.backup.exclude
    assert rules.one_file_system and rules.marked([b"CACHEDIR.TAG"])
    assert not rules.marked([b"other"])
