"""Check: does what the index promises still hold on the peers?

Without ``read_data`` the check asks each peer whether it still has each shard
(cheap) and walks every snapshot's trees, making sure every chunk they name is
indexed. With ``read_data`` it downloads every shard, verifies it against its
Merkle root, decodes every pack and opens every blob (AEAD and id).

A pack is **healthy** with all n shards good, **degraded** with k to n-1,
**unrecoverable** below k.
"""

from __future__ import annotations

import attrs
import trio

from p2pbackup.core import blobs, formats, packer
from p2pbackup.engine.progress import Progress
from p2pbackup.engine.repository import Repository
from p2pbackup.engine.snapshots import live_blobs
from p2pbackup.errors import IntegrityError, NotEnoughShardsError, StoreError
from p2pbackup.model import PackRecord


@attrs.define
class CheckSummary:
    packs: int = 0
    healthy: int = 0
    degraded: int = 0
    unrecoverable: int = 0
    shards_missing: int = 0
    shards_corrupt: int = 0
    blobs_checked: int = 0
    orphan_shards: int = 0
    errors: list[str] = attrs.Factory(list)

    @property
    def ok(self) -> bool:
        """No problem at all: a degraded pack is still restorable, but a
        missing or corrupt shard is lost redundancy and worth a non-zero exit."""
        return (
            not self.errors
            and self.unrecoverable == 0
            and self.shards_missing == 0
            and self.shards_corrupt == 0
        )

    def to_json(self) -> dict[str, object]:
        return attrs.asdict(self)

    def lines(self) -> list[str]:
        lines = [
            f"{self.packs} packs: {self.healthy} healthy, {self.degraded} degraded, "
            f"{self.unrecoverable} unrecoverable",
            f"{self.shards_missing} shards missing, {self.shards_corrupt} corrupt, "
            f"{self.orphan_shards} orphaned; {self.blobs_checked} blobs read and verified",
        ]
        lines.extend(f"error: {e}" for e in self.errors)
        if self.ok:
            lines.append("no errors found")
        elif not self.errors and self.unrecoverable == 0:
            lines.append("check found problems, but every pack is still restorable")
        else:
            lines.append("check found problems")
        return lines


async def check(
    repo: Repository, *, read_data: bool = False, progress: Progress | None = None
) -> CheckSummary:
    progress = progress or Progress("check", enabled=False)
    summary = CheckSummary()
    pack_ids = repo.index.pack_ids()
    for number, pack_id in enumerate(pack_ids, 1):
        record = repo.index.pack(pack_id, with_blobs=read_data)
        assert record is not None
        progress.update(f"pack {number} of {len(pack_ids)}")
        good = await _check_shards(repo, record, summary, read_data=read_data)
        summary.packs += 1
        if good >= record.n:
            summary.healthy += 1
        elif good >= record.k:
            summary.degraded += 1
        else:
            summary.unrecoverable += 1
            summary.errors.append(
                f"pack {pack_id.hex()[:16]}: only {good} of {record.k} needed shards are good"
            )
            continue
        if read_data:
            await _check_blobs(repo, record, summary)

    live, problems = await live_blobs(repo)
    summary.errors.extend(problems)
    for blob_id in sorted(live):
        if not repo.index.has_blob(blob_id):
            summary.errors.append(f"blob {blob_id.hex()[:16]} is referenced but not indexed")

    for peer_id, wanted in repo.expected_shards().items():
        try:
            held = await repo.store(peer_id).list()
        except StoreError as exc:
            summary.errors.append(f"peer {peer_id} cannot list its shards: {exc}")
            continue
        summary.orphan_shards += len(set(held) - wanted)
    progress.close()
    return summary


async def _check_shards(
    repo: Repository, record: PackRecord, summary: CheckSummary, *, read_data: bool
) -> int:
    good = 0
    for location in record.shards:
        try:
            if read_data:
                await repo.fetch_verified_shard(record, location)
            elif not await repo.store(location.peer_id).has(
                formats.shard_id(record.pack_id, location.index)
            ):
                summary.shards_missing += 1
                continue
            good += 1
        except StoreError:
            summary.shards_missing += 1
        except IntegrityError:
            summary.shards_corrupt += 1
    return good


async def _check_blobs(repo: Repository, record: PackRecord, summary: CheckSummary) -> None:
    try:
        data = await repo.read_pack(record, use_cache=False)
    except (NotEnoughShardsError, IntegrityError) as exc:
        summary.errors.append(f"pack {record.pack_id.hex()[:16]}: {exc}")
        return
    for entry in record.blobs:
        try:
            await trio.to_thread.run_sync(
                blobs.open_blob,
                repo.keyring.data_key,
                repo.keyring.dedup_key,
                entry.type,
                entry.blob_id,
                packer.blob_bytes(data, entry),
            )
            summary.blobs_checked += 1
        except IntegrityError as exc:
            summary.errors.append(f"pack {record.pack_id.hex()[:16]}: {exc}")
