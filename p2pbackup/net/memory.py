"""The memory network: a simulated world of hosts and links inside one trio run.

A :class:`MemoryNetwork` is a simulated world inside one trio run. Each
simulated machine is a **host** (any name: ``"alice"``, ``"10.0.0.7"``);
:meth:`MemoryNetwork.interface` gives the :class:`Network` of one host.
Every pair of hosts is joined by a **link** (:class:`LinkProfile`: one-way
latency, bandwidth per direction, datagram loss); a host may also have an
**access line** (:meth:`MemoryNetwork.set_access`: uplink and downlink
bandwidth, each one queue shared by all its traffic). The world can be
**partitioned** into groups that cannot reach each other, and a host can be
**killed** (a crashed machine) and revived. It reads only trio's clock and a
``random.Random`` seeded at construction, so under
``trio.testing.MockClock(autojump_threshold=0)`` a run is fast and repeatable.

It implements :class:`~p2pbackup.net.network.Network`, so node code cannot
tell it from real sockets.

How the memory world models time (a simplification of TCP, documented here so
that simulations can be read):

* A stream is two one-way **pipes**. ``send_all`` cuts its data into segments
  of at most :data:`SEGMENT_SIZE` bytes; a segment waits for the link direction
  to be free, occupies it for ``len / bandwidth`` seconds (every stream and
  datagram between the same two hosts, in the same direction, shares that
  time), and arrives ``latency`` seconds after it has been put on the link.
  Where the sender has an uplink or the receiver a downlink, the segment
  also waits for those to be free, occupies them as long, and goes at the
  slowest of the three rates.
* Each pipe holds at most ``window`` bytes sent but not yet read by the
  receiver (in flight or arrived); ``send_all`` returns as soon as its last
  segment fits, and blocks while the window is full, so a slow reader stalls
  a fast writer without memory growing.
* ``connect`` costs one round trip. A listening port answers after one round
  trip; a reachable host with nothing listening refuses after one round trip;
  a host that is down or on the other side of a partition never answers, so
  ``connect`` fails when the connect timeout expires; a host name the world
  has never seen fails at once ("no such host").
* When a partition or a killed host breaks a stream, the segments still on
  the wire are lost; bytes that had arrived can still be read, and then
  reads, like writes, raise ``trio.BrokenResourceError``. Healing does not
  mend broken streams (as with TCP, the connection is gone).
* A datagram is lost with the link's probability, or when nothing is bound
  at its destination when it is sent, or when the receiving endpoint's queue
  (:data:`DATAGRAM_QUEUE_LIMIT` datagrams) is full, or when the two hosts
  cannot reach each other at the moment it is sent or delivered.

How the memory world models a home router (**NAT**), after Linux's
MASQUERADE; :meth:`MemoryNetwork.put_behind_nat` puts a host behind one:

* A router has a **public host** (its address outside, where the world sees
  every host behind it) and a **gateway host** (its address inside). The hosts
  behind it and the gateway form its **LAN**: they reach each other directly.
* From outside, a LAN host cannot be reached by its own name at all
  (``connect`` gets no answer, datagrams are lost). The public host forwards
  a stream or a datagram to a LAN host only through a **port mapping**
  (protocol, external port → internal address) that has not expired. A
  datagram is also let in when it comes from an address that the LAN host
  sent to from that port recently: a **UDP flow**, kept
  :attr:`NatProfile.udp_timeout` seconds (30, Linux's
  ``nf_conntrack_udp_timeout``) after the last datagram, and
  :attr:`NatProfile.udp_stream_timeout` (120) once datagrams went both ways.
  Anything else sent to the public host is the router's own: usually refused
  (also from its own LAN: the model does not hairpin).
* Outward, a LAN host appears as the public host, at the same port it sends
  from (port-preserving, as MASQUERADE is while ports do not clash); a
  router without :attr:`NatProfile.port_preserving` (a **symmetric NAT**)
  gives each (LAN address, destination) a public port of its own instead.
* A connection dialled from a LAN host's listening port
  (``connect(..., local_port=...)``) opens a **TCP flow** for its
  destination, kept :attr:`NatProfile.tcp_timeout` seconds (120, Linux's
  ``nf_conntrack_tcp_timeout_syn_sent``): a connection from that very
  address to the public port the flow left from is let in to the LAN host.
  An attempt from a listening port that no router lets in, or that finds
  nothing there, waits unanswered (as TCP sends its SYN again, and as most
  home routers drop what they do not let in) until the connect timeout;
  when the other host dials back from that address meanwhile, and its own
  router lets the first one in, the two attempts become one connection (a
  **simultaneous open**), as TCP makes them. Any port may be dialled from
  (``spare_port`` finds a free one).
* A router with :attr:`NatProfile.port_mapping` answers NAT-PMP and PCP
  (:mod:`p2pbackup.net.natpmp`) from its LAN at ``gateway:5351``, at once;
  one without it answers nothing there. Mappings last the lease granted (at
  most :attr:`NatProfile.max_lease`); :meth:`MemoryNetwork.add_port_mapping`
  is a port forwarded by hand.
"""

from __future__ import annotations

import heapq
import logging
import math
import operator
import random
from collections import deque
from collections.abc import Iterable

import attrs
import trio

from p2pbackup.errors import PeerUnavailableError, ProtocolError, UsageError
from p2pbackup.model import BytesLike
from p2pbackup.net import natpmp
from p2pbackup.net.network import (
    DEFAULT_CONNECT_TIMEOUT,
    Address,
    DatagramEndpoint,
    StreamHandler,
    check_datagram_size,
    check_host,
    is_ip,
    is_ipv4,
    run_handler,
)

log = logging.getLogger(__name__)

#: Bytes one direction of a memory stream holds unread before ``send_all``
#: blocks (about a TCP socket's send plus receive buffer).
DEFAULT_WINDOW = 256 * 1024

