"""A home as a delegate: repairing for the owners whose grants its node holds.

Nouns:

* **delegated pass** — :func:`repair_for_owner`: the grant the node holds
  of one owner, checked (its certificate still good), its grant index
  opened or made again from it, and one pass of
  :func:`p2pbackup.maintenance.delegated.repair_for` on it. What
  ``repair --for OWNER`` runs, and what ``serve`` runs on its own.
* **owner seen** — when this delegate last reached the owner's node, kept
  in the grant index; before that, the grant's issue time stands in.
* **turn** — when a delegate steps in for an owner that stays away
  (:func:`p2pbackup.maintenance.delegated.turn_at`): the owner's grace
  period after it was last seen, plus a day for each delegate before this
  one in node id order. No coordinator is needed: a delegate whose turn
  comes finds the packs an earlier one repaired healthy, and moves nothing.
* **round** — :func:`owners_round`: every owner whose grant the node
  holds, reached if it can be (its address from this home's friends and
  peers), and repaired for if its turn has come. ``serve`` runs one every
  :data:`ROUND_SECONDS` (:func:`keep_owners`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import NoReturn

import attrs
import trio

from p2pbackup.app import homedht
from p2pbackup.app.home import Home
from p2pbackup.core import delegation
from p2pbackup.core.keys import Keyring
from p2pbackup.engine.index import Index
from p2pbackup.engine.progress import Progress
from p2pbackup.errors import P2PBackupError, StoreError, UsageError
from p2pbackup.maintenance import delegated
from p2pbackup.maintenance.delegated import DelegatedRepair
from p2pbackup.maintenance.repairer import RepairOptions
from p2pbackup.model import RepairGrant
from p2pbackup.net.network import Address, Network, TcpNetwork
from p2pbackup.node.shardhost import HeldGrant, read_held_grants
from p2pbackup.stores.durable import make_dirs
from p2pbackup.stores.remote import RemoteShardStore
from p2pbackup.wire.session import Identity

log = logging.getLogger(__name__)

#: Seconds between two rounds of ``serve`` over the owners it keeps.
ROUND_SECONDS = 3600.0
#: Seconds an owner's node has to answer a round's probe.
PROBE_SECONDS = 10.0


def held_grant(home: Home, owner: bytes) -> HeldGrant:
    """The grant this home's node holds of ``owner``; UsageError if none."""
    held = {g.owner: g for g in read_held_grants(home.hosted_path)}.get(owner)
    if held is None:
        node_id = Keyring.from_master_secret(home.load_secret()).node_id
        raise UsageError(
            f"this node holds no repair grant of node {owner.hex()}: its owner makes "
            f"this node a delegate with `p2pbackup delegate add {node_id.hex()}`"
        )
    return held


def open_grant_index(home: Home, held: HeldGrant) -> tuple[Index, RepairGrant]:
    """The grant index of ``held``'s owner, made again from it if it is newer."""
    path = delegated.grant_index_path(home.path, held.owner)
    make_dirs(path.parent, home.path, mode=0o700)
    return delegated.open_grant_index(path, held.grant, held.owner)


async def repair_for_owner(
    home: Home,
    owner: bytes,
    options: RepairOptions,
    *,
    network: Network | None = None,
    progress: Progress | None = None,
    clock: Callable[[], float] = time.time,
    scheduled: random.Random | None = None,
) -> tuple[RepairGrant, DelegatedRepair]:
    """One delegated pass for ``owner`` (module docstring), and the grant it
    followed; ``scheduled`` as :func:`p2pbackup.maintenance.delegated.repair_for`'s."""
    keyring = Keyring.from_master_secret(home.load_secret())
    held = held_grant(home, owner)
    delegation.verify_certificate(
        held.certificate, now=int(clock()), delegate=keyring.node_id, owner=owner
    )
    network = network if network is not None else TcpNetwork()
    index, grant = open_grant_index(home, held)
    try:
        result = await delegated.repair_for(
            keyring,
            index,
            held.certificate,
            network,
            options,
            locate=homedht.dht_locator(home, network),
            progress=progress,
            clock=clock,
            scheduled=scheduled,
        )
    finally:
        index.close()
    return grant, result


def _owner_addresses(home: Home, owner: bytes) -> list[str]:
    """Where this home knows the owner's node: as a friend, or as a peer."""
    index = Index(home.index_path, create=False)
    try:
        friend = index.friend(owner)
        addresses = list(friend.addresses) if friend is not None else []
        addresses += [p.location for p in index.peers() if p.peer_id == owner.hex()]
    finally:
        index.close()
    return list(dict.fromkeys(a for a in addresses if a))


async def _reached(
    network: Network, identity: Identity, owner: bytes, addresses: list[str]
) -> bool:
    """Whether the owner's node answers at one of ``addresses`` now."""
    for text in addresses:
        try:
            address = Address.parse(text)
        except UsageError:
            continue
        store = RemoteShardStore(
            network,
            identity,
            address,
            owner,
            connect_timeout=PROBE_SECONDS,
            io_timeout=PROBE_SECONDS,
        )
        try:
            await store.usage()
        except StoreError:
            continue
        finally:
            await store.aclose()
        return True
    return False


@attrs.frozen
class Acted:
    """What a round did for one owner."""

    owner: bytes = attrs.field(repr=bytes.hex)
    report: DelegatedRepair


async def owners_round(
    home: Home,
    network: Network,
    identity: Identity,
    options: RepairOptions,
    *,
    clock: Callable[[], float] = time.time,
    rng: random.Random | None = None,
) -> list[Acted]:
    """One round over the owners whose grants the node holds (module
    docstring); what was repaired for whom. One owner's failure is logged
    and does not stop the others."""
    acted = []
    for held in read_held_grants(home.hosted_path):
        owner = held.owner
        try:
            now = clock()
            index, grant = open_grant_index(home, held)
            try:
                if await _reached(network, identity, owner, _owner_addresses(home, owner)):
                    with index.transaction():
                        index.set_meta(delegated.OWNER_SEEN, str(int(now)).encode())
                    continue
                raw = index.get_meta(delegated.OWNER_SEEN)
                seen = None if raw is None else int(raw)
            finally:
                index.close()
            turn = delegated.turn_at(grant, identity.node_id, seen, options.policy.grace)
            if now < turn:
                continue
            log.info("node %s is away past its grace period: repairing for it", owner.hex())
            # Round after round: the shards due, as the owner audits them.
            _grant, report = await repair_for_owner(
                home,
                owner,
                options,
                network=network,
                clock=clock,
                scheduled=rng if rng is not None else random.SystemRandom(),
            )
            acted.append(Acted(owner, report))
            log.info("repaired for node %s: %s", owner.hex(), "; ".join(report.repair.lines()))
        except P2PBackupError as error:
            log.warning("could not keep node %s's backups alive: %s", owner.hex(), error)
    return acted


async def keep_owners(
    home: Home,
    network: Network,
    identity: Identity,
    options: RepairOptions,
    *,
    clock: Callable[[], float] = time.time,
    rng: random.Random | None = None,
    interval: float = ROUND_SECONDS,
) -> NoReturn:
    """A round every ``interval`` seconds, for ever (``serve``): a round that
    fails is logged, and the next comes at its time; it never ends the node."""
    while True:
        try:
            await owners_round(home, network, identity, options, clock=clock, rng=rng)
        except Exception:
            log.exception("a round over the owners this node is a delegate of failed (a bug)")
        await trio.sleep(interval)
