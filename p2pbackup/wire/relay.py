"""Reaching a node: directly or through a relay, with one dial function (thin trio).

A home behind a NAT router cannot be dialled. It keeps a session open to a
reachable friend, its **relay**, and names that friend in its contact
record; a node that wants to reach it dials the relay and asks to be
joined to it. The Noise session then runs end to end through the relay,
which sees only ciphertext and sizes; the far node still proves its key.

Nouns:

* **route** — :class:`Route`: how to reach a node: its own address, or a
  relay's address and node id (the dialler checks the relay's id in its
  handshake with the relay, then the node's id in the handshake through it).
  :func:`open_session` is the one function that dials a route.
* **reservation** — the session a node keeps open at its relay
  (``RelayReserve``, then ``RelayPing`` every keepalive interval, which also
  keeps the NAT router's mapping alive). :func:`hold_reservation` holds one.
* **circuit** — one joined pair of sessions at a relay: the dialler's
  (``RelayConnect``) and a new one the reserved node opens when the relay
  tells it of the dialler (``RelayIncoming`` → ``RelayAccept``). After
  ``RelayJoined`` each session carries the other's bytes: inside them, the
  dialler and the node run their own Noise handshake and transport.
* **tunnel** — :class:`Tunnel`: the stream a circuit gives each end, handed to
  :func:`~p2pbackup.wire.session.secure_initiator` (dialler) or to the node's
  storage server (reserved node) as if it were a connection of its own; it
  knows where the relay saw that end come from (its **observed address**).
  The session through it opens with the direct upgrade's exchange
  (:mod:`p2pbackup.wire.direct`): :func:`open_session` returns the direct
  session when the two ends could make one.

The relay's side (friends only, limits, counts) is
:mod:`p2pbackup.node.relay`. Failures to reach a node are
:class:`~p2pbackup.errors.PeerUnavailableError`, naming the route and why
(a relay's refusal quotes the relay's reason).
"""

from __future__ import annotations

import logging
from typing import Final

import attrs
import trio

from p2pbackup.errors import (
    IntegrityError,
    PeerUnavailableError,
    ProtocolError,
    RemoteProtocolError,
)
from p2pbackup.model import BytesLike
from p2pbackup.net.network import Address, Network, StreamHandler, local_address, run_handler
from p2pbackup.nurseries import unwrap_single
from p2pbackup.wire import messages
from p2pbackup.wire.direct import DIRECT_UPGRADE, offer_direct
from p2pbackup.wire.rpc import MessageChannel
from p2pbackup.wire.session import Identity, SecureStream, secure_initiator

log = logging.getLogger(__name__)

#: Seconds a dial waits for a session (handshakes and a relay's join included).
DEFAULT_DIAL_TIMEOUT: Final = 10.0
#: Seconds between keepalives a relay asks for: well under the 30 s after
#: which common NAT routers forget an idle mapping.
DEFAULT_KEEPALIVE: Final = 15
#: Keepalive intervals without an answer after which either end gives up a
#: reservation.
SILENT_INTERVALS: Final = 3


@attrs.frozen
class Route:
    """Where to dial to reach a node: its address, or a relay's (``relay`` set)."""

    address: Address
    #: The node id of the relay at ``address``; None: the node itself is there.
    relay: bytes | None = attrs.field(default=None, repr=lambda r: r and r.hex())

    def __str__(self) -> str:
        if self.relay is None:
            return str(self.address)
        return f"{self.address} (relay {self.relay.hex()[:16]})"


class Tunnel(trio.abc.Stream):
    """One end of a circuit (module docstring): ``stream`` as it is, plus the
    address the relay saw this end come from (None: the relay did not say),
    and this end's own address on that connection."""

    def __init__(
        self, stream: trio.abc.Stream, observed: str | None, local: Address | None
    ) -> None:
        self.transport_stream = stream
        self.observed = observed
        #: This end's address on its connection to the relay.
        self.local = local

    async def send_all(self, data: BytesLike) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.transport_stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.transport_stream.aclose()


async def open_session(
    network: Network,
    identity: Identity,
    route: Route,
    node_id: bytes,
    *,
    timeout: float = DEFAULT_DIAL_TIMEOUT,
) -> SecureStream:
    """A session with node ``node_id`` along ``route``, its key proven; else
    :class:`PeerUnavailableError` naming the node, the route and the reason.

    Through a relay, the session then tries the direct upgrade
    (:data:`~p2pbackup.wire.direct.DIRECT_UPGRADE`, this node's) and is
    the direct one if that worked."""
    name = f"node {node_id.hex()[:16]} at {route}"
    upgrade = DIRECT_UPGRADE.get()
    try:
        with trio.fail_after(timeout):
            stream = await network.connect(route.address)
            try:
                if route.relay is not None:
                    stream = await _join(stream, identity, route, node_id)
                    if upgrade is not None:
                        upgrade.observe(stream.observed, stream.local)
                secure = await secure_initiator(stream, identity, expected_node_id=node_id)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        if route.relay is None:
            return secure
        try:
            return await offer_direct(secure, node_id, upgrade=upgrade, timeout=timeout)
        except BaseException:
            await trio.aclose_forcefully(secure)
            raise
    except trio.TooSlowError:
        raise PeerUnavailableError(f"{name}: no answer within {timeout:g} s") from None
    except (ProtocolError, IntegrityError, trio.BrokenResourceError) as exc:
        raise PeerUnavailableError(f"{name}: handshake failed: {exc}") from None


