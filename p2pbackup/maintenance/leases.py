"""Leases, renewed by their owner: a pure plan, then a thin trio step.

Nouns:

* **lease** — the unix second until which a storage node promised to keep
  one of our shards (:mod:`p2pbackup.node.shardhost`). A node collects a
  shard whose lease ran out, unless its owner is a friend. Owners ask for
  :data:`LEASE_SECONDS` (a year) at every put and renewal; the index
  records what each node granted (:mod:`p2pbackup.engine.index`, "lease
  expiry"). Folder peers keep shards until they are deleted: they have none.
* **due** — a shard whose lease ends less than :data:`RENEW_MARGIN` from
  now, or whose expiry the index does not know (a row recovered from an
  index segment, one placed by a repair, one made before leases were
  recorded). With a year's lease and a margin of eleven months, every shard
  is renewed about monthly, so a user who lost the machine has at least
  eleven months to recover before any node may collect a shard.
* **batch** — :class:`RenewalBatch`: due shards of one peer, at most
  :data:`~p2pbackup.wire.messages.MAX_RENEW_SHARDS` of them: one signed
  ``RenewLease`` request.
* **plan** — :func:`plan_renewals`: the batches, per peer (pure).
* **renewal** — :func:`renew_leases`: the plan carried out, peers in
  parallel (:data:`PEERS_AT_ONCE` at a time), each peer's batches in turn;
  the expiry each node granted is recorded in the index. A shard the node
  says it does not hold is **missing**: recorded as a failed audit of that
  shard (the verdict path audits use, so repair and ``status`` see it) and
  reported. A peer that does not answer keeps its shards due: the next
  call tries again.
* **report** — :class:`LeaseReport`: per peer, what was renewed, what is
  missing, or why it did not answer.

The keeper calls :func:`renew_leases` once a round; when nothing is due,
the call costs one index query (:meth:`~p2pbackup.engine.index.Index.leased_shards`).
Peers that are leaving the network are not renewed: their shards are moving.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs
import trio

from p2pbackup.core import formats
from p2pbackup.engine.index import LeasedShard
from p2pbackup.engine.progress import plural
from p2pbackup.engine.repository import Repository
from p2pbackup.errors import StoreError
from p2pbackup.model import ShardAudit
from p2pbackup.stores.remote import DEFAULT_LEASE_SECONDS, RemoteShardStore
from p2pbackup.wire.messages import MAX_RENEW_SHARDS

#: The lease asked for at every renewal: what a put asks.
LEASE_SECONDS = DEFAULT_LEASE_SECONDS
#: How often a shard's lease is renewed, at most.
RENEW_EVERY = 30 * 86400
#: A shard is due when less than this is left of its lease (module docstring).
RENEW_MARGIN = LEASE_SECONDS - RENEW_EVERY
#: Peers renewed at once.
PEERS_AT_ONCE = 4
#: Why a shard a renewal found missing failed, as its audit row says.
MISSING_REASON = "missing: the peer does not have it (lease renewal)"


@attrs.frozen
class RenewalBatch:
    """Due shards of one peer: one renewal request (module docstring)."""

    peer_id: str
    shards: tuple[LeasedShard, ...]

    @property
    def shard_ids(self) -> list[bytes]:
        return [formats.shard_id(s.pack_id, s.index) for s in self.shards]


def renew_before(now: float, margin: int = RENEW_MARGIN) -> int:
    """The expiry below which a lease is due at unix second ``now``."""
    return int(now) + margin


def is_due(lease_expiry: int | None, now: float, margin: int = RENEW_MARGIN) -> bool:
    return lease_expiry is None or lease_expiry < renew_before(now, margin)


def plan_renewals(
    shards: Iterable[LeasedShard],
    now: float,
    *,
    margin: int = RENEW_MARGIN,
    batch_size: int = MAX_RENEW_SHARDS,
) -> dict[str, tuple[RenewalBatch, ...]]:
    """The due shards among ``shards``, per peer, in batches of at most
    ``batch_size``, in the order given."""
    if batch_size < 1:
        raise ValueError(f"a renewal batch holds at least one shard, not {batch_size}")
    due: dict[str, list[LeasedShard]] = {}
    for shard in shards:
        if is_due(shard.lease_expiry, now, margin):
            due.setdefault(shard.peer_id, []).append(shard)
    return {
        peer_id: tuple(
            RenewalBatch(peer_id, tuple(listed[start : start + batch_size]))
            for start in range(0, len(listed), batch_size)
        )
        for peer_id, listed in due.items()
    }


@attrs.frozen
class PeerLeases:
    """What renewing one peer's leases did."""

    peer_id: str
    renewed: int = 0
    #: (pack id, shard index) of each shard the peer says it does not hold.
    missing: tuple[tuple[bytes, int], ...] = ()
    #: The expiry the peer granted last (None: it granted none).
    expiry: int | None = None
    #: Why it stopped answering ("" if it answered every batch).
    problem: str = ""

    @property
    def answered(self) -> bool:
        return not self.problem

    def describe(self) -> str:
        words = f"peer {self.peer_id}: renewed {plural(self.renewed, 'lease')}"
        if self.missing:
            words += f"; {plural(len(self.missing), 'shard')} missing there"
        if self.problem:
            words += f"; did not answer ({self.problem}), trying again next time"
        return words


