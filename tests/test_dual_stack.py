"""Listening on both IP families at once (``[::]``, the default of ``serve``).

One socket takes IPv6 and IPv4; a peer that came over IPv4 is named by its
IPv4 address, and datagrams go back to it there. Needs IPv6 on loopback.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from p2pbackup.app.home import Home
from p2pbackup.dht.discovery import advertised_addresses
from p2pbackup.net.network import BOTH_FAMILIES, Address, TcpNetwork, peer_address, unmapped

from .cli_helpers import CLI, base_env, cli_ok
from .netns_lab import Lab, wait_for


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="this host has no IPv6 loopback")


def test_a_mapped_ipv4_address_is_told_as_ipv4() -> None:
    assert unmapped("::ffff:192.0.2.7") == "192.0.2.7"
    assert unmapped("::FFFF:10.0.0.1") == "10.0.0.1"
    assert unmapped("2001:db8::1") == "2001:db8::1"
    assert unmapped("::ffff:1") == "::ffff:1"  # not an IPv4 mapping
    assert unmapped("example.org") == "example.org"


@needs_ipv6
async def test_one_listener_takes_both_families(nursery: trio.Nursery) -> None:
    network = TcpNetwork(connect_timeout=5)
    seen: list[Address | None] = []

    async def handler(stream: trio.abc.Stream) -> None:
        seen.append(peer_address(stream))
        await stream.send_all(b"hello")

    bound = await nursery.start(network.serve, Address(BOTH_FAMILIES, 0), handler)
    assert bound.host == BOTH_FAMILIES
    for host in ("127.0.0.1", "::1"):
        stream = await network.connect(Address(host, bound.port))
        assert await stream.receive_some(5) == b"hello"
        await stream.aclose()
    assert [a.host if a else None for a in seen] == ["127.0.0.1", "::1"]
    # Where the node's own commands dial it.
    assert bound.dialled_locally() == Address("127.0.0.1", bound.port)


@needs_ipv6
async def test_datagrams_of_both_families_come_and_go_on_one_endpoint() -> None:
    network = TcpNetwork()
    endpoint = await network.open_datagram(Address(BOTH_FAMILIES, 0))
    port = endpoint.local_address.port
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        peer = trio.socket.socket(family, socket.SOCK_DGRAM)
        await peer.bind((host, 0))
        await peer.sendto(b"ping", (host, port))
        with trio.fail_after(5):
            data, source = await endpoint.receive()
        assert data == b"ping" and source.host == host
        await endpoint.send(b"pong", source)
        with trio.fail_after(5):
            answer, _ = await peer.recvfrom(100)
        assert answer == b"pong"
        peer.close()
    await endpoint.aclose()


def test_a_node_on_both_families_publishes_an_address_of_each_that_routes_out() -> None:
    published = advertised_addresses(Address(BOTH_FAMILIES, 0), 47470)
    # Never the wildcard itself; loopback only where nothing routes out at all.
    hosts = [a.host for a in published]
    assert hosts and BOTH_FAMILIES not in hosts and "0.0.0.0" not in hosts
    assert all(a.port == 47470 for a in published)
    assert len({":" in h for h in hosts}) == len(hosts)  # at most one of each family


# -- in network namespaces: a node with an address of each family --------------------------


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[Lab]:
    """Two namespaces on one link, each with an IPv4 and an IPv6 address;
    the node's default routes point at the other, so both families route out."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None and shutil.which("ip", path="/usr/sbin:/sbin") is None:
        pytest.skip("needs ip (iproute2)")
    lab = Lab(prefix=f"p2pd{os.getpid() % 100000}-", root=tmp_path)
    try:
        for role in ("node", "client"):
            lab.add_namespace(role)
        lab.link("node", "eth0", "client", "eth0")
        for role, v4, v6 in (("node", NODE_V4, NODE_V6), ("client", CLIENT_V4, CLIENT_V6)):
            lab.address(role, "eth0", f"{v4}/24")
            # nodad: usable at once, not after duplicate address detection.
            lab.run(role, "ip", "-6", "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
        lab.run("node", "ip", "route", "add", "default", "via", CLIENT_V4)
        lab.run("node", "ip", "-6", "route", "add", "default", "via", CLIENT_V6)
        yield lab
    finally:
        lab.stop()


NODE_V4, CLIENT_V4 = "10.77.0.1", "10.77.0.2"
NODE_V6, CLIENT_V6 = "fd77::1", "fd77::2"


@pytest.mark.slow
def test_serve_by_default_publishes_and_serves_both_families(
    two_hosts: Lab, tmp_path: Path
) -> None:
    lab = two_hosts
    node = tmp_path / "node"
    cli_ok("init", "--recovery-key-file", tmp_path / "node.key", home=node)
    node_id = cli_ok("id", home=node).lines[-1]
    log = tmp_path / "node-serve.out"
    serve = ("serve", "--open", "--log-level", "info")
    lab.start("node", *CLI, "--home", node, *serve, env=base_env(), log=log)
    wait_for(lambda: "serving on" in log.read_text(), timeout=60, what="the node", logs=[log])
    assert "serving on [::]:47470" in log.read_text()
    # One address of each family, as friends will be told.
    assert list(Home(node).read_addresses()) == [f"{NODE_V4}:47470", f"[{NODE_V6}]:47470"]

    source = tmp_path / "src"
    source.mkdir()
    (source / "a.bin").write_bytes(os.urandom(200_000))
    for family, address in (("v4", f"{NODE_V4}:47470"), ("v6", f"[{NODE_V6}]:47470")):
        client = tmp_path / f"client-{family}"
        cli_ok(
            "init",
            "--shards",
            "1/3",
            "--recovery-key-file",
            tmp_path / f"{family}.key",
            home=client,
        )
        lab.cli("client", client, "peer", "add", address, node_id)
        folders = [tmp_path / f"folder-{family}-{i}" for i in range(2)]
        for folder in folders:
            folder.mkdir()
            lab.cli("client", client, "peer", "add-dir", folder)
        snapshot = lab.cli("client", client, "backup", source).splitlines()[-1]
        # Every pack has a shard on each of the three peers. The folders' shards
        # gone, the restore reads the node's, over this family.
        for folder in folders:
            shutil.rmtree(folder)
        target = tmp_path / f"out-{family}"
        lab.cli("client", client, "restore", snapshot, "--target", target)
        restored = [p for p in target.rglob("a.bin")]
        assert len(restored) == 1 and restored[0].read_bytes() == (source / "a.bin").read_bytes()
