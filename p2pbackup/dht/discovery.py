"""Discovery: what a node does in the DHT, and short-lived lookups for the CLI.

Nouns:

* **discovery** — :class:`Discovery`, the DHT role of a running node: it joins
  the DHT (through explicit bootstrap addresses, its friends' addresses and
  the neighbours it remembered), publishes its contact record, and every
  **refresh period** refreshes lonely buckets, follows its friends and saves
  its routing state; it publishes its records again every **republish
  period** (at most half their lifetime), and at once when they change. A
  record that no node took is published again after a **backoff** (30 s,
  doubled each time, at most a refresh period); a step that fails is logged
  and comes again at its next time, so nothing here ends the node.
* **relays** — the friends this node holds a relay reservation at
  (:meth:`Discovery.set_relays`), published in its contact record; and a
  node reached through relays sits behind NAT, so with
  :attr:`DiscoveryOptions.keepalive` set it pings its DHT neighbours that
  often, to keep its UDP mapping open.
* **friend** — here, only what discovery needs of one: a node id and the
  addresses on record (:class:`FriendContact`).
* **followed contacts** — the newest contact record found for each friend;
  a friend that moved is found at its new address within one refresh period.
  Following costs one ping while the friend **answers** where its record
  says (before its first lookup, where the friend list says): it then keeps
  its own records published. Its record is looked up again after
  :data:`FOLLOW_RECHECK` all the same, and at once when it stops answering.
  A friend that stays **silent** (asleep, away, lost) is looked up again
  after a backoff: a refresh period, doubled each time, at most
  :data:`FOLLOW_RECHECK`.
* **root pointer** — the signed DHT record that says where this home's root
  record is kept: the addresses of up to eight of its storage nodes (the
  **root holders**, friends first). A node publishes it when the holders change and
  every republish period, for :data:`DEFAULT_ROOT_POINTER_LIFETIME`; its
  friends store it again, unchanged, on the nodes now closest to its key
  whenever they find it silent (one search for the nodes closest to its key
  finds it and stores it: :meth:`dht.DhtNode.keep`), so it outlives the home
  it points for — a house that burned down is recovered with ``recover
  --bootstrap`` for two weeks after its node last ran. A silent friend found
  to have no pointer (most homes back nothing up) is not asked for one again
  until it has answered, or :data:`FOLLOW_RECHECK` has passed. DHT nodes
  hold records in memory only, so a friend also **keeps** the newest
  pointer it found on disk, with its routing state, and stores that again
  when the DHT has lost it (after a night in which every machine of a
  circle was off).
  :func:`lookup_root_pointer` finds it; :func:`node_at` learns who answers at
  an address, since a pointer names addresses, not nodes.
* **one-shot lookup** — :func:`lookup_contact`: a read-only DHT client
  (:data:`dht.READ_ONLY_ID`, kept out of others' routing tables) on a free
  port, for a command that needs one answer and then exits; it joins through
  what the home **remembered** (:class:`Remembered`) besides what it is given.

What a home's index says (its friends, its storage nodes) is read above this
layer (:mod:`p2pbackup.app.homedht`) and handed in.

Everything that touches the world is passed in: the network, the clock, the
friend list, so the simulator runs the same code as ``p2pbackup serve``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import ipaddress
import logging
import math
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Final

import attrs
import trio

from p2pbackup.dht import adapter as dht
from p2pbackup.dht import records
from p2pbackup.errors import (
    FormatError,
    IntegrityError,
    PeerUnavailableError,
    ProtocolError,
    UsageError,
)
from p2pbackup.net.network import BOTH_FAMILIES, Address, Network, TcpNetwork
from p2pbackup.wire.session import Identity, secure_initiator

log = logging.getLogger(__name__)

#: How often a node refreshes its routing table and follows its friends.
DEFAULT_REFRESH_PERIOD: Final = 3600.0
#: How often a node publishes its records again when they did not change
#: (they go out at once when they do): a contact record then gets four
#: chances in its lifetime. Kademlia's nodes hold what they store for the
#: record's lifetime; hourly republishing only multiplied the stores.
DEFAULT_REPUBLISH_PERIOD: Final = 6 * 3600.0
#: How long a friend that answers at its address is trusted to be the one
#: its followed contact record describes, before the record is looked up
#: again (half a contact record's lifetime); the longest backoff for a
#: friend that stays silent.
FOLLOW_RECHECK: Final = 12 * 3600.0
#: How long a contact record lives: several refresh periods, so one missed
#: republish (a reboot, a short outage) does not make the node unfindable.
DEFAULT_CONTACT_LIFETIME: Final = 24 * 3600
#: How long a root pointer lives after its home last published it: long
#: enough for a user who lost their machine to get a new one, short enough
#: that a pointer to long-gone holders does not linger (records allow 30 days).
DEFAULT_ROOT_POINTER_LIFETIME: Final = 14 * 24 * 3600
#: How often a running node saves its routing state.
STATE_SAVE_PERIOD: Final = 300.0
#: Seconds to wait for a node at a root pointer's address to finish a handshake.
NODE_AT_TIMEOUT: Final = 10.0


@attrs.frozen
class FriendContact:
    """A friend as discovery sees it: who, and where it was last known to be."""

    node_id: bytes
    addresses: tuple[Address, ...] = ()


@attrs.frozen
class DiscoveryOptions:
    refresh_period: float = DEFAULT_REFRESH_PERIOD
    #: Seconds between publishing unchanged records (at most half their lifetime).
    republish_period: float = DEFAULT_REPUBLISH_PERIOD
    contact_lifetime: int = DEFAULT_CONTACT_LIFETIME
    #: DHT nodes to join through, besides friends and remembered neighbours.
    bootstrap: tuple[Address, ...] = ()
    #: Bytes of storage offered to others, published in the contact record.
    storage_offered: int = 0
    root_pointer_lifetime: int = DEFAULT_ROOT_POINTER_LIFETIME
    #: Seconds between pings to the DHT neighbours (None: none beyond the
    #: DHT's own traffic); for a node behind NAT.
    keepalive: float | None = None
    dht: dht.DhtOptions = attrs.Factory(dht.DhtOptions)


def _no_friends() -> list[FriendContact]:
    return []


def _no_holders() -> list[records.RecordAddress]:
    return []


class Discovery:
    """The DHT role of one running node (see the module docstring)."""

    def __init__(
        self,
        node: dht.DhtNode,
        identity: Identity,
        advertised: Sequence[records.RecordAddress],
        *,
        options: DiscoveryOptions = DiscoveryOptions(),
        friends: Callable[[], Sequence[FriendContact]] = _no_friends,
        root_holders: Callable[[], Sequence[records.RecordAddress]] = _no_holders,
        state_path: Path | None = None,
    ) -> None:
        if not advertised:
            raise UsageError("a node must publish at least one address")
        self.node = node
        self.identity = identity
        self.advertised = tuple(advertised)
        self.options = options
        self.friends = friends
        self.root_holders = root_holders
        self.state_path = state_path
        #: The routing state last written to ``state_path`` (None: none yet),
        #: and the neighbours and kept records it was made of.
        self._saved_state: bytes | None = None
        self._saved_from: tuple[tuple[dht.Contact, ...], tuple[bytes, ...]] = ((), ())
        self.contact: records.ContactRecord | None = None
        self.contact_taken = False
        self.relays: tuple[records.RelayAddress, ...] = ()
        self.root_pointer: records.RootPointer | None = None
        self.root_pointer_taken = False
        self._holders_may_have_changed = Nudge()
        self._joined = Nudge()
        #: Friend node id → the newest contact record found for it.
        self.followed: dict[bytes, records.ContactRecord] = {}
        #: Friend node id → when (trio time) its record was last looked up.
        self._looked_up: dict[bytes, float] = {}
        #: Friend node id → lookups in a row that found it silent, and when
        #: the next lookup is due.
        self._silent: dict[bytes, tuple[int, float]] = {}
        #: Friend node id → when its root pointer was last stored again, or
        #: found to be nowhere (then also in ``_no_pointer``).
        self._pointer_stored: dict[bytes, float] = {}
        #: Friends found silent without a root pointer, in the DHT or kept:
        #: only the friend can publish one, and it answers when it is back.
        self._no_pointer: set[bytes] = set()
        #: When friends were first followed (trio time).
        self._started: float | None = None
        #: Friend node id → the newest root pointer found for it, encoded:
        #: saved with the routing state, so it outlives a night in which
        #: every node of the DHT was off (they hold records in memory only).
        self.kept_pointers: dict[bytes, bytes] = {}
        if state_path is not None:
            for value in dht.read_routing_state(state_path, node.node_id)[1]:
                with contextlib.suppress(FormatError):
                    self.kept_pointers[records.decode_record(value).node_id] = value

    def _join_addresses(self) -> list[Address]:
        addresses = list(self.options.bootstrap)
        for friend in self.friends():
            addresses.extend(friend.addresses)
        if self.state_path is not None:
            saved = dht.load_routing_state(self.state_path, self.node.node_id)
            addresses.extend(contact.address for contact in saved)
        return addresses

    async def join(self) -> int:
        """Bootstrap; the number of contacts known afterwards."""
        known = await self.node.bootstrap(self._join_addresses())
        if not known:
            log.warning("DHT: no other node answered; this node is alone for now")
        return known

    def readvertise(self, addresses: Sequence[records.RecordAddress]) -> None:
        """Publish these addresses from now on (the router mapped a port, or
        stopped): the contact record goes out again at once."""
        if not addresses:
            raise UsageError("a node must publish at least one address")
        if tuple(addresses) != self.advertised:
            self.advertised = tuple(addresses)
            self._joined.set(force=True)

    async def publish(self) -> records.ContactRecord:
        """Sign and publish a fresh contact record (a higher sequence each
        time); :attr:`contact_taken` says whether any node took it."""
        now = self.node.wall_clock()
        previous = self.contact.sequence if self.contact is not None else 0
        self.contact = records.sign_contact(
            self.identity.signing_seed,
            addresses=self.advertised,
            relays=self.relays,
            storage_offered=self.options.storage_offered,
            sequence=next_sequence(previous, now),
            now=math.floor(now),
            lifetime=self.options.contact_lifetime,
        )
        self.contact_taken = await self.node.publish(self.contact)
        return self.contact

    def set_relays(self, relays: Sequence[records.RelayAddress]) -> None:
        """The relays this node can be reached through now: the contact
        record naming them is published at once."""
        self.relays = tuple(relays)[: records.MAX_RELAYS]
        # The contact record's nudge: a new record goes out now.
        self._joined.set()

    async def keep_mappings_open(self, period: float) -> None:
        """Ping the DHT neighbours every ``period`` seconds, until cancelled:
        behind NAT, the UDP mapping stays open and requests keep reaching
        this node."""
        while True:
            await trio.sleep(period)
            await _survive("pinging DHT neighbours", self.node.ping_neighbours)

    async def publish_root_pointer(self) -> records.RootPointer | None:
        """Sign and publish a fresh root pointer to the current root holders;
        None (and nothing published) while there are none.
        :attr:`root_pointer_taken` says whether any node took it."""
        holders = tuple(self.root_holders())[: records.MAX_ADDRESSES]
        if not holders:
            return None
        now = self.node.wall_clock()
        previous = self.root_pointer.sequence if self.root_pointer is not None else 0
        self.root_pointer = records.sign_root_pointer(
            self.identity.signing_seed,
            addresses=holders,
            sequence=next_sequence(previous, now),
            now=math.floor(now),
            lifetime=self.options.root_pointer_lifetime,
        )
        self.root_pointer_taken = await self.node.publish(self.root_pointer)
        return self.root_pointer

    def root_holders_may_have_changed(self) -> None:
        """A hint (after a command or a backup changed the peers): the root
        pointer is published again at once if its holders changed."""
        self._holders_may_have_changed.set()

    async def _publish_contact(self) -> bool:
        await self.publish()
        return self.contact_taken

    async def _publish_root_pointer(self) -> bool:
        return await self.publish_root_pointer() is None or self.root_pointer_taken

    def _holders_changed(self) -> bool:
        holders = tuple(self.root_holders())[: records.MAX_ADDRESSES]
        published = self.root_pointer.addresses if self.root_pointer is not None else ()
        return holders != published

    async def _keep_published(
        self,
        what: str,
        publish: Callable[[], Awaitable[bool]],
        nudge: Nudge,
        needed: Callable[[], bool] = lambda: True,
        *,
        lifetime: float,
    ) -> None:
        """Publish a record now, when ``nudge`` is set and ``needed()`` (or
        forced), and every republish period (at most half the record's
        ``lifetime``) to push its expiry on. When no node takes it, or
        publishing fails, try again after a backoff (:func:`retry_delay`, at
        most a refresh period). A node alone keeps its records itself, which
        counts as published: the nudge after it joins again spreads them."""
        republish = min(self.options.republish_period, lifetime / 2)
        period = self.options.refresh_period
        due = trio.current_time()
        failures = 0
        while True:
            forced = await nudge.wait_until(due)
            failure: Exception | None = None
            try:
                if trio.current_time() < due and not (forced or needed()):
                    continue
                taken = await publish()
            except Exception as error:  # trio.Cancelled is not one: it passes
                taken, failure = False, error
            if taken:
                failures = 0
                due = trio.current_time() + republish
                continue
            failures += 1
            delay = retry_delay(failures, most=period)
            due = trio.current_time() + delay
            then = f"trying again in {delay:.0f} s"
            if failure is None:
                log.warning("DHT: no node took this node's %s; %s", what, then)
            else:
                dht.log_failure(log, f"publishing this node's {what}", failure, then=then)

    async def follow_friends(self) -> None:
        """Follow every friend: remember the newest contact record of each
        (module docstring: a friend that answers costs a ping).

        A silent friend's root pointer is stored again, as it is, on the
        nodes now closest to its key (at most every :data:`FOLLOW_RECHECK`):
        the nodes that took it may have left, and a friend whose machine is
        lost cannot publish it any more. One that answers publishes its own.
        """
        now = trio.current_time()
        if self._started is None:
            self._started = now
        friends = self.friends()
        current = {friend.node_id for friend in friends}
        # Pointers of former friends go; none when the list came back empty
        # (an index that could not be read must not cost what was kept).
        for gone in [
            node_id for node_id in self.kept_pointers if current and node_id not in current
        ]:
            del self.kept_pointers[gone]
        for friend in friends:
            node_id = friend.node_id
            known = self.followed.get(node_id)
            # Where it should answer: as its record says, or before any
            # lookup, as the friend list says (its invite's addresses).
            where = _where(known.addresses if known is not None else friend.addresses)
            answered: bool | None = None  # not asked
            if where and now < self._looked_up.get(node_id, self._started) + FOLLOW_RECHECK:
                answered = await self._answers(node_id, where)
                if answered:
                    self._back(node_id)
                    continue
            silent, due = self._silent.get(node_id, (0, -math.inf))
            if now < due:
                continue
            record = await self.node.find_contact(node_id)
            self._looked_up[node_id] = now
            if record is not None:
                self.followed[node_id] = record
                found = _where(record.addresses)
                if not (found == where and answered is False) and await self._answers(
                    node_id, found
                ):
                    self._back(node_id)
                    continue
            silent += 1
            delay = retry_delay(silent, first=self.options.refresh_period, most=FOLLOW_RECHECK)
            self._silent[node_id] = (silent, now + delay)
            if now < self._pointer_stored.get(node_id, -math.inf) + FOLLOW_RECHECK:
                continue  # stored again lately: it lives for days
            await self._keep_pointer(node_id)

    def _back(self, node_id: bytes) -> None:
        """``node_id`` answers: it is not silent, and may have published a
        root pointer since it was last found to have none."""
        self._silent.pop(node_id, None)
        if node_id in self._no_pointer:
            self._no_pointer.discard(node_id)
            self._pointer_stored.pop(node_id, None)

    async def _keep_pointer(self, node_id: bytes) -> None:
        """Store a silent friend's root pointer again: the newest of the
        DHT's and the one kept on disk, which is kept from now on. A friend
        that has none is not looked up again for it while it stays silent
        (most nodes of a network back nothing up, and so publish none),
        until :data:`FOLLOW_RECHECK` has passed."""
        kept = [self.kept_pointers[node_id]] if node_id in self.kept_pointers else []
        pointer = await self.node.keep(records.RecordKind.ROOT, node_id, kept)
        if pointer is None:
            self.kept_pointers.pop(node_id, None)  # expired, or never found
            self._no_pointer.add(node_id)
            self._pointer_stored[node_id] = trio.current_time()
            return
        self._no_pointer.discard(node_id)
        self.kept_pointers[node_id] = records.encode_record(pointer)
        self._pointer_stored[node_id] = trio.current_time()

    async def _answers(self, node_id: bytes, where: Sequence[Address]) -> bool:
        """Whether ``node_id`` answers a ping at one of ``where``."""
        for address in where:
            if await self.node.ping(address) == node_id:
                return True
        return False

    def save_state(self) -> None:
        if self.state_path is None:
            return
        kept = tuple(self.kept_pointers.values())
        saving = (tuple(self.node.neighbours()), kept)
        if self._saved_state is not None and saving == self._saved_from:
            return  # as last saved: not even encoded again (every few minutes, on every node)
        try:
            self._saved_state = dht.save_routing_state(
                self.state_path, self.node, self._saved_state, kept
            )
        except OSError as error:
            log.warning("cannot save the DHT routing state to %s: %s", self.state_path, error)
            return
        self._saved_from = saving

    async def _keep_saving_state(self) -> None:
        """Save the routing state now and every few minutes: the CLI's
        lookups start from it, and a node that was alone when it started
        (the first of a network) learns its neighbours only later."""
        while True:
            try:
                self.save_state()
            except Exception as error:
                dht.log_failure(log, "saving the routing state", error, then="going on")
            await trio.sleep(min(STATE_SAVE_PERIOD, self.options.refresh_period))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Join, publish, then refresh every period until cancelled. Reports
        started at once: joining waits on addresses that may never answer.

        Nothing that fails in here ends the node: a step that raises is
        logged and comes again at its next time (publishing, sooner).
        """
        task_status.started()
        try:
            await _survive("joining the DHT", self.join)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    functools.partial(
                        self._keep_published,
                        "contact record",
                        self._publish_contact,
                        self._joined,
                        lifetime=self.options.contact_lifetime,
                    )
                )
                nursery.start_soon(
                    functools.partial(
                        self._keep_published,
                        "root pointer",
                        self._publish_root_pointer,
                        self._holders_may_have_changed,
                        self._holders_changed,
                        lifetime=self.options.root_pointer_lifetime,
                    )
                )
                nursery.start_soon(self._keep_saving_state)
                if self.options.keepalive is not None:
                    nursery.start_soon(self.keep_mappings_open, self.options.keepalive)
                await _survive("following friends", self.follow_friends)
                while True:
                    await trio.sleep(self.options.refresh_period)
                    if not self.node.contacts():
                        # Everybody we knew went away: start again, and
                        # publish at once to whoever is there now.
                        await _survive("joining the DHT", self.join)
                        self._joined.set()
                        self._holders_may_have_changed.set(force=True)
                    await _survive("refreshing the routing table", self.node.refresh)
                    await _survive("following friends", self.follow_friends)
        finally:
            self.save_state()


