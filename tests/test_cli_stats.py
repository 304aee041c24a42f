"""stats: restore-size, raw-data, and which peers hold a snapshot's packs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .cli_helpers import World, make_source, make_world


def _stats(world: World, *args: str) -> Any:
    return json.loads(world.ok("stats", *args, "--json").stdout)


def test_stats_modes_and_holdings(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=1, n=2, peers=3)
    source = make_source(tmp_path / "src", big=300_000)
    first = world.backup(source, tags=["a"])
    second = world.backup(source)  # the same data: only a new snapshot blob

    one = _stats(world, first)
    assert one["mode"] == "restore-size" and one["snapshots"] == [first]
    assert one["total_file_count"] >= 10 and one["total_size"] > 300_000
    both = _stats(world)
    assert both["snapshots_count"] == 2
    assert both["total_size"] == 2 * one["total_size"]  # restored twice
    assert _stats(world, "--tag", "a")["snapshots"] == [first]

    raw_one = _stats(world, first, "--mode", "raw-data")
    raw_both = _stats(world, "--mode", "raw-data")
    # Blobs shared by both snapshots count once: the second adds its snapshot
    # blob, and the trees above the source whose mtimes changed meanwhile.
    added = raw_both["total_blob_count"] - raw_one["total_blob_count"]
    assert 1 <= added <= len(source.parts) + 1
    assert raw_both["total_uncompressed_size"] - raw_one["total_uncompressed_size"] < 10_000
    assert raw_one["total_uncompressed_size"] >= one["total_size"]  # data, trees, snapshot
    assert raw_one["total_size"] < raw_one["total_uncompressed_size"]  # the text compresses
    assert raw_one["compression_ratio"] > 1
    # k=1, n=2: every pack is stored twice.
    assert raw_one["stored_with_redundancy"] >= 2 * raw_one["total_size"]

    held = _stats(world, second, "--by-peer")
    peers = held["peers"]
    assert {p["location"] for p in peers} <= {str(peer) for peer in world.peers}
    raw_second = _stats(world, second, "--mode", "raw-data")
    assert sum(p["shards"] for p in peers) == 2 * raw_second["total_pack_count"]
    assert sum(p["bytes"] for p in peers) == raw_second["stored_with_redundancy"]

    lines = world.ok("stats", second[:8], "--mode", "raw-data", "--by-peer").lines
    assert lines[0] == f"stats in raw-data mode for snapshot {second[:12]}:"
    assert any("compression ratio" in line for line in lines)
    assert "peers holding their packs:" in lines
    assert sum(1 for line in lines if "shard" in line and line.startswith("  dir-")) == len(peers)
    assert world.ok("stats").lines[0] == "stats in restore-size mode for 2 snapshots:"
    assert "no snapshot matches" in world.error("stats", "--host", "elsewhere")
