"""Dead and hung peers on the memory network, in virtual time.

Five storage nodes on the memory network hold a 3-of-5 backup, made in a
first trio run on the real clock. A second run, on trio's ``MockClock``, brings
three of them back; of the other two, one host refuses connections (nothing
listens) and one is **hung**: it accepts connections and never says a word.
In that run worker threads are replaced by calls in place, so that virtual
time stands still except where the network or a timer waits, and the
timings asserted below are exact: a restore, a status and a probe wait on
the hung peer for their patience's floor once, never for a timeout.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import trio
import trio.testing

from p2pbackup.app import operations
from p2pbackup.app.home import Home
from p2pbackup.engine import snapshots
from p2pbackup.engine.backup import Backup
from p2pbackup.engine.repository import PROBE_PATIENCE, READ_PATIENCE, Repository
from p2pbackup.engine.restore import Restorer
from p2pbackup.engine.treediff import diff_trees
from p2pbackup.maintenance.status import gather_status
from p2pbackup.model import PackRecord
from p2pbackup.net.memory import LinkProfile, MemoryNetwork
from p2pbackup.net.network import Address

from .engine_helpers import SMALL, make_tree, restored_path
from .net_helpers import start_node

PORT = 47470
LINK = LinkProfile(latency=0.0005)
NODES = [f"node{i}" for i in range(5)]
_T = TypeVar("_T")


@attrs.define
class World:
    """The backup made, and who plays dead in the second run."""

    tmp_path: Path
    home: Home
    source: Path
    hung: str
    refusing: str
    #: Peer id of each node.
    ids: dict[str, str]


async def _back_up(tmp_path: Path) -> tuple[Home, Path, dict[str, str]]:
    world = MemoryNetwork(seed=7, default_link=LINK, connect_timeout=0.5)
    home = Home(tmp_path / "home")
    operations.init_home(home, attrs.evolve(SMALL, k=3, n=5))
    source = make_tree(tmp_path / "src", big=1_500_000)
    async with trio.open_nursery() as nursery:
        nodes = [
            await start_node(
                nursery,
                world.interface(name),
                tmp_path / name,
                name=name,
                listen=Address(name, PORT),
            )
            for name in NODES
        ]
        async with operations.open_repository(home, network=world.interface("owner")) as repo:
            for node in nodes:
                await operations.add_node_peer(repo, str(node.address), node.identity.node_id.hex())
            await Backup(repo).run([source])
        nursery.cancel_scope.cancel()
    for node in nodes:
        node.host.close()
    return (
        home,
        source,
        {name: node.identity.node_id.hex() for name, node in zip(NODES, nodes, strict=True)},
    )


@pytest.fixture(scope="module")
def backed_up(tmp_path_factory: pytest.TempPathFactory) -> World:
    tmp_path = tmp_path_factory.mktemp("slow-peers")
    home, source, ids = trio.run(_back_up, tmp_path)
    # The two that hold data shards (the ones a read asks for first) of the
    # most packs play dead.
    held = collections.Counter(
        s.peer_id for record in _records(home) for s in record.shards if s.index < record.k
    )
    by_id = {peer_id: name for name, peer_id in ids.items()}
    hung, refusing = (by_id[peer] for peer, _count in held.most_common(2))
    return World(tmp_path, home, source, hung, refusing, ids)


def _records(home: Home) -> list[PackRecord]:
    from p2pbackup.engine.index import Index

    index = Index(home.index_path)
    try:
        records = [index.pack(p, with_blobs=False) for p in index.pack_ids()]
    finally:
        index.close()
    return [r for r in records if r is not None]


async def _inline(function: Callable[..., _T], *args: Any, **_options: Any) -> _T:
    await trio.lowlevel.checkpoint()
    return function(*args)


@pytest.fixture
def virtual(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Worker-thread calls run in place (a thread's work would let the
    mock clock jump while it runs)."""
    monkeypatch.setattr(trio.to_thread, "run_sync", _inline)
    yield


@attrs.define
class DeadWorld:
    network: MemoryNetwork
    #: When each connection to the hung node came.
    hung_connections: list[float]