def _where(addresses: Sequence[Address | records.RecordAddress]) -> list[Address]:
    return [Address(a.host, a.port) for a in addresses]


#: Seconds before trying again to publish a record that no node took; the
#: wait doubles with each failure in a row, up to the refresh period.
FIRST_RETRY: Final = 30.0


def retry_delay(failures: int, *, first: float = FIRST_RETRY, most: float) -> float:
    """Seconds to wait after ``failures`` (at least one) failed attempts in
    a row: ``first``, doubled after each further failure, at most ``most``."""
    return min(most, first * 2.0 ** min(max(failures, 1) - 1, 64))


class Nudge:
    """A wake-up that may be set any number of times: :meth:`wait_until`
    returns when it is set (and clears it) or at a deadline. A forced nudge
    asks for the work whether or not it looks needed."""

    def __init__(self) -> None:
        self._event = trio.Event()
        self._forced = False

    def set(self, *, force: bool = False) -> None:
        self._forced = self._forced or force
        self._event.set()

    async def wait_until(self, deadline: float) -> bool:
        """Wait until set or ``deadline``; whether a forced nudge came."""
        with trio.move_on_at(deadline):
            await self._event.wait()
        forced, self._forced = self._forced, False
        if self._event.is_set():
            self._event = trio.Event()
        return forced


