"""The durability model: an event-level Monte Carlo of placement, failures,
audits and repair over many nodes and years (pure; randomness passed in).

Nouns:

* **node** — a machine that holds shards. Its **lifetime** is exponential
  with mean ``node_mttf_days``; when it ends, its shards are gone for good
  and a new node (a new id) takes its **slot**, so the network keeps its
  size. Each node is online a share ``availability`` of every day, in one
  stretch at a time of day of its own (its **phase**, uniform): at any
  moment each node is online with that probability, independently of the
  others — the **diurnal** model.
* **pack** — k-of-n: shard i on the i-th target that
  :func:`p2pbackup.core.placement.plan_pack` ranks among a random sample of
  the nodes (the ranking code the node uses; the sample stands for the
  peers a home knows). A pack keeps every **copy** of its shards, current
  or extra, as the repair code does. It is **lost** the moment fewer than k
  of its shard indices have a copy on a living node: nothing can bring it
  back.
* **audit delay** ``detect_days`` — how long after a holder's end the owner's
  audits notice it; the pack is then **checked**: its copies get the states
  the node would see (healthy: holder alive and online; else offline or
  lost by :func:`p2pbackup.maintenance.repair.reachability` from when the
  holder was last online and the grace period) and
  :func:`p2pbackup.maintenance.repair.decide_pack` decides, over a random
  sample of online nodes as the pool. A wait is checked again when the
  first offline copy would turn lost; a pack too short of online holders to
  repair, when the first of them wakes.
* **repair** — a decision to rebuild takes ``repair_days`` plus the transfer
  time of its bytes (k shards down, the rebuilt ones up) at ``bandwidth``;
  then its rebuilt copies and index changes take effect (a target that
  ended meanwhile holds nothing) and the pack is checked again. **Repair
  traffic** counts those bytes.
* **sample** — a moment at which the share of **available** packs (at least
  k shard indices on nodes online then) is measured; ``samples`` of them,
  evenly spread over the run.

Events sit in one heap ordered by time (node ends, checks, repairs done,
samples), so the cost grows with the number of events, not of nodes × ticks.
Node lifetimes and phases come from their own random stream, drawn in the
order slots turn over, so runs that differ only in repair see the same
failures (common random numbers).

Not modelled: a repair pass that finds a pack short only because its
holders sleep, with no holder gone (packs are looked at when audits notice
an end, and as their decisions ask); correlated failures (a disaster, a
region); disks that corrupt shards; full peers; cheaters. The full
simulator (the real node on the memory network) covers those.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from typing import Any

import attrs

from p2pbackup.core import placement
from p2pbackup.errors import UsageError
from p2pbackup.maintenance import repair
from p2pbackup.sim import closedform

DAY = 86400.0
YEAR = closedform.YEAR_DAYS * DAY
#: Nodes drawn at random per placement, as multiples of n (all of them in a
#: smaller network): the peers of one home, ranked by the placement code.
#: Twice n leaves targets when some are asleep.
CANDIDATE_FACTOR = 2


@attrs.frozen
class RepairModel:
    """How the owner repairs: the node's policy, and how long a repair takes."""

    policy: repair.RepairPolicy
    #: Days from the decision to the rebuilt shards in place, beside transfer.
    repair_days: float
    #: Bytes per second a repair moves; None: transfer takes no extra time.
    bandwidth: float | None = None

    @classmethod
    def with_threshold(
        cls,
        k: int,
        n: int,
        threshold: int,
        *,
        grace_days: float = repair.DEFAULT_GRACE / DAY,
        repair_days: float,
        bandwidth: float | None = None,
    ) -> RepairModel:
        """The model repairing a k-of-n pack below ``threshold`` shards."""
        if not k < threshold <= n:
            raise UsageError(f"the repair threshold must be above K and at most N, not {threshold}")
        if grace_days < 0 or repair_days < 0 or (bandwidth is not None and bandwidth <= 0):
            raise UsageError("grace, repair days and bandwidth must be positive")
        grace = grace_days * DAY
        policy = repair.RepairPolicy(grace=grace, spares=threshold - k, surplus_after=grace)
        return cls(policy, repair_days, bandwidth)

    def duration_days(self, moved_bytes: int) -> float:
        """Days one repair moving ``moved_bytes`` takes."""
        transfer = 0.0 if self.bandwidth is None else moved_bytes / self.bandwidth / DAY
        return self.repair_days + transfer


