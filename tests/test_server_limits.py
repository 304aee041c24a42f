"""A storage node under abuse: floods of connections and strangers, trickling
uploads, downloads nobody reads, a friend that was removed.

A live StorageServer over loopback TCP in this process; the abusers are raw
connections and sessions. Every flood is bounded in count and time, goes only
to 127.0.0.1, and ends with the test.
"""

from __future__ import annotations

import logging
import os
import socket
import tracemalloc
from pathlib import Path

import pytest
import trio

from p2pbackup.errors import StoreError, StoreFullError
from p2pbackup.net.network import TcpNetwork
from p2pbackup.node.server import ServerLimits, StorageServer
from p2pbackup.node.shardhost import ShardHost
from p2pbackup.stores.remote import RemoteShardStore
from p2pbackup.wire import messages
from p2pbackup.wire.session import Identity, secure_initiator

from .net_helpers import BYTES_ONLY, LOOPBACK_ANY_PORT, RunningNode, identity, start_node
from .storage_conformance import shard_id
from .test_remote import OWNER, STRANGER, raw_session, signed_put

FRIEND = OWNER
DEFAULT_LIMITS = ServerLimits()


async def gated_node(
    nursery: trio.Nursery,
    root: Path,
    friends: set[bytes],
    limits: ServerLimits = DEFAULT_LIMITS,
) -> RunningNode:
    """A friends-only node: it stores for the node ids in ``friends`` (read at each ask)."""
    host = ShardHost.open(root)
    node_identity = identity("gated node")
    server = StorageServer(
        host, node_identity, limits=limits, admits=lambda node_id: node_id in friends
    )
    address = await nursery.start(TcpNetwork().serve, LOOPBACK_ANY_PORT, server.handle_connection)
    return RunningNode(node_identity, address, host, server)


# -- item: a removed friend ------------------------------------------------------------


