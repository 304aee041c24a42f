"""Placement: which peer holds which shard of a pack (pure).

Peers are ranked per pack by rendezvous (highest-random-weight) hashing of
``(pack id, peer id)``: every pack gets its own permutation of the peers, so
load spreads evenly, and the ranking is stable — retries, repairs and a later
run with the same peers make the same choices. Peers on a host that already
has a shard of the pack go after those on new hosts (:func:`spread_hosts`).
Shard i goes to the i-th ranked peer; peers further down the ranking are the spares used when one of
the first n refuses.

The **code** (k-of-n) adapts to the peers there are (:func:`choose_code`):
the configured one when there are enough, else a smaller one that still
survives two lost peers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

import attrs

from p2pbackup.errors import UsageError


def _weight(pack_id: bytes, peer_id: str) -> bytes:
    return hashlib.blake2b(
        pack_id + peer_id.encode(), digest_size=16, person=b"p2pb-placement"
    ).digest()


def rank_peers(pack_id: bytes, peer_ids: Iterable[str]) -> list[str]:
    """``peer_ids`` in this pack's order of preference."""
    return sorted(peer_ids, key=lambda peer: _weight(pack_id, peer), reverse=True)


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
