"""The memory network's routers (NAT), one rule per test, in virtual time.

See :mod:`p2pbackup.net.memory` for the model: a LAN behind a public host,
inbound only through port mappings or recent UDP flows, mappings that lapse.
"""

from __future__ import annotations

import contextlib

import pytest
import trio
import trio.testing

from p2pbackup.errors import PeerUnavailableError, UsageError
from p2pbackup.net import natpmp
from p2pbackup.net.memory import MemoryNetwork, NatProfile
from p2pbackup.net.network import Address

ROUTER = NatProfile(public_host="203.0.113.1", gateway_host="192.168.1.1")
HOME = "192.168.1.20"
OUTSIDE = "198.51.100.7"
PORT = 4001


def world_with_home(profile: NatProfile = ROUTER) -> MemoryNetwork:
    world = MemoryNetwork(connect_timeout=5.0)
    world.interface(OUTSIDE)
    world.put_behind_nat(HOME, profile)
    return world


async def _hello(stream: trio.abc.Stream) -> None:
    await stream.send_all(b"hello")


async def _serve_home(world: MemoryNetwork, nursery: trio.Nursery) -> None:
    await nursery.start(world.interface(HOME).serve, Address(HOME, PORT), _hello)


async def test_a_host_behind_nat_cannot_be_dialled_by_name(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    world = world_with_home()
    await _serve_home(world, nursery)
    with pytest.raises(PeerUnavailableError, match="no answer"):
        await world.interface(OUTSIDE).connect(Address(HOME, PORT))


async def test_the_public_host_refuses_an_unmapped_port(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    world = world_with_home()
    await _serve_home(world, nursery)
    with pytest.raises(PeerUnavailableError, match="refused"):
        await world.interface(OUTSIDE).connect(Address(ROUTER.public_host, PORT))


async def test_a_mapped_port_reaches_the_home(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    world = world_with_home()
    await _serve_home(world, nursery)
    world.add_port_mapping(ROUTER.public_host, natpmp.Transport.TCP, 5000, Address(HOME, PORT))
    stream = await world.interface(OUTSIDE).connect(Address(ROUTER.public_host, 5000))
    assert await stream.receive_some() == b"hello"
    assert stream.remote_address == Address(ROUTER.public_host, 5000)  # type: ignore[attr-defined]


async def test_the_lan_reaches_the_home_and_the_home_appears_as_the_router(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    world = world_with_home()
    world.put_behind_nat("192.168.1.30", ROUTER)
    await _serve_home(world, nursery)
    stream = await world.interface("192.168.1.30").connect(Address(HOME, PORT))
    assert await stream.receive_some() == b"hello"

    seen: list[Address | None] = []

    async def note(stream: trio.abc.Stream) -> None:
        seen.append(stream.remote_address)  # type: ignore[attr-defined]

    await nursery.start(world.interface(OUTSIDE).serve, Address(OUTSIDE, 80), note)
    await world.interface(HOME).connect(Address(OUTSIDE, 80))
    await trio.sleep(0.1)
    assert seen[0] is not None and seen[0].host == ROUTER.public_host


async def test_a_mapping_lapses_after_its_lease(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    world = world_with_home()
    await _serve_home(world, nursery)
    world.add_port_mapping(
        ROUTER.public_host, natpmp.Transport.TCP, PORT, Address(HOME, PORT), lifetime=60
    )
    await world.interface(OUTSIDE).connect(Address(ROUTER.public_host, PORT))
    assert world.port_mappings(ROUTER.public_host)
    await trio.sleep(61)
    with pytest.raises(PeerUnavailableError, match="refused"):
        await world.interface(OUTSIDE).connect(Address(ROUTER.public_host, PORT))
    assert world.port_mappings(ROUTER.public_host) == []


async def test_udp_answers_come_back_through_a_recent_flow(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = world_with_home()
    home = await world.interface(HOME).open_datagram(Address(HOME, PORT))
    far = await world.interface(OUTSIDE).open_datagram(Address(OUTSIDE, 9000))
    public = Address(ROUTER.public_host, PORT)
    # Unsolicited: dropped.
    await far.send(b"knock", public)
    await far.send(b"knock", Address(HOME, PORT))
    await home.send(b"ping", Address(OUTSIDE, 9000))
    data, source = await far.receive()
    assert (data, source) == (b"ping", public)
    await far.send(b"pong", source)
    assert await home.receive() == (b"pong", Address(OUTSIDE, 9000))
    # Another remote may not use the flow.
    other = await world.interface("198.51.100.8").open_datagram(Address("198.51.100.8", 1))
    await other.send(b"sneak", public)
    with trio.move_on_after(1):
        await home.receive()
        pytest.fail("a datagram from a stranger came through the router")


async def test_a_udp_flow_lapses_after_30_s_one_way_and_120_s_both_ways(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = world_with_home()
    home = await world.interface(HOME).open_datagram(Address(HOME, PORT))
    far = await world.interface(OUTSIDE).open_datagram(Address(OUTSIDE, 9000))
    public = Address(ROUTER.public_host, PORT)

    async def arrives(data: bytes) -> bool:
        await far.send(data, public)
        with trio.move_on_after(1):
            got, _ = await home.receive()
            return got == data
        return False

    await home.send(b"out", Address(OUTSIDE, 9000))
    await trio.sleep(31)
    assert not await arrives(b"late")  # one way only: 30 s
    await home.send(b"out", Address(OUTSIDE, 9000))
    await trio.sleep(29)
    assert await arrives(b"in time")  # now it went both ways: 120 s
    await trio.sleep(110)
    assert await arrives(b"still open")
    await trio.sleep(121)
    assert not await arrives(b"closed")


async def test_a_mapped_udp_port_takes_datagrams_from_anyone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = world_with_home()
    home = await world.interface(HOME).open_datagram(Address(HOME, PORT))
    far = await world.interface(OUTSIDE).open_datagram(Address(OUTSIDE, 9000))
    world.add_port_mapping(ROUTER.public_host, natpmp.Transport.UDP, PORT, Address(HOME, PORT))
    await far.send(b"hi", Address(ROUTER.public_host, PORT))
    assert await home.receive() == (b"hi", Address(OUTSIDE, 9000))


async def _ask_router(world: MemoryNetwork, request: bytes) -> bytes | None:
    endpoint = await world.interface(HOME).open_datagram(Address(HOME, 0))
    try:
        await endpoint.send(request, Address(ROUTER.gateway_host, natpmp.SERVER_PORT))
        with trio.move_on_after(1):
            return (await endpoint.receive())[0]
        return None
    finally:
        await endpoint.aclose()


async def test_the_router_maps_a_port_by_natpmp_and_the_mapping_works(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    world = world_with_home()
    await _serve_home(world, nursery)
    address = natpmp.decode_address_answer(
        await _ask_router(world, natpmp.encode_address_request()) or b""
    )
    assert address.external_ip == ROUTER.public_host
    request = natpmp.MapRequest(natpmp.Transport.TCP, PORT, PORT, 3600)
    answer = natpmp.decode_natpmp_map(
        await _ask_router(world, natpmp.encode_natpmp_map(request)) or b""
    )
    assert answer.ok and answer.external_port == PORT and answer.lifetime == 3600
    stream = await world.interface(OUTSIDE).connect(Address(ROUTER.public_host, PORT))
    assert await stream.receive_some() == b"hello"
    # Deleting it (lifetime 0) closes the port again.
    deleted = natpmp.decode_natpmp_map(
        await _ask_router(world, natpmp.encode_natpmp_map(attrs_evolve(request, 0))) or b""
    )
    assert deleted.ok
    with pytest.raises(PeerUnavailableError, match="refused"):
        await world.interface(OUTSIDE).connect(Address(ROUTER.public_host, PORT))


def attrs_evolve(request: natpmp.MapRequest, lifetime: int) -> natpmp.MapRequest:
    return natpmp.MapRequest(
        request.transport,
        request.internal_port,
        request.external_port,
        lifetime,
        request.nonce,
        request.client_ip,
    )


async def test_the_router_maps_by_pcp_and_checks_the_client_address(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = world_with_home(
        NatProfile(public_host="203.0.113.1", gateway_host="192.168.1.1", max_lease=600)
    )
    nonce = bytes(range(12))
    request = natpmp.MapRequest(natpmp.Transport.UDP, PORT, 0, 3600, nonce, HOME)
    answer = natpmp.decode_pcp_map(await _ask_router(world, natpmp.encode_pcp_map(request)) or b"")
    assert answer.ok and answer.nonce == nonce
    assert (answer.external_ip, answer.external_port, answer.lifetime) == (
        ROUTER.public_host,
        PORT,
        600,  # the router's longest lease
    )
    lying = attrs_evolve(
        natpmp.MapRequest(natpmp.Transport.UDP, PORT, 0, 60, nonce, "10.9.9.9"), 60
    )
    refused = natpmp.decode_pcp_map(await _ask_router(world, natpmp.encode_pcp_map(lying)) or b"")
    assert refused.result == natpmp.PcpResult.ADDRESS_MISMATCH


async def test_a_router_without_port_mapping_answers_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = world_with_home(
        NatProfile(public_host="203.0.113.2", gateway_host="192.168.2.1", port_mapping=False)
    )
    assert world.gateway_of(HOME) == "192.168.2.1"
    endpoint = await world.interface(HOME).open_datagram(Address(HOME, 0))
    await endpoint.send(natpmp.encode_address_request(), Address("192.168.2.1", 5351))
    with trio.move_on_after(5) as waited:
        await endpoint.receive()
    assert waited.cancelled_caught


async def test_two_hosts_cannot_share_one_external_port(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = world_with_home()
    world.put_behind_nat("192.168.1.30", ROUTER)
    first = natpmp.decode_natpmp_map(
        await _ask_router(
            world, natpmp.encode_natpmp_map(natpmp.MapRequest(natpmp.Transport.TCP, 7, 7, 60))
        )
        or b""
    )
    endpoint = await world.interface("192.168.1.30").open_datagram(Address("192.168.1.30", 0))
    request = natpmp.MapRequest(natpmp.Transport.TCP, 7, 7, 60)
    await endpoint.send(natpmp.encode_natpmp_map(request), Address(ROUTER.gateway_host, 5351))
    second = natpmp.decode_natpmp_map((await endpoint.receive())[0])
    assert first.external_port == 7 and second.ok and second.external_port != 7


def test_routers_cannot_nest_or_change_profile() -> None:
    world = world_with_home()
    with pytest.raises(UsageError, match="router"):
        world.put_behind_nat(ROUTER.public_host, ROUTER)
    with pytest.raises(UsageError, match="another profile"):
        world.put_behind_nat("192.168.1.40", NatProfile(ROUTER.public_host, "192.168.1.254"))
    with pytest.raises(UsageError, match="not a router"):
        world.add_port_mapping(OUTSIDE, natpmp.Transport.TCP, 1, Address(HOME, 1))


async def _dial_from(
    world: MemoryNetwork, host: str, port: int, address: Address, into: list[trio.abc.Stream]
) -> None:
    with contextlib.suppress(PeerUnavailableError):
        into.append(await world.interface(host).connect(address, local_port=port))


async def test_dialling_from_the_listening_port_lets_that_address_answer_at_once(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """A simultaneous open: the home's attempt waits at the silent far end
    until the far end dials back from the address it went to; both get
    one connection."""
    world = world_with_home()
    home: list[trio.abc.Stream] = []
    outside: list[trio.abc.Stream] = []
    nursery.start_soon(_dial_from, world, HOME, PORT, Address(OUTSIDE, 5000), home)
    await trio.sleep(1)
    await _dial_from(world, OUTSIDE, 5000, Address(ROUTER.public_host, PORT), outside)
    await trio.sleep(0)
    assert home and outside
    await outside[0].send_all(b"through")
    assert await home[0].receive_some() == b"through"
    assert home[0].remote_address == Address(OUTSIDE, 5000)  # type: ignore[attr-defined]
    assert outside[0].remote_address == Address(ROUTER.public_host, PORT)  # type: ignore[attr-defined]


async def test_a_tcp_flow_admits_only_its_address_and_lapses(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    world = world_with_home()
    await _serve_home(world, nursery)
    nursery.start_soon(_dial_from, world, HOME, PORT, Address(OUTSIDE, 5000), [])
    await trio.sleep(1)
    # Another port of the same host: dropped, unanswered.
    with pytest.raises(PeerUnavailableError, match="no answer"):
        await world.interface(OUTSIDE).connect(Address(ROUTER.public_host, PORT), local_port=5001)
    # The flow's own address, after it lapsed (the home's attempt gave up
    # long before): dropped too.
    await trio.sleep(ROUTER.tcp_timeout)
    with pytest.raises(PeerUnavailableError, match="no answer"):
        await world.interface(OUTSIDE).connect(Address(ROUTER.public_host, PORT), local_port=5000)


async def test_a_symmetric_nat_shows_each_destination_another_port(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    symmetric = NatProfile("203.0.113.9", "192.168.9.1", port_preserving=False)
    world = world_with_home(symmetric)
    seen: list[Address] = []

    async def note(stream: trio.abc.Stream) -> None:
        seen.append(stream.remote_address)  # type: ignore[attr-defined]

    for port in (7000, 7001):
        await nursery.start(world.interface(OUTSIDE).serve, Address(OUTSIDE, port), note)
        await world.interface(HOME).connect(Address(OUTSIDE, port), local_port=PORT)
    await trio.sleep(1)
    assert [a.host for a in seen] == [symmetric.public_host] * 2
    assert len({a.port for a in seen}) == 2
    assert PORT not in {a.port for a in seen}
