"""Names for friends and peers: ``friend add --name``, ``peer rename``, and
every command that takes an id taking the name too."""

from __future__ import annotations

import json
from pathlib import Path

from .cli_helpers import cli_error, cli_ok, make_world


def test_friends_and_peers_get_names_used_in_lists_and_commands(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=1, n=3)
    other = tmp_path / "alice-home"
    cli_ok("init", "--recovery-key-file", tmp_path / "alice.key", home=other)
    code = cli_ok("invite", "--address", "127.0.0.1:9", home=other).lines[-1]
    alice = cli_ok("id", home=other).lines[-1]

    # A bad name is refused before anything is added.
    message = cli_error("friend", "add", code, "--name", "cafe42", home=world.home)
    assert "reads as a node id" in message
    assert cli_ok("friend", "list", home=world.home).lines[0].startswith("no friends")
    added = cli_ok("friend", "add", code, "--name", "Alice", home=world.home)
    assert f"added friend {alice}" in added.stdout
    listed = cli_ok("friend", "list", home=world.home).lines
    assert listed[0].startswith(f"{alice} (alice)  127.0.0.1:9")
    [entry] = json.loads(cli_ok("friend", "list", "--json", home=world.home).stdout)
    assert entry["name"] == "alice"

    # A folder peer named, then found by its name.
    peers = json.loads(cli_ok("peer", "list", "--json", home=world.home).stdout)
    disk = next(p["peer_id"] for p in peers if p["kind"] == "dir")
    assert cli_ok("peer", "rename", disk[:10], "disk-1", home=world.home).lines == [
        f"peer {disk} is now named disk-1"
    ]
    assert f"{disk} (disk-1)  dir" in cli_ok("peer", "list", home=world.home).stdout
    for bad, why in (
        ("alice", "is named alice already"),
        ("a b", "letters, digits"),
        ("x" * 33, "1 to 32 characters"),
    ):
        assert why in cli_error("peer", "rename", "disk-1", bad, home=world.home)
    assert cli_ok("peer", "rename", "disk-1", "", home=world.home).lines == [
        f"peer {disk} has no name now"
    ]
    assert "(disk-1)" not in cli_ok("peer", "list", home=world.home).stdout

    # The name stands for the id in commands.
    cli_ok("friend", "remove", "--force", "alice", home=world.home)
    assert cli_ok("friend", "list", home=world.home).lines[0].startswith("no friends")
    assert "alice" not in cli_ok("peer", "list", home=world.home).stdout

    # The names go into the root record: a recovered home knows them.
    cli_ok("peer", "rename", disk, "disk-1", home=world.home)
    cli_ok("backup", tmp_path / "alice.key", home=world.home)
    recovered = tmp_path / "recovered"
    cli_ok("recover", "--recovery-key-file", world.key_file, "--peer-dir", world.peers[0],
           home=recovered)  # fmt: skip
    assert f"{disk} (disk-1)" in cli_ok("peer", "list", home=recovered).stdout
    assert "no friends" in cli_ok("friend", "list", home=recovered).stdout  # removed before
