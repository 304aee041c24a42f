"""The storage protocol end to end: RemoteShardStore against a live StorageServer.

Real sessions (Noise), real shard hosts on disk, over loopback TCP and over the
in-memory network. Misbehaving peers are played by raw sessions that send
what an honest client never would.
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from p2pbackup.core import crypto, merkle
from p2pbackup.errors import (
    PeerUnavailableError,
    ProtocolError,
    ShardNotFoundError,
    StoreFullError,
)
from p2pbackup.net.memory import LinkProfile, MemoryNetwork
from p2pbackup.net.network import Address, Network, TcpNetwork
from p2pbackup.node.server import ServerLimits, StorageServer
from p2pbackup.node.shardhost import ShardHost
from p2pbackup.stores.remote import RemoteShardStore
from p2pbackup.stores.shardstore import ShardRoot, ShardStore, Space
from p2pbackup.wire import messages
from p2pbackup.wire.messages import RefusalCode
from p2pbackup.wire.rpc import MessageChannel
from p2pbackup.wire.session import Identity, secure_initiator

from .net_helpers import BYTES_ONLY, LOOPBACK_ANY_PORT, RunningNode, identity, start_node
from .storage_conformance import ShardStoreConformance, shard_id

OWNER = identity("owner")
STRANGER = identity("stranger")


class TestRemoteShardStoreOverTcp(ShardStoreConformance):
    @pytest.fixture
    async def store(self, tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[ShardStore]:
        network = TcpNetwork()
        node = await start_node(nursery, network, tmp_path / "node", charge=BYTES_ONLY)
        client = node.client(network, OWNER)
        yield client
        await client.aclose()


class TestRemoteShardStoreOverMemory(ShardStoreConformance):
    @pytest.fixture
    async def store(self, tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[ShardStore]:
        world = MemoryNetwork(seed=1, default_link=LinkProfile(latency=0.001))
        node = await start_node(
            nursery,
            world.interface("server"),
            tmp_path / "node",
            listen=Address("server", 7),
            charge=BYTES_ONLY,
        )
        client = node.client(world.interface("client"), OWNER)
        yield client
        await client.aclose()


# -- helpers ------------------------------------------------------------------------------


@pytest.fixture
def network() -> Network:
    return TcpNetwork()


@pytest.fixture
async def node(tmp_path: Path, nursery: trio.Nursery, network: Network) -> RunningNode:
    return await start_node(
        nursery, network, tmp_path / "node", limits=ServerLimits(idle=5, transfer=2)
    )


async def raw_session(network: Network, node: RunningNode, who: Identity) -> MessageChannel:
    stream = await network.connect(node.address)
    secure = await secure_initiator(stream, who, expected_node_id=node.identity.node_id)
    return MessageChannel(secure)


def signed_put(node: RunningNode, who: Identity, sid: bytes, data: bytes) -> messages.PutShard:
    root = merkle.merkle_root(data, 4096)
    statement = messages.put_statement(node.identity.node_id, sid, len(data), root, 3600)
    return messages.PutShard(
        sid, len(data), 4096, root, 3600, crypto.sign(who.signing_seed, statement)
    )


# -- ownership ----------------------------------------------------------------------------


async def test_no_peer_can_see_or_touch_another_owners_shards(
    node: RunningNode, network: Network
) -> None:
    owner = node.client(network, OWNER)
    stranger = node.client(network, STRANGER)
    await owner.put(shard_id(1), b"mine")
    await owner.put_root(b"my root")

    assert await stranger.list() == []
    assert not await stranger.has(shard_id(1))
    with pytest.raises(ShardNotFoundError):
        await stranger.get(shard_id(1))
    assert await stranger.get_root() is None
    await stranger.delete(shard_id(1))  # deletes only in the stranger's own namespace
    _expiry, missing = await stranger.renew([shard_id(1)], 7200)
    assert missing == [shard_id(1)]

    assert await owner.list() == [shard_id(1)]
    assert await owner.get(shard_id(1)) == b"mine"
    assert await owner.get_root() == b"my root"
    await owner.aclose()
    await stranger.aclose()


async def test_a_signature_by_another_key_is_refused(node: RunningNode, network: Network) -> None:
    channel = await raw_session(network, node, OWNER)
    # Signed by the stranger, sent over the owner's session.
    await channel.send(signed_put(node, STRANGER, shard_id(1), b"data"))
    answer = await channel.receive()
    assert isinstance(answer, messages.Refused)
    assert answer.code == RefusalCode.FORBIDDEN
    # Deleting and renewing need the owner's signature too.
    forged = crypto.sign(
        STRANGER.signing_seed, messages.delete_statement(node.identity.node_id, shard_id(1))
    )
    await channel.send(messages.DeleteShard(shard_id(1), forged))
    answer = await channel.receive()
    assert isinstance(answer, messages.Refused)
    assert answer.code == RefusalCode.FORBIDDEN
    forged = crypto.sign(
        STRANGER.signing_seed, messages.renew_statement(node.identity.node_id, [shard_id(1)], 60)
    )
    await channel.send(messages.RenewLease((shard_id(1),), 60, forged))
    answer = await channel.receive()
    assert isinstance(answer, messages.Refused)
    assert answer.code == RefusalCode.FORBIDDEN
    # The session goes on after refusals.
    await channel.send(messages.GetUsage())
    assert isinstance(await channel.receive(), messages.Usage)
    await channel.aclose()


async def test_a_statement_for_another_host_is_refused(node: RunningNode, network: Network) -> None:
    data = b"data"
    root = merkle.merkle_root(data, 4096)
    elsewhere = identity("another host").node_id
    statement = messages.put_statement(elsewhere, shard_id(1), len(data), root, 3600)
    channel = await raw_session(network, node, OWNER)
    await channel.send(
        messages.PutShard(
            shard_id(1), len(data), 4096, root, 3600, crypto.sign(OWNER.signing_seed, statement)
        )
    )
    answer = await channel.receive()
    assert isinstance(answer, messages.Refused) and answer.code == RefusalCode.FORBIDDEN
    await channel.aclose()


async def test_data_that_fails_its_root_is_refused_and_not_stored(
    node: RunningNode, network: Network
) -> None:
    channel = await raw_session(network, node, OWNER)
    await channel.send(signed_put(node, OWNER, shard_id(1), b"declared bytes"))
    assert isinstance(await channel.receive(), messages.Ready)
    await channel.send(messages.ShardPiece(b"different byte"))
    answer = await channel.receive()
    assert isinstance(answer, messages.Refused) and answer.code == RefusalCode.INTEGRITY
    assert not node.host.has(OWNER.node_id, shard_id(1))
    await channel.aclose()


# -- failures -----------------------------------------------------------------------------


async def test_dialling_the_wrong_node_id_fails_clearly(
    node: RunningNode, network: Network
) -> None:
    impostor = RemoteShardStore(network, OWNER, node.address, identity("expected").node_id)
    with pytest.raises(PeerUnavailableError, match="handshake"):
        await impostor.has(shard_id(1))


async def test_an_unreachable_node_is_unavailable(network: Network) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connection refused
        store = RemoteShardStore(network, OWNER, Address("127.0.0.1", port), bytes(20))
        with pytest.raises(PeerUnavailableError, match=f"127.0.0.1:{port}"):
            await store.has(shard_id(1))


async def test_quota_refusal_is_store_full(tmp_path: Path, nursery: trio.Nursery) -> None:
    network = TcpNetwork()
    node = await start_node(
        nursery, network, tmp_path / "node", owner_quota=1000, charge=BYTES_ONLY
    )
    store = node.client(network, OWNER)
    await store.put(shard_id(1), bytes(600))
    with pytest.raises(StoreFullError):
        await store.put(shard_id(2), bytes(600))
    assert await store.list() == [shard_id(1)]  # and the session still works
    await store.aclose()


async def test_a_node_offers_each_owner_its_room_and_strangers_none(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    network = TcpNetwork()
    host = ShardHost.open(tmp_path / "node", owner_quota=1000, capacity=1500, charge=BYTES_ONLY)
    node_identity = identity("gated node")
    server = StorageServer(host, node_identity, admits=lambda node_id: node_id == OWNER.node_id)
    address = await nursery.start(network.serve, LOOPBACK_ANY_PORT, server.handle_connection)
    owner = RemoteShardStore(network, OWNER, address, node_identity.node_id)
    stranger = RemoteShardStore(network, STRANGER, address, node_identity.node_id)
    assert await owner.space() == Space(0, 1000)  # its quota, while the disk has more
    await owner.put(shard_id(1), bytes(600))
    assert await owner.space() == Space(600, 1000)
    # Not admitted (friends only): no room offered, and indeed none given.
    assert await stranger.space() == Space(0, 0)
    await owner.aclose()
    await stranger.aclose()
    host.close()


async def test_a_silent_node_times_out(nursery: trio.Nursery) -> None:
    network = TcpNetwork()

    async def silent(stream: trio.abc.Stream) -> None:
        await trio.sleep_forever()

    address = await nursery.start(network.serve, Address("127.0.0.1", 0), silent)
    store = RemoteShardStore(network, OWNER, address, bytes(20), connect_timeout=0.5)
    with pytest.raises(PeerUnavailableError, match="no answer"):
        await store.has(shard_id(1))


async def test_corruption_on_the_hosts_disk_reaches_the_owner_as_is(
    node: RunningNode, network: Network, tmp_path: Path
) -> None:
    """Hosts verify on write; reads are the owner's to verify (engine tests cover routing)."""
    store = node.client(network, OWNER)
    data = os.urandom(10_000)
    await store.put(shard_id(1), data)
    (path,) = [p for p in (tmp_path / "node").rglob(shard_id(1).hex()) if p.is_file()]
    raw = bytearray(path.read_bytes())
    raw[5000] ^= 0xFF
    path.write_bytes(bytes(raw))
    got = await store.get(shard_id(1))
    assert got != data and len(got) == len(data)
    await store.aclose()


