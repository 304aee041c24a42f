"""The direct upgrade: from a session through a relay to a direct connection.

Two homes behind NAT routers reach each other through a relay
(:mod:`p2pbackup.wire.relay`). Most home routers (Linux's MASQUERADE among
them) keep a connection's port when it leaves, and let in an answer from
the address a connection went to. So if both homes dial each other's
public address at the same moment, each from the port it listens on, each
router has seen its own side go out before the other side comes in, and
TCP joins the two attempts into one connection (a **simultaneous open**,
as libp2p's DCUtR and BitTorrent's BEP 55 do). The relayed session is the
rendezvous; the traffic then moves to the direct connection.

Nouns:

* **observed address** — where the world sees this node: the relay tells
  each end of a circuit the address its connection came from
  (``RelayJoined.observed``); its host is the router's public address.
* **offer** — the addresses a node asks its peer to dial: its observed host
  at the port it listens on (a router that keeps ports maps that port
  there). None when it knows no observed address, listens on nothing, or
  its tries with this peer are used up for now.
* **exchange** — the first messages on a session through a relay, before any
  request (the dialler D and the reached node N, both proven to each other
  by the session's handshake): D sends ``DirectConnect(offer)``, N answers
  ``DirectAddresses(offer)``, and D measures that round trip. When both
  offered, D sends ``DirectSync``: N dials at once, D half a round trip
  later, so both attempts cross the routers together.
* **punch** — one side's dialling: from its listening port
  (``Network.connect(local_port=...)``), for at most :data:`PUNCH_WINDOW`
  seconds, again after each refusal. On the connection, a fresh Noise XX
  handshake, D the initiator as on the relayed session; each side checks
  the other proves the same node. N then sends ``DirectReady`` and serves
  the direct session; D, once it has read it, closes the relayed session
  and uses the direct one for everything that follows.
* **tries** — :class:`Tries`: per peer, how many upgrades failed in a row
  and when the next may be tried (:data:`BACKOFF`); after
  :data:`MAX_TRIES` failures a node stops offering to that peer. A failure
  is said in the log in words a person can act on; :meth:`DirectUpgrade.status`
  says which peers are direct.

A router that gives each destination a port of its own (a symmetric NAT,
common on mobile networks and carrier-grade NAT) defeats this: the peer
dials a port the router never opened for it. The session then stays on the
relay, which works as before.
"""

from __future__ import annotations

import contextvars
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from typing import Final

import attrs
import trio

from p2pbackup.errors import (
    IntegrityError,
    PeerIdentityError,
    PeerUnavailableError,
    ProtocolError,
    RemoteProtocolError,
    UsageError,
)
from p2pbackup.model import BytesLike
from p2pbackup.net.network import Address, Network, local_address, peer_address
from p2pbackup.wire import messages
from p2pbackup.wire.rpc import MessageChannel
from p2pbackup.wire.session import Identity, SecureStream, secure_initiator, secure_responder

log = logging.getLogger(__name__)

#: Seconds a punch dials before the upgrade is given up (the handshake on
#: the direct connection gets as long again).
PUNCH_WINDOW: Final = 4.0
#: Seconds between attempts within a punch, after one was refused.
RETRY_AFTER_REFUSAL: Final = 0.2
#: Upgrades that may fail in a row before a node stops offering to a peer.
MAX_TRIES: Final = 3
#: Seconds to wait before the next try after the first, second failure.
BACKOFF: Final = (30.0, 300.0)


# --- tries (pure) --------------------------------------------------------------------------


@attrs.frozen
class Tries:
    """A peer's record of upgrades: failures in a row, when the next may start."""

    failures: int = 0
    next_try: float = 0.0

    def may_try(self, now: float) -> bool:
        return self.failures < MAX_TRIES and now >= self.next_try

    def failed(self, now: float) -> Tries:
        failures = self.failures + 1
        wait = BACKOFF[min(failures, len(BACKOFF)) - 1]
        return Tries(failures, now + wait)

    def describe_next(self, now: float) -> str:
        if self.failures >= MAX_TRIES:
            return f"no more tries after {self.failures} (restart serve to try again)"
        return f"next try in {max(0.0, self.next_try - now):.0f} s"


