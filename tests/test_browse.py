"""diff, find and dump: looking into snapshots without restoring them."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

from .cli_helpers import CLI, ODD_NAME, World, base_env, make_source, make_world


def _two_snapshots(tmp_path: Path) -> tuple[World, Path, str, str]:
    world = make_world(tmp_path, k=1, n=2)
    source = make_source(tmp_path / "src", big=200_000)
    first = world.backup(source)
    (source / "docs" / "note1.txt").write_text("rewritten\n")
    (source / "photos" / "small.jpg").unlink()
    (source / "new-dir" / "inner").mkdir(parents=True)
    (source / "new-dir" / "inner" / "fresh.txt").write_bytes(b"x" * 1234)
    (source / "run.sh").chmod(0o700)
    second = world.backup(source)
    return world, source, first, second


def test_diff_names_what_was_added_removed_and_changed(tmp_path: Path) -> None:
    world, source, first, second = _two_snapshots(tmp_path)
    result = world.ok("diff", first[:10], second[:10])
    base = str(source)
    lines = result.lines
    assert lines[0] == f"comparing snapshot {first[:12]} to {second[:12]}:"
    assert f"-    {base}/photos/small.jpg  (39.1 KiB)" in lines
    assert f"+    {base}/new-dir/" in lines
    assert f"+    {base}/new-dir/inner/fresh.txt  (1.2 KiB)" in lines
    assert f"U    {base}/run.sh" in lines
    assert any(line.startswith(f"M    {base}/docs/note1.txt  (") for line in lines)
    # Nothing that did not change is listed.
    assert not any("note0.txt" in line or "big.jpg" in line for line in lines)
    assert "added:    1 file, 2 directories, 0 others; 1.2 KiB" in lines
    assert "removed:  1 file, 0 directories, 0 others; 39.1 KiB" in lines

    data = json.loads(world.ok("diff", first, second, "--json").stdout)
    by_path = {c["path"]: c for c in data["changes"]}
    assert by_path[f"{base}/photos/small.jpg"] == {
        "change": "removed",
        "path": f"{base}/photos/small.jpg",
        "old": {"type": "file", "size": 40_000},
    }
    assert by_path[f"{base}/docs/note1.txt"]["change"] == "modified"
    assert by_path[f"{base}/docs/note1.txt"]["new"]["size"] == len("rewritten\n")
    assert data["stats"]["files_added"] == 1 and data["stats"]["bytes_removed"] == 40_000
    # A snapshot against itself: nothing.
    same = world.ok("diff", second, second, "--json").stdout
    assert json.loads(same)["changes"] == []


def test_find_matches_names_and_paths_across_snapshots(tmp_path: Path) -> None:
    world, source, first, second = _two_snapshots(tmp_path)
    found = json.loads(world.ok("find", "*.jpg", "--json").stdout)
    assert [f["snapshot"] for f in found] == [first, second]
    assert sorted(m["path"] for m in found[0]["matches"]) == [
        f"{source}/photos/big.jpg",
        f"{source}/photos/small.jpg",
    ]
    assert [m["path"] for m in found[1]["matches"]] == [f"{source}/photos/big.jpg"]
    # A pattern with a slash matches the whole path.
    text = world.ok("find", f"{source}/new-*/*/fresh.txt").stdout
    assert f"found in snapshot {second[:12]} from " in text
    assert first[:12] not in text
    assert f"{source}/new-dir/inner/fresh.txt" in text
    only = world.ok("find", "*.jpg", "--snapshot", first[:8]).stdout
    assert second[:12] not in only and "small.jpg" in only
    none = world.ok("find", "*.nothing").lines
    assert none == ["nothing matches *.nothing in 2 snapshots"]


def test_dump_writes_a_file_or_a_directory_as_tar(tmp_path: Path) -> None:
    world, source, _first, second = _two_snapshots(tmp_path)
    home = world.home

    def dump(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*CLI, "--home", str(home), "dump", *args],
            capture_output=True,
            env=base_env(),
            stdin=subprocess.DEVNULL,
            timeout=120,
        )

    big = dump("latest", f"{source}/photos/big.jpg")
    assert big.returncode == 0 and big.stderr == b""
    assert big.stdout == (source / "photos" / "big.jpg").read_bytes()

    tar = dump(second[:12], str(source))
    assert tar.returncode == 0, tar.stderr
    with tarfile.open(fileobj=io.BytesIO(tar.stdout), mode="r:") as archive:
        members = {m.name: m for m in archive.getmembers()}
        top = source.name
        assert members[top].isdir()
        assert members[f"{top}/link"].issym()
        assert members[f"{top}/link"].linkname == "docs/note0.txt"
        assert members[f"{top}/run.sh"].mode == 0o700
        note = archive.extractfile(f"{top}/docs/note1.txt")
        assert note is not None and note.read() == b"rewritten\n"
        odd = f"{top}/{os.fsdecode(ODD_NAME)}"
        # tarfile reads pax names as UTF-8 with surrogate escapes, as written.
        assert odd in members
        fresh = archive.extractfile(f"{top}/new-dir/inner/fresh.txt")
        assert fresh is not None and fresh.read() == b"x" * 1234
    assert len(tar.stdout) % tarfile.RECORDSIZE == 0

    missing = dump("latest", f"{source}/nope")
    assert missing.returncode == 1
    assert (
        missing.stderr.decode().strip()
        == f"p2pbackup: error: {source}/nope is not in this snapshot"
    )
