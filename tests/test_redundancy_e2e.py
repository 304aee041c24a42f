"""A backup says what it placed, and ``check`` names what is degraded.

Real processes on loopback, through the CLI only. A home with four folder
peers and four friends, each a ``serve`` that stores only for its friends:
the **keeper** added the home back, two **strangers** never did, and
**gone** did but is down. The first backup adapts its code to the five peers
that will take shards and names the three it passed over, and why. During
the second, the keeper dies: the packs it was given stay one shard short of
their n, the backup says so and exits 3, and ``check`` names those packs,
their snapshot and the peer.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from p2pbackup.app.home import Home
from p2pbackup.app.service import EXIT_PARTIAL
from p2pbackup.engine.index import Index

from .cli_helpers import CLI, SNAPSHOT_ID_RE, base_env, cli_ok, make_source, run_cli
from .test_network_e2e import NODE_RE, ServeProcess

pytestmark = pytest.mark.slow


def friend_node(root: Path, name: str) -> ServeProcess:
    home = root / name / "home"
    cli_ok("init", "--recovery-key-file", root / name / "key", home=home)
    node_id = cli_ok("id", home=home).lines[-1]
    assert NODE_RE.fullmatch(node_id)
    return ServeProcess(home, node_id)


def placements(home: Path) -> dict[str, tuple[int, int, int]]:
    """Each pack in the home's index: (k, n, shards placed)."""
    index = Index(Home(home).index_path)
    try:
        return {
            pack_id.hex(): (k, n, len(shards)) for pack_id, k, n, shards in index.pack_placements()
        }
    finally:
        index.close()