# -- a live server under garbage ----------------------------------------------------------


async def test_garbage_before_and_after_the_handshake_leaves_the_server_serving(
    node: RunningNode, network: Network
) -> None:
    rng = random.Random(5)
    honest = node.client(network, OWNER)
    await honest.put(shard_id(1), b"precious")
    valid = messages.encode_frame(signed_put(node, OWNER, shard_id(2), b"x" * 100))

    with trio.move_on_after(3):
        for round_ in range(40):
            # Before the handshake: random bytes where Noise expects a message.
            stream = await network.connect(node.address)
            junk = rng.randbytes(rng.randrange(1, 300))
            try:
                await stream.send_all(junk)
                with trio.move_on_after(0.2):
                    await stream.receive_some(1000)
            except trio.BrokenResourceError:
                pass
            await stream.aclose()

            # After the handshake: mutated and random frames in a real session.
            channel = await raw_session(network, node, STRANGER)
            frame = bytearray(valid)
            for _ in range(rng.randrange(1, 5)):
                frame[rng.randrange(len(frame))] = rng.randrange(256)
            payload = bytes(frame) if round_ % 2 else rng.randbytes(rng.randrange(1, 200))
            try:
                await channel.stream.send_all(payload)
                with trio.move_on_after(0.2):
                    await channel.receive_or_end()
            except (trio.BrokenResourceError, ProtocolError):
                pass  # the server hung up on garbage, as it should
            await trio.aclose_forcefully(channel.stream)

    assert await honest.get(shard_id(1)) == b"precious"
    await honest.put(shard_id(3), b"still accepting")
    assert await honest.list() == sorted([shard_id(1), shard_id(3)])
    await honest.aclose()


