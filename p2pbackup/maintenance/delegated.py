"""Repair as a delegate: another owner's packs kept alive from its grant.

Nouns:

* **grant index** — an index (:class:`~p2pbackup.engine.index.Index`, the
  same schema as a home's) that a delegate keeps for one owner it repairs
  for, made from that owner's newest repair grant: its node peers, its
  packs and where their shards are; no blob, snapshot or key, since the
  grant has none. It is made again when a grant of a higher sequence
  comes (:func:`open_grant_index`), and otherwise keeps what the
  delegate's passes changed (shards moved, audits, peers seen), so that
  a second pass does not rebuild what the first one did.
* **delegated pass** — :func:`repair_for`: an audit of every shard, then
  the owner's own repair pass (:mod:`p2pbackup.maintenance.repairer`) on a
  repository made of the delegate's keyring, the grant index and the
  certificate, so that every session to a storage node opens with
  ``Delegate`` and acts in the owner's namespace. It rebuilds and puts
  shards like the owner's pass, but writes no index segment and no root
  record (it holds no key of the owner's, and the nodes would refuse
  them), and deletes nothing (the nodes refuse that too). It ends by
  renewing the leases of the owner's shards that are due
  (:mod:`p2pbackup.maintenance.leases`), signed by the delegate, so that
  the nodes keep them while the owner is away.

Peers in a fresh grant index count as last seen when the grant was issued,
so that the repair policy's grace period runs from then.
"""

from __future__ import annotations

import time
from pathlib import Path

import attrs

from p2pbackup.core.keys import Keyring
from p2pbackup.engine.index import Index
from p2pbackup.engine.progress import Progress
from p2pbackup.engine.repository import Repository
from p2pbackup.maintenance import auditor, leases, repairer
from p2pbackup.maintenance.auditor import AuditReport
from p2pbackup.maintenance.leases import LeaseReport
from p2pbackup.maintenance.repairer import RepairOptions, RepairReport
from p2pbackup.model import (
    PEER_KIND_NODE,
    PackRecord,
    PeerRecord,
    RepairGrant,
    RepositoryConfig,
    ShardLocation,
)
from p2pbackup.net.network import Network
from p2pbackup.stores.remote import Locator

#: The meta key holding the sequence of the grant a grant index was made from.
GRANT_SEQUENCE = "grant_sequence"


def open_grant_index(path: Path, grant: RepairGrant) -> Index:
    """The grant index at ``path``, made again from ``grant`` if it is newer
    than the one the index was made from (module docstring)."""
    index = Index(path)
    try:
        held = index.get_meta(GRANT_SEQUENCE)
        if held is None or int(held) < grant.sequence:
            _fill(index, grant)
    except BaseException:
        index.close()
        raise
    return index


def _fill(index: Index, grant: RepairGrant) -> None:
    peer_ids = [peer.node_id.hex() for peer in grant.peers]
    largest = max((pack.size for pack in grant.packs), default=1)
    first = grant.packs[0] if grant.packs else None
    # Repair decides with each pack's own code; the config is only what
    # the schema asks every index for.
    config = RepositoryConfig(
        k=first.k if first else 1,
        n=first.n if first else 2,
        pack_size=max(1, largest),
        chunk_min=1,
        chunk_avg=1,
        chunk_max=1,
        block_size=first.block_size if first else 1 << 16,
    )
    with index.transaction():
        for pack_id in index.pack_ids():
            index.remove_pack(pack_id)
        for old in index.peers():
            index.remove_peer(old.peer_id)
        index.set_config(config)
        for peer, peer_id in zip(grant.peers, peer_ids, strict=True):
            location = peer.addresses[0] if peer.addresses else ""
            index.add_peer(PeerRecord(peer_id, PEER_KIND_NODE, location))
            index.set_seen(peer_id, grant.issued_at)
        for pack in grant.packs:
            index.add_pack(
                PackRecord(
                    pack_id=pack.pack_id,
                    size=pack.size,
                    k=pack.k,
                    n=pack.n,
                    shard_size=pack.shard_size,
                    block_size=pack.block_size,
                    shards=tuple(
                        ShardLocation(s.index, peer_ids[s.peer], s.merkle_root) for s in pack.shards
                    ),
                    blobs=(),
                ),
                in_segment=True,
            )
        index.set_meta(GRANT_SEQUENCE, str(grant.sequence).encode())


@attrs.frozen
class DelegatedRepair:
    """What a delegated pass found and did."""

    audit: AuditReport
    repair: RepairReport
    leases: LeaseReport


async def repair_for(
    keyring: Keyring,
    index: Index,
    certificate: bytes,
    network: Network,
    options: RepairOptions,
    *,
    locate: Locator | None = None,
    progress: Progress | None = None,
) -> DelegatedRepair:
    """One delegated pass (module docstring) on the grant index ``index``, as
    the delegate whose keyring this is, under ``certificate``."""
    repo = Repository(keyring, index, network, locate=locate, certificate=certificate)
    try:
        audit = await auditor.audit_once(repo)
        evolved = attrs.evolve(repairer.with_audits(options, index), publish=False)
        report = await repairer.repair_pass(repo, evolved, progress=progress)
        renewed = await leases.renew_leases(repo, time.time())
    finally:
        await repo.aclose()
    return DelegatedRepair(audit, report, renewed)