def test_a_backup_says_what_it_placed_and_check_names_what_is_degraded(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    cli_ok("init", "--shards", "3/6", "--recovery-key-file", tmp_path / "key", home=home)
    # The home does not serve: its address only has to go into the code.
    home_code = cli_ok("invite", "--address", "127.0.0.1:9", home=home).lines[-1]
    for i in range(4):
        folder = tmp_path / f"folder{i}"
        folder.mkdir()
        cli_ok("peer", "add-dir", folder, home=home)
    nodes = {
        name: friend_node(tmp_path, name) for name in ("keeper", "stranger1", "stranger2", "gone")
    }
    try:
        for node in nodes.values():
            node.start("127.0.0.1:0", open_mode=False)  # friends only
            cli_ok("friend", "add", cli_ok("invite", home=node.home).lines[-1], home=home)
        home_id = cli_ok("id", home=home).lines[-1]
        for name in ("keeper", "gone"):
            # The home does not answer at its address: added all the same.
            assert run_cli("friend", "add", home_code, home=nodes[name].home).returncode == 0
            assert home_id in cli_ok("friend", "list", home=nodes[name].home).stdout
        nodes["gone"].kill()
        keeper, gone = nodes["keeper"].node_id, nodes["gone"].node_id
        strangers = [nodes["stranger1"].node_id, nodes["stranger2"].node_id]

        # Seven peers, one down and two that take nothing from us: the code
        # fits the five that do, and every pack gets all its shards.
        first = run_cli("backup", make_source(tmp_path / "first", big=400_000), home=home)
        assert first.returncode == 0 and first.stderr == "", str(first)
        assert any(
            line.endswith("(2-of-5 shards; fewer peers than the configured 3-of-6 need, so the "
                          "code was adapted)")
            for line in first.lines
        ), str(first)  # fmt: skip
        passed = {line.split()[2]: line for line in first.lines if line.startswith("warning: peer")}
        assert set(passed) == {gone, *strangers}, str(first)
        assert passed[gone].startswith(f"warning: peer {gone} is down, its shards went to other")
        for stranger in strangers:
            assert passed[stranger].startswith(
                f"warning: peer {stranger} is full, its shards went to other peers: it offers us "
                "no room"
            )
            assert "a node that has not added this one as a friend" in passed[stranger]
        first_snapshot = first.lines[-1]
        assert SNAPSHOT_ID_RE.fullmatch(first_snapshot)
        first_packs = placements(home)
        assert first_packs and set(first_packs.values()) == {(2, 5, 5)}

        # The keeper dies while the second backup uploads to it.
        second_source = tmp_path / "second"
        second_source.mkdir()
        rng = random.Random(2)
        for i in range(6):
            (second_source / f"video{i}.bin").write_bytes(rng.randbytes(8 << 20))
        held_before = len(nodes["keeper"].hosted_shards())
        backup = subprocess.Popen(
            [*CLI, "--home", os.fspath(home), "backup", "--json", os.fspath(second_source)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=base_env(),
        )
        deadline = time.monotonic() + 120
        while len(nodes["keeper"].hosted_shards()) == held_before:
            assert backup.poll() is None and time.monotonic() < deadline, "no shard reached it"
            time.sleep(0.005)
        nodes["keeper"].kill()
        out, err = backup.communicate(timeout=300)
        assert "Traceback" not in err.decode(), err
        assert backup.returncode == EXIT_PARTIAL, (out, err)
        report = json.loads(out)
        second_snapshot = report["snapshot_id"]
        [error] = err.decode().splitlines()
        assert error == (
            f"p2pbackup: error: snapshot {second_snapshot[:12]} saved, but "
            f"{len(report['below_n'])} packs are stored below their n (see the warnings)"
        )
        # What it says is what the index holds.
        packs = placements(home)
        short = {p: placed for p, (_k, n, placed) in packs.items() if placed < n}
        assert short and {p["pack_id"]: p["placed"] for p in report["below_n"]} == short
        assert all((p["k"], p["n"], p["placed"]) == (2, 5, 4) for p in report["below_n"])
        assert report["placed_min"] == min(placed for _k, _n, placed in packs.values()) == 4
        assert report["spare_min"] == 2
        passed_over = {p["peer_id"]: (p["what"], p["reason"]) for p in report["passed_over"]}
        assert set(passed_over) == {keeper, gone, *strangers}
        assert passed_over[keeper][0] == passed_over[gone][0] == "down"
        for stranger in strangers:
            # Tried as the last spares of a pack the keeper's death left
            # short, each said why it takes nothing from us.
            what, reason = passed_over[stranger]
            assert what == "refused" and "stores only for its friends" in reason, reason

        # check names the packs below n, their snapshots and their peers.
        result = run_cli("check", "--json", home=home)
        assert result.returncode == EXIT_PARTIAL, str(result)
        checked = json.loads(result.stdout)
        assert set(checked["peers_unreachable"]) == {keeper, gone}
        problems = {p["pack_id"]: p for p in checked["problems"]}
        for pack_id in short:
            assert problems[pack_id]["unplaced"] == 1
            assert problems[pack_id]["good"] == 4
            assert problems[pack_id]["snapshots"] == [second_snapshot]
        for pack_id in first_packs:  # every one had a shard on the keeper
            assert problems[pack_id]["peers"] == [{"peer_id": keeper, "problem": "did not answer"}]
            if not problems[pack_id]["is_index"]:  # an index pack serves them all
                assert problems[pack_id]["snapshots"] == [first_snapshot]
        # The rest of the second backup's packs: placed whole, on the keeper
        # before it died or on the four folders after.
        for pack_id, problem in problems.items():
            keeper_lost = problem["peers"] == [{"peer_id": keeper, "problem": "did not answer"}]
            assert (pack_id in short) != keeper_lost, problem
        assert checked["healthy"] == len(packs) - len(problems) > 0
        assert checked["degraded"] == len(problems) and checked["unrecoverable"] == 0
        assert checked["shards_unplaced"] == len(short)

        text = run_cli("check", home=home)
        assert text.returncode == EXIT_PARTIAL, str(text)
        assert any(line.startswith(f"peer {keeper} did not answer: ") for line in text.lines)
        for pack_id in short:
            assert (
                f"degraded pack {pack_id[:16]}: 4 of 5 shards good, 2 needed (1 never placed); "
                f"in snapshots {second_snapshot[:12]}"
            ) in text.lines, str(text)
        assert text.lines[-1] == "check found problems, but every pack is still restorable"
    finally:
        errors = [node.stop() for node in nodes.values()]
    assert all("Traceback" not in err for err in errors), errors