# -- audits ------------------------------------------------------------------------------


async def test_an_audit_answer_verifies_against_the_owners_root(
    node: RunningNode, network: Network
) -> None:
    store = node.client(network, OWNER)
    data = os.urandom(5 * 4096 + 100)
    root = merkle.merkle_root(data, 4096)
    await store.put(shard_id(1), data, ShardRoot(4096, root))
    answer = await store.audit(shard_id(1), b"n" * 16, (0, 3, 5), 4096)
    leaves = merkle.block_count(len(data), 4096)
    for index, block, proof in zip((0, 3, 5), answer.blocks, answer.proofs, strict=True):
        merkle.verify_block(root, index=index, leaf_count=leaves, block=block, proof=proof)
    await store.aclose()


async def test_unreasonable_audits_are_refused_as_bad_requests(
    node: RunningNode, network: Network
) -> None:
    big = os.urandom(40 * 65536)
    channel = await raw_session(network, node, OWNER)
    store = node.client(network, OWNER)
    await store.put(shard_id(1), big)  # 64 KiB blocks: 17 of them overflow a frame
    for indices in [tuple(range(17)), (40,)]:
        await channel.send(messages.Audit(shard_id(1), b"n" * 16, indices))
        answer = await channel.receive()
        assert isinstance(answer, messages.Refused), indices
        assert answer.code == RefusalCode.BAD_REQUEST
    await channel.send(messages.Audit(shard_id(1), b"n" * 16, tuple(range(16))))
    assert isinstance(await channel.receive(), messages.AuditProof)
    await channel.aclose()
    await store.aclose()


