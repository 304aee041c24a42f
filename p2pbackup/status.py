"""What ``p2pbackup status`` reports: this node, each peer, and our data's health.

Nouns:

* **peer state** — :class:`PeerState`: a peer as it is now: whether it
  answered (**online**), when it last did, how many of our shards (and bytes)
  the index places on it, and how much we hold for it when it is a node we
  store for: the **balance** between friends.
* **healthy shard** — a shard the index places on a peer that answered now.
* **pack health** — :class:`DataHealth`, from each pack's healthy shards
  (pure: :func:`data_health`). A pack is **unrecoverable** below k healthy
  shards, **at risk** below k + 2 (two more lost peers would lose it), and
  otherwise safe; ``min_healthy`` is the fewest healthy shards of any pack
  and ``min_margin`` the fewest spare ones (healthy − k), so "all packs ≥ r"
  reads straight off them.

Peers are asked concurrently, each with a short timeout; the answer is what
is true now, not what the index last believed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import attrs
import trio

from p2pbackup import shardhost
from p2pbackup.errors import P2PBackupError
from p2pbackup.home import Home
from p2pbackup.model import PeerRecord
from p2pbackup.repository import Repository

#: Seconds a peer has to answer before it counts as offline.
PROBE_TIMEOUT = 5.0
#: Spare healthy shards below which a pack counts as at risk.
SAFE_MARGIN = 2


@attrs.frozen
class PeerState:
    peer_id: str
    kind: str
    location: str
    online: bool
    #: Unix seconds of the last answer (now, if online); None if never.
    last_seen: int | None
    #: Shards of ours the index places on this peer, and their bytes.
    shards_held_for_us: int
    bytes_held_for_us: int
    #: Bytes of the peer's shards this home's node keeps (0 if none, or a folder).
    bytes_we_hold_for_it: int
    is_friend: bool
    #: Why it did not answer, if it did not.
    problem: str = ""


@attrs.frozen
class DataHealth:
    packs: int
    safe: int
    at_risk: int
    unrecoverable: int
    #: Fewest healthy shards of any pack, and fewest beyond k (None: no packs).
    min_healthy: int | None
    min_margin: int | None

    def lines(self) -> list[str]:
        if not self.packs:
            return ["data: nothing backed up yet"]
        lines = []
        if self.min_margin is not None and self.min_margin >= 0:
            lines.append(
                f"data: all {self.packs} packs ≥ {self.min_healthy} healthy shards "
                f"(≥ {self.min_margin} more than needed)"
            )
        if self.at_risk:
            lines.append(
                f"{self.at_risk} packs at risk: fewer than {SAFE_MARGIN} spare healthy shards"
            )
        if self.unrecoverable:
            lines.append(
                f"{self.unrecoverable} packs unrecoverable: fewer healthy shards than needed, "
                "until their peers come back"
            )
        return lines


def data_health(packs: Iterable[tuple[int, int, Sequence[str]]], online: set[str]) -> DataHealth:
    """Pack health from each pack's (k, n, peers holding its shards) and the
    peers that answered (pure)."""
    count = safe = at_risk = unrecoverable = 0
    min_healthy: int | None = None
    min_margin: int | None = None
    for k, _n, holders in packs:
        count += 1
        healthy = sum(1 for peer in holders if peer in online)
        margin = healthy - k
        min_healthy = healthy if min_healthy is None else min(min_healthy, healthy)
        min_margin = margin if min_margin is None else min(min_margin, margin)
        if margin < 0:
            unrecoverable += 1
        elif margin < SAFE_MARGIN:
            at_risk += 1
        else:
            safe += 1
    return DataHealth(count, safe, at_risk, unrecoverable, min_healthy, min_margin)


@attrs.frozen
class NodeState:
    node_id: str
    #: Addresses the node publishes (from the last ``serve``); empty if it never served.
    addresses: tuple[str, ...]
    #: Bytes this node keeps for others.
    hosting_bytes: int


@attrs.frozen
class Status:
    node: NodeState
    peers: tuple[PeerState, ...]
    data: DataHealth

    def to_json(self) -> dict[str, object]:
        return attrs.asdict(self)

    def lines(self) -> list[str]:
        node = self.node
        where = ", ".join(node.addresses) if node.addresses else "not serving"
        lines = [
            f"node {node.node_id} ({where}); keeps {node.hosting_bytes} bytes for others",
        ]
        for peer in self.peers:
            state = "online" if peer.online else f"OFFLINE ({peer.problem})"
            seen = (
                "never seen"
                if peer.last_seen is None
                else time.strftime("last seen %Y-%m-%d %H:%M", time.localtime(peer.last_seen))
            )
            friend = "friend, " if peer.is_friend else ""
            lines.append(
                f"peer {peer.peer_id[:16]} {friend}{peer.kind} at {peer.location}: {state}, "
                f"{seen}; holds {peer.shards_held_for_us} shards of ours "
                f"({peer.bytes_held_for_us} bytes); "
                f"we keep {peer.bytes_we_hold_for_it} bytes for it"
            )
        lines.extend(self.data.lines())
        return lines


async def gather_status(home: Home, repo: Repository, *, now: float | None = None) -> Status:
    """Ask every peer now, and put together what ``status`` shows."""
    peers = repo.peers()
    answers: dict[str, str] = {}

    async def probe(peer: PeerRecord) -> None:
        try:
            with trio.fail_after(PROBE_TIMEOUT):
                await repo.store(peer.peer_id).usage()
        except trio.TooSlowError:
            answers[peer.peer_id] = f"no answer within {PROBE_TIMEOUT:g} s"
        except P2PBackupError as error:
            answers[peer.peer_id] = str(error)
        else:
            answers[peer.peer_id] = ""

    async with trio.open_nursery() as nursery:
        for peer in peers:
            nursery.start_soon(probe, peer)
    seen_at = int(time.time() if now is None else now)
    online = {peer_id for peer_id, problem in answers.items() if not problem}
    index = repo.index
    with index.transaction():
        for peer_id in online:
            index.set_seen(peer_id, seen_at)
    last_seen = index.last_seen()
    held = index.shard_count_by_peer()
    held_bytes = index.shard_bytes_by_peer()
    hosted = shardhost.usage_by_owner(home.hosted_path)
    friends = {friend.node_id.hex() for friend in index.friends()}
    states = tuple(
        PeerState(
            peer_id=peer.peer_id,
            kind=peer.kind,
            location=peer.location,
            online=peer.peer_id in online,
            last_seen=last_seen.get(peer.peer_id),
            shards_held_for_us=held.get(peer.peer_id, 0),
            bytes_held_for_us=held_bytes.get(peer.peer_id, 0),
            bytes_we_hold_for_it=_hosted_for(hosted, peer.peer_id),
            is_friend=peer.peer_id in friends,
            problem=answers.get(peer.peer_id, ""),
        )
        for peer in peers
    )
    health = data_health(((k, n, holders) for _, k, n, holders in index.pack_placements()), online)
    node = NodeState(
        node_id=repo.keyring.node_id.hex(),
        addresses=tuple(home.read_addresses()),
        hosting_bytes=sum(hosted.values()),
    )
    return Status(node, states, health)


def _hosted_for(hosted: dict[bytes, int], peer_id: str) -> int:
    try:
        return hosted.get(bytes.fromhex(peer_id), 0)
    except ValueError:  # a folder peer's id is not a node id
        return 0