#: The largest piece a memory stream puts on a link at once; smaller pieces let
#: a reader start on the first bytes before the last have crossed a slow link.
SEGMENT_SIZE = 64 * 1024

#: Datagrams a memory endpoint holds (in flight or arrived, unread) before it
#: drops new ones, as a full UDP receive buffer does.
DATAGRAM_QUEUE_LIMIT = 1024

#: Connections a memory listener holds before its server accepts them.
LISTEN_BACKLOG = 128

#: Where memory hosts take ports for outgoing connections and for port 0.
_EPHEMERAL_PORTS = range(49152, 65536)


# -- the memory world ----------------------------------------------------------------------


def _check_latency(instance: object, attribute: object, value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise UsageError(f"link latency must be a finite number of seconds >= 0, not {value}")


def _check_bandwidth(instance: object, attribute: object, value: float | None) -> None:
    if value is not None and not value > 0:
        raise UsageError(f"link bandwidth must be positive bytes/second or None, not {value}")


def _check_loss(instance: object, attribute: object, value: float) -> None:
    if not 0 <= value <= 1:
        raise UsageError(f"datagram loss must be a probability in 0..1, not {value}")


@attrs.frozen
class LinkProfile:
    """How a link between two memory hosts behaves, the same both ways."""

    #: One-way delay in seconds.
    latency: float = attrs.field(default=0.0, validator=_check_latency)
    #: Bytes per second in each direction; None is unlimited.
    bandwidth: float | None = attrs.field(default=None, validator=_check_bandwidth)
    #: Probability that a datagram is lost (streams are reliable, like TCP).
    loss: float = attrs.field(default=0.0, validator=_check_loss)


#: The link a host has to itself unless told otherwise: instant, like loopback.
_LOOPBACK = LinkProfile()


@attrs.frozen
class NetworkStatistics:
    """Counters of a memory world since it was made."""

    connections_opened: int = 0
    #: Refused, timed out, or to a host that does not exist.
    connections_failed: int = 0
    #: Streams broken by a partition or a killed host.
    streams_broken: int = 0
    stream_bytes_sent: int = 0
    stream_segments_sent: int = 0
    #: Stream bytes that were on the wire when their stream broke.
    stream_bytes_dropped: int = 0
    datagrams_sent: int = 0
    datagram_bytes_sent: int = 0
    datagrams_dropped: int = 0
    datagram_bytes_dropped: int = 0


@attrs.define
class _Counters:
    connections_opened: int = 0
    connections_failed: int = 0
    streams_broken: int = 0
    stream_bytes_sent: int = 0
    stream_segments_sent: int = 0
    stream_bytes_dropped: int = 0
    datagrams_sent: int = 0
    datagram_bytes_sent: int = 0
    datagrams_dropped: int = 0
    datagram_bytes_dropped: int = 0


@attrs.define(eq=False)
class _Pipe:
    """One direction of a memory stream: segments with their arrival times."""

    world: MemoryNetwork
    source: str
    destination: str
    window: int
    lot: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)
    segments: deque[tuple[float, bytes]] = attrs.Factory(deque)
    #: Bytes sent and not yet read: the window's occupancy.
    unread: int = 0
    last_arrival: float = -math.inf
    eof_at: float | None = None
    receiver_closed: bool = False
    broken: bool = False

    def push(self, data: bytes) -> None:
        arrival = self.world._transmit(self.source, self.destination, len(data))
        # A link made slower mid-stream must not let later bytes overtake.
        arrival = max(arrival, self.last_arrival)
        self.last_arrival = arrival
        self.segments.append((arrival, data))
        self.unread += len(data)
        counters = self.world._counters
        counters.stream_bytes_sent += len(data)
        counters.stream_segments_sent += 1
        self.lot.unpark_all()

    def queue_eof(self) -> None:
        if self.eof_at is None and not self.broken:
            latency = self.world.link(self.source, self.destination).latency
            self.eof_at = max(trio.current_time() + latency, self.last_arrival)
            self.lot.unpark_all()

    def next_event_time(self) -> float:
        if self.segments:
            return self.segments[0][0]
        return self.eof_at if self.eof_at is not None else math.inf

    def take(self, now: float, max_bytes: int | None) -> bytes:
        """Arrived bytes, at most ``max_bytes`` (b"" when none have arrived)."""
        pieces: list[bytes] = []
        total = 0
        while self.segments and self.segments[0][0] <= now:
            if max_bytes is not None and total >= max_bytes:
                break
            arrival, data = self.segments[0]
            room = len(data) if max_bytes is None else min(len(data), max_bytes - total)
            if room == len(data):
                self.segments.popleft()
                pieces.append(data)
            else:
                self.segments[0] = (arrival, data[room:])
                pieces.append(data[:room])
            total += room
        if total:
            self.unread -= total
            self.lot.unpark_all()
        return b"".join(pieces)

    def eof_arrived(self, now: float) -> bool:
        return not self.segments and self.eof_at is not None and self.eof_at <= now

    def close_receiver(self) -> None:
        self.receiver_closed = True
        self.segments.clear()
        self.unread = 0
        self.lot.unpark_all()

    def break_(self, now: float) -> None:
        """The connection died: what is still on the wire never arrives."""
        if self.broken:
            return
        self.broken = True
        lost = 0
        while self.segments and self.segments[-1][0] > now:
            lost += len(self.segments.pop()[1])
        self.unread -= lost
        self.world._counters.stream_bytes_dropped += lost
        if self.eof_at is not None and self.eof_at > now:
            self.eof_at = None
        self.lot.unpark_all()


