"""Reciprocity between friends: what each node offers, where shards go when a
friend is full, and the balance ``status`` shows.

In process, a node whose room shrank after the owner asked refuses a shard
over the real protocol; the owner puts it on a spare and asks that node
nothing more. Through the CLI, with real ``serve`` processes, a friend whose
``config.toml`` gives each peer little room gets no more than that, the
backup says so, and ``status --json`` shows its offer and the balance.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import attrs
import pytest
import trio

from p2pbackup.app import operations
from p2pbackup.app.home import Home
from p2pbackup.core import packer
from p2pbackup.engine.progress import human_bytes
from p2pbackup.model import BlobType, BytesLike
from p2pbackup.net.memory import LinkProfile, MemoryNetwork
from p2pbackup.net.network import Address
from p2pbackup.node.shardhost import usage_by_owner
from p2pbackup.stores.remote import RemoteShardStore
from p2pbackup.stores.shardstore import ShardRoot
from p2pbackup.wire.session import Identity

from .cli_helpers import cli_ok, make_source
from .engine_helpers import SMALL
from .net_helpers import start_node
from .test_network_e2e import ServeProcess, new_node

PORT = 47470
KIB = 1024


def data_pack(rng: random.Random, size: int) -> packer.PackBuilder:
    builder = packer.PackBuilder(SMALL.pack_size)
    builder.add(BlobType.DATA, rng.randbytes(32), rng.randbytes(size), size)
    return builder


async def test_a_friend_that_refuses_as_full_is_asked_nothing_more(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = MemoryNetwork(seed=5, default_link=LinkProfile(latency=0.0005))
    # Alike in room (so the friend is among each pack's first four most of
    # the time), all far above what the packs below need.
    limit = 4 << 20
    nodes = [
        await start_node(
            nursery,
            world.interface(f"node{i}"),
            tmp_path / f"node{i}",
            name=f"node{i}",
            listen=Address(f"node{i}", PORT),
            owner_quota=limit if i == 0 else None,
            capacity=None if i == 0 else limit,
        )
        for i in range(5)
    ]
    friend = nodes[0]
    friend_id = friend.identity.node_id.hex()
    home = Home(tmp_path / "home")
    operations.init_home(home, attrs.evolve(SMALL, k=2, n=4))  # five peers: one spare
    network = world.interface("owner")
    rng = random.Random(7)
    async with operations.open_repository(home, network=network) as repo:
        for node in nodes:
            await operations.add_node_peer(repo, str(node.address), node.identity.node_id.hex())
        space = (await repo.probe_peers())[friend_id].space
        assert space is not None and space.room == limit - friend.host.usage(home.node_id())
        # Meanwhile the owner's quota there fills up (another of its machines,
        # say): the offer it was given is out of date.
        elsewhere = RemoteShardStore(
            world.interface("elsewhere"),
            Identity.from_keyring(repo.keyring),
            friend.address,
            friend.identity.node_id,
        )
        left = friend.host.charge.largest(limit - friend.host.usage(home.node_id()))
        await elsewhere.put(bytes(32), bytes(left - KIB))
        await elsewhere.aclose()

        store = repo.store(friend_id)
        real_put = store.put
        puts = 0

        async def counted(shard_id: bytes, data: BytesLike, root: ShardRoot | None = None) -> None:
            nonlocal puts
            puts += 1
            await real_put(shard_id, data, root)

        monkeypatch.setattr(store, "put", counted)
        records = [await repo.write_pack(data_pack(rng, 64 * KIB)) for _ in range(12)]

    assert puts == 1  # refused once, then never asked again
    reason = repo.full_peers()[friend_id]
    assert "refused PutShard" in reason and f"its quota is {limit} bytes" in reason
    for record in records:
        # Every pack has its four shards, none on the full friend after the
        # refusal: the refused one went to the spare.
        assert len({s.peer_id for s in record.shards}) == record.n == 4
        assert friend_id not in {s.peer_id for s in record.shards}
    assert friend.host.usage(home.node_id()) <= limit


@pytest.mark.slow
def test_a_friend_with_little_room_gets_no_more_and_status_shows_the_balance(
    tmp_path: Path,
) -> None:
    # Alice backs up to four friends; Bob's config gives each peer 100 KiB,
    # less than one of her data shards (a 256 KiB pack, 2-of-3: 128 KiB).
    alice_root = tmp_path / "alice"
    alice_home = alice_root / "home"
    operations.init_home(Home(alice_home), attrs.evolve(SMALL, k=2, n=3))
    alice = ServeProcess(alice_home, Home(alice_home).node_id().hex())
    bob, carol, dave, erin = (
        new_node(tmp_path / name) for name in ("bob", "carol", "dave", "erin")
    )
    per_friend = 100 * KIB
    (bob.home / "config.toml").write_text('version = 1\n[storage]\nper_friend = "100K"\n')
    nodes = [alice, bob, carol, dave, erin]
    try:
        alice.start(open_mode=False)  # stores for its friends only
        for other in nodes[1:]:
            other.start()
        codes = {node.node_id: operations.make_invite(Home(node.home), ()) for node in nodes}
        for other in nodes[1:]:
            cli_ok("friend", "add", codes[other.node_id], home=alice.home)
        # Bob backs up to Alice (and two folders), so she holds bytes for him.
        cli_ok("friend", "add", codes[alice.node_id], home=bob.home)
        for name in ("f1", "f2"):
            (tmp_path / "bob" / name).mkdir()
            cli_ok("peer", "add-dir", tmp_path / "bob" / name, home=bob.home)
        bob_source = tmp_path / "bob" / "source"
        bob_source.mkdir()
        (bob_source / "letter").write_bytes(random.Random(3).randbytes(60 * KIB))
        cli_ok("backup", bob_source, home=bob.home)

        result = cli_ok("backup", make_source(alice_root / "source"), home=alice.home)
        warning = f"warning: peer {bob.node_id} is full, its shards went to other peers: "
        [line] = [line for line in result.lines if line.startswith(warning)]
        assert "no room for a shard of" in line or "quota" in line
        assert "(2-of-3 shards)" in result.stdout  # no code adapted: the others had room

        # No shard of Alice's on Bob beyond what he offers her.
        held_by_bob = usage_by_owner(bob.home / "hosted").get(bytes.fromhex(alice.node_id), 0)
        assert held_by_bob <= per_friend

        report = json.loads(cli_ok("status", "--json", home=alice.home).stdout)
        peers = {peer["peer_id"]: peer for peer in report["peers"]}
        assert set(peers) == {node.node_id for node in nodes[1:]}
        assert all(peer["online"] and peer["is_friend"] for peer in peers.values())
        on_bob = peers[bob.node_id]
        assert on_bob["offered"] == per_friend  # its per-friend quota binds
        assert 0 <= on_bob["room"] < per_friend - held_by_bob + 1
        kept_for_bob = usage_by_owner(alice.home / "hosted")[bytes.fromhex(bob.node_id)]
        assert on_bob["bytes_we_hold_for_it"] == kept_for_bob > 0
        assert on_bob["bytes_held_for_us"] == held_by_bob
        assert on_bob["balance"] == held_by_bob - kept_for_bob
        for other in (carol, dave, erin):
            assert peers[other.node_id]["balance"] == peers[other.node_id]["bytes_held_for_us"]
            assert peers[other.node_id]["room"] > per_friend  # the disk: far more
        text = cli_ok("status", home=alice.home).stdout
        balance = on_bob["balance"]
        shown = (
            f"it keeps {human_bytes(balance)} more for us than we for it"
            if balance > 0
            else f"we keep {human_bytes(-balance)} more for it than it for us"
        )
        assert balance != 0 and f"balance: {shown}; offers us 100.0 KiB (" in text
    finally:
        errors = [node.stop() for node in nodes]
    assert all("Traceback" not in err for err in errors), errors
