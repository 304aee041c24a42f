"""The Network layer: addresses, real TCP/UDP on 127.0.0.1, and the memory world.

Behaviour that node code relies on runs against both implementations (the
``pair`` fixture); what only the memory world has — virtual-time latency,
bandwidth, partitions, killed hosts, seeded loss — runs under
``MockClock(autojump_threshold=0)`` via pytest-trio's ``autojump_clock``.
"""

from __future__ import annotations

import logging
import math
import random
import re
import socket
from collections.abc import Awaitable, Callable

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from p2pbackup.errors import LocalProtocolError, PeerUnavailableError, UsageError
from p2pbackup.net.memory import (
    DEFAULT_WINDOW,
    LinkProfile,
    MemoryNetwork,
    MemoryStream,
    NetworkStatistics,
)
from p2pbackup.net.network import Address, Network, TcpNetwork, peer_address

# -- addresses ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.com:80", Address("example.com", 80)),
        ("127.0.0.1:65535", Address("127.0.0.1", 65535)),
        ("127.0.0.1:0", Address("127.0.0.1", 0)),
        ("[::1]:8080", Address("::1", 8080)),
        ("[fe80::1%eth0]:1", Address("fe80::1%eth0", 1)),
        ("  node-3:0443\n", Address("node-3", 443)),
    ],
)
def test_address_parses(text: str, expected: Address) -> None:
    assert Address.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("example.com", "missing its port"),
        ("example.com:", "missing its port"),
        ("[::1]", "missing its port"),
        ("[::1]:", "missing its port"),
        ("[::1]8080", "missing its port"),
        (":80", "empty host"),
        ("[]:80", "empty host"),
        ("host:65536", "out of range 1..65535"),
        ("host:99999999999999999999", "out of range 1..65535"),
        ("host:-1", "not a number"),
        ("host:http", "not a number"),
        ("host:８０", "not a number"),  # full-width digits are no port
        ("::1:80", "needs brackets"),
        ("[::1:80", "never closes"),
        ("two words:80", "contains"),
    ],
)
def test_bad_addresses_say_what_is_wrong(text: str, reason: str) -> None:
    with pytest.raises(UsageError, match=re.escape(reason)) as caught:
        Address.parse(text)
    assert repr(text) in str(caught.value)


def test_port_zero_can_be_refused_for_addresses_to_dial() -> None:
    with pytest.raises(UsageError, match=r"'peer:0'.*out of range 1\.\.65535"):
        Address.parse("peer:0", allow_port_zero=False)
    assert Address.parse("peer:1", allow_port_zero=False) == Address("peer", 1)


def test_addresses_validate_when_built_directly() -> None:
    with pytest.raises(UsageError, match="out of range"):
        Address("host", 65536)
    with pytest.raises(UsageError, match="empty"):
        Address("", 80)


def test_address_str() -> None:
    assert str(Address("10.0.0.1", 7)) == "10.0.0.1:7"
    assert str(Address("::1", 7)) == "[::1]:7"


