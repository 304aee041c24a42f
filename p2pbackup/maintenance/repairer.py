"""Repair, carried out: one pass over every pack (the thin trio layer).

Nouns:

* **pass** — :func:`repair_pass`: ask every peer now (its space, then the
  shards it lists for us), tell each copy of each shard its state
  (:mod:`p2pbackup.maintenance.repair`'s nouns: healthy when its peer lists
  it, missing when its peer answers without it, offline or lost by how long
  ago its peer was last seen, removed when its peer is being removed or
  said it is leaving the network; an
  **audit verdict**, when the caller has one, overrides the listing), decide
  each pack, most urgent first, and carry the decisions out. A pass with
  **read verification** also downloads every listed shard and checks it
  against its Merkle root, so that a corrupt shard counts as failed: the
  stand-in for audits where there are none, and how ``p2pbackup repair``
  learns of shards a peer lists but no longer has whole.
* **repair of a pack** — fetch any k healthy shards (data shards first),
  each verified against the root the index kept
  (:meth:`~p2pbackup.engine.repository.Repository.fetch_verified_shard`);
  rebuild the missing ones (:func:`p2pbackup.engine.shards.rebuild_shards`:
  the same bytes as the originals, so the same roots, which is checked);
  ask peers holding failed copies to delete them; put each rebuilt shard on
  its target, turning to the decision's spares when one refuses; then, in
  one transaction, record where each shard is now (a copy moved away from
  an absent peer is kept as a displaced copy; a rebuilt shard's audit row
  starts afresh, due at once, since the last verdict on its index was about
  the bytes it replaced), and count the traffic. Peers holding surplus or
  removed copies are asked to delete them afterwards.
* **what audits found** — :func:`with_audits`: the verdicts a pass takes
  from the audits recorded in the index instead of reading shards back
  (:func:`audit_verdicts`: a shard whose last audit on the peer holding it
  failed counts as failed), and the peers audits disqualified, whose shards
  count as removed: rebuilt elsewhere, then deleted. What a serving home's
  background passes use.
* **pace** — every byte a pass moves goes through one
  :class:`~p2pbackup.maintenance.pacing.Pace` (``rate`` bytes a second), so
  that a pass never fills a home's uplink.
* **traffic** — bytes sent to and received from each peer, counted in the
  index per day under the purpose ``repair``; beside it, per peer and day,
  the shards rebuilt away from it and the rebuilt shards it took.
* **report** — :class:`RepairReport`: what the pass found and did.

When shards moved, the pass ends by describing the data packs whose records
changed in a new index segment (so a home recovered from its key finds
their shards where they are now) and republishing the root record to every
peer, new holders included (it names the index packs and their shards).

:func:`evacuate` is a pass over the packs that have shards on one peer, with
that peer removed: what ``peer remove`` and ``friend remove`` run first.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

import attrs
import trio

from p2pbackup.core import formats
from p2pbackup.engine import shards
from p2pbackup.engine.index import DisplacedShard, Index
from p2pbackup.engine.progress import Progress, human_bytes, plural
from p2pbackup.engine.repository import PROBE_SECONDS, Repository, host_of
from p2pbackup.errors import (
    IntegrityError,
    P2PBackupError,
    PeerUnavailableError,
    ProtocolError,
    ShardNotFoundError,
    StoreError,
    UsageError,
)
from p2pbackup.maintenance.repair import (
    Action,
    PackDecision,
    PackState,
    PeerPool,
    RepairPolicy,
    ShardCopy,
    ShardState,
    decide_pack,
    most_urgent_first,
    reachability,
)
from p2pbackup.model import PackRecord, ShardAudit, ShardLocation
from p2pbackup.net.pacing import Pace
from p2pbackup.stores.shardstore import ShardRoot

#: Bytes a second a pass moves by default: 1 MiB/s (8.4 Mbit/s), under half
#: of a typical home uplink of 20 Mbit/s or more, and spread over the k peers
#: a download reads from (docs/maintenance.md).
DEFAULT_RATE = float(1 << 20)
#: Packs repaired at once: enough to keep the network and a core busy while
#: another pack is coded, few enough to bound memory (k shards each).
DEFAULT_CONCURRENCY = 3
#: Seconds a peer that answered has to list the shards it holds for us.
LIST_TIMEOUT = 60.0
#: Times a pack is decided again when a shard it counted on turns out bad.
_ATTEMPTS = 3
#: The purpose repair traffic is counted under in the index.
PURPOSE = "repair"


@attrs.frozen
class ShardKey:
    """Shard ``index`` of pack ``pack_id`` on ``peer_id``: what an audit verdict is about."""

    pack_id: bytes
    index: int
    peer_id: str


@attrs.frozen
class RepairOptions:
    """How a pass runs (module docstring)."""

    policy: RepairPolicy = attrs.Factory(RepairPolicy)
    #: Bytes a second every transfer of the pass together (None: no limit).
    rate: float | None = DEFAULT_RATE
    #: Download and verify every listed shard (module docstring).
    verify: bool = False
    #: What audits found, by shard: overrides what the listing says.
    verdicts: Mapping[ShardKey, ShardState] = attrs.field(factory=dict)
    #: Peers whose shards count as removed: rebuilt elsewhere, then deleted.
    removed: frozenset[str] = frozenset()
    #: Only these packs (None: every pack).
    packs: frozenset[bytes] | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    #: End with a new index segment and root record when shards moved; a
    #: delegate, which holds no key of the owner's, does not.
    publish: bool = True


def audit_verdicts(audits: Mapping[tuple[bytes, int], ShardAudit]) -> dict[ShardKey, ShardState]:
    """What audit rows (:meth:`Index.shard_audits
    <p2pbackup.engine.index.Index.shard_audits>`: each about the peer that
    holds its shard now) say for repair: a shard whose last audit failed is
    failed; one that passed or was not audited yet is left to the listing,
    which also finds a shard deleted since its last audit."""
    return {
        ShardKey(pack_id, index, audit.peer_id): ShardState.FAILED
        for (pack_id, index), audit in audits.items()
        if audit.passed is False
    }


def with_audits(options: RepairOptions, index: Index) -> RepairOptions:
    """``options`` with what the audits recorded in ``index`` found (module
    docstring); verdicts already in ``options`` take precedence."""
    return attrs.evolve(
        options,
        verdicts={**audit_verdicts(index.shard_audits()), **options.verdicts},
        removed=options.removed | index.disqualified_peers(),
    )


@attrs.define
class PackOutcome:
    """What the pass did for one pack."""

    pack_id: bytes
    decision: PackDecision
    #: Healthy shards on distinct peers at the end of the pass.
    healthy: int
    rebuilt: int = 0
    problem: str = ""

    @property
    def below_k(self) -> bool:
        return self.healthy < self.decision.k

    @property
    def below_threshold(self) -> bool:
        return self.healthy < self.decision.threshold


@attrs.define
class RepairReport:
    """What one pass found and did (module docstring)."""

    grace: float
    peers: int = 0
    peers_answered: int = 0
    outcomes: list[PackOutcome] = attrs.Factory(list)
    shards_verified: int = 0
    shards_failed: int = 0
    shards_rebuilt: int = 0
    shards_reinstated: int = 0
    shards_deleted: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    #: Peers that took rebuilt shards.
    new_holders: set[str] = attrs.Factory(set)
    problems: list[str] = attrs.Factory(list)

    @property
    def packs(self) -> int:
        return len(self.outcomes)

    def _with(self, predicate: Callable[[PackOutcome], bool]) -> list[PackOutcome]:
        return [o for o in self.outcomes if predicate(o)]

    @property
    def repaired(self) -> list[PackOutcome]:
        return self._with(lambda o: o.rebuilt > 0)

    @property
    def waiting(self) -> list[PackOutcome]:
        return self._with(lambda o: o.decision.action is Action.WAIT)

    @property
    def unrecoverable(self) -> list[PackOutcome]:
        return self._with(lambda o: o.below_k)

    @property
    def limited(self) -> list[PackOutcome]:
        """Packs readable but below r at the end, not waiting: as many
        healthy shards as the peers allow."""
        return self._with(
            lambda o: not o.below_k and o.below_threshold and o.decision.action is not Action.WAIT
        )

    @property
    def ok(self) -> bool:
        """Every pack can be read from healthy shards."""
        return not self.unrecoverable

    def failure(self) -> str:
        """The one line that says which packs stay below k, and why."""
        bad = self.unrecoverable
        needs = sorted({o.decision.k for o in bad})
        needed = " or ".join(str(k) for k in needs)
        waiting = [o for o in bad if o.healthy + o.decision.offline >= o.decision.k]
        too_few = len(bad) - len(waiting)
        why = []
        if too_few:
            why.append(f"{too_few} have too few healthy shards left on the peers that answer")
        if waiting:
            why.append(
                f"{len(waiting)} need shards on peers offline within the grace period "
                f"({_duration(self.grace)}; `--grace 0` counts them lost)"
            )
        return (
            f"{len(bad)} of {plural(self.packs, 'pack')} could not be brought back to the {needed} "
            f"healthy shards needed to read them: {'; '.join(why)}"
        )

    def lines(self) -> list[str]:
        lines = [
            f"peers: {self.peers_answered} of {self.peers} answered",
            f"{plural(self.packs, 'pack')}: {len(self.repaired)} repaired "
            f"({plural(self.shards_rebuilt, 'shard')} rebuilt, "
            f"{self.shards_reinstated} counted again as their peers came back, "
            f"{self.shards_deleted} deleted); "
            f"{human_bytes(self.bytes_received)} received, {human_bytes(self.bytes_sent)} sent",
        ]
        if self.shards_verified or self.shards_failed:
            lines.append(
                f"read back and verified {plural(self.shards_verified, 'shard')}; "
                f"{self.shards_failed} were corrupt or missing"
            )
        at_r = [o for o in self.outcomes if not o.below_threshold]
        if self.outcomes and len(at_r) == self.packs:
            lowest = min(o.healthy for o in self.outcomes)
            lines.append(f"every pack has at least {lowest} healthy shards on distinct peers")
        limited = self.limited
        if limited:
            lowest = min(o.healthy for o in limited)
            lines.append(
                f"{plural(len(limited), 'pack')} {'has' if len(limited) == 1 else 'have'} "
                "as many healthy shards as the peers allow "
                f"(at least {lowest}, below the repair threshold of "
                f"{min(o.decision.threshold for o in limited)}): no other usable peer "
                "holds none of their shards with room; add peers to bring them back"
            )
        waiting = self.waiting
        if waiting:
            lines.append(
                f"{plural(len(waiting), 'pack')} {'waits' if len(waiting) == 1 else 'wait'} "
                "for peers offline within the grace period "
                f"({_duration(self.grace)})"
            )
        lines.extend(f"problem: {p}" for p in self.problems)
        if self.unrecoverable:
            lines.append(self.failure())
        return lines

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "grace_seconds": self.grace,
            "peers": self.peers,
            "peers_answered": self.peers_answered,
            "packs": self.packs,
            "packs_repaired": len(self.repaired),
            "packs_waiting": len(self.waiting),
            "packs_limited_by_peers": len(self.limited),
            "packs_unrecoverable": len(self.unrecoverable),
            "min_healthy": min((o.healthy for o in self.outcomes), default=None),
            "shards_verified": self.shards_verified,
            "shards_failed": self.shards_failed,
            "shards_rebuilt": self.shards_rebuilt,
            "shards_reinstated": self.shards_reinstated,
            "shards_deleted": self.shards_deleted,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "problems": list(self.problems),
            "unrecoverable": [
                {
                    "pack": o.pack_id.hex(),
                    "healthy": o.healthy,
                    "k": o.decision.k,
                    "why": o.problem or o.decision.reason,
                }
                for o in self.unrecoverable
            ],
        }


def _duration(seconds: float) -> str:
    if seconds == 0:
        return "0 s"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:g} {unit}"
    return f"{seconds:g} s"


class _Pass:
    """One repair pass (module docstring): what it learned of the peers,
    and the work on each pack."""

    def __init__(
        self, repo: Repository, options: RepairOptions, now: float, progress: Progress
    ) -> None:
        self.repo = repo
        self.index = repo.index
        self.options = options
        self.now = now
        self.day = int(now // 86400)
        self.progress = progress
        self.pace = Pace(options.rate)
        self.report = RepairReport(options.policy.grace)
        self.listed: dict[str, frozenset[bytes]] = {}
        self.last_seen: dict[str, int] = {}
        self.known: set[str] = set()
        self.hosts: dict[str, str] = {}
        self.usable: list[str] = []
        self.sent: Counter[str] = Counter()
        self.received: Counter[str] = Counter()
        #: Data packs whose shard map changed, and whether an index pack's did.
        self.changed_data: list[bytes] = []
        self.changed_root = False

    # -- the peers --------------------------------------------------------------

    async def survey(self) -> None:
        """Ask every peer now: its space (which also records it as seen),
        then the shards it lists for us."""
        repo = self.repo
        peers = repo.peers()
        self.known = {p.peer_id for p in peers}
        self.hosts = {p.peer_id: host_of(p) for p in peers}
        answers = await repo.probe_peers(PROBE_SECONDS, seen_at=int(self.now))
        answered = [p for p, a in answers.items() if a.answered]
        self.listed, unlisted = await repo.list_held(answered, LIST_TIMEOUT)
        self.last_seen = self.index.last_seen()
        self.usable = [p for p in self.listed if p not in self.options.removed]
        self.report.peers = len(peers)
        self.report.peers_answered = len(self.listed)
        for peer_id, problem in sorted(unlisted.items()):
            self.report.problems.append(f"peer {peer_id} did not list its shards: {problem}")

    def state_of(self, pack_id: bytes, index: int, peer_id: str) -> ShardState:
        """A copy's state from the listing, the last sighting and any verdict."""
        if peer_id in self.options.removed or peer_id not in self.known:
            return ShardState.REMOVED
        verdict = self.options.verdicts.get(ShardKey(pack_id, index, peer_id))
        if verdict is not None:
            return verdict
        held = self.listed.get(peer_id)
        if held is not None:
            present = formats.shard_id(pack_id, index) in held
            return ShardState.HEALTHY if present else ShardState.MISSING
        seen = self.last_seen.get(peer_id)
        return reachability(seen, self.now, self.options.policy.grace)

    def pool(self) -> PeerPool:
        """The usable peers with their room now (less what this run sent)."""
        return PeerPool(self.repo.peer_weights(self.usable), self.hosts)

    # -- one pack ---------------------------------------------------------------------

    def pack_state(
        self,
        record: PackRecord,
        displaced: Iterable[DisplacedShard],
        overrides: Mapping[tuple[int, str], ShardState],
    ) -> PackState:
        """The pack's copies in their states; ``overrides`` (shard index,
        peer) are what this pass found reading them."""
        copies = []
        for location in record.shards:
            state = overrides.get((location.index, location.peer_id))
            if state is None:
                state = self.state_of(record.pack_id, location.index, location.peer_id)
            copies.append(ShardCopy(location.index, location.peer_id, state))
        for extra in displaced:
            key = (extra.location.index, extra.location.peer_id)
            state = overrides.get(key)
            if state is None:
                state = self.state_of(record.pack_id, *key)
            copies.append(
                ShardCopy(*key, state, current=False, displaced_at=float(extra.displaced_at))
            )
        need = formats.SHARD_HEADER_SIZE + record.shard_size
        return PackState(record.pack_id, record.k, record.n, need, tuple(copies))

    async def run_pack(self, record: PackRecord, displaced: list[DisplacedShard]) -> None:
        roots = _known_roots(record, displaced)
        overrides: dict[tuple[int, str], ShardState] = {}
        good: dict[int, bytes] = {}
        if self.options.verify:
            state = self.pack_state(record, displaced, overrides)
            await self.verify(record, state, roots, overrides, good)
        for _attempt in range(_ATTEMPTS):
            state = self.pack_state(record, displaced, overrides)
            decision = decide_pack(state, self.pool(), self.options.policy, self.now)
            if not decision.rebuild:
                await self.settle(record, decision, roots, placed={})
                self.finish(record, decision, placed={})
                return
            try:
                await self.gather(record, decision, state, roots, overrides, good)
            except _SourceFailed:
                continue  # a source turned out bad: decide again without it
            try:
                placed, problem = await self.rebuild(record, decision, roots, good)
            except P2PBackupError as error:
                placed, problem = {}, f"pack {record.pack_id.hex()[:16]}: {error}"
            await self.settle(record, decision, roots, placed)
            self.finish(record, decision, placed, problem)
            return
        self.finish(
            record,
            decision,
            placed={},
            problem=f"pack {record.pack_id.hex()[:16]}: its shards kept failing verification",
        )

    async def verify(
        self,
        record: PackRecord,
        state: PackState,
        roots: Mapping[tuple[int, str], bytes],
        overrides: dict[tuple[int, str], ShardState],
        good: dict[int, bytes],
    ) -> None:
        """Read back every copy the listing says is healthy, and check it."""
        healthy = [c for c in state.copies if c.state is ShardState.HEALTHY]

        async def check(copy: ShardCopy) -> None:
            data = await self.fetch(record, copy, roots, overrides)
            if data is not None:
                self.report.shards_verified += 1
                # Keep enough to rebuild from: the data shards first.
                if len(good) < record.k or copy.index < max(good):
                    good[copy.index] = data
                    if len(good) > record.k:
                        del good[max(good)]

        async with trio.open_nursery() as nursery:
            for copy in healthy:
                nursery.start_soon(check, copy)

    async def fetch(
        self,
        record: PackRecord,
        copy: ShardCopy,
        roots: Mapping[tuple[int, str], bytes],
        overrides: dict[tuple[int, str], ShardState],
    ) -> bytes | None:
        """One copy's data, verified; None (and its new state noted) if it is
        missing, corrupt or its peer stopped answering."""
        location = ShardLocation(copy.index, copy.peer_id, roots[(copy.index, copy.peer_id)])
        size = formats.SHARD_HEADER_SIZE + record.shard_size
        await self.paced(size)
        try:
            data = await self.repo.fetch_verified_shard(record, location)
        except ShardNotFoundError:
            state = ShardState.MISSING
        except PeerUnavailableError:
            state = reachability(self.now, self.now, self.options.policy.grace)
        except IntegrityError:
            # The peer answered, with bytes that are not the shard.
            self.received[copy.peer_id] += size
            state = ShardState.FAILED
        except (StoreError, UsageError, ProtocolError):
            state = ShardState.FAILED
        else:
            self.received[copy.peer_id] += size
            return data
        overrides[(copy.index, copy.peer_id)] = state
        if state in (ShardState.MISSING, ShardState.FAILED):
            self.report.shards_failed += 1
        return None

    async def gather(
        self,
        record: PackRecord,
        decision: PackDecision,
        state: PackState,
        roots: Mapping[tuple[int, str], bytes],
        overrides: dict[tuple[int, str], ShardState],
        good: dict[int, bytes],
    ) -> None:
        """Fetch healthy shards until ``good`` holds k (data shards first);
        :class:`_SourceFailed` if one the decision counted on is bad."""
        reinstated = set(decision.reinstate)
        sources = sorted(
            (
                c
                for c in state.copies
                if c.state is ShardState.HEALTHY
                and (c.current or c in reinstated)
                and c.index not in good
            ),
            key=lambda c: c.index,
        )
        failed = False
        while len(good) < record.k and sources and not failed:
            batch, sources = sources[: record.k - len(good)], sources[record.k - len(good) :]
            results: dict[int, bytes] = {}

            async def one(copy: ShardCopy, results: dict[int, bytes] = results) -> None:
                data = await self.fetch(record, copy, roots, overrides)
                if data is not None:
                    results[copy.index] = data

            async with trio.open_nursery() as nursery:
                for copy in batch:
                    nursery.start_soon(one, copy)
            good.update(results)
            failed = len(results) < len(batch)
        if len(good) < record.k:
            raise _SourceFailed

    async def rebuild(
        self,
        record: PackRecord,
        decision: PackDecision,
        roots: Mapping[tuple[int, str], bytes],
        good: dict[int, bytes],
    ) -> tuple[dict[int, tuple[str, bytes]], str]:
        """Rebuild the decision's shards and put each on its target (or a
        spare); shard index → (peer, root) of those placed, and what went wrong."""
        wanted = [step.index for step in decision.rebuild]
        sources = {i: good[i] for i in sorted(good)[: record.k]}
        rebuilt = await trio.to_thread.run_sync(shards.rebuild_shards, record, sources, wanted)
        expected = {index: root for (index, _peer), root in roots.items()}
        for index, shard in rebuilt.items():
            if index in expected and expected[index] != shard.root:
                raise IntegrityError(
                    f"pack {record.pack_id.hex()[:16]}: rebuilt shard {index} does not match "
                    "its recorded Merkle root"
                )
        # A failed copy on a peer about to take a shard again would clash
        # with it (shards are write-once): failed copies go first.
        await self.delete(
            record.pack_id, [c for c in decision.delete if c.state is ShardState.FAILED]
        )
        spares = list(decision.spares)
        placed: dict[int, tuple[str, bytes]] = {}
        failures: list[str] = []

        async def place(index: int, peer_id: str) -> None:
            shard = rebuilt[index]
            size = len(shard.payload)
            while True:
                await self.paced(size)
                self.repo.run.reserve(peer_id, size)
                try:
                    await self.repo.store(peer_id).put(
                        formats.shard_id(record.pack_id, index),
                        shard.payload,
                        ShardRoot(record.block_size, shard.root),
                    )
                except (StoreError, ProtocolError) as error:
                    self.repo.run.release(peer_id, size)
                    if isinstance(error, PeerUnavailableError):
                        self.repo.run.mark_down(peer_id)
                    failures.append(f"{peer_id}: {error}")
                    if not spares:
                        return
                    peer_id = spares.pop(0)
                except BaseException:
                    self.repo.run.release(peer_id, size)
                    raise
                else:
                    self.sent[peer_id] += size
                    placed[index] = (peer_id, shard.root)
                    return

        async with trio.open_nursery() as nursery:
            for step in decision.rebuild:
                nursery.start_soon(place, step.index, step.peer_id)
        problem = ""
        if len(placed) < len(wanted):
            problem = (
                f"pack {record.pack_id.hex()[:16]}: {len(wanted) - len(placed)} rebuilt shards "
                f"found no peer ({'; '.join(failures)})"
            )
        return placed, problem

    async def settle(
        self,
        record: PackRecord,
        decision: PackDecision,
        roots: Mapping[tuple[int, str], bytes],
        placed: Mapping[int, tuple[str, bytes]],
    ) -> None:
        """Record the decision's outcome in the index in one transaction,
        then ask peers to delete what is no longer wanted."""
        pack_id = record.pack_id
        rebuilt = {step.index for step in decision.rebuild}

        # A current copy retired for a rebuilt index stays where it was if
        # that index found no peer.
        def applies(copy: ShardCopy) -> bool:
            return not (copy.current and copy.index in rebuilt and copy.index not in placed)

        displace = [c for c in decision.displace if applies(c)]
        forget = [c for c in decision.forget if applies(c)]
        delete = [c for c in decision.delete if applies(c)]
        if not (placed or decision.reinstate or displace or forget or delete):
            self.flush_traffic()
            return
        index = self.index
        with index.transaction():
            for copy in displace:
                location = ShardLocation(
                    copy.index, copy.peer_id, roots[(copy.index, copy.peer_id)]
                )
                index.add_displaced(pack_id, location, int(self.now))
            # A current copy forgotten is one whose index another copy now
            # holds (set below); an extra one has a row of its own.
            for copy in (*forget, *delete):
                if not copy.current:
                    index.forget_displaced(pack_id, copy.index, copy.peer_id)
            for copy in decision.reinstate:
                root = roots[(copy.index, copy.peer_id)]
                index.set_shard(pack_id, ShardLocation(copy.index, copy.peer_id, root))
                index.forget_displaced(pack_id, copy.index, copy.peer_id)
            was_on = {location.index: location.peer_id for location in record.shards}
            for shard_index, (peer_id, root) in placed.items():
                index.set_shard(pack_id, ShardLocation(shard_index, peer_id, root))
                # A verdict on the bytes this shard replaced (perhaps on the
                # same peer) must not count against it: audited afresh, now.
                fresh = ShardAudit(peer_id, due_at=int(self.now))
                index.set_shard_audits([(pack_id, shard_index, fresh)])
                index.add_repairs(self.day, peer_id, placed=1)
                if was_on.get(shard_index, peer_id) != peer_id:
                    index.add_repairs(self.day, was_on[shard_index], moved_off=1)
            self.flush_traffic()
        self.report.shards_reinstated += len(decision.reinstate)
        if index.is_index_pack(pack_id):
            self.changed_root = True
        else:
            self.changed_data.append(pack_id)
        # Failed copies went before the puts; the rest go now.
        await self.delete(pack_id, [c for c in delete if c.state is not ShardState.FAILED])

    def finish(
        self,
        record: PackRecord,
        decision: PackDecision,
        placed: Mapping[int, tuple[str, bytes]],
        problem: str = "",
    ) -> None:
        self.report.shards_rebuilt += len(placed)
        self.report.new_holders.update(peer for peer, _root in placed.values())
        if problem:
            self.report.problems.append(problem)
        self.report.outcomes.append(
            PackOutcome(
                record.pack_id,
                decision,
                healthy=decision.healthy + len(placed),
                rebuilt=len(placed),
                problem=problem,
            )
        )
        self.progress.update(f"{plural(len(self.report.outcomes), 'pack')} checked")

    async def delete(self, pack_id: bytes, copies: Iterable[ShardCopy]) -> None:
        """Ask each copy's peer to delete it; a peer that does not answer
        keeps it until its lease runs out or a prune finds it."""
        for copy in copies:
            if copy.peer_id not in self.known:
                continue
            try:
                await self.repo.store(copy.peer_id).delete(formats.shard_id(pack_id, copy.index))
            except (StoreError, ProtocolError):
                continue
            self.report.shards_deleted += 1

    # -- pace and traffic -------------------------------------------------------------

    async def paced(self, size: int) -> None:
        delay = self.pace.book(size, trio.current_time())
        if delay > 0:
            await trio.sleep(delay)

    def flush_traffic(self) -> None:
        """Count the bytes moved since the last flush into the index."""
        for peer in set(self.sent) | set(self.received):
            sent, received = self.sent.pop(peer, 0), self.received.pop(peer, 0)
            self.report.bytes_sent += sent
            self.report.bytes_received += received
            self.index.add_traffic(self.day, peer, PURPOSE, sent=sent, received=received)

    # -- the end --------------------------------------------------------------------

    async def publish(self) -> None:
        """Describe the changed data packs in a new index segment and tell
        every peer the new root record (module docstring)."""
        if not (self.changed_data or self.changed_root):
            return
        with self.index.transaction():
            self.index.mark_out_of_segment(self.changed_data)
        try:
            await self.repo.write_index_segment(self.index.packs_without_segment())
        except P2PBackupError as error:
            # The packs stay out of any segment: the next backup describes them.
            self.report.problems.append(f"the new index segment was not written: {error}")
        try:
            await self.repo.publish_root()
        except StoreError as error:
            self.report.problems.append(f"the root record was not republished: {error}")


