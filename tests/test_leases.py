"""Leases renewed by their owner: the pure plan, and renewal over the memory network."""

from __future__ import annotations

import time
from pathlib import Path

import attrs
import trio
from hypothesis import given
from hypothesis import strategies as st

from p2pbackup.app import operations
from p2pbackup.app.home import Home
from p2pbackup.core import formats
from p2pbackup.engine.backup import Backup
from p2pbackup.engine.index import LeasedShard
from p2pbackup.maintenance import leases
from p2pbackup.maintenance.leases import RENEW_MARGIN, plan_renewals, renew_leases
from p2pbackup.net.memory import LinkProfile, MemoryNetwork
from p2pbackup.net.network import Address
from p2pbackup.wire.messages import MAX_RENEW_SHARDS

from .engine_helpers import SMALL, make_tree
from .net_helpers import RunningNode, start_node

DAY = 86400
NOW = 1_800_000_000

shards = st.lists(
    st.builds(
        LeasedShard,
        pack_id=st.binary(min_size=32, max_size=32),
        index=st.integers(0, 20),
        peer_id=st.sampled_from(["a", "b", "c"]),
        lease_expiry=st.none() | st.integers(NOW - DAY, NOW + 400 * DAY),
    ),
    max_size=60,
)


@given(shards, st.integers(1, 7))
def test_the_plan_batches_exactly_the_due_shards_per_peer(
    listed: list[LeasedShard], batch_size: int
) -> None:
    plan = plan_renewals(listed, NOW, batch_size=batch_size)
    due = [s for s in listed if s.lease_expiry is None or s.lease_expiry < NOW + RENEW_MARGIN]
    for peer_id, batches in plan.items():
        assert batches, "a peer in the plan has something to renew"
        assert all(b.peer_id == peer_id for b in batches)
        assert all(1 <= len(b.shards) <= batch_size for b in batches)
        # Every batch but the last is full: no more requests than needed.
        assert all(len(b.shards) == batch_size for b in batches[:-1])
        renewed = [s for b in batches for s in b.shards]
        assert renewed == [s for s in due if s.peer_id == peer_id]
    assert {s.peer_id for s in due} == set(plan)


def test_a_lease_is_due_a_month_after_it_was_granted() -> None:
    granted = NOW + leases.LEASE_SECONDS
    assert not leases.is_due(granted, NOW + 29 * DAY)
    assert leases.is_due(granted, NOW + 31 * DAY)
    assert leases.is_due(None, NOW)
    full = [LeasedShard(bytes(32), i, "a", None) for i in range(MAX_RENEW_SHARDS + 1)]
    assert [len(b.shards) for b in plan_renewals(full, NOW)["a"]] == [MAX_RENEW_SHARDS, 1]


@attrs.define
class Clock:
    """The nodes' wall clock, moved by hand."""

    now: float

    def __call__(self) -> float:
        return self.now


async def make_nodes(
    tmp_path: Path, nursery: trio.Nursery, world: MemoryNetwork, clock: Clock, count: int
) -> list[RunningNode]:
    return [
        await start_node(
            nursery,
            world.interface(f"node{i}"),
            tmp_path / f"node{i}",
            name=f"node{i}",
            listen=Address(f"node{i}", 47470),
            clock=clock,
        )
        for i in range(count)
    ]


async def test_renewal_over_the_network_extends_the_leases_on_the_hosts(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    world = MemoryNetwork(seed=3, default_link=LinkProfile(latency=0.0005), connect_timeout=0.5)
    clock = Clock(time.time())
    nodes = await make_nodes(tmp_path, nursery, world, clock, 4)
    home = Home(tmp_path / "home")
    operations.init_home(home, attrs.evolve(SMALL, k=2, n=4))
    network = world.interface("owner")
    async with operations.open_repository(home, network=network) as repo:
        for node in nodes:
            await operations.add_node_peer(repo, str(node.address), node.identity.node_id.hex())
        await Backup(repo).run([make_tree(tmp_path / "src", big=100_000)])
        owner = repo.keyring.node_id
        by_peer = {node.identity.node_id.hex(): node for node in nodes}

        def hosted_expiries() -> dict[tuple[bytes, int], int]:
            found = {}
            for shard in repo.index.placed_shards():
                host = by_peer[shard.peer_id].host
                info = host.info(owner, formats.shard_id(shard.pack_id, shard.index))
                assert info is not None
                found[(shard.pack_id, shard.index)] = info.lease_expiry
            return found

        placed = hosted_expiries()
        assert placed
        # The put recorded what each host granted.
        recorded = {
            (s.pack_id, s.index): s.lease_expiry
            for s in repo.index.leased_shards(expiring_before=2**62)
        }
        assert recorded == placed
        # Nothing is due the day after: no peer is asked anything.
        world.kill_host("node0")  # it would fail the call if it were asked
        report = await renew_leases(repo, clock.now + DAY)
        assert report == leases.LeaseReport()
        # Forty days on, every lease is due; one node lost a shard, one is down.
        clock.now += 40 * DAY
        victim = next(node for node in nodes[1:] if node.host.list(owner)[0])
        lost = victim.host.list(owner)[0][0].shard_id
        victim.host.delete(owner, lost)
        report = await renew_leases(repo, clock.now)
        node0 = nodes[0].identity.node_id.hex()
        assert report.unanswered == [node0]
        assert report.missing == 1
        for (pack_id, index), expiry in placed.items():
            shard_id = formats.shard_id(pack_id, index)
            for node in nodes:
                info = node.host.info(owner, shard_id)
                if info is None:
                    continue
                if node is nodes[0]:
                    assert info.lease_expiry == expiry  # not reached: unchanged
                else:
                    assert info.lease_expiry == int(clock.now) + leases.LEASE_SECONDS
        # The index knows the new expiries: only node0's shards and the
        # missing one are due still.
        due = repo.index.leased_shards(expiring_before=leases.renew_before(clock.now))
        assert {s.peer_id for s in due} <= {node0, victim.identity.node_id.hex()}
        assert sum(1 for s in due if s.peer_id != node0) == 1
        # The missing shard is recorded as a failed audit, for repair and status.
        audits = repo.index.shard_audits()
        failed = [key for key, audit in audits.items() if audit.passed is False]
        assert len(failed) == 1
        assert audits[failed[0]].reason == leases.MISSING_REASON
