"""The relay: a reachable node joining its friends to friends that cannot be dialled.

The storage server hands every relay request (``RelayReserve``,
``RelayConnect``, ``RelayAccept``) to a :class:`Relay`; the protocol and the
dialling side are :mod:`p2pbackup.wire.relay`.

Nouns:

* **reservation** — a friend's session held open here, on which the relay
  tells it of each friend asking for it (``RelayIncoming``). One per node; a
  new one replaces the old (the node reconnected). It ends when the friend
  has been silent for :data:`~p2pbackup.wire.relay.SILENT_INTERVALS` keepalive
  intervals.
* **circuit** — a dialler's session and the reserved node's new session,
  joined: every byte read from one is written to the other (**spliced**).
  Both run Noise end to end inside, so the relay handles only their
  ciphertext, in memory, and never writes it anywhere.
* **limits** — :class:`RelayLimits`: reservations and circuits at once
  (in all and per node), bytes per second over all circuits, how long a
  reserved node has to answer.
* **traffic** — :class:`RelayTraffic`: per friend, the circuits it took part
  in and the bytes relayed to and from it, since the relay started.
* **relay report** — :class:`RelayReport`: what ``status`` shows of the
  relay: reservations and circuits now, and the traffic.

Only friends are served, at both ends (the relay's owner vouches for each),
and the relay's own node as a dialler (its owner reaching a friend that
holds a reservation here): anyone else is refused with a reason that says so.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Mapping
from typing import Final

import attrs
import trio

from p2pbackup.core import crypto
from p2pbackup.engine.progress import human_bytes, plural
from p2pbackup.errors import IntegrityError, ProtocolError
from p2pbackup.net.network import Address
from p2pbackup.net.pacing import Pace
from p2pbackup.wire import messages
from p2pbackup.wire.messages import RefusalCode
from p2pbackup.wire.relay import DEFAULT_DIAL_TIMEOUT, DEFAULT_KEEPALIVE, SILENT_INTERVALS
from p2pbackup.wire.rpc import MessageChannel

log = logging.getLogger(__name__)

#: Bytes moved per read when splicing two sessions.
SPLICE_CHUNK: Final = 256 * 1024


@attrs.frozen
class RelayLimits:
    """How much a relay gives its friends."""

    reservations: int = 16
    circuits: int = 16
    #: Circuits one node takes part in at once (as dialler or as reserved node).
    circuits_per_node: int = 4
    #: Over all circuits together (None: no limit).
    bytes_per_second: float | None = 8 << 20
    #: Seconds a reserved node has to answer a ``RelayIncoming``.
    join_timeout: float = DEFAULT_DIAL_TIMEOUT
    keepalive: int = DEFAULT_KEEPALIVE


@attrs.define
class RelayTraffic:
    """What the relay did for one friend."""

    circuits: int = 0
    #: Bytes relayed from this friend to the other end, and to it.
    bytes_from: int = 0
    bytes_to: int = 0


@attrs.frozen
class RelayReport:
    """The relay report (module docstring)."""

    #: Friends holding a reservation now, and circuits open now.
    reservations: int
    circuits_open: int
    traffic: Mapping[bytes, RelayTraffic]

    def to_json(self) -> dict[str, object]:
        return {
            "summary": self.line(),
            "reservations": self.reservations,
            "circuits_open": self.circuits_open,
            "friends": [
                {"node_id": node.hex(), **attrs.asdict(counts)}
                for node, counts in sorted(self.traffic.items())
            ],
        }

    def line(self) -> str:
        # Every circuit joins two friends, and every byte relayed leaves one
        # friend for another: each is counted once here.
        circuits = sum(counts.circuits for counts in self.traffic.values()) // 2
        relayed = sum(counts.bytes_from for counts in self.traffic.values())
        friends = len(self.traffic)
        return (
            f"relay for friends: {self.reservations} holding a reservation here, "
            f"{plural(self.circuits_open, 'circuit')} open; since serve started, "
            f"{plural(circuits, 'circuit')} relayed {human_bytes(relayed)} for "
            f"{plural(friends, 'friend')}"
        )


class RelayRefusal(Exception):
    """Internal: answer the request with this refusal and end the session."""

    def __init__(self, code: RefusalCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@attrs.define(eq=False)
class _Reservation:
    channel: MessageChannel
    sending: trio.Lock = attrs.Factory(trio.Lock)


@attrs.define(eq=False)
class _Pending:
    """A circuit waiting for the reserved node's session."""

    dialler: bytes
    target: bytes
    accepted: MessageChannel | None = None
    arrived: trio.Event = attrs.Factory(trio.Event)
    done: trio.Event = attrs.Factory(trio.Event)


