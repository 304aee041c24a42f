"""A friend backs up and restores through a node under floods: real processes.

Node B runs ``p2pbackup serve --open`` (strangers may store, so that they
have shards to download). From this process, and only to 127.0.0.1, come at
once: 200 downloads of 6 MiB shards that never read (from sixteen throwaway
identities and twenty loopback source addresses), 260 handshaked sessions of
throwaway identities that never ask anything, 300 connections that never say
a word, and a churn of new silent ones. Meanwhile home A, a friend of B,
backs up through the CLI to B and a folder, loses the folder, and restores
everything from B. B's memory stays under the bound docs/storage-node.md
states, and its log stays small. Every flood is bounded in count and time
and ends with the test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from pathlib import Path

import pytest
import trio

from p2pbackup.errors import ProtocolError
from p2pbackup.net.network import Address, TcpNetwork
from p2pbackup.stores.remote import RemoteShardStore
from p2pbackup.wire import messages
from p2pbackup.wire.session import Identity, secure_initiator

from .cli_helpers import cli_inprocess, cli_ok, make_source, restored, tree_state
from .test_lost_databases import serving_home

pytestmark = pytest.mark.slow

MiB = 1 << 20
#: docs/storage-node.md, "Floods": what a node's memory stays under here.
MEMORY_BOUND = 256 * MiB
#: docs/storage-node.md: about a line a second per kind at the very most.
LOG_BOUND = 200_000


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def connect(address: Address, source: str = "127.0.0.1") -> trio.SocketStream:
    return await trio.open_tcp_stream(address.host, address.port, local_address=source)


async def test_a_friend_backs_up_and_restores_through_floods(tmp_path: Path) -> None:
    node = serving_home(tmp_path / "b")
    friend_home = tmp_path / "a" / "home"
    assert cli_inprocess("--home", friend_home, "init", "--shards", "1/2",
                         "--recovery-key-file", tmp_path / "a" / "key") == 0  # fmt: skip
    folder = tmp_path / "a" / "folder"
    folder.mkdir()
    source = make_source(tmp_path / "source", big=300_000)
    before = tree_state(source)
    held: list[trio.abc.Stream] = []
    peak = 0

    def run(*args: str | os.PathLike[str], home: Path = friend_home) -> list[str]:
        return cli_ok(*args, home=home, timeout=300).lines

    try:
        node.start()
        assert node.process is not None
        pid = node.process.pid
        address = Address.parse(node.address)
        node_id = bytes.fromhex(node.node_id)
        code = (await trio.to_thread.run_sync(lambda: run("invite", home=node.home)))[-1]
        mine = run("invite", "--address", "127.0.0.1:9")[-1]
        await trio.to_thread.run_sync(lambda: run("friend", "add", mine, home=node.home))
        run("friend", "add", code)
        run("peer", "add-dir", folder)
        baseline = rss(pid)

        # Strangers store a shard each, to have something to download.
        network = TcpNetwork()
        strangers = [Identity.generate() for _ in range(16)]
        for n, stranger in enumerate(strangers):
            store = RemoteShardStore(network, stranger, address, node_id)
            await store.put(bytes([n]) * 32, os.urandom(6 * MiB))
            await store.aclose()

        async def stalled_download(n: int) -> None:
            stream = await connect(address, f"127.0.0.{10 + n % 20}")
            # A small window: the node's sends block soon, as with a reader
            # that stopped reading.
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
            held.append(stream)
            try:
                secure = await secure_initiator(stream, strangers[n % 16], expected_node_id=node_id)
                shard = bytes([n % 16]) * 32
                await secure.send_all(messages.encode_frame(messages.GetShard(shard, 0, None)))
            except (trio.BrokenResourceError, OSError, ProtocolError):
                pass  # turned away, or displaced before its handshake was over

        async def idle_stranger() -> None:
            stream = await connect(address)
            held.append(stream)
            # Turned away, or displaced before its handshake was over: as may be.
            with contextlib.suppress(trio.BrokenResourceError, OSError, ProtocolError):
                await secure_initiator(stream, Identity.generate(), expected_node_id=node_id)

        async def churn() -> None:
            for _ in range(600):  # 30 s at most
                held.append(await connect(address))
                await trio.sleep(0.05)

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, rss(pid))
                await trio.sleep(0.1)

        async with trio.open_nursery() as floods:
            floods.start_soon(sample)
            with trio.fail_after(120):
                for n in range(200):
                    await stalled_download(n)
                for _ in range(260):
                    await idle_stranger()
                for _ in range(300):
                    held.append(await connect(address))
            floods.start_soon(churn)

            # The friend, meanwhile: a backup, then a restore from B alone.
            await trio.to_thread.run_sync(lambda: run("backup", source))
            shutil.rmtree(folder / "p2pbackup-peer" / "owners")
            target = tmp_path / "restored"
            await trio.to_thread.run_sync(lambda: run("restore", "latest", "--target", target))
            assert tree_state(restored(target, source)) == before
            floods.cancel_scope.cancel()
    finally:
        for stream in held:
            await trio.aclose_forcefully(stream)
        errors = node.stop()
    assert "Traceback" not in errors
    print(f"node memory: {baseline / MiB:.0f} MiB before the floods, {peak / MiB:.0f} MiB at most")
    assert peak < MEMORY_BOUND, (baseline, peak)
    log_size = (node.home / "serve.log").stat().st_size
    assert log_size < LOG_BOUND, log_size
