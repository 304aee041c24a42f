"""Reachability: a friend dials a node back, through the memory network's routers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
import trio.testing

from p2pbackup.errors import PeerUnavailableError
from p2pbackup.net import natpmp
from p2pbackup.net.memory import MemoryNetwork, NatProfile
from p2pbackup.net.network import Address
from p2pbackup.node.reachability import (
    DialBackService,
    Reachability,
    ask_dial_back,
    check_reachability,
)
from p2pbackup.node.server import StorageServer
from p2pbackup.node.shardhost import ShardHost
from tests.net_helpers import identity

ROUTER = NatProfile(public_host="203.0.113.1", gateway_host="192.168.1.1")
HOME = "192.168.1.20"
FRIEND = "198.51.100.7"
STRANGER = "198.51.100.66"
PORT = 4001
LAN_ADDRESS = Address(HOME, PORT)
PUBLIC_ADDRESS = Address(ROUTER.public_host, PORT)
FRIEND_ADDRESS = Address(FRIEND, PORT)


class World:
    def __init__(self, root: Path, published: Sequence[Address]) -> None:
        self.network = MemoryNetwork()
        self.network.put_behind_nat(HOME, ROUTER)
        self.home = identity("home")
        self.friend = identity("friend")
        self.stranger = identity("stranger")
        self.root = root
        self.published = list(published)

    async def start(self, nursery: trio.Nursery) -> None:
        home_host = ShardHost.open(self.root / "home")
        friend_host = ShardHost.open(self.root / "friend")
        home_server = StorageServer(home_host, self.home)

        async def contact_addresses(node_id: bytes) -> list[Address]:
            return self.published if node_id == self.home.node_id else []

        friend_server = StorageServer(
            friend_host,
            self.friend,
            friends=lambda node_id: node_id == self.home.node_id,
            dial_back=DialBackService(
                self.network.interface(FRIEND), self.friend, contact_addresses
            ),
        )
        await nursery.start(
            self.network.interface(HOME).serve, LAN_ADDRESS, home_server.handle_connection
        )
        await nursery.start(
            self.network.interface(FRIEND).serve, FRIEND_ADDRESS, friend_server.handle_connection
        )

    async def check(self, addresses: Sequence[Address]) -> Reachability:
        return await check_reachability(
            self.network.interface(HOME),
            self.home,
            addresses,
            [(self.friend.node_id, [FRIEND_ADDRESS])],
        )


async def test_a_home_without_mapping_is_told_it_is_not_reachable(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    world = World(tmp_path, [PUBLIC_ADDRESS, LAN_ADDRESS])
    await world.start(nursery)
    verdict = await world.check([PUBLIC_ADDRESS, LAN_ADDRESS])
    assert verdict.checked and verdict.reachable_at == ()
    assert verdict.describe() == (
        "not reachable: no friend could dial 203.0.113.1:4001, 192.168.1.20:4001; "
        "relays will be used (forwarding the port on the router would let friends "
        "connect directly)"
    )


async def test_a_mapped_home_is_reachable_at_its_public_address(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    world = World(tmp_path, [PUBLIC_ADDRESS, LAN_ADDRESS])
    world.network.add_port_mapping(
        ROUTER.public_host, natpmp.Transport.TCP, PORT, LAN_ADDRESS, lifetime=3600
    )
    await world.start(nursery)
    verdict = await world.check([PUBLIC_ADDRESS, LAN_ADDRESS])
    assert verdict.reachable_at == (PUBLIC_ADDRESS,)
    assert verdict.unreachable_at == (LAN_ADDRESS,)
    assert verdict.describe() == "reachable directly at 203.0.113.1:4001"


async def test_the_address_a_connection_came_from_may_be_dialled(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    world = World(tmp_path, [])  # no contact record found
    world.network.add_port_mapping(ROUTER.public_host, natpmp.Transport.TCP, PORT, LAN_ADDRESS)
    await world.start(nursery)
    assert (await world.check([PUBLIC_ADDRESS])).reachable_at == (PUBLIC_ADDRESS,)


async def test_a_friend_dials_no_address_that_is_not_the_askers(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    world = World(tmp_path, [PUBLIC_ADDRESS])
    world.network.add_port_mapping(ROUTER.public_host, natpmp.Transport.TCP, PORT, LAN_ADDRESS)
    await world.start(nursery)
    victim = Address("192.0.2.80", 80)
    dialled: list[object] = []

    async def note(stream: trio.abc.Stream) -> None:
        dialled.append(stream)

    await nursery.start(world.network.interface(victim.host).serve, victim, note)
    home = world.network.interface(HOME)
    answer = await ask_dial_back(
        home, world.home, world.friend.node_id, FRIEND_ADDRESS, [PUBLIC_ADDRESS, victim]
    )
    assert answer == (True, False)
    with pytest.raises(PeerUnavailableError, match=r"will not dial 192\.0\.2\.80:80"):
        await ask_dial_back(home, world.home, world.friend.node_id, FRIEND_ADDRESS, [victim])
    assert dialled == []


async def test_a_stranger_is_not_dialled_back(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    world = World(tmp_path, [PUBLIC_ADDRESS])
    await world.start(nursery)
    with pytest.raises(PeerUnavailableError, match="only its friends"):
        await ask_dial_back(
            world.network.interface(STRANGER),
            world.stranger,
            world.friend.node_id,
            FRIEND_ADDRESS,
            [Address(STRANGER, PORT)],
        )


async def test_no_friend_answering_leaves_reachability_unknown(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    world = World(tmp_path, [PUBLIC_ADDRESS])
    verdict = await check_reachability(
        world.network.interface(HOME),
        world.home,
        [PUBLIC_ADDRESS],
        [(world.friend.node_id, [FRIEND_ADDRESS])],
        mapping_failure="the router at 192.168.1.1 did not answer NAT-PMP or PCP",
    )
    assert not verdict.checked
    assert verdict.describe().startswith(
        "reachability unknown: port mapping failed: the router at 192.168.1.1 did not answer"
    )
