"""What ``p2pbackup status`` reports: this node, each peer, and our data's health.

Nouns:

* **peer state** — :class:`PeerState`: a peer as it is now: whether it
  answered (**online**), when it last did, how many of our shards (and bytes)
  the index places on it, how much we hold for it when it is a node we
  store for, and what it **offers** us: the bytes it holds for us by its own
  count plus the room it says it has left for us.
* **route** — how this status reached a node peer that answered:
  **direct** (at an address of its own) or **relayed** (through a relay, a
  friend of that node that it keeps a reservation at, because nobody can
  dial it: :mod:`p2pbackup.node.relay`), as the remote store found it
  (:meth:`~p2pbackup.engine.repository.Repository.route`). None for a folder
  and for a node that did not answer.
* **balance** — bytes a peer holds for us minus bytes we hold for it: above
  zero we owe it, below zero it owes us. Both sides count stored shards whole
  (headers included), root records aside.
* **node state** — :class:`NodeState`: this home as a node: its id, the
  addresses it last served on, the bytes it keeps for others, and what its
  ``config.toml`` says it offers (``[storage]``; ``serve`` options override it).
* **audit standing** — what audits said of a peer, as the index keeps it
  (:class:`~p2pbackup.model.PeerAudits`): its score, its last audit, and
  whether it was **disqualified** — then its shards count as lost and it
  gets no new ones, and ``status`` says so in words.
* **leaving peer** — a peer that told us it is leaving the network: its
  shards count as removed (repair moves them), it gets no new ones, and
  ``status`` says so in words.
* **healthy shard** — a shard the index places on a peer that answered now
  and lists it among the shards it holds for us, unless its last audit
  failed or its peer is disqualified.
* **pack health** — :class:`DataHealth`, from each pack's healthy shards
  (pure: :func:`data_health`). A pack is **unrecoverable** below k healthy
  shards, **at risk** below k + 2 (two more lost peers would lose it), and
  otherwise safe; ``min_healthy`` is the fewest healthy shards of any pack
  and ``min_margin`` the fewest spare ones (healthy − k), so "all packs ≥ r"
  reads straight off them. Packs **below the repair threshold** r
  (:meth:`~p2pbackup.maintenance.repair.RepairPolicy.threshold`) are the
  ones the next repair pass rebuilds.
* **maintenance of a peer** — :class:`PeerMaintenance`: what audits and
  repair did about one peer over the last :data:`MAINTENANCE_DAYS` days:
  shards of ours on it that count as **gone** now and wait for repair
  (**pending**: a failed audit, not listed by a peer that answered, every
  shard of a disqualified peer, or of one unseen for longer than the grace
  period), shards repair **moved off** it and rebuilt shards it took
  (**placed**), and the bytes audits and repair moved with it.

* **delegate** — :class:`DelegateState`: a node this home lets keep its
  backups alive while it is away, the last repair grant it took, and when
  it last acted for this home (as its repair log said when last read).
* **kept for** — :class:`KeptFor`: a home this node is a delegate of: the
  grant it holds (its sequence, when it came, how many packs it maps),
  when the certificate beside it expires, and — once this node has run a
  pass for it — when that last was and the health of its packs then
  (:func:`kept_health`: a shard counts where its peer answered that pass).

Peers are asked concurrently, each with a short timeout, and one that is
overdue while the others have answered is given up on as offline
(:meth:`~p2pbackup.engine.repository.Repository.probe_peers`); the answer is
what is true now, not what the index last believed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence

import attrs

from p2pbackup.core import formats
from p2pbackup.engine.index import Index, RepairCount, Traffic
from p2pbackup.engine.progress import human_bytes, plural
from p2pbackup.engine.repository import PROBE_SECONDS, Repository
from p2pbackup.maintenance import auditor, repairer
from p2pbackup.maintenance.repair import RepairPolicy, ShardState, reachability
from p2pbackup.wire.direct import DIRECT_UPGRADE
from p2pbackup.wire.relay import Route

#: Seconds a peer has at the most to answer before it counts as offline.
PROBE_TIMEOUT = PROBE_SECONDS
#: Seconds a peer that answered has to list the shards it holds for us.
LIST_TIMEOUT = 60.0
#: Spare healthy shards below which a pack counts as at risk.
SAFE_MARGIN = 2
#: The repair policy ``status`` judges by unless told another.
DEFAULT_REPAIR = RepairPolicy()
#: Days of repairs and traffic ``status`` sums up.
MAINTENANCE_DAYS = 30
#: The routes (module docstring).
ROUTE_DIRECT = "direct"
ROUTE_RELAYED = "relayed"


@attrs.frozen
class PeerMaintenance:
    """What audits and repair did about one peer (module docstring)."""

    pending: int = 0
    moved_off: int = 0
    placed: int = 0
    audit_sent: int = 0
    audit_received: int = 0
    repair_sent: int = 0
    repair_received: int = 0

    def describe(self) -> str:
        audit = human_bytes(self.audit_sent + self.audit_received)
        repair = human_bytes(self.repair_sent + self.repair_received)
        return (
            f"repairs: {self.pending} of its shards wait, {self.moved_off} moved off it, "
            f"{self.placed} rebuilt onto it; traffic: audits {audit}, repair {repair} "
            f"(last {MAINTENANCE_DAYS} days)"
        )


@attrs.frozen
class PeerState:
    peer_id: str
    kind: str
    location: str
    online: bool
    #: Unix seconds of the last answer (now, if online); None if never.
    last_seen: int | None
    #: Shards of ours the index places on this peer, and their bytes (headers included).
    shards_held_for_us: int
    bytes_held_for_us: int
    #: Bytes of the peer's shards this home's node keeps (0 if none, or a folder).
    bytes_we_hold_for_it: int
    is_friend: bool
    #: The name the user gave it ("" for none).
    name: str = ""
    #: Why it did not answer, if it did not.
    problem: str = ""
    #: What it offers us now: what it holds for us by its count plus its room
    #: for more; None if it did not answer or sets no bound.
    offered: int | None = None
    #: The room in that offer (None likewise).
    room: int | None = None
    #: Its audit score (None: never audited), its last audit (unix seconds)
    #: and when audits disqualified it (None: they did not).
    audit_score: float | None = None
    last_audit: int | None = None
    disqualified_at: int | None = None
    #: What its last failed audit found ("" if none failed).
    audit_failure: str = ""
    maintenance: PeerMaintenance = PeerMaintenance()
    #: When it said it is leaving the network (None: it did not).
    leaving_since: int | None = None
    #: Its route (module docstring): ROUTE_DIRECT, ROUTE_RELAYED or None; when
    #: relayed, the relay's node id (hex) and the address it was dialled at.
    route: str | None = None
    relay: str | None = None
    relay_address: str | None = None
    #: Where this node's sessions to the peer went once met through the
    #: relay: the direct upgrade's address (docs/nat.md); None: they did not.
    direct_address: str | None = None

    @property
    def balance(self) -> int:
        """Bytes it holds for us minus bytes we hold for it (module docstring)."""
        return self.bytes_held_for_us - self.bytes_we_hold_for_it


@attrs.frozen
class DataHealth:
    packs: int
    safe: int
    at_risk: int
    unrecoverable: int
    #: Fewest healthy shards of any pack, and fewest beyond k (None: no packs).
    min_healthy: int | None
    min_margin: int | None
    #: Packs with fewer healthy shards than the repair threshold r.
    below_threshold: int = 0

    def lines(self) -> list[str]:
        if not self.packs:
            return ["data: nothing backed up yet"]
        lines = []
        if self.min_margin is not None and self.min_margin >= 0:
            lines.append(
                f"data: {'the one pack' if self.packs == 1 else f'all {self.packs} packs'} "
                f"≥ {self.min_healthy} healthy shards "
                f"(≥ {self.min_margin} more than needed)"
            )
        if self.at_risk:
            lines.append(
                f"{plural(self.at_risk, 'pack')} at risk: "
                f"fewer than {SAFE_MARGIN} spare healthy shards"
            )
        if self.unrecoverable:
            lines.append(
                f"{plural(self.unrecoverable, 'pack')} unrecoverable: "
                "fewer healthy shards than needed, "
                "until their peers come back"
            )
        # An unrecoverable pack is below the threshold too, but no pass can
        # rebuild it: name only those a pass can.
        rebuildable = self.below_threshold - self.unrecoverable
        if rebuildable > 0:
            their = "its" if rebuildable == 1 else "their"
            lines.append(
                f"{plural(rebuildable, 'pack')} below the repair threshold: "
                f"the next repair pass rebuilds {their} missing shards "
                "(`p2pbackup repair` runs one now)"
            )
        return lines


def data_health(
    packs: Iterable[tuple[int, int, Sequence[str]]],
    online: set[str],
    policy: RepairPolicy = DEFAULT_REPAIR,
) -> DataHealth:
    """Pack health from each pack's (k, n, peers holding its shards) and the
    peers that answered (pure)."""
    count = safe = at_risk = unrecoverable = below = 0
    min_healthy: int | None = None
    min_margin: int | None = None
    for k, _n, holders in packs:
        count += 1
        healthy = sum(1 for peer in holders if peer in online)
        margin = healthy - k
        below += healthy < policy.threshold(k, _n)
        min_healthy = healthy if min_healthy is None else min(min_healthy, healthy)
        min_margin = margin if min_margin is None else min(min_margin, margin)
        if margin < 0:
            unrecoverable += 1
        elif margin < SAFE_MARGIN:
            at_risk += 1
        else:
            safe += 1
    return DataHealth(count, safe, at_risk, unrecoverable, min_healthy, min_margin, below)


@attrs.frozen
class NodeState:
    node_id: str
    #: Addresses the node publishes (from the last ``serve``); empty if it never served.
    addresses: tuple[str, ...]
    #: Bytes this node keeps for others.
    hosting_bytes: int
    #: What ``config.toml`` offers all peers together, and each one (None: no bound).
    capacity: int | None = None
    per_friend: int | None = None


@attrs.frozen
class Hosting:
    """What this home does as a node, as its caller knows it: the addresses
    it last served on, the bytes it keeps for each owner (node id → bytes),
    and what it offers (None: no bound)."""

    addresses: tuple[str, ...] = ()
    by_owner: Mapping[bytes, int] = attrs.field(factory=dict)
    capacity: int | None = None
    per_friend: int | None = None
    #: The homes this node is a delegate of.
    kept_for: tuple[KeptFor, ...] = ()


@attrs.frozen
class DelegateState:
    """A delegate of this home (module docstring)."""

    node_id: str
    added_at: int
    #: When it last took a grant, and the grant's sequence (None: never).
    granted_at: int | None
    grant_sequence: int | None
    #: Why the last hand-over failed ("": it did not).
    problem: str
    #: When it last acted for this home (None: not that this home knows).
    acted_at: int | None = None

    def describe(self) -> str:
        if self.granted_at is None:
            held = "holds no repair grant yet"
        else:
            held = f"took repair grant {self.grant_sequence} {_date(self.granted_at)}"
        acted = (
            "; has not acted yet"
            if self.acted_at is None
            else (f"; last acted {_date(self.acted_at)}")
        )
        problem = f"; the last hand-over failed ({self.problem})" if self.problem else ""
        return f"delegate {self.node_id}: {held}{acted}{problem}"


@attrs.frozen
class KeptFor:
    """A home this node keeps alive as its delegate (module docstring)."""

    owner: str
    grant_sequence: int
    received_at: int
    packs: int
    #: When the certificate the owner gave with the grant expires.
    expiry: int
    #: When this node's last pass for the owner began (None: none yet), and
    #: the health of the owner's packs as that pass found them.
    acted_at: int | None = None
    health: DataHealth | None = None

    def describe(self) -> str:
        line = (
            f"delegate of node {self.owner}: grant {self.grant_sequence} of "
            f"{_date(self.received_at)} maps {self.packs} packs; certificate valid until "
            f"{_date(self.expiry)}; `repair --for {self.owner}` repairs them"
        )
        if self.acted_at is None or self.health is None:
            return line + "; no pass for it yet"
        health = self.health
        return line + (
            f"; last pass {_date(self.acted_at)}: {health.safe} safe, {health.at_risk} at risk, "
            f"{health.unrecoverable} unrecoverable"
        )


def kept_health(index: Index, since: int, policy: RepairPolicy = DEFAULT_REPAIR) -> DataHealth:
    """The health of the packs in a grant index as the pass that began at
    ``since`` found them: a shard is healthy if its peer answered since."""
    online = {peer for peer, seen in index.last_seen().items() if seen >= since}
    packs = ((k, n, [peer for peer, _i in shards]) for _id, k, n, shards in index.pack_placements())
    return data_health(packs, online, policy)


@attrs.frozen
class Status:
    node: NodeState
    peers: tuple[PeerState, ...]
    data: DataHealth
    delegates: tuple[DelegateState, ...] = ()
    kept_for: tuple[KeptFor, ...] = ()

    def to_json(self) -> dict[str, object]:
        data = attrs.asdict(self)
        for peer, state in zip(data["peers"], self.peers, strict=True):
            peer["balance"] = state.balance
        return data

    def lines(self) -> list[str]:
        node = self.node
        where = ", ".join(node.addresses) if node.addresses else "not serving"
        lines = [
            f"node {node.node_id} ({where}); keeps {human_bytes(node.hosting_bytes)} for others; "
            f"offers {_bound(node.capacity)} in all, {_bound(node.per_friend)} to each peer",
        ]
        for peer in self.peers:
            state = "online" if peer.online else f"OFFLINE ({peer.problem})"
            if peer.leaving_since is not None:
                state += (
                    f", LEAVING the network since {_date(peer.leaving_since)}: repair moves "
                    "its shards to other peers and it gets no new ones"
                )
            seen = "never seen" if peer.last_seen is None else f"last seen {_date(peer.last_seen)}"
            friend = "friend, " if peer.is_friend else ""
            named = f" ({peer.name})" if peer.name else ""
            lines.append(
                f"peer {peer.peer_id}{named} {friend}{peer.kind} at {peer.location}"
                f"{_route(peer)}: {state}, "
                f"{seen}; {_audits(peer)}; "
                f"holds {plural(peer.shards_held_for_us, 'shard')} of ours "
                f"({human_bytes(peer.bytes_held_for_us)}); "
                f"we keep {human_bytes(peer.bytes_we_hold_for_it)} for it; "
                f"{_balance(peer.balance)}; "
                f"{_offer(peer)}"
            )
            lines.append(f"  {peer.maintenance.describe()}")
        lines.extend(delegate.describe() for delegate in self.delegates)
        lines.extend(kept.describe() for kept in self.kept_for)
        lines.extend(self.data.lines())
        return lines


def _balance(balance: int) -> str:
    """The reciprocity balance, in words whose sign cannot be misread."""
    if balance > 0:
        return f"balance: it keeps {human_bytes(balance)} more for us than we for it"
    if balance < 0:
        return f"balance: we keep {human_bytes(-balance)} more for it than it for us"
    return "balance: even"


def _route(peer: PeerState) -> str:
    if peer.route == ROUTE_RELAYED:
        if peer.direct_address is not None:
            return (
                f" (direct at {peer.direct_address}, met through relay "
                f"{peer.relay or '?'} at {peer.relay_address})"
            )
        return f" (relayed by {peer.relay or '?'} at {peer.relay_address})"
    if peer.route == ROUTE_DIRECT:
        return " (direct)"
    return ""


def _bound(size: int | None) -> str:
    return "what the disk has" if size is None else human_bytes(size)


def _audits(peer: PeerState) -> str:
    if peer.disqualified_at is not None:
        return (
            f"DISQUALIFIED {_date(peer.disqualified_at)}: failed audits brought its score to "
            f"{_score(peer.audit_score or 0.0)}, so its shards count as lost and it gets no new "
            f"ones (last failure: {peer.audit_failure}); to trust it again, remove it "
            "and add it back"
        )
    if peer.audit_score is None or peer.last_audit is None:
        return "not audited yet"
    return f"audit score {_score(peer.audit_score)}, last audit {_date(peer.last_audit)}"


def _score(score: float) -> str:
    # Rounded down, so that a score just under a threshold never reads as it.
    return f"{math.floor(score * 100) / 100:.2f}"


def _date(unix: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(unix))


def _offer(peer: PeerState) -> str:
    if not peer.online:
        return "offer unknown"
    if peer.offered is None or peer.room is None:
        return "offers us no bound"
    return f"offers us {human_bytes(peer.offered)} ({human_bytes(peer.room)} free)"


async def gather_status(
    repo: Repository,
    hosting: Hosting = Hosting(),
    *,
    now: float | None = None,
    policy: RepairPolicy = DEFAULT_REPAIR,
) -> Status:
    """Ask every peer now, and put together what ``status`` shows."""
    peers = repo.peers()
    seen_at = int(time.time() if now is None else now)
    answers = await repo.probe_peers(PROBE_TIMEOUT, seen_at=seen_at)
    online = {peer_id for peer_id, answer in answers.items() if answer.answered}
    index = repo.index
    last_seen = index.last_seen()
    held = index.shard_count_by_peer()
    held_bytes = index.shard_bytes_by_peer()
    hosted = hosting.by_owner
    friends = {friend.node_id.hex() for friend in index.friends()}
    names = index.peer_names()
    audits = index.peer_audits()
    leaving = index.leaving_peers()
    # A shard is healthy when its peer lists it now, not merely because the
    # peer answered: a friend that lost its disk, or recovered into an empty
    # one, answers but holds nothing.
    listed, _unlisted = await repo.list_held(online, LIST_TIMEOUT)
    healthy = _audited(index, listed)
    since = seen_at // 86400 - MAINTENANCE_DAYS + 1
    maintenance = peer_maintenance(
        index,
        healthy,
        gone_unseen={
            p.peer_id
            for p in peers
            if p.peer_id not in listed
            and reachability(last_seen.get(p.peer_id), seen_at, policy.grace) is ShardState.LOST
        },
        traffic=index.traffic(since_day=since),
        repairs=index.repair_counts(since_day=since),
    )
    states = []
    for peer in peers:
        answer = answers[peer.peer_id]
        shards = held.get(peer.peer_id, 0)
        space = answer.space
        audited = audits.get(peer.peer_id)
        route = repo.route(peer.peer_id) if answer.answered else None
        states.append(
            PeerState(
                peer_id=peer.peer_id,
                kind=peer.kind,
                location=peer.location,
                online=answer.answered,
                last_seen=last_seen.get(peer.peer_id),
                shards_held_for_us=shards,
                # Whole shards, as the peer counts them and as we count theirs.
                bytes_held_for_us=held_bytes.get(peer.peer_id, 0)
                + shards * formats.SHARD_HEADER_SIZE,
                bytes_we_hold_for_it=_hosted_for(hosted, peer.peer_id),
                is_friend=peer.peer_id in friends,
                name=names.get(peer.peer_id, ""),
                problem=answer.problem,
                offered=None if space is None else space.offered,
                room=None if space is None else space.room,
                audit_score=None if audited is None else audited.score,
                last_audit=None if audited is None else audited.last_audit,
                disqualified_at=None if audited is None else audited.disqualified_at,
                audit_failure="" if audited is None else audited.last_failure,
                maintenance=maintenance.get(peer.peer_id, PeerMaintenance()),
                leaving_since=leaving.get(peer.peer_id),
                route=None if route is None else _route_kind(route),
                relay=None if route is None or route.relay is None else route.relay.hex(),
                relay_address=None if route is None or route.relay is None else str(route.address),
                direct_address=_direct_address(route, peer.peer_id),
            )
        )
    health = data_health(repo.live_holders(healthy), set(listed), policy)
    node = NodeState(
        node_id=repo.keyring.node_id.hex(),
        addresses=hosting.addresses,
        hosting_bytes=sum(hosted.values()),
        capacity=hosting.capacity,
        per_friend=hosting.per_friend,
    )
    delegates = tuple(
        DelegateState(
            row.node_id.hex(),
            row.added_at,
            row.granted_at,
            row.grant_sequence,
            row.problem,
            row.acted_at,
        )
        for row in index.delegates()
    )
    return Status(node, tuple(states), health, delegates, hosting.kept_for)


def peer_maintenance(
    index: Index,
    healthy: Mapping[str, frozenset[bytes]],
    *,
    gone_unseen: set[str],
    traffic: Iterable[Traffic],
    repairs: Mapping[str, RepairCount],
) -> dict[str, PeerMaintenance]:
    """Each peer's :class:`PeerMaintenance`: its placed shards that count as
    gone (not in ``healthy``, the audited listing of the peers that answered,
    or on a peer in ``gone_unseen``), with the ``traffic`` and ``repairs``
    counted over the days asked for."""
    pending: dict[str, int] = {}
    disqualified = index.disqualified_peers()
    leaving = index.leaving_peers()
    for shard in index.placed_shards():
        peer = shard.peer_id
        listing = healthy.get(peer)
        if peer in leaving:
            gone = True  # counted as removed: repair moves it
        elif listing is None:
            gone = peer in gone_unseen or peer in disqualified
        else:
            gone = formats.shard_id(shard.pack_id, shard.index) not in listing
        if gone:
            pending[peer] = pending.get(peer, 0) + 1
    sums: dict[tuple[str, str], tuple[int, int]] = {}
    for row in traffic:
        sent, received = sums.get((row.peer_id, row.purpose), (0, 0))
        sums[(row.peer_id, row.purpose)] = (sent + row.sent, received + row.received)
    result = {}
    for record in index.peers():
        peer_id = record.peer_id
        counted = repairs.get(peer_id, RepairCount(0, 0))
        audit = sums.get((peer_id, auditor.PURPOSE), (0, 0))
        repair = sums.get((peer_id, repairer.PURPOSE), (0, 0))
        result[peer_id] = PeerMaintenance(
            pending.get(peer_id, 0), counted.moved_off, counted.placed, *audit, *repair
        )
    return result


def _direct_address(route: Route | None, peer_id: str) -> str | None:
    """Where the serving node's sessions to a peer reached through a relay
    went direct, if they did (:mod:`p2pbackup.wire.direct`)."""
    upgrade = DIRECT_UPGRADE.get()
    if route is None or route.relay is None or upgrade is None:
        return None
    try:
        node_id = bytes.fromhex(peer_id)
    except ValueError:
        return None
    went = upgrade.status().get(node_id)
    return went.detail if went is not None and went.direct else None


def _route_kind(route: Route) -> str:
    return ROUTE_DIRECT if route.relay is None else ROUTE_RELAYED


def _audited(index: Index, listed: Mapping[str, frozenset[bytes]]) -> dict[str, frozenset[bytes]]:
    """The shards ``listed`` less those audits found lost: every shard of a
    disqualified peer, and each shard whose last audit failed."""
    disqualified = index.disqualified_peers()
    failed: dict[str, set[bytes]] = {}
    for (pack_id, shard_index), audit in index.shard_audits().items():
        if audit.passed is False:
            failed.setdefault(audit.peer_id, set()).add(formats.shard_id(pack_id, shard_index))
    return {
        peer: shards - failed.get(peer, set())
        for peer, shards in listed.items()
        if peer not in disqualified
    }


def _hosted_for(hosted: Mapping[bytes, int], peer_id: str) -> int:
    try:
        return hosted.get(bytes.fromhex(peer_id), 0)
    except ValueError:  # a folder peer's id is not a node id
        return 0
