"""The node: the composition root that wires a home to the network.

Nouns:

* **node** — one home seen from the network: its identity (from the master
  secret), its shard host (the shards it keeps for peers, under
  ``HOME/hosted``) and the storage server answering peers on a listening
  address.
* **serve options** — :class:`ServeOptions`: where to listen and how much
  space to give. Sizes are bytes; None means no limit beyond the disk.
* **DHT role** — the node also takes part in the Kademlia DHT on UDP at the
  same host and port as its TCP listener (:mod:`p2pbackup.discovery`): it
  publishes its contact record there and follows its friends.

Everything below is passed in — the network above all — so that tests and the
simulator run this same code over an in-memory network.
"""

from __future__ import annotations

import functools
import logging

import attrs
import trio

from p2pbackup import dht
from p2pbackup.discovery import (
    DEFAULT_REFRESH_PERIOD,
    Discovery,
    DiscoveryOptions,
    FriendContact,
    advertised_addresses,
)
from p2pbackup.errors import P2PBackupError
from p2pbackup.home import Home
from p2pbackup.index import Index
from p2pbackup.keys import Keyring
from p2pbackup.net import Address, Network, TcpNetwork
from p2pbackup.server import StorageServer
from p2pbackup.session import Identity
from p2pbackup.shardhost import ReconcileReport, ShardHost

log = logging.getLogger(__name__)

#: Port a node listens on unless told otherwise.
DEFAULT_PORT = 47470
#: How often shards whose lease ran out are deleted.
EXPIRY_INTERVAL = 3600.0


#: Every interface, the default port.
DEFAULT_LISTEN = Address("0.0.0.0", DEFAULT_PORT)


@attrs.frozen
class ServeOptions:
    listen: Address = DEFAULT_LISTEN
    capacity: int | None = None
    owner_quota: int | None = None
    #: DHT nodes to join through, besides friends and remembered neighbours.
    bootstrap: tuple[Address, ...] = ()
    #: Addresses published in the contact record; empty: worked out from ``listen``.
    advertise: tuple[Address, ...] = ()
    #: Seconds between DHT refreshes (republish, follow friends).
    refresh_period: float = DEFAULT_REFRESH_PERIOD


@attrs.frozen
class Serving:
    """What a started node reports: who it is, where it listens, what it found."""

    node_id: bytes
    address: Address
    reconciled: ReconcileReport
    #: Addresses in the contact record (what `invite` hands out).
    advertised: tuple[str, ...] = ()
    discovery: Discovery | None = None


def node_identity(home: Home) -> Identity:
    """The identity a home presents to its peers."""
    return Identity.from_keyring(Keyring.from_master_secret(home.load_secret()))


async def serve(
    home: Home,
    options: ServeOptions,
    *,
    network: Network | None = None,
    task_status: trio.TaskStatus[Serving] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Store shards for peers until cancelled."""
    network = network if network is not None else TcpNetwork()
    home.require()
    with home.serving():
        identity = node_identity(home)
        host = await trio.to_thread.run_sync(
            functools.partial(
                ShardHost.open,
                home.hosted_path,
                capacity=options.capacity,
                owner_quota=options.owner_quota,
            )
        )
        try:
            server = StorageServer(host, identity)
            async with trio.open_nursery() as nursery:
                address = await nursery.start(
                    network.serve, options.listen, server.handle_connection
                )
                nursery.start_soon(_collect_expired, host)
                advertised = advertised_addresses(options.listen, address.port, options.advertise)
                # UDP on the TCP port: one address (and one firewall rule) per node.
                dht_address = Address(options.listen.host, address.port)
                async with dht.open_dht(network, dht_address, node_id=identity.node_id) as node:
                    discovery = Discovery(
                        node,
                        identity,
                        advertised,
                        options=DiscoveryOptions(
                            refresh_period=options.refresh_period,
                            bootstrap=options.bootstrap,
                            storage_offered=options.capacity or 0,
                        ),
                        friends=functools.partial(home_friends, home),
                        state_path=home.dht_state_path,
                    )
                    texts = tuple(f"{a.host}:{a.port}" for a in advertised)
                    home.write_addresses(texts)
                    async with trio.open_nursery() as roles:
                        await roles.start(discovery.run)
                        task_status.started(
                            Serving(
                                identity.node_id,
                                address,
                                host.reconcile_report,
                                texts,
                                discovery,
                            )
                        )
        finally:
            host.close()


def home_friends(home: Home) -> list[FriendContact]:
    """The home's friends as discovery needs them (read afresh each time, so
    a friend added while the node runs is followed from the next refresh)."""
    try:
        index = Index(home.index_path)
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


async def _collect_expired(host: ShardHost) -> None:
    while True:
        removed = await trio.to_thread.run_sync(host.collect_expired)
        if removed:
            log.info("removed %d shards whose lease expired", removed)
        await trio.sleep(EXPIRY_INTERVAL)
