"""The direct upgrade on the memory network.

Two homes, each behind a router that maps no ports (as Linux's MASQUERADE
does, keeping ports), reach each other through a relay on a public host;
the session through the relay moves to a direct connection made by a
simultaneous open. Behind a symmetric NAT (a port per destination) it
cannot, and the session stays on the relay, working. See
:mod:`p2pbackup.wire.direct` for the exchange, :mod:`p2pbackup.net.memory`
for the routers' TCP flows. In real time (short latencies, a punch window
of a second): the storage server reads shards in worker threads, which an
autojumping clock would outrun.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from p2pbackup.maintenance import status
from p2pbackup.net.memory import LinkProfile, MemoryNetwork, NatProfile
from p2pbackup.net.network import Address, local_address
from p2pbackup.node.relay import Relay
from p2pbackup.node.server import StorageServer
from p2pbackup.node.shardhost import ShardHost
from p2pbackup.stores.remote import RemoteShardStore
from p2pbackup.wire import direct
from p2pbackup.wire.direct import BACKOFF, DIRECT_UPGRADE, MAX_TRIES, DirectUpgrade, Tries
from p2pbackup.wire.relay import Route, Tunnel, hold_reservation, open_session
from p2pbackup.wire.session import SecureStream

from .net_helpers import BYTES_ONLY, identity
from .storage_conformance import shard_id

A = identity("direct-test-a")
B = identity("direct-test-b")
R = identity("direct-test-r")
PORT = 47470
RELAY_HOST = "198.51.100.9"
ROUTER_A = NatProfile("203.0.113.1", "192.168.1.1", port_mapping=False)
ROUTER_B = NatProfile("203.0.113.2", "192.168.2.1", port_mapping=False)
HOME_A = "192.168.1.20"
HOME_B = "192.168.2.20"
SHARD = b"direct upgrade " * 20_000  # ~300 KiB
WINDOW = 1.0


@attrs.frozen
class World:
    network: MemoryNetwork
    relay: Relay
    relay_route: Route
    a: DirectUpgrade
    b: DirectUpgrade
    b_host: ShardHost

    def client(self) -> RemoteShardStore:
        """A's store on B, found only through R."""

        async def locate(node_id: bytes) -> Sequence[Route]:
            return [self.relay_route]

        return RemoteShardStore(
            self.network.interface(HOME_A),
            A,
            Address(HOME_B, PORT),  # B's own address: unreachable from A
            B.node_id,
            locate=locate,
            connect_timeout=2,
        )


async def start_world(
    nursery: trio.Nursery, root: Path, *, router_b: NatProfile = ROUTER_B
) -> World:
    world = MemoryNetwork(connect_timeout=0.5, default_link=LinkProfile(latency=0.005))
    world.put_behind_nat(HOME_A, ROUTER_A)
    world.put_behind_nat(HOME_B, router_b)
    friends = frozenset({A.node_id, B.node_id}).__contains__
    relay = Relay(R.node_id, friends)
    r_server = StorageServer(ShardHost.open(root / "r", charge=BYTES_ONLY), R, relay=relay.serve)
    r_net = world.interface(RELAY_HOST)
    await nursery.start(r_net.serve, Address(RELAY_HOST, PORT), r_server.handle_connection)
    relay_route = Route(Address(RELAY_HOST, PORT), R.node_id)
    upgrades = []
    b_host = ShardHost.open(root / "b", charge=BYTES_ONLY)
    for home, ident, host in ((HOME_A, A, None), (HOME_B, B, b_host)):
        net = world.interface(home)
        upgrade = DirectUpgrade(net, ident, port=PORT, window=WINDOW)
        upgrades.append(upgrade)
        server = StorageServer(
            host or ShardHost.open(root / home, charge=BYTES_ONLY), ident, direct=upgrade
        )
        await nursery.start(net.serve, Address(home, PORT), server.handle_connection)
        if host is not None:
            await nursery.start(hold_reservation, net, ident, relay_route, server.handle_connection)
    return World(world, relay, relay_route, upgrades[0], upgrades[1], b_host)


def relayed_bytes(relay: Relay) -> int:
    traffic = relay.traffic().get(A.node_id)
    return 0 if traffic is None else traffic.bytes_from + traffic.bytes_to


