"""snapshots --tag/--path/--host, and tag --add/--remove/--set."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from .cli_helpers import World, cli_ok, make_world


def _ids(world: World, *filters: str) -> set[str]:
    listed = json.loads(world.ok("snapshots", *filters, "--json").stdout)
    return {s["id"] for s in listed}


def _tags(world: World) -> dict[str, list[str]]:
    return {s["id"]: s["tags"] for s in json.loads(world.ok("snapshots", "--json").stdout)}


def test_snapshots_filters_follow_restics_rules(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=1, n=2)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("a")
    (b / "f").write_text("b")
    ab = world.backup(a, tags=["x", "y"])
    ax = world.backup(a, tags=["x"])
    by = world.backup(b, tags=["y"])
    both = world.backup(a, b)

    assert _ids(world) == {ab, ax, by, both}
    # Repeated --tag: any; a comma: all of them.
    assert _ids(world, "--tag", "x") == {ab, ax}
    assert _ids(world, "--tag", "x,y") == {ab}
    assert _ids(world, "--tag", "x", "--tag", "y") == {ab, ax, by}
    # --path: snapshots that have every path asked for.
    assert _ids(world, "--path", str(a)) == {ab, ax, both}
    assert _ids(world, "--path", str(a), "--path", str(b)) == {both}
    assert _ids(world, "--path", f"{a}/", "--tag", "y") == {ab}
    # --host: any of them.
    assert _ids(world, "--host", socket.gethostname()) == {ab, ax, by, both}
    assert _ids(world, "--host", "elsewhere") == set()
    assert _ids(world, "--host", "elsewhere", "--host", socket.gethostname()) == {ab, ax, by, both}
    listing = world.ok("snapshots", "--tag", "nothing-has-it")
    assert listing.lines == ["no snapshot matches"]
    assert "names no tag" in world.error("snapshots", "--tag", ",")


def test_tag_rewrites_snapshots_and_forget_sees_the_new_tags(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=1, n=2)
    source = tmp_path / "src"
    source.mkdir()
    (source / "f").write_text("data")
    first = world.backup(source)
    (source / "f").write_text("more data")
    second = world.backup(source, tags=["old"])

    result = world.ok("tag", first[:12], second, "--add", "keep,b", "--remove", "old", "--json")
    changes = {c["old"]: c for c in json.loads(result.stdout)}
    assert all(c["changed"] for c in changes.values())
    new_first, new_second = changes[first]["new"], changes[second]["new"]
    # New ids replace the old ones: the old are no longer listed.
    assert _tags(world) == {new_first: ["keep", "b"], new_second: ["keep", "b"]}
    assert first not in world.ok("snapshots").stdout

    # Already so: nothing written, the id stays.
    again = world.ok("tag", "latest", "--add", "keep")
    assert again.lines[-1] == "0 snapshots changed"
    assert _tags(world)[new_second] == ["keep", "b"]

    # --set replaces them all; '' clears them.
    world.ok("tag", new_second, "--set", "weekly")
    tags = _tags(world)
    (newest,) = [sid for sid, t in tags.items() if t == ["weekly"]]
    world.ok("tag", new_first, "--set", "")
    tags = _tags(world)
    assert sorted(tags.values()) == [[], ["weekly"]]

    # The snapshot still restores, from the new snapshot blob on the peers.
    target = tmp_path / "out"
    world.ok("restore", newest, "--target", target)
    assert (target / str(source).lstrip("/") / "f").read_text() == "more data"
    world.ok("check", "--read-data")

    # forget --keep-tag decides on the tags as they are now.
    world.ok("tag", newest, "--add", "keep")
    forgot = world.ok("forget", "--keep-tag", "keep", "--group-by", "", "--json")
    gone = json.loads(forgot.stdout)["forgotten"]
    assert len(gone) == 1 and gone[0] != newest
    (left,) = _tags(world)
    assert left != newest  # retagged once more
    assert _tags(world)[left] == ["weekly", "keep"]

    assert "tag needs --add, --remove or --set" in world.error("tag", "latest")
    assert "not both" in world.error("tag", "latest", "--set", "a", "--add", "b")
    assert "no snapshot matches" in world.error("tag", "ffffffff", "--add", "a")


def test_a_recovered_home_finds_the_retagged_snapshots(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=1, n=2)
    source = tmp_path / "src"
    source.mkdir()
    (source / "f").write_text("data")
    world.backup(source, tags=["old"])
    world.ok("tag", "latest", "--set", "new,kept")
    recovered = tmp_path / "recovered"
    cli_ok("--home", recovered, "recover", "--recovery-key-file", world.key_file,
           "--peer-dir", world.peers[0])  # fmt: skip
    listed = json.loads(cli_ok("--home", recovered, "snapshots", "--json").stdout)
    assert {s["id"]: s["tags"] for s in listed} == _tags(world)
    assert [s["tags"] for s in listed] == [["new", "kept"]]
