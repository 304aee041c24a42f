"""The home's side of discovery: what the DHT layer needs from a home's index.

Nouns:

* **remembered** — :class:`~p2pbackup.dht.discovery.Remembered` for a home: its
  node id and the neighbours its node saved (None before ``init``).
* **home friends** — the friends in the home's index, as
  :class:`~p2pbackup.dht.discovery.FriendContact`, read afresh at every call so a
  friend added while the node runs is followed from the next refresh.
* **root holders** — where the home's root pointer says its root record is
  kept: its storage nodes' addresses, friends first.
* **locator** — a :data:`~p2pbackup.stores.remote.Locator` that finds a node that
  moved by asking the DHT: the routes of its contact record, its own
  addresses first, then the relays it names.
* **serving relay** — :data:`SERVING_RELAY`: the relay of the ``serve`` this
  code runs in, as :class:`ServingRelay`: how that node is dialled from its
  own host, and which friends hold a reservation at it now. A friend that
  holds one is reached through it first, with no lookup (its contact
  record may not have reached the DHT yet, or the DHT may be gone). A relay
  a contact record names may be this very node; its published address is
  the router's, which a home's own router seldom loops back to it, so that
  route goes to the local one instead.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Awaitable, Callable

import attrs

from p2pbackup.app.home import Home
from p2pbackup.dht import adapter as dht
from p2pbackup.dht import records
from p2pbackup.dht.discovery import SERVING_NODE, FriendContact, Remembered, lookup_contact
from p2pbackup.engine.index import Index
from p2pbackup.errors import P2PBackupError
from p2pbackup.model import PEER_KIND_NODE
from p2pbackup.net.network import Address, Network
from p2pbackup.wire.relay import Route

log = logging.getLogger(__name__)


@attrs.frozen
class ServingRelay:
    """The serving node's relay, as its own commands reach it."""

    #: The node's own route: its local address, its node id as the relay.
    route: Route
    #: The friends holding a reservation at it now.
    reserved: Callable[[], frozenset[bytes]]


#: The serving node's relay (module docstring); None outside ``serve``.
SERVING_RELAY: contextvars.ContextVar[ServingRelay | None] = contextvars.ContextVar(
    "p2pbackup_serving_relay", default=None
)


def remembered(home: Home) -> Remembered | None:
    """What ``home`` remembers of the DHT; None for a home not initialised."""
    if not home.exists():
        return None
    return Remembered(home.node_id(), home.dht_state_path)


def home_friends(home: Home) -> list[FriendContact]:
    """The home's friends as discovery needs them (read afresh each time, so
    a friend added while the node runs is followed from the next refresh)."""
    try:
        index = Index(home.index_path, create=False)
    except P2PBackupError as error:
        log.warning("cannot read the friend list: %s", error)
        return []
    try:
        friends = index.friends()
    finally:
        index.close()
    contacts = []
    for friend in friends:
        addresses = []
        for text in friend.addresses:
            try:
                addresses.append(Address.parse(text, allow_port_zero=False))
            except P2PBackupError:
                log.warning("friend %s has an unusable address %r", friend.node_id.hex(), text)
        contacts.append(FriendContact(friend.node_id, tuple(addresses)))
    return contacts


def home_root_holders(home: Home) -> list[records.RecordAddress]:
    """Where the home's root record is kept, as its root pointer says: the
    addresses of its storage nodes (every peer gets the root record), friends
    first (they also keep the pointer alive); addresses that cannot go into
    a record (a wildcard, a malformed one) are left out."""
    try:
        index = Index(home.index_path, create=False)
    except P2PBackupError as error:
        log.warning("cannot read the peer list: %s", error)
        return []
    try:
        peers = index.peers()
        friends = {friend.node_id.hex() for friend in index.friends()}
    finally:
        index.close()
    holders: list[records.RecordAddress] = []
    for peer in sorted(peers, key=lambda p: p.peer_id not in friends):
        if peer.kind != PEER_KIND_NODE:
            continue
        try:
            address = Address.parse(peer.location, allow_port_zero=False)
            if dht.is_wildcard(address.host):
                continue
            holder = records.RecordAddress.from_host_port(address.host, address.port)
        except P2PBackupError:
            continue
        if holder not in holders:
            holders.append(holder)
    return holders[: records.MAX_ADDRESSES]


def dht_locator(home: Home, network: Network) -> Callable[[bytes], Awaitable[list[Route]]]:
    """A :data:`~p2pbackup.stores.remote.Locator` that asks the DHT: through the
    serving node (:data:`SERVING_NODE`) when there is one, else with a
    read-only lookup per node; each answer remembered for the life of the
    locator. A node holding a reservation at the serving node's own relay
    is reached there, with no lookup (:data:`SERVING_RELAY`)."""
    found: dict[bytes, list[Route]] = {}

    async def locate(node_id: bytes) -> list[Route]:
        relay = SERVING_RELAY.get()
        if relay is not None and node_id in relay.reserved():
            return [relay.route]
        if node_id not in found:
            serving = SERVING_NODE.get()
            if serving is not None:
                record = await serving.find_contact(node_id)
            else:
                record = await lookup_contact(
                    remembered(home), node_id, network=network, friends=home_friends(home)
                )
            myself = relay.route if relay is not None else None
            found[node_id] = [] if record is None else contact_routes(record, myself)
        return found[node_id]

    return locate


def contact_routes(record: records.ContactRecord, myself: Route | None = None) -> list[Route]:
    """How to reach the node of ``record``: its own addresses, then its relays;
    a relay that is ``myself`` (the serving route) is dialled where it listens."""
    direct = [Route(Address(a.host, a.port)) for a in record.addresses]
    relayed = [
        myself
        if myself is not None and r.node_id == myself.relay
        else Route(Address(r.address.host, r.address.port), r.node_id)
        for r in record.relays
    ]
    return direct + relayed