async def _survive(what: str, step: Callable[[], Awaitable[object]]) -> None:
    """Run one step of a node's DHT role; if it raises, log one clear line
    and go on (``trio.Cancelled`` is not an ``Exception``: it passes)."""
    try:
        await step()
    except Exception as error:
        dht.log_failure(log, what, error, then="trying again at the next refresh")


def next_sequence(previous: int, now: float) -> int:
    """A record sequence number above ``previous``: the wall clock in
    milliseconds, so a node that lost its state (a new machine, a restart)
    still outnumbers every record it signed before."""
    return max(previous + 1, math.floor(now * 1000))


def advertised_addresses(
    listen: Address, port: int, advertise: Sequence[Address] = ()
) -> list[records.RecordAddress]:
    """The addresses to publish for a node listening on ``listen`` (bound to
    ``port``): ``advertise`` if given, else the listening host, else (for a
    wildcard) the address of the interface that routes outwards — for
    ``[::]`` (both families), the IPv4 one and the IPv6 one, where there is
    a route of each."""
    if advertise:
        chosen = list(advertise)
    elif not dht.is_wildcard(listen.host):
        chosen = [Address(listen.host, port)]
    elif listen.host == BOTH_FAMILIES:
        found = [_outward_address(wildcard) for wildcard in ("0.0.0.0", "::")]
        routed = [host for host in found if not ipaddress.ip_address(host).is_loopback]
        chosen = [Address(host, port) for host in routed or found[:1]]
    else:
        chosen = [Address(_outward_address(listen.host), port)]
    try:
        return [records.RecordAddress.from_host_port(a.host, a.port) for a in chosen]
    except FormatError as error:
        raise UsageError(f"cannot publish that address: {error}") from None


