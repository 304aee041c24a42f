"""Relays over loopback TCP with real sockets: a node that listens on nothing
reachable holds a reservation at a friend, and its friends reach it there.

B (the home behind NAT) has no listener at all; R (the relay) is a storage
node that knows A and B as friends; A reaches B through R. The relay sees
only Noise ciphertext: the test records every byte it splices.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import attrs
import pytest
import trio

from p2pbackup.errors import PeerUnavailableError
from p2pbackup.model import BytesLike
from p2pbackup.net.network import Address, Network, TcpNetwork
from p2pbackup.node.relay import Relay, RelayLimits
from p2pbackup.node.server import StorageServer
from p2pbackup.node.shardhost import ShardHost
from p2pbackup.stores.remote import RemoteShardStore
from p2pbackup.stores.shardstore import ShardStore
from p2pbackup.wire import messages
from p2pbackup.wire.relay import Route, hold_reservation, open_session
from p2pbackup.wire.rpc import MessageChannel
from p2pbackup.wire.session import Identity

from .net_helpers import BYTES_ONLY, LOOPBACK_ANY_PORT, identity
from .storage_conformance import ShardStoreConformance, shard_id

A = identity("relay-test-a")
B = identity("relay-test-b")
R = identity("relay-test-r")
STRANGER = identity("relay-test-stranger")
#: Where nothing listens: B's published address, as a NAT router leaves it.
UNREACHABLE = Address("127.0.0.1", 9)
MARKER = b"PLAINTEXT-MARKER-that-only-A-and-B-may-see" * 4


class Tap(trio.abc.Stream):
    """The sending side of ``sink``, keeping a copy of what goes through."""

    def __init__(self, sink: trio.abc.Stream, copy: bytearray) -> None:
        self.sink = sink
        self.copy = copy

    async def send_all(self, data: BytesLike) -> None:
        self.copy += data
        await self.sink.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.sink.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        raise AssertionError("a relay never reads from the stream it writes to")

    async def aclose(self) -> None:
        await self.sink.aclose()


class RecordingRelay(Relay):
    """A relay that keeps a copy of every byte it splices, for the test to read."""

    spliced: bytearray

    async def _pump(
        self, source: trio.abc.Stream, sink: trio.abc.Stream, sender: bytes, receiver: bytes
    ) -> None:
        if not hasattr(self, "spliced"):
            self.spliced = bytearray()
        await super()._pump(source, Tap(sink, self.spliced), sender, receiver)


class LyingRelay(RecordingRelay):
    """A relay that joins whoever asks for STRANGER to B instead."""

    async def _accept(
        self,
        channel: MessageChannel,
        peer: bytes,
        circuit: bytes,
        joined: messages.RelayJoined,
    ) -> None:
        await super()._accept(channel, self._pending[circuit].target, circuit, joined)


@attrs.frozen
class World:
    network: Network
    relay: RecordingRelay
    relay_route: Route
    b_host: ShardHost

    def client(self, owner: Identity = A, **kwargs: object) -> RemoteShardStore:
        """A store of ``owner`` on B, which it can find only through R."""

        async def locate(node_id: bytes) -> Sequence[Route]:
            return [self.relay_route]

        return RemoteShardStore(
            self.network,
            owner,
            UNREACHABLE,
            B.node_id,
            locate=locate,
            **kwargs,  # type: ignore[arg-type]
        )


async def start_world(
    nursery: trio.Nursery,
    root: Path,
    *,
    limits: RelayLimits | None = None,
    friends_of_r: frozenset[bytes] = frozenset({A.node_id, B.node_id}),
    relay_class: type[RecordingRelay] = RecordingRelay,
) -> World:
    network = TcpNetwork(connect_timeout=5)
    # R: a storage node whose server hands relay requests to its relay.
    r_host = ShardHost.open(root / "r", charge=BYTES_ONLY)
    relay = relay_class(R.node_id, friends_of_r.__contains__, limits or RelayLimits())
    r_server = StorageServer(r_host, R, relay=relay.serve)
    r_address = await nursery.start(network.serve, LOOPBACK_ANY_PORT, r_server.handle_connection)
    relay_route = Route(r_address, R.node_id)
    # B: no listener; its server is reached only through its reservation at R.
    b_host = ShardHost.open(root / "b", charge=BYTES_ONLY)
    b_server = StorageServer(b_host, B)
    await nursery.start(hold_reservation, network, B, relay_route, b_server.handle_connection)
    return World(network, relay, relay_route, b_host)


class TestRemoteShardStoreThroughRelay(ShardStoreConformance):
    @pytest.fixture
    async def store(self, tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[ShardStore]:
        world = await start_world(nursery, tmp_path)
        client = world.client()
        yield client
        await client.aclose()


async def test_a_put_and_get_through_the_relay_show_it_only_ciphertext(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    world = await start_world(nursery, tmp_path)
    store = world.client()
    shard = MARKER * 4000  # ~170 KiB, several Noise messages
    await store.put(shard_id(1), shard)
    assert await store.get(shard_id(1)) == shard
    assert store.name.endswith(f"(relay {R.node_id.hex()[:16]})")
    await store.aclose()
    # The shard crossed the relay twice, inside A and B's own Noise session.
    spliced = bytes(world.relay.spliced)
    assert spliced
    assert len(spliced) > 2 * len(shard)
    assert MARKER[:16] not in spliced
    # B holds it for A (its owner, proven end to end), R holds nothing.
    assert world.b_host.has(A.node_id, shard_id(1))
    traffic = world.relay.traffic()
    assert traffic[A.node_id].bytes_from > len(shard)
    assert traffic[A.node_id].bytes_to > len(shard)
    assert traffic[B.node_id].bytes_from > len(shard)
    assert traffic[A.node_id].circuits >= 1
    with trio.fail_after(5):  # the relay sees the close a moment later
        while world.relay.circuits:
            await trio.sleep(0.01)
    # Nothing of it on R's disk.
    for path in (tmp_path / "r").rglob("*"):
        if path.is_file():
            assert MARKER[:16] not in path.read_bytes()


async def test_the_dialler_checks_the_far_nodes_key(tmp_path: Path, nursery: trio.Nursery) -> None:
    world = await start_world(nursery, tmp_path, relay_class=LyingRelay)
    lying = world.relay
    lying._reservations[STRANGER.node_id] = lying._reservations[B.node_id]
    # The relay joins A to B when A asked for STRANGER: B cannot prove it is.
    with pytest.raises(PeerUnavailableError, match=f"expected {STRANGER.node_id.hex()}"):
        await open_session(world.network, A, world.relay_route, STRANGER.node_id)
    # And expecting another relay at R's address, before asking for anything.
    with pytest.raises(PeerUnavailableError, match="expected"):
        await open_session(world.network, A, Route(world.relay_route.address, A.node_id), B.node_id)


async def test_a_stranger_is_refused_with_a_reason(tmp_path: Path, nursery: trio.Nursery) -> None:
    world = await start_world(nursery, tmp_path)
    with pytest.raises(PeerUnavailableError, match="relays only for its friends"):
        await open_session(world.network, STRANGER, world.relay_route, B.node_id)
    with pytest.raises(PeerUnavailableError, match="relays only for its friends"):
        await hold_reservation(
            world.network, STRANGER, world.relay_route, lambda stream: trio.sleep(0)
        )
    # A node without a reservation there cannot be reached through it.
    with pytest.raises(PeerUnavailableError, match="holds no reservation"):
        await open_session(world.network, B, world.relay_route, A.node_id)


async def test_the_relays_own_node_may_dial_through_it_but_holds_no_reservation(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The relay's owner reaches a friend reserved at its own node (a restore
    run by the serving node itself); it is no friend of itself, and only
    dialling is open to it."""
    world = await start_world(nursery, tmp_path)
    session = await open_session(world.network, R, world.relay_route, B.node_id)
    await session.aclose()
    with pytest.raises(PeerUnavailableError, match="relays only for its friends"):
        await hold_reservation(world.network, R, world.relay_route, lambda stream: trio.sleep(0))


