"""A friend keeps a home's backups alive while the home is gone.

Real ``serve`` processes on loopback (a devnet: every node a friend of every
other), driven through the CLI: the owner's node is killed, then three of its
peers; its delegate repairs for it (``repair --for OWNER --grace 0``); three
more peers are killed; the owner recovers on a new home from its recovery
key and the delegate's invite code, and restores every byte.

The numbers make the delegate's repair what saves the backup: k/n = 2/5 on
eight peers, and the six peers killed include more than n - k = 3 of the
first holders of one pack (checked), so that without the repair that pack
would be gone.
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
import trio

from p2pbackup.app import operations
from p2pbackup.app.devnet import Devnet, DevnetNode, open_devnet
from p2pbackup.core import delegation, formats

from .cli_helpers import cli_ok, make_source, restored, run_cli, tree_state
from .test_delegate_cli import held_grants

pytestmark = pytest.mark.slow

K, N = 2, 5
#: The owner, its delegate and seven more peers.
NODES = 9


def owner_shards(node: DevnetNode, owner: str) -> set[bytes]:
    """The shard ids ``node`` holds for ``owner`` (its hosted files)."""
    folder = node.home.path / "hosted" / "shards" / owner
    return {bytes.fromhex(p.name) for p in folder.glob("*/*") if len(p.name) == 64}


def holders(devnet: Devnet, alive: set[int], owner: str, pack_id: bytes) -> dict[int, int]:
    """Which live node holds which shard of the pack: shard index -> node index."""
    ids = {formats.shard_id(pack_id, i): i for i in range(N)}
    found = {}
    for index in sorted(alive):
        for shard in owner_shards(devnet.nodes[index], owner) & ids.keys():
            found[ids[shard]] = index
    return found


async def cli(home: Path, *args: str | Path) -> list[str]:
    result = await trio.to_thread.run_sync(lambda: cli_ok(*args, home=home, timeout=180))
    return result.lines


async def test_a_delegate_repairs_while_the_owner_is_gone_and_it_recovers(
    tmp_path: Path,
) -> None:
    config = attrs.evolve(operations.default_config(K, N), pack_size=256 * 1024)
    source = make_source(tmp_path / "source", big=600_000)
    before = tree_state(source)
    async with open_devnet(tmp_path / "net", NODES, config=config) as devnet:
        owner, friend = devnet.nodes[0], devnet.nodes[1]
        home = owner.home.path
        await cli(home, "delegate", "add", friend.node_id)
        snapshot = (await cli(home, "backup", source))[-1]
        _sequence, grant_data, _certificate = held_grants(friend.home.path)[
            bytes.fromhex(owner.node_id)
        ]
        grant = delegation.open_grant(grant_data, owner=bytes.fromhex(owner.node_id))
        assert len(grant.packs) >= 3  # data packs and an index pack
        alive = set(range(1, NODES))

        # The owner's machine dies; so do three peers holding one pack.
        await devnet.kill(owner.index)
        target = grant.packs[0].pack_id
        first = holders(devnet, alive, owner.node_id, target)
        assert len(first) == N
        gone = [i for i in first.values() if i != friend.index][:3]
        for index in gone:
            await devnet.kill(index)
            alive.discard(index)

        # The delegate rebuilds the missing shards on the owner's other peers.
        forced = ("repair", "--for", owner.node_id, "--grace", "0", "--json")
        result = await trio.to_thread.run_sync(
            lambda: run_cli(*forced, home=friend.home.path, timeout=180)
        )
        assert result.returncode == 0, str(result)
        report = json.loads(result.stdout)
        assert report["ok"] and report["shards_rebuilt"] >= 3, report
        assert len(holders(devnet, alive, owner.node_id, target)) == N

        # Three more peers die: first the pack's first holders still alive.
        now = holders(devnet, alive, owner.node_id, target)
        original = [i for i in first.values() if i in alive and i != friend.index]
        rebuilt = [i for i in now.values() if i not in first.values() and i != friend.index]
        more = (original + rebuilt)[:3]
        assert len(more) == 3
        for index in more:
            await devnet.kill(index)
            alive.discard(index)
        # Without the repair, more than n - k of its first holders are gone.
        lost = [i for i in first.values() if i not in alive]
        assert len(lost) > N - K
        # With it, every pack keeps k shards on the two nodes left.
        for pack in grant.packs:
            assert len(holders(devnet, alive, owner.node_id, pack.pack_id)) >= K

        # The owner recovers on a new machine from its key and a friend's code.
        fresh = tmp_path / "new-home"
        key = ("--recovery-key-file", owner.key_file)
        out = await cli(fresh, "recover", *key, "--friend", friend.invite, "--json")
        summary = json.loads("\n".join(out))
        assert summary["delegated_moves"] > 0, summary
        assert summary["packs_restorable"] == summary["packs"] > 0, summary
        assert [row.split()[0] for row in await cli(fresh, "delegate", "list")] == [friend.node_id]
        restore_to = tmp_path / "restored"
        await cli(fresh, "restore", snapshot, "--target", restore_to)
        assert tree_state(restored(restore_to, source)) == before
