"""What a peer learns: everything peers store and receive, checked against
what docs/privacy.md says they can learn.

Two homes back up the same tree, but for one file whose size differs by 9 %
(1,000,000 and 1,090,000 bytes, both in the 768 KiB–1.5 MiB bucket of the
default 12 MiB pack: docs/privacy.md says for which sizes the rule holds).
Then every file in every peer folder, every shard a storage node holds, and
every byte a node's server receives (before and after the Noise session's
decryption) is searched for the file's name, its plaintext and the owner's
pack ids, and the sizes a peer sees are compared between the two homes:
they must be exactly the same.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import attrs
import pytest
import trio

from p2pbackup.app import operations
from p2pbackup.app.home import Home
from p2pbackup.core import formats, packer
from p2pbackup.engine.backup import Backup
from p2pbackup.engine.index import Index
from p2pbackup.engine.rootrecord import ROOT_RECORD_MIN_SIZE
from p2pbackup.net.memory import LinkProfile, MemoryNetwork
from p2pbackup.net.network import Address
from p2pbackup.node import server as server_module
from p2pbackup.node.server import StorageServer
from p2pbackup.node.shardhost import ShardHost
from p2pbackup.wire import messages
from p2pbackup.wire.rpc import MessageChannel

from .cli_helpers import cli_inprocess, make_world
from .net_helpers import identity

K, N = 3, 6
TARGET = operations.DEFAULT_PACK_SIZE
#: The two sizes of the one file that differs: 9 % apart, in one bucket.
SIZES = (1_000_000, 1_090_000)
DIR_NAME = b"secret-project"
FILE_NAME = b"tax-return-2025.pdf"
NOTE_NAME = b"notes-on-the-merger.txt"
MARKER = b"CONFIDENTIAL-MARKER-7d1f"
NOTE = b"the quick brown fox knows the merger date\n" * 20
#: What no peer may ever see, in any file or on the wire.
NAMES = (DIR_NAME, FILE_NAME, NOTE_NAME)


def make_tree(root: Path, size: int) -> tuple[Path, bytes]:
    """The tree every home backs up, with the big file ``size`` bytes; and
    a slice from the middle of that file."""
    source = root / DIR_NAME.decode()
    source.mkdir(parents=True)
    data = MARKER + random.Random(size).randbytes(size - len(MARKER))
    (source / FILE_NAME.decode()).write_bytes(data)
    (source / NOTE_NAME.decode()).write_bytes(NOTE)
    return source, data[size // 2 : size // 2 + 48]


def shard_size(bucket: int) -> int:
    return formats.SHARD_HEADER_SIZE + -(-bucket // K)


#: Every size a stored shard of a K-of-N pack of at most the target may have.
SHARD_SIZES = {shard_size(bucket) for bucket in packer.pack_buckets(TARGET)}
SMALLEST_SHARD = shard_size(packer.pack_buckets(TARGET)[0])


def test_the_two_sizes_lie_in_one_bucket() -> None:
    # The premise of the comparisons below (docs/privacy.md): both new-data
    # sizes, padding and headers included, fall in (768 KiB, 1.5 MiB].
    buckets = packer.pack_buckets(TARGET)
    assert {packer.pack_bucket(size + 1000, TARGET) for size in SIZES} == {buckets[5]}
    assert buckets[4] < min(SIZES) and max(SIZES) * 1.01 < buckets[5]


def check_bytes(where: str, data: bytes, secrets: Iterable[bytes]) -> None:
    for secret in secrets:
        assert secret not in data, f"{where} holds {secret[:24]!r}"


def check_shard(where: str, data: bytes) -> None:
    """A stored shard: version 2 header (no pack id), a bucketed size."""
    assert len(data) in SHARD_SIZES, f"{where}: {len(data)} bytes"
    header = formats.decode_shard_header(data)
    assert data[4] == 2 and data[32:64] == bytes(32) and header.pack_id is None, where
    assert header.pack_size in packer.pack_buckets(TARGET), where


def pack_ids(home: Path) -> list[bytes]:
    index = Index(home / "index.sqlite")
    try:
        return index.pack_ids()
    finally:
        index.close()


def files_of(root: Path) -> Iterator[Path]:
    return (path for path in sorted(root.rglob("*")) if path.is_file())


# -- folder peers -------------------------------------------------------------------


def test_folder_peers_learn_nothing_but_bucketed_sizes(tmp_path: Path) -> None:
    worlds = []
    for size in SIZES:
        world = make_world(tmp_path / f"home{size}", k=K, n=N)
        source, middle = make_tree(tmp_path / f"src{size}", size)
        assert cli_inprocess("--home", world.home, "backup", source) == 0
        worlds.append((world, source, middle))
    secrets = [*NAMES, MARKER, NOTE[:40], *(middle for _, _, middle in worlds)]

    seen: list[list[list[int]]] = []
    for world, _source, _middle in worlds:
        ids = pack_ids(world.home)
        assert len(ids) == 3  # data, metadata (trees, snapshot), index
        sizes = []
        for peer in world.peers:
            peer_sizes = []
            for path in files_of(peer):
                data = path.read_bytes()
                where = str(path.relative_to(world.root))
                check_bytes(where, str(path).encode(), NAMES)
                check_bytes(where, data, [*secrets, *ids])
                if path.parent.parent.name == "shards":
                    check_shard(where, data)
                    peer_sizes.append(len(data))
                elif path.name == "root":
                    assert len(data) == ROOT_RECORD_MIN_SIZE, where
                    peer_sizes.append(len(data))
            sizes.append(sorted(peer_sizes))
        seen.append(sizes)
    # The 10 % rule: every peer holds files of exactly the same sizes.
    assert seen[0] == seen[1]
    assert seen[0][0] == sorted(
        [SMALLEST_SHARD, SMALLEST_SHARD, shard_size(3 << 19), ROOT_RECORD_MIN_SIZE]
    )

    # Backups that change nothing: no data pack, two packs of the smallest
    # bucket, and a root record whose size does not count them.
    world, source, _ = worlds[0]
    for _ in range(4):
        before = {path: path.stat().st_size for path in files_of(world.peers[0])}
        assert cli_inprocess("--home", world.home, "backup", source) == 0
        after = {path: path.stat().st_size for path in files_of(world.peers[0])}
        new = sorted(size for path, size in after.items() if path not in before)
        assert new == [SMALLEST_SHARD, SMALLEST_SHARD]
        roots = [size for path, size in after.items() if path.name == "root"]
        assert roots == [ROOT_RECORD_MIN_SIZE]


# -- storage nodes, and what crosses the wire -----------------------------------------


class Recording(trio.abc.Stream):
    """A stream that keeps a copy of every byte received."""

    def __init__(self, inner: trio.abc.Stream, sink: bytearray) -> None:
        self.inner = inner
        self.sink = sink

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        self.sink += data
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


@attrs.define
class Wire:
    """What the nodes' servers received: the raw (encrypted) bytes, the
    session's decrypted bytes, and the messages they made."""

    raw: bytearray = attrs.Factory(bytearray)
    plain: bytearray = attrs.Factory(bytearray)
    received: list[messages.Message] = attrs.Factory(list)

    def clear(self) -> None:
        self.raw.clear()
        self.plain.clear()
        self.received.clear()


