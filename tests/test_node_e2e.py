"""A house burns down: ten homes on loopback, through the CLI only.

Ten ``p2pbackup serve`` processes, friends-only, befriended with invite codes.
Home A backs up a tree of about 200 MB of mixed files to its nine friends; a
second backup of the same tree uploads next to nothing. Four friends are
SIGKILLed and ``status --json`` says so; A's home directory is deleted and its
node killed. On a fresh home, ``recover`` with A's recovery key and one
surviving friend's invite code, then ``restore``: every byte, mode and mtime
equal. Another fresh home recovers with only a surviving node's address
(``recover --bootstrap``), through the root pointer A's node published.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from .cli_helpers import cli_ok, make_source, restored, tree_state
from .test_network_e2e import ServeProcess

pytestmark = pytest.mark.slow

HOMES = 10
KILLED = 4


def make_mixed_tree(root: Path, *, seed: int = 5) -> Path:
    """About 200 MB: large random files (one duplicated), medium text, many
    small files, and the awkward cases of make_source."""
    rng = random.Random(seed)
    make_source(root / "awkward", seed=seed)
    (root / "Videos").mkdir()
    for i in range(3):
        (root / "Videos" / f"clip{i}.mp4").write_bytes(rng.randbytes(40 << 20))
    (root / "Backups").mkdir()
    shutil.copy2(root / "Videos" / "clip1.mp4", root / "Backups" / "clip1-copy.mp4")
    words = [f"w{rng.randrange(50_000)}" for _ in range(5000)]
    for d in range(10):
        folder = root / "Documents" / f"project{d}"
        folder.mkdir(parents=True)
        for i in range(20):
            size = rng.randrange(100_000, 1_000_000)
            text = " ".join(rng.choice(words) for _ in range(size // 6))
            (folder / f"report{i}.txt").write_text(text)
    for d in range(20):
        folder = root / "src" / f"pkg{d}"
        folder.mkdir(parents=True)
        for i in range(100):
            (folder / f"mod{i}.py").write_text(
                "\n".join(f"x{j} = {rng.randrange(10**6)}" for j in range(rng.randrange(20, 400)))
            )
    return root


def node_in(root: Path, name: str, shards: str | None = None) -> ServeProcess:
    home = root / name / "home"
    extra = ["--shards", shards] if shards else []
    cli_ok("init", *extra, "--recovery-key-file", root / name / "key", home=home)
    return ServeProcess(home, cli_ok("id", home=home).lines[-1])


def test_recover_after_the_house_burns_down(tmp_path: Path) -> None:
    a = node_in(tmp_path, "a", shards="4/9")
    friends = [node_in(tmp_path, f"f{i}") for i in range(HOMES - 1)]
    everyone = [a, *friends]
    try:
        a.start("127.0.0.1:0", open_mode=False)
        for node in friends:
            node.start("127.0.0.1:0", "--bootstrap", a.address, open_mode=False)
        codes = {node.node_id: cli_ok("invite", home=node.home).lines[-1] for node in everyone}
        for node in friends:
            cli_ok("friend", "add", codes[a.node_id], home=node.home)
            cli_ok("friend", "add", codes[node.node_id], home=a.home)

        source = make_mixed_tree(tmp_path / "source")
        before = tree_state(source)
        first = json.loads(cli_ok("backup", source, "--json", home=a.home, timeout=600).stdout)
        assert (first["k"], first["n"]) == (4, 9)
        assert first["total_size"] > 200 << 20
        second = json.loads(cli_ok("backup", source, "--json", home=a.home, timeout=600).stdout)
        # Nothing changed: nothing new read or stored but the snapshot's own metadata.
        assert second["bytes_new"] == 0 and second["files_unchanged"] == first["files_new"]
        assert second["bytes_stored"] < first["bytes_stored"] / 1000

        killed = friends[:KILLED]
        for node in killed:
            node.kill()
        report = json.loads(cli_ok("status", "--json", home=a.home, timeout=120).stdout)
        offline = {p["peer_id"] for p in report["peers"] if not p["online"]}
        assert offline == {node.node_id for node in killed}
        data = report["data"]
        # 9 shards a pack, 4 needed, 4 peers dead: 5 healthy, 1 to spare.
        assert data["min_healthy"] == 5 and data["unrecoverable"] == 0
        assert data["at_risk"] == data["packs"] > 0

        a.kill()
        key_file = tmp_path / "a" / "key"
        shutil.rmtree(a.home)  # the house burns down; the key was kept elsewhere

        fresh = tmp_path / "new-machine" / "home"
        survivor = friends[-1]
        result = cli_ok(
            "recover",
            "--friend",
            codes[survivor.node_id],
            "--recovery-key-file",
            key_file,
            home=fresh,
            timeout=300,
        )
        assert any("have enough shards to restore" in line for line in result.lines)
        target = tmp_path / "restored"
        cli_ok("restore", "latest", "--target", target, home=fresh, timeout=600)
        assert tree_state(restored(target, source)) == before
        # The recovered home knows its nine friends again.
        listed = json.loads(cli_ok("friend", "list", "--json", home=fresh).stdout)
        assert {f["node_id"] for f in listed} == {node.node_id for node in friends}

        # Without even an invite code: any DHT node's address leads to the
        # root pointer A's node published, and that to the root record.
        other = tmp_path / "another-machine" / "home"
        result = cli_ok(
            "recover",
            "--bootstrap",
            survivor.address,
            "--recovery-key-file",
            key_file,
            home=other,
            timeout=300,
        )
        assert any("have enough shards to restore" in line for line in result.lines)
        snapshots = [
            json.loads(cli_ok("snapshots", "--json", home=h).stdout) for h in (fresh, other)
        ]
        assert snapshots[0] == snapshots[1] and len(snapshots[0]) == 2
    finally:
        errors = [node.stop() for node in everyone]
    assert all("Traceback" not in e for e in errors), errors
    assert os.path.exists(key_file)