@attrs.frozen
class LeaseReport:
    """What :func:`renew_leases` did, per peer (none when nothing was due)."""

    peers: tuple[PeerLeases, ...] = ()

    @property
    def renewed(self) -> int:
        return sum(peer.renewed for peer in self.peers)

    @property
    def missing(self) -> int:
        return sum(len(peer.missing) for peer in self.peers)

    @property
    def unanswered(self) -> list[str]:
        return [peer.peer_id for peer in self.peers if not peer.answered]

    def lines(self) -> list[str]:
        return [peer.describe() for peer in self.peers]


async def renew_leases(
    repo: Repository,
    now: float,
    *,
    lease_seconds: int = LEASE_SECONDS,
    margin: int = RENEW_MARGIN,
) -> LeaseReport:
    """Renew every due lease of ours (module docstring); ``now`` is unix seconds."""
    leased = repo.index.leased_shards(expiring_before=renew_before(now, margin))
    if not leased:
        return LeaseReport()
    plan = plan_renewals(leased, now, margin=margin)
    done: dict[str, PeerLeases] = {}
    limiter = trio.CapacityLimiter(PEERS_AT_ONCE)

    async def one(peer_id: str, batches: Sequence[RenewalBatch]) -> None:
        async with limiter:
            done[peer_id] = await _renew_peer(repo, peer_id, batches, lease_seconds, now)

    async with trio.open_nursery() as nursery:
        for peer_id, batches in plan.items():
            nursery.start_soon(one, peer_id, batches)
    return LeaseReport(tuple(done[peer_id] for peer_id in sorted(done)))


async def _renew_peer(
    repo: Repository,
    peer_id: str,
    batches: Sequence[RenewalBatch],
    lease_seconds: int,
    now: float,
) -> PeerLeases:
    """One peer's batches in turn; the first failure ends its turn."""
    result = PeerLeases(peer_id)
    try:
        store = repo.store(peer_id)
    except StoreError as error:
        return attrs.evolve(result, problem=str(error))
    if not isinstance(store, RemoteShardStore):
        return result  # not a node (it became a folder?): nothing to renew
    for batch in batches:
        try:
            expiry, absent = await store.renew(batch.shard_ids, lease_seconds)
        except StoreError as error:
            return attrs.evolve(result, problem=str(error))
        result = _record(repo, batch, expiry, frozenset(absent), result, int(now))
    return result


def _record(
    repo: Repository,
    batch: RenewalBatch,
    expiry: int,
    absent: frozenset[bytes],
    result: PeerLeases,
    now: int,
) -> PeerLeases:
    """Write one batch's answer to the index; ``result`` with it counted."""
    peer_id = batch.peer_id
    renewed, missing = [], []
    for shard, shard_id in zip(batch.shards, batch.shard_ids, strict=True):
        if shard_id in absent:
            missing.append(shard)
        else:
            renewed.append((shard.pack_id, shard.index, peer_id, expiry))
    index = repo.index
    with index.transaction():
        index.set_lease_expiries(renewed)
        index.set_shard_audits(
            (
                shard.pack_id,
                shard.index,
                ShardAudit(
                    peer_id, due_at=now, audited_at=now, passed=False, reason=MISSING_REASON
                ),
            )
            for shard in missing
        )
        index.set_seen(peer_id, now)
    return attrs.evolve(
        result,
        renewed=result.renewed + len(renewed),
        missing=(*result.missing, *((s.pack_id, s.index) for s in missing)),
        expiry=expiry,
    )
