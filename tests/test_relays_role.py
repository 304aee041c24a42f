"""The relays role of a node that cannot be dialled: reservations held at
friends, the relays handed on for the contact record, a lost one replaced."""

from __future__ import annotations

from pathlib import Path

import trio

from p2pbackup.app.relays import keep_relays
from p2pbackup.dht.discovery import FriendContact
from p2pbackup.dht.records import RecordAddress, RelayAddress
from p2pbackup.net.network import Address, TcpNetwork
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