async def _join(
    stream: trio.abc.Stream, identity: Identity, route: Route, node_id: bytes
) -> Tunnel:
    """The tunnel to ``node_id`` through the relay at the end of ``stream``."""
    assert route.relay is not None
    local = local_address(stream)
    secure = await secure_initiator(stream, identity, expected_node_id=route.relay)
    channel = MessageChannel(secure)
    await channel.send(messages.RelayConnect(node_id))
    answer = await channel.receive()
    if isinstance(answer, messages.Refused):
        raise PeerUnavailableError(
            f"node {node_id.hex()[:16]}: relay {route} refused: {answer.message}"
        )
    if not isinstance(answer, messages.RelayJoined):
        raise RemoteProtocolError(f"relay answered RelayConnect with {type(answer).__name__}")
    return Tunnel(channel.detach(), answer.observed, local)


# --- the reserved node's side ------------------------------------------------------------


async def hold_reservation(
    network: Network,
    identity: Identity,
    relay: Route,
    handler: StreamHandler,
    *,
    timeout: float = DEFAULT_DIAL_TIMEOUT,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hold a reservation at ``relay`` until cancelled or lost: answer each
    circuit the relay announces by running ``handler`` on its tunnel (a node
    runs its storage server's connection handler, as for a dialled-in
    connection), and keep the session alive with pings.

    ``task_status.started`` receives the keepalive interval once the relay
    accepted. :class:`PeerUnavailableError` when the relay cannot be
    reached, refuses (its reason quoted) or goes silent.
    """
    assert relay.relay is not None
    secure = await open_session(
        network, identity, Route(relay.address), relay.relay, timeout=timeout
    )
    channel = MessageChannel(secure)
    try:
        with trio.fail_after(timeout):
            await channel.send(messages.RelayReserve())
            answer = await channel.receive()
        if isinstance(answer, messages.Refused):
            raise PeerUnavailableError(f"relay {relay} refused a reservation: {answer.message}")
        if not isinstance(answer, messages.RelayReserved):
            raise RemoteProtocolError(f"relay answered RelayReserve with {type(answer).__name__}")
        keepalive = answer.keepalive
        task_status.started(keepalive)
        with unwrap_single():  # the pings end with the loop: one failure at most
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_keep_alive, channel, keepalive)
                while True:
                    with trio.move_on_after(keepalive * SILENT_INTERVALS) as silent:
                        message = await channel.receive()
                    if silent.cancelled_caught:
                        raise PeerUnavailableError(
                            f"relay {relay} went silent for {keepalive * SILENT_INTERVALS} s"
                        )
                    if isinstance(message, messages.RelayIncoming):
                        nursery.start_soon(
                            _accept, network, identity, relay, message, handler, timeout
                        )
                    elif not isinstance(message, messages.RelayPong):
                        raise RemoteProtocolError(
                            f"relay sent {type(message).__name__} on a reservation"
                        )
    except (ProtocolError, IntegrityError, trio.BrokenResourceError, trio.TooSlowError) as exc:
        raise PeerUnavailableError(f"reservation at relay {relay} lost: {exc}") from None
    finally:
        await trio.aclose_forcefully(secure)


async def _keep_alive(channel: MessageChannel, keepalive: int) -> None:
    while True:
        await trio.sleep(keepalive)
        await channel.send(messages.RelayPing())


async def _accept(
    network: Network,
    identity: Identity,
    relay: Route,
    incoming: messages.RelayIncoming,
    handler: StreamHandler,
    timeout: float,
) -> None:
    """Open this node's end of a circuit and serve it; a failure is this circuit's alone."""
    assert relay.relay is not None
    try:
        secure = await open_session(
            network, identity, Route(relay.address), relay.relay, timeout=timeout
        )
    except PeerUnavailableError as error:
        log.info("cannot take a circuit from node %s: %s", incoming.peer.hex()[:16], error)
        return
    channel = MessageChannel(secure)
    try:
        with trio.fail_after(timeout):
            await channel.send(messages.RelayAccept(incoming.circuit))
            answer = await channel.receive()
    except (ProtocolError, IntegrityError, trio.BrokenResourceError, trio.TooSlowError) as exc:
        log.info("circuit from node %s failed: %s", incoming.peer.hex()[:16], exc)
        await trio.aclose_forcefully(secure)
        return
    if not isinstance(answer, messages.RelayJoined):
        reason = answer.message if isinstance(answer, messages.Refused) else type(answer).__name__
        log.info("relay %s did not join node %s: %s", relay, incoming.peer.hex()[:16], reason)
        await trio.aclose_forcefully(secure)
        return
    tunnel = Tunnel(channel.detach(), answer.observed, local_address(secure.transport_stream))
    await run_handler(handler, tunnel)
