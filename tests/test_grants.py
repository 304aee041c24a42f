"""The owner's side of delegation: the repair grant built from its index
(every pack's shard map, nothing about files), handed to its delegates, and
revoked at every node peer."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio

from p2pbackup.app import operations
from p2pbackup.app.home import Home
from p2pbackup.core import delegation, formats
from p2pbackup.core.keys import Keyring
from p2pbackup.engine.backup import Backup
from p2pbackup.engine.index import Index
from p2pbackup.engine.repository import Repository
from p2pbackup.maintenance import grants
from p2pbackup.net.memory import LinkProfile, MemoryNetwork
from p2pbackup.net.network import Address
from p2pbackup.node.server import StorageServer
from p2pbackup.node.shardhost import ShardHost
from p2pbackup.wire.session import Identity

from .engine_helpers import SMALL

PORT = 47470
#: File names and sizes no grant may carry.
NAMES = (b"tax-return-2026.pdf", b"diary.txt", b"holiday.jpg")
SIZES = (123_457, 70_001, 9_999)


@attrs.define
class Net:
    world: MemoryNetwork
    alice: Home
    hosts: dict[str, ShardHost]

    def repository(self) -> contextlib.AbstractAsyncContextManager[Repository]:
        return operations.open_repository(self.alice, network=self.world.interface("alice"))

    def node_id(self, name: str) -> bytes:
        return Keyring.from_master_secret(Home(self.alice.path.parent / name).load_secret()).node_id


def new_home(root: Path, name: str) -> Home:
    home = Home(root / name)
    operations.init_home(home, attrs.evolve(SMALL, k=1, n=2))
    return home


@pytest.fixture
async def net(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Net]:
    world = MemoryNetwork(seed=3, default_link=LinkProfile(latency=0.0005), connect_timeout=0.5)
    alice = new_home(tmp_path, "alice")
    hosts = {}
    for name in ("bob", "carol"):
        home = new_home(tmp_path, name)
        host = ShardHost.open(home.hosted_path)
        keyring = Keyring.from_master_secret(home.load_secret())
        server = StorageServer(host, Identity.from_keyring(keyring))
        await nursery.start(
            world.interface(name).serve, Address(name, PORT), server.handle_connection
        )
        hosts[name] = host
    net = Net(world, alice, hosts)
    async with net.repository() as repo:
        for name in ("bob", "carol"):
            await operations.add_node_peer(repo, f"{name}:{PORT}", net.node_id(name).hex())
    yield net
    for host in hosts.values():
        host.close()


async def back_up(net: Net, source: Path) -> None:
    source.mkdir()
    for name, size in zip(NAMES, SIZES, strict=True):
        (source / name.decode()).write_bytes(bytes([len(name)]) * size)
    async with net.repository() as repo:
        await Backup(repo).run([source])


async def test_a_grant_maps_every_pack_and_says_nothing_of_the_files(
    net: Net, tmp_path: Path
) -> None:
    await back_up(net, tmp_path / "source")
    async with net.repository() as repo:
        grant = grants.build_grant(repo.index, repo.keyring.node_id, sequence=1, now=5)
        sealed = delegation.seal_grant(repo.keyring.identity_seed, grant)
        keyring = repo.keyring
        index = repo.index
        assert [p.pack_id for p in grant.packs] == index.pack_ids()
        for pack in grant.packs:
            record = index.pack(pack.pack_id, with_blobs=False)
            assert record is not None
            assert (pack.size, pack.k, pack.n, pack.shard_size, pack.block_size) == (
                record.size,
                record.k,
                record.n,
                record.shard_size,
                record.block_size,
            )
            held = {
                (s.index, grant.peers[s.peer].node_id.hex(), s.merkle_root) for s in pack.shards
            }
            assert held == {(s.index, s.peer_id, s.merkle_root) for s in record.shards}
        assert [p.node_id for p in grant.peers] == sorted(
            [net.node_id("bob"), net.node_id("carol")]
        )
        assert all(peer.addresses for peer in grant.peers)
    # No key, no file name, no blob id, no file size.
    for secret in (keyring.data_key, keyring.dedup_key, keyring.record_key, keyring.identity_seed):
        assert secret not in sealed
    for name in NAMES:
        assert name not in sealed
    async with net.repository() as repo:
        for blob_id in repo.index.iter_blob_ids():
            assert blob_id not in sealed
    numbers = {grant.sequence, grant.issued_at}
    for pack in grant.packs:
        numbers |= {pack.size, pack.k, pack.n, pack.shard_size, pack.block_size}
        numbers |= {s.index for s in pack.shards} | {s.peer for s in pack.shards}
    assert not numbers & set(SIZES)
    assert formats.decode_repair_grant(formats.encode_repair_grant(grant)) == grant


async def test_delegates_take_the_grant_and_lose_it_when_removed(net: Net, tmp_path: Path) -> None:
    await back_up(net, tmp_path / "source")
    bob, carol = net.node_id("bob"), net.node_id("carol")
    now = int(time.time())  # the nodes' clock checks the certificates
    async with net.repository() as repo:
        assert await grants.hand_grants(repo) == []  # no delegate, nothing asked
        with repo.index.transaction():
            repo.index.add_delegate(bob, 1)
        [handed] = await grants.hand_grants(repo, clock=lambda: float(now))
        assert handed.ok and handed.sequence == now
        [again] = await grants.hand_grants(repo, clock=lambda: float(now))
        assert again.sequence == now + 1  # a new grant is always newer
        [row] = repo.index.delegates()
        assert row.grant_sequence == now + 1 and row.problem == ""
        alice_id = repo.keyring.node_id
    held = net.hosts["bob"].held_grant(alice_id)
    assert held is not None and held.sequence == now + 1
    grant = delegation.open_grant(held.grant, owner=alice_id)
    assert grant.packs and grant.sequence == held.sequence
    certificate = delegation.open_certificate(held.certificate)
    assert certificate.delegate == bob and certificate.owner == alice_id
    assert net.hosts["carol"].held_grant(alice_id) is None

    async with net.repository() as repo:
        told, warnings = await grants.revoke(repo, bob, clock=lambda: now + 100.0)
    assert (told, warnings) == (2, [])
    assert net.hosts["bob"].held_grant(alice_id) is None
    for host in net.hosts.values():
        assert host.revoked_before(alice_id, bob) == now + 101
    assert net.hosts["carol"].revoked_before(alice_id, carol) == 0


async def test_a_delegate_that_cannot_be_reached_is_recorded_with_its_problem(
    net: Net, tmp_path: Path
) -> None:
    bob = net.node_id("bob")
    net.world.kill_host("bob")
    async with net.repository() as repo:
        with repo.index.transaction():
            repo.index.add_delegate(bob, 1)
        [handed] = await grants.hand_grants(repo)
        assert not handed.ok and handed.sequence is None
        [row] = repo.index.delegates()
        assert row.problem == handed.problem and row.granted_at is None
        # After a backup, prune or repair: a warning, never a failure.
        [warning] = await grants.hand_out(repo)
        assert warning.startswith(f"warning: delegate {bob.hex()} did not take its repair grant (")


def test_grants_are_due_for_a_new_delegate_and_weekly(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    assert not grants.grants_due(index, 1_000_000)  # no delegate, nothing due
    with index.transaction():
        index.add_delegate(b"D" * 20, 1)
    assert grants.grants_due(index, 1_000_000)
    with index.transaction():
        index.set_delegate_granted(b"D" * 20, 1_000_000, 1)
    assert not grants.grants_due(index, 1_000_000 + grants.REGRANT_SECONDS - 1)
    assert grants.grants_due(index, 1_000_000 + grants.REGRANT_SECONDS)
    index.close()
