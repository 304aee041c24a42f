"""The DHT over real UDP: 20 ``p2pbackup serve`` processes on 127.0.0.1.

They join through one another (each through one node started before it),
publish their contact records, and every node's record is found through every
node. A stock client of the kademlia package, unmodified, joins the same DHT:
it can read a contact record with a plain ``get`` of the documented key
string, and its ``set`` of arbitrary values is stored by no p2pbackup node.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio_asyncio
from kademlia.network import Server
from kademlia.node import Node
from kademlia.utils import digest

from p2pbackup.dht import records

from .cli_helpers import CLI, base_env, cli_ok, restored
from .test_network_e2e import ServeProcess, new_node

pytestmark = pytest.mark.slow

COUNT = 20


@pytest.fixture(scope="module")
def dht_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServeProcess]]:
    root = tmp_path_factory.mktemp("dht")
    nodes = [new_node(root / f"node{i}") for i in range(COUNT)]
    rng = random.Random(4)
    try:
        for index, node in enumerate(nodes):
            if index == 0:
                node.start("127.0.0.1:0")
            else:
                node.start("127.0.0.1:0", "--bootstrap", nodes[rng.randrange(index)].address)
        yield nodes
    finally:
        errors = [node.stop() for node in nodes]
    assert not [e for e in errors if "Traceback" in e], errors


def lookup_all(nodes: list[ServeProcess]) -> dict[int, subprocess.Popen[bytes]]:
    """Through node i, look up node i+7's record (every node asked, every node sought)."""
    running = {}
    for index, via in enumerate(nodes):
        target = nodes[(index + 7) % len(nodes)]
        running[index] = subprocess.Popen(
            [
                *CLI,
                "--home",
                str(via.home.parent / "lookup-home"),
                "lookup",
                target.node_id,
                "--bootstrap",
                via.address,
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=base_env(),
        )
    return running


def test_twenty_nodes_over_udp_find_each_others_records(dht_nodes: list[ServeProcess]) -> None:
    pending = set(range(COUNT))
    deadline = time.monotonic() + 60
    failures: dict[int, str] = {}
    while pending and time.monotonic() < deadline:
        running = lookup_all(dht_nodes)
        for index, process in running.items():
            out, err = process.communicate(timeout=60)
            if index not in pending:
                continue
            if process.returncode == 0:
                found = json.loads(out)
                target = dht_nodes[(index + 7) % COUNT]
                assert found["node_id"] == target.node_id
                assert found["addresses"] == [target.address]
                pending.discard(index)
            else:
                failures[index] = err.decode(errors="replace")
        if pending:
            time.sleep(1)  # records still being published
    assert not pending, {i: failures.get(i) for i in pending}


async def test_a_stock_kademlia_client_reads_records_and_cannot_write(
    dht_nodes: list[ServeProcess],
) -> None:
    victim = dht_nodes[5]
    key_string = records.dht_key_string(records.RecordKind.CONTACT, bytes.fromhex(victim.node_id))
    assert key_string == f"p2pbackup:contact:{victim.node_id}"
    host, port = dht_nodes[11].address.rsplit(":", 1)

    async with trio_asyncio.open_loop():
        stock = Server()
        other = Server()
        await trio_asyncio.aio_as_trio(stock.listen)(0, "127.0.0.1")
        await trio_asyncio.aio_as_trio(other.listen)(0, "127.0.0.1")
        try:
            joined = await trio_asyncio.aio_as_trio(stock.bootstrap)([(host, int(port))])
            assert joined, "the stock client found no p2pbackup node"
            value = None
            with trio.move_on_after(30):
                while value is None:
                    value = await trio_asyncio.aio_as_trio(stock.get)(key_string)
                    if value is None:
                        await trio.sleep(1)
            assert isinstance(value, bytes)
            record = records.decode_record(value)
            assert record.node_id.hex() == victim.node_id
            assert [f"{a.host}:{a.port}" for a in record.addresses] == [victim.address]

            # Writes: an arbitrary key, and the victim's own key overwritten.
            # (The stock set reports success whenever anyone answered, whatever
            # the answer, so only what others then read tells.)
            await trio_asyncio.aio_as_trio(stock.set)("anything at all", b"a value")
            await trio_asyncio.aio_as_trio(stock.set)(key_string, b"not a record")

            # Ask every p2pbackup node directly (a stock client may hold the
            # writes itself): none holds the arbitrary value, and any that
            # holds the victim's key holds the genuine record.
            await trio_asyncio.aio_as_trio(other.bootstrap)([(host, int(port))])
            for node in dht_nodes:
                node_host, node_port = node.address.rsplit(":", 1)
                peer = Node(bytes.fromhex(node.node_id), node_host, int(node_port))
                for key in ("anything at all", key_string):
                    answered, answer = await trio_asyncio.aio_as_trio(
                        other.protocol.call_find_value
                    )(peer, Node(digest(key)))
                    assert answered, node.address
                    if isinstance(answer, dict):
                        assert key == key_string and answer == {"value": value}, node.address
        finally:
            stock.stop()
            other.stop()
    found = cli_ok(
        "lookup",
        victim.node_id,
        "--bootstrap",
        dht_nodes[0].address,
        "--json",
        home=Path(victim.home.parent / "lookup-home"),
    )
    assert json.loads(found.stdout)["addresses"] == [victim.address]


def test_open_mode_finds_nodes_offering_storage_and_backs_up_to_them(
    dht_nodes: list[ServeProcess], tmp_path: Path
) -> None:
    home = tmp_path / "stranger"
    cli_ok("init", "--shards", "2/4", "--recovery-key-file", tmp_path / "key", home=home)
    listed = cli_ok(
        "peer", "find", "--count", "4", "--bootstrap", dht_nodes[3].address, "--json", home=home
    )
    found = json.loads(listed.stdout)
    serving = {node.node_id: node.address for node in dht_nodes}
    assert len(found) == 4
    for entry in found:
        assert serving[entry["node_id"]] == entry["addresses"][0]
        assert entry["storage_offered"] > 0 and not entry["added"]
    cli_ok("peer", "find", "--count", "4", "--bootstrap", dht_nodes[3].address, "--add", home=home)
    peers = json.loads(cli_ok("peer", "list", "--json", home=home).stdout)
    assert sorted(p["peer_id"] for p in peers) == sorted(e["node_id"] for e in found)
    source = tmp_path / "source"
    source.mkdir()
    (source / "file").write_bytes(b"open mode " * 100_000)
    cli_ok("backup", source, home=home)
    cli_ok("restore", "latest", "--target", tmp_path / "back", home=home)
    copy = restored(tmp_path / "back", source) / "file"
    assert copy.read_bytes() == (source / "file").read_bytes()
