"""Bandwidth limits: streams kept to a rate on loopback, the flags and the config.

The rates are measured on real sockets in real time: what a limited network
sends (or reads) in all, over the time it took, must come within 10 % of the
limit — below it, or only as far above as the first burst allows.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import trio

from p2pbackup.errors import UsageError
from p2pbackup.net.limits import BURST, BandwidthLimits, PacedNetwork, PacedStream, limited
from p2pbackup.net.network import TcpNetwork, peer_address
from p2pbackup.node.schedule import parse_home_config

from .cli_helpers import cli_error, cli_ok, make_source
from .net_helpers import LOOPBACK_ANY_PORT
from .test_network_e2e import new_node

KIB = 1024
LIMIT = 1024 * KIB  # bytes a second
SIZE = 3 * LIMIT  # three seconds' worth


def _within_ten_percent(moved: int, seconds: float, limit: float) -> None:
    rate = moved / seconds
    assert 0.9 * limit <= rate <= 1.1 * limit, f"{rate / KIB:.0f} KiB/s against {limit / KIB:.0f}"


def _small_buffer(stream: trio.abc.Stream, option: int) -> None:
    """Keep a socket's buffer small: loopback's grow to megabytes, which
    would take in the whole transfer and hide whether the sender is held."""
    assert isinstance(stream, trio.SocketStream)
    stream.setsockopt(socket.SOL_SOCKET, option, 64 * KIB)


async def _sink(stream: trio.abc.Stream) -> None:
    while await stream.receive_some(1 << 16):
        pass


async def test_an_upload_keeps_to_its_limit(nursery: trio.Nursery) -> None:
    tcp = TcpNetwork()
    address = await nursery.start(tcp.serve, LOOPBACK_ANY_PORT, _sink)
    network = PacedNetwork(tcp, BandwidthLimits(upload=LIMIT))
    stream = await network.connect(address)
    assert peer_address(stream) == address  # who is at the other end, still known
    started = time.monotonic()
    for _ in range(SIZE // (256 * KIB)):
        await stream.send_all(bytes(256 * KIB))
    elapsed = time.monotonic() - started
    await stream.aclose()
    # The first burst goes at once; everything after it at the rate.
    _within_ten_percent(SIZE - BURST, elapsed, LIMIT)


async def test_two_streams_share_one_limit(nursery: trio.Nursery) -> None:
    tcp = TcpNetwork()
    address = await nursery.start(tcp.serve, LOOPBACK_ANY_PORT, _sink)
    network = PacedNetwork(tcp, BandwidthLimits(upload=LIMIT))

    async def send_half() -> None:
        stream = await network.connect(address)
        for _ in range(SIZE // 2 // (128 * KIB)):
            await stream.send_all(bytes(128 * KIB))
        await stream.aclose()

    started = time.monotonic()
    async with trio.open_nursery() as both:
        both.start_soon(send_half)
        both.start_soon(send_half)
    _within_ten_percent(SIZE - BURST, time.monotonic() - started, LIMIT)


async def test_a_download_keeps_to_its_limit_and_slows_the_sender(
    nursery: trio.Nursery,
) -> None:
    tcp = TcpNetwork()
    sent_at: list[float] = []

    async def send(stream: trio.abc.Stream) -> None:
        _small_buffer(stream, socket.SO_SNDBUF)
        for _ in range(SIZE // (64 * KIB)):
            await stream.send_all(bytes(64 * KIB))
        sent_at.append(time.monotonic())

    address = await nursery.start(tcp.serve, LOOPBACK_ANY_PORT, send)
    network = PacedNetwork(tcp, BandwidthLimits(download=LIMIT))
    stream = await network.connect(address)
    assert isinstance(stream, PacedStream)
    _small_buffer(stream.stream, socket.SO_RCVBUF)
    started = time.monotonic()
    received = 0
    while received < SIZE:
        received += len(await stream.receive_some(1 << 16))
    elapsed = time.monotonic() - started
    await stream.aclose()
    _within_ten_percent(received - BURST, elapsed, LIMIT)
    # The sender was held back too (its window filled), not only the reader.
    assert sent_at and sent_at[0] - started > 0.5 * elapsed


async def test_served_streams_are_kept_to_the_limit_too(nursery: trio.Nursery) -> None:
    tcp = TcpNetwork()

    async def send(stream: trio.abc.Stream) -> None:
        await stream.send_all(bytes(SIZE))

    # The server's network is the limited one: what it serves is paced.
    network = PacedNetwork(tcp, BandwidthLimits(upload=LIMIT))
    address = await nursery.start(network.serve, LOOPBACK_ANY_PORT, send)
    stream = await tcp.connect(address)
    started = time.monotonic()
    received = 0
    while received < SIZE:
        received += len(await stream.receive_some(1 << 16))
    _within_ten_percent(received - BURST, time.monotonic() - started, LIMIT)
    await stream.aclose()


def test_no_limits_leave_the_network_as_it_is() -> None:
    tcp = TcpNetwork()
    assert limited(tcp, BandwidthLimits()) is tcp
    assert BandwidthLimits.from_kib(500, None) == BandwidthLimits(upload=500 * KIB)


def test_the_config_gives_serve_its_limits() -> None:
    config = parse_home_config(
        'version = 1\n[bandwidth]\nupload = "500K"\ndownload = "2M"\n', "config.toml"
    )
    assert config.bandwidth == BandwidthLimits(upload=500 * KIB, download=2 << 20)
    assert parse_home_config("version = 1\n", "c").bandwidth == BandwidthLimits()
    for table, wrong in (
        ('upload = "fast"', "upload"),
        ("upload = -5", "upload"),
        ('uplaod = "1M"', "uplaod"),
        ("download = true", "download"),
    ):
        with pytest.raises(UsageError, match=wrong) as raised:
            parse_home_config(f"version = 1\n[bandwidth]\n{table}\n", "config.toml")
        assert "\n" not in str(raised.value)


def test_a_limit_of_zero_is_refused_in_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    cli_ok("init", "--recovery-key-file", tmp_path / "key", home=home)
    message = cli_error("backup", "--limit-upload", "0", str(tmp_path), home=home)
    assert message == "--limit-upload must be at least 1 (KiB/s)"


@pytest.mark.slow
def test_backup_and_restore_through_the_cli_keep_to_their_limits(tmp_path: Path) -> None:
    nodes = [new_node(tmp_path / f"node{i}") for i in range(3)]
    # The third node serves what it holds at 256 KiB/s at most ([bandwidth]).
    (nodes[2].home / "config.toml").write_text('version = 1\n[bandwidth]\nupload = "256K"\n')
    try:
        for node in nodes:
            node.start()
        home = tmp_path / "home"
        cli_ok("init", "--shards", "2/3", "--recovery-key-file", tmp_path / "key", home=home)
        for node in nodes:
            cli_ok("peer", "add", node.address, node.node_id, home=home)
        source = make_source(tmp_path / "src", big=1_000_000)
        limit = 512 * KIB
        started = time.monotonic()
        done = cli_ok("backup", "--limit-upload", "512", "--json", source, home=home)
        elapsed = time.monotonic() - started
        stored = json.loads(done.stdout)["bytes_stored"]
        assert stored > 4 * BURST
        # Process start and the walk count against it: the rate is at most the limit.
        assert (stored - BURST) / elapsed <= 1.1 * limit, (stored, elapsed)
        assert elapsed > 0.6 * stored / limit
        snapshot = json.loads(done.stdout)["snapshot_id"]
        # The restore needs two of three shards of each pack: one from the node
        # that serves at 256 KiB/s, whichever the other.
        nodes[0].kill()
        started = time.monotonic()
        cli_ok("restore", snapshot, "--target", tmp_path / "out", home=home)
        elapsed = time.monotonic() - started
        held = sum(p.stat().st_size for p in nodes[2].hosted_shards())
        assert elapsed > 0.6 * held / (256 * KIB), (held, elapsed)
    finally:
        for node in nodes:
            node.stop()


def test_a_paced_network_hands_on_what_its_network_offers_besides() -> None:
    # The router's address, for port mapping, is the inner network's.
    paced = PacedNetwork(TcpNetwork(), BandwidthLimits(upload=LIMIT))
    assert paced.default_gateway() == TcpNetwork().default_gateway()  # type: ignore[attr-defined]