def _outward_address(wildcard: str) -> str:
    family = socket.AF_INET6 if ":" in wildcard else socket.AF_INET
    probe = "2001:db8::1" if family == socket.AF_INET6 else "192.0.2.1"
    # Connecting a UDP socket sends nothing; it only asks the kernel for a route.
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((probe, 9))
            return str(sock.getsockname()[0])
    except OSError:  # no route (or no IPv6 at all): only this machine is reachable
        return "::1" if family == socket.AF_INET6 else "127.0.0.1"


@attrs.frozen
class Remembered:
    """What a home remembers of the DHT between runs: its own node id and the
    file where its node saved its neighbours (:func:`dht.save_routing_state`)."""

    node_id: bytes = attrs.field(repr=bytes.hex)
    state_path: Path


@contextlib.asynccontextmanager
async def read_only_client(
    remembered: Remembered | None,
    *,
    bootstrap: Sequence[Address] = (),
    friends: Sequence[FriendContact] = (),
    network: Network | None = None,
    wall_clock: Callable[[], float] = time.time,
) -> AsyncIterator[dht.DhtNode]:
    """A read-only DHT client joined through ``bootstrap``, ``friends`` and
    the neighbours the home's node last knew (``remembered``); :class:`UsageError` if there is
    no way in, :class:`PeerUnavailableError` if nothing answers."""
    network = network if network is not None else TcpNetwork()
    addresses = list(bootstrap)
    for friend in friends:
        addresses.extend(friend.addresses)
    if remembered is not None:
        saved = dht.load_routing_state(remembered.state_path, remembered.node_id)
        addresses.extend(contact.address for contact in saved)
    # A friend is often among the saved neighbours too: ask each address once.
    addresses = list(dict.fromkeys(addresses))
    if not addresses:
        raise UsageError(
            "no way into the DHT: pass --bootstrap HOST:PORT, add a friend, "
            "or run `p2pbackup serve` once so the node remembers its neighbours"
        )
    family_any = "::" if ":" in addresses[0].host else "0.0.0.0"
    async with dht.open_dht(network, Address(family_any, 0), wall_clock=wall_clock) as node:
        if not await node.bootstrap(addresses):
            raise PeerUnavailableError(
                "no DHT node answered at " + ", ".join(str(a) for a in addresses[:5])
            )
        yield node


