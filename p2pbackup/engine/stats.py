"""Statistics of snapshots, as restic's ``stats`` gives them.

Nouns:

* **mode** — what is counted. ``restore-size``: the files and bytes the
  snapshots restore, each snapshot's as it recorded them (no tree is read).
  ``raw-data``: the distinct blobs the snapshots reach (file chunks, trees,
  the snapshots themselves), each counted once however many snapshots share
  it: their bytes before compression, as stored (compressed and encrypted),
  and the packs that hold them, with the redundancy of their shards.
* **holding** — :class:`PeerHolding`: how many shards of the packs the
  snapshots need a peer holds, and their bytes. A pack counts whole even
  when only some of its blobs are the snapshots' (another snapshot's may
  share it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import attrs

from p2pbackup.core import formats
from p2pbackup.engine import snapshots
from p2pbackup.engine.index import BlobLocation
from p2pbackup.engine.repository import Repository
from p2pbackup.errors import UsageError
from p2pbackup.model import BlobType, Snapshot

#: The modes ``stats --mode`` takes; the first is the default.
MODES: Final = ("restore-size", "raw-data")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UsageError(f"--mode {mode!r} is not one of {', '.join(MODES)}")
    return mode


@attrs.frozen
class PeerHolding:
    peer_id: str
    kind: str
    location: str
    shards: int
    #: Shard bytes with their headers, as stored on the peer.
    bytes: int


@attrs.define
class RawData:
    """What ``raw-data`` counts (module docstring)."""

    blobs: int = 0
    #: Plaintext bytes of the blobs, before compression.
    uncompressed_size: int = 0
    #: Bytes of the blobs as sealed in their packs (compressed, encrypted).
    size: int = 0
    packs: int = 0
    #: Bytes of every shard of those packs, with their headers: what the
    #: peers hold for them.
    stored_with_redundancy: int = 0

    @property
    def compression_ratio(self) -> float:
        return self.uncompressed_size / self.size if self.size else 1.0


@attrs.frozen
class SnapshotStats:
    mode: str
    snapshot_ids: tuple[bytes, ...]
    #: restore-size: files and bytes the snapshots restore, summed over them.
    total_file_count: int
    total_size: int
    raw: RawData | None = None
    holdings: tuple[PeerHolding, ...] | None = None
    #: Trees that could not be read (raw-data and holdings leave them out).
    problems: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {
            "mode": self.mode,
            "snapshots_count": len(self.snapshot_ids),
            "snapshots": [sid.hex() for sid in self.snapshot_ids],
            "total_file_count": self.total_file_count,
            "total_size": self.total_size,
        }
        if self.raw is not None:
            data.update(
                total_blob_count=self.raw.blobs,
                total_uncompressed_size=self.raw.uncompressed_size,
                total_size=self.raw.size,
                compression_ratio=round(self.raw.compression_ratio, 3),
                total_pack_count=self.raw.packs,
                stored_with_redundancy=self.raw.stored_with_redundancy,
            )
        if self.holdings is not None:
            data["peers"] = [attrs.asdict(h) for h in self.holdings]
        data["problems"] = list(self.problems)
        return data


async def snapshot_stats(
    repo: Repository,
    rows: Sequence[tuple[bytes, Snapshot]],
    *,
    mode: str = MODES[0],
    by_peer: bool = False,
) -> SnapshotStats:
    """The statistics of the snapshots ``rows`` in ``mode``; with ``by_peer``
    also the peers' holdings of their packs. Only ``raw-data`` and
    ``by_peer`` read trees (from the peers)."""
    check_mode(mode)
    chosen = {sid for sid, _ in rows}
    files = sum(snap.file_count for _, snap in rows)
    size = sum(snap.total_size for _, snap in rows)
    if mode == "restore-size" and not by_peer:
        return SnapshotStats(mode, tuple(sid for sid, _ in rows), files, size)
    others = {sid for sid, _ in repo.index.snapshots()} - chosen
    reached = await snapshots.reach(repo, without=others)
    locations: dict[bytes, BlobLocation] = {}
    for blob_type in (BlobType.DATA, BlobType.TREE, BlobType.SNAPSHOT):
        locations.update(repo.index.blob_locations_of_type(blob_type))
    raw = RawData()
    packs: set[bytes] = set()
    for blob_id in reached.live:
        where = locations.get(blob_id)
        if where is None:
            continue
        raw.blobs += 1
        raw.uncompressed_size += where.entry.raw_length
        raw.size += where.entry.length
        packs.add(where.pack_id)
    shards: dict[str, list[int]] = {}
    for pack_id in sorted(packs):
        record = repo.index.pack(pack_id, with_blobs=False)
        if record is None:
            continue
        raw.packs += 1
        for shard in record.shards:
            stored = record.shard_size + formats.SHARD_HEADER_SIZE
            raw.stored_with_redundancy += stored
            held = shards.setdefault(shard.peer_id, [0, 0])
            held[0] += 1
            held[1] += stored
    holdings = None
    if by_peer:
        peers = {p.peer_id: p for p in repo.peers()}
        holdings = tuple(
            sorted(
                (
                    PeerHolding(
                        peer_id,
                        peers[peer_id].kind if peer_id in peers else "?",
                        peers[peer_id].location if peer_id in peers else "(no longer a peer)",
                        count,
                        nbytes,
                    )
                    for peer_id, (count, nbytes) in shards.items()
                ),
                key=lambda h: (-h.bytes, h.peer_id),
            )
        )
    return SnapshotStats(
        mode,
        tuple(sid for sid, _ in rows),
        files,
        size,
        raw=raw if mode == "raw-data" else None,
        holdings=holdings,
        problems=tuple(reached.problems),
    )
