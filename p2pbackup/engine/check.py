"""Check: does what the index promises still hold on the peers?

Every peer is asked at once for the shards it holds for us (one listing
each, after a probe that gives up on a peer overdue while the others
answered: :meth:`~p2pbackup.engine.repository.Repository.probe_peers`), and
every snapshot's trees are walked, making sure every chunk they name is
indexed. With ``read_data`` every listed shard is also downloaded and
verified against its Merkle root, every pack decoded and every blob opened
(AEAD and id).

A shard is **good** when its peer lists it (and, with ``read_data``, it
verifies); else it is **missing** (its peer answered without it),
**unreachable** (its peer did not answer), **corrupt** (it does not verify)
or **unplaced** (the backup never placed it: fewer peers took the pack's
shards than its n). A pack is **healthy** with all n shards good,
**degraded** with k to n-1, **unrecoverable** below k. Each pack that is not
healthy is a **pack problem**: which of its shards are not good and why, on
which peers, and which snapshots have data in it (an **index pack** holds
the index's records: a home rebuilt from the recovery key needs it to find
any snapshot).
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs
import trio

from p2pbackup.core import blobs, formats, packer
from p2pbackup.engine.progress import Progress, plural
from p2pbackup.engine.repository import Repository
from p2pbackup.engine.snapshots import reach
from p2pbackup.errors import IntegrityError, NotEnoughShardsError, StoreError
from p2pbackup.model import PackRecord, ShardLocation

#: Seconds a peer that answered has to list the shards it holds for us.
LIST_SECONDS = 60.0
#: Pack problems the summary's lines name; ``--json`` has them all.
_LINES_LISTED = 20


@attrs.frozen
class PackProblem:
    """A pack with fewer than n good shards (module docstring)."""

    pack_id: bytes
    k: int
    n: int
    good: int
    #: Shards the backup never placed.
    unplaced: int
    #: (peer id, what is wrong with its shard: missing, corrupt, or why the
    #: peer did not answer).
    peers: tuple[tuple[str, str], ...]
    #: Whether it is an index pack (module docstring).
    is_index: bool = False
    #: Snapshots with data in the pack.
    snapshots: tuple[bytes, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {
            "pack_id": self.pack_id.hex(),
            "k": self.k,
            "n": self.n,
            "good": self.good,
            "unplaced": self.unplaced,
            "peers": [{"peer_id": p, "problem": what} for p, what in self.peers],
            "is_index": self.is_index,
            "snapshots": [s.hex() for s in self.snapshots],
        }

    def line(self) -> str:
        why = [f"{self.unplaced} never placed"] if self.unplaced else []
        why.extend(f"peer {peer}: {what}" for peer, what in self.peers)
        if self.is_index:
            used = "an index pack"
        else:
            used = "in snapshots " + (", ".join(s.hex()[:12] for s in self.snapshots) or "none")
        state = "degraded" if self.good >= self.k else "UNRECOVERABLE"
        return (
            f"{state} pack {self.pack_id.hex()[:16]}: {self.good} of {self.n} shards good, "
            f"{self.k} needed ({'; '.join(why)}); {used}"
        )


@attrs.define
class CheckSummary:
    packs: int = 0
    healthy: int = 0
    degraded: int = 0
    unrecoverable: int = 0
    shards_missing: int = 0
    shards_corrupt: int = 0
    shards_unreachable: int = 0
    shards_unplaced: int = 0
    blobs_checked: int = 0
    orphan_shards: int = 0
    errors: list[str] = attrs.Factory(list)
    #: Every pack that is not healthy, and why.
    problems: list[PackProblem] = attrs.Factory(list)
    #: Peer id -> why it did not answer.
    peers_unreachable: dict[str, str] = attrs.Factory(dict)

    @property
    def ok(self) -> bool:
        """No problem at all: a degraded pack is still restorable, but a
        shard short of n is lost redundancy and worth a non-zero exit."""
        return not self.errors and self.healthy == self.packs

    def to_json(self) -> dict[str, object]:
        data = attrs.asdict(self, recurse=False)
        data["problems"] = [problem.to_json() for problem in self.problems]
        data["peers_unreachable"] = dict(self.peers_unreachable)
        return data

    def lines(self) -> list[str]:
        lines = [
            f"{plural(self.packs, 'pack')}: {self.healthy} healthy, {self.degraded} degraded, "
            f"{self.unrecoverable} unrecoverable",
            f"{plural(self.shards_missing, 'shard')} missing, {self.shards_corrupt} corrupt, "
            f"{self.shards_unreachable} on peers that did not answer, "
            f"{self.shards_unplaced} never placed, "
            f"{self.orphan_shards} orphaned; "
            f"{plural(self.blobs_checked, 'blob')} read and verified",
        ]
        lines.extend(
            f"peer {peer} did not answer: {why}" for peer, why in self.peers_unreachable.items()
        )
        lines.extend(problem.line() for problem in self.problems[:_LINES_LISTED])
        if len(self.problems) > _LINES_LISTED:
            lines.append(
                f"... and {len(self.problems) - _LINES_LISTED} more packs (`check --json` "
                "lists them all)"
            )
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
    progress.update("asking the peers", force=True)
    answers = await repo.probe_peers()
    held, problems = await repo.list_held(
        [peer_id for peer_id, answer in answers.items() if answer.answered], LIST_SECONDS
    )
    summary.peers_unreachable = {
        peer_id: answer.problem for peer_id, answer in answers.items() if not answer.answered
    }
    summary.peers_unreachable.update(problems)

    watched: dict[bytes, bytes] = {}
    pack_ids = repo.index.pack_ids()
    index_packs = set(repo.index.pack_ids(is_index=True))
    for number, pack_id in enumerate(pack_ids, 1):
        record = repo.index.pack(pack_id, with_blobs=read_data)
        assert record is not None
        progress.update(f"pack {number} of {len(pack_ids)}")
        problem = await _check_pack(repo, record, held, summary, read_data=read_data)
        summary.packs += 1
        if problem is None:
            summary.healthy += 1
        else:
            problem = attrs.evolve(problem, is_index=pack_id in index_packs)
            summary.problems.append(problem)
            with_blobs = record if read_data else repo.index.pack(pack_id, with_blobs=True)
            assert with_blobs is not None
            watched.update((entry.blob_id, pack_id) for entry in with_blobs.blobs)
            if problem.good >= record.k:
                summary.degraded += 1
            else:
                summary.unrecoverable += 1
                summary.errors.append(
                    f"pack {pack_id.hex()[:16]}: only {problem.good} of {record.k} "
                    "needed shards are good"
                )
                continue
        if read_data:
            await _check_blobs(repo, record, summary)

    reached = await reach(repo, watched)
    summary.errors.extend(reached.problems)
    for blob_id in sorted(reached.live):
        if not repo.index.has_blob(blob_id):
            summary.errors.append(f"blob {blob_id.hex()[:16]} is referenced but not indexed")
    summary.problems = [
        attrs.evolve(
            problem,
            snapshots=tuple(
                sid for sid, packs in reached.packs.items() if problem.pack_id in packs
            ),
        )
        for problem in summary.problems
    ]

    for peer_id, wanted in repo.expected_shards().items():
        if peer_id in held:
            summary.orphan_shards += len(held[peer_id] - wanted)
    progress.close()
    return summary


async def _check_pack(
    repo: Repository,
    record: PackRecord,
    held: Mapping[str, frozenset[bytes]],
    summary: CheckSummary,
    *,
    read_data: bool,
) -> PackProblem | None:
    """What is wrong with ``record``'s shards (None: nothing), counted into ``summary``."""
    wrong: list[tuple[str, str]] = []

    async def verify(location: ShardLocation) -> None:
        try:
            await repo.fetch_verified_shard(record, location)
        except IntegrityError:
            summary.shards_corrupt += 1
            wrong.append((location.peer_id, "corrupt"))
        except StoreError as exc:
            summary.shards_missing += 1
            wrong.append((location.peer_id, f"cannot be read: {exc}"))

    async with trio.open_nursery() as nursery:
        for location in record.shards:
            peer_id = location.peer_id
            if peer_id not in held:
                summary.shards_unreachable += 1
                wrong.append((peer_id, "did not answer"))
            elif formats.shard_id(record.pack_id, location.index) not in held[peer_id]:
                summary.shards_missing += 1
                wrong.append((peer_id, "missing"))
            elif read_data:
                nursery.start_soon(verify, location)
    unplaced = record.n - len(record.shards)
    summary.shards_unplaced += unplaced
    if not wrong and not unplaced:
        return None
    good = len(record.shards) - len(wrong)
    return PackProblem(record.pack_id, record.k, record.n, good, unplaced, tuple(sorted(wrong)))


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
