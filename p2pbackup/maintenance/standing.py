"""Where each peer and each placed shard stands, as the index records it.

The readers that repair and ``status`` share: a peer's
:class:`~p2pbackup.maintenance.reputation.Standing` (its audit score, whether
it is disqualified, its last contact and uptime), and each shard's
:class:`ShardState` (what its last audit found, and whether it counts as
lost). The policy behind them is :mod:`~p2pbackup.maintenance.reputation`'s;
this module only reads the index and asks no peer.
"""

from __future__ import annotations

import attrs

from p2pbackup.core import placement
from p2pbackup.engine.index import Index
from p2pbackup.maintenance.reputation import ShardHealth, Standing, shard_health


@attrs.frozen
class ShardState:
    """What audits say of shard ``index`` of a pack, on ``peer_id``."""

    peer_id: str
    health: ShardHealth
    #: Unix seconds of its last audit answered (None: never), and of the next one due.
    audited_at: int | None
    due_at: int | None
    #: What its last audit found, when it failed.
    reason: str = ""

    @property
    def lost(self) -> bool:
        return self.health.lost


def peer_standings(index: Index, now: int) -> dict[str, Standing]:
    """Every peer's standing at unix second ``now``."""
    audits = index.peer_audits()
    seen = index.last_seen()
    probes = index.probe_counts()
    standings = {}
    for peer in index.peers():
        counts = probes.get(peer.peer_id)
        standings[peer.peer_id] = Standing.of(
            peer.peer_id,
            audits.get(peer.peer_id),
            last_contact=seen.get(peer.peer_id),
            uptime=1.0 if counts is None else placement.uptime(counts.answered, counts.asked),
            now=now,
        )
    return standings


def peer_standing(index: Index, peer_id: str, now: int) -> Standing:
    """One peer's standing at unix second ``now`` (KeyError for no such peer)."""
    return peer_standings(index, now)[peer_id]


def shard_states(index: Index) -> dict[tuple[bytes, int], ShardState]:
    """(pack id, shard index) → what audits say of it, for every placed shard."""
    audits = index.shard_audits()
    peers = index.peer_audits()
    states = {}
    for shard in index.placed_shards():
        key = (shard.pack_id, shard.index)
        audit = audits.get(key)
        states[key] = ShardState(
            peer_id=shard.peer_id,
            health=shard_health(audit, peers.get(shard.peer_id)),
            audited_at=None if audit is None else audit.audited_at,
            due_at=None if audit is None else audit.due_at,
            reason="" if audit is None else audit.reason,
        )
    return states
