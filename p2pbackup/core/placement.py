"""Placement: which peer holds which shard of a pack (pure).

Peers are ranked per pack by rendezvous (highest-random-weight) hashing of
``(pack id, peer id)``: every pack gets its own permutation of the peers, so
load spreads evenly, and the ranking is stable — retries, repairs and a later
run with the same peers make the same choices. Peers on a host that already
has a shard of the pack go after those on new hosts (:func:`spread_hosts`).
Shard i goes to the i-th ranked peer; peers further down the ranking are the
spares used when one of the first n refuses.

Nouns of the weighted ranking:

* **hash fraction** — the ``(pack id, peer id)`` hash read as a number in
  (0, 1).
* **weight** — how much a peer is preferred: its :class:`PeerWeight` (free
  space, uptime, reputation) made one number by :func:`weigh_peers`. Free
  space counts in proportion, uptime and reputation as factors; a peer
  without room for the pack's shard weighs 0. Weights are rounded to steps
  of a quarter of a power of two (about 19 %), so that the drift of free
  space and uptime from one day to the next seldom changes a weight: a retry
  or a repair mostly sees the ranking its pack was written with, and a
  weight that does change moves only the packs that peer wins or loses.
* **score** — ``weight / -ln(hash fraction)``, the standard weighted
  rendezvous hashing (:func:`rank_weighted`): over many packs a peer comes
  first in a share of them proportional to its weight, and with equal
  weights the order is exactly :func:`rank_peers`'s. A peer of weight 0
  scores 0, after every peer with room.

The **code** (k-of-n) adapts to the peers there are (:func:`choose_code`):
the configured one when there are enough, else a smaller one that still
survives two lost peers — with three peers 1-of-3, a whole copy of each
(encrypted) pack on each: k is for durability, not secrecy
(docs/privacy.md, "Few friends: 1-of-n"). Only peers with room for the
code's shard count (:func:`fit_code`).

A pack's **plan** (:func:`plan_pack`) puts it all together: the peers in the
order its shards go to them — shard i to the i-th **target**, then the
**spares** in order — and the spares known to be **short of room** for a
shard, which the run reports as passed over.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

import attrs

from p2pbackup.errors import UsageError


def _hash(pack_id: bytes, peer_id: str) -> bytes:
    return hashlib.blake2b(
        pack_id + peer_id.encode(), digest_size=16, person=b"p2pb-placement"
    ).digest()


def rank_peers(pack_id: bytes, peer_ids: Iterable[str]) -> list[str]:
    """``peer_ids`` in this pack's order of preference, all weighing the same."""
    return sorted(peer_ids, key=lambda peer: _hash(pack_id, peer), reverse=True)


#: Bits of the hash that make its fraction: all a float's mantissa holds.
_FRACTION_BITS = 53


def hash_fraction(pack_id: bytes, peer_id: str) -> float:
    """The pack's hash of ``peer_id`` as a number strictly between 0 and 1,
    in the same order as the hash itself."""
    top = int.from_bytes(_hash(pack_id, peer_id), "big") >> (128 - _FRACTION_BITS)
    return (top + 0.5) / (1 << _FRACTION_BITS)


def rank_weighted(pack_id: bytes, weights: Mapping[str, float]) -> list[str]:
    """The peers of ``weights`` in this pack's order of preference
    (weighted rendezvous hashing; see the module docstring).

    Equal scores — peers of weight 0 — keep the order of their hashes, so
    the result is a function of the pack and the weights alone.
    """
    for peer, weight in weights.items():
        if not weight >= 0 or math.isinf(weight):
            raise ValueError(f"peer {peer}: weight {weight} is not a finite number >= 0")

    def key(peer: str) -> tuple[bool, float, bytes]:
        weight = weights[peer]
        # The first item keeps a tiny weight whose score underflows to 0
        # ahead of a weight of 0.
        return weight > 0, weight / -math.log(hash_fraction(pack_id, peer)), _hash(pack_id, peer)

    return sorted(weights, key=key, reverse=True)


@attrs.frozen
class PeerWeight:
    """What placement knows of a peer, to weigh it by."""

    #: Bytes more the peer would take now; None when it is not known.
    free: int | None = None
    #: Share of the times it was asked that it answered, 0 to 1 (:func:`uptime`).
    uptime: float = 1.0
    #: Share of audits it passed, 0 to 1 (no audits yet: 1).
    reputation: float = 1.0


def uptime(answered: int, asked: int) -> float:
    """A peer's uptime from its probe counts: ``(answered + 1) / (asked + 1)``,
    so that a peer never asked counts as up rather than as unknown and one
    missed probe does not bury a new peer."""
    if not 0 <= answered <= asked:
        raise ValueError(f"answered {answered} of {asked} probes")
    return (answered + 1) / (asked + 1)


#: Steps weights are rounded to, per doubling.
_STEPS_PER_DOUBLING = 4


def _rounded(weight: float) -> float:
    if weight <= 0:
        return 0.0
    steps = round(math.log2(weight) * _STEPS_PER_DOUBLING)
    return float(2.0 ** (steps / _STEPS_PER_DOUBLING))


