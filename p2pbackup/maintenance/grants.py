"""Delegation, the owner's side: its delegates, the repair grant made from
its index, and handing them over (docs/delegation.md).

Nouns:

* **delegate** — a node peer of this home (a friend, or a node added with
  ``peer add``) that the user chose to keep its backups alive while it is
  away; a row of the index (:class:`~p2pbackup.engine.index.DelegateRow`).
* **repair grant** — built from the index by :func:`build_grant`: every
  pack with a shard on a node peer, its code and shard geometry, and for
  each of those shards its index, holder and Merkle root; every node peer,
  with the addresses it was last known at. Shards on folder peers are left
  out (a delegate cannot reach the owner's disks), and so is everything else
  the index holds: blobs, snapshots, file names, keys. It names every
  delegate, so that each knows its turn.
* **hand-over** — :func:`hand_grants`: a fresh grant (a new sequence) and,
  for each delegate, a fresh certificate (:data:`CERTIFICATE_LIFETIME`),
  sent with ``PutGrant``; what each delegate answered is kept in its row.
  Run after each backup, prune and repair that ``p2pbackup`` runs, when a
  delegate is added, and after ``serve``'s backups and its repair passes
  that moved shards, or when a delegate's grant is a week old
  (:func:`grants_due`), so that certificates never run out.
* **read-back** — :func:`read_back`: each delegate's repair log (where
  the shards it rebuilt while this home was away are now) taken into the
  index, before each repair pass and before each hand-over (so that the
  grant says where the shards are). A log that follows an older grant
  than the one the delegate last took is stale, and left. An entry is
  taken only if it names a node peer of ours and the
  Merkle root the index already holds for that shard, so a lying delegate
  costs at most one failed audit; the copy it replaces is kept as a
  displaced one (it counts again if its peer returns).
* **revocation** — :func:`revoke`: every node peer (the delegate included)
  told to refuse the delegate's certificates issued until now. A node that
  cannot be told now honours them until they expire.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import attrs
import trio

from p2pbackup.core import delegation
from p2pbackup.core.delegation import CERTIFICATE_LIFETIME
from p2pbackup.engine.index import Index
from p2pbackup.engine.repository import Repository
from p2pbackup.errors import IntegrityError, P2PBackupError, StoreError
from p2pbackup.model import (
    NODE_ID_SIZE,
    PEER_KIND_NODE,
    GrantPack,
    GrantPeer,
    GrantShard,
    RepairGrant,
    RepairLog,
    ShardLocation,
)
from p2pbackup.stores.remote import RemoteShardStore
from p2pbackup.wire.messages import MAX_GRANT_SIZE

log = logging.getLogger(__name__)

#: Addresses a grant gives each peer (the formats' bound).
_PEER_ADDRESSES = 8


def _node_peers(index: Index) -> dict[str, GrantPeer]:
    """Every node peer by peer id, with its location first, then the
    addresses its friend row adds."""
    peers: dict[str, GrantPeer] = {}
    for peer in index.peers():
        if peer.kind != PEER_KIND_NODE:
            continue
        try:
            node_id = bytes.fromhex(peer.peer_id)
        except ValueError:
            continue
        if len(node_id) != NODE_ID_SIZE:
            continue
        friend = index.friend(node_id)
        addresses = [peer.location, *(friend.addresses if friend is not None else ())]
        unique = tuple(dict.fromkeys(a for a in addresses if a))[:_PEER_ADDRESSES]
        peers[peer.peer_id] = GrantPeer(node_id, unique)
    return peers


def build_grant(index: Index, owner: bytes, *, sequence: int, now: int) -> RepairGrant:
    """The repair grant of the home whose index this is (module docstring)."""
    by_id = _node_peers(index)
    ordered = sorted(by_id.items(), key=lambda item: item[1].node_id)
    number = {peer_id: i for i, (peer_id, _peer) in enumerate(ordered)}
    packs = []
    for pack_id in index.pack_ids():
        record = index.pack(pack_id, with_blobs=False)
        if record is None:
            continue
        shards = tuple(
            GrantShard(location.index, number[location.peer_id], location.merkle_root)
            for location in sorted(record.shards, key=lambda s: s.index)
            if location.peer_id in number
        )
        if shards:
            packs.append(
                GrantPack(
                    pack_id=record.pack_id,
                    size=record.size,
                    k=record.k,
                    n=record.n,
                    shard_size=record.shard_size,
                    block_size=record.block_size,
                    shards=shards,
                )
            )
    return RepairGrant(
        owner=owner,
        sequence=sequence,
        issued_at=now,
        peers=tuple(peer for _peer_id, peer in ordered),
        packs=tuple(packs),
        delegates=tuple(sorted(row.node_id for row in index.delegates())),
    )


@attrs.frozen
class Handed:
    """What handing one delegate its grant came to: the sequence it holds
    now, or why it does not hold this one."""

    node_id: bytes = attrs.field(repr=bytes.hex)
    sequence: int | None
    problem: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem


def _remote(repo: Repository, node_id: bytes) -> RemoteShardStore:
    store = repo.store(node_id.hex())
    if not isinstance(store, RemoteShardStore):
        raise StoreError(f"peer {node_id.hex()} is not a node on the network")
    return store


async def hand_grants(repo: Repository, *, clock: Callable[[], float] = time.time) -> list[Handed]:
    """Hand every delegate a fresh grant and certificate (module docstring);
    what each came to. Nothing is asked of anyone when there is no delegate."""
    index = repo.index
    rows = index.delegates()
    if not rows:
        return []
    now = int(clock())
    with index.transaction():
        sequence = index.next_grant_sequence(now)
    grant = build_grant(index, repo.keyring.node_id, sequence=sequence, now=now)
    sealed = delegation.seal_grant(repo.keyring.identity_seed, grant)
    results: dict[bytes, Handed] = {}

    async def hand(node_id: bytes) -> None:
        if len(sealed) > MAX_GRANT_SIZE:
            results[node_id] = Handed(
                node_id,
                None,
                f"the grant of {len(grant.packs)} packs is {len(sealed)} bytes, over the "
                f"{MAX_GRANT_SIZE} a node takes",
            )
            return
        certificate = delegation.issue_certificate(repo.keyring.identity_seed, node_id, now=now)
        try:
            held = await _remote(repo, node_id).put_grant(sealed, certificate)
        except P2PBackupError as error:
            results[node_id] = Handed(node_id, None, str(error))
        else:
            results[node_id] = Handed(node_id, held)

    async with trio.open_nursery() as nursery:
        for row in rows:
            nursery.start_soon(hand, row.node_id)
    with index.transaction():
        for node_id, handed in results.items():
            if handed.sequence is not None:
                index.set_delegate_granted(node_id, now, handed.sequence)
            else:
                index.set_delegate_problem(node_id, handed.problem)
    return [results[row.node_id] for row in rows]


#: A grant (and the certificate with it) is handed out again at least this
#: often while nothing changes, well before the certificate expires.
REGRANT_SECONDS = 7 * 86400


def grants_due(index: Index, now: float) -> bool:
    """Whether some delegate took no grant in the last :data:`REGRANT_SECONDS`
    (or none yet): what a repair pass that changed nothing still hands out for."""
    return any(
        row.granted_at is None or now - row.granted_at >= REGRANT_SECONDS
        for row in index.delegates()
    )


async def hand_out(repo: Repository, *, clock: Callable[[], float] = time.time) -> list[str]:
    """:func:`hand_grants` after a run that changed shard maps (a backup, a
    prune, a repair): never fails that run; a warning, also logged, for each
    delegate that did not take its grant."""
    try:
        # The grant must say where the delegates moved shards: read that first.
        _taken, problems = await _read_back(repo, clock)
        handed = await hand_grants(repo, clock=clock)
    except P2PBackupError as error:
        log.warning("repair grants were not handed out: %s", error)
        return [f"warning: repair grants were not handed out: {error}"]
    # A delegate that could not be reached is said once, by its hand-over.
    unreached = {h.node_id for h in handed if not h.ok}
    warnings = []
    for node_id, problem in problems:
        if node_id not in unreached:
            log.warning("delegate %s gave no repair log: %s", node_id.hex(), problem)
            warnings.append(f"warning: delegate {node_id.hex()} gave no repair log ({problem})")
    for h in handed:
        if not h.ok:
            log.warning("delegate %s did not take its repair grant: %s", h.node_id.hex(), h.problem)
            warnings.append(
                f"warning: delegate {h.node_id.hex()} did not take its repair grant ({h.problem})"
            )
    return warnings


async def read_back(
    repo: Repository, *, clock: Callable[[], float] = time.time
) -> tuple[int, list[str]]:
    """Take every delegate's repair log into the index (module docstring):
    how many shard locations changed, and a warning for each delegate that
    could not be asked or sent a log that does not verify."""
    taken, problems = await _read_back(repo, clock)
    warnings = [f"delegate {node_id.hex()} gave no repair log: {p}" for node_id, p in problems]
    for warning in warnings:
        log.warning("%s", warning)
    return taken, warnings


async def _read_back(
    repo: Repository, clock: Callable[[], float]
) -> tuple[int, list[tuple[bytes, str]]]:
    """:func:`read_back`, with each problem by delegate."""
    rows = repo.index.delegates()
    sources = [(row.node_id, row.grant_sequence) for row in rows]
    return await take_logs(repo, repo.keyring.node_id, sources, clock, note_acted=True)


async def take_logs(
    repo: Repository,
    owner: bytes,
    sources: Sequence[tuple[bytes, int | None]],
    clock: Callable[[], float],
    *,
    note_acted: bool = False,
) -> tuple[int, list[tuple[bytes, str]]]:
    """Ask each delegate of ``sources`` (node id, the grant sequence below
    which its log is stale, or None) for its repair log of ``owner``, and
    take what checks out into ``repo``'s index (module docstring,
    "read-back"): how many locations changed, and each delegate's problem.
    The owner reads its delegates this way (``note_acted``: keeping when
    each last acted, for ``status``), and a delegate the others."""
    index = repo.index
    logs: list[RepairLog] = []
    acted: list[RepairLog] = []
    problems: list[tuple[bytes, str]] = []

    async def ask(node_id: bytes, taken: int | None) -> None:
        try:
            data = await _remote(repo, node_id).get_repair_log()
            if data is None:
                return
            sent = delegation.open_log(data, delegate=node_id, owner=owner)
        except (P2PBackupError, IntegrityError) as error:
            problems.append((node_id, str(error)))
            return
        # A stale log still says when the delegate last acted.
        acted.append(sent)
        # A log follows the grant the delegate last repaired from; once it
        # took a newer one, the owner has been back, read that log and
        # handed out shard maps since: the log is stale.
        if taken is None or sent.grant_sequence >= taken:
            logs.append(sent)

    if not sources:
        return 0, []
    async with trio.open_nursery() as nursery:
        for node_id, taken_sequence in sources:
            nursery.start_soon(ask, node_id, taken_sequence)
    node_peers = set(_node_peers(index))
    now = int(clock())
    taken = 0
    changed: set[bytes] = set()
    with index.transaction():
        for sent in acted:
            if note_acted and sent.acted_at:
                index.set_delegate_acted(sent.delegate, sent.acted_at)
        for sent in logs:
            for entry in sent.entries:
                record = index.pack(entry.pack_id, with_blobs=False)
                if record is None:
                    continue
                current = next((s for s in record.shards if s.index == entry.index), None)
                holder = entry.holder.hex()
                if (
                    current is None
                    or current.merkle_root != entry.merkle_root
                    or current.peer_id == holder
                    or holder not in node_peers
                ):
                    continue
                index.add_displaced(entry.pack_id, current, now)
                index.set_shard(
                    entry.pack_id, ShardLocation(entry.index, holder, current.merkle_root)
                )
                changed.add(entry.pack_id)
                taken += 1
        # The next index segment describes the data packs whose shards moved.
        index.mark_out_of_segment(changed)
    return taken, sorted(problems)


async def revoke(
    repo: Repository, node_id: bytes, *, clock: Callable[[], float] = time.time
) -> tuple[int, list[str]]:
    """Tell every node peer to refuse ``node_id``'s certificates issued until
    now: how many were told, and a warning for each that was not."""
    before = int(clock()) + 1
    peers = [p for p in repo.peers() if p.kind == PEER_KIND_NODE]
    warnings: list[str] = []
    told = 0

    async def tell(peer_id: str) -> None:
        nonlocal told
        try:
            await _remote(repo, bytes.fromhex(peer_id)).revoke_delegate(node_id, before)
        except (P2PBackupError, ValueError) as error:
            warnings.append(
                f"node {peer_id} was not told ({error}); it honours the certificate it may "
                f"hold until that expires (at most {CERTIFICATE_LIFETIME // 86400} days)"
            )
        else:
            told += 1

    async with trio.open_nursery() as nursery:
        for peer in peers:
            nursery.start_soon(tell, peer.peer_id)
    return told, sorted(warnings)