class _ConflictDetector:
    """Raise BusyResourceError when two tasks use one side of a stream at once."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._held = False

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(f"another task is already {self._what} this stream")
        self._held = True

    def __exit__(self, *exc_info: object) -> None:
        self._held = False


class MemoryStream(trio.abc.HalfCloseableStream):
    """One end of a memory connection; behaves like a trio SocketStream."""

    def __init__(
        self,
        connection: _Connection,
        send_pipe: _Pipe,
        receive_pipe: _Pipe,
        local_address: Address,
        remote_address: Address,
    ) -> None:
        self._connection = connection
        self._send_pipe = send_pipe
        self._receive_pipe = receive_pipe
        self.local_address = local_address
        self.remote_address = remote_address
        self._closed = False
        self._send_conflict = _ConflictDetector("sending on")
        self._receive_conflict = _ConflictDetector("receiving from")

    def __repr__(self) -> str:
        return f"<MemoryStream {self.local_address} -> {self.remote_address}>"

    def _check_can_send(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this stream is closed")
        if self._send_pipe.eof_at is not None:
            raise trio.ClosedResourceError("this stream's sending side was shut (send_eof)")
        if self._send_pipe.broken:
            raise trio.BrokenResourceError(f"the connection to {self.remote_address} broke")
        if self._send_pipe.receiver_closed:
            raise trio.BrokenResourceError(f"{self.remote_address} closed the connection")

    async def send_all(self, data: BytesLike) -> None:
        with self._send_conflict:
            self._check_can_send()
            # Copied now: the caller may reuse its buffer as soon as we return.
            view = memoryview(bytes(data))
            await trio.lowlevel.checkpoint()
            pipe = self._send_pipe
            while True:
                self._check_can_send()
                if not view:
                    return
                room = pipe.window - pipe.unread
                if room <= 0:
                    await pipe.lot.park()
                    continue
                size = min(len(view), room, SEGMENT_SIZE)
                pipe.push(bytes(view[:size]))
                view = view[size:]

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_conflict:
            if self._closed:
                raise trio.ClosedResourceError("this stream is closed")
            await trio.lowlevel.checkpoint()
            pipe = self._send_pipe
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("this stream is closed")
                if pipe.broken or pipe.receiver_closed or pipe.eof_at is not None:
                    return  # send_all will not block: it will raise
                if pipe.unread < pipe.window:
                    return
                await pipe.lot.park()

    async def send_eof(self) -> None:
        with self._send_conflict:
            if self._closed:
                raise trio.ClosedResourceError("this stream is closed")
            self._send_pipe.queue_eof()
            await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError(f"max_bytes must be at least 1, not {max_bytes}")
        with self._receive_conflict:
            if self._closed:
                raise trio.ClosedResourceError("this stream is closed")
            await trio.lowlevel.checkpoint()
            pipe = self._receive_pipe
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("this stream is closed")
                now = trio.current_time()
                data = pipe.take(now, max_bytes)
                if data:
                    return data
                if pipe.eof_arrived(now):
                    return b""
                if pipe.broken:
                    raise trio.BrokenResourceError(f"the connection to {self.remote_address} broke")
                # Wake for the next arrival, or earlier if anything changes.
                with trio.move_on_at(pipe.next_event_time()):
                    await pipe.lot.park()

    def _close_now(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Like TCP's FIN: the peer reads what was already sent, then b"".
        self._send_pipe.queue_eof()
        self._receive_pipe.close_receiver()
        self._send_pipe.lot.unpark_all()
        self._connection.side_closed()

    async def aclose(self) -> None:
        self._close_now()
        await trio.lowlevel.checkpoint()


@attrs.define(eq=False)
class _Connection:
    """A memory connection: two streams over two pipes, between two hosts."""

    world: MemoryNetwork
    hosts: tuple[str, str]
    pipes: tuple[_Pipe, _Pipe]
    open_sides: int = 2

    def side_closed(self) -> None:
        self.open_sides -= 1
        if self.open_sides == 0:
            self.world._connections.discard(self)

    def break_(self) -> None:
        now = trio.current_time()
        for pipe in self.pipes:
            pipe.break_(now)
        self.world._counters.streams_broken += 1
        self.world._connections.discard(self)


class _Listener:
    """A listening port of a memory host: a backlog of accepted streams."""

    def __init__(self, address: Address) -> None:
        self.address = address
        self.backlog: deque[MemoryStream] = deque()
        self.lot = trio.lowlevel.ParkingLot()
        self.open = True

    def offer(self, stream: MemoryStream) -> bool:
        if not self.open or len(self.backlog) >= LISTEN_BACKLOG:
            return False
        self.backlog.append(stream)
        self.lot.unpark_all()
        return True

    async def accept(self) -> MemoryStream:
        # A listener of a killed host stays closed: its server waits forever,
        # as a crashed machine's would, until the simulation cancels it.
        while not self.backlog:
            await self.lot.park()
        return self.backlog.popleft()

    def shut(self) -> None:
        self.open = False
        while self.backlog:
            self.backlog.popleft()._close_now()


@attrs.define(eq=False)
class _Host:
    name: str
    alive: bool = True
    listeners: dict[int, _Listener] = attrs.Factory(dict)
    endpoints: dict[int, MemoryDatagramEndpoint] = attrs.Factory(dict)
    next_port: int = _EPHEMERAL_PORTS.start

    def free_port(self, taken: Iterable[int]) -> int:
        taken = set(taken)
        for _ in range(len(_EPHEMERAL_PORTS)):
            port = self.next_port
            self.next_port = (
                port + 1 if port + 1 < _EPHEMERAL_PORTS.stop else _EPHEMERAL_PORTS.start
            )
            if port not in taken:
                return port
        raise UsageError(f"host {self.name} has no free port left")


# -- routers (NAT) -------------------------------------------------------------------------


@attrs.frozen
class NatProfile:
    """A home router: its two addresses, whether it maps ports, its timeouts."""

    #: The router's address outside: what the world sees of its LAN.
    public_host: str
    #: The router's address inside, where it answers NAT-PMP and PCP.
    gateway_host: str
    #: Whether it answers port-mapping requests (NAT-PMP, PCP).
    port_mapping: bool = True
    #: Seconds a UDP flow stays open after its last datagram, one way only...
    udp_timeout: float = 30.0
    #: ... and once datagrams went both ways.
    udp_stream_timeout: float = 120.0
    #: The longest lease it grants a mapping, in seconds.
    max_lease: int = 24 * 3600
    #: Whether a LAN host keeps its port outside (False: a symmetric NAT).
    port_preserving: bool = True
    #: Seconds a TCP flow waits for the other end's answer.
    tcp_timeout: float = 120.0


@attrs.frozen
class NatMapping:
    """A port of a router's public host forwarded to a LAN host."""

    transport: natpmp.Transport
    external_port: int
    internal: Address
    #: When it lapses (trio time); math.inf for one made by hand.
    expires: float