async def test_two_homes_behind_nat_move_to_a_direct_connection(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    world = await start_world(nursery, tmp_path)
    token = DIRECT_UPGRADE.set(world.a)
    try:
        store = world.client()
        await store.put(shard_id(1), SHARD)
        assert await store.get(shard_id(1)) == SHARD
        await store.aclose()
    finally:
        DIRECT_UPGRADE.reset(token)
    # Each learnt its router's public address from the relay, and each
    # side says it went direct, to the other's router at the shared port.
    assert world.a.observed_host == ROUTER_A.public_host
    assert world.b.observed_host == ROUTER_B.public_host
    assert world.a.status()[B.node_id] == direct.PeerRoute(True, f"{ROUTER_B.public_host}:{PORT}")
    assert world.b.status()[A.node_id] == direct.PeerRoute(True, f"{ROUTER_A.public_host}:{PORT}")
    # status, asked of the serving node, shows where the relayed peer went.
    token = DIRECT_UPGRADE.set(world.a)
    try:
        assert status._direct_address(world.relay_route, B.node_id.hex()) == (
            f"{ROUTER_B.public_host}:{PORT}"
        )
        assert status._direct_address(Route(Address(HOME_B, PORT)), B.node_id.hex()) is None
    finally:
        DIRECT_UPGRADE.reset(token)
    # The shard went both ways, and not through the relay: it carried the
    # handshakes and the exchange only.
    assert world.b_host.has(A.node_id, shard_id(1))
    assert relayed_bytes(world.relay) < len(SHARD) // 10


async def test_behind_a_symmetric_nat_the_session_stays_on_the_relay(
    nursery: trio.Nursery,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    symmetric = attrs.evolve(ROUTER_B, port_preserving=False)
    world = await start_world(nursery, tmp_path, router_b=symmetric)
    token = DIRECT_UPGRADE.set(world.a)
    try:
        store = world.client()
        await store.put(shard_id(1), SHARD)
        assert await store.get(shard_id(1)) == SHARD
        await store.aclose()
    finally:
        DIRECT_UPGRADE.reset(token)
    route = world.a.status()[B.node_id]
    assert not route.direct
    assert "no answer at 203.0.113.2:47470" in route.detail
    assert not world.b.status()[A.node_id].direct
    # Everything went through the relay, both ways.
    assert relayed_bytes(world.relay) > 2 * len(SHARD)
    # The log says what happened and what would help.
    warning = next(r.getMessage() for r in caplog.records if "no direct connection" in r.message)
    assert "symmetric NAT" in warning
    assert "stays on the relay" in warning
    assert "forwarding port 47470" in warning
    assert "next try in 30 s" in warning


async def test_tries_back_off_then_stop() -> None:
    tries = Tries()
    assert tries.may_try(0)
    for failure in range(1, MAX_TRIES + 1):
        tries = tries.failed(100.0)
        assert not tries.may_try(100.0)
        if failure < MAX_TRIES:
            wait = BACKOFF[failure - 1]
            assert not tries.may_try(100.0 + wait - 1)
            assert tries.may_try(100.0 + wait)
            assert f"next try in {wait:.0f} s" == tries.describe_next(100.0)
    assert not tries.may_try(1e9)
    assert "no more tries" in tries.describe_next(1e9)


async def test_an_offer_needs_an_observed_host_and_a_port() -> None:
    assert direct.offer_addresses(None, PORT) == ()
    assert direct.offer_addresses("203.0.113.1", None) == ()
    assert direct.offer_addresses("127.0.0.1", PORT) == ()
    assert direct.offer_addresses("203.0.113.1", PORT) == (Address("203.0.113.1", PORT),)
    assert direct.read_offer(("203.0.113.1:4001", "nonsense", "[2001:db8::1]:0")) == (
        Address("203.0.113.1", 4001),
    )


async def test_a_failed_upgrade_is_not_offered_again_until_its_backoff(
    mock_clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    mock_clock.rate = 1.0
    symmetric = attrs.evolve(ROUTER_B, port_preserving=False)
    world = await start_world(nursery, tmp_path, router_b=symmetric)
    token = DIRECT_UPGRADE.set(world.a)
    try:
        store = world.client()
        await store.put(shard_id(1), SHARD)
        assert world.a.offer(B.node_id) == ()  # backing off
        mock_clock.jump(BACKOFF[0])
        assert world.a.offer(B.node_id) == (Address(ROUTER_A.public_host, PORT),)
        await store.aclose()
    finally:
        DIRECT_UPGRADE.reset(token)


async def test_a_node_without_an_upgrade_still_answers_the_exchange(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A dialler with nothing to offer (a command run outside ``serve``)
    reaches the home through the relay as before."""
    world = await start_world(nursery, tmp_path)
    store = world.client()  # DIRECT_UPGRADE unset
    await store.put(shard_id(2), SHARD)
    assert await store.get(shard_id(2)) == SHARD
    await store.aclose()
    assert B.node_id not in world.a.status()
    assert relayed_bytes(world.relay) > 2 * len(SHARD)


async def test_two_sessions_at_once_both_go_direct(nursery: trio.Nursery, tmp_path: Path) -> None:
    """A second direct connection with the same peer cannot use the same
    two addresses: it dials from a spare port (a pooled store opens two)."""
    world = await start_world(nursery, tmp_path)
    sessions: list[SecureStream] = []

    async def one() -> None:
        net = world.network.interface(HOME_A)
        sessions.append(await open_session(net, A, world.relay_route, B.node_id))

    token = DIRECT_UPGRADE.set(world.a)
    try:
        async with trio.open_nursery() as both:
            both.start_soon(one)
            both.start_soon(one)
    finally:
        DIRECT_UPGRADE.reset(token)
    assert len(sessions) == 2
    ports = {local_address(s.transport_stream) for s in sessions}
    assert len(ports) == 2
    assert Address(HOME_A, PORT) in ports
    assert not any(isinstance(s.transport_stream, Tunnel) for s in sessions)
    for session in sessions:
        await session.aclose()


async def test_a_node_friends_dial_directly_offers_nothing() -> None:
    upgrade = DirectUpgrade(MemoryNetwork().interface(HOME_A), A, port=PORT)
    upgrade.observe(f"{ROUTER_A.public_host}:50000", Address(HOME_A, 50000))
    assert upgrade.offer(B.node_id) == (Address(ROUTER_A.public_host, PORT),)
    upgrade.release(B.node_id, (Address(ROUTER_A.public_host, PORT),))
    upgrade.reachable = lambda: True
    assert upgrade.offer(B.node_id) == ()
    # Seen by the relay at its own address: behind no router.
    upgrade.reachable = lambda: False
    upgrade.observe(f"{HOME_A}:50000", Address(HOME_A, 50000))
    assert upgrade.offer(B.node_id) == ()
