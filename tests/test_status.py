"""``status``: what it says about peers and data must be the truth now."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import attrs
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from p2pbackup import operations
from p2pbackup.backup import Backup
from p2pbackup.home import Home
from p2pbackup.net import Address, LinkProfile, MemoryNetwork
from p2pbackup.status import SAFE_MARGIN, data_health, gather_status

from .cli_helpers import cli_ok, make_source, make_world
from .engine_helpers import SMALL, make_tree
from .net_helpers import start_node

PORT = 47470


@given(
    st.lists(
        st.tuples(st.integers(1, 6), st.lists(st.sampled_from("abcdefgh"), max_size=8)),
        max_size=20,
    ),
    st.sets(st.sampled_from("abcdefgh")),
)
def test_data_health_counts_every_pack_once(
    packs: list[tuple[int, list[str]]], online: set[str]
) -> None:
    health = data_health(((k, 8, holders) for k, holders in packs), online)
    assert health.packs == len(packs) == health.safe + health.at_risk + health.unrecoverable
    margins = [sum(h in online for h in holders) - k for k, holders in packs]
    assert health.unrecoverable == sum(m < 0 for m in margins)
    assert health.at_risk == sum(0 <= m < SAFE_MARGIN for m in margins)
    assert health.min_margin == (min(margins) if margins else None)


def test_data_health_lines_say_what_matters() -> None:
    health = data_health([(2, 5, "abcde"), (2, 5, "abcxy")], {"a", "b", "c", "d", "e"})
    assert health.lines() == [
        "data: all 2 packs ≥ 3 healthy shards (≥ 1 more than needed)",
        "1 packs at risk: fewer than 2 spare healthy shards",
    ]
    lost = data_health([(3, 5, "abcde")], {"a"})
    assert lost.lines() == [
        "1 packs unrecoverable: fewer healthy shards than needed, until their peers come back"
    ]


async def test_status_tells_the_truth_as_nodes_die(tmp_path: Path, nursery: trio.Nursery) -> None:
    world = MemoryNetwork(seed=9, default_link=LinkProfile(latency=0.0005), connect_timeout=0.5)
    nodes = [
        await start_node(
            nursery,
            world.interface(f"node{i}"),
            tmp_path / f"node{i}",
            name=f"node{i}",
            listen=Address(f"node{i}", PORT),
        )
        for i in range(5)
    ]
    home = Home(tmp_path / "home")
    operations.init_home(home, attrs.evolve(SMALL, k=2, n=5))
    network = world.interface("owner")
    async with operations.open_repository(home, network=network) as repo:
        for node in nodes:
            await operations.add_node_peer(repo, str(node.address), node.identity.node_id.hex())
        await Backup(repo).run([make_tree(tmp_path / "tree")])
        packs = len(repo.index.pack_ids())
        shard_bytes = sum(repo.index.pack(p).shard_size for p in repo.index.pack_ids())  # type: ignore[union-attr]

    async def status_now() -> dict[str, object]:
        async with operations.open_repository(home, network=network) as repo:
            return (await gather_status(home, repo, now=1_800_000_000)).to_json()

    report = await status_now()
    assert [p["online"] for p in report["peers"]] == [True] * 5  # type: ignore[index]
    assert report["data"] == {
        "packs": packs,
        "safe": packs,
        "at_risk": 0,
        "unrecoverable": 0,
        "min_healthy": 5,
        "min_margin": 3,
    }
    dead = {nodes[1].identity.node_id.hex(), nodes[3].identity.node_id.hex()}
    world.kill_host("node1")
    world.kill_host("node3")
    report = await status_now()
    for peer in report["peers"]:  # type: ignore[attr-defined]
        assert peer["online"] == (peer["peer_id"] not in dead)
        assert peer["shards_held_for_us"] == packs  # every pack has a shard on each
        assert peer["bytes_held_for_us"] == shard_bytes
        if peer["online"]:
            assert peer["last_seen"] == 1_800_000_000 and peer["problem"] == ""
        else:
            assert peer["last_seen"] == 1_800_000_000  # from the first status
            assert peer["problem"]
    assert report["data"] == {
        "packs": packs,
        "safe": 0,
        "at_risk": packs,
        "unrecoverable": 0,
        "min_healthy": 3,
        "min_margin": 1,
    }
    world.kill_host("node0")
    world.kill_host("node2")
    report = await status_now()
    assert report["data"]["unrecoverable"] == packs  # type: ignore[index]


@pytest.mark.slow
def test_status_through_the_cli(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=2, n=4)
    world.backup(make_source(tmp_path / "src", big=200_000))
    report = json.loads(world.ok("status", "--json").stdout)
    assert report["data"]["safe"] == report["data"]["packs"] > 0
    shutil.rmtree(world.peers[0])
    report = json.loads(world.ok("status", "--json").stdout)
    offline = [p for p in report["peers"] if not p["online"]]
    assert [p["location"] for p in offline] == [str(world.peers[0])]
    assert report["data"]["at_risk"] == report["data"]["packs"]
    assert report["node"]["addresses"] == []
    text = cli_ok("status", home=world.home).stdout
    assert "OFFLINE" in text and "packs at risk" in text
