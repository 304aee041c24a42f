"""A home node behind a router: its port mapped, its reachability known.

Nouns:

* **reachability role** — :func:`keep_reachable`, one of ``serve``'s roles.
  When the node has a router to ask (a default gateway, and a listening
  address that is not loopback), it keeps its port mapped for TCP and UDP
  (:func:`p2pbackup.net.portmap.keep_ports_mapped`, unless
  ``serve --no-port-mapping``), puts the public address the router gave in
  front of its contact record's addresses, and after each mapping round asks
  a friend to dial it back (:mod:`p2pbackup.node.reachability`). The verdict
  is logged and kept on the **board** for ``status``.
  The **board** it keeps them on is
  :class:`p2pbackup.node.reachability.ReachabilityBoard`.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from collections.abc import Callable, Sequence

import attrs
import trio

from p2pbackup.app.home import Home
from p2pbackup.app.homedht import home_friends
from p2pbackup.dht import records
from p2pbackup.dht.discovery import Discovery
from p2pbackup.errors import FormatError
from p2pbackup.net.network import Address, Network
from p2pbackup.net.portmap import (
    RENEW_EVERY,
    AnyMapper,
    MappingOutcome,
    find_gateway,
    keep_ports_mapped,
)
from p2pbackup.node.reachability import Reachability, ReachabilityBoard, check_reachability
from p2pbackup.wire.session import Identity

log = logging.getLogger(__name__)

#: Seconds before asking friends again when none answered the dial-back.
RETRY_UNKNOWN = 120.0
#: Longest wait for the contact record with the addresses to check to be
#: published: a friend dials only addresses it finds there (or the host the
#: asker's connection comes from).
PUBLISH_WAIT = 20.0


def has_router(listen: Address, network: Network) -> str | None:
    """The gateway to ask, or None: no router, or a node only this machine reaches."""
    try:
        if ipaddress.ip_address(listen.host).is_loopback:
            return None
    except ValueError:
        if listen.host == "localhost":
            return None
    return find_gateway(network)


def _merged(
    mapped: Address | None, base: Sequence[records.RecordAddress]
) -> list[records.RecordAddress]:
    """The public address first (friends outside try it first), then the rest."""
    merged: list[records.RecordAddress] = []
    if mapped is not None:
        try:
            merged.append(records.RecordAddress.from_host_port(mapped.host, mapped.port))
        except FormatError as error:
            log.warning("port mapping: cannot publish %s: %s", mapped, error)
    merged.extend(a for a in base if a not in merged)
    return merged[: records.MAX_ADDRESSES]


async def keep_reachable(
    home: Home,
    network: Network,
    identity: Identity,
    discovery: Discovery,
    gateway: str,
    port: int,
    board: ReachabilityBoard,
    *,
    port_mapping: bool = True,
    publish_addresses: Callable[[Sequence[records.RecordAddress]], None] = lambda _: None,
) -> None:
    """The reachability role (see the module docstring), until cancelled."""
    base = discovery.advertised
    send, receive = trio.open_memory_channel[MappingOutcome](math.inf)

    def mapped(outcome: MappingOutcome) -> None:
        board.mapped = outcome.external
        addresses = _merged(outcome.external, base)
        if tuple(addresses) != discovery.advertised:
            discovery.readvertise(addresses)
            publish_addresses(addresses)
        send.send_nowait(outcome)

    async with trio.open_nursery() as nursery:
        # With mapping, each round follows the router's answer; without, the
        # first comes at once.
        wait = math.inf
        if port_mapping:
            nursery.start_soon(keep_ports_mapped, AnyMapper(network, gateway), port, mapped)
        else:
            wait = 0.0
        outcome: MappingOutcome | None = None
        while True:
            with trio.move_on_after(wait):
                outcome = await receive.receive()
            await _published(discovery)
            verdict = await _check(home, network, identity, discovery, outcome)
            board.tell(verdict)
            level = logging.INFO if verdict.reachable_at else logging.WARNING
            log.log(level, "%s", verdict.describe())
            # A new mapping round brings the next check sooner.
            wait = RENEW_EVERY if verdict.checked else RETRY_UNKNOWN


async def _published(discovery: Discovery) -> None:
    """Wait (a while) until the DHT took a contact record with the addresses
    now advertised."""
    with trio.move_on_after(PUBLISH_WAIT):
        while not (
            discovery.contact_taken
            and discovery.contact is not None
            and discovery.contact.addresses == discovery.advertised
        ):
            await trio.sleep(0.5)


async def _check(
    home: Home,
    network: Network,
    identity: Identity,
    discovery: Discovery,
    outcome: MappingOutcome | None,
) -> Reachability:
    friends = []
    for friend in home_friends(home):
        record = discovery.followed.get(friend.node_id)
        found = [Address(a.host, a.port) for a in record.addresses] if record else []
        friends.append((friend.node_id, [*found, *(a for a in friend.addresses if a not in found)]))
    addresses = [Address(a.host, a.port) for a in discovery.advertised]
    failure = outcome.reason if outcome is not None else None
    return await check_reachability(network, identity, addresses, friends, mapping_failure=failure)


@attrs.define
class PublishedAddresses:
    """The addresses in a node's contact record, for the dial-back service:
    the record this node follows (friends), else a DHT lookup. Empty until
    the node's discovery is there (:attr:`discovery` is set once it is)."""

    discovery: Discovery | None = None

    async def __call__(self, node_id: bytes) -> list[Address]:
        if self.discovery is None:
            return []
        record = self.discovery.followed.get(node_id)
        if record is None:
            record = await self.discovery.node.find_contact(node_id)
        return [] if record is None else [Address(a.host, a.port) for a in record.addresses]
