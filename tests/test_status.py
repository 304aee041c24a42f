"""``status``: what it says about peers and data must be the truth now."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from p2pbackup.app import operations
from p2pbackup.app.daemon import node_identity
from p2pbackup.app.home import Home
from p2pbackup.app.requests import StatusRequest
from p2pbackup.app.service import Console, Service
from p2pbackup.core.formats import SHARD_HEADER_SIZE
from p2pbackup.core.merkle import merkle_root
from p2pbackup.dht.discovery import SERVING_NODE
from p2pbackup.dht.records import ContactRecord, RecordAddress, RelayAddress, sign_contact
from p2pbackup.engine.backup import Backup
from p2pbackup.engine.index import ProbeCounts
from p2pbackup.engine.progress import human_bytes
from p2pbackup.maintenance.status import SAFE_MARGIN, data_health, gather_status
from p2pbackup.model import PEER_KIND_NODE, PeerRecord
from p2pbackup.net.memory import LinkProfile, MemoryNetwork
from p2pbackup.net.network import Address, Network, TcpNetwork
from p2pbackup.node.relay import RUNNING_RELAY, Relay
from p2pbackup.node.schedule import RUNNING_OFFER, StorageOffer
from p2pbackup.node.server import StorageServer
from p2pbackup.node.shardhost import ShardHost
from p2pbackup.ui import pages
from p2pbackup.wire.relay import Route, hold_reservation

from .cli_helpers import cli_ok, make_source, make_world
from .engine_helpers import SMALL, make_setup, make_tree
from .net_helpers import LOOPBACK_ANY_PORT, identity, start_node

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
    # r = min(n, k + 3) with the default policy.
    assert health.below_threshold == sum(
        m + k < min(8, k + 3) for (k, _), m in zip(packs, margins, strict=True)
    )


def test_data_health_lines_say_what_matters() -> None:
    health = data_health([(2, 5, "abcde"), (2, 5, "abcxy")], {"a", "b", "c", "d", "e"})
    assert health.lines() == [
        "data: all 2 packs ≥ 3 healthy shards (≥ 1 more than needed)",
        "1 pack at risk: fewer than 2 spare healthy shards",
        "1 pack below the repair threshold: the next repair pass rebuilds its missing "
        "shards (`p2pbackup repair` runs one now)",
    ]
    # Below k no pass can rebuild anything: the threshold line does not promise it.
    lost = data_health([(3, 5, "abcde")], {"a"})
    assert lost.lines() == [
        "1 pack unrecoverable: fewer healthy shards than needed, until their peers come back",
    ]
    assert lost.below_threshold == 1
    some = data_health([(3, 5, "abxyz"), (2, 5, "abcde"), (2, 5, "abcde")], {"a", "b", "c"})
    assert some.lines()[-1] == (
        "2 packs below the repair threshold: the next repair pass rebuilds their missing "
        "shards (`p2pbackup repair` runs one now)"
    )
    # A pack at r is not repaired, whatever its spares.
    assert data_health([(2, 5, "abcde")], set("abcde")).below_threshold == 0


def host_for(home: Home, owner: bytes, size: int) -> None:
    """Make this home's node keep a shard of ``size`` bytes for ``owner``."""
    host = ShardHost.open(home.hosted_path)
    data = bytes(size)
    upload = host.begin_put(owner, bytes(32), size, 4096, merkle_root(data, 4096), 3600)
    assert upload is not None
    upload.write(data)
    upload.commit()
    host.close()