async def test_a_node_that_relays_for_nobody_says_so(tmp_path: Path, nursery: trio.Nursery) -> None:
    network = TcpNetwork()
    server = StorageServer(ShardHost.open(tmp_path / "n"), R)
    address = await nursery.start(network.serve, LOOPBACK_ANY_PORT, server.handle_connection)
    with pytest.raises(PeerUnavailableError, match="relays for nobody"):
        await open_session(network, A, Route(address, R.node_id), B.node_id)


async def test_circuits_per_node_are_limited(tmp_path: Path, nursery: trio.Nursery) -> None:
    world = await start_world(nursery, tmp_path, limits=RelayLimits(circuits_per_node=1))
    first = await open_session(world.network, A, world.relay_route, B.node_id)
    with pytest.raises(PeerUnavailableError, match="circuits open at this relay"):
        await open_session(world.network, A, world.relay_route, B.node_id)
    await first.aclose()
    # Once the first circuit is over, the next one is taken.
    with trio.fail_after(5):
        while world.relay.circuits:
            await trio.sleep(0.01)
    second = await open_session(world.network, A, world.relay_route, B.node_id)
    await second.aclose()


async def test_relayed_bytes_are_paced(tmp_path: Path, nursery: trio.Nursery) -> None:
    rate = 1 << 20
    world = await start_world(nursery, tmp_path, limits=RelayLimits(bytes_per_second=rate))
    store = world.client()
    shard = bytes(3 * rate)
    started = time.monotonic()
    await store.put(shard_id(2), shard)
    # A second's burst, then the rate: at least two seconds for three megabytes.
    assert time.monotonic() - started >= 1.8
    await store.aclose()


async def test_the_reservation_lives_on_keepalives(tmp_path: Path, nursery: trio.Nursery) -> None:
    world = await start_world(nursery, tmp_path, limits=RelayLimits(keepalive=1))
    # Several silent-interval limits later, B is still reachable: its pings kept it.
    await trio.sleep(4)
    assert B.node_id in world.relay.reserved
    session = await open_session(world.network, A, world.relay_route, B.node_id)
    await session.aclose()


async def test_a_silent_reservation_is_dropped(tmp_path: Path, nursery: trio.Nursery) -> None:
    world = await start_world(nursery, tmp_path, limits=RelayLimits(keepalive=1))
    # A node that reserves and then says nothing more.
    silent = await open_session(world.network, A, Route(world.relay_route.address), R.node_id)
    channel = MessageChannel(silent)
    await channel.send(messages.RelayReserve())
    assert isinstance(await channel.receive(), messages.RelayReserved)
    assert A.node_id in world.relay.reserved
    with trio.fail_after(6):
        while A.node_id in world.relay.reserved:
            await trio.sleep(0.1)
    await silent.aclose()
