"""Leases on the host, forgetting an owner, and the leaving notice.

The host never collects a friend's shards, collects a stranger's once its
lease has run out, and grants a stranger no more than its longest lease; an
owner deletes everything it keeps on a host in one signed request; a host
tells an owner it is leaving, and the owner's server records it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from p2pbackup.core import crypto, merkle
from p2pbackup.errors import StoreError
from p2pbackup.net.memory import LinkProfile, MemoryNetwork
from p2pbackup.net.network import Address
from p2pbackup.node.server import STRANGER_LEASE_SECONDS, StorageServer
from p2pbackup.node.shardhost import ShardHost
from p2pbackup.stores.folder import FolderShardStore, init_folder_peer
from p2pbackup.stores.remote import RemoteShardStore
from p2pbackup.wire import messages
from p2pbackup.wire.messages import MAX_LEASE_SECONDS

from .net_helpers import identity
from .storage_conformance import shard_id

T0 = 1_800_000_000
DAY = 86400
FRIEND = identity("friend")
STRANGER = identity("stranger")
HOST = identity("host")


class Clock:
    def __init__(self) -> None:
        self.now = float(T0)

    def __call__(self) -> float:
        return self.now


def put(host: ShardHost, owner: bytes, n: int, lease: int) -> int:
    data = bytes([n]) * 100
    upload = host.begin_put(owner, shard_id(n), 100, 4096, merkle.merkle_root(data, 4096), lease)
    assert upload is not None
    upload.write(data)
    return upload.commit()


def test_a_friends_expired_shards_are_never_collected_a_strangers_are(tmp_path: Path) -> None:
    clock = Clock()
    host = ShardHost.open(tmp_path / "hosted", clock=clock)
    friend, stranger = FRIEND.node_id, STRANGER.node_id
    put(host, friend, 1, DAY)
    put(host, stranger, 2, DAY)
    clock.now += 2 * DAY
    assert host.collect_expired(spare={friend}) == 1
    assert host.has(friend, shard_id(1)) and not host.has(stranger, shard_id(2))
    host.close()
    # Reopening collects too, and spares the friends it is told of.
    host = ShardHost.open(tmp_path / "hosted", clock=clock, spare={friend})
    assert host.reconcile_report.expired == 0 and host.has(friend, shard_id(1))
    # No longer a friend: its shard goes once its lease has run out.
    assert host.collect_expired() == 1
    assert not host.has(friend, shard_id(1))
    host.close()


def test_forgetting_an_owner_deletes_its_shards_and_root_and_no_one_elses(
    tmp_path: Path,
) -> None:
    host = ShardHost.open(tmp_path / "hosted", clock=Clock())
    for n in range(5):
        put(host, FRIEND.node_id, n, DAY)
    put(host, STRANGER.node_id, 9, DAY)
    host.put_root(FRIEND.node_id, b"root record")
    assert host.delete_owner(FRIEND.node_id) == (5, True)
    assert host.list(FRIEND.node_id) == ([], False)
    assert host.get_root(FRIEND.node_id) is None and host.usage(FRIEND.node_id) == 0
    assert not (tmp_path / "hosted" / "shards" / FRIEND.node_id.hex()).exists()
    assert host.has(STRANGER.node_id, shard_id(9))
    assert host.delete_owner(FRIEND.node_id) == (0, False)
    host.close()


async def test_a_folder_peer_forgets_its_owner(tmp_path: Path) -> None:
    init_folder_peer(tmp_path / "disk")
    store = await FolderShardStore.open(tmp_path / "disk", FRIEND.node_id)
    other = await FolderShardStore.open(tmp_path / "disk", STRANGER.node_id)
    for n in range(3):
        await store.put(shard_id(n), b"shard %d" % n)
    await other.put(shard_id(7), b"not ours")
    await store.put_root(b"root")
    assert await store.delete_all() == (3, True)
    assert await store.list() == [] and await store.get_root() is None
    assert await other.list() == [shard_id(7)]


async def serve(
    tmp_path: Path, nursery: trio.Nursery, world: MemoryNetwork, **kwargs: object
) -> tuple[ShardHost, StorageServer, Address]:
    host = ShardHost.open(tmp_path / "hosted")
    server = StorageServer(host, HOST, **kwargs)  # type: ignore[arg-type]
    address = await nursery.start(
        world.interface("host").serve, Address("host", 1), server.handle_connection
    )
    return host, server, address


def client(world: MemoryNetwork, who: str, address: Address) -> RemoteShardStore:
    return RemoteShardStore(
        world.interface(who), identity(who), address, HOST.node_id, connect_timeout=1.0
    )


async def test_a_stranger_is_granted_a_bounded_lease_a_friend_the_one_it_asks(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    world = MemoryNetwork(seed=1, default_link=LinkProfile(latency=0.001))
    _host, _server, address = await serve(
        tmp_path, nursery, world, friends=lambda node: node == FRIEND.node_id
    )
    friend = client(world, "friend", address)
    stranger = client(world, "stranger", address)
    for store in (friend, stranger):
        store.lease_seconds = MAX_LEASE_SECONDS
    friend_expiry = await friend.put(shard_id(1), b"a friend's")
    stranger_expiry = await stranger.put(shard_id(1), b"a stranger's")
    assert friend_expiry - stranger_expiry >= MAX_LEASE_SECONDS - STRANGER_LEASE_SECONDS - 5
    renewed, _missing = await stranger.renew([shard_id(1)], MAX_LEASE_SECONDS)
    assert renewed - stranger_expiry <= 5  # still the stranger's longest
    renewed, _missing = await friend.renew([shard_id(1)], MAX_LEASE_SECONDS)
    assert renewed - friend_expiry <= 5


async def test_delete_all_over_the_wire_needs_the_owners_signature(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    world = MemoryNetwork(seed=2, default_link=LinkProfile(latency=0.001))
    host, _server, address = await serve(tmp_path, nursery, world)
    owner = client(world, "friend", address)
    for n in range(3):
        await owner.put(shard_id(n), b"x%d" % n)
    await owner.put_root(b"root")
    # Another owner's signature does not do: the statement names the host,
    # the session names the owner.
    forged = crypto.sign(STRANGER.signing_seed, messages.delete_all_statement(HOST.node_id))
    with pytest.raises(StoreError, match="signature does not verify"):
        await owner._request(messages.DeleteAll(forged), messages.AllDeleted)
    assert await owner.delete_all() == (3, True)
    assert host.list(FRIEND.node_id) == ([], False) and host.get_root(FRIEND.node_id) is None


async def test_a_leaving_notice_reaches_the_owners_callback(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    world = MemoryNetwork(seed=3, default_link=LinkProfile(latency=0.001))
    noticed: list[bytes] = []

    def leaving(node_id: bytes) -> bool:
        noticed.append(node_id)
        return node_id == FRIEND.node_id

    _host, _server, address = await serve(tmp_path, nursery, world, leaving=leaving)
    assert await client(world, "friend", address).notify_leaving()
    assert not await client(world, "stranger", address).notify_leaving()
    assert noticed == [FRIEND.node_id, STRANGER.node_id]


async def test_a_server_without_a_record_of_leaving_peers_refuses_the_notice(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    world = MemoryNetwork(seed=4, default_link=LinkProfile(latency=0.001))
    _host, _server, address = await serve(tmp_path, nursery, world)
    with pytest.raises(StoreError, match="keeps no record of leaving peers"):
        await client(world, "friend", address).notify_leaving()