async def test_status_tells_the_truth_as_nodes_die(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The nodes' disk, as statvfs reports it: a real one's free space moves
    # with every file anything on the machine writes.
    free = 50 << 30
    real_statvfs = os.statvfs

    class NodeDisk:
        f_frsize = 4096
        f_bavail = free // 4096

    def statvfs(path: str | os.PathLike[str]) -> object:
        if Path(path).is_relative_to(tmp_path / "nodes"):
            return NodeDisk
        return real_statvfs(path)

    monkeypatch.setattr(os, "statvfs", statvfs)
    world = MemoryNetwork(seed=9, default_link=LinkProfile(latency=0.0005), connect_timeout=0.5)
    quota = 4 << 20
    nodes = [
        await start_node(
            nursery,
            world.interface(f"node{i}"),
            tmp_path / "nodes" / f"node{i}",
            name=f"node{i}",
            listen=Address(f"node{i}", PORT),
            owner_quota=quota if i < 2 else None,
        )
        for i in range(5)
    ]
    home = Home(tmp_path / "home")
    operations.init_home(home, attrs.evolve(SMALL, k=2, n=5))
    home.config_path.write_text('version = 1\n[storage]\ncapacity = "10G"\nper_friend = "1G"\n')
    network = world.interface("owner")
    async with operations.open_repository(home, network=network) as repo:
        for node in nodes:
            await operations.add_node_peer(repo, str(node.address), node.identity.node_id.hex())
        await Backup(repo).run([make_tree(tmp_path / "tree")])
        packs = len(repo.index.pack_ids())
        records = [repo.index.pack(p) for p in repo.index.pack_ids()]
        shard_bytes = sum(r.shard_size + SHARD_HEADER_SIZE for r in records if r is not None)
    # This home's node keeps 5000 bytes for node0: the balance with it shifts.
    host_for(home, nodes[0].identity.node_id, 5000)

    async def status_now() -> Any:
        async with operations.open_repository(home, network=network) as repo:
            return (
                await gather_status(repo, operations.hosting(home), now=1_800_000_000)
            ).to_json()

    report = await status_now()
    assert [p["online"] for p in report["peers"]] == [True] * 5
    assert report["node"]["capacity"] == 10 << 30
    assert report["node"]["per_friend"] == 1 << 30
    owner = home.node_id()
    by_id = {node.identity.node_id.hex(): node for node in nodes}
    for peer in report["peers"]:
        node = by_id[peer["peer_id"]]
        held = node.host.usage(owner)  # shards and root record, by the node's count
        assert held > peer["bytes_held_for_us"] == shard_bytes  # the root record aside
        if node in nodes[:2]:
            assert peer["offered"] == quota  # the quota binds, not the disk
            assert peer["room"] == quota - held
        else:
            assert peer["offered"] == held + free  # the disk's free space
        kept = 5000 if node is nodes[0] else 0
        assert peer["bytes_we_hold_for_it"] == kept
        assert peer["balance"] == shard_bytes - kept
    assert report["data"] == {
        "packs": packs,
        "safe": packs,
        "at_risk": 0,
        "unrecoverable": 0,
        "min_healthy": 5,
        "min_margin": 3,
        "below_threshold": 0,
    }
    lines = await gather_status_lines(home, network)
    peer_lines = {line.split()[1]: line for line in lines if line.startswith("peer ")}
    assert len(peer_lines) == 5
    first = peer_lines[nodes[0].identity.node_id.hex()]
    assert (
        f"balance: it keeps {human_bytes(shard_bytes - 5000)} more for us than we for it; "
        "offers us 4.0 MiB (" in first
    )
    assert first.endswith(" free)")
    assert (
        f"balance: it keeps {human_bytes(shard_bytes)} more for us than we for it;"
        in peer_lines[nodes[1].identity.node_id.hex()]
    )
    assert lines[0].endswith("offers 10.0 GiB in all, 1.0 GiB to each peer")
    # node4 loses every shard it held for us but still answers: online, and
    # no healthy shard of ours on it.
    lost = nodes[4].host
    shards, _more = lost.list(owner)
    for shard in shards:
        lost.delete(owner, shard.shard_id)
    report = await status_now()
    assert all(p["online"] for p in report["peers"])
    assert report["data"]["min_healthy"] == 4 and report["data"]["min_margin"] == 2
    # r = 5 for 2-of-5: every pack now waits for repair, and node4's shards are the gone ones.
    assert report["data"]["below_threshold"] == packs
    pending = {p["peer_id"]: p["maintenance"]["pending"] for p in report["peers"]}
    assert pending == {
        node.identity.node_id.hex(): packs if node is nodes[4] else 0 for node in nodes
    }
    dead = {nodes[1].identity.node_id.hex(), nodes[3].identity.node_id.hex()}
    world.kill_host("node1")
    world.kill_host("node3")
    report = await status_now()
    for peer in report["peers"]:
        assert peer["online"] == (peer["peer_id"] not in dead)
        assert peer["shards_held_for_us"] == packs  # every pack has a shard on each
        assert peer["bytes_held_for_us"] == shard_bytes
        if peer["online"]:
            assert peer["last_seen"] == 1_800_000_000 and peer["problem"] == ""
            assert peer["offered"] is not None
        else:
            assert peer["last_seen"] == 1_800_000_000  # from the first status
            assert peer["problem"]
            assert peer["offered"] is None and peer["room"] is None
    assert report["data"] == {
        "packs": packs,
        "safe": 0,
        "at_risk": packs,
        "unrecoverable": 0,
        "min_healthy": 2,  # node0 and node2: node4 answers but holds none
        "min_margin": 0,
        "below_threshold": packs,
    }
    # Unseen for less than the grace period: offline, not gone.
    assert sum(p["maintenance"]["pending"] for p in report["peers"]) == packs
    world.kill_host("node0")
    world.kill_host("node2")
    report = await status_now()
    assert report["data"]["unrecoverable"] == packs
    # Every status counted, for each peer, whether it answered.
    async with operations.open_repository(home, network=network) as repo:
        counts = repo.index.probe_counts()
    answered = {0: 5, 1: 4, 2: 5, 3: 4, 4: 6}  # the backup's probe, then five statuses
    for i, node in enumerate(nodes):
        assert counts[node.identity.node_id.hex()] == ProbeCounts(6, answered[i])
    lines = await gather_status_lines(home, network)
    offline = [line for line in lines if "OFFLINE" in line]
    assert len(offline) == 4 and all("offer unknown" in line for line in offline)


async def gather_status_lines(home: Home, network: Network) -> list[str]:
    async with operations.open_repository(home, network=network) as repo:
        return (await gather_status(repo, operations.hosting(home), now=1_800_000_000)).lines()


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


async def test_status_in_the_daemon_reports_what_it_runs_with(tmp_path: Path) -> None:
    setup = await make_setup(tmp_path, k=1, n=3)
    setup.home.config_path.write_text('version = 1\n[storage]\ncapacity = "10G"\n')
    async with operations.open_repository(setup.home) as repo:
        report = await gather_status(repo, operations.hosting(setup.home))
        assert (report.node.capacity, report.node.per_friend) == (10 << 30, None)
        # `serve --capacity 5G --owner-quota 1G` overrides the config: status
        # run by that daemon says so.
        token = RUNNING_OFFER.set(StorageOffer(5 << 30, 1 << 30))
        try:
            report = await gather_status(repo, operations.hosting(setup.home))
        finally:
            RUNNING_OFFER.reset(token)
        assert (report.node.capacity, report.node.per_friend) == (5 << 30, 1 << 30)


async def test_a_peer_reached_through_a_relay_shows_relayed(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """B cannot be dialled (its address on record answers nothing) and keeps a
    reservation at R; the DHT names R as B's relay. ``status`` reaches B through
    R and says so, D directly; the dashboard's peers page shows both. Run by
    a daemon that relays (R's relay standing in for it), it also reports what
    that relay carried."""
    network = TcpNetwork(connect_timeout=2)
    home = Home(tmp_path / "home")
    operations.init_home(home, attrs.evolve(SMALL, k=1, n=2))
    owner = node_identity(home)
    b, r = identity("status-relayed-b"), identity("status-relay-r")
    relay = Relay(r.node_id, {owner.node_id, b.node_id}.__contains__)
    r_server = StorageServer(ShardHost.open(tmp_path / "r"), r, relay=relay.serve)
    r_address = await nursery.start(network.serve, LOOPBACK_ANY_PORT, r_server.handle_connection)
    b_server = StorageServer(ShardHost.open(tmp_path / "b"), b)
    await nursery.start(
        hold_reservation, network, b, Route(r_address, r.node_id), b_server.handle_connection
    )
    direct = await start_node(nursery, network, tmp_path / "d", name="status-direct")
    nowhere = Address("127.0.0.1", 9)  # B's old address: nothing listens there

    class ServingDht:
        """The serving node's DHT, as the locator asks it: B's contact record."""

        async def find_contact(self, node_id: bytes) -> ContactRecord | None:
            assert node_id == b.node_id
            return sign_contact(
                b.signing_seed,
                addresses=[RecordAddress(nowhere.host, nowhere.port)],
                storage_offered=0,
                sequence=1,
                now=int(time.time()),
                lifetime=3600,
                relays=[RelayAddress(r.node_id, RecordAddress(r_address.host, r_address.port))],
            )

    async with operations.open_repository(home, network=network) as repo:
        await operations.add_node_peer(repo, str(direct.address), direct.identity.node_id.hex())
        with repo.index.transaction():
            repo.index.add_peer(PeerRecord(b.node_id.hex(), PEER_KIND_NODE, str(nowhere)))
    lines: list[str] = []
    tokens = (SERVING_NODE.set(ServingDht()), RUNNING_RELAY.set(relay))  # type: ignore[arg-type]
    try:
        for request in (StatusRequest(json=True), StatusRequest()):
            outcome = await Service(home).status(request, Console(lines.append))
            assert outcome.code == 0
    finally:
        SERVING_NODE.reset(tokens[0])
        RUNNING_RELAY.reset(tokens[1])
    report = json.loads(lines[0])
    peers = {p["peer_id"]: p for p in report["peers"]}
    reached_b = peers[b.node_id.hex()]
    assert reached_b["online"]
    assert reached_b["route"] == "relayed"
    assert reached_b["relay"] == r.node_id.hex()
    assert reached_b["relay_address"] == str(r_address)
    reached_d = peers[direct.identity.node_id.hex()]
    assert (reached_d["route"], reached_d["relay"]) == ("direct", None)
    # What the relay carried: the status's own session with B, both ways.
    carried = {f["node_id"]: f for f in report["relay"]["friends"]}
    assert set(carried) == {owner.node_id.hex(), b.node_id.hex()}
    assert carried[owner.node_id.hex()]["bytes_from"] > 0
    assert carried[b.node_id.hex()]["bytes_from"] > 0
    assert report["relay"]["reservations"] == 1
    assert report["relay"]["summary"].startswith("relay for friends: 1 holding a reservation")
    assert "for 2 friends" in report["relay"]["summary"]
    text = "\n".join(lines[1:])
    assert f"{b.node_id.hex()} node at {nowhere} (relayed by {r.node_id.hex()} at" in text
    assert f"node at {direct.address} (direct): online" in text
    assert "relay for friends: 1 holding a reservation here" in text
    # The dashboard's peers page, from that same JSON.
    page = pages.peers_page("token", report, None, None)
    assert f"node, relayed by {r.node_id.hex()[:16]} at {r_address}" in page
    assert f"node, direct: {direct.address}" in page
    assert 'id="relay"' in page and "relay for friends" in page
    # A peer the user named shows by its name.
    named = {**report, "peers": [{**report["peers"][0], "name": "alice"}, *report["peers"][1:]]}
    first = report["peers"][0]["peer_id"]
    assert f">alice ({first[:16]})</span>" in pages.peers_page("token", named, None, None)


def test_status_says_the_last_backup_and_under_serve_the_next_and_the_last_failure() -> None:
    from p2pbackup.app import service
    from p2pbackup.node.schedule import RUNNING_BACKUPS, BackupRecord

    lines, data = service._backups(None)
    assert lines == ["last backup: none yet"] and data["scheduled"] is None
    record = BackupRecord(
        last_started=1_900_000_000.0,
        last_succeeded=1_899_990_000.0,
        last_failed=1_900_000_100.0,
        last_error="storing needs at least 3 peers …",
        next_at=1_900_021_600.0,
        interval=21_600.0,
    )
    token = RUNNING_BACKUPS.set(record)
    try:
        lines, data = service._backups(1_899_990_000)
        assert lines[0].startswith("last backup: 2030-")
        assert lines[1].startswith("next scheduled backup: 2030-")
        assert lines[2].startswith("last scheduled backup FAILED at 2030-")
        assert lines[2].endswith(": storing needs at least 3 peers …")
        assert isinstance(data["scheduled"], dict) and data["scheduled"]["last_error"]
        # A success since: the failure is history.
        record.last_succeeded = 1_900_000_200.0
        assert not any("FAILED" in line for line in service._backups(1_900_000_200)[0])
        # Serving, with nothing scheduled.
        RUNNING_BACKUPS.set(BackupRecord())
        assert service._backups(None)[0][-1].startswith("no scheduled backups")
    finally:
        RUNNING_BACKUPS.reset(token)