def weigh_peers(peers: Mapping[str, PeerWeight], need: int) -> dict[str, float]:
    """Each peer's weight for a pack whose shard takes ``need`` bytes.

    Free space in proportion (a peer with ``free`` below ``need`` weighs 0;
    one whose free space is not known counts as the median of those known to
    have room, or as 1 byte when none does, so that it still goes before the
    peers known to have none), times uptime, times reputation; rounded (see
    the module docstring).
    """
    fitting = [p.free for p in peers.values() if p.free is not None and p.free >= need]
    typical = float(statistics.median(fitting)) if fitting else 1.0
    weights: dict[str, float] = {}
    for peer, weight in peers.items():
        free = typical if weight.free is None else float(weight.free)
        if weight.free is not None and weight.free < need:
            free = 0.0
        factors = (min(max(weight.uptime, 0.0), 1.0), min(max(weight.reputation, 0.0), 1.0))
        weights[peer] = _rounded(free * factors[0] * factors[1])
    return weights


#: Peers a pack needs at the least: one shard each, and two may be lost.
MIN_PEERS = 3
#: Most expansion (n/k) an adapted code may have.
MAX_EXPANSION = 3


@attrs.frozen
class Code:
    """The erasure code a pack is written with: any ``k`` of ``n`` shards."""

    k: int
    n: int
    #: Whether fewer peers than the configured n forced a smaller code.
    adapted: bool = False


def choose_code(k: int, n: int, peers: int) -> Code:
    """The code for the next pack with ``peers`` usable peers (one shard each).

    The configured ``k``-of-``n`` when there are ``n`` peers or more. With
    fewer, ``n`` = every peer, and ``k`` as near the configured ratio as
    allows at least two peers to be lost (k <= n - 2) with an expansion of at
    most three (k >= n / 3). Below :data:`MIN_PEERS` peers no code is safe:
    :class:`UsageError` saying how many more are needed.
    """
    if peers >= n:
        return Code(k, n)
    if peers < MIN_PEERS:
        missing = MIN_PEERS - peers
        raise UsageError(
            f"storing needs at least {MIN_PEERS} peers (one shard each, and two may be "
            f"lost); {peers} usable — add {missing} more with `p2pbackup friend add`, "
            "`peer add` or `peer add-dir`"
        )
    lowest = -(-peers // MAX_EXPANSION)
    wanted = round(peers * k / n)
    return Code(min(max(wanted, lowest), peers - 2), peers, adapted=True)


def fit_code(k: int, n: int, rooms: Sequence[int | None], need: Callable[[int], int]) -> Code:
    """The code for the next pack over peers with ``rooms`` (bytes each would
    take; None: not known, counted as enough), a shard of a code with ``k``
    data shards taking ``need(k)`` bytes.

    :func:`choose_code` over the peers with room for a shard of the code it
    chooses: a peer that would refuse its shard (a full one, or a node that
    stores only for its friends and offers an owner it has not added no
    room) must not count toward n, or the pack is stored below its n and
    survives fewer lost peers than its code says. A smaller code has larger
    shards, so the count is taken again until it holds.
    """
    usable = len(rooms)
    while True:
        code = choose_code(k, n, usable)
        fitting = sum(1 for room in rooms if room is None or room >= need(code.k))
        if fitting >= code.n:
            return code
        # Fewer than code.n <= usable: each turn lowers it, so this ends (in
        # choose_code's refusal at the latest).
        usable = fitting


def spread_hosts(ranked: Sequence[str], host_of: Callable[[str], str]) -> list[str]:
    """``ranked``, reordered so that every peer on a host not yet chosen comes
    before a second peer on the same host (each group keeps its order): two
    homes behind one address, or two nodes on one machine, get a pack's
    shards only once every other host has one."""
    first: list[str] = []
    later: list[str] = []
    hosts: set[str] = set()
    for peer in ranked:
        host = host_of(peer)
        (later if host in hosts else first).append(peer)
        hosts.add(host)
    return first + later


@attrs.frozen
class PackPlan:
    """Which peer gets which shard of a pack (the module docstring's plan)."""

    #: Shard i goes to ``targets[i]``.
    targets: tuple[str, ...]
    #: The peers to turn to, in order, when a target refuses.
    spares: tuple[str, ...]
    #: Spares not known to be down whose room is known to be too small.
    short_of_room: tuple[str, ...]


def plan_pack(
    pack_id: bytes,
    n: int,
    peers: Mapping[str, PeerWeight],
    need: int,
    host_of: Callable[[str], str],
    down: Collection[str] = (),
) -> PackPlan:
    """The plan of the pack ``pack_id`` of ``n`` shards of ``need`` bytes each
    over ``peers``, of which those in ``down`` are known to be down.

    Peers are ranked by weight (:func:`weigh_peers`, :func:`rank_weighted`),
    one per host first (:func:`spread_hosts`); then peers without room for
    the shard go after those with room, and peers known to be down last, as
    spares of last resort (each group keeps its ranking).
    """
    weights = weigh_peers(peers, need)
    ranked = sorted(
        spread_hosts(rank_weighted(pack_id, weights), host_of),
        key=lambda peer: (peer in down, weights[peer] == 0),
    )
    spares = ranked[n:]
    short = []
    for peer in spares:
        free = peers[peer].free
        if free is not None and free < need and peer not in down:
            short.append(peer)
    return PackPlan(tuple(ranked[:n]), tuple(spares), tuple(short))