# -- connections -------------------------------------------------------------------------


async def test_a_pooled_connection_the_node_closed_is_replaced(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    network = TcpNetwork()
    node = await start_node(nursery, network, tmp_path / "node", limits=ServerLimits(idle=0.2))
    store = node.client(network, OWNER)
    await store.put(shard_id(1), b"one")
    await trio.sleep(0.5)  # the node closes the idle session meanwhile
    assert await store.get(shard_id(1)) == b"one"
    await trio.sleep(0.5)
    await store.put(shard_id(2), b"two")
    assert await store.list() == sorted([shard_id(1), shard_id(2)])
    await store.aclose()


async def test_a_reader_that_stops_reading_does_not_hold_the_node(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    network = TcpNetwork()
    node = await start_node(nursery, network, tmp_path / "node", limits=ServerLimits(transfer=0.5))
    store = node.client(network, OWNER)
    await store.put(shard_id(1), os.urandom(16 << 20))
    await store.aclose()
    channel = await raw_session(network, node, OWNER)
    await channel.send(messages.GetShard(shard_id(1), 0, None))
    # Never read: the node's sends fill the socket buffers, then time out.
    with trio.fail_after(10):
        while node.server.active_sessions:
            await trio.sleep(0.05)
    await trio.aclose_forcefully(channel.stream)


async def test_sessions_beyond_the_limit_are_turned_away(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    network = TcpNetwork()
    node = await start_node(nursery, network, tmp_path / "node", limits=ServerLimits(sessions=1))
    holder = await raw_session(network, node, OWNER)
    turned_away = node.client(network, STRANGER)
    with pytest.raises(PeerUnavailableError):
        await turned_away.has(shard_id(1))
    await holder.aclose()
    with trio.fail_after(5):
        while node.server.active_sessions:
            await trio.sleep(0.01)
    assert not await turned_away.has(shard_id(1))  # served once the first left
    await turned_away.aclose()


async def test_a_response_sent_as_a_request_ends_that_session_only(
    node: RunningNode, network: Network
) -> None:
    rude = await raw_session(network, node, STRANGER)
    polite = node.client(network, OWNER)
    await polite.put(shard_id(1), b"kept")
    await rude.send(messages.Ready())
    with trio.fail_after(5):
        assert await rude.receive_or_end() is None  # closed without an answer
    assert await polite.get(shard_id(1)) == b"kept"
    await trio.aclose_forcefully(rude.stream)
    await polite.aclose()


async def test_closing_the_store_ends_its_sessions_on_the_node(
    node: RunningNode, network: Network
) -> None:
    store = node.client(network, OWNER)
    await store.put(shard_id(1), b"data")
    assert node.server.active_sessions == 1  # pooled, idle
    await store.aclose()
    with trio.fail_after(5):
        while node.server.active_sessions:
            await trio.sleep(0.01)
