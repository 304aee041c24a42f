"""``p2pbackup leave`` and ``prune`` through the command line, with real ``serve`` processes.

A devnet of five homes, all friends, 2-of-3. The first leaves: every peer
deletes all its shards and its root record, and an owner it stored for gets
the notice; that owner's ``repair`` moves its shards off the leaving node,
which then holds nothing of it. Before that, ``forget`` and ``prune`` take
the dead packs' files off the peers' disks at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import attrs
import pytest
import trio

from p2pbackup.app import operations
from p2pbackup.app.devnet import DevnetNode, open_devnet

from .cli_helpers import cli_ok, make_source

PACK_SIZE = 128 * 1024


def hosted_files(node: DevnetNode, owner: DevnetNode) -> list[Path]:
    """The files ``node`` keeps for ``owner``: its shards and root record."""
    hosted = node.home.path / "hosted"
    shards = [p for p in (hosted / "shards" / owner.node_id).rglob("*") if p.is_file()]
    root = hosted / "roots" / owner.node_id
    return shards + ([root] if root.exists() else [])


@pytest.mark.slow
async def test_prune_and_leave_empty_the_peers_and_the_owners_move_away(tmp_path: Path) -> None:
    config = attrs.evolve(operations.default_config(2, 3), pack_size=PACK_SIZE)
    source = make_source(tmp_path / "source", big=400_000)
    async with open_devnet(tmp_path / "net", 5, config=config) as devnet:
        leaver, owner, *others = devnet.nodes

        async def cli(node: DevnetNode, *args: str | os.PathLike[str]) -> str:
            result = await trio.to_thread.run_sync(
                lambda: cli_ok(*args, home=node.home.path, timeout=300)
            )
            return result.stdout

        async def shards_on(node: DevnetNode, holder: DevnetNode) -> int:
            peers = json.loads(await cli(node, "peer", "list", "--json"))
            return sum(p["shards"] for p in peers if p["peer_id"] == holder.node_id)

        await cli(owner, "backup", source)
        # Two snapshots of the leaver's, the first forgotten and pruned: the
        # peers keep exactly the shards its index still places on them.
        await cli(leaver, "backup", make_source(tmp_path / "old", seed=2, big=300_000))
        await cli(leaver, "backup", source)
        first = json.loads(await cli(leaver, "snapshots", "--json"))[0]
        await cli(leaver, "forget", first["id"])
        pruned = json.loads(await cli(leaver, "prune", "--json"))
        assert pruned["shards_deleted"] > 0, pruned
        for node in (owner, *others):
            shards = [p for p in hosted_files(node, leaver) if p.parent.name != "roots"]
            assert len(shards) == await shards_on(leaver, node), node.name
        held_for_owner = [p for p in hosted_files(leaver, owner) if p.parent.name != "roots"]
        assert held_for_owner

        report = json.loads(await cli(leaver, "leave", "--json"))
        assert report["ok"], report
        assert {p["peer_id"] for p in report["peers"]} == {n.node_id for n in (owner, *others)}
        assert all(p["shards"] > 0 and p["root"] and not p["problem"] for p in report["peers"])
        for node in (owner, *others):
            assert hosted_files(node, leaver) == [], node.name
        told = {o["node_id"]: o["known"] for o in report["owners"]}
        assert told[owner.node_id] is True
        # In words, too: each peer and owner on a line, then what to do next.
        again = await cli(leaver, "leave")
        assert f"peer {owner.node_id}: deleted 0 shards" in again
        assert f"owner {owner.node_id}: told; it will move its shards off this node" in again
        assert "keep `p2pbackup serve` running until these owners have moved" in again

        status = await cli(owner, "status")
        assert "LEAVING the network since" in status
        before = await shards_on(owner, leaver)
        assert before > 0
        repaired = json.loads(await cli(owner, "repair", "--json"))
        assert repaired["ok"] and repaired["shards_rebuilt"] >= before, repaired
        assert await shards_on(owner, leaver) == 0
        # Asked to delete the copies it no longer needs to keep.
        assert [p for p in hosted_files(leaver, owner) if p.parent.name != "roots"] == []