async def test_storage_nodes_and_the_wire_learn_nothing_but_bucketed_sizes(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    wire = Wire()

    class RecordingChannel(MessageChannel):
        def __init__(self, stream: trio.abc.Stream) -> None:
            super().__init__(Recording(stream, wire.plain))

        async def receive_or_end(self) -> messages.Message | None:
            message = await super().receive_or_end()
            if message is not None:
                wire.received.append(message)
            return message

    monkeypatch.setattr(server_module, "MessageChannel", RecordingChannel)
    world = MemoryNetwork(seed=3, default_link=LinkProfile(latency=0.0005))
    nodes = []
    for i in range(N):
        host = ShardHost.open(tmp_path / f"node{i}")
        server = StorageServer(host, identity(f"node{i}"))

        async def handle(stream: trio.abc.Stream, server: StorageServer = server) -> None:
            await server.handle_connection(Recording(stream, wire.raw))

        address = await nursery.start(
            world.interface(f"node{i}").serve, Address(f"node{i}", 4747), handle
        )
        nodes.append((server, address))

    put_sizes = []
    root_sizes = []
    all_secrets: list[bytes] = [*NAMES, MARKER, NOTE[:40]]
    all_ids: list[bytes] = []
    for size in SIZES:
        home = Home(tmp_path / f"home{size}")
        operations.init_home(home, operations.default_config(K, N))
        source, middle = make_tree(tmp_path / f"src{size}", size)
        all_secrets.append(middle)
        network = world.interface(f"owner{size}")
        async with operations.open_repository(home, network=network) as repo:
            for server, address in nodes:
                await operations.add_node_peer(repo, str(address), server.identity.node_id.hex())
            wire.clear()
            await Backup(repo).run([source])
            ids = repo.index.pack_ids()
        assert len(ids) == 3
        all_ids.extend(ids)
        secrets = [*all_secrets, *ids]
        check_bytes("the raw bytes received", bytes(wire.raw), secrets)
        check_bytes("the bytes received in sessions", bytes(wire.plain), secrets)
        puts = collections.Counter[int]()
        for message in wire.received:
            if isinstance(message, messages.PutShard):
                assert message.size in SHARD_SIZES
                puts[message.size] += 1
            elif isinstance(message, messages.PutRoot):
                root_sizes.append(len(message.data))
        put_sizes.append(puts)
    # The 10 % rule on the wire: the same shard sizes, as many of each.
    assert put_sizes[0] == put_sizes[1] == {SMALLEST_SHARD: 2 * N, shard_size(3 << 19): N}
    assert set(root_sizes) == {ROOT_RECORD_MIN_SIZE}

    # Every file each node keeps: no names, no plaintext, no pack ids; and
    # one shard of each of the six packs, none naming its pack.
    for i in range(N):
        shards = 0
        for path in files_of(tmp_path / f"node{i}"):
            data = path.read_bytes()
            check_bytes(str(path), data, [*all_secrets, *all_ids])
            if data[:4] == b"P2PS":
                check_shard(str(path), data)
                shards += 1
        assert shards == 2 * len(ids)