async def lookup_contact(
    remembered: Remembered | None,
    node_id: bytes,
    *,
    bootstrap: Sequence[Address] = (),
    network: Network | None = None,
    friends: Sequence[FriendContact] = (),
    wall_clock: Callable[[], float] = time.time,
) -> records.ContactRecord | None:
    """The newest valid contact record of ``node_id`` in the DHT, or None
    (joined as :func:`read_only_client` joins)."""
    async with read_only_client(
        remembered, bootstrap=bootstrap, friends=friends, network=network, wall_clock=wall_clock
    ) as node:
        return await node.find_contact(node_id)


async def find_storage_nodes(
    remembered: Remembered,
    *,
    count: int,
    friends: Sequence[FriendContact] = (),
    bootstrap: Sequence[Address] = (),
    network: Network | None = None,
    wall_clock: Callable[[], float] = time.time,
) -> list[records.ContactRecord]:
    """Open mode: up to ``count`` nodes that offer storage to anyone, the
    ones closest in the DHT to this home's own key (so a home asks the same
    ones each time), with their newest valid contact records. Strangers: the
    caller decides whether to trust them."""
    own = remembered.node_id
    async with read_only_client(
        remembered,
        bootstrap=bootstrap,
        friends=friends,
        network=network,
        wall_clock=wall_clock,
    ) as node:
        key = records.dht_key(records.RecordKind.CONTACT, own)
        candidates = [c for c in await node.closest_nodes(key) if c.node_id != own]
        offering: dict[bytes, records.ContactRecord] = {}

        async def fetch(node_id: bytes) -> None:
            record = await node.find_contact(node_id)
            if record is not None and record.storage_offered > 0:
                offering[node_id] = record

        async with trio.open_nursery() as lookups:
            for contact in candidates:
                lookups.start_soon(fetch, contact.node_id)
    # Closest first, as the DHT ranked them.
    return [offering[c.node_id] for c in candidates if c.node_id in offering][:count]


