"""Prune: free the space that no live snapshot needs.

Steps, ordered so that a prune killed at any point loses nothing:

1. **mark** — walk every live snapshot; the blobs it reaches are live. If any
   tree cannot be read, prune stops: deleting on a partial view could delete
   live data.
2. **repack** — a data pack with no live blob is dead; one that is mostly dead
   (live bytes below :data:`REPACK_THRESHOLD`) has its live blobs copied, as
   they are (sealed blobs move between packs unchanged), into new packs.
3. **new index** — one index segment describing every remaining data pack
   replaces all older index packs.
4. **commit** — the index forgets dead packs and old index packs; a new root
   record goes to every peer.
5. **delete** — only now are the shards of dead packs deleted, along with any
   shard on a peer that no pack names (left by a backup that was killed).
"""

from __future__ import annotations

import contextlib

import attrs
import trio

from p2pbackup.core import formats, packer
from p2pbackup.engine.progress import Progress
from p2pbackup.engine.repository import Repository
from p2pbackup.engine.snapshots import live_blobs
from p2pbackup.errors import P2PBackupError, StoreError

#: A pack whose live bytes are below this fraction of its blob bytes is repacked.
REPACK_THRESHOLD = 0.5


class PruneAbortedError(P2PBackupError):
    """Prune found data it cannot read and refused to delete anything."""


@attrs.define
class PruneSummary:
    packs_deleted: int = 0
    packs_repacked: int = 0
    packs_written: int = 0
    shards_deleted: int = 0
    orphan_shards_deleted: int = 0
    bytes_freed: int = 0

    def lines(self) -> list[str]:
        return [
            f"deleted {self.packs_deleted} packs, repacked {self.packs_repacked} "
            f"into {self.packs_written} new ones",
            f"deleted {self.shards_deleted} shards of dead packs and "
            f"{self.orphan_shards_deleted} orphaned shards; freed about {self.bytes_freed} bytes",
        ]


async def prune(repo: Repository, *, progress: Progress | None = None) -> PruneSummary:
    progress = progress or Progress("prune", enabled=False)
    summary = PruneSummary()
    index = repo.index
    progress.update("marking live data", force=True)
    live, problems = await live_blobs(repo)
    if problems:
        raise PruneAbortedError(
            "prune stopped before deleting anything, since some data cannot be read: "
            + "; ".join(problems)
        )

    # Choose one copy of each live blob; every other copy is dead weight.
    chosen: dict[bytes, bytes] = {}
    for blob_id, pack_id in index.iter_blob_rows():
        if blob_id in live and blob_id not in chosen:
            chosen[blob_id] = pack_id

    dead: list[bytes] = []
    to_repack: list[bytes] = []
    for pack_id in index.pack_ids(is_index=False):
        record = index.pack(pack_id)
        assert record is not None
        total = sum(b.length for b in record.blobs)
        kept = sum(b.length for b in record.blobs if chosen.get(b.blob_id) == pack_id)
        if kept == 0:
            dead.append(pack_id)
        elif kept < total * REPACK_THRESHOLD:
            to_repack.append(pack_id)

    if to_repack:
        progress.update(f"repacking {len(to_repack)} packs", force=True)
        builder = packer.PackBuilder()
        pack_size = repo.config.pack_size
        for pack_id in to_repack:
            record = index.pack(pack_id)
            assert record is not None
            data = await repo.read_pack(record, use_cache=False)
            for entry in record.blobs:
                if chosen.get(entry.blob_id) != pack_id:
                    continue
                builder.add(
                    entry.type,
                    entry.blob_id,
                    bytes(packer.blob_bytes(data, entry)),
                    entry.raw_length,
                )
                if builder.size >= pack_size:
                    await repo.write_pack(builder)
                    summary.packs_written += 1
                    builder = packer.PackBuilder()
        if len(builder):
            await repo.write_pack(builder)
            summary.packs_written += 1
        summary.packs_repacked = len(to_repack)

    removed = dead + to_repack
    old_index_packs = index.pack_ids(is_index=True)
    removed_records = [index.pack(p, with_blobs=False) for p in removed + old_index_packs]
    keep = [p for p in index.pack_ids(is_index=False) if p not in set(removed)]
    progress.update("writing a new index", force=True)
    await repo.write_index_segment(keep)
    with index.transaction():
        for pack_id in removed + old_index_packs:
            index.remove_pack(pack_id)
    await repo.publish_root()

    progress.update("deleting shards", force=True)
    for record in removed_records:
        if record is None:
            continue
        summary.bytes_freed += record.shard_size * len(record.shards)
        for location in record.shards:
            try:
                await repo.store(location.peer_id).delete(
                    formats.shard_id(record.pack_id, location.index)
                )
                summary.shards_deleted += 1
            except StoreError:
                pass  # The next prune finds it again as an orphan.
    summary.packs_deleted = len(dead)
    summary.orphan_shards_deleted = await delete_orphans(repo)
    progress.close()
    return summary


async def delete_orphans(repo: Repository) -> int:
    """Delete shards on peers that no pack in the index names."""
    deleted = 0
    for peer_id, wanted in repo.expected_shards().items():
        try:
            store = repo.store(peer_id)
            held = await store.list()
        except StoreError:
            continue
        for shard_id in held:
            if shard_id not in wanted:
                try:
                    await store.delete(shard_id)
                    deleted += 1
                except StoreError:
                    continue
        # Half-written shards of killed backups: this home holds its lock,
        # so nothing else writes to this owner's namespace now.
        with contextlib.suppress(StoreError):
            await store.collect_garbage(older_than=0)
        await trio.lowlevel.checkpoint()
    return deleted
