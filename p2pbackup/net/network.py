"""The network as node code sees it: streams to addresses, listeners, datagrams.

Node code does all its networking through a :class:`Network` and cannot tell
which implementation it was given: :class:`TcpNetwork`, the real one (TCP
streams with ``TCP_NODELAY`` and UDP datagrams through trio), or the memory
network of :mod:`p2pbackup.net.memory`, a simulated world inside one trio run.

Nouns:

* **address** — :class:`Address`: a host and a port, written ``host:port`` or
  ``[v6 address]:port``. Port 0 means "any free port" and only makes sense for
  listening.
* **handler** — what :meth:`Network.serve` runs for each accepted stream, in a
  task of its own. The stream is closed when the handler returns; a handler
  that raises is logged and the listener goes on.
* **datagram endpoint** — :class:`DatagramEndpoint`: a bound UDP-like port
  (unreliable, unordered, at most :data:`MAX_DATAGRAM_SIZE` bytes each).
* **both families** — :data:`BOTH_FAMILIES`, ``::``: listening there (TCP or
  UDP) takes IPv6 and IPv4 on one socket where the host has IPv6, and IPv4
  alone where it has not. Peers that come over IPv4 are named by their
  IPv4 address, never the ``::ffff:`` form the socket reports.

Failures to reach a peer are :class:`~p2pbackup.errors.PeerUnavailableError`,
naming the address and the reason; a stream that dies underneath its user
raises ``trio.BrokenResourceError``, as trio's own streams do.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import re
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Protocol

import attrs
import trio

from p2pbackup.errors import LocalProtocolError, PeerUnavailableError, UsageError

log = logging.getLogger(__name__)

#: Seconds ``connect`` waits for an answer unless a network is told otherwise.
DEFAULT_CONNECT_TIMEOUT = 10.0


#: The largest datagram payload (the UDP limit over IPv4).
MAX_DATAGRAM_SIZE = 65507


StreamHandler = Callable[[trio.abc.Stream], Awaitable[None]]


# -- addresses -----------------------------------------------------------------------------

_PORT_DIGITS = re.compile(r"[0-9]+")
#: Hosts are names or IP literals; whitespace and brackets would make the
#: written form ambiguous.
_BAD_HOST_CHARACTER = re.compile(r"[\s\[\]\x00-\x1f\x7f]")


def _check_port(instance: object, attribute: object, port: int) -> None:
    if not 0 <= port <= 65535:
        raise UsageError(f"port {port} is out of range 1..65535")


def check_host(instance: object, attribute: object, host: str) -> None:
    if not host:
        raise UsageError("an address needs a host; it is empty")
    bad = _BAD_HOST_CHARACTER.search(host)
    if bad is not None:
        raise UsageError(f"host {host!r} contains {bad.group()!r}, which no host name has")


@attrs.frozen
class Address:
    """A host and a port; ``str()`` and :meth:`parse` are inverses."""

    host: str = attrs.field(validator=check_host)
    port: int = attrs.field(validator=_check_port)

    @classmethod
    def parse(cls, text: str, *, allow_port_zero: bool = True) -> Address:
        """Read ``host:port`` or ``[v6 address]:port``.

        Port 0 ("any free port", for listening) is accepted unless
        ``allow_port_zero`` is false, as it should be for an address to dial.
        """
        stripped = text.strip()
        if stripped.startswith("["):
            end = stripped.find("]")
            if end < 0:
                raise UsageError(f"address {text!r} opens '[' but never closes it")
            host, rest = stripped[1:end], stripped[end + 1 :]
            if not rest.startswith(":") or len(rest) == 1:
                raise UsageError(f"address {text!r} is missing its port (expected [HOST]:PORT)")
            port_text = rest[1:]
        else:
            host, colon, port_text = stripped.rpartition(":")
            if not colon or not port_text:
                raise UsageError(f"address {text!r} is missing its port (expected HOST:PORT)")
            if ":" in host:
                raise UsageError(
                    f"address {text!r}: an IPv6 address needs brackets, as [{host}]:{port_text}"
                )
        if not host:
            raise UsageError(f"address {text!r} has an empty host (expected HOST:PORT)")
        if _PORT_DIGITS.fullmatch(port_text) is None:
            raise UsageError(f"address {text!r}: port {port_text!r} is not a number")
        port = int(port_text)
        if not (0 if allow_port_zero else 1) <= port <= 65535:
            raise UsageError(f"address {text!r}: port {port} is out of range 1..65535")
        try:
            return cls(host, port)
        except UsageError as exc:
            raise UsageError(f"address {text!r}: {exc}") from None

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    def dialled_locally(self) -> Address:
        """Where a process on this host dials a server bound here: a
        wildcard bind (every interface) is reached on its family's loopback."""
        if self.host == "0.0.0.0":
            return Address("127.0.0.1", self.port)
        if self.host == BOTH_FAMILIES:
            # A socket of both families takes IPv4 too, and IPv4 loopback is
            # there even where IPv6 is turned off.
            return Address("127.0.0.1", self.port)
        return self