async def test_a_node_no_longer_a_friend_cannot_renew_its_leases(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    friends = {FRIEND.node_id}
    node = await gated_node(nursery, tmp_path / "node", friends)
    store = node.client(TcpNetwork(), FRIEND)
    await store.put(shard_id(1), b"kept for a friend")
    _expiry, missing = await store.renew([shard_id(1)], 7200)
    assert missing == []
    friends.clear()  # `friend remove`
    with pytest.raises(StoreError, match="stores only for its friends"):
        await store.renew([shard_id(1)], 7200)
    # What it has, it may still read, list and delete.
    assert await store.get(shard_id(1)) == b"kept for a friend"
    assert await store.list() == [shard_id(1)]
    await store.delete(shard_id(1))
    await store.aclose()


# -- item: holding room without sending ------------------------------------------------


async def test_a_trickling_upload_loses_the_room_it_reserved(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    network = TcpNetwork()
    limits = ServerLimits(transfer=0.5, min_upload_rate=1000)
    node = await start_node(
        nursery, network, tmp_path / "node", capacity=150_000, charge=BYTES_ONLY, limits=limits
    )
    trickler = await raw_session(network, node, STRANGER)
    await trickler.send(signed_put(node, STRANGER, shard_id(1), bytes(100_000)))
    assert isinstance(await trickler.receive(), messages.Ready)
    honest = node.client(network, OWNER)
    with pytest.raises(StoreFullError, match="100000 reserved by uploads in progress"):
        await honest.put(shard_id(2), bytes(100_000))

    async def trickle() -> None:
        # One byte every 0.3 s: each piece well within the 0.5 s a piece may
        # take, but far below 1000 bytes a second. At most 30 of them.
        try:
            for _ in range(30):
                await trickler.send_piece(b"x")
                await trio.sleep(0.3)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    started = trio.current_time()
    async with trio.open_nursery() as trickling:
        trickling.start_soon(trickle)
        with trio.fail_after(5):
            while node.host.space(OWNER.node_id) != (0, 150_000):
                await trio.sleep(0.05)
        trickling.cancel_scope.cancel()
    # The line: 0.5 s, then 1000 bytes a second; a few bytes had come.
    assert trio.current_time() - started < 2
    await honest.put(shard_id(2), bytes(100_000))  # the room is free again
    await honest.aclose()
    await trio.aclose_forcefully(trickler.stream)


async def test_an_upload_at_the_minimum_rate_is_stored(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    network = TcpNetwork()
    limits = ServerLimits(transfer=0.3, min_upload_rate=20_000)
    node = await start_node(nursery, network, tmp_path / "node", limits=limits)
    channel = await raw_session(network, node, OWNER)
    data = os.urandom(30_000)
    await channel.send(signed_put(node, OWNER, shard_id(1), data))
    assert isinstance(await channel.receive(), messages.Ready)
    # 3000 bytes every 0.1 s (30 kB/s), beyond the first 0.3 s too: 1 s in all.
    for start in range(0, len(data), 3000):
        await channel.send_piece(data[start : start + 3000])
        await trio.sleep(0.1)
    assert isinstance(await channel.receive(), messages.Stored)
    await channel.aclose()


# -- item: memory per stalled download --------------------------------------------------


async def test_a_download_nobody_reads_holds_one_piece_of_memory(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    network = TcpNetwork()
    piece = 64 * 1024
    stalled = 20
    limits = ServerLimits(
        download_piece=piece,
        sessions_per_node=stalled + 2,
        stranger_sessions=stalled + 2,
        stranger_sessions_per_source=stalled + 2,
    )
    node = await start_node(nursery, network, tmp_path / "node", limits=limits)
    store = node.client(network, OWNER)
    await store.put(shard_id(1), os.urandom(16 << 20))
    await store.aclose()
    channels = []
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(stalled):
            stream = await network.connect(node.address)
            assert isinstance(stream, trio.SocketStream)
            # A small window: the node's sends block soon, as with a reader
            # that stopped reading.
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
            secure = await secure_initiator(stream, OWNER, expected_node_id=node.identity.node_id)
            await secure.send_all(messages.encode_frame(messages.GetShard(shard_id(1), 0, None)))
            channels.append(secure)
        # Let the node fill the kernel's buffers and block.
        previous = -1
        with trio.move_on_after(10):
            while (held := tracemalloc.get_traced_memory()[0] - before) != previous:
                previous = held
                await trio.sleep(0.5)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        for secure in channels:
            await trio.aclose_forcefully(secure)
    # The piece read and its sealed copy, and the session's own few kB; not
    # the 1 MiB pieces of before (2 MiB and more a download).
    assert held < stalled * 4 * piece, held


# -- item: slots -------------------------------------------------------------------------


async def test_friends_get_through_floods_of_silent_connections_and_strangers(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="p2pbackup.node.server")
    network = TcpNetwork()
    node = await gated_node(nursery, tmp_path / "node", {FRIEND.node_id})
    limits = node.server.limits
    held: list[trio.abc.Stream] = []
    try:
        with trio.fail_after(60):
            # 300 connections that never say a word...
            for _ in range(300):
                held.append(await network.connect(node.address))
            # ...and 260 sessions of throwaway identities that never ask anything.
            for _ in range(260):
                stream = await network.connect(node.address)
                held.append(
                    await secure_initiator(
                        stream, Identity.generate(), expected_node_id=node.identity.node_id
                    )
                )
            await trio.sleep(0.2)
            admission = node.server.admission
            assert admission.strangers <= limits.stranger_sessions_per_source
            assert admission.handshaking <= limits.handshakes_per_source
            # The friend connects 15 times anew, and is served every time.
            for attempt in range(15):
                store = RemoteShardStore(
                    network, FRIEND, node.address, node.identity.node_id, connect_timeout=5
                )
                await store.put(shard_id(attempt), b"a friend's shard %d" % attempt)
                assert await store.get(shard_id(attempt)) == b"a friend's shard %d" % attempt
                await store.aclose()
    finally:
        for stream in held:
            await trio.aclose_forcefully(stream)
    # A line per turned-away connection would be hundreds; the throttle keeps
    # each kind to a few a minute.
    lines = [r for r in caplog.records if r.name == "p2pbackup.node.server"]
    assert len(lines) < 100, len(lines)
    assert any("turned a connection away" in r.getMessage() for r in lines)


async def test_strangers_may_not_take_the_sessions_kept_for_friends(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    friends = {FRIEND.node_id}
    limits = ServerLimits(sessions=6, stranger_sessions=4, stranger_sessions_per_source=10)
    node = await gated_node(nursery, tmp_path / "node", friends, limits)
    network = TcpNetwork()
    strangers = [await raw_session(network, node, Identity.generate()) for _ in range(6)]
    await trio.sleep(0.1)
    assert node.server.admission.strangers == 4  # two were turned away
    friendly = [await raw_session(network, node, FRIEND) for _ in range(2)]
    for channel in friendly:
        await channel.send(messages.GetUsage())
        assert isinstance(await channel.receive(), messages.Usage)
    assert node.server.admission.sessions == 6
    for channel in strangers + friendly:
        await trio.aclose_forcefully(channel.stream)


async def test_one_node_may_hold_only_so_many_sessions(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    node = await start_node(
        nursery, TcpNetwork(), tmp_path / "node", limits=ServerLimits(sessions_per_node=3)
    )
    channels = [await raw_session(TcpNetwork(), node, STRANGER) for _ in range(5)]
    answered = 0
    for channel in channels:
        try:
            await channel.send(messages.GetUsage())
            with trio.fail_after(5):
                answered += isinstance(await channel.receive_or_end(), messages.Usage)
        except trio.BrokenResourceError:
            pass
    assert answered == 3
    for channel in channels:
        await trio.aclose_forcefully(channel.stream)


async def test_idle_strangers_are_let_go_sooner_than_friends(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    limits = ServerLimits(idle=30, stranger_idle=0.3)
    node = await gated_node(nursery, tmp_path / "node", {FRIEND.node_id}, limits)
    network = TcpNetwork()
    friend = await raw_session(network, node, FRIEND)
    stranger = await raw_session(network, node, STRANGER)
    with trio.fail_after(5):
        assert await stranger.receive_or_end() is None  # closed, unanswered
    await friend.send(messages.GetUsage())
    assert isinstance(await friend.receive(), messages.Usage)
    await friend.aclose()


async def test_a_silent_connection_gives_its_handshake_slot_to_a_fresh_one(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    limits = ServerLimits(handshakes=4, handshakes_per_source=2, handshake=30)
    node = await start_node(nursery, TcpNetwork(), tmp_path / "node", limits=limits)
    network = TcpNetwork()
    silent = [await network.connect(node.address) for _ in range(3)]
    await trio.sleep(0.1)
    # The first was displaced by the third: closed without a word.
    with trio.fail_after(5):
        assert await silent[0].receive_some(100) == b""
    store = node.client(network, OWNER)
    await store.put(shard_id(1), b"served")
    await store.aclose()
    for stream in silent:
        await trio.aclose_forcefully(stream)


def test_the_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="positive"):
        ServerLimits(sessions_per_node=0)
    assert ServerLimits().upload_deadline(100.0, 0, 100.0) == 160.0
    # 16 KiB a second past the first minute: 1 MiB received by 100 s buys 64 s more.
    assert ServerLimits().upload_deadline(0.0, 1 << 20, 100.0) == 124.0