def run_virtual(world: World, body: Callable[[DeadWorld, Repository], Awaitable[None]]) -> None:
    """Run ``body`` in virtual time with three nodes up, one refusing and
    one hung, on a repository of the home."""

    async def main() -> None:
        network = MemoryNetwork(seed=7, default_link=LINK, connect_timeout=0.5)
        dead = DeadWorld(network, [])

        async def hang(stream: trio.abc.Stream) -> None:
            dead.hung_connections.append(trio.current_time())
            await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            nodes = []
            for name in NODES:
                if name == world.hung:
                    await nursery.start(network.interface(name).serve, Address(name, PORT), hang)
                elif name == world.refusing:
                    network.interface(name)  # the host is up, nothing listens
                else:
                    nodes.append(
                        await start_node(
                            nursery,
                            network.interface(name),
                            world.tmp_path / name,
                            name=name,
                            listen=Address(name, PORT),
                        )
                    )
            owner = network.interface("owner")
            async with operations.open_repository(world.home, network=owner) as repo:
                await body(dead, repo)
            nursery.cancel_scope.cancel()
        for node in nodes:
            node.host.close()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_restore_waits_on_a_hung_peer_once_for_the_read_patience(
    backed_up: World, virtual: None
) -> None:
    target = backed_up.tmp_path / "restored"

    async def body(dead: DeadWorld, repo: Repository) -> None:
        _sid, snap = snapshots.resolve(repo.index, "latest")
        started = trio.current_time()
        summary = await Restorer(repo, target).run(snap, None)
        took = trio.current_time() - started
        assert summary.ok, summary.lines()
        # One hedge delay: the first reads that asked the hung peer waited
        # READ_PATIENCE.floor for it (the others answered within
        # milliseconds), and no read after them asked it again.
        assert READ_PATIENCE.floor <= took < 2 * READ_PATIENCE.floor, took
        assert 1 <= len(dead.hung_connections) <= 2
        assert max(dead.hung_connections) - started < READ_PATIENCE.floor
        hung_id = backed_up.ids[backed_up.hung]
        assert repo.run.is_slow(hung_id) and not repo.run.is_down(hung_id)
        # The refusing one failed at once and counts as down.
        assert repo.run.is_down(backed_up.ids[backed_up.refusing])
        assert dead.network.statistics().connections_failed <= 2

    run_virtual(backed_up, body)
    assert diff_trees(backed_up.source, restored_path(target, backed_up.source)) == []


def test_a_read_asks_a_peer_found_slow_last(backed_up: World, virtual: None) -> None:
    hung_id = backed_up.ids[backed_up.hung]
    # Packs whose data shards (asked first) include one on the hung peer.
    packs = [
        r
        for r in _records(backed_up.home)
        if any(s.peer_id == hung_id and s.index < r.k for s in r.shards)
    ]
    assert len(packs) >= 2

    async def body(dead: DeadWorld, repo: Repository) -> None:
        started = trio.current_time()
        await repo.read_pack(packs[0], use_cache=False)
        first = trio.current_time() - started
        # The other shards came in milliseconds: the hung one was overdue at
        # the floor, and the next shard fetched beside it came a few round
        # trips later.
        assert READ_PATIENCE.floor < first < READ_PATIENCE.floor + 0.05, first
        assert len(dead.hung_connections) == 1 and repo.run.is_slow(hung_id)
        started = trio.current_time()
        await repo.read_pack(packs[1], use_cache=False)
        assert trio.current_time() - started < 0.05
        assert len(dead.hung_connections) == 1  # not asked again

    run_virtual(backed_up, body)


def test_status_gives_up_on_a_hung_peer_at_the_probe_patience(
    backed_up: World, virtual: None
) -> None:
    async def body(dead: DeadWorld, repo: Repository) -> None:
        started = trio.current_time()
        status = await gather_status(repo)
        took = trio.current_time() - started
        states = {peer.peer_id: peer for peer in status.peers}
        hung = states[backed_up.ids[backed_up.hung]]
        refusing = states[backed_up.ids[backed_up.refusing]]
        assert not hung.online and not refusing.online
        assert sum(peer.online for peer in status.peers) == 3
        # The live peers answered within milliseconds: the hung one was given
        # up on at the floor, and status is done then (listing the live
        # peers' shards takes a few round trips more).
        assert took == pytest.approx(PROBE_PATIENCE.floor, abs=0.05)
        assert hung.problem.startswith(f"no answer within {PROBE_PATIENCE.floor:.1f} s, ")
        assert len(dead.hung_connections) == 1
        assert "refused" in refusing.problem
        # Both count as down for the rest of the run.
        assert all(repo.run.is_down(peer.peer_id) for peer in (hung, refusing))
        assert status.data.unrecoverable == 0 and status.data.min_healthy == 3

    run_virtual(backed_up, body)