class _SourceFailed(Exception):
    """A shard a decision counted on could not be read: decide again."""


def _known_roots(
    record: PackRecord, displaced: Iterable[DisplacedShard]
) -> dict[tuple[int, str], bytes]:
    """(shard index, peer) → Merkle root, for every copy the index knows."""
    roots = {(loc.index, loc.peer_id): loc.merkle_root for loc in record.shards}
    for extra in displaced:
        roots[(extra.location.index, extra.location.peer_id)] = extra.location.merkle_root
    return roots


async def repair_pass(
    repo: Repository,
    options: RepairOptions = RepairOptions(),
    *,
    now: float | None = None,
    progress: Progress | None = None,
) -> RepairReport:
    """One repair pass over the packs (module docstring); ``now`` is unix
    seconds (default: the time). Peers that said they are leaving count as
    removed: their shards are rebuilt elsewhere."""
    leaving = frozenset(repo.index.leaving_peers())
    options = attrs.evolve(options, removed=options.removed | leaving)
    work = _Pass(
        repo,
        options,
        time.time() if now is None else now,
        progress or Progress("repair", enabled=False),
    )
    work.progress.update("asking the peers", force=True)
    await work.survey()
    displaced = repo.index.displaced()
    records = []
    for pack_id in repo.index.pack_ids():
        if options.packs is not None and pack_id not in options.packs:
            continue
        record = repo.index.pack(pack_id, with_blobs=False)
        assert record is not None
        records.append(record)
    # Most urgent first, by what the listing says.
    by_id = {r.pack_id: r for r in records}
    states = [work.pack_state(r, displaced.get(r.pack_id, []), {}) for r in records]
    ordered = [by_id[s.pack_id] for s in most_urgent_first(states)]
    limiter = trio.CapacityLimiter(max(1, options.concurrency))

    async def one(record: PackRecord) -> None:
        async with limiter:
            await work.run_pack(record, displaced.get(record.pack_id, []))

    try:
        async with trio.open_nursery() as nursery:
            for record in ordered:
                nursery.start_soon(one, record)
        if options.publish:
            await work.publish()
    finally:
        with trio.CancelScope(shield=True):
            with repo.index.transaction():
                work.flush_traffic()
            work.progress.close()
    return work.report


async def evacuate(
    repo: Repository, peer_id: str, options: RepairOptions = RepairOptions()
) -> RepairReport:
    """Rebuild elsewhere every shard ``peer_id`` holds, as if it were gone,
    and ask it to delete those rebuilt (module docstring)."""
    packs = frozenset(
        pack_id
        for pack_id, _k, _n, holders in repo.index.pack_placements()
        if any(peer == peer_id for peer, _index in holders)
    ) | frozenset(
        pack_id
        for pack_id, copies in repo.index.displaced().items()
        if any(copy.location.peer_id == peer_id for copy in copies)
    )
    if not packs:
        return RepairReport(options.policy.grace)
    # No new shard, index pack included, goes to the peer being removed.
    repo.run.mark_full(peer_id, "it is being removed")
    evolved = attrs.evolve(options, removed=options.removed | {peer_id}, packs=packs)
    return await repair_pass(repo, evolved)
