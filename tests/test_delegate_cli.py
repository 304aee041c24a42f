"""``p2pbackup delegate add|list|remove`` and ``repair --for`` from the
command line: in process with an offline delegate (quick), then with real
``serve`` processes."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import attrs
import pytest
import trio

from p2pbackup.app import operations
from p2pbackup.app.devnet import open_devnet
from p2pbackup.core import delegation
from p2pbackup.dht import invites

from .cli_helpers import cli_ok, make_source, run_cli
from .test_friends import closed_port, error_line, run


def test_delegates_are_added_listed_and_removed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    for home in (alice, bob):
        run(capsys, "--home", home, "init", "--recovery-key-file", home.with_suffix(".key"))
    address = f"127.0.0.1:{closed_port()}"  # Bob is offline
    code, out, _ = run(capsys, "--home", bob, "invite", "--address", address)
    bob_id = invites.decode_invite(out[-1]).node_id.hex()
    assert run(capsys, "--home", alice, "friend", "add", out[-1])[0] == 0
    folder = tmp_path / "disk"
    folder.mkdir()
    code, out, _ = run(capsys, "--home", alice, "peer", "add-dir", folder)
    folder_id = out[-1].split()[2]

    assert run(capsys, "--home", alice, "delegate", "list")[1][0].startswith("no delegates yet")
    code, out, err = run(capsys, "--home", alice, "delegate", "add", bob_id[:12])
    assert (code, err) == (0, "")
    assert out[0] == f"added delegate {bob_id}"
    assert out[1].startswith("warning: it was not handed the repair grant now (")
    assert "already" in error_line(capsys, "--home", alice, "delegate", "add", bob_id)
    assert "is a folder" in error_line(capsys, "--home", alice, "delegate", "add", folder_id)
    assert "no peer" in error_line(capsys, "--home", alice, "delegate", "add", "0123456789ab")

    code, out, _ = run(capsys, "--home", alice, "delegate", "list", "--json")
    [listed] = json.loads("\n".join(out))
    assert listed["node_id"] == bob_id and listed["location"] == address
    assert listed["granted_at"] is None and listed["problem"]
    code, out, _ = run(capsys, "--home", alice, "delegate", "list")
    assert out[0].startswith(f"{bob_id}  {address}  holds no grant yet  (last hand-over failed: ")

    code, out, err = run(capsys, "--home", alice, "delegate", "remove", bob_id[:10])
    assert (code, err) == (0, "")
    assert out[0].startswith(f"warning: node {bob_id} was not told (")
    assert out[-1] == f"removed delegate {bob_id}; 0 nodes refuse its certificates now"
    assert "no delegate" in error_line(capsys, "--home", alice, "delegate", "remove", bob_id)
    assert run(capsys, "--home", alice, "delegate", "list")[1][0].startswith("no delegates yet")


def held_grants(home: Path) -> dict[bytes, tuple[int, bytes, bytes]]:
    """The grants a running node holds (read beside it, without its lock)."""
    db = sqlite3.connect(f"file:{home / 'hosted' / 'hosted.sqlite'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT owner, sequence, grant_data, certificate FROM held_grants")
        return {bytes(o): (s, bytes(g), bytes(c)) for o, s, g, c in rows}
    finally:
        db.close()


def revoked(home: Path) -> list[tuple[bytes, bytes]]:
    db = sqlite3.connect(f"file:{home / 'hosted' / 'hosted.sqlite'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT owner, delegate FROM revoked_delegates")
        return [(bytes(o), bytes(d)) for o, d in rows]
    finally:
        db.close()


async def test_a_running_delegate_takes_grants_repairs_and_loses_them(tmp_path: Path) -> None:
    config = attrs.evolve(operations.default_config(2, 3), pack_size=256 * 1024)
    source = make_source(tmp_path / "source", big=300_000)
    async with open_devnet(tmp_path / "net", 5, config=config) as devnet:
        owner, bob, carol, dave, _erin = devnet.nodes
        home = owner.home.path

        async def cli_run(*args: str | os.PathLike[str]) -> list[str]:
            result = await trio.to_thread.run_sync(lambda: cli_ok(*args, home=home))
            return result.stdout.splitlines()

        owner_id = bytes.fromhex(owner.node_id)
        bob_id = bytes.fromhex(bob.node_id)
        out = await cli_run("delegate", "add", bob_id.hex())
        assert out[-1].startswith("it holds the repair grant of sequence ")
        first = held_grants(bob.home.path)[owner_id][0]
        await cli_run("backup", source)
        sequence, grant_data, certificate = held_grants(bob.home.path)[owner_id]
        assert sequence > first
        grant = delegation.open_grant(grant_data, owner=owner_id)
        assert grant.packs and all(len(p.shards) == 3 for p in grant.packs)
        assert delegation.open_certificate(certificate).delegate == bob_id
        assert owner_id not in held_grants(carol.home.path)
        # status: the owner's delegates, and whose backups bob keeps alive.
        status = json.loads("\n".join(await cli_run("status", "--json")))
        [delegate] = status["delegates"]
        assert delegate["node_id"] == bob_id.hex() and delegate["grant_sequence"] == sequence
        assert status["kept_for"] == []
        bobs = await trio.to_thread.run_sync(lambda: cli_ok("status", "--json", home=bob.home.path))
        [kept] = json.loads(bobs.stdout)["kept_for"]
        assert kept["owner"] == owner_id.hex() and kept["packs"] == len(grant.packs)
        text = await trio.to_thread.run_sync(lambda: cli_ok("status", home=bob.home.path))
        assert f"delegate of node {owner_id.hex()}: grant {sequence} of " in text.stdout

        # A peer dies; the delegate rebuilds its shards for the owner.
        await devnet.kill(dave.index)
        result = await trio.to_thread.run_sync(
            lambda: run_cli(
                "repair", "--for", owner_id.hex(), "--grace", "0", "--json", home=bob.home.path
            )
        )
        assert result.returncode == 0, str(result)
        report = json.loads(result.stdout)
        assert report["ok"] and report["owner"] == owner_id.hex()
        assert report["grant_sequence"] == sequence and report["shards_rebuilt"] > 0
        # Bob's status: when it last acted for the owner, and what it found.
        bobs = await trio.to_thread.run_sync(lambda: cli_ok("status", "--json", home=bob.home.path))
        [kept] = json.loads(bobs.stdout)["kept_for"]
        assert kept["acted_at"] is not None and kept["health"]["packs"] == len(grant.packs)
        assert kept["health"]["unrecoverable"] == 0
        text = await trio.to_thread.run_sync(lambda: cli_ok("status", home=bob.home.path))
        assert "; last pass " in text.stdout and " 0 unrecoverable" in text.stdout
        # The owner reads bob's log back (its own repair does) and shows when it acted.
        assert "; has not acted yet" in "\n".join(await cli_run("status"))
        mine = await trio.to_thread.run_sync(lambda: run_cli("repair", "--json", home=home))
        assert json.loads(mine.stdout)["delegated_moves"] > 0, str(mine)
        status = json.loads("\n".join(await cli_run("status", "--json")))
        assert status["delegates"][0]["acted_at"] == kept["acted_at"]
        assert "; last acted " in "\n".join(await cli_run("status"))
        # Not a delegate of carol's home: one line, exit 1.
        refused = await trio.to_thread.run_sync(
            lambda: run_cli("repair", "--for", carol.node_id, home=bob.home.path)
        )
        assert refused.returncode == 1
        assert "holds no repair grant of node" in refused.stderr

        out = await cli_run("delegate", "remove", bob_id.hex())
        assert out[0].startswith(f"warning: node {dave.node_id} was not told (")
        assert out[-1] == f"removed delegate {bob_id.hex()}; 3 nodes refuse its certificates now"
        assert owner_id not in held_grants(bob.home.path)
        assert revoked(carol.home.path) == [(owner_id, bob_id)]
        result = await trio.to_thread.run_sync(lambda: run_cli("delegate", "list", home=home))
        assert result.stdout.startswith("no delegates yet")