def offer_addresses(observed_host: str | None, port: int | None) -> tuple[Address, ...]:
    """What a node offers to be dialled at: its observed host at its
    listening port (module docstring); none when either is unknown, or when
    the relay saw it on loopback (the same machine: no router to cross)."""
    if observed_host is None or not port or _is_loopback(observed_host):
        return ()
    return (Address(observed_host, port),)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_offer(addresses: tuple[str, ...]) -> tuple[Address, ...]:
    """A peer's offer as addresses; those that do not parse are left out."""
    found = []
    for text in addresses:
        try:
            found.append(Address.parse(text, allow_port_zero=False))
        except UsageError:
            continue
    return tuple(found)


def failure_advice(port: int | None) -> str:
    """What a person can do when an upgrade fails."""
    forward = f"port {port}" if port else "the node's port"
    return (
        "its router or this one may give each connection a port of its own "
        "(a symmetric NAT) or drop it; the traffic stays on the relay, which works, "
        f"more slowly (forwarding {forward} on the router, or turning on "
        "UPnP/NAT-PMP, would let friends connect directly)"
    )


# --- the upgrade (thin trio) ---------------------------------------------------------------


@attrs.frozen
class PeerRoute:
    """How this node last reached a peer it upgraded with, for ``status``."""

    direct: bool
    #: The peer's address on the direct connection, or why it stayed relayed.
    detail: str


