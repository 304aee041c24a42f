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

Steps 2 to 5 follow a **plan** decided first, by :func:`plan_prune` (pure):
from the index's packs and the live blobs, which copy of each live blob is
**kept** (the first the index lists), which data packs are dead, which are
repacked (and which blobs each gives up to the new packs), which are kept as
they are, and which index packs are replaced. :func:`prune` then carries it
out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet

import attrs
import trio

from p2pbackup.core import formats, packer
from p2pbackup.engine.progress import Progress
from p2pbackup.engine.repository import Repository
from p2pbackup.engine.snapshots import live_blobs
from p2pbackup.errors import P2PBackupError, StoreError
from p2pbackup.model import PackRecord

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


@attrs.frozen
class Repack:
    """A mostly dead pack, and the live blobs whose kept copy is in it: those
    are copied into new packs before it is deleted."""

    pack_id: bytes
    blobs: frozenset[bytes]


@attrs.frozen
class PrunePlan:
    """What a prune does (module docstring); every pack listed once."""

    #: Data packs holding no kept copy of a live blob: deleted.
    dead: tuple[bytes, ...]
    #: Data packs whose kept live bytes are below the threshold: repacked, then deleted.
    repack: tuple[Repack, ...]
    #: Data packs kept as they are.
    keep: tuple[bytes, ...]
    #: Index packs, all replaced by one new index segment.
    old_index: tuple[bytes, ...]

    @property
    def removed(self) -> tuple[bytes, ...]:
        """Every pack the index forgets and whose shards are deleted."""
        return (*self.dead, *(r.pack_id for r in self.repack), *self.old_index)


def plan_prune(
    data_packs: Iterable[PackRecord],
    index_packs: Iterable[bytes],
    live: AbstractSet[bytes],
    copies: Iterable[tuple[bytes, bytes]],
    *,
    threshold: float = REPACK_THRESHOLD,
) -> PrunePlan:
    """The plan of a prune (module docstring).

    ``data_packs`` are the index's data packs with their blobs, ``live`` the
    blob ids the live snapshots reach, and ``copies`` every (blob id, pack
    id) the index holds, in the order of preference: of a live blob's
    copies, the first is kept. A data pack whose kept bytes are below
    ``threshold`` of its blob bytes is repacked; one with none is dead.
    """
    kept_in: dict[bytes, bytes] = {}
    for blob_id, pack_id in copies:
        if blob_id in live and blob_id not in kept_in:
            kept_in[blob_id] = pack_id
    dead: list[bytes] = []
    repack: list[Repack] = []
    keep: list[bytes] = []
    for record in data_packs:
        pack_id = record.pack_id
        total = sum(b.length for b in record.blobs)
        kept = [b for b in record.blobs if kept_in.get(b.blob_id) == pack_id]
        kept_bytes = sum(b.length for b in kept)
        if not kept:
            dead.append(pack_id)
        elif kept_bytes < total * threshold:
            repack.append(Repack(pack_id, frozenset(b.blob_id for b in kept)))
        else:
            keep.append(pack_id)
    return PrunePlan(tuple(dead), tuple(repack), tuple(keep), tuple(index_packs))


async def prune(repo: Repository, *, progress: Progress | None = None) -> PruneSummary:
    """Plan the prune from what the live snapshots reach, then carry it out."""
    progress = progress or Progress("prune", enabled=False)
    index = repo.index
    # Another home of this identity writing the root record: its packs
    # would look like orphans here. Refuse before any work.
    await repo.check_writer()
    progress.update("marking live data", force=True)
    live, problems = await live_blobs(repo)
    if problems:
        raise PruneAbortedError(
            "prune stopped before deleting anything, since some data cannot be read: "
            + "; ".join(problems)
        )
    plan = plan_prune(
        _data_packs(repo), index.pack_ids(is_index=True), live, index.iter_blob_rows()
    )
    summary = PruneSummary()
    written = await _repack(repo, plan.repack, progress)
    summary.packs_repacked = len(plan.repack)
    summary.packs_written = len(written)

    removed_records = [index.pack(p, with_blobs=False) for p in plan.removed]
    progress.update("writing a new index", force=True)
    await repo.write_index_segment(sorted([*plan.keep, *written]))
    with index.transaction():
        for pack_id in plan.removed:
            index.remove_pack(pack_id)
    await repo.publish_root()

    progress.update("deleting shards", force=True)
    for record in removed_records:
        if record is None:
            continue
        summary.bytes_freed += record.shard_size * len(record.shards)
        summary.shards_deleted += await _delete_shards(repo, record)
    summary.packs_deleted = len(plan.dead)
    summary.orphan_shards_deleted = await delete_orphans(repo)
    progress.close()
    return summary


def _data_packs(repo: Repository) -> Iterator[PackRecord]:
    """The index's data packs with their blobs, one at a time."""
    for pack_id in repo.index.pack_ids(is_index=False):
        record = repo.index.pack(pack_id)
        assert record is not None
        yield record


async def _repack(repo: Repository, repack: tuple[Repack, ...], progress: Progress) -> list[bytes]:
    """Copy the kept blobs of ``repack``'s packs, as they are, into new packs;
    the ids of the packs written."""
    if not repack:
        return []
    progress.update(f"repacking {len(repack)} packs", force=True)
    written: list[bytes] = []
    pack_size = repo.config.pack_size
    builder = packer.PackBuilder(pack_size)
    for old in repack:
        record = repo.index.pack(old.pack_id)
        assert record is not None
        data = await repo.read_pack(record, use_cache=False)
        for entry in record.blobs:
            if entry.blob_id not in old.blobs:
                continue
            if not builder.fits(entry.length):
                written.append((await repo.write_pack(builder)).pack_id)
                builder = packer.PackBuilder(pack_size)
            builder.add(
                entry.type, entry.blob_id, bytes(packer.blob_bytes(data, entry)), entry.raw_length
            )
    if len(builder):
        written.append((await repo.write_pack(builder)).pack_id)
    return written


async def _delete_shards(repo: Repository, record: PackRecord) -> int:
    """Delete the shards of a pack the index has forgotten; how many went."""
    deleted = 0
    for location in record.shards:
        try:
            await repo.store(location.peer_id).delete(
                formats.shard_id(record.pack_id, location.index)
            )
            deleted += 1
        except StoreError:
            pass  # The next prune finds it again as an orphan.
    return deleted


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
