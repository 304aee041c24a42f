"""Sixty virtual days of a home's background maintenance, on the memory network.

Twelve storage nodes and the owner's home. The owner backs up a tree, then
runs ``serve`` — its keeper audits and repairs — while every node sleeps
eight hours a night (bedtimes spread over four hours), two nodes die for
good, one rots (every shard file it holds gets a flipped byte in every
block) and one quietly deletes half of its shard files. At the end every
pack has at least r healthy shards on live nodes (the nodes' files are
read and checked against the roots, not the owner's word for it), a
restore without the dead nodes is exact, and the shards repair put on new
holders are within twice the data actually lost.

**Data actually lost**: the bytes of the shard files on the dead nodes when
they died, of the files the rotting node held when it rotted, and of those
the deleting node deleted (each file once). **Repair traffic**: the bytes
the owner's index counts under the purpose ``repair`` — sent (rebuilt
shards put on new holders), and beside it received (shards fetched to
rebuild from).

Virtual time runs with ``MockClock(autojump_threshold=0)``; worker threads
are run inline for the 60 days, so that the clock cannot jump past a
deadline while a thread works (the backup before runs with real threads,
under a clock that waits for them).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from p2pbackup.app import daemon, operations
from p2pbackup.app.home import Home
from p2pbackup.core import formats, merkle
from p2pbackup.engine import snapshots
from p2pbackup.engine.backup import Backup
from p2pbackup.engine.restore import Restorer
from p2pbackup.engine.treediff import diff_trees
from p2pbackup.maintenance.repair import RepairPolicy
from p2pbackup.model import PackRecord
from p2pbackup.net.memory import LinkProfile, MemoryNetwork
from p2pbackup.net.network import Address
from p2pbackup.node.server import StorageServer
from p2pbackup.node.shardhost import SHARDS_DIR, ShardHost

from .engine_helpers import SMALL, make_tree, restored_path
from .net_helpers import identity

pytestmark = pytest.mark.slow

PORT = 47470
HOUR = 3600.0
DAY = 24 * HOUR
DAYS = 60
NODES = 12
K, N = 4, 8
#: Unix seconds at virtual time 0.
T0 = 1_900_000_000.0
#: Who fails, how and when (day of the simulation).
DIES = {"node10": 10, "node11": 25}
ROTS = ("node3", 5)
DELETES = ("node6", 15)


def virtual_now() -> float:
    return T0 + trio.current_time()


@pytest.fixture
def virtual_clock() -> trio.testing.MockClock:
    """Waits for worker threads during the backup — a whole second of real
    time before it jumps, as a loaded machine can starve a thread for longer
    than any timeout should count — then the simulation runs them inline
    and lets the clock jump at once."""
    return trio.testing.MockClock(autojump_threshold=1.0)


@attrs.define(eq=False)
class SimNode:
    """A storage node that can sleep, wake and die: its host stays on disk."""

    name: str
    world: MemoryNetwork
    host: ShardHost
    server: StorageServer
    scope: trio.CancelScope | None = None
    dead: bool = False

    @property
    def address(self) -> Address:
        return Address(self.name, PORT)

    async def _serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope() as self.scope:
            network = self.world.interface(self.name)
            await network.serve(
                self.address, self.server.handle_connection, task_status=task_status
            )

    async def wake(self, nursery: trio.Nursery) -> None:
        if self.dead or self.scope is not None:
            return
        self.world.revive_host(self.name)
        await nursery.start(self._serve)

    def sleep(self) -> None:
        if self.scope is None:
            return
        self.world.kill_host(self.name)
        self.scope.cancel()
        self.scope = None

    def die(self) -> None:
        self.sleep()
        self.dead = True

    def shard_files(self) -> list[Path]:
        return sorted(p for p in (self.host.root / SHARDS_DIR).rglob("*") if p.is_file())


def bedtime(index: int) -> float:
    """Seconds after midnight a node goes to sleep: 22:00 to 01:40."""
    return (22 * HOUR + index * 20 * 60) % DAY


def asleep(index: int, t: float) -> bool:
    return (t - bedtime(index)) % DAY < 8 * HOUR


@attrs.define
class Losses:
    """Shard files lost, each counted once: (node, file name) → bytes."""

    files: dict[tuple[str, str], int] = attrs.Factory(dict)

    def add(self, node: str, path: Path) -> None:
        self.files.setdefault((node, path.name), path.stat().st_size)

    @property
    def total(self) -> int:
        return sum(self.files.values())


def rot(node: SimNode, losses: Losses, block: int) -> None:
    """Flip a byte in every block of every shard file not rotted yet."""
    for path in node.shard_files():
        if (node.name, path.name) in losses.files:
            continue
        losses.add(node.name, path)
        data = bytearray(path.read_bytes())
        for at in range(0, len(data), block):
            data[at] ^= 0xA5
        path.write_bytes(bytes(data))


def delete_half(node: SimNode, losses: Losses, rng: random.Random) -> None:
    files = node.shard_files()
    for path in rng.sample(files, len(files) // 2):
        losses.add(node.name, path)
        path.unlink()


async def inline_run_sync(function: Callable[..., Any], *args: Any, **_: Any) -> Any:
    await trio.lowlevel.checkpoint()
    return function(*args)


async def test_sixty_days_of_sleep_death_rot_and_deletion(
    tmp_path: Path,
    nursery: trio.Nursery,
    virtual_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world = MemoryNetwork(seed=11, default_link=LinkProfile(latency=0.002), connect_timeout=2.0)
    nodes = []
    for i in range(NODES):
        name = f"node{i}"
        host = ShardHost.open(tmp_path / name)
        server = StorageServer(host, identity(name))
        node = SimNode(name, world, host, server)
        await node.wake(nursery)
        nodes.append(node)
    by_id = {node.server.identity.node_id.hex(): node for node in nodes}
    home = Home(tmp_path / "home")
    operations.init_home(home, attrs.evolve(SMALL, k=K, n=N))
    owner = world.interface("owner")
    source = make_tree(tmp_path / "src", big=1_200_000)
    async with operations.open_repository(home, network=owner) as repo:
        for node in nodes:
            await operations.add_node_peer(
                repo, str(node.address), node.server.identity.node_id.hex()
            )
        await Backup(repo).run([source])
        packs_before = len(repo.index.pack_ids())

    # From here on: threads inline, and the clock jumps as soon as all wait.
    monkeypatch.setattr(trio.to_thread, "run_sync", inline_run_sync)
    virtual_clock.autojump_threshold = 0
    home.config_path.write_text('version = 1\n[maintenance]\nrepair_interval = "6h"\n')
    start = trio.current_time()
    serving = trio.CancelScope()
    stopped = trio.Event()

    async def serve_home() -> None:
        try:
            with serving:
                await daemon.serve(
                    home,
                    daemon.ServeOptions(listen=Address("owner", PORT)),
                    network=owner,
                    clock=virtual_now,
                    rng=random.Random(5),
                )
        finally:
            stopped.set()

    nursery.start_soon(serve_home)
    losses = Losses()
    rng = random.Random(3)
    step = HOUR / 3  # bedtimes fall on these steps
    for tick in range(int(DAYS * DAY / step)):
        elapsed = tick * step
        day = int(elapsed // DAY)
        clock = virtual_now() % DAY
        for i, node in enumerate(nodes):
            if DIES.get(node.name) == day and not node.dead:
                for path in node.shard_files():
                    losses.add(node.name, path)
                node.die()
            elif asleep(i, clock):
                node.sleep()
            else:
                await node.wake(nursery)
        rotten = next(n for n in nodes if n.name == ROTS[0])
        if day >= ROTS[1]:
            rot(rotten, losses, SMALL.block_size)
        deleter = next(n for n in nodes if n.name == DELETES[0])
        if day == DELETES[1] and not any(node == deleter.name for node, _ in losses.files):
            delete_half(deleter, losses, rng)
        await trio.sleep_until(start + elapsed + step)
    serving.cancel()
    await stopped.wait()
    for node in nodes:
        await node.wake(nursery)

    async with operations.open_repository(home, network=owner) as repo:
        records: list[PackRecord] = []
        for pack_id in repo.index.pack_ids():
            record = repo.index.pack(pack_id, with_blobs=False)
            assert record is not None
            records.append(record)
        traffic = [t for t in repo.index.traffic() if t.purpose == "repair"]
        disqualified = repo.index.disqualified_peers()
        owner_hex = repo.keyring.node_id.hex()
    assert len(records) >= packs_before
    for record in records:
        healthy = set()
        where = []
        for location in record.shards:
            node = by_id[location.peer_id]
            where.append(node.name)
            if node.dead:
                continue
            name = formats.shard_id(record.pack_id, location.index).hex()
            path = node.host.root / SHARDS_DIR / owner_hex / name[:2] / name
            if not path.is_file():
                continue
            data = path.read_bytes()
            if merkle.merkle_root(data, record.block_size) == location.merkle_root:
                healthy.add(location.peer_id)
        # Small packs (tree and index blobs) may have a smaller code.
        r = RepairPolicy().threshold(record.k, record.n)
        assert len(healthy) >= r, (record.pack_id.hex()[:16], where, len(healthy))

    uploads = sum(t.sent for t in traffic)
    downloads = sum(t.received for t in traffic)
    lost = losses.total
    print(
        f"\n60 days: data lost {lost} bytes; repair uploads {uploads} bytes "
        f"(ratio {uploads / lost:.2f}), uploads + downloads {uploads + downloads} bytes "
        f"(ratio {(uploads + downloads) / lost:.2f}); disqualified: "
        f"{sorted(by_id[p].name for p in disqualified)}"
    )
    assert uploads <= 2.0 * lost

    for node in nodes:
        if node.dead:
            world.kill_host(node.name)
    async with operations.open_repository(home, network=owner) as repo:
        _, snap = snapshots.resolve(repo.index, "latest")
        summary = await Restorer(repo, tmp_path / "out").run(snap, None)
    assert summary.ok, summary.lines()
    assert diff_trees(source, restored_path(tmp_path / "out", source)) == []