class DirectUpgrade:
    """One node's direct upgrades: what it offers, its tries per peer, and
    the outcome of each (module docstring)."""

    def __init__(
        self,
        network: Network,
        identity: Identity,
        *,
        port: int | None = None,
        window: float = PUNCH_WINDOW,
        spare_port: Callable[[], int] | None = None,
    ) -> None:
        self.network = network
        #: A free port to dial from (None: the network's ``spare_port``).
        self.spare_port = spare_port or getattr(network, "spare_port", None)
        self.identity = identity
        #: The port this node listens on; None until it does.
        self.port = port
        self.window = window
        #: The public host the last relay saw this node at.
        self.observed_host: str | None = None
        self._tries: dict[bytes, Tries] = {}
        self._routes: dict[bytes, PeerRoute] = {}
        #: Ports offered to, or connected from, with each peer.
        self._using: dict[bytes, set[int]] = {}
        #: Whether friends dial this node directly now (its port forwarded):
        #: then it offers nothing, as a peer's attempt would reach its
        #: listener rather than its own attempt.
        self.reachable: Callable[[], bool] = lambda: False

    def observe(self, observed: str | None, local: Address | None) -> None:
        """Note where a relay saw this node (``RelayJoined.observed``) on a
        connection from ``local``. Seen at its own address, the node is
        behind no router, and offers nothing: friends dial it directly, and
        a peer's attempt would reach its listener, not its own attempt."""
        if observed is None:
            return
        try:
            host = Address.parse(observed).host
        except UsageError:
            log.info("a relay reported a malformed observed address %r", observed)
            return
        self.observed_host = None if local is not None and local.host == host else host

    def offer(self, peer: bytes) -> tuple[Address, ...]:
        """The addresses to offer ``peer`` now (none: do not try). The port
        is the listening port, unless a direct connection with ``peer``
        holds it already (two would be the same pair of addresses): then a
        spare one. Held until :meth:`release`, or the direct connection
        made from it closes."""
        if self.reachable() or not self._tries.get(peer, Tries()).may_try(trio.current_time()):
            return ()
        using = self._using.setdefault(peer, set())
        port = self.port
        if port in using:
            port = self.spare_port() if self.spare_port is not None else None
        offered = offer_addresses(self.observed_host, port)
        if offered:
            using.add(offered[0].port)
        return offered

    def release(self, peer: bytes, offered: tuple[Address, ...]) -> None:
        """The port of an offer that made no direct connection is free again."""
        for address in offered:
            self.release_port(peer, address.port)

    def release_port(self, peer: bytes, port: int) -> None:
        self._using.get(peer, set()).discard(port)

    def status(self) -> dict[bytes, PeerRoute]:
        """Per peer upgraded with (or tried): direct, or relayed and why."""
        return dict(self._routes)

    def _succeeded(self, peer: bytes, address: Address | None) -> None:
        self._tries.pop(peer, None)
        where = "an unknown address" if address is None else str(address)
        self._routes[peer] = PeerRoute(True, where)
        log.info(
            "node %s: moved from the relay to a direct connection with %s", peer.hex()[:16], where
        )

    def _failed(self, peer: bytes, reason: str) -> None:
        now = trio.current_time()
        tries = self._tries[peer] = self._tries.get(peer, Tries()).failed(now)
        self._routes[peer] = PeerRoute(False, reason)
        log.warning(
            "node %s: no direct connection (%s): %s; %s",
            peer.hex()[:16],
            reason,
            failure_advice(self.port),
            tries.describe_next(now),
        )

    async def _punch(
        self, peer: bytes, port: int, addresses: tuple[Address, ...]
    ) -> _Holding | None:
        """A connection from ``port`` to the first of ``addresses`` that
        answers within the window; None if none did."""
        try:
            with trio.move_on_after(self.window):
                while True:
                    for address in addresses:
                        try:
                            stream = await self.network.connect(address, local_port=port)
                        except PeerUnavailableError as error:
                            log.debug("punch to %s: %s", address, error)
                            continue
                        return _Holding(stream, lambda: self.release_port(peer, port))
                    await trio.sleep(RETRY_AFTER_REFUSAL)
        except BaseException:
            self.release_port(peer, port)
            raise
        self.release_port(peer, port)
        return None

    async def dial(
        self, peer: bytes, port: int, addresses: tuple[Address, ...]
    ) -> SecureStream | None:
        """The dialler's punch from ``port`` and handshake: the direct
        session, or None."""
        stream = await self._punch(peer, port, addresses)
        if stream is None:
            self._failed(peer, f"no answer at {', '.join(map(str, addresses))}")
            return None
        try:
            with trio.fail_after(self.window):
                secure = await secure_initiator(stream, self.identity, expected_node_id=peer)
                channel = MessageChannel(secure)
                ready = await channel.receive()
            if not isinstance(ready, messages.DirectReady):
                raise RemoteProtocolError(f"sent {type(ready).__name__} for DirectReady")
            _only_message(channel)
        except (trio.TooSlowError, ProtocolError, IntegrityError, trio.BrokenResourceError) as exc:
            await trio.aclose_forcefully(stream)
            self._failed(peer, _handshake_failure(exc, self.window))
            return None
        self._succeeded(peer, stream.remote_address)
        return secure

    async def answer(
        self, peer: bytes, port: int, addresses: tuple[Address, ...]
    ) -> SecureStream | None:
        """The reached node's punch from ``port`` and handshake: the direct
        session (its DirectReady sent), or None."""
        stream = await self._punch(peer, port, addresses)
        if stream is None:
            self._failed(peer, f"no answer at {', '.join(map(str, addresses))}")
            return None
        try:
            with trio.fail_after(self.window):
                secure = await secure_responder(stream, self.identity)
                if secure.remote_node_id != peer:
                    raise PeerIdentityError(
                        f"the direct connection reached node {secure.remote_node_id.hex()}, "
                        f"not {peer.hex()}"
                    )
                await MessageChannel(secure).send(messages.DirectReady())
        except (trio.TooSlowError, ProtocolError, IntegrityError, trio.BrokenResourceError) as exc:
            await trio.aclose_forcefully(stream)
            self._failed(peer, _handshake_failure(exc, self.window))
            return None
        self._succeeded(peer, stream.remote_address)
        return secure


def _handshake_failure(exc: BaseException, window: float) -> str:
    if isinstance(exc, trio.TooSlowError):
        return f"the direct connection's handshake did not finish within {window:g} s"
    return f"the direct connection's handshake failed: {exc}"


