"""Placement: which peer holds which shard of a pack (pure).

Peers are ranked per pack by rendezvous (highest-random-weight) hashing of
``(pack id, peer id)``: every pack gets its own permutation of the peers, so
load spreads evenly, and the ranking is stable — retries, repairs and a later
run with the same peers make the same choices. Shard i goes to the i-th
ranked peer; peers further down the ranking are the spares used when one of
the first n refuses.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def _weight(pack_id: bytes, peer_id: str) -> bytes:
    return hashlib.blake2b(
        pack_id + peer_id.encode(), digest_size=16, person=b"p2pb-placement"
    ).digest()


def rank_peers(pack_id: bytes, peer_ids: Iterable[str]) -> list[str]:
    """``peer_ids`` in this pack's order of preference."""
    return sorted(peer_ids, key=lambda peer: _weight(pack_id, peer), reverse=True)
