"""Two homes befriend each other with invite codes and back up to each other.

Real processes over loopback, through the CLI only: each home serves, prints
its invite code, adds the other's, backs up to the friend and a folder; with
the folder emptied, the friend alone restores every byte.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import attrs
import pytest

from p2pbackup.dht import invites

from .cli_helpers import cli_error, cli_ok, make_source, restored, tree_state
from .test_network_e2e import NODE_RE, ServeProcess

pytestmark = pytest.mark.slow


@attrs.define
class Person:
    name: str
    root: Path
    node: ServeProcess
    folder: Path
    code: str = ""


def person(tmp_path: Path, name: str) -> Person:
    root = tmp_path / name
    home = root / "home"
    cli_ok("init", "--shards", "1/2", "--recovery-key-file", root / "key", home=home)
    node_id = cli_ok("id", home=home).lines[-1]
    assert NODE_RE.fullmatch(node_id)
    folder = root / "folder-peer"
    folder.mkdir()
    return Person(name, root, ServeProcess(home, node_id), folder)


def test_two_friends_back_up_to_each_other_with_invite_codes(tmp_path: Path) -> None:
    alice, bob = person(tmp_path, "alice"), person(tmp_path, "bob")
    try:
        for someone in (alice, bob):
            someone.node.start("127.0.0.1:0", open_mode=False)  # friends only
            # No --address: serve wrote the address it listens on into the home.
            result = cli_ok("invite", home=someone.node.home)
            someone.code = result.lines[-1]
            invite = invites.decode_invite(someone.code)
            assert invite.node_id.hex() == someone.node.node_id
            assert [f"{a.host}:{a.port}" for a in invite.addresses] == [someone.node.address]

        for someone, other in ((alice, bob), (bob, alice)):
            result = cli_ok("friend", "add", other.code, home=someone.node.home)
            assert result.lines == [
                f"added friend {other.node.node_id}, reached at {other.node.address}"
            ]
            cli_ok("peer", "add-dir", someone.folder, home=someone.node.home)
            listed = cli_ok("friend", "list", home=someone.node.home).stdout
            assert other.node.node_id in listed

        sources = {}
        snapshots = {}
        for seed, someone in enumerate((alice, bob)):
            source = make_source(someone.root / "source", seed=seed, big=400_000)
            sources[someone.name] = (source, tree_state(source))
            snapshots[someone.name] = cli_ok("backup", source, home=someone.node.home).lines[-1]
        assert alice.node.hosted_shards() and bob.node.hosted_shards()

        # Alice's disk dies: the folder peer is empty. Bob alone holds her data.
        for entry in alice.folder.iterdir():
            shutil.rmtree(entry)
        target = alice.root / "restored"
        cli_ok("restore", snapshots["alice"], "--target", target, home=alice.node.home)
        source, before = sources["alice"]
        assert tree_state(restored(target, source)) == before

        # A new machine: Alice's recovery key and Bob's invite code are enough.
        fresh = alice.root / "new-home"
        result = cli_ok(
            "recover", "--friend", bob.code, "--recovery-key-file", alice.root / "key", home=fresh
        )
        assert any("have enough shards to restore" in line for line in result.lines), result.lines
        assert bob.node.node_id in cli_ok("friend", "list", home=fresh).stdout
        again = alice.root / "restored-again"
        cli_ok("restore", snapshots["alice"], "--target", again, home=fresh)
        assert tree_state(restored(again, source)) == before

        # Bob holds every pack Alice still has; forgetting him needs --force,
        # and says what it costs.
        bob_id = bob.node.node_id
        message = cli_error("friend", "remove", bob_id[:8], home=alice.node.home)
        assert "holds" in message and f"friend remove --force {bob_id}" in message
        result = cli_ok("friend", "remove", "--force", bob_id[:8], home=alice.node.home)
        # The only peer left is the emptied folder: the root record has nowhere to go.
        warning, *lines = result.lines
        assert warning.startswith("warning: the root record could not be updated")
        assert lines[0] == f"removed friend {bob_id}"
        assert lines[1].startswith("forgot ") and lines[1].endswith(" shards it held")
        assert "fewer than N shards" in lines[2]
        assert len(lines) == 3  # the folder's shard rows remain: K=1 is still met on paper
        assert cli_ok("friend", "list", home=alice.node.home).lines[0].startswith("no friends")
    finally:
        errors = [someone.node.stop() for someone in (alice, bob)]
    assert all("Traceback" not in err for err in errors), errors
