"""The port-mapping client against the memory network's routers and fake ones."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import pytest
import trio
import trio.testing

from p2pbackup.app import daemon
from p2pbackup.errors import PortMappingError
from p2pbackup.net import natpmp
from p2pbackup.net.memory import MemoryNetwork, NatProfile
from p2pbackup.net.network import Address, default_gateway_in
from p2pbackup.net.portmap import MappingOutcome, PortMapper, find_gateway, keep_ports_mapped

from .engine_helpers import make_setup

ROUTER = NatProfile(public_host="203.0.113.1", gateway_host="192.168.1.1")
HOME = "192.168.1.20"
PORT = 4001
#: A router and a host of a world without NAT, for fake routers.
GATEWAY = "192.168.9.1"
ME = "192.168.9.9"


def home_world(profile: NatProfile = ROUTER) -> MemoryNetwork:
    world = MemoryNetwork()
    world.put_behind_nat(HOME, profile)
    return world


def test_the_gateway_is_read_from_the_route_table() -> None:
    table = (
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n"
        "eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n"
        "eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\n"
    )
    assert default_gateway_in(table) == "192.168.1.1"
    assert default_gateway_in(table.splitlines()[0]) is None
    assert default_gateway_in("header\neth0 00000000 zz 0003\n") is None


async def test_a_port_is_mapped_by_pcp_and_reaches_the_home(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = home_world()
    network = world.interface(HOME)
    assert find_gateway(network) == ROUTER.gateway_host
    mapper = PortMapper(network, ROUTER.gateway_host)
    mapping = await mapper.map(natpmp.Transport.TCP, PORT)
    assert mapping.method == "PCP"
    assert mapping.external == Address(ROUTER.public_host, PORT)
    assert [m.internal for m in world.port_mappings(ROUTER.public_host)] == [Address(HOME, PORT)]
    await mapper.unmap(mapping)
    assert world.port_mappings(ROUTER.public_host) == []


async def _fake_router(
    world: MemoryNetwork, answer: object, *, task_status: trio.TaskStatus[None]
) -> None:
    gateway = Address(GATEWAY, natpmp.SERVER_PORT)
    endpoint = await world.interface(GATEWAY).open_datagram(gateway)
    task_status.started()
    while True:
        data, source = await endpoint.receive()
        reply = answer(data)  # type: ignore[operator]
        if reply is not None:
            await endpoint.send(reply, source)


def _natpmp_only(data: bytes) -> bytes | None:
    """An older router: NAT-PMP only, refusing PCP with a version error."""
    if data[0] != 0:
        return bytes((0, 0x80 | data[1], 0, 1, 0, 0, 0, 9))
    request = natpmp.decode_request(data)
    if request is None:
        return natpmp.encode_address_answer(natpmp.AddressAnswer(0, 9, "198.51.100.9"))
    return natpmp.encode_natpmp_map_answer(
        natpmp.MapAnswer(request.transport, 0, request.internal_port, 6000, 1800, 9)
    )


async def test_an_older_router_is_asked_by_natpmp(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    world = MemoryNetwork()
    await nursery.start(_fake_router, world, _natpmp_only)
    mapper = PortMapper(world.interface(ME), GATEWAY)
    mapping = await mapper.map(natpmp.Transport.UDP, PORT)
    assert mapping.method == "NAT-PMP" and mapper.method == "NAT-PMP"
    assert (mapping.external, mapping.lifetime) == (Address("198.51.100.9", 6000), 1800)


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (lambda data: None, "did not answer NAT-PMP or PCP"),
        (lambda data: bytes((2, 0x81, 0, 2)) + bytes(56), "does not allow port mappings"),
        (lambda data: bytes((2, 0x81, 0, 0)) + b"\xff" * 7, "too short|not 60"),
        (lambda data: bytes((9, 0x81)) + bytes(10), "neither NAT-PMP nor PCP|version 9"),
    ],
)
async def test_a_router_that_does_not_map_says_why(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, answer: object, words: str
) -> None:
    world = MemoryNetwork()
    await nursery.start(_fake_router, world, answer)
    with pytest.raises(PortMappingError, match=words):
        await PortMapper(world.interface(ME), GATEWAY).map(natpmp.Transport.TCP, PORT)


async def test_ports_are_kept_mapped_renewed_and_deleted_on_stop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = home_world(NatProfile(ROUTER.public_host, ROUTER.gateway_host))
    outcomes: list[MappingOutcome] = []
    mapper = PortMapper(world.interface(HOME), ROUTER.gateway_host)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_ports_mapped, mapper, PORT, outcomes.append)
        await trio.sleep(1)
        mappings = world.port_mappings(ROUTER.public_host)
        assert {(m.transport, m.external_port) for m in mappings} == {
            (natpmp.Transport.TCP, PORT),
            (natpmp.Transport.UDP, PORT),
        }
        # Past the first lease: renewed every half hour, so still there.
        await trio.sleep(5000)
        assert len(world.port_mappings(ROUTER.public_host)) == 2
        nursery.cancel_scope.cancel()
    assert world.port_mappings(ROUTER.public_host) == []
    assert outcomes[0] == MappingOutcome(Address(ROUTER.public_host, PORT))
    assert len(outcomes) == 3


async def test_a_router_without_mapping_is_reported_with_the_reason(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = home_world(NatProfile("203.0.113.2", "192.168.2.1", port_mapping=False))
    outcomes: list[MappingOutcome] = []
    mapper = PortMapper(world.interface(HOME), "192.168.2.1")
    with trio.move_on_after(10):
        await keep_ports_mapped(mapper, PORT, outcomes.append)
    assert outcomes[0].external is None
    assert "did not answer" in (outcomes[0].reason or "")


async def test_serve_maps_its_port_publishes_it_and_deletes_it_on_stop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    setup = await make_setup(tmp_path, k=1, n=2)
    world = home_world()
    options = daemon.ServeOptions(listen=Address(HOME, PORT))
    caplog.set_level(logging.INFO, logger="p2pbackup")
    async with trio.open_nursery() as nursery:
        serving = await nursery.start(
            functools.partial(daemon.serve, setup.home, options, network=world.interface(HOME))
        )
        with trio.fail_after(10):
            while serving.discovery.advertised[0].host != ROUTER.public_host:
                await trio.sleep(0.01)
        assert {m.transport for m in world.port_mappings(ROUTER.public_host)} == set(
            natpmp.Transport
        )
        assert setup.home.read_addresses()[0] == str(Address(ROUTER.public_host, PORT))
        with trio.fail_after(30):
            while "reachability" not in caplog.text:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    # No friend to ask: the node says so.
    assert "reachability unknown: no friend answered" in caplog.text
    assert world.port_mappings(ROUTER.public_host) == []


async def test_serve_no_port_mapping_leaves_the_router_alone(tmp_path: Path) -> None:
    setup = await make_setup(tmp_path, k=1, n=2)
    world = home_world()
    options = daemon.ServeOptions(listen=Address(HOME, PORT), port_mapping=False)
    async with trio.open_nursery() as nursery:
        serving = await nursery.start(
            functools.partial(daemon.serve, setup.home, options, network=world.interface(HOME))
        )
        await trio.sleep(0.5)
        assert world.port_mappings(ROUTER.public_host) == []
        assert [a.host for a in serving.discovery.advertised] == [HOME]
        nursery.cancel_scope.cancel()


def _answers_another_port(data: bytes) -> bytes | None:
    request = natpmp.decode_request(data)
    assert request is not None
    return natpmp.encode_pcp_map_answer(
        natpmp.MapAnswer(request.transport, 0, 9999, 9999, 60, 1, request.nonce, "11.20.30.9")
    )


async def test_an_answer_to_another_request_is_not_taken(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    world = MemoryNetwork()
    await nursery.start(_fake_router, world, _answers_another_port)
    with pytest.raises(PortMappingError, match="another request"):
        await PortMapper(world.interface(ME), GATEWAY).map(natpmp.Transport.TCP, PORT)