@attrs.frozen
class DurabilityParams:
    """One run of the model (module docstring)."""

    k: int
    n: int
    nodes: int
    packs: int
    node_mttf_days: float
    years: float
    #: None: no repair at all.
    repair: RepairModel | None
    availability: float = 1.0
    detect_days: float = 1.0
    pack_bytes: int = 16 << 20
    samples: int = 12

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.k < self.n:
            raise UsageError(f"shards must be K/N with 1 <= K < N, not {self.k}/{self.n}")
        if self.nodes < self.n:
            raise UsageError(f"{self.nodes} nodes are too few for {self.n} shards a pack, one each")
        if self.packs < 1 or self.years <= 0 or self.node_mttf_days <= 0:
            raise UsageError("packs, years and the node lifetime must be positive")
        if not 0 < self.availability <= 1 or self.detect_days < 0 or self.samples < 0:
            raise UsageError("availability must be in (0, 1]; detect days and samples >= 0")

    @property
    def shard_bytes(self) -> int:
        return -(-self.pack_bytes // self.k)


@attrs.frozen
class DurabilityResult:
    """What one run found."""

    params: DurabilityParams
    packs_lost: int
    pack_years: float
    #: Exact Poisson 95 % interval of ``packs_lost / pack_years``.
    interval: tuple[float, float]
    #: Mean share of packs available at the samples; None without samples.
    available_fraction: float | None
    repairs: int
    shards_rebuilt: int
    repair_bytes: int
    node_failures: int
    events: int

    @property
    def loss_per_pack_year(self) -> float:
        return self.packs_lost / self.pack_years


def summary(result: DurabilityResult) -> dict[str, Any]:
    """The result as plain values (for ``--json`` and sweeps)."""
    params = result.params
    repair_model = params.repair
    low, high = result.interval
    return {
        "shards": f"{params.k}/{params.n}",
        "repair_threshold": (
            None if repair_model is None else repair_model.policy.threshold(params.k, params.n)
        ),
        "grace_days": None if repair_model is None else repair_model.policy.grace / DAY,
        "repair_days": None if repair_model is None else repair_model.repair_days,
        "node_mttf_days": params.node_mttf_days,
        "availability": params.availability,
        "nodes": params.nodes,
        "packs": params.packs,
        "years": params.years,
        "packs_lost": result.packs_lost,
        "pack_years": result.pack_years,
        "simulated_loss_per_pack_year": result.loss_per_pack_year,
        "simulated_loss_interval_95": [low, high],
        "analytic_loss_per_pack_year": closedform.analytic_loss_per_pack_year(params),
        "available_fraction": result.available_fraction,
        "repairs": result.repairs,
        "shards_rebuilt": result.shards_rebuilt,
        "repair_bytes": result.repair_bytes,
        "node_failures": result.node_failures,
        "events": result.events,
    }


# Event kinds, in the order they run at equal times.
_END, _DONE, _CHECK, _SAMPLE = range(4)

_NO_POOL = repair.PeerPool({}, {})


@attrs.frozen
class _Repair:
    """A repair under way: what was decided, and the bytes it moves."""

    decision: repair.PackDecision
    moved: int


#: One copy: (shard index, node, current, when it became an extra).
_Copy = tuple[int, int, bool, float]


class DurabilityModel:
    """One run's state (module docstring); :meth:`run` plays it to the end."""

    def __init__(self, params: DurabilityParams, rng: random.Random) -> None:
        self.params = params
        # Separate streams: node lifetimes do not depend on what repair draws.
        self._node_rng = random.Random(rng.getrandbits(64))
        self._place_rng = random.Random(rng.getrandbits(64))
        self.end = params.years * YEAR
        self.death: list[float] = []
        self.phase: list[float] = []
        self.slots: list[int] = []
        self.holdings: dict[int, set[int]] = {}
        self.copies: list[list[_Copy]] = []
        self.lost_at: list[float | None] = [None] * params.packs
        self._busy = [False] * params.packs
        self._pending = [math.inf] * params.packs
        self._heap: list[tuple[float, int, int, int, object]] = []
        self._seq = 0
        self.repairs = self.shards_rebuilt = self.repair_bytes = 0
        self.node_failures = self.events = 0
        self._available: list[float] = []

    # -- nodes ------------------------------------------------------------------

    def _new_node(self, slot: int, now: float) -> int:
        node = len(self.death)
        lifetime = self._node_rng.expovariate(1.0 / (self.params.node_mttf_days * DAY))
        self.death.append(now + lifetime)
        self.phase.append(self._node_rng.random())
        self._push(now + lifetime, _END, slot)
        return node

    def online(self, node: int, t: float) -> bool:
        a = self.params.availability
        return a >= 1 or (t / DAY + self.phase[node]) % 1.0 < a

    def _last_online(self, node: int, t: float) -> float:
        """When ``node`` was last online at or before ``t`` (alive or not)."""
        t = min(t, self.death[node])
        a = self.params.availability
        if a >= 1:
            return t
        into_day = (t / DAY + self.phase[node]) % 1.0
        return t if into_day < a else t - (into_day - a) * DAY

    def _next_wake(self, node: int, t: float) -> float:
        into_day = (t / DAY + self.phase[node]) % 1.0
        return t + (1.0 - into_day) * DAY

    def _state(self, node: int, t: float) -> repair.ShardState:
        if self.death[node] > t and self.online(node, t):
            return repair.ShardState.HEALTHY
        assert self.params.repair is not None
        grace = self.params.repair.policy.grace
        return repair.reachability(self._last_online(node, t), t, grace)

    def _sample_nodes(self) -> list[int]:
        count = min(len(self.slots), CANDIDATE_FACTOR * self.params.n)
        slots = self._place_rng.sample(range(len(self.slots)), count)
        return [self.slots[s] for s in slots]

    # -- events -----------------------------------------------------------------

    def _push(self, t: float, kind: int, arg: int, data: object = None) -> None:
        if t >= self.end:
            return  # after the run: a repair then does not finish within it
        self._seq += 1
        heapq.heappush(self._heap, (t, kind, self._seq, arg, data))

    def _check_at(self, pack: int, t: float) -> None:
        if t < self._pending[pack]:
            self._pending[pack] = t
            self._push(t, _CHECK, pack)

    def run(self) -> DurabilityResult:
        p = self.params
        for slot in range(p.nodes):
            self.slots.append(self._new_node(slot, 0.0))
        self._place_all()
        offset = self._place_rng.random()
        for i in range(p.samples):
            self._push((i + offset) / p.samples * self.end, _SAMPLE, i)
        handlers: dict[int, Callable[[float, int, object], None]] = {
            _END: self._on_end,
            _CHECK: self._on_check,
            _DONE: self._on_done,
            _SAMPLE: self._on_sample,
        }
        heap = self._heap
        while heap:
            t, kind, _, arg, data = heapq.heappop(heap)
            self.events += 1
            handlers[kind](t, arg, data)
        exposure = math.fsum(self.end if at is None else at for at in self.lost_at) / YEAR
        lost = sum(1 for at in self.lost_at if at is not None)
        return DurabilityResult(
            params=p,
            packs_lost=lost,
            pack_years=exposure,
            interval=closedform.poisson_rate_interval(lost, exposure),
            available_fraction=(
                math.fsum(self._available) / len(self._available) if self._available else None
            ),
            repairs=self.repairs,
            shards_rebuilt=self.shards_rebuilt,
            repair_bytes=self.repair_bytes,
            node_failures=self.node_failures,
            events=self.events,
        )

    def _place_all(self) -> None:
        p = self.params
        weights = placement.PeerWeight()
        for pack in range(p.packs):
            peers = {str(node): weights for node in self._sample_nodes()}
            plan = placement.plan_pack(_pack_id(pack), p.n, peers, p.shard_bytes, _own_host)
            targets = [int(peer) for peer in plan.targets]
            self.copies.append([(i, node, True, 0.0) for i, node in enumerate(targets)])
            for node in targets:
                self.holdings.setdefault(node, set()).add(pack)

    def _on_end(self, t: float, slot: int, _: object) -> None:
        node = self.slots[slot]
        self.node_failures += 1
        for pack in self.holdings.pop(node, ()):
            if self.lost_at[pack] is not None:
                continue
            alive = {i for i, holder, _, _ in self.copies[pack] if self.death[holder] > t}
            if len(alive) < self.params.k:
                self.lost_at[pack] = t
            elif self.params.repair is not None and not self._busy[pack]:
                self._check_at(pack, t + self.params.detect_days * DAY)
        self.slots[slot] = self._new_node(slot, t)

    def _on_check(self, t: float, pack: int, _: object) -> None:
        if t != self._pending[pack]:
            return  # an earlier check of this pack ran instead
        self._pending[pack] = math.inf
        if self.lost_at[pack] is not None or self._busy[pack]:
            return
        p = self.params
        assert p.repair is not None
        # Extras on ended nodes past the grace period change no decision:
        # drop them, or they would pile up over the years.
        copies = self.copies[pack] = [
            c
            for c in self.copies[pack]
            if c[2] or self.death[c[1]] > t or self._state(c[1], t) is not repair.ShardState.LOST
        ]
        state = repair.PackState(
            _pack_id(pack),
            p.k,
            p.n,
            p.shard_bytes,
            tuple(
                repair.ShardCopy(i, str(node), self._state(node, t), current, since)
                for i, node, current, since in copies
            ),
        )
        # Most checks need no target: decide without a pool first, and draw
        # one only for a repair that needs it.
        decision = repair.decide_pack(state, _NO_POOL, p.repair.policy, t)
        if decision.short:
            weights = placement.PeerWeight()
            pool = repair.PeerPool(
                {str(node): weights for node in self._sample_nodes() if self.online(node, t)}, {}
            )
            decision = repair.decide_pack(state, pool, p.repair.policy, t)
        if decision.action is repair.Action.REPAIR and decision.rebuild:
            moved = (p.k + len(decision.rebuild)) * p.shard_bytes
            self._busy[pack] = True
            self._push(
                t + p.repair.duration_days(moved) * DAY, _DONE, pack, _Repair(decision, moved)
            )
            return
        self._apply(pack, decision, t)
        if decision.action in (repair.Action.NOTHING, repair.Action.WAIT):
            # A holder that ended but is still within the grace period is
            # looked at again when it turns lost (the node's next passes
            # would); holders that only sleep come back by themselves.
            turns = [
                self._last_online(node, t) + p.repair.policy.grace
                for node in (int(c.peer_id) for c in state.copies)
                if self.death[node] <= t
            ]
            later = [turn for turn in turns if turn > t]
            if later:
                self._check_at(pack, min(later) + 1.0)
        elif decision.action is repair.Action.UNRECOVERABLE:
            asleep = [
                self._next_wake(node, t)
                for _, node, _, _ in copies
                if self.death[node] > t and not self.online(node, t)
            ]
            self._check_at(pack, min(asleep) + 1.0)
        elif decision.action is repair.Action.REPAIR:
            # No usable peer in the sample: look again in a quarter of a day,
            # not a whole one, or a small circle whose only free node
            # sleeps at that hour would be found asleep every time.
            self._check_at(pack, t + DAY / 4)

    def _on_done(self, t: float, pack: int, data: object) -> None:
        assert isinstance(data, _Repair)
        decision, moved = data.decision, data.moved
        self._busy[pack] = False
        if self.lost_at[pack] is not None:
            return
        self.repairs += 1
        self.shards_rebuilt += len(decision.rebuild)
        self.repair_bytes += moved
        self._apply(pack, decision, t)
        self._check_at(pack, t)

    def _apply(self, pack: int, decision: repair.PackDecision, t: float) -> None:
        """Carry ``decision``'s index changes out on the pack's copies."""
        if not (decision.changes_index or decision.delete):
            return
        copies = self.copies[pack]
        dropped = {(c.index, int(c.peer_id)) for c in (*decision.forget, *decision.delete)}
        displaced = {(c.index, int(c.peer_id)) for c in decision.displace}
        reinstated = {(c.index, int(c.peer_id)) for c in decision.reinstate}
        kept: list[_Copy] = []
        for index, node, current, since in copies:
            key = (index, node)
            if key in dropped:
                self._release(node, pack, copies, key)
                continue
            if key in displaced:
                current, since = False, t
            elif key in reinstated:
                current = True
            kept.append((index, node, current, since))
        for step in decision.rebuild:
            node = int(step.peer_id)
            kept.append((step.index, node, True, 0.0))
            if self.death[node] > t:
                self.holdings.setdefault(node, set()).add(pack)
        self.copies[pack] = kept

    def _release(self, node: int, pack: int, copies: list[_Copy], key: tuple[int, int]) -> None:
        """Forget that ``node`` holds ``pack`` unless another copy stays there."""
        if any(n == node and (i, n) != key for i, n, _, _ in copies):
            return
        held = self.holdings.get(node)
        if held is not None:
            held.discard(pack)

    def _on_sample(self, t: float, _: int, __: object) -> None:
        k = self.params.k
        available = 0
        for pack, copies in enumerate(self.copies):
            if self.lost_at[pack] is not None:
                continue
            up = {i for i, node, _, _ in copies if self.death[node] > t and self.online(node, t)}
            available += len(up) >= k
        self._available.append(available / self.params.packs)


def simulate(params: DurabilityParams, rng: random.Random) -> DurabilityResult:
    """Run the model once (module docstring)."""
    return DurabilityModel(params, rng).run()


def _pack_id(pack: int) -> bytes:
    return pack.to_bytes(8, "big")


def _own_host(peer: str) -> str:
    # Every node on a host of its own.
    return peer
