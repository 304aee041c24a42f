"""A serving node reached through relays: reservations at reachable friends.

Nouns:

* **relays role** — :func:`keep_relays`: for a node that cannot be dialled
  (``serve --via-relays``), hold a reservation
  (:func:`~p2pbackup.wire.relay.hold_reservation`) at up to
  :data:`~p2pbackup.dht.records.MAX_RELAYS` friends, trying each friend's
  addresses in turn; every circuit a relay announces is served by the
  node's storage server, as a connection dialled in would be. The friends
  held are the node's **relays**: each change is handed to ``on_change``
  (discovery publishes them in the contact record). A reservation lost is
  replaced, by the same friend or another, at the next try.
* **relays when unreachable** — :func:`relay_while_unreachable`: a node
  not started with ``--via-relays`` holds relays only while its
  reachability check says no friend can dial it (its router maps nothing
  and no port is forwarded), and drops them when a later check finds it
  reachable; meanwhile it keeps its DHT's NAT mapping open with pings.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import trio

from p2pbackup.dht.discovery import FriendContact
from p2pbackup.dht.records import MAX_RELAYS, RecordAddress, RelayAddress
from p2pbackup.errors import FormatError, PeerUnavailableError
from p2pbackup.net.network import Network, StreamHandler
from p2pbackup.node.reachability import ReachabilityBoard
from p2pbackup.nurseries import unwrap_single
from p2pbackup.wire.relay import Route, hold_reservation
from p2pbackup.wire.session import Identity

log = logging.getLogger(__name__)

#: Seconds between attempts to fill a free relay place.
RETRY: Final = 30.0


async def keep_relays(
    network: Network,
    identity: Identity,
    friends: Callable[[], Sequence[FriendContact]],
    handler: StreamHandler,
    on_change: Callable[[tuple[RelayAddress, ...]], None],
    *,
    count: int = MAX_RELAYS,
    retry: float = RETRY,
) -> None:
    """Hold reservations at up to ``count`` friends until cancelled (see the
    module docstring)."""
    held: dict[bytes, RelayAddress] = {}
    trying: set[bytes] = set()

    def changed() -> None:
        on_change(tuple(held.values()))

    async def hold(friend: FriendContact) -> None:
        try:
            for address in friend.addresses:
                route = Route(address, friend.node_id)
                try:
                    relay = RelayAddress(
                        friend.node_id, RecordAddress.from_host_port(address.host, address.port)
                    )
                    with unwrap_single():
                        async with trio.open_nursery() as nursery:
                            await nursery.start(hold_reservation, network, identity, route, handler)
                            log.info("reachable through relay %s", route)
                            held[friend.node_id] = relay
                            changed()
                except (PeerUnavailableError, FormatError) as error:
                    log.info("no relay at friend %s: %s", route, error)
                finally:
                    if held.pop(friend.node_id, None) is not None:
                        changed()
        finally:
            trying.discard(friend.node_id)

    async with trio.open_nursery() as nursery:
        while True:
            for friend in friends():
                if len(trying) >= count:
                    break
                if friend.node_id in trying or not friend.addresses:
                    continue
                trying.add(friend.node_id)
                nursery.start_soon(hold, friend)
            await trio.sleep(retry)


async def relay_while_unreachable(
    board: ReachabilityBoard,
    relays: Callable[[], Awaitable[None]],
    keep_open: Callable[[], Awaitable[None]],
) -> None:
    """Run ``relays`` (:func:`keep_relays`, bound) and ``keep_open`` (DHT
    keepalives) while ``board`` says the node is unreachable, until
    cancelled (module docstring)."""
    while True:
        while not board.unreachable():
            await board.changed()
        log.info("friends cannot dial this node: reaching it through relays from now on")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relays)
            nursery.start_soon(keep_open)
            while board.unreachable():
                await board.changed()
            nursery.cancel_scope.cancel()
        log.info("friends dial this node directly again: its relays are let go")