_names = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,30})", fullmatch=True)
_hosts = st.one_of(
    _names,
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
_addresses = st.builds(Address, _hosts, st.integers(0, 65535))


@given(_addresses)
def test_address_str_and_parse_are_inverses(address: Address) -> None:
    text = str(address)
    assert Address.parse(text) == address
    assert str(Address.parse(text)) == text


# -- both implementations -----------------------------------------------------------------


@attrs.frozen
class Pair:
    """A server's and a client's view of one network, and where to listen."""

    server: Network
    client: Network
    listen: Address
    #: An address where nothing listens.
    closed: Address
    #: For datagram endpoints.
    server_datagram: Address
    client_datagram: Address


def _free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(params=["tcp", "memory"])
def pair(request: pytest.FixtureRequest) -> Pair:
    if request.param == "tcp":
        network = TcpNetwork(connect_timeout=5)
        local = Address("127.0.0.1", 0)
        return Pair(network, network, local, Address("127.0.0.1", _free_tcp_port()), local, local)
    return _memory_pair(MemoryNetwork(seed=7, default_link=LinkProfile(latency=0.001)))


def _memory_pair(world: MemoryNetwork, client: str = "client", server: str = "server") -> Pair:
    return Pair(
        world.interface(server),
        world.interface(client),
        Address(server, 0),
        Address(server, 9),
        Address(server, 0),
        Address(client, 0),
    )


async def _receive_exactly(stream: trio.abc.Stream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


async def _receive_all(stream: trio.abc.Stream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some():
        data += chunk
    return bytes(data)


async def _shout(stream: trio.abc.Stream) -> None:
    """Answer one 5-byte request in capitals."""
    request = await _receive_exactly(stream, 5)
    await stream.send_all(b"pong:" + request.upper())


async def _echo(stream: trio.abc.Stream) -> None:
    while data := await stream.receive_some(65536):
        await stream.send_all(data)


async def test_data_goes_both_ways(pair: Pair, nursery: trio.Nursery) -> None:
    address = await nursery.start(pair.server.serve, pair.listen, _shout)
    assert address.port != 0
    stream = await pair.client.connect(address)
    await stream.send_all(b"hello")
    with trio.fail_after(5):
        assert await _receive_exactly(stream, 10) == b"pong:HELLO"
        # The handler returned, so the server closed its end.
        assert await stream.receive_some() == b""
    await stream.aclose()


async def test_megabytes_arrive_intact_and_in_order(pair: Pair, nursery: trio.Nursery) -> None:
    address = await nursery.start(pair.server.serve, pair.listen, _echo)
    payload = random.Random(1).randbytes(4 * 1024 * 1024)
    stream = await pair.client.connect(address)
    echoed = bytearray()

    async def read_back() -> None:
        echoed.extend(await _receive_exactly(stream, len(payload)))

    async with trio.open_nursery() as inner:
        inner.start_soon(read_back)
        view = memoryview(payload)
        sizes = random.Random(2)
        while view:
            size = sizes.randint(1, 200_000)
            await stream.send_all(view[:size])
            view = view[size:]
    assert echoed == payload
    await stream.aclose()


async def test_refused_connection_names_the_address(pair: Pair) -> None:
    with pytest.raises(PeerUnavailableError) as caught:
        await pair.client.connect(pair.closed)
    assert str(caught.value) == f"cannot reach {pair.closed}: connection refused"


async def test_a_failing_handler_is_logged_and_the_listener_goes_on(
    pair: Pair, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    async def handler(stream: trio.abc.Stream) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("handler bug")
        await _shout(stream)

    address = await nursery.start(pair.server.serve, pair.listen, handler)
    with caplog.at_level(logging.ERROR, logger="p2pbackup.net.network"):
        first = await pair.client.connect(address)
        # The failed handler's stream is closed: the client sees EOF, not a hang.
        assert await first.receive_some() == b""
        await first.aclose()
    assert any(
        record.exc_info and isinstance(record.exc_info[1], ValueError) for record in caplog.records
    )

    second = await pair.client.connect(address)
    await second.send_all(b"again")
    assert await _receive_exactly(second, 10) == b"pong:AGAIN"
    await second.aclose()


async def test_the_server_knows_where_a_connection_comes_from(
    pair: Pair, nursery: trio.Nursery
) -> None:
    seen: list[Address | None] = []

    async def handler(stream: trio.abc.Stream) -> None:
        seen.append(peer_address(stream))
        await stream.send_all(b"k")

    address = await nursery.start(pair.server.serve, pair.listen, handler)
    stream = await pair.client.connect(address)
    assert await stream.receive_some() == b"k"
    assert peer_address(stream) == address
    [source] = seen
    assert source is not None
    assert source.host == ("client" if isinstance(stream, MemoryStream) else "127.0.0.1")
    assert source.port != 0
    await stream.aclose()


@pytest.mark.parametrize("listen", ["127.0.0.1", "0.0.0.0", "::"])
async def test_a_node_dials_from_the_port_it_listens_on(listen: str, nursery: trio.Nursery) -> None:
    """``connect(local_port=...)`` shares the listener's port (SO_REUSEPORT),
    and the far end sees the connection come from that port."""
    network = TcpNetwork(connect_timeout=5)
    seen: list[Address | None] = []

    async def note(stream: trio.abc.Stream) -> None:
        seen.append(peer_address(stream))
        await stream.send_all(b"k")

    far = await nursery.start(network.serve, Address("127.0.0.1", 0), note)
    try:
        ours = await nursery.start(network.serve, Address(listen, 0), _shout)
    except UsageError:
        pytest.skip(f"no {listen} here")
    stream = await network.connect(far, local_port=ours.port)
    assert await stream.receive_some() == b"k"
    assert seen == [Address("127.0.0.1", ours.port)]
    await stream.aclose()
    # The port still takes connections, and still refuses a second listener.
    answer = await network.connect(Address("127.0.0.1", ours.port))
    await answer.aclose()
    with pytest.raises(UsageError, match="cannot listen on"):
        await network.serve(Address(listen, ours.port), _shout)


async def test_listening_twice_on_one_port_is_refused(pair: Pair, nursery: trio.Nursery) -> None:
    address = await nursery.start(pair.server.serve, pair.listen, _shout)
    with pytest.raises(UsageError, match=re.escape(f"cannot listen on {address}")):
        await pair.server.serve(address, _shout)


async def test_streams_conform_to_trio_stream_contract(pair: Pair, nursery: trio.Nursery) -> None:
    await trio.testing.check_half_closeable_stream(await _stream_maker(pair, nursery), None)


async def test_datagrams_go_both_ways(pair: Pair) -> None:
    server = await pair.server.open_datagram(pair.server_datagram)
    client = await pair.client.open_datagram(pair.client_datagram)
    assert server.local_address.port != 0
    assert client.local_address.port != 0
    await client.send(b"ping", server.local_address)
    with trio.fail_after(5):
        data, source = await server.receive()
    assert (data, source) == (b"ping", client.local_address)
    await server.send(b"pong", source)
    with trio.fail_after(5):
        assert await client.receive() == (b"pong", server.local_address)
    with pytest.raises(LocalProtocolError, match="70000 bytes"):
        await client.send(bytes(70000), server.local_address)
    await server.aclose()
    await client.aclose()


async def test_closing_a_datagram_endpoint_wakes_its_receiver(pair: Pair) -> None:
    endpoint = await pair.client.open_datagram(pair.client_datagram)

    async def receive_expecting_closed() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await endpoint.receive()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive_expecting_closed)
        await trio.testing.wait_all_tasks_blocked()
        await endpoint.aclose()


# -- TCP only -----------------------------------------------------------------------------


async def test_tcp_streams_do_not_wait_for_nagle(nursery: trio.Nursery) -> None:
    network = TcpNetwork()
    address = await nursery.start(network.serve, Address("127.0.0.1", 0), _shout)
    stream = await network.connect(address)
    assert isinstance(stream, trio.SocketStream)
    assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    await stream.aclose()


# -- memory only: streams -----------------------------------------------------------------


async def _stream_maker(
    pair: Pair, nursery: trio.Nursery, *, clog: bool = False
) -> Callable[[], Awaitable[tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]]]:
    """Connected (client, server) stream pairs made through connect and serve."""
    send, receive = trio.open_memory_channel[trio.abc.Stream](math.inf)

    async def keep(stream: trio.abc.Stream) -> None:
        await send.send(stream)
        await trio.sleep_forever()  # the check closes it; the nursery ends this

    address = await nursery.start(pair.server.serve, pair.listen, keep)

    async def make() -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
        client = await pair.client.connect(address)
        server = await receive.receive()
        assert isinstance(client, trio.abc.HalfCloseableStream)
        assert isinstance(server, trio.abc.HalfCloseableStream)
        if clog:
            # A full window each way: the next send blocks until a read.
            await client.send_all(b"\0" * DEFAULT_WINDOW)
            await server.send_all(b"\0" * DEFAULT_WINDOW)
        return client, server

    return make


async def test_clogged_memory_streams_conform(nursery: trio.Nursery) -> None:
    pair = _memory_pair(MemoryNetwork())
    await trio.testing.check_half_closeable_stream(
        await _stream_maker(pair, nursery), await _stream_maker(pair, nursery, clog=True)
    )


async def test_memory_streams_conform_with_latency_and_bandwidth_in_virtual_time(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    pair = _memory_pair(MemoryNetwork(default_link=LinkProfile(latency=0.02, bandwidth=10_000_000)))
    await trio.testing.check_half_closeable_stream(
        await _stream_maker(pair, nursery), await _stream_maker(pair, nursery, clog=True)
    )


async def _connected(
    world: MemoryNetwork, nursery: trio.Nursery, client: str = "a", server: str = "b"
) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    make = await _stream_maker(_memory_pair(world, client, server), nursery)
    return await make()


async def test_latency_is_exact_in_virtual_time(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    world = MemoryNetwork(default_link=LinkProfile(latency=0.05))
    start = trio.current_time()
    client, server = await _connected(world, nursery)
    assert trio.current_time() - start == pytest.approx(0.1)  # one round trip

    sent_at = trio.current_time()
    await client.send_all(bytes(64))
    assert await server.receive_some() == bytes(64)
    assert trio.current_time() - sent_at == pytest.approx(0.05, abs=1e-9)

    sent_at = trio.current_time()
    await server.send_all(b"back")
    assert await client.receive_some() == b"back"
    assert trio.current_time() - sent_at == pytest.approx(0.05, abs=1e-9)


async def test_bandwidth_takes_its_time(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    world = MemoryNetwork(default_link=LinkProfile(bandwidth=1_000_000))
    client, server = await _connected(world, nursery)
    payload = random.Random(3).randbytes(1_000_000)
    start = trio.current_time()
    async with trio.open_nursery() as inner:
        inner.start_soon(client.send_all, payload)
        assert await _receive_exactly(server, len(payload)) == payload
    assert trio.current_time() - start == pytest.approx(1.0, abs=0.01)
    assert world.statistics().stream_bytes_sent == len(payload)


async def test_a_home_uplink_is_one_queue_for_every_peer_and_slower_than_its_downlink(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    world = MemoryNetwork()
    world.set_access("home", uplink=250_000, downlink=1_000_000)
    to_b = await _connected(world, nursery, "home", "b")
    to_c = await _connected(world, nursery, "home", "c")
    start = trio.current_time()
    finished: list[float] = []

    async def transfer(sender: trio.abc.Stream, receiver: trio.abc.Stream) -> None:
        async with trio.open_nursery() as inner:
            inner.start_soon(sender.send_all, bytes(250_000))
            await _receive_exactly(receiver, 250_000)
        finished.append(trio.current_time() - start)

    async with trio.open_nursery() as both:
        both.start_soon(transfer, *to_b)
        both.start_soon(transfer, *to_c)
    # Two peers, one uplink of 250 kB/s: 500 kB take 2 s, not 1.
    assert max(finished) == pytest.approx(2.0, abs=0.01)
    # The other way the downlink's 1 MB/s holds.
    start = trio.current_time()
    finished.clear()
    async with trio.open_nursery() as back:
        back.start_soon(transfer, to_b[1], to_b[0])
    assert finished == [pytest.approx(0.25, abs=0.01)]


async def test_streams_between_two_hosts_share_the_link(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    world = MemoryNetwork()
    world.set_link("a", "b", LinkProfile(bandwidth=1_000_000))
    first = await _connected(world, nursery)
    second = await _connected(world, nursery)
    start = trio.current_time()
    finished: list[float] = []

    async def transfer(client: trio.abc.Stream, server: trio.abc.Stream) -> None:
        async with trio.open_nursery() as inner:
            inner.start_soon(client.send_all, bytes(500_000))
            await _receive_exactly(server, 500_000)
        finished.append(trio.current_time() - start)

    async with trio.open_nursery() as both:
        both.start_soon(transfer, *first)
        both.start_soon(transfer, *second)
    # Each alone would take 0.5 s; sharing one link, the pair needs 1 s.
    assert max(finished) == pytest.approx(1.0, abs=0.01)


async def test_a_reader_that_does_not_read_stops_the_writer(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    world = MemoryNetwork(default_link=LinkProfile(latency=0.01))
    client, server = await _connected(world, nursery)
    payload = random.Random(4).randbytes(8 * 1024 * 1024)
    done = trio.Event()

    async def write() -> None:
        await client.send_all(payload)
        done.set()

    nursery.start_soon(write)
    await trio.sleep(60)
    assert not done.is_set()
    # Memory stays bounded: only one window's worth left the writer.
    assert world.statistics().stream_bytes_sent <= DEFAULT_WINDOW

    assert await _receive_exactly(server, len(payload)) == payload
    await done.wait()


async def test_sending_on_a_closed_stream(nursery: trio.Nursery) -> None:
    world = MemoryNetwork()
    client, server = await _connected(world, nursery)
    await client.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"x")
    assert await server.receive_some() == b""
    with pytest.raises(trio.BrokenResourceError):
        await server.send_all(b"x")


async def test_unknown_host_fails_at_once(autojump_clock: trio.testing.MockClock) -> None:
    world = MemoryNetwork(default_link=LinkProfile(latency=1))
    start = trio.current_time()
    with pytest.raises(PeerUnavailableError, match=r"cannot reach nowhere:1: no such host"):
        await world.interface("a").connect(Address("nowhere", 1))
    assert trio.current_time() == start


async def test_refusal_costs_a_round_trip(autojump_clock: trio.testing.MockClock) -> None:
    world = MemoryNetwork(default_link=LinkProfile(latency=0.25))
    world.interface("b")
    start = trio.current_time()
    with pytest.raises(PeerUnavailableError, match="connection refused"):
        await world.interface("a").connect(Address("b", 80))
    assert trio.current_time() - start == pytest.approx(0.5)


async def test_a_partition_breaks_streams_and_connects_until_healed(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    world = MemoryNetwork(default_link=LinkProfile(latency=0.01), connect_timeout=3)
    a_to_b = await _connected(world, nursery, "a", "b")
    c_to_b = await _connected(world, nursery, "c", "b")
    listener = a_to_b[0].remote_address if isinstance(a_to_b[0], MemoryStream) else None
    assert listener is not None

    world.partition({"a"}, {"b", "c"})
    client, server = a_to_b
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"x")
    with pytest.raises(trio.BrokenResourceError):
        await client.receive_some()
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some()
    with pytest.raises(trio.BrokenResourceError):
        await server.send_all(b"x")

    start = trio.current_time()
    with pytest.raises(PeerUnavailableError, match=r"cannot reach b:\d+: no answer within 3 s"):
        await world.interface("a").connect(listener)
    assert trio.current_time() - start == pytest.approx(3)

    # Within a group all is well.
    await c_to_b[0].send_all(b"still here")
    assert await _receive_exactly(c_to_b[1], 10) == b"still here"

    world.heal()
    stream = await world.interface("a").connect(listener)
    await stream.aclose()
    assert world.statistics().streams_broken == 1


async def test_a_partition_loses_what_is_on_the_wire(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    world = MemoryNetwork(default_link=LinkProfile(latency=1))
    client, server = await _connected(world, nursery)
    await client.send_all(b"arrived")
    await trio.sleep(1)
    await client.send_all(b"in flight")
    world.partition({"a"}, {"b"})
    # What had arrived can still be read, then the break shows.
    assert await server.receive_some() == b"arrived"
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some()
    assert world.statistics().stream_bytes_dropped == len(b"in flight")


async def test_a_killed_host_answers_nothing(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    world = MemoryNetwork(default_link=LinkProfile(latency=0.01), connect_timeout=2)
    client, server = await _connected(world, nursery, "a", "b")
    assert isinstance(client, MemoryStream)
    endpoint = await world.interface("b").open_datagram(Address("b", 53))
    sender = await world.interface("a").open_datagram(Address("a", 0))

    world.kill_host("b")
    with pytest.raises(trio.BrokenResourceError):
        await client.receive_some()
    with pytest.raises(trio.BrokenResourceError):
        await server.send_all(b"x")
    with pytest.raises(PeerUnavailableError, match="no answer within 2 s"):
        await world.interface("a").connect(client.remote_address)
    with pytest.raises(trio.BrokenResourceError):
        await endpoint.receive()
    before = world.statistics().datagrams_dropped
    await sender.send(b"hello?", Address("b", 53))
    assert world.statistics().datagrams_dropped == before + 1
    with pytest.raises(PeerUnavailableError, match=r"this host \(b\) is down"):
        await world.interface("b").connect(Address("a", 1))

    # Restarted, it serves again on the same port.
    world.revive_host("b")
    await nursery.start(world.interface("b").serve, client.remote_address, _shout)
    stream = await world.interface("a").connect(client.remote_address)
    await stream.send_all(b"alive")
    assert await _receive_exactly(stream, 10) == b"pong:ALIVE"


# -- memory only: datagrams ---------------------------------------------------------------


async def test_datagrams_arrive_after_the_latency(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = MemoryNetwork(default_link=LinkProfile(latency=0.05))
    a = await world.interface("a").open_datagram(Address("a", 0))
    b = await world.interface("b").open_datagram(Address("b", 4000))
    start = trio.current_time()
    await a.send(b"x", b.local_address)
    assert await b.receive() == (b"x", a.local_address)
    assert trio.current_time() - start == pytest.approx(0.05, abs=1e-9)
    # Nothing bound there: silently gone, like UDP.
    await a.send(b"y", Address("b", 4001))
    assert world.statistics().datagrams_dropped == 1


async def _surviving_datagrams(seed: int, count: int, loss: float) -> list[int]:
    world = MemoryNetwork(seed=seed, default_link=LinkProfile(latency=0.001, loss=loss))
    a = await world.interface("a").open_datagram(Address("a", 0))
    b = await world.interface("b").open_datagram(Address("b", 0))
    for number in range(count):
        await a.send(number.to_bytes(4, "big"), b.local_address)
    await trio.sleep(1)
    survivors = []
    while True:
        with trio.move_on_after(0.1):
            data, _ = await b.receive()
            survivors.append(int.from_bytes(data, "big"))
            continue
        break
    assert world.statistics().datagrams_dropped == count - len(survivors)
    return survivors


async def test_datagram_loss_follows_the_profile_and_the_seed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    first = await _surviving_datagrams(seed=11, count=1000, loss=0.2)
    assert 0.75 <= len(first) / 1000 <= 0.85
    assert first == sorted(first)  # one link, one latency: order kept
    assert await _surviving_datagrams(seed=11, count=1000, loss=0.2) == first
    assert await _surviving_datagrams(seed=12, count=1000, loss=0.2) != first


async def test_partitioned_datagrams_are_dropped(autojump_clock: trio.testing.MockClock) -> None:
    world = MemoryNetwork(default_link=LinkProfile(latency=0.1))
    a = await world.interface("a").open_datagram(Address("a", 0))
    b = await world.interface("b").open_datagram(Address("b", 0))
    await a.send(b"on the way", b.local_address)
    world.partition({"a"}, {"b"})
    await a.send(b"after", b.local_address)
    with trio.move_on_after(1) as scope:
        await b.receive()
    assert scope.cancelled_caught
    assert world.statistics().datagrams_dropped == 2
    world.heal()
    await a.send(b"healed", b.local_address)
    assert await b.receive() == (b"healed", a.local_address)


def test_statistics_are_an_immutable_snapshot() -> None:
    world = MemoryNetwork()
    stats = world.statistics()
    assert stats == NetworkStatistics()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.datagrams_sent = 1  # type: ignore[misc]


def test_link_profiles_are_checked() -> None:
    with pytest.raises(UsageError, match="latency"):
        LinkProfile(latency=-1)
    with pytest.raises(UsageError, match="bandwidth"):
        LinkProfile(bandwidth=0)
    with pytest.raises(UsageError, match="loss"):
        LinkProfile(loss=1.5)
    with pytest.raises(UsageError, match="more than one partition group"):
        MemoryNetwork().partition({"a"}, {"a", "b"})