@attrs.define(eq=False)
class _Flow:
    internal: Address
    expires: float
    replied: bool = False


@attrs.define(eq=False)
class _Nat:
    profile: NatProfile
    #: When it first answered (its epoch counts from there).
    started: float | None = None
    lan: set[str] = attrs.Factory(set)
    mappings: dict[tuple[natpmp.Transport, int], NatMapping] = attrs.Factory(dict)
    #: (public port, remote address) → the LAN host's flow.
    flows: dict[tuple[int, Address], _Flow] = attrs.Factory(dict)
    #: The same for TCP flows (module docstring).
    tcp_flows: dict[tuple[int, Address], _Flow] = attrs.Factory(dict)
    #: A symmetric NAT's public port of each (LAN address, destination).
    ports: dict[tuple[Address, Address], int] = attrs.Factory(dict)

    def public_port(self, source: Address, destination: Address) -> int:
        """The port a LAN address appears at towards ``destination``."""
        if self.profile.port_preserving:
            return source.port
        port = self.ports.get((source, destination))
        if port is None:
            port = self.ports[(source, destination)] = _EPHEMERAL_PORTS[
                len(self.ports) % len(_EPHEMERAL_PORTS)
            ]
        return port

    def open_tcp(self, source: Address, destination: Address, now: float) -> Address:
        """A LAN host dials out from a listening port: its flow opens; the
        source seen outside."""
        port = self.public_port(source, destination)
        self.tcp_flows[(port, destination)] = _Flow(source, now + self.profile.tcp_timeout)
        return Address(self.profile.public_host, port)

    def let_tcp_in(self, source: Address, port: int, now: float) -> Address | None:
        """Where a connection from ``source`` to the public ``port`` goes, if anywhere."""
        mapped = self.mapping(natpmp.Transport.TCP, port, now)
        if mapped is not None:
            return mapped.internal
        flow = self.tcp_flows.get((port, source))
        if flow is None or flow.expires <= now:
            return None
        return flow.internal

    def mapping(self, transport: natpmp.Transport, port: int, now: float) -> NatMapping | None:
        found = self.mappings.get((transport, port))
        if found is not None and found.expires <= now:
            del self.mappings[(transport, port)]
            return None
        return found

    def send_out(self, source: Address, destination: Address, now: float) -> Address:
        """A LAN datagram leaves: its flow opens or stays; the source seen outside."""
        key = (source.port, destination)
        flow = self.flows.get(key)
        if flow is None or flow.expires <= now or flow.internal != source:
            flow = self.flows[key] = _Flow(source, 0.0)
        flow.expires = now + self._flow_timeout(flow)
        return Address(self.profile.public_host, source.port)

    def let_in(self, source: Address, port: int, now: float) -> Address | None:
        """Where a datagram from ``source`` to the public ``port`` goes, if anywhere."""
        mapped = self.mapping(natpmp.Transport.UDP, port, now)
        if mapped is not None:
            return mapped.internal
        flow = self.flows.get((port, source))
        if flow is None or flow.expires <= now:
            return None
        flow.replied = True
        flow.expires = now + self._flow_timeout(flow)
        return flow.internal

    def _flow_timeout(self, flow: _Flow) -> float:
        return self.profile.udp_stream_timeout if flow.replied else self.profile.udp_timeout

    def answer(self, data: bytes, source: Address, now: float) -> bytes | None:
        """The router's answer to a NAT-PMP or PCP request from a LAN host."""
        try:
            request = natpmp.decode_request(data)
        except ProtocolError:
            return None  # as a router does with garbage: no answer
        if self.started is None:
            self.started = now
        epoch = int(now - self.started)
        public = self.profile.public_host
        if request is None:
            if not is_ipv4(public):
                return natpmp.encode_address_answer(natpmp.AddressAnswer(3, epoch, None))
            return natpmp.encode_address_answer(natpmp.AddressAnswer(0, epoch, public))
        pcp = data[0] == natpmp.PCP_VERSION
        result, external, lifetime = 0, 0, 0
        if pcp and request.client_ip != source.host:
            result = natpmp.PcpResult.ADDRESS_MISMATCH
        elif request.lifetime == 0:
            internal = Address(source.host, request.internal_port)
            for key, mapped in list(self.mappings.items()):
                if mapped.transport == request.transport and mapped.internal == internal:
                    del self.mappings[key]
        else:
            external = self._free_port(request, Address(source.host, request.internal_port), now)
            lifetime = min(request.lifetime, self.profile.max_lease)
            self.mappings[(request.transport, external)] = NatMapping(
                request.transport,
                external,
                Address(source.host, request.internal_port),
                now + lifetime,
            )
        answer = natpmp.MapAnswer(
            request.transport,
            result,
            request.internal_port,
            external,
            lifetime,
            epoch,
            request.nonce,
            public if result == 0 and is_ip(public) else None,
        )
        if pcp:
            return natpmp.encode_pcp_map_answer(answer)
        return natpmp.encode_natpmp_map_answer(answer)

    def _free_port(self, request: natpmp.MapRequest, internal: Address, now: float) -> int:
        wanted: int = request.external_port or request.internal_port
        candidates: list[int] = [wanted, *_EPHEMERAL_PORTS]
        for port in candidates:
            held = self.mapping(request.transport, port, now)
            if held is None or held.internal == internal:
                return port
        return wanted  # every port taken: the newest asker wins


