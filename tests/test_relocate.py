"""A friend whose address changed is found again through the DHT.

Real ``daemon.serve`` (storage server and DHT) for two friends on the memory
network; the owner backs up to them, one friend comes back at a new address,
and the next backup finds it there through a read-only DHT lookup, with the
new address remembered in the index. A wrong node at the old address never
gets a shard.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import pytest
import trio

from p2pbackup.app import daemon, homedht, operations
from p2pbackup.app.home import Home
from p2pbackup.dht import discovery
from p2pbackup.engine.backup import Backup
from p2pbackup.errors import StoreError
from p2pbackup.net.memory import LinkProfile, MemoryNetwork
from p2pbackup.net.network import Address

from .engine_helpers import SMALL, make_tree

PORT = 47470


@attrs.define
class Friend:
    home: Home
    host: str
    scope: trio.CancelScope | None = None
    serving: daemon.Serving | None = None


async def start(
    nursery: trio.Nursery,
    world: MemoryNetwork,
    friend: Friend,
    bootstrap: tuple[Address, ...],
    *,
    open_mode: bool = False,
) -> None:
    async def run(task_status: trio.TaskStatus[daemon.Serving]) -> None:
        with trio.CancelScope() as scope:
            friend.scope = scope
            await daemon.serve(
                friend.home,
                daemon.ServeOptions(
                    listen=Address(friend.host, PORT), bootstrap=bootstrap, open=open_mode
                ),
                network=world.interface(friend.host),
                task_status=task_status,
            )

    friend.serving = await nursery.start(run)


async def bob_and_carol(
    tmp_path: Path, nursery: trio.Nursery, seed: int
) -> tuple[MemoryNetwork, Friend, Friend]:
    """A world with two friends serving: Bob, and Carol who joined through him."""
    world = MemoryNetwork(seed=seed, default_link=LinkProfile(latency=0.001), connect_timeout=0.5)
    bob = Friend(Home(tmp_path / "bob"), "bob-home")
    carol = Friend(Home(tmp_path / "carol"), "carol-home")
    for friend in (bob, carol):
        operations.init_home(friend.home, SMALL)
    await start(nursery, world, bob, ())
    await start(nursery, world, carol, (Address(bob.host, PORT),))
    return world, bob, carol


async def befriend(world: MemoryNetwork, owner: Home, friends: list[Friend]) -> None:
    """Friendship both ways: each friend stores only for homes it added."""
    owner_code = operations.make_invite(owner, ["owner-home:47470"])
    for friend in friends:
        async with operations.open_repository(
            friend.home, network=world.interface(friend.host)
        ) as repo:
            await operations.add_friend(repo, owner_code)
    async with operations.open_repository(owner, network=world.interface("owner-home")) as repo:
        for friend in friends:
            added = await operations.add_friend(repo, operations.make_invite(friend.home))
            assert added.reached


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 10) -> None:
    with trio.fail_after(seconds):
        while not await check():
            await trio.sleep(0.05)


async def test_a_friend_that_moved_is_found_through_the_dht(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    world, bob, carol = await bob_and_carol(tmp_path, nursery, seed=3)

    alice = Home(tmp_path / "alice")
    operations.init_home(alice, attrs.evolve(SMALL, k=1, n=2))
    network = world.interface("owner-home")
    await befriend(world, alice, [bob, carol])
    async with operations.open_repository(alice, network=network) as repo:
        await Backup(repo).run([make_tree(tmp_path / "tree1")])
    bob_id = bob.home.node_id().hex()

    # Bob's router gives him a new address; his node comes back there.
    assert bob.scope is not None
    bob.scope.cancel()
    await trio.sleep(0.1)
    bob.host = "bob-new-address"
    await start(nursery, world, bob, (Address(carol.host, PORT),))

    async def published() -> bool:
        found = await discovery.lookup_contact(
            homedht.remembered(alice),
            bytes.fromhex(bob_id),
            bootstrap=[Address(carol.host, PORT)],
            network=network,
        )
        return found is not None and found.addresses[0].host == bob.host

    await eventually(published)

    async with operations.open_repository(alice, network=network) as repo:
        await Backup(repo).run([make_tree(tmp_path / "tree2", seed=2)])
        peer = next(p for p in repo.peers() if p.peer_id == bob_id)
        assert peer.location == f"{bob.host}:{PORT}"
        friend = repo.index.friend(bytes.fromhex(bob_id))
        assert friend is not None and friend.addresses[0] == f"{bob.host}:{PORT}"
        # Every pack of the second backup has a shard on Bob, at his new address.
        counts = repo.index.shard_count_by_peer()
        assert counts[bob_id] > 0
    assert sorted((bob.home.hosted_path / "shards").rglob("*"))  # he holds them


async def test_a_wrong_node_at_the_old_address_gets_nothing(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    world, bob, carol = await bob_and_carol(tmp_path, nursery, seed=4)
    mallory = Friend(Home(tmp_path / "mallory"), "bob-home")  # Bob's old address
    operations.init_home(mallory.home, SMALL)
    alice = Home(tmp_path / "alice")
    operations.init_home(alice, attrs.evolve(SMALL, k=1, n=2))
    network = world.interface("owner-home")
    await befriend(world, alice, [bob, carol])

    assert bob.scope is not None
    bob.scope.cancel()
    await trio.sleep(0.1)
    # Mallory would store for anyone: only the handshake keeps shards from her.
    await start(nursery, world, mallory, (Address(carol.host, PORT),), open_mode=True)
    bob.host = "bob-new-address"
    await start(nursery, world, bob, (Address(carol.host, PORT),))
    await trio.sleep(1)

    async with operations.open_repository(alice, network=network) as repo:
        await Backup(repo).run([make_tree(tmp_path / "tree")])
        bob_id = bob.home.node_id().hex()
        assert next(p for p in repo.peers() if p.peer_id == bob_id).location.startswith(
            "bob-new-address:"
        )
    assert not list((mallory.home.hosted_path / "shards").rglob("*"))


async def test_a_node_stores_only_for_its_friends_unless_open(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    world = MemoryNetwork(seed=5, default_link=LinkProfile(latency=0.001), connect_timeout=0.5)
    bob = Friend(Home(tmp_path / "bob"), "bob-home")
    operations.init_home(bob.home, SMALL)
    await start(nursery, world, bob, ())
    alice = Home(tmp_path / "alice")
    operations.init_home(alice, attrs.evolve(SMALL, k=1, n=2))
    network = world.interface("owner-home")
    async with operations.open_repository(alice, network=network) as repo:
        # Alice adds Bob; Bob has not added Alice.
        await operations.add_friend(repo, operations.make_invite(bob.home))
        store = repo.store(bob.home.node_id().hex())
        with pytest.raises(StoreError, match="stores only for its friends") as refused:
            await store.put(bytes(32), b"shard")
        assert alice.node_id().hex() in str(refused.value)
        assert await store.usage() == 0  # reading her own (nothing) is fine

    # Bob adds Alice while his node runs: her next put is taken at once.
    async with operations.open_repository(bob.home, network=world.interface("bob-home")) as repo:
        await operations.add_friend(repo, operations.make_invite(alice, ["owner-home:47470"]))
    await trio.sleep(daemon.FriendGate.REREAD_AFTER_MISS)
    async with operations.open_repository(alice, network=network) as repo:
        await repo.store(bob.home.node_id().hex()).put(bytes(32), b"shard")
    assert list((bob.home.hosted_path / "shards").rglob("*"))


async def test_recover_brings_the_friend_list_back(tmp_path: Path, nursery: trio.Nursery) -> None:
    world, bob, carol = await bob_and_carol(tmp_path, nursery, seed=6)
    alice = Home(tmp_path / "alice")
    key = operations.init_home(alice, attrs.evolve(SMALL, k=1, n=2))
    network = world.interface("owner-home")
    await befriend(world, alice, [bob, carol])
    async with operations.open_repository(alice, network=network) as repo:
        await Backup(repo).run([make_tree(tmp_path / "tree")])
        friends_before = repo.index.friends()
    assert len(friends_before) == 2

    # A new machine: the key and one friend's address are all there is.
    fresh = Home(tmp_path / "new-alice")
    summary = await operations.recover(
        fresh, key, [], [(f"{bob.host}:{PORT}", bob.home.node_id().hex())], network=network
    )
    assert summary.packs_restorable == summary.packs
    async with operations.open_repository(fresh, network=network) as repo:
        assert repo.index.friends() == friends_before
        # Carol, never named to recover, is a peer again and answers as herself.
        assert await repo.store(carol.home.node_id().hex()).usage() > 0