class _Holding(trio.abc.Stream):
    """A direct connection that frees its port for another offer once closed."""

    def __init__(self, stream: trio.abc.Stream, closed: Callable[[], None]) -> None:
        self.transport_stream = stream
        self._closed = closed

    @property
    def remote_address(self) -> Address | None:
        return peer_address(self.transport_stream)

    @property
    def local_address(self) -> Address | None:
        return local_address(self.transport_stream)

    async def send_all(self, data: BytesLike) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.transport_stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        self._closed()
        await self.transport_stream.aclose()


def _only_message(channel: MessageChannel) -> None:
    """The peer sent nothing behind the message just read (else it broke the
    exchange: the stream is handed on whole)."""
    if channel.detach() is not channel.stream:
        raise RemoteProtocolError("sent more than one message where one was due")


#: The upgrade of the node this task serves (None: it offers nothing; it
#: still answers the exchange). Set by ``serve`` for all its tasks.
DIRECT_UPGRADE: contextvars.ContextVar[DirectUpgrade | None] = contextvars.ContextVar(
    "DIRECT_UPGRADE", default=None
)


async def offer_direct(
    secure: SecureStream,
    peer: bytes,
    *,
    upgrade: DirectUpgrade | None,
    timeout: float,
) -> SecureStream:
    """The dialler's side of the exchange on a fresh session through a relay:
    the direct session when the upgrade worked (the relayed one closed),
    else ``secure`` itself."""
    channel = MessageChannel(secure)
    mine = upgrade.offer(peer) if upgrade is not None else ()
    started = trio.current_time()
    try:
        with trio.fail_after(timeout):
            await channel.send(messages.DirectConnect(tuple(str(a) for a in mine)))
            answer = await channel.receive()
        if not isinstance(answer, messages.DirectAddresses):
            raise RemoteProtocolError(f"answered DirectConnect with {type(answer).__name__}")
        _only_message(channel)
    except BaseException:
        if upgrade is not None:
            upgrade.release(peer, mine)
        raise
    round_trip = trio.current_time() - started
    theirs = read_offer(answer.addresses)
    if upgrade is None or not (mine and theirs):
        if upgrade is not None:
            upgrade.release(peer, mine)
        return secure
    await channel.send(messages.DirectSync())
    # N dials as the DirectSync reaches it, half a round trip from now.
    await trio.sleep(round_trip / 2)
    direct = await upgrade.dial(peer, mine[0].port, theirs)
    if direct is None:
        return secure
    await trio.aclose_forcefully(secure)
    return direct


async def answer_direct(
    stream: trio.abc.Stream,
    peer: bytes,
    *,
    upgrade: DirectUpgrade | None,
    timeout: float,
    serve_direct: Callable[[SecureStream], Awaitable[None]],
    nursery: trio.Nursery,
) -> trio.abc.Stream:
    """The reached node's side of the exchange on a session through a relay
    (its handshake done): the stream to go on serving. A direct session, if
    the punch makes one, is handed to ``serve_direct`` in ``nursery``; the
    relayed session is served meanwhile, until the dialler closes it."""
    channel = MessageChannel(stream)
    with trio.fail_after(timeout):
        request = await channel.receive()
    if not isinstance(request, messages.DirectConnect):
        raise RemoteProtocolError(
            f"sent {type(request).__name__} where a relayed session opens with DirectConnect"
        )
    theirs = read_offer(request.addresses)
    mine = upgrade.offer(peer) if upgrade is not None else ()
    await channel.send(messages.DirectAddresses(tuple(str(a) for a in mine)))
    if upgrade is None or not (mine and theirs):
        if upgrade is not None:
            upgrade.release(peer, mine)
        return channel.detach()
    try:
        with trio.fail_after(timeout):
            sync = await channel.receive()
        if not isinstance(sync, messages.DirectSync):
            raise RemoteProtocolError(f"sent {type(sync).__name__} where DirectSync was due")
    except BaseException:
        upgrade.release(peer, mine)
        raise

    async def punch() -> None:
        direct = await upgrade.answer(peer, mine[0].port, theirs)
        if direct is not None:
            await serve_direct(direct)

    nursery.start_soon(punch)
    return channel.detach()
