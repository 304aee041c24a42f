"""Repair planning: what to do for each pack, from the state of its shards (pure).

Nouns:

* **shard state** — :class:`ShardState`: what is known of one stored copy of
  a shard now. **Healthy**: its peer answered and has it (listed, audited or
  read back and verified). **Offline**: its peer did not answer, but was seen
  less than the **grace period** ago — a home asleep or away, not gone.
  **Lost**: its peer has not answered for longer than that. **Failed**: its
  peer answered, but the shard failed verification (corrupt, truncated,
  another shard's bytes). **Missing**: its peer answered and does not have
  it. **Removed**: its peer was removed by the user (or disqualified), so
  none of its shards count any more. Lost, failed, missing and removed are
  all *gone* for counting; only offline copies are waited for.
* **copy** — :class:`ShardCopy`: shard ``index`` of a pack on one peer, in
  one state. The **current** copy of an index is where the index says it is;
  an **extra** copy is one an earlier repair moved away from (its peer was
  offline or lost then) and that is remembered, so that when the peer comes
  back its shard counts again (the lesson of Carbonite: telling transient
  failures from permanent ones, and reintegrating what returns, is what
  makes durability cheap).
* **healthy count** — the shard indices of a pack with a healthy copy, each
  on a peer of its own: what the pack could be read from now.
* **repair threshold** r — a pack whose healthy count is below r is
  repaired (k < r ≤ n): :meth:`RepairPolicy.threshold`, by default
  ``min(n, k + 3)``; ``docs/maintenance.md`` says why.
* **urgent** — a pack with fewer than :attr:`RepairPolicy.urgent_spares`
  healthy shards beyond k: one more loss and it could no longer be read
  while its sleeping peers sleep, so repair does not wait for them.
* **surplus** — a healthy extra copy of an index whose current copy is
  healthy too: beyond n, it is deleted once it has been an extra for
  :attr:`RepairPolicy.surplus_after` seconds.
* **decision** — :class:`PackDecision`, one per pack (:class:`Action`):
  nothing to do, **wait** (offline peers within the grace period would
  bring it back to r), **repair** (which indices to rebuild onto which
  peers), or **unrecoverable** (fewer than k healthy shards: nothing can be
  rebuilt until some come back). Beside the action it says which copies
  change rank (extras reinstated, current copies displaced), which are
  forgotten, and which peers are asked to delete theirs.
* **target** — a peer a rebuilt shard goes to: one that answered now, may
  receive shards, holds no healthy or offline copy of the pack, and has
  room; ranked as :mod:`p2pbackup.core.placement` ranks peers for a backup,
  with peers on hosts that hold none of the pack first and one per host
  while others are left.

Everything here takes values and returns frozen values: no clock (``now``
is passed in), no I/O. :mod:`p2pbackup.maintenance.repairer` gathers the
states and carries the decisions out.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

import attrs

from p2pbackup.core import placement

#: Three days: long enough for a home that is off at night, over a weekend or
#: for a long weekend away; a longer absence costs one rebuild of that
#: peer's shards, and whatever it kept counts again when it returns.
DEFAULT_GRACE = 3 * 86400.0
#: Spare healthy shards beyond k below which a pack is repaired: r = k + 3
#: (at most n), so repair starts while two more losses can still be taken.
DEFAULT_SPARES = 3
#: Spare healthy shards below which repair does not wait for offline peers.
DEFAULT_URGENT_SPARES = 1


class ShardState(enum.Enum):
    """The state of one stored copy of a shard (module docstring)."""

    HEALTHY = "healthy"
    OFFLINE = "offline"
    LOST = "lost"
    FAILED = "failed"
    MISSING = "missing"
    REMOVED = "removed"

    @property
    def gone(self) -> bool:
        """Whether the copy is neither readable now nor waited for."""
        return self not in (ShardState.HEALTHY, ShardState.OFFLINE)


class Action(enum.Enum):
    NOTHING = "nothing"
    WAIT = "wait"
    REPAIR = "repair"
    UNRECOVERABLE = "unrecoverable"


@attrs.frozen
class RepairPolicy:
    """When to repair, and how long to wait (module docstring)."""

    #: Seconds an unreachable peer counts as offline (waited for), not lost.
    grace: float = DEFAULT_GRACE
    #: r = min(n, k + spares), and always above k.
    spares: int = DEFAULT_SPARES
    #: Repair at once, grace or not, with fewer spare healthy shards than this.
    urgent_spares: int = DEFAULT_URGENT_SPARES
    #: Seconds a healthy extra copy is kept beyond n before it is deleted.
    surplus_after: float = DEFAULT_GRACE

    def __attrs_post_init__(self) -> None:
        if not (self.grace >= 0 and self.surplus_after >= 0):
            raise ValueError(f"a repair policy needs durations >= 0, not {self}")
        if self.spares < 1 or self.urgent_spares < 0:
            raise ValueError(f"a repair policy needs spares >= 1, urgent_spares >= 0: {self}")

    def threshold(self, k: int, n: int) -> int:
        """The repair threshold r of a k-of-n pack: k < r <= n."""
        return max(k + 1, min(n, k + self.spares))


def reachability(last_seen: float | None, now: float, grace: float) -> ShardState:
    """The state of a copy on a peer that did not answer now: offline while
    it was seen less than ``grace`` seconds ago, else lost (also when it was
    never seen)."""
    if last_seen is not None and now - last_seen < grace:
        return ShardState.OFFLINE
    return ShardState.LOST


@attrs.frozen
class ShardCopy:
    """Shard ``index`` of a pack on ``peer_id``, in ``state`` (module docstring)."""

    index: int
    peer_id: str
    state: ShardState
    #: Whether this is where the index says shard ``index`` is.
    current: bool = True
    #: For an extra copy: when it stopped being current (unix seconds).
    displaced_at: float = 0.0


@attrs.frozen
class PackState:
    """A pack as repair sees it: its code, the bytes one stored shard takes
    (header included), and every copy of its shards known."""

    pack_id: bytes = attrs.field(repr=lambda p: p.hex()[:16])
    k: int
    n: int
    need: int
    copies: tuple[ShardCopy, ...]


@attrs.frozen
class PeerPool:
    """The peers repair may place shards on, and where every peer lives.

    ``weights`` holds only the **usable** peers: those that answered now and
    may receive shards; their ``free`` room shrinks as a plan places shards
    on them. ``hosts`` names the host of every peer, usable or not (the
    hosts of a pack's holders are kept apart from its new shards).
    """

    weights: Mapping[str, placement.PeerWeight]
    hosts: Mapping[str, str]

    def host(self, peer_id: str) -> str:
        return self.hosts.get(peer_id, f"peer {peer_id}")

    def placed(self, peer_ids: Iterable[str], need: int) -> PeerPool:
        """The pool after a shard of ``need`` bytes went to each of ``peer_ids``."""
        weights = dict(self.weights)
        for peer in peer_ids:
            weight = weights[peer]
            if weight.free is not None:
                weights[peer] = attrs.evolve(weight, free=max(0, weight.free - need))
        return PeerPool(weights, self.hosts)


@attrs.frozen
class Rebuild:
    """Shard ``index`` is rebuilt and put on ``peer_id``."""

    index: int
    peer_id: str


@attrs.frozen
class PackDecision:
    """What to do for one pack (module docstring)."""

    pack_id: bytes = attrs.field(repr=lambda p: p.hex()[:16])
    action: Action
    k: int
    n: int
    #: The repair threshold r of this pack.
    threshold: int
    #: Healthy count now (extras reinstated included).
    healthy: int
    #: Indices whose only copies are on offline peers (waited for).
    offline: int
    #: Shards to rebuild, and where; lost indices first, then offline ones.
    rebuild: tuple[Rebuild, ...] = ()
    #: More usable peers, in order, for a rebuilt shard a target refuses.
    spares: tuple[str, ...] = ()
    #: Indices that should have been rebuilt but found no peer to take them.
    short: int = 0
    #: Extra copies that become current again (their current copy is gone).
    reinstate: tuple[ShardCopy, ...] = ()
    #: Current copies that become extras (their index moves elsewhere while
    #: their peer is away: remembered, so that they count when it returns).
    displace: tuple[ShardCopy, ...] = ()
    #: Copies the index forgets.
    forget: tuple[ShardCopy, ...] = ()
    #: Copies whose peer is asked to delete them (each also forgotten, or
    #: replaced by a rebuilt one).
    delete: tuple[ShardCopy, ...] = ()
    #: Why, in words (for the summary), when the action is not "nothing".
    reason: str = ""

    @property
    def healthy_after(self) -> int:
        """The healthy count once every rebuilt shard is placed."""
        return self.healthy + len(self.rebuild)

    @property
    def changes_index(self) -> bool:
        return bool(self.rebuild or self.reinstate or self.displace or self.forget)


def _choose_healthy(
    pack: PackState,
) -> tuple[dict[int, ShardCopy], list[ShardCopy]]:
    """Each index's healthy copy, one per peer (the current one when it is
    healthy, else an extra one), and the extras that become current."""
    chosen: dict[int, ShardCopy] = {}
    used: set[str] = set()
    # Current copies first, so that an extra is only reinstated for an index
    # whose current copy is not healthy.
    ordered = sorted(pack.copies, key=lambda c: (not c.current, c.index, c.peer_id))
    for copy in ordered:
        if copy.state is not ShardState.HEALTHY or copy.index in chosen or copy.peer_id in used:
            continue
        if not 0 <= copy.index < pack.n:
            continue
        chosen[copy.index] = copy
        used.add(copy.peer_id)
    reinstated = [copy for copy in chosen.values() if not copy.current]
    return chosen, reinstated


def rank_targets(
    pack_id: bytes,
    candidates: Mapping[str, placement.PeerWeight],
    need: int,
    host_of: Callable[[str], str],
    holders: Sequence[str],
) -> list[str]:
    """The candidates that have room for a shard of ``need`` bytes, in the
    order rebuilt shards of the pack go to them: ranked by weight as a
    backup ranks them, then peers on hosts that ``holders`` (peers holding
    the pack's other shards) do not live on, one per host first."""
    weights = placement.weigh_peers(candidates, need)
    ranked = [p for p in placement.rank_weighted(pack_id, weights) if weights[p] > 0]
    # The holders go first so that their hosts count as taken; spread_hosts
    # then puts every candidate on a new host before a second on any host.
    spread = placement.spread_hosts([*holders, *ranked], host_of)
    held = set(holders)
    return [peer for peer in spread if peer not in held]


def decide_pack(pack: PackState, pool: PeerPool, policy: RepairPolicy, now: float) -> PackDecision:
    """What to do for ``pack`` (module docstring), placing rebuilt shards on
    the usable peers of ``pool``."""
    k, n = pack.k, pack.n
    r = policy.threshold(k, n)
    chosen, reinstated = _choose_healthy(pack)
    healthy = len(chosen)
    by_index: dict[int, list[ShardCopy]] = {}
    for copy in pack.copies:
        by_index.setdefault(copy.index, []).append(copy)
    offline_indices = [
        i
        for i in range(n)
        if i not in chosen and any(c.state is ShardState.OFFLINE for c in by_index.get(i, ()))
    ]
    gone = [i for i in range(n) if i not in chosen and i not in offline_indices]
    removed = any(c.current and c.state is ShardState.REMOVED for c in pack.copies)
    changes = _Changes()
    # An extra copy reinstated: the current one it replaces is retired.
    for copy in reinstated:
        for old in by_index[copy.index]:
            if old.current:
                changes.retire(old)
    base = PackDecision(
        pack_id=pack.pack_id,
        action=Action.NOTHING,
        k=k,
        n=n,
        threshold=r,
        healthy=healthy,
        offline=len(offline_indices),
        reinstate=tuple(reinstated),
    )
    if healthy < k:
        why = f"{healthy} healthy shards of the {k} needed"
        if offline_indices:
            enough = "" if healthy + len(offline_indices) >= k else ", still too few"
            why += f"; {len(offline_indices)} more on peers offline within the grace period{enough}"
        # Nothing is deleted from a pack that cannot be read now.
        return changes.apply(attrs.evolve(base, action=Action.UNRECOVERABLE, reason=why), False)
    for copy in pack.copies:
        if not copy.current and copy not in reinstated:
            changes.extra(copy, now, policy)

    urgent = healthy - k < policy.urgent_spares
    wanted: list[int] = []
    if healthy >= r and not removed:
        decision = base
    elif healthy + len(offline_indices) >= r and not urgent and not removed:
        decision = attrs.evolve(
            base,
            action=Action.WAIT,
            reason=f"{len(offline_indices)} shards on peers offline within the grace period",
        )
    else:
        # Every gone index, so that one download of k shards serves them all;
        # the offline ones too when the pack cannot wait for their peers.
        wanted = gone + (offline_indices if urgent else [])
        reason = f"{healthy} healthy shards, below {r}" if healthy < r else "a peer was removed"
        decision = attrs.evolve(base, action=Action.REPAIR, reason=reason)
    if not wanted:
        return changes.apply(decision, True)

    holders = sorted(
        {c.peer_id for c in pack.copies if c.state in (ShardState.HEALTHY, ShardState.OFFLINE)}
    )
    candidates = {p: w for p, w in pool.weights.items() if p not in holders}
    ordered = rank_targets(pack.pack_id, candidates, pack.need, pool.host, holders)
    placed = min(len(wanted), len(ordered))
    rebuild = tuple(Rebuild(i, peer) for i, peer in zip(wanted, ordered[:placed], strict=False))
    for step in rebuild:
        for old in by_index.get(step.index, ()):
            if old.current:
                changes.retire(old)
    short = len(wanted) - placed
    reason = decision.reason
    if short:
        reason += f"; {short} shards found no usable peer holding none of the pack with room"
    decision = attrs.evolve(
        decision, rebuild=rebuild, spares=tuple(ordered[placed:]), short=short, reason=reason
    )
    return changes.apply(decision, True)


@attrs.define
class _Changes:
    """The copies a decision retires, forgets and deletes, as it is made."""

    displace: list[ShardCopy] = attrs.Factory(list)
    forget: list[ShardCopy] = attrs.Factory(list)
    delete: list[ShardCopy] = attrs.Factory(list)

    def retire(self, old: ShardCopy) -> None:
        """A current copy that another copy of its index replaces: kept as
        an extra while its peer is away, else forgotten (and deleted where
        it may still sit on a peer)."""
        if old.state in (ShardState.OFFLINE, ShardState.LOST):
            self.displace.append(old)
        elif old.state in (ShardState.FAILED, ShardState.REMOVED):
            self.delete.append(old)
        else:
            self.forget.append(old)

    def extra(self, copy: ShardCopy, now: float, policy: RepairPolicy) -> None:
        """An extra copy that stays an extra: a healthy one is surplus,
        deleted after a while; a bad one goes; one on a peer away stays."""
        if copy.state is ShardState.HEALTHY:
            if now - copy.displaced_at >= policy.surplus_after:
                self.delete.append(copy)
        elif copy.state in (ShardState.FAILED, ShardState.REMOVED):
            self.delete.append(copy)
        elif copy.state is ShardState.MISSING:
            self.forget.append(copy)

    def apply(self, decision: PackDecision, deleting: bool) -> PackDecision:
        """``decision`` with these changes; without ``deleting``, copies
        that would be deleted are kept as they are."""
        return attrs.evolve(
            decision,
            displace=tuple(self.displace),
            forget=tuple(self.forget),
            delete=tuple(self.delete) if deleting else (),
        )


@attrs.frozen
class RepairPlan:
    """A decision for every pack, in the order given."""

    decisions: tuple[PackDecision, ...]

    def count(self, action: Action) -> int:
        return sum(1 for d in self.decisions if d.action is action)


def plan_repair(
    packs: Iterable[PackState], pool: PeerPool, policy: RepairPolicy, now: float
) -> RepairPlan:
    """Decide every pack in turn, each one's rebuilt shards taking room
    from the peers they go to before the next is decided."""
    decisions = []
    for pack in packs:
        decision = decide_pack(pack, pool, policy, now)
        pool = pool.placed((step.peer_id for step in decision.rebuild), pack.need)
        decisions.append(decision)
    return RepairPlan(tuple(decisions))


def most_urgent_first(packs: Collection[PackState]) -> list[PackState]:
    """Packs ordered by how few healthy shards they have beyond k, so that a
    pass cut short has spent its time where the risk is."""

    def spare(pack: PackState) -> tuple[int, bytes]:
        healthy = len(_choose_healthy(pack)[0])
        return healthy - pack.k, pack.pack_id

    return sorted(packs, key=spare)
