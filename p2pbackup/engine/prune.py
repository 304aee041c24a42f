"""Prune: free the space that no live snapshot needs.

Steps, ordered so that a prune killed at any point loses nothing:

1. **mark** — walk every live snapshot; the blobs it reaches are live. If any
   tree cannot be read, prune stops: deleting on a partial view could delete
   live data.
2. **repack** — a data pack with no live blob is dead; one that is mostly dead
   (live bytes below :data:`REPACK_THRESHOLD`) has its live blobs copied, as
   they are (sealed blobs move between packs unchanged), into new packs. So
   have **small** packs (live bytes below :data:`SMALL_PACK_FRACTION` of the
   target pack size), once there are :data:`MIN_SMALL_PACKS` of them: each
   backup ends with a part-filled pack, and a pack costs its peers the same
   shards, audits and repair decisions whatever it holds.
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
from p2pbackup.engine.progress import Progress, human_bytes, plural
from p2pbackup.engine.repository import Repository
from p2pbackup.engine.snapshots import live_blobs
from p2pbackup.errors import P2PBackupError, StoreError
from p2pbackup.model import PackRecord

#: A pack whose live bytes are below this fraction of its blob bytes is repacked.
REPACK_THRESHOLD = 0.5
#: A pack whose live bytes are below this fraction of the target pack size
#: is small. A daily backup that changes little ends with one such pack a
#: day; kept for the weeklies and monthlies, they come to outnumber the full
#: packs many times over (docs/simulation.md), and each has its own n
#: shards to audit, lease and repair.
SMALL_PACK_FRACTION = 0.5
#: Small packs are repacked together only when there are this many or more
#: (as restic's prune does): fewer are not worth a repack, and a lone small
#: pack, such as the last one a repack writes, is not repacked over and over.
MIN_SMALL_PACKS = 10


class PruneAbortedError(P2PBackupError):
    """Prune found data it cannot read and refused to delete anything."""


@attrs.define
class PruneSummary:
    packs_deleted: int = 0
    packs_repacked: int = 0
    packs_written: int = 0
    #: Index packs replaced by one new index segment (a prune consolidates them).
    index_packs_replaced: int = 0
    shards_deleted: int = 0
    orphan_shards_deleted: int = 0
    #: Shard bytes deleted less shard bytes written (new packs, the new index).
    bytes_freed: int = 0
    #: A dry run: what would be done, nothing done.
    dry_run: bool = False

    @property
    def nothing_to_do(self) -> bool:
        return not (
            self.packs_deleted
            or self.packs_repacked
            or self.index_packs_replaced
            or self.orphan_shards_deleted
        )

    def lines(self) -> list[str]:
        if self.nothing_to_do:
            return ["nothing to prune: every pack holds live data and no shard is orphaned"]
        verbs = ("would delete", "repack", "replace") if self.dry_run else (
            "deleted", "repacked", "replaced")  # fmt: skip
        lines = [
            f"{verbs[0]} {plural(self.packs_deleted, 'dead pack')}, {verbs[1]} "
            f"{plural(self.packs_repacked, 'mostly dead or small pack')} into "
            f"{plural(self.packs_written, 'new one')}"
            + (
                f", and {verbs[2]} {plural(self.index_packs_replaced, 'index pack')} with one"
                if self.index_packs_replaced
                else ""
            ),
        ]
        if self.dry_run:
            lines.append(
                f"would delete {plural(self.orphan_shards_deleted, 'orphaned shard')}; "
                f"free about {human_bytes(self.bytes_freed)} (--dry-run: nothing was changed)"
            )
        else:
            lines.append(
                f"deleted {plural(self.shards_deleted, 'shard')} of replaced packs and "
                f"{plural(self.orphan_shards_deleted, 'orphaned shard')}; "
                f"freed about {human_bytes(self.bytes_freed)}"
            )
        return lines


@attrs.frozen
class Repack:
    """A mostly dead or small pack, and the live blobs whose kept copy is in
    it: those are copied into new packs before it is deleted."""

    pack_id: bytes
    blobs: frozenset[bytes]


@attrs.frozen
class PrunePlan:
    """What a prune does (module docstring); every pack listed once."""

    #: Data packs holding no kept copy of a live blob: deleted.
    dead: tuple[bytes, ...]
    #: Data packs mostly dead or small (module docstring): repacked, then deleted.
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
    small_below: int = 0,
    min_small: int = MIN_SMALL_PACKS,
) -> PrunePlan:
    """The plan of a prune (module docstring).

    ``data_packs`` are the index's data packs with their blobs, ``live`` the
    blob ids the live snapshots reach, and ``copies`` every (blob id, pack
    id) the index holds, in the order of preference: of a live blob's
    copies, the first is kept. A data pack whose kept bytes are below
    ``threshold`` of its blob bytes is repacked; one with none is dead. The
    others whose kept bytes are below ``small_below`` are small: repacked
    too when there are ``min_small`` of them or more, kept otherwise.
    """
    kept_in: dict[bytes, bytes] = {}
    for blob_id, pack_id in copies:
        if blob_id in live and blob_id not in kept_in:
            kept_in[blob_id] = pack_id
    dead: list[bytes] = []
    repack: list[Repack] = []
    keep: list[bytes] = []
    small: list[Repack] = []
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
            if kept_bytes < small_below:
                small.append(Repack(pack_id, frozenset(b.blob_id for b in kept)))
    if len(small) >= min_small:
        repack.extend(small)
        repacked = {r.pack_id for r in small}
        keep = [pack_id for pack_id in keep if pack_id not in repacked]
    return PrunePlan(tuple(dead), tuple(repack), tuple(keep), tuple(index_packs))


async def prune(
    repo: Repository,
    *,
    progress: Progress | None = None,
    dry_run: bool = False,
    without: AbstractSet[bytes] = frozenset(),
) -> PruneSummary:
    """Plan the prune from what the live snapshots reach, then carry it out
    (with ``dry_run``, only say what it would do: nothing is written, on the
    peers or in the index; ``without`` names snapshots to count as forgotten
    already, for a dry run of ``forget --prune``)."""
    progress = progress or Progress("prune", enabled=False)
    index = repo.index
    # Another home of this identity writing the root record: its packs
    # would look like orphans here. Refuse before any work.
    await repo.check_writer()
    progress.update("marking live data", force=True)
    live, problems = await live_blobs(repo, without)
    if problems:
        raise PruneAbortedError(
            "prune stopped before deleting anything, since some data cannot be read: "
            + "; ".join(problems)
        )
    plan = plan_prune(
        _data_packs(repo),
        index.pack_ids(is_index=True),
        live,
        index.iter_blob_rows(),
        small_below=int(repo.config.pack_size * SMALL_PACK_FRACTION),
    )
    if not (plan.dead or plan.repack or index.packs_without_segment()) and len(plan.old_index) <= 1:
        # The one index pack already describes every pack kept: writing it
        # again would free nothing, only replace it with its twin.
        plan = attrs.evolve(plan, old_index=())
    summary = PruneSummary(
        packs_deleted=len(plan.dead),
        packs_repacked=len(plan.repack),
        index_packs_replaced=len(plan.old_index),
        dry_run=dry_run,
    )
    removed_records = [index.pack(p, with_blobs=False) for p in plan.removed]
    freed = sum(r.shard_size * len(r.shards) for r in removed_records if r is not None)
    if dry_run:
        summary.packs_written = _repacked_estimate(repo, plan.repack)
        summary.orphan_shards_deleted = len(await find_orphans(repo))
        summary.bytes_freed = freed
        progress.close()
        return summary

    written = await _repack(repo, plan.repack, progress)
    summary.packs_written = len(written)
    if plan.old_index:
        progress.update("writing a new index", force=True)
        segment = await repo.write_index_segment(sorted([*plan.keep, *written]))
        written_records = [index.pack(p, with_blobs=False) for p in written]
        if segment is not None:
            written_records.append(segment)
        freed -= sum(r.shard_size * len(r.shards) for r in written_records if r is not None)
        with index.transaction():
            for pack_id in plan.removed:
                index.remove_pack(pack_id)
        await repo.publish_root()

    progress.update("deleting shards", force=True)
    for record in removed_records:
        if record is None:
            continue
        summary.shards_deleted += await _delete_shards(repo, record)
    summary.orphan_shards_deleted = await delete_orphans(repo)
    summary.bytes_freed = max(freed, 0)
    progress.close()
    return summary


def _repacked_estimate(repo: Repository, repack: tuple[Repack, ...]) -> int:
    """How many packs a repack of ``repack`` would write."""
    live = 0
    for old in repack:
        record = repo.index.pack(old.pack_id)
        assert record is not None
        live += sum(b.length for b in record.blobs if b.blob_id in old.blobs)
    return -(-live // repo.config.pack_size) if live else 0


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
    progress.update(f"repacking {plural(len(repack), 'pack')}", force=True)
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


async def find_orphans(repo: Repository) -> list[tuple[str, bytes]]:
    """(peer id, shard id) of every shard on a peer that no pack in the index names."""
    orphans, _answered = await _orphans(repo)
    return orphans


async def _orphans(repo: Repository) -> tuple[list[tuple[str, bytes]], list[str]]:
    """The orphaned shards, and the peers that listed theirs."""
    orphans: list[tuple[str, bytes]] = []
    answered: list[str] = []
    for peer_id, wanted in repo.expected_shards().items():
        try:
            held = await repo.store(peer_id).list()
        except StoreError:
            continue
        answered.append(peer_id)
        orphans += [(peer_id, shard_id) for shard_id in held if shard_id not in wanted]
    return orphans, answered


async def delete_orphans(repo: Repository) -> int:
    """Delete shards on peers that no pack in the index names."""
    orphans, answered = await _orphans(repo)
    deleted = 0
    for peer_id, shard_id in orphans:
        try:
            await repo.store(peer_id).delete(shard_id)
            deleted += 1
        except StoreError:
            continue
    for peer_id in answered:
        # Half-written shards of killed backups: this home holds its lock,
        # so nothing else writes to this owner's namespace now.
        with contextlib.suppress(StoreError):
            await repo.store(peer_id).collect_garbage(older_than=0)
        await trio.lowlevel.checkpoint()
    return deleted