@attrs.define(eq=False)
class _Punch:
    """A connection dialled from a listening port, waiting for its answer."""

    local: Address
    dialled: Address
    #: Where the world sees it come from.
    seen_as: Address
    joined: trio.Event = attrs.Factory(trio.Event)
    stream: MemoryStream | None = None

    def end(self) -> MemoryStream:
        """This side's end of the connection, once joined."""
        assert self.stream is not None
        return self.stream


class MemoryNetwork:
    """A simulated world of hosts joined by links; see the module docstring."""

    def __init__(
        self,
        *,
        seed: int = 0,
        default_link: LinkProfile = LinkProfile(),
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        if window < 1:
            raise UsageError(f"a stream window must be at least 1 byte, not {window}")
        self.default_link = default_link
        self.connect_timeout = connect_timeout
        self.window = window
        self._random = random.Random(seed)
        self._hosts: dict[str, _Host] = {}
        self._links: dict[tuple[str, str], LinkProfile] = {}
        #: When each link direction finishes sending what is queued on it.
        self._link_free_at: dict[tuple[str, str], float] = {}
        #: Each host's access line (uplink, downlink in bytes a second), and
        #: when each end of it finishes what is queued on it.
        self._access: dict[str, tuple[float | None, float | None]] = {}
        self._up_free_at: dict[str, float] = {}
        self._down_free_at: dict[str, float] = {}
        #: Partition group of each host named in the partition; the rest share None.
        self._groups: dict[str, int] = {}
        self._connections: set[_Connection] = set()
        self._counters = _Counters()
        #: Routers by public host, and the router of each LAN host.
        self._nats: dict[str, _Nat] = {}
        self._nat_of: dict[str, _Nat] = {}
        #: Connections dialled from a listening port and not answered yet,
        #: by (local address, address dialled).
        self._punches: dict[tuple[Address, Address], _Punch] = {}

    # -- the world's controls

    def interface(self, host: str) -> MemoryInterface:
        """The Network of ``host`` (made, alive, on first mention)."""
        self._host(host)
        return MemoryInterface(self, host)

    def set_link(self, a: str, b: str, profile: LinkProfile) -> None:
        """Make the link between ``a`` and ``b`` (both ways) behave as ``profile``."""
        self._links[self._link_key(a, b)] = profile

    def link(self, a: str, b: str) -> LinkProfile:
        """How the link between ``a`` and ``b`` behaves now."""
        profile = self._links.get(self._link_key(a, b))
        if profile is not None:
            return profile
        return _LOOPBACK if a == b else self.default_link

    def set_access(
        self, host: str, *, uplink: float | None = None, downlink: float | None = None
    ) -> None:
        """Give ``host`` an access line: ``uplink`` bytes a second out and
        ``downlink`` in (None: unlimited), shared by everything it sends or
        receives, whoever the other end is (a home's line is slow and
        asymmetric, and its uplink is one queue for all its peers)."""
        _check_bandwidth(None, None, uplink)
        _check_bandwidth(None, None, downlink)
        self._access[host] = (uplink, downlink)

    def partition(self, *groups: Iterable[str]) -> None:
        """Split the world: hosts in different groups cannot reach each other.

        Hosts named in no group form one more group together. A new partition
        replaces the previous one. Streams across the new boundaries break.
        """
        assigned: dict[str, int] = {}
        for number, group in enumerate(groups):
            for host in group:
                if host in assigned:
                    raise UsageError(f"host {host} is in more than one partition group")
                assigned[host] = number
        self._groups = assigned
        for connection in list(self._connections):
            if not self.reachable(*connection.hosts):
                connection.break_()

    def heal(self) -> None:
        """End any partition (streams it broke stay broken)."""
        self._groups = {}

    def kill_host(self, host: str) -> None:
        """Crash ``host``: its ports close, its streams break, it answers nothing."""
        state = self._host(host)
        state.alive = False
        for listener in state.listeners.values():
            listener.shut()
        state.listeners.clear()
        for endpoint in list(state.endpoints.values()):
            endpoint._die()
        state.endpoints.clear()
        for connection in list(self._connections):
            if host in connection.hosts:
                connection.break_()

    def revive_host(self, host: str) -> None:
        """Bring a killed host back, with nothing listening or bound yet."""
        self._host(host).alive = True

    def is_alive(self, host: str) -> bool:
        state = self._hosts.get(host)
        return state is not None and state.alive

    def reachable(self, a: str, b: str) -> bool:
        """Whether packets from ``a`` reach ``b`` now."""
        if not (self.is_alive(a) and self.is_alive(b)):
            return False
        return a == b or self._groups.get(a) == self._groups.get(b)

    def statistics(self) -> NetworkStatistics:
        return NetworkStatistics(**attrs.asdict(self._counters))

    # -- routers

    def put_behind_nat(self, host: str, profile: NatProfile) -> None:
        """Put ``host`` on the LAN of the router ``profile`` describes (one
        router per public host: hosts given equal profiles share it)."""
        if host in self._nats or host in (profile.public_host, profile.gateway_host):
            raise UsageError(f"host {host} is a router; it cannot be behind one")
        nat = self._nats.get(profile.public_host)
        if nat is None:
            if profile.public_host in self._nat_of or profile.gateway_host in self._nats:
                raise UsageError(f"router {profile.public_host} would be behind another")
            nat = self._nats[profile.public_host] = _Nat(profile)
            self._host(profile.public_host)
            self._host(profile.gateway_host)
            nat.lan.add(profile.gateway_host)
            self._nat_of[profile.gateway_host] = nat
        elif nat.profile != profile:
            raise UsageError(f"router {profile.public_host} already has another profile")
        previous = self._nat_of.get(host)
        if previous is not None and previous is not nat:
            raise UsageError(f"host {host} is already behind {previous.profile.public_host}")
        self._host(host)
        nat.lan.add(host)
        self._nat_of[host] = nat

    def gateway_of(self, host: str) -> str | None:
        """The gateway host of the router ``host`` is behind, if any."""
        nat = self._nat_of.get(host)
        return nat.profile.gateway_host if nat is not None and host in nat.lan else None

    def add_port_mapping(
        self,
        public_host: str,
        transport: natpmp.Transport,
        external_port: int,
        internal: Address,
        *,
        lifetime: float = math.inf,
    ) -> None:
        """Forward a port of a router, as a user does in its settings."""
        nat = self._nats.get(public_host)
        if nat is None:
            raise UsageError(f"{public_host} is not a router's public host")
        expires = trio.current_time() + lifetime
        nat.mappings[(transport, external_port)] = NatMapping(
            transport, external_port, internal, expires
        )

    def port_mappings(self, public_host: str) -> list[NatMapping]:
        """The mappings of a router that have not lapsed."""
        nat = self._nats.get(public_host)
        if nat is None:
            return []
        now = trio.current_time()
        return [m for key, m in list(nat.mappings.items()) if nat.mapping(*key, now) is not None]

    def _inside_other_lan(self, source: str, destination: str) -> bool:
        """Whether ``destination`` is on a LAN that ``source`` is not on."""
        nat = self._nat_of.get(destination)
        return nat is not None and source not in nat.lan

    def _public_side(self, source: str, destination: str) -> _Nat | None:
        """The router whose public host ``destination`` is, seen from outside its LAN."""
        nat = self._nats.get(destination)
        return nat if nat is not None and source not in nat.lan else None

    def _seen_as(self, source: Address, destination: Address) -> Address:
        """Where a stream from ``source`` to ``destination`` seems to come from."""
        nat = self._nat_of.get(source.host)
        if nat is None or destination.host in nat.lan:
            return source
        return Address(nat.profile.public_host, nat.public_port(source, destination))

    def _stream_target(self, source: str, address: Address) -> Address | None:
        """Where a connection from ``source`` to ``address`` lands; None when a
        router drops it unanswered."""
        if self._inside_other_lan(source, address.host):
            return None
        nat = self._public_side(source, address.host)
        if nat is not None:
            mapped = nat.mapping(natpmp.Transport.TCP, address.port, trio.current_time())
            if mapped is not None:
                return mapped.internal
        return address

    # -- used by interfaces, streams and endpoints

    def _host(self, name: str) -> _Host:
        state = self._hosts.get(name)
        if state is None:
            check_host(None, None, name)
            state = self._hosts[name] = _Host(name)
        return state

    @staticmethod
    def _link_key(a: str, b: str) -> tuple[str, str]:
        return (a, b) if a <= b else (b, a)

    def _transmit(self, source: str, destination: str, size: int) -> float:
        """Occupy the link direction for ``size`` bytes; the arrival time."""
        profile = self.link(source, destination)
        now = trio.current_time()
        direction = (source, destination)
        start = max(now, self._link_free_at.get(direction, now))
        rates = [profile.bandwidth]
        uplink = self._access.get(source, (None, None))[0]
        downlink = self._access.get(destination, (None, None))[1]
        if source != destination:
            if uplink is not None:
                start = max(start, self._up_free_at.get(source, now))
                rates.append(uplink)
            if downlink is not None:
                start = max(start, self._down_free_at.get(destination, now))
                rates.append(downlink)
        slowest = min((rate for rate in rates if rate), default=None)
        finish = start + (size / slowest if slowest else 0.0)
        self._link_free_at[direction] = finish
        if source != destination:
            if uplink is not None:
                self._up_free_at[source] = finish
            if downlink is not None:
                self._down_free_at[destination] = finish
        return finish + profile.latency

    def _bind_address(self, host: str, address: Address) -> Address:
        """The address a host's listener or endpoint gets for ``address``."""
        if address.host not in (host, "0.0.0.0", "::"):
            raise UsageError(f"cannot listen on {address}: {address.host} is not host {host}")
        if not self.is_alive(host):
            raise UsageError(f"cannot listen on {address}: host {host} is down")
        return Address(host, address.port)

    def _listen(self, host: str, address: Address) -> _Listener:
        state = self._host(host)
        bound = self._bind_address(host, address)
        if bound.port == 0:
            bound = Address(host, state.free_port(state.listeners))
        elif bound.port in state.listeners:
            raise UsageError(f"cannot listen on {bound}: address already in use")
        listener = state.listeners[bound.port] = _Listener(bound)
        return listener

    def _unlisten(self, host: str, listener: _Listener) -> None:
        listener.shut()
        state = self._hosts[host]
        if state.listeners.get(listener.address.port) is listener:
            del state.listeners[listener.address.port]

    def _open_connection(
        self, source: str, listener: _Listener, dialled: Address
    ) -> MemoryStream | None:
        """A new connection offered to ``listener`` (``dialled`` may be a
        router's port forwarded to it); the client's end, or None if refused."""
        state = self._hosts[source]
        client_address = Address(source, state.free_port(()))
        destination = listener.address.host
        seen_as = self._seen_as(client_address, dialled)
        outbound = _Pipe(self, source, destination, self.window)
        inbound = _Pipe(self, destination, source, self.window)
        connection = _Connection(self, (source, destination), (outbound, inbound))
        client = MemoryStream(connection, outbound, inbound, client_address, dialled)
        server = MemoryStream(connection, inbound, outbound, listener.address, seen_as)
        if not listener.offer(server):
            return None
        self._connections.add(connection)
        self._counters.connections_opened += 1
        return client

    def _join_punches(self, first: _Punch, second: _Punch) -> MemoryStream:
        """Two crossing attempts become one connection (a simultaneous open):
        ``first`` gets its end; the second's end is returned."""
        a, b = first.local.host, second.local.host
        forward = _Pipe(self, a, b, self.window)
        backward = _Pipe(self, b, a, self.window)
        connection = _Connection(self, (a, b), (forward, backward))
        first.stream = MemoryStream(connection, forward, backward, first.local, second.seen_as)
        second.stream = MemoryStream(connection, backward, forward, second.local, first.seen_as)
        self._connections.add(connection)
        self._counters.connections_opened += 1
        first.joined.set()
        return second.stream

    def _drop_datagram(self, size: int) -> None:
        self._counters.datagrams_dropped += 1
        self._counters.datagram_bytes_dropped += size

    def _send_datagram(self, source: Address, data: bytes, destination: Address) -> None:
        self._counters.datagrams_sent += 1
        self._counters.datagram_bytes_sent += len(data)
        profile = self.link(source.host, destination.host)
        # Draw only on lossy links, so that adding a lossless link elsewhere
        # does not change which datagrams a seed loses.
        if profile.loss > 0 and self._random.random() < profile.loss:
            self._drop_datagram(len(data))
            return
        if self._answer_as_router(source, data, destination):
            return
        routed = self._route_datagram(source, destination)
        if routed is None:
            self._drop_datagram(len(data))
            return
        seen_as, destination = routed
        target = self._hosts.get(destination.host)
        endpoint = target.endpoints.get(destination.port) if target is not None else None
        if endpoint is None or not self.reachable(source.host, destination.host):
            self._drop_datagram(len(data))
            return
        arrival = self._transmit(source.host, destination.host, len(data))
        endpoint._deliver(arrival, data, seen_as)

    def _answer_as_router(self, source: Address, data: bytes, destination: Address) -> bool:
        """Whether the datagram was a request to the sender's router's mapping
        service (then answered, unless it made no sense)."""
        home = self._nat_of.get(source.host)
        if (
            home is None
            or not home.profile.port_mapping
            or destination != Address(home.profile.gateway_host, natpmp.SERVER_PORT)
        ):
            return False
        answer = home.answer(data, source, trio.current_time())
        if answer is not None:
            self._send_datagram(destination, answer, source)
        return True

    def _route_datagram(
        self, source: Address, destination: Address
    ) -> tuple[Address, Address] | None:
        """Through the routers on the way: (the source seen at the far end, where
        the datagram lands), or None when a router drops it."""
        now = trio.current_time()
        home = self._nat_of.get(source.host)
        if self._inside_other_lan(source.host, destination.host):
            return None
        seen_as = source
        if home is not None and destination.host not in home.lan:
            seen_as = home.send_out(source, destination, now)
        far = self._public_side(source.host, destination.host)
        if far is not None:
            internal = far.let_in(seen_as, destination.port, now)
            if internal is not None:
                return seen_as, internal
        return seen_as, destination


class MemoryInterface:
    """The :class:`Network` of one memory host."""

    def __init__(self, world: MemoryNetwork, host: str) -> None:
        self.world = world
        self.host = host

    def __repr__(self) -> str:
        return f"<MemoryInterface {self.host}>"

    def spare_port(self) -> int:
        """A port free now, for ``connect(local_port=...)``."""
        state = self.world._host(self.host)
        return state.free_port(state.listeners)

    def default_gateway(self) -> str | None:
        """The router this host is behind, if any (its LAN address)."""
        return self.world.gateway_of(self.host)

    async def connect(self, address: Address, *, local_port: int | None = None) -> trio.abc.Stream:
        world = self.world
        if local_port is not None and address.host in world._hosts and world.is_alive(self.host):
            return await self._connect_from(Address(self.host, local_port), address)
        if not world.is_alive(self.host):
            world._counters.connections_failed += 1
            raise PeerUnavailableError(f"cannot reach {address}: this host ({self.host}) is down")
        if address.host not in world._hosts:
            await trio.lowlevel.checkpoint()
            world._counters.connections_failed += 1
            raise PeerUnavailableError(f"cannot reach {address}: no such host")
        latency = world.link(self.host, address.host).latency
        with trio.move_on_after(world.connect_timeout):
            await trio.sleep(latency)  # our SYN crosses the link
            target = world._stream_target(self.host, address)
            if target is None or not world.reachable(self.host, target.host):
                await trio.sleep_forever()  # nobody answers; the timeout ends this
            listener = world._hosts[target.host].listeners.get(target.port)
            client = world._open_connection(self.host, listener, address) if listener else None
            if client is None:
                await trio.sleep(latency)  # the refusal crosses back
                world._counters.connections_failed += 1
                raise PeerUnavailableError(f"cannot reach {address}: connection refused")
            try:
                await trio.sleep(latency)  # the answer crosses back
            except BaseException:
                client._close_now()
                raise
            return client
        world._counters.connections_failed += 1
        raise PeerUnavailableError(
            f"cannot reach {address}: no answer within {world.connect_timeout:g} s"
        )

    async def _connect_from(self, local: Address, address: Address) -> trio.abc.Stream:
        """``connect`` from a listening port (module docstring: TCP flows)."""
        world = self.world
        now = trio.current_time()
        home = world._nat_of.get(self.host)
        if home is not None and address.host not in home.lan:
            seen_as = home.open_tcp(local, address, now)
        else:
            seen_as = local
        punch = _Punch(local, address, seen_as)
        key = (local, address)
        world._punches[key] = punch
        latency = world.link(self.host, address.host).latency
        try:
            with trio.move_on_after(world.connect_timeout):
                await trio.sleep(latency)  # our SYN crosses
                if punch.stream is not None:  # theirs crossed it first
                    return punch.stream
                target: Address | None = address
                if world._inside_other_lan(self.host, address.host):
                    target = None
                far = world._public_side(self.host, address.host)
                if far is not None:
                    target = far.let_tcp_in(seen_as, address.port, trio.current_time())
                if target is not None and world.reachable(self.host, target.host):
                    other = world._punches.get((target, seen_as))
                    if other is not None and other.stream is None:
                        stream = world._join_punches(other, punch)
                        await trio.sleep(latency)  # the answer crosses back
                        return stream
                    if far is None or target != address:
                        listener = world._hosts[target.host].listeners.get(target.port)
                        if listener is not None:
                            client = world._open_connection(self.host, listener, address)
                            if client is not None:
                                await trio.sleep(latency)
                                return client
                # Dropped on the way, unanswered (TCP would send its SYN
                # again): wait for the other end's attempt to cross ours.
                await punch.joined.wait()
                return punch.end()
        finally:
            if world._punches.get(key) is punch:
                del world._punches[key]
        world._counters.connections_failed += 1
        raise PeerUnavailableError(
            f"cannot reach {address}: no answer within {world.connect_timeout:g} s"
        )

    async def serve(
        self,
        address: Address,
        handler: StreamHandler,
        *,
        task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listener = self.world._listen(self.host, address)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(listener.address)
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(run_handler, handler, stream)
        finally:
            self.world._unlisten(self.host, listener)

    async def open_datagram(self, address: Address) -> DatagramEndpoint:
        world = self.world
        state = world._host(self.host)
        bound = world._bind_address(self.host, address)
        if bound.port == 0:
            bound = Address(self.host, state.free_port(state.endpoints))
        elif bound.port in state.endpoints:
            raise UsageError(f"cannot bind {bound}: address already in use")
        endpoint = MemoryDatagramEndpoint(world, bound)
        state.endpoints[bound.port] = endpoint
        await trio.lowlevel.checkpoint()
        return endpoint


class MemoryDatagramEndpoint:
    """A datagram port of a memory host."""

    def __init__(self, world: MemoryNetwork, local_address: Address) -> None:
        self._world = world
        self._local_address = local_address
        #: (arrival time, sequence number, payload, source): a heap, so that a
        #: datagram over a faster link may overtake, as on a real network.
        self._queue: list[tuple[float, int, bytes, Address]] = []
        self._sequence = 0
        self._lot = trio.lowlevel.ParkingLot()
        #: The deadlines of the receivers waiting now.
        self._waiting: list[trio.CancelScope] = []
        self._closed = False
        self._dead = False

    def __repr__(self) -> str:
        return f"<MemoryDatagramEndpoint {self._local_address}>"

    @property
    def local_address(self) -> Address:
        return self._local_address

    def _check_usable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the datagram endpoint is closed")
        if self._dead:
            raise trio.BrokenResourceError(f"host {self._local_address.host} was killed")

    def _deliver(self, arrival: float, data: bytes, source: Address) -> None:
        if len(self._queue) >= DATAGRAM_QUEUE_LIMIT:
            self._world._drop_datagram(len(data))
            return
        self._sequence += 1
        heapq.heappush(self._queue, (arrival, self._sequence, data, source))
        # A waiting receiver wakes when the first datagram arrives: move its
        # deadline rather than wake it now only to wait again (one wake-up a
        # datagram, not two: a simulation's DHT sends millions).
        for waiting in self._waiting:
            waiting.deadline = min(waiting.deadline, arrival)

    def _discard_queue(self) -> None:
        for _, _, data, _ in self._queue:
            self._world._drop_datagram(len(data))
        self._queue.clear()
        self._lot.unpark_all()

    def _unbind(self) -> None:
        endpoints = self._world._hosts[self._local_address.host].endpoints
        if endpoints.get(self._local_address.port) is self:
            del endpoints[self._local_address.port]

    def _die(self) -> None:
        self._dead = True
        self._discard_queue()

    async def send(self, data: bytes, address: Address) -> None:
        self._check_usable()
        check_datagram_size(data)
        await trio.lowlevel.checkpoint()
        self.send_nowait(data, address)

    def send_nowait(self, data: bytes, address: Address) -> bool:
        # Nothing here waits: the link's queues are modelled as arrival times.
        self._check_usable()
        check_datagram_size(data)
        self._world._send_datagram(self._local_address, bytes(data), address)
        return True

    async def receive(self) -> tuple[bytes, Address]:
        self._check_usable()
        # A cancel point; the schedule point is the wait below, when there is
        # one: a receiver with datagrams already arrived takes them in one go
        # (a simulation's DHT receives millions, each a turn of the scheduler).
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            self._check_usable()
            if self._queue and self._queue[0][0] <= trio.current_time():
                _, _, data, source = heapq.heappop(self._queue)
                if self._world.reachable(source.host, self._local_address.host):
                    return data, source
                self._world._drop_datagram(len(data))  # a partition came up on the way
                continue
            deadline = self._queue[0][0] if self._queue else math.inf
            with trio.move_on_at(deadline) as waiting:
                self._waiting.append(waiting)
                try:
                    await self._lot.park()
                finally:
                    self._waiting.remove(waiting)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._unbind()
            self._discard_queue()
        await trio.lowlevel.checkpoint()
