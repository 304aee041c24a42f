"""The relays role of a node that cannot be dialled: reservations held at
friends, the relays handed on for the contact record, a lost one replaced."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from p2pbackup.app.home import Home
from p2pbackup.app.homedht import SERVING_RELAY, ServingRelay, contact_routes, dht_locator
from p2pbackup.app.relays import keep_relays, relay_while_unreachable
from p2pbackup.dht.discovery import FriendContact
from p2pbackup.dht.records import ContactRecord, RecordAddress, RelayAddress
from p2pbackup.errors import UsageError
from p2pbackup.net.network import Address, TcpNetwork
from p2pbackup.node.reachability import Reachability, ReachabilityBoard
from p2pbackup.node.relay import Relay
from p2pbackup.node.server import StorageServer
from p2pbackup.node.shardhost import ShardHost
from p2pbackup.wire.relay import Route, open_session

from .net_helpers import LOOPBACK_ANY_PORT, identity

A = identity("role-a")
B = identity("role-b")
R = identity("role-r")


async def test_a_node_holds_a_reservation_at_a_friend_and_names_it(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    network = TcpNetwork(connect_timeout=2)
    relay = Relay(R.node_id, {A.node_id, B.node_id}.__contains__)
    r_server = StorageServer(ShardHost.open(tmp_path / "r"), R, relay=relay.serve)
    relay_scope = trio.CancelScope()

    async def run_relay(task_status: trio.TaskStatus[Address]) -> None:
        with relay_scope:
            await network.serve(
                LOOPBACK_ANY_PORT, r_server.handle_connection, task_status=task_status
            )

    r_address = await nursery.start(run_relay)
    b_server = StorageServer(ShardHost.open(tmp_path / "b"), B)
    published: list[tuple[RelayAddress, ...]] = []
    friends = [
        FriendContact(A.node_id, (Address("127.0.0.1", 9),)),  # not a relay: nothing listens
        FriendContact(R.node_id, (r_address,)),
    ]
    nursery.start_soon(
        keep_relays, network, B, lambda: friends, b_server.handle_connection, published.append
    )
    with trio.fail_after(10):
        while not published:
            await trio.sleep(0.01)
    assert published[-1] == (
        RelayAddress(R.node_id, RecordAddress(r_address.host, r_address.port)),
    )
    # B is served through it.
    session = await open_session(network, A, Route(r_address, R.node_id), B.node_id)
    await session.aclose()
    # The relay goes away: so does the relay B names.
    relay_scope.cancel()
    with trio.fail_after(60):
        while published[-1]:
            await trio.sleep(0.05)


def test_a_relay_that_is_this_node_is_dialled_where_it_listens() -> None:
    """A friend's contact record names this very node as its relay: the
    serving node dials itself on loopback, not at the router's address."""
    record = ContactRecord(
        node_id=B.node_id,
        public_key=B.signing_public,
        addresses=(RecordAddress("192.168.2.20", 4001),),
        storage_offered=0,
        sequence=1,
        expiry=2_000_000_000,
        signature=b"\0" * 64,
        relays=(
            RelayAddress(R.node_id, RecordAddress("11.20.30.1", 4001)),
            RelayAddress(A.node_id, RecordAddress("11.20.30.100", 4001)),
        ),
    )
    myself = Route(Address("0.0.0.0", 4001).dialled_locally(), R.node_id)
    assert contact_routes(record, myself) == [
        Route(Address("192.168.2.20", 4001)),
        Route(Address("127.0.0.1", 4001), R.node_id),
        Route(Address("11.20.30.100", 4001), A.node_id),
    ]
    # Anywhere else, every relay is dialled at its published address.
    assert contact_routes(record)[1] == Route(Address("11.20.30.1", 4001), R.node_id)
    assert Address("::", 7).dialled_locally() == Address("127.0.0.1", 7)
    assert Address("10.0.0.5", 7).dialled_locally() == Address("10.0.0.5", 7)


async def test_a_friend_reserved_at_this_node_is_reached_here_without_a_lookup(
    tmp_path: Path,
) -> None:
    """Its contact record may not have reached the DHT (or the DHT is gone):
    the serving node's own relay knows it holds a reservation."""
    here = Route(Address("127.0.0.1", 4001), R.node_id)
    reserved = {B.node_id}
    token = SERVING_RELAY.set(ServingRelay(here, lambda: frozenset(reserved)))
    try:
        # A home that does not exist: any lookup would find nothing.
        locate = dht_locator(Home(tmp_path / "nohome"), TcpNetwork(connect_timeout=1))
        assert await locate(B.node_id) == [here]
        # Once it holds none here, the locator goes to the DHT.
        reserved.clear()
        with pytest.raises(UsageError, match="no way into the DHT"):
            await locate(B.node_id)
    finally:
        SERVING_RELAY.reset(token)


async def test_relays_are_held_only_while_friends_cannot_dial_the_node(
    nursery: trio.Nursery,
) -> None:
    board = ReachabilityBoard()
    running: list[str] = []

    def role(name: str) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            running.append(name)
            try:
                await trio.sleep_forever()
            finally:
                running.remove(name)

        return run

    nursery.start_soon(relay_while_unreachable, board, role("relays"), role("keepalive"))
    await trio.testing.wait_all_tasks_blocked()
    # Not checked yet, then unknown (no friend answered): no relays.
    assert running == []
    board.tell(Reachability(checked=False))
    await trio.testing.wait_all_tasks_blocked()
    assert running == []
    # Friends tried and could not dial it: relays, and DHT keepalives.
    board.tell(Reachability(unreachable_at=(Address("192.168.2.20", 4001),), checked=True))
    await trio.testing.wait_all_tasks_blocked()
    assert sorted(running) == ["keepalive", "relays"]
    board.tell(Reachability(unreachable_at=(Address("192.168.2.20", 4001),), checked=True))
    await trio.testing.wait_all_tasks_blocked()
    assert sorted(running) == ["keepalive", "relays"]
    # A port forwarded by hand later: they are let go.
    board.tell(Reachability(reachable_at=(Address("11.20.30.2", 4001),), checked=True))
    await trio.testing.wait_all_tasks_blocked()
    assert running == []
