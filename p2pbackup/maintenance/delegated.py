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
* **delegated pass** — :func:`repair_for`: the repair logs of the owner's
  other delegates taken in (those it can reach: the ones that are also
  the owner's peers), an audit — of every shard when the pass is forced
  (``repair --for``), of the shards due on the owner's own audit schedule
  when ``serve`` runs it hourly (auditing every shard each hour would ask
  the owner's peers for far more than the owner itself ever does) — then
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
* **turn** — :func:`turn_at`: when a delegate steps in for an owner that
  stays away, one delegate at a time in node id order.
* **repair log** — :func:`sealed_log`: where the shards the delegate's
  passes rebuilt are now, against the grant the grant index was made from
  (kept in it), signed by the delegate. Its owner reads it back when it
  returns (``GetRepairLog``, :func:`p2pbackup.maintenance.grants.read_back`).

Peers in a fresh grant index count as last seen when the grant was issued,
so that the repair policy's grace period runs from then. A delegate keeps
its grant indexes under :data:`GRANT_INDEX_DIR` in its home.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import attrs

from p2pbackup.core import crypto, delegation
from p2pbackup.core.keys import Keyring, node_id_for
from p2pbackup.engine.index import Index
from p2pbackup.engine.progress import Progress
from p2pbackup.engine.repository import Repository
from p2pbackup.maintenance import auditor, grants, leases, repairer
from p2pbackup.maintenance.auditor import AuditReport
from p2pbackup.maintenance.leases import LeaseReport
from p2pbackup.maintenance.repairer import RepairOptions, RepairReport
from p2pbackup.model import (
    PEER_KIND_NODE,
    LogEntry,
    PackRecord,
    PeerRecord,
    RepairGrant,
    RepairLog,
    RepositoryConfig,
    ShardLocation,
)
from p2pbackup.net.network import Network
from p2pbackup.stores.remote import Locator

#: The meta keys holding the sequence of the grant a grant index was made
#: from, and that grant (sealed).
GRANT_SEQUENCE = "grant_sequence"
GRANT = "grant"
#: Where a delegate's home keeps its grant indexes.
GRANT_INDEX_DIR = "delegated"
#: The meta key holding when the delegate last reached the owner's node.
OWNER_SEEN = "owner_seen"
#: The meta key holding when the delegate's last pass for the owner began.
LAST_PASS = "last_pass"
#: Seconds each delegate waits after the one before it in node id order.
STAGGER = 86400.0


def turn_at(grant: RepairGrant, delegate: bytes, owner_seen: int | None, grace: float) -> float:
    """When ``delegate`` steps in for the grant's owner if it stays away: the
    grace period after it was last seen (or after the grant was issued, if
    later), plus :data:`STAGGER` for each delegate before this one in node
    id order; a delegate the grant does not name comes after them all."""
    order = sorted(grant.delegates)
    rank = order.index(delegate) if delegate in order else len(order)
    since = max(grant.issued_at, owner_seen or 0)
    return since + grace + rank * STAGGER


def grant_index_path(home_dir: Path, owner: bytes) -> Path:
    """Where the home at ``home_dir`` keeps its grant index of ``owner``."""
    return home_dir / GRANT_INDEX_DIR / f"{owner.hex()}.sqlite"


def open_grant_index(path: Path, sealed_grant: bytes, owner: bytes) -> tuple[Index, RepairGrant]:
    """The grant index at ``path`` and the grant it follows: made again from
    ``sealed_grant`` (``owner``'s) if that is newer than the one the index
    was made from (module docstring)."""
    grant = delegation.open_grant(sealed_grant, owner=owner)
    index = Index(path)
    try:
        held = index.get_meta(GRANT_SEQUENCE)
        if held is None or int(held) < grant.sequence:
            _fill(index, grant, sealed_grant)
        else:
            stored = index.get_meta(GRANT)
            assert stored is not None  # written with the sequence
            grant = delegation.open_grant(stored, owner=owner)
    except BaseException:
        index.close()
        raise
    return index, grant


def repair_log(index: Index, grant: RepairGrant, delegate: bytes, now: int) -> RepairLog:
    """Where the shards are now that are not where ``grant`` (the one
    ``index`` was made from) put them."""
    granted = {
        (pack.pack_id, shard.index): grant.peers[shard.peer].node_id
        for pack in grant.packs
        for shard in pack.shards
    }
    entries = []
    for pack_id in index.pack_ids():
        record = index.pack(pack_id, with_blobs=False)
        assert record is not None
        for location in sorted(record.shards, key=lambda s: s.index):
            holder = bytes.fromhex(location.peer_id)
            if granted.get((pack_id, location.index)) != holder:
                entries.append(LogEntry(pack_id, location.index, holder, location.merkle_root))
    raw = index.get_meta(LAST_PASS)
    acted = 0 if raw is None else int(raw)
    return RepairLog(delegate, grant.owner, grant.sequence, now, tuple(entries), acted)


def sealed_log(path: Path, identity_seed: bytes, owner: bytes, now: int) -> bytes | None:
    """The repair log of the grant index at ``path`` (``owner``'s), signed
    by the delegate whose seed this is; None if there is no grant index, or
    no pass ran and nothing moved."""
    if not path.exists():
        return None
    index = Index(path, create=False)
    try:
        stored = index.get_meta(GRANT)
        if stored is None:
            return None
        grant = delegation.open_grant(stored, owner=owner)
        delegate = node_id_for(crypto.signing_public_key(identity_seed))
        log = repair_log(index, grant, delegate, now)
    finally:
        index.close()
    if not log.entries and not log.acted_at:
        return None
    return delegation.seal_log(identity_seed, log)


def _fill(index: Index, grant: RepairGrant, sealed_grant: bytes) -> None:
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
        index.set_meta(GRANT, sealed_grant)


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
    clock: Callable[[], float] = time.time,
    scheduled: random.Random | None = None,
) -> DelegatedRepair:
    """One delegated pass (module docstring) on the grant index ``index``, as
    the delegate whose keyring this is, under ``certificate``; with
    ``scheduled`` (the randomness of the audit schedule) only the shards
    due are audited, else every one."""
    repo = Repository(keyring, index, network, locate=locate, certificate=certificate)
    started = int(clock())
    try:
        # What the other delegates moved first: one that stepped in before
        # this one leaves nothing for it to do.
        stored = index.get_meta(GRANT)
        if stored is not None:
            grant = delegation.open_grant(stored)
            others = [d for d in grant.delegates if d != keyring.node_id]
            peers = {p.peer_id for p in index.peers()}
            sources = [(d, grant.sequence) for d in others if d.hex() in peers]
            await grants.take_logs(repo, grant.owner, sources, clock)
        if scheduled is None:
            audit = await auditor.audit_once(repo, clock=clock)
        else:
            due = await auditor.audit_due(repo, clock=clock, rng=scheduled)
            audit = due if due is not None else AuditReport(results=())
        evolved = attrs.evolve(repairer.with_audits(options, index), publish=False)
        report = await repairer.repair_pass(repo, evolved, progress=progress, now=clock())
        renewed = await leases.renew_leases(repo, clock())
        # Read back by the owner (the log's acted_at) and by status.
        with index.transaction():
            index.set_meta(LAST_PASS, str(started).encode())
    finally:
        await repo.aclose()
    return DelegatedRepair(audit, report, renewed)
