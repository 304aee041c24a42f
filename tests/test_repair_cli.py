"""``p2pbackup repair``, ``peer remove`` and ``friend remove`` from the command line.

Folder peers first (quick), then the whole story with real ``serve``
processes: a devnet of 13 homes, 4-of-10; three nodes die for good, one
rots, one loses half its shard files; ``repair --grace 0`` brings every
pack back; three more die; the restore is exact.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import attrs
import pytest
import trio

from p2pbackup.app import operations
from p2pbackup.app.devnet import open_devnet

from .cli_helpers import (
    cli_ok,
    make_source,
    make_world,
    restored,
    run_cli,
    shard_files,
    tree_state,
)

PACK_SIZE = 256 * 1024


def test_repair_rebuilds_missing_and_corrupt_shards_on_other_folders(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=2, n=4, peers=7, pack_size=PACK_SIZE)
    source = make_source(tmp_path / "source", big=600_000)
    before = tree_state(source)
    world.backup(source)
    # One folder loses its disk, another rots: the two holding the most
    # shards, so that both hold some whatever the placement.
    fullest = sorted(world.peers, key=lambda peer: -len(shard_files(peer)))
    gone, rotting = fullest[0], fullest[1]
    assert shard_files(gone) and shard_files(rotting)
    for path in shard_files(gone):
        path.unlink()
    rotten = shard_files(rotting)
    for path in rotten:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
    report = json.loads(world.ok("repair", "--json").stdout)
    assert report["ok"] and report["shards_rebuilt"] > 0
    # The audit finds the rotten shards whose sampled blocks were hit; the
    # read-back finds the others: each rotten shard once, by one or the other.
    wrong = [f for f in report["audit"]["failures"] if f["reason"] == "wrong block"]
    assert report["shards_failed"] + len(wrong) == len(rotten) > 0
    missing = [f for f in report["audit"]["failures"] if f["reason"] == "missing"]
    assert missing  # the audit also finds the shards the lost disk held
    assert report["packs_unrecoverable"] == 0
    assert report["packs_repaired"] > 0
    # Again: nothing left to do, and it says so in words.
    again = world.ok("repair")
    assert "0 repaired" in again.stdout
    assert "every pack has at least 4 healthy shards on distinct peers" in again.stdout
    # Two shards of each pack are enough: wipe two more folders.
    for peer in [peer for peer in world.peers if peer not in (gone, rotting)][:2]:
        for path in shard_files(peer):
            path.unlink()
    target = tmp_path / "restored"
    world.ok("restore", "latest", "--target", target)
    assert tree_state(restored(target, source)) == before


def test_repair_says_which_packs_stay_below_k_and_exits_1(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=2, n=3, peers=3, pack_size=PACK_SIZE)
    world.backup(make_source(tmp_path / "source", big=300_000))
    for peer in world.peers[:2]:
        shutil.rmtree(peer / "p2pbackup-peer" / "owners")
    message = world.error("repair", "--grace", "0", "--rate", "unlimited")
    assert re.fullmatch(
        r"(\d+) of \1 packs could not be brought back to the 2 healthy shards needed to "
        r"read them: \1 have too few healthy shards left on the peers that answer",
        message,
    ), message
    assert world.run("repair", "--grace", "soon").returncode == 1
    assert "is not a duration" in world.error("repair", "--grace", "soon")


def test_peer_remove_rebuilds_its_shards_elsewhere_first(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=2, n=4, peers=6, pack_size=PACK_SIZE)
    source = make_source(tmp_path / "source", big=300_000)
    before = tree_state(source)
    world.backup(source)
    listed = json.loads(world.ok("peer", "list", "--json").stdout)
    leaving = next(p for p in listed if p["shards"] > 0)
    folder = Path(leaving["location"])
    held = leaving["shards"]
    assert "too short" in world.error("peer", "remove", leaving["peer_id"][:5])
    result = world.ok("peer", "remove", leaving["peer_id"])
    assert result.lines[0] == f"removed peer {leaving['peer_id']}"
    assert result.lines[1] == f"rebuilt {held} of its shards on other peers"
    assert result.lines[2].startswith("asked it to delete ")
    assert len(result.lines) == 3  # no pack is left short of shards
    assert shard_files(folder) == []
    remaining = json.loads(world.ok("peer", "list", "--json").stdout)
    assert leaving["peer_id"] not in {p["peer_id"] for p in remaining}
    # Two more folders go: 4 shards per pack on 5 folders, k = 2.
    others = [Path(p["location"]) for p in remaining][:2]
    for peer in others:
        shutil.rmtree(peer / "p2pbackup-peer" / "owners")
    target = tmp_path / "restored"
    world.ok("restore", "latest", "--target", target)
    assert tree_state(restored(target, source)) == before


def test_peer_remove_refuses_what_no_other_peer_can_take_unless_forced(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=2, n=4, peers=4, pack_size=PACK_SIZE)
    world.backup(make_source(tmp_path / "source", big=100_000))
    listed = json.loads(world.ok("peer", "list", "--json").stdout)
    peer = listed[0]
    message = world.error("peer", "remove", peer["peer_id"])
    assert message == (
        f"peer {peer['peer_id']} holds {peer['shards']} shards of this home's packs that no "
        f"other peer could take; `peer remove --force {peer['peer_id']}` forgets them, "
        "leaving those packs less redundant"
    )
    result = world.ok("peer", "remove", "--force", peer["peer_id"])
    assert result.lines[:2] == [
        f"removed peer {peer['peer_id']}",
        f"forgot {peer['shards']} shards it held",
    ]
    # Every pack had a shard on each of the 4 folders.
    assert (
        result.lines[2] == f"{peer['shards']} packs now have fewer than N shards (less redundant)"
    )
    assert len(result.lines) == 3
    # Forgotten, not deleted: they may be the last copies.
    assert shard_files(Path(peer["location"]))


# -- the whole story with real nodes ------------------------------------------------


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for offset in range(0, len(data), 4096):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def hosted_shard_files(home: Path) -> list[Path]:
    return sorted(p for p in (home / "hosted" / "shards").rglob("*") if p.is_file())


@pytest.mark.slow
async def test_thirteen_nodes_lose_five_repair_and_survive_three_more(tmp_path: Path) -> None:
    # Small packs, so that a few MB make several of them.
    config = attrs.evolve(operations.default_config(4, 10), pack_size=PACK_SIZE)
    root = tmp_path / "net"
    source = make_source(tmp_path / "source", big=3_000_000)
    before = tree_state(source)
    async with open_devnet(root, 13, config=config) as devnet:
        owner = devnet.nodes[0]
        home = owner.home.path

        async def cli(*args: str | os.PathLike[str]) -> str:
            result = await trio.to_thread.run_sync(lambda: cli_ok(*args, home=home))
            return result.stdout

        out = await cli("backup", source)
        assert "(4-of-10 shards" in out, out
        others = devnet.nodes[1:]
        holders = [n for n in others if hosted_shard_files(n.home.path)]
        assert len(holders) == 12
        rng = random.Random(5)
        dead, rotten, halved, healthy = others[:3], others[3], others[4], others[5:]
        for node in dead:
            await devnet.kill(node.index)
        for path in hosted_shard_files(rotten.home.path):
            corrupt(path)
        files = hosted_shard_files(halved.home.path)
        for path in rng.sample(files, len(files) // 2):
            path.unlink()

        result = await trio.to_thread.run_sync(
            lambda: run_cli("repair", "--grace", "0", "--json", home=home, timeout=300)
        )
        assert result.returncode == 0, str(result)
        report = json.loads(result.stdout)
        assert report["ok"] and report["packs_unrecoverable"] == 0
        # The corrupt and deleted shards are found by the audits or the read-back.
        found = report["shards_failed"] + report["audit"]["failed"]
        assert report["shards_rebuilt"] > 0 and found > 0
        # 9 nodes answer: every pack is back at r = 7 healthy shards or more.
        assert report["min_healthy"] >= 7, report
        assert report["packs_limited_by_peers"] == 0, report

        for node in healthy[:3]:
            await devnet.kill(node.index)
        target = tmp_path / "restored"
        await cli("restore", "latest", "--target", target)
        assert tree_state(restored(target, source)) == before