class Relay:
    """Joins this node's friends to its friends that hold a reservation here."""

    def __init__(
        self,
        node_id: bytes,
        friends: Callable[[bytes], bool],
        limits: RelayLimits = RelayLimits(),
        *,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.node_id = node_id
        self.friends = friends
        self.limits = limits
        self.clock = clock
        self._reservations: dict[bytes, _Reservation] = {}
        self._pending: dict[bytes, _Pending] = {}
        self._busy: dict[bytes, int] = {}
        self._circuits = 0
        self._pace = Pace(limits.bytes_per_second)
        self._traffic: dict[bytes, RelayTraffic] = {}

    # -- what status shows -------------------------------------------------------------

    def traffic(self) -> dict[bytes, RelayTraffic]:
        """Per friend (node id): what was relayed for it so far (copies)."""
        return {node: attrs.evolve(counts) for node, counts in self._traffic.items()}

    def report(self) -> RelayReport:
        return RelayReport(len(self._reservations), self._circuits, self.traffic())

    @property
    def reserved(self) -> frozenset[bytes]:
        """The nodes holding a reservation now."""
        return frozenset(self._reservations)

    @property
    def circuits(self) -> int:
        """Circuits open now."""
        return self._circuits

    # -- the server's entry -----------------------------------------------------------

    async def serve(
        self,
        channel: MessageChannel,
        peer: bytes,
        request: messages.Message,
        observed: Address | None = None,
    ) -> None:
        """Answer one relay request of node ``peer`` on ``channel``, whose
        connection came from ``observed``; the session is the relay's until
        this returns (then it ends)."""
        joined = messages.RelayJoined(None if observed is None else str(observed))
        try:
            own_dial = peer == self.node_id and isinstance(request, messages.RelayConnect)
            if not (self.friends(peer) or own_dial):
                raise RelayRefusal(
                    RefusalCode.FORBIDDEN,
                    f"node {self.node_id.hex()} relays only for its friends; "
                    f"its owner must add node {peer.hex()} with `p2pbackup friend add`",
                )
            if isinstance(request, messages.RelayReserve):
                await self._reserve(channel, peer)
            elif isinstance(request, messages.RelayConnect):
                await self._connect(channel, peer, request.node_id, joined)
            elif isinstance(request, messages.RelayAccept):
                await self._accept(channel, peer, request.circuit, joined)
            else:
                raise RelayRefusal(
                    RefusalCode.BAD_REQUEST, f"{type(request).__name__} outside a reservation"
                )
        except RelayRefusal as refusal:
            log.info("relay refused node %s: %s", peer.hex()[:16], refusal)
            with trio.move_on_after(self.limits.join_timeout):
                await channel.send(messages.Refused(refusal.code, str(refusal)[:1000]))

    # -- reservations -----------------------------------------------------------------

    async def _reserve(self, channel: MessageChannel, peer: bytes) -> None:
        if peer not in self._reservations and len(self._reservations) >= self.limits.reservations:
            raise RelayRefusal(
                RefusalCode.BUSY,
                f"relay holds {self.limits.reservations} reservations, its most; try again later",
            )
        reservation = _Reservation(channel)
        self._reservations[peer] = reservation
        keepalive = self.limits.keepalive
        try:
            async with reservation.sending:
                await channel.send(messages.RelayReserved(keepalive))
            log.info("node %s holds a relay reservation here", peer.hex()[:16])
            while True:
                with trio.fail_after(keepalive * SILENT_INTERVALS):
                    message = await channel.receive_or_end()
                if message is None:
                    return
                if not isinstance(message, messages.RelayPing):
                    raise RelayRefusal(
                        RefusalCode.BAD_REQUEST,
                        f"{type(message).__name__} on a reservation, where only RelayPing goes",
                    )
                async with reservation.sending:
                    await channel.send(messages.RelayPong())
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
            log.info("node %s's relay reservation lapsed", peer.hex()[:16])
        finally:
            if self._reservations.get(peer) is reservation:
                del self._reservations[peer]

    # -- circuits ---------------------------------------------------------------------

    async def _connect(
        self,
        channel: MessageChannel,
        dialler: bytes,
        target: bytes,
        joined: messages.RelayJoined,
    ) -> None:
        reservation = self._reservations.get(target)
        if reservation is None:
            raise RelayRefusal(
                RefusalCode.NOT_FOUND,
                f"node {target.hex()} holds no reservation at relay {self.node_id.hex()}",
            )
        if self._circuits >= self.limits.circuits:
            raise RelayRefusal(
                RefusalCode.BUSY,
                f"relay has {self.limits.circuits} circuits open, its most; try again later",
            )
        for node in (dialler, target):
            if self._busy.get(node, 0) >= self.limits.circuits_per_node:
                raise RelayRefusal(
                    RefusalCode.BUSY,
                    f"node {node.hex()[:16]} has {self.limits.circuits_per_node} circuits "
                    "open at this relay, its most; try again later",
                )
        circuit = crypto.random_bytes(messages.CIRCUIT_ID_SIZE)
        pending = self._pending[circuit] = _Pending(dialler, target)
        self._open(dialler, target)
        try:
            with trio.move_on_after(self.limits.join_timeout):
                async with reservation.sending:
                    await reservation.channel.send(messages.RelayIncoming(circuit, dialler))
                await pending.arrived.wait()
            del self._pending[circuit]
            accepted = pending.accepted
            if accepted is None:
                raise RelayRefusal(
                    RefusalCode.BUSY,
                    f"node {target.hex()} did not answer through relay {self.node_id.hex()} "
                    f"within {self.limits.join_timeout:g} s",
                )
            try:
                await channel.send(joined)
                await self._splice(channel, dialler, accepted, target)
            finally:
                pending.done.set()
        finally:
            self._pending.pop(circuit, None)
            self._close(dialler, target)

    async def _accept(
        self, channel: MessageChannel, peer: bytes, circuit: bytes, joined: messages.RelayJoined
    ) -> None:
        pending = self._pending.get(circuit)
        if pending is None or pending.target != peer or pending.accepted is not None:
            raise RelayRefusal(RefusalCode.NOT_FOUND, "no such circuit waits for this node")
        await channel.send(joined)
        pending.accepted = channel
        pending.arrived.set()
        # The dialler's task splices; this session stays open until it is done.
        await pending.done.wait()

    def _open(self, dialler: bytes, target: bytes) -> None:
        self._circuits += 1
        for node in (dialler, target):
            self._busy[node] = self._busy.get(node, 0) + 1
            self._traffic.setdefault(node, RelayTraffic()).circuits += 1

    def _close(self, dialler: bytes, target: bytes) -> None:
        self._circuits -= 1
        for node in (dialler, target):
            self._busy[node] -= 1
            if not self._busy[node]:
                del self._busy[node]

    async def _splice(self, a: MessageChannel, a_id: bytes, b: MessageChannel, b_id: bytes) -> None:
        """Copy each way until either side ends, then close both."""
        a_stream, b_stream = a.detach(), b.detach()
        try:
            async with trio.open_nursery() as nursery:

                async def one_way(
                    source: trio.abc.Stream, sink: trio.abc.Stream, sender: bytes, receiver: bytes
                ) -> None:
                    try:
                        await self._pump(source, sink, sender, receiver)
                    except (ProtocolError, IntegrityError, trio.BrokenResourceError) as exc:
                        log.info("relay circuit ended: %s", exc)
                    except trio.ClosedResourceError:
                        pass
                    # One side ended: so does the circuit.
                    nursery.cancel_scope.cancel()

                nursery.start_soon(one_way, a_stream, b_stream, a_id, b_id)
                nursery.start_soon(one_way, b_stream, a_stream, b_id, a_id)
        finally:
            await trio.aclose_forcefully(a_stream)
            await trio.aclose_forcefully(b_stream)

    async def _pump(
        self, source: trio.abc.Stream, sink: trio.abc.Stream, sender: bytes, receiver: bytes
    ) -> None:
        while True:
            data = await source.receive_some(SPLICE_CHUNK)
            if not data:
                return
            delay = self._pace.book(len(data), self.clock())
            if delay > 0:
                await trio.sleep(delay)
            await sink.send_all(data)
            self._traffic.setdefault(sender, RelayTraffic()).bytes_from += len(data)
            self._traffic.setdefault(receiver, RelayTraffic()).bytes_to += len(data)


#: The relay of the ``serve`` this code runs in, if any: ``status`` run by
#: the daemon reports it.
RUNNING_RELAY: contextvars.ContextVar[Relay | None] = contextvars.ContextVar(
    "p2pbackup_running_relay", default=None
)
