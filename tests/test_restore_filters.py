"""restore --include, --exclude and --verify."""

from __future__ import annotations

import json
import os
from pathlib import Path

from p2pbackup.app import operations
from p2pbackup.engine import restore, snapshots
from p2pbackup.engine.backup import Backup

from .cli_helpers import ODD_NAME, make_source, make_world
from .engine_helpers import make_setup


def _restored_names(target: Path, source: Path) -> set[str]:
    base = target / str(source).lstrip("/")
    return {
        os.path.relpath(os.path.join(d, n), base)
        for d, dirs, files in os.walk(base)
        for n in dirs + files
    }


def test_restore_include_and_exclude_choose_what_comes_back(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=1, n=2)
    source = make_source(tmp_path / "src", big=100_000)
    world.backup(source)

    only_jpg = tmp_path / "jpg"
    result = world.ok("restore", "latest", "--target", only_jpg, "--include", "*.jpg", "--verify")
    assert _restored_names(only_jpg, source) == {"photos", "photos/big.jpg", "photos/small.jpg"}
    assert "verified 2 files against the snapshot: all match" in result.lines
    assert (only_jpg / str(source).lstrip("/") / "photos" / "big.jpg").read_bytes() == (
        source / "photos" / "big.jpg"
    ).read_bytes()

    # A path pattern takes the directory with everything under it.
    docs = tmp_path / "docs"
    world.ok("restore", "latest", "--target", docs, "--include", f"{source}/docs")
    names = _restored_names(docs, source)
    assert "docs/deep/data.bin" in names and "docs/note0.txt" in names
    assert not any(n.startswith(("photos", "empty")) for n in names)

    # Exclude leaves out what matches, directories whole; it wins over include.
    rest = tmp_path / "rest"
    summary = json.loads(
        world.ok(
            "restore", "latest", "--target", rest, "--exclude", "docs", "--exclude", "*.jpg",
            "--include", f"{source}/photos", "--include", "run.sh", "--json", "--verify",
        ).stdout
    )  # fmt: skip
    assert _restored_names(rest, source) == {"photos", "run.sh"}
    assert summary["verified"] == 1 and summary["mismatches"] == []
    # Nothing included at all: nothing made but the target.
    none = tmp_path / "none"
    world.ok("restore", "latest", "--target", none, "--include", "no-such-name")
    assert os.listdir(none) == []
    # Odd names match too.
    odd = tmp_path / "odd"
    world.ok("restore", "latest", "--target", odd, "--include", os.fsdecode(ODD_NAME), "--verify")
    assert _restored_names(odd, source) == {os.fsdecode(ODD_NAME)}
    assert "an exclude pattern may not be empty" in world.error(
        "restore", "latest", "--target", odd, "--exclude", ""
    )


async def test_verify_names_a_file_whose_content_is_not_the_snapshots(tmp_path: Path) -> None:
    setup = await make_setup(tmp_path, k=1, n=2)
    source = make_source(tmp_path / "src", big=100_000)
    async with operations.open_repository(setup.home) as repo:
        await Backup(repo).run([source])
        _sid, snap = snapshots.resolve(repo.index, "latest")
        target = tmp_path / "out"
        summary = await restore.Restorer(repo, target, verify=True).run(snap)
        assert summary.ok and summary.verified and not summary.mismatches
        path = target / str(source).lstrip("/") / "photos" / "big.jpg"
        node = await snapshots.find_node(repo, snap, os.fsencode(source / "photos" / "big.jpg"))
        assert node is not None
        params, key = repo.chunker_params(), repo.keyring.dedup_key
        assert restore._content_problem(path, node, params, key) is None
        data = bytearray(path.read_bytes())
        data[50_000] ^= 1  # same size, one bit
        path.write_bytes(bytes(data))
        assert restore._content_problem(path, node, params, key) == (
            "its content is not the snapshot's"
        )
        path.write_bytes(bytes(data[:10]))
        assert restore._content_problem(path, node, params, key) == "10 bytes, not 100000"