#: The DHT node of the ``serve`` this code runs in, if any. Commands the
#: daemon runs for the CLI look nodes up through it: it is joined already, and
#: knows the network better than a client joined for one lookup.
SERVING_NODE: contextvars.ContextVar[dht.DhtNode | None] = contextvars.ContextVar(
    "p2pbackup_serving_dht_node", default=None
)


async def lookup_root_pointer(
    remembered: Remembered | None,
    node_id: bytes,
    *,
    bootstrap: Sequence[Address] = (),
    network: Network | None = None,
    wall_clock: Callable[[], float] = time.time,
) -> records.RootPointer | None:
    """The newest valid root pointer of ``node_id`` in the DHT, or None
    (joined as :func:`read_only_client` joins)."""
    async with read_only_client(
        remembered, bootstrap=bootstrap, network=network, wall_clock=wall_clock
    ) as node:
        record = await node.lookup(records.RecordKind.ROOT, node_id)
    assert record is None or isinstance(record, records.RootPointer)
    return record


async def node_at(
    network: Network, identity: Identity, address: Address, *, timeout: float = NODE_AT_TIMEOUT
) -> bytes:
    """The node id of whoever answers at ``address``, proven in a handshake
    (and the connection closed); :class:`PeerUnavailableError` if nobody does.

    For a root pointer's addresses: whoever is there proves who it is, and
    the root record it hands over proves itself (signed and sealed by the
    owner), so an address taken over by someone else costs a try, no more.
    """
    try:
        with trio.fail_after(timeout):
            stream = await network.connect(address)
            secure = await secure_initiator(stream, identity)
            await secure.aclose()
    except trio.TooSlowError:
        raise PeerUnavailableError(f"{address}: no answer within {timeout:g} s") from None
    except (ProtocolError, IntegrityError, trio.BrokenResourceError) as error:
        raise PeerUnavailableError(f"{address}: handshake failed: {error}") from None
    return secure.remote_node_id