# -- the interface -------------------------------------------------------------------------


class DatagramEndpoint(Protocol):
    """A bound datagram port: unreliable, unordered, message-sized sends."""

    @property
    def local_address(self) -> Address:
        """Where this endpoint is bound (never port 0)."""
        ...

    async def send(self, data: bytes, address: Address) -> None:
        """Send one datagram; silently lost if nothing receives it."""
        ...

    def send_nowait(self, data: bytes, address: Address) -> bool:
        """Send one datagram now, as :meth:`send` does, if this endpoint
        can without waiting; False, and nothing sent, if it cannot."""
        ...

    async def receive(self) -> tuple[bytes, Address]:
        """The next datagram and the address it came from."""
        ...

    async def aclose(self) -> None:
        """Unbind; a blocked ``receive`` raises ``trio.ClosedResourceError``."""
        ...


class Network(Protocol):
    """Everything node code may do on a network."""

    async def connect(self, address: Address, *, local_port: int | None = None) -> trio.abc.Stream:
        """A stream to whoever serves ``address``, or PeerUnavailableError.

        ``local_port``: dial from this port, the one this host listens on
        (a **shared port**), so that a router that keeps ports maps the
        connection to the port its friends were told; two hosts that dial
        each other so at once make one connection (a simultaneous open).
        """
        ...

    async def serve(
        self,
        address: Address,
        handler: StreamHandler,
        *,
        task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept streams on ``address`` until cancelled, one handler task each.

        ``task_status.started`` receives the bound address (a real port when
        ``address.port`` is 0).
        """
        ...

    async def open_datagram(self, address: Address) -> DatagramEndpoint:
        """A datagram endpoint bound to ``address`` (port 0: any free port)."""
        ...


def peer_address(stream: trio.abc.Stream) -> Address | None:
    """The remote address of a stream that a Network made, if it can be known."""
    remote = getattr(stream, "remote_address", None)  # a memory stream's
    if isinstance(remote, Address):
        return remote
    if isinstance(stream, trio.SocketStream):
        try:
            sockaddr = stream.socket.getpeername()
        except OSError:
            return None
        return Address(unmapped(sockaddr[0]), sockaddr[1])
    return None


def local_address(stream: trio.abc.Stream) -> Address | None:
    """This end's address of a stream that a Network made, if it can be known."""
    local = getattr(stream, "local_address", None)  # a memory stream's
    if isinstance(local, Address):
        return local
    if isinstance(stream, trio.SocketStream):
        try:
            sockaddr = stream.socket.getsockname()
        except OSError:
            return None
        return Address(unmapped(sockaddr[0]), sockaddr[1])
    return None


#: Where a node listens on every interface of both IP families (module docstring).
BOTH_FAMILIES = "::"
_MAPPED_PREFIX = "::ffff:"


def unmapped(host: str) -> str:
    """An IPv4 peer as a dual-stack socket reports it (``::ffff:a.b.c.d``),
    as its IPv4 address; any other host as it is."""
    if host.lower().startswith(_MAPPED_PREFIX) and "." in host:
        return host[len(_MAPPED_PREFIX) :]
    return host


def is_ip(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address (not a name)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_ipv4(host: str) -> bool:
    """Whether ``host`` is an IPv4 address."""
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _both_families_socket(kind: socket.SocketKind, port: int) -> trio.socket.SocketType | None:
    """A socket bound to ``[::]:port`` that takes IPv4 too; None where the
    host has no IPv6 (the caller binds ``0.0.0.0`` instead)."""
    try:
        sock = trio.socket.socket(socket.AF_INET6, kind)
    except OSError:
        return None
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    except OSError:
        sock.close()
        return None
    return sock


async def run_handler(handler: StreamHandler, stream: trio.abc.Stream) -> None:
    """Run one connection's handler; its failure is that connection's alone."""
    # Read now: a closed socket no longer knows its peer.
    peer = peer_address(stream)
    try:
        await handler(stream)
    except Exception:
        # The traceback names code and exception messages, never stream data.
        log.exception("handler for the connection from %s failed", peer)
    finally:
        await trio.aclose_forcefully(stream)


def check_datagram_size(data: bytes) -> None:
    if len(data) > MAX_DATAGRAM_SIZE:
        raise LocalProtocolError(
            f"a datagram of {len(data)} bytes exceeds the limit of {MAX_DATAGRAM_SIZE}"
        )


# -- real sockets --------------------------------------------------------------------------


def os_reason(exc: BaseException) -> str:
    """Words for why a socket call failed, from the first errno found inside."""
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop(0)
        if isinstance(current, OSError) and current.errno is not None:
            if isinstance(current, socket.gaierror):
                return f"cannot resolve the host ({current.strerror})"
            return os.strerror(current.errno).lower()
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        if current.__cause__ is not None:
            pending.append(current.__cause__)
    return str(exc) or type(exc).__name__


#: Where Linux lists its IPv4 routes.
ROUTE_TABLE = "/proc/net/route"


def default_gateway_in(table: str) -> str | None:
    """The IPv4 default route's gateway in the text of ``/proc/net/route``."""
    for line in table.splitlines()[1:]:
        fields = line.split()
        # Destination 0.0.0.0 with the RTF_GATEWAY flag (0x2): the default route.
        if len(fields) < 4 or fields[1] != "00000000":
            continue
        try:
            flags, gateway = int(fields[3], 16), int(fields[2], 16)
        except ValueError:
            continue
        if flags & 0x2 and gateway:
            # The kernel prints the address as a number in host byte order.
            return socket.inet_ntoa(gateway.to_bytes(4, sys.byteorder))
    return None


class TcpNetwork:
    """The real network: TCP streams and UDP datagrams through trio."""

    def __init__(self, *, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
        self.connect_timeout = connect_timeout

    def spare_port(self) -> int:
        """A TCP port free now, for ``connect(local_port=...)``."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("0.0.0.0", 0))
            port: int = probe.getsockname()[1]
        return port

    def default_gateway(self) -> str | None:
        """The router of this machine's default IPv4 route, if it has one."""
        try:
            with open(ROUTE_TABLE, encoding="ascii", errors="replace") as table:
                return default_gateway_in(table.read(1 << 20))
        except OSError:
            return None

    async def connect(self, address: Address, *, local_port: int | None = None) -> trio.abc.Stream:
        with trio.move_on_after(self.connect_timeout):
            try:
                if local_port is not None:
                    return await _connect_from(local_port, address)
                # trio's SocketStream turns on TCP_NODELAY itself: our frames
                # are written whole, so Nagle's delay would only add latency.
                return await trio.open_tcp_stream(address.host, address.port)
            except OSError as exc:
                raise PeerUnavailableError(f"cannot reach {address}: {os_reason(exc)}") from None
        raise PeerUnavailableError(
            f"cannot reach {address}: no answer within {self.connect_timeout:g} s"
        )

    async def serve(
        self,
        address: Address,
        handler: StreamHandler,
        *,
        task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            if address.host == BOTH_FAMILIES:
                listeners = await _listen_on_both_families(address.port)
            elif is_ip(address.host):
                listeners = await _listen_at(address.host, address.port)
            else:
                listeners = await trio.open_tcp_listeners(address.port, host=address.host)
        except OSError as exc:
            raise UsageError(f"cannot listen on {address}: {os_reason(exc)}") from None
        if address.port == 0 and len(listeners) > 1:
            # A name that resolves to several addresses gets a different free
            # port on each; keep one, so that the address reported reaches it.
            for extra in listeners[1:]:
                await extra.aclose()
            listeners = listeners[:1]
        sockaddr = listeners[0].socket.getsockname()
        bound = Address(sockaddr[0], sockaddr[1])

        async def handle(stream: trio.SocketStream) -> None:
            await run_handler(handler, stream)

        task_status.started(bound)
        await trio.serve_listeners(handle, listeners)

    async def open_datagram(self, address: Address) -> DatagramEndpoint:
        host = address.host
        sock = None
        if host == BOTH_FAMILIES:
            sock = _both_families_socket(socket.SOCK_DGRAM, address.port)
            if sock is None:
                host = "0.0.0.0"
        if sock is None:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = trio.socket.socket(family, socket.SOCK_DGRAM)
        try:
            await sock.bind((host, address.port))
        except OSError as exc:
            sock.close()
            raise UsageError(f"cannot bind {address}: {os_reason(exc)}") from None
        sockaddr = sock.getsockname()
        return UdpEndpoint(sock, Address(sockaddr[0], sockaddr[1]))


def _share_port(sock: trio.socket.SocketType) -> None:
    """Let ``sock`` bind a port that a listener of this process holds, and the
    listener be bound beside such sockets: ``connect(local_port=...)``."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


async def _connect_from(local_port: int, address: Address) -> trio.SocketStream:
    """A TCP stream to ``address`` from ``local_port``, shared with this
    node's listener (``Network.connect``)."""
    infos = await trio.socket.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    if not infos:
        raise OSError(errno.EHOSTUNREACH, os.strerror(errno.EHOSTUNREACH))
    family, kind, proto, _, sockaddr = infos[0]
    sock = trio.socket.socket(family, kind, proto)
    try:
        _share_port(sock)
        if family == socket.AF_INET6:
            await sock.bind(("::", local_port))
        else:
            await sock.bind(("0.0.0.0", local_port))
        await sock.connect(sockaddr)
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def _check_port_free(family: socket.AddressFamily, host: str, port: int) -> None:
    """OSError (address in use) if another socket listens on ``port``: a
    listener that shares its port would otherwise share it with another
    program's listener too (SO_REUSEPORT balances connections between them)."""
    if port == 0:
        return
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host == BOTH_FAMILIES:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        probe.bind((host, port))
    finally:
        probe.close()


async def _listen_at(host: str, port: int) -> list[trio.SocketListener]:
    """One listener on ``host:port`` (an IP literal) that shares its port
    with the connections dialled from it (:func:`_share_port`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    _check_port_free(family, host, port)
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        _share_port(sock)
        await sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return [trio.SocketListener(sock)]


async def _listen_on_both_families(port: int) -> list[trio.SocketListener]:
    """One listener on ``[::]:port`` taking both families, or on
    ``0.0.0.0:port`` where the host has no IPv6."""
    sock = _both_families_socket(socket.SOCK_STREAM, port)
    if sock is None:
        return await _listen_at("0.0.0.0", port)
    try:
        _check_port_free(socket.AF_INET6, BOTH_FAMILIES, port)
        _share_port(sock)
        await sock.bind((BOTH_FAMILIES, port))
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return [trio.SocketListener(sock)]


class UdpEndpoint:
    """A real UDP socket as a :class:`DatagramEndpoint`."""

    def __init__(self, sock: trio.socket.SocketType, local_address: Address) -> None:
        self._socket = sock
        self._local_address = local_address

    @property
    def local_address(self) -> Address:
        return self._local_address

    async def send(self, data: bytes, address: Address) -> None:
        check_datagram_size(data)
        host = address.host
        if self._socket.family == socket.AF_INET6 and is_ipv4(host):
            # A socket of both families reaches IPv4 peers at their mapped form.
            host = _MAPPED_PREFIX + host
        try:
            await self._socket.sendto(data, (host, address.port))
        except OSError as exc:
            if self._socket.fileno() < 0:
                raise trio.ClosedResourceError("the datagram endpoint is closed") from None
            # UDP promises nothing: an unreachable destination is a lost datagram.
            log.debug("datagram to %s lost: %s", address, os_reason(exc))

    def send_nowait(self, data: bytes, address: Address) -> bool:
        # A socket may have to wait (a name to resolve, a full send buffer):
        # trio's ``sendto`` does, so always :meth:`send`.
        return False

    async def receive(self) -> tuple[bytes, Address]:
        while True:
            try:
                data, sockaddr = await self._socket.recvfrom(MAX_DATAGRAM_SIZE + 1)
            except (ConnectionRefusedError, ConnectionResetError):
                # Some systems report an earlier send's ICMP error here.
                continue
            except OSError as exc:
                if self._socket.fileno() < 0 or exc.errno == errno.EBADF:
                    raise trio.ClosedResourceError("the datagram endpoint is closed") from None
                raise
            return data, Address(unmapped(sockaddr[0]), sockaddr[1])

    async def aclose(self) -> None:
        self._socket.close()
        await trio.lowlevel.checkpoint()
