"""Port mapping: asking the home router to forward a port to this machine.

Nouns:

* **gateway** — the router of the machine's default route
  (``/proc/net/route``, :meth:`~p2pbackup.net.network.TcpNetwork.default_gateway`),
  or on the memory network the router the host is behind; it answers NAT-PMP
  and PCP on UDP port 5351 (:mod:`p2pbackup.net.natpmp` has the messages).
* **port mapper** — what asks one router, over a
  :class:`~p2pbackup.net.network.Network`. :class:`PortMapper` speaks PCP
  first and falls back to NAT-PMP when the router says it does not know PCP
  (an older router). A request is sent again after 0.25 s, 0.5 s, 1 s and
  2 s without an answer, as RFC 6886 asks (cut short: a router that has not
  answered in four seconds is not going to). :class:`UpnpMapper` speaks
  UPnP-IGD (the messages are in :mod:`p2pbackup.net.upnp`): an SSDP search,
  the router's description, SOAP calls. :class:`AnyMapper` tries the first,
  then the second when the router answered nothing, and keeps the one that
  worked.
* **mapping** — :class:`PortMapping`: what the router granted: the public
  address and port, for how long, by which protocol.
* **keeping ports mapped** — :func:`keep_ports_mapped`: a node's role. It maps
  its port for TCP (the storage server) and UDP (the DHT) with a lease of
  :data:`LEASE` seconds, renews both every :data:`RENEW_EVERY` seconds, reports
  each outcome (the public address, or why there is none) and deletes both
  mappings when it stops cleanly.

Errors: a router that refuses, or does not answer, raises
:class:`~p2pbackup.errors.PortMappingError` with the reason in words a person
can act on (:class:`RouterSilentError` when nothing answered at all); a
router that answers garbage raises one too (the codec's
:class:`~p2pbackup.errors.RemoteProtocolError` is named inside it).
"""

from __future__ import annotations

import logging
import os
import socket
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Protocol

import attrs
import trio

from p2pbackup.errors import (
    PeerUnavailableError,
    PortMappingError,
    ProtocolError,
    RemoteProtocolError,
)
from p2pbackup.net import natpmp, upnp
from p2pbackup.net.natpmp import MapAnswer, MapRequest, Transport
from p2pbackup.net.network import Address, DatagramEndpoint, Network, is_ip

log = logging.getLogger(__name__)

#: Seconds of lease asked for; the mapping lapses by itself if the node dies.
LEASE = 3600
#: Seconds between renewals: half the lease, so one lost renewal does no harm.
RENEW_EVERY = 1800.0
#: Seconds to wait for the first answer; doubled at each new try.
FIRST_WAIT = 0.25
TRIES = 4
#: Seconds a clean stop spends deleting its mappings.
DELETE_TIMEOUT = 2.0


class RouterSilentError(PortMappingError):
    """No router answered the port-mapping protocol at all."""


@attrs.frozen
class PortMapping:
    """A port the router forwards to this machine."""

    method: str
    transport: Transport
    internal_port: int
    #: The router's public address and the port it forwards.
    external: Address
    #: Seconds granted.
    lifetime: int
    nonce: bytes = bytes(natpmp.NONCE_SIZE)


def find_gateway(network: Network) -> str | None:
    """The router ``network`` sends through, if it has one and can say."""
    finder = getattr(network, "default_gateway", None)
    return finder() if callable(finder) else None


def local_ip_towards(endpoint: DatagramEndpoint, gateway: str) -> str:
    """This machine's address as the gateway sees it (PCP asks for it)."""
    bound = endpoint.local_address.host
    if bound not in ("0.0.0.0", "::"):
        return bound
    # Connecting a UDP socket sends nothing; it only asks the kernel for a route.
    family = socket.AF_INET6 if ":" in gateway else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((gateway, natpmp.SERVER_PORT))
            return str(probe.getsockname()[0])
    except OSError:
        return bound


class PortMapper:
    """Asks one gateway for port mappings (see the module docstring)."""

    def __init__(
        self,
        network: Network,
        gateway: str,
        *,
        random_bytes: Callable[[int], bytes] = os.urandom,
        first_wait: float = FIRST_WAIT,
        tries: int = TRIES,
    ) -> None:
        self.network = network
        self.gateway = Address(gateway, natpmp.SERVER_PORT)
        self.random_bytes = random_bytes
        self.first_wait = first_wait
        self.tries = tries
        #: "PCP" until the router says it speaks only NAT-PMP.
        self.method = "PCP"
        self._external_ip: str | None = None

    async def map(
        self,
        transport: Transport,
        internal_port: int,
        *,
        external_port: int = 0,
        lifetime: int = LEASE,
    ) -> PortMapping:
        """Ask for ``internal_port`` to be forwarded (the same port outside if
        the router agrees, ``external_port`` if given)."""
        nonce = self.random_bytes(natpmp.NONCE_SIZE)
        return await self._ask(
            transport, internal_port, external_port or internal_port, lifetime, nonce
        )

    async def unmap(self, mapping: PortMapping) -> None:
        """Delete a mapping (a lease of 0)."""
        await self._ask(mapping.transport, mapping.internal_port, 0, 0, mapping.nonce)

    async def _ask(
        self, transport: Transport, internal: int, external: int, lifetime: int, nonce: bytes
    ) -> PortMapping:
        endpoint = await self.network.open_datagram(Address("0.0.0.0", 0))
        try:
            client_ip = local_ip_towards(endpoint, self.gateway.host)
            request = MapRequest(transport, internal, external, lifetime, nonce, client_ip)
            answer: MapAnswer | None = None
            if self.method == "PCP" and not is_ip(client_ip):
                self.method = "NAT-PMP"  # PCP needs this machine's IP address
            if self.method == "PCP":
                answer = await self._exchange(endpoint, natpmp.encode_pcp_map(request), pcp=True)
                if answer is None:
                    self.method = "NAT-PMP"
                    log.info("the router at %s speaks NAT-PMP, not PCP", self.gateway.host)
            if self.method == "NAT-PMP":
                answer = await self._exchange(
                    endpoint, natpmp.encode_natpmp_map(request), pcp=False
                )
            if answer is None:  # NAT-PMP has no older protocol to fall back to
                raise PortMappingError(f"the router at {self.gateway.host} speaks no known version")
            if not answer.ok:
                reason = natpmp.describe_result(self.method, answer.result)
                raise PortMappingError(f"the router at {self.gateway.host} refused: {reason}")
            if (
                answer.transport != transport
                or answer.internal_port != internal
                or (self.method == "PCP" and answer.nonce != nonce)
            ):
                raise PortMappingError(
                    f"the router at {self.gateway.host} answered another request than ours"
                )
            if lifetime == 0:
                external_ip = self._external_ip or self.gateway.host
            else:
                external_ip = answer.external_ip or await self._ask_address(endpoint)
            return PortMapping(
                self.method,
                transport,
                internal,
                Address(external_ip, answer.external_port),
                answer.lifetime,
                nonce,
            )
        finally:
            await endpoint.aclose()

    async def _ask_address(self, endpoint: DatagramEndpoint) -> str:
        """NAT-PMP's separate question: the router's public address."""
        data = await self._send_until_answered(endpoint, natpmp.encode_address_request())
        try:
            answer = natpmp.decode_address_answer(data)
        except ProtocolError as error:
            raise PortMappingError(f"the router at {self.gateway.host}: {error}") from None
        if answer.external_ip is None:
            reason = natpmp.describe_result("NAT-PMP", answer.result)
            raise PortMappingError(
                f"the router at {self.gateway.host} has no public address: {reason}"
            )
        self._external_ip = answer.external_ip
        return answer.external_ip

    async def _exchange(
        self, endpoint: DatagramEndpoint, request: bytes, *, pcp: bool
    ) -> MapAnswer | None:
        """The answer to one mapping request; None when a PCP request got
        "unsupported version" (the router speaks only NAT-PMP)."""
        data = await self._send_until_answered(endpoint, request)
        try:
            if pcp and natpmp.unsupported_version(data):
                return None
            return natpmp.decode_pcp_map(data) if pcp else natpmp.decode_natpmp_map(data)
        except ProtocolError as error:
            raise PortMappingError(f"the router at {self.gateway.host}: {error}") from None

    async def _send_until_answered(self, endpoint: DatagramEndpoint, request: bytes) -> bytes:
        # Both protocols answer with the request's opcode plus 128, a NAT-PMP
        # router refusing a PCP request too.
        opcode = 0x80 | request[1]
        wait = self.first_wait
        for _ in range(self.tries):
            await endpoint.send(request, self.gateway)
            with trio.move_on_after(wait):
                while True:
                    data, source = await endpoint.receive()
                    # Only the gateway's answers count, and only to this question
                    # (a late answer to an earlier try is as good as a new one).
                    if source.host == self.gateway.host and data[1:2] == bytes((opcode,)):
                        return data
            wait *= 2
        raise RouterSilentError(
            f"the router at {self.gateway.host} did not answer NAT-PMP or PCP "
            "(turn on UPnP/NAT-PMP in its settings, or forward the port by hand)"
        )


@attrs.frozen
class MappingOutcome:
    """One round of :func:`keep_ports_mapped`: the public address, or why none."""

    external: Address | None
    reason: str | None = None


async def keep_ports_mapped(
    mapper: Mapper,
    port: int,
    report: Callable[[MappingOutcome], None],
    *,
    lease: int = LEASE,
    renew_every: float = RENEW_EVERY,
) -> None:
    """Map ``port`` for TCP and UDP now and every ``renew_every`` seconds
    until cancelled, reporting each outcome; on a stop, delete the mappings."""
    held: dict[Transport, PortMapping] = {}
    try:
        while True:
            try:
                for transport in (Transport.TCP, Transport.UDP):
                    wanted = held[transport].external.port if transport in held else port
                    held[transport] = await mapper.map(
                        transport, port, external_port=wanted, lifetime=lease
                    )
            except PortMappingError as error:
                log.warning("port mapping: %s", error)
                report(MappingOutcome(None, str(error)))
            else:
                tcp, udp = held[Transport.TCP], held[Transport.UDP]
                if tcp.external.port != udp.external.port:
                    # One address serves both (the DHT runs on the storage port).
                    log.warning(
                        "port mapping: the router forwards TCP %s but UDP port %d; "
                        "the DHT may not be reached",
                        tcp.external,
                        udp.external.port,
                    )
                log.info("port mapping: %s forwards %s to port %d", tcp.method, tcp.external, port)
                report(MappingOutcome(tcp.external))
            await trio.sleep(renew_every)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(DELETE_TIMEOUT):
            for mapping in held.values():
                try:
                    await mapper.unmap(mapping)
                except PortMappingError as error:
                    log.info("port mapping: not deleted, it lapses by itself: %s", error)


# -- UPnP-IGD ------------------------------------------------------------------------------


#: Seconds an SSDP search waits for gateways to answer (its MX is 2).
SEARCH_WAIT = 2.5
#: Seconds one HTTP exchange with the router may take.
HTTP_TIMEOUT = 5.0


class UpnpMapper:
    """Maps ports through a UPnP Internet gateway device (:mod:`.upnp`)."""

    method = "UPnP"

    def __init__(self, network: Network, *, location: str | None = None) -> None:
        self.network = network
        #: The description URL (found by an SSDP search when not given).
        self.location = location
        self._service: upnp.GatewayService | None = None

    async def _search(self) -> str:
        endpoint = await self.network.open_datagram(Address("0.0.0.0", 0))
        try:
            group = Address(upnp.SSDP_GROUP, upnp.SSDP_PORT)
            await endpoint.send(upnp.search_request(), group)
            with trio.move_on_after(SEARCH_WAIT):
                while True:
                    data, source = await endpoint.receive()
                    try:
                        return upnp.parse_search_answer(data)
                    except ProtocolError as error:
                        log.debug("port mapping: an SSDP answer from %s: %s", source, error)
        finally:
            await endpoint.aclose()
        raise RouterSilentError("no UPnP gateway answered a search on this network")

    async def _http(self, url: str, request: bytes) -> tuple[int, bytes, str]:
        """The status, body and our own address of one HTTP exchange."""
        parts = urllib.parse.urlsplit(url)
        where = Address(parts.hostname or "", parts.port or 80)
        try:
            with trio.fail_after(HTTP_TIMEOUT):
                stream = await self.network.connect(where)
                try:
                    local = _local_host(stream)
                    await stream.send_all(request)
                    received = bytearray()
                    while chunk := await stream.receive_some(upnp.MAX_ANSWER_SIZE):
                        received += chunk
                        if len(received) > upnp.MAX_ANSWER_SIZE:
                            raise RemoteProtocolError(
                                f"the router's answer at {where} is longer than "
                                f"{upnp.MAX_ANSWER_SIZE} bytes"
                            )
                finally:
                    await trio.aclose_forcefully(stream)
            status, body = upnp.http_body(bytes(received), f"the router's answer at {where}")
        except trio.TooSlowError:
            raise PortMappingError(f"the UPnP gateway at {where} did not answer in time") from None
        except (PeerUnavailableError, trio.BrokenResourceError) as error:
            raise PortMappingError(f"the UPnP gateway at {where}: {error}") from None
        except ProtocolError as error:
            raise PortMappingError(str(error)) from None
        return status, body, local

    async def _gateway(self) -> upnp.GatewayService:
        if self._service is None:
            location = self.location or await self._search()
            status, body, _ = await self._http(location, upnp.http_get(location))
            if status != 200:
                raise PortMappingError(f"the router's UPnP description answered HTTP {status}")
            try:
                self._service = upnp.parse_description(body, location)
            except ProtocolError as error:
                raise PortMappingError(str(error)) from None
            self.location = location
        return self._service

    async def _call(
        self, action: str, arguments: list[tuple[str, str]]
    ) -> tuple[Mapping[str, str], str]:
        service = await self._gateway()
        status, body, local = await self._http(
            service.control_url, upnp.soap_request(service, action, arguments)
        )
        try:
            return upnp.parse_soap_answer(status, body, action), local
        except ProtocolError as error:
            raise PortMappingError(str(error)) from None

    async def map(
        self,
        transport: Transport,
        internal_port: int,
        *,
        external_port: int = 0,
        lifetime: int = LEASE,
    ) -> PortMapping:
        external_port = external_port or internal_port
        # The internal client is this machine as the router sees it: learnt
        # from a first call, since a machine may have several addresses.
        answer, local = await self._call("GetExternalIPAddress", [])
        external_ip = answer.get("NewExternalIPAddress", "")
        if not is_ip(external_ip):
            raise PortMappingError(f"the UPnP gateway names no public address ({external_ip!r})")
        arguments = [
            ("NewRemoteHost", ""),
            ("NewExternalPort", str(external_port)),
            ("NewProtocol", transport.name),
            ("NewInternalPort", str(internal_port)),
            ("NewInternalClient", local),
            ("NewEnabled", "1"),
            ("NewPortMappingDescription", "p2pbackup"),
            ("NewLeaseDuration", str(lifetime)),
        ]
        await self._call("AddPortMapping", arguments)
        return PortMapping(
            self.method, transport, internal_port, Address(external_ip, external_port), lifetime
        )

    async def unmap(self, mapping: PortMapping) -> None:
        await self._call(
            "DeletePortMapping",
            [
                ("NewRemoteHost", ""),
                ("NewExternalPort", str(mapping.external.port)),
                ("NewProtocol", mapping.transport.name),
            ],
        )


def _local_host(stream: trio.abc.Stream) -> str:
    local = getattr(stream, "local_address", None)  # a memory stream's
    if isinstance(local, Address):
        return local.host
    if isinstance(stream, trio.SocketStream):
        return str(stream.socket.getsockname()[0])
    raise PortMappingError("cannot tell this machine's address on the router's network")


# -- whichever the router speaks -----------------------------------------------------------


class Mapper(Protocol):
    """What :func:`keep_ports_mapped` needs of a port mapper."""

    async def map(
        self,
        transport: Transport,
        internal_port: int,
        *,
        external_port: int = 0,
        lifetime: int = LEASE,
    ) -> PortMapping: ...

    async def unmap(self, mapping: PortMapping) -> None: ...


class AnyMapper:
    """NAT-PMP/PCP first, UPnP-IGD when the router answers neither; the one
    that worked is used from then on."""

    def __init__(self, network: Network, gateway: str) -> None:
        self.gateway = gateway
        self.pmp = PortMapper(network, gateway)
        self.upnp = UpnpMapper(network)
        self._chosen: Mapper | None = None

    async def map(
        self,
        transport: Transport,
        internal_port: int,
        *,
        external_port: int = 0,
        lifetime: int = LEASE,
    ) -> PortMapping:
        if self._chosen is not None:
            return await self._chosen.map(
                transport, internal_port, external_port=external_port, lifetime=lifetime
            )
        try:
            mapping = await self.pmp.map(
                transport, internal_port, external_port=external_port, lifetime=lifetime
            )
            self._chosen = self.pmp
        except RouterSilentError:
            try:
                mapping = await self.upnp.map(
                    transport, internal_port, external_port=external_port, lifetime=lifetime
                )
            except RouterSilentError:
                raise RouterSilentError(
                    f"the router at {self.gateway} did not answer NAT-PMP, PCP or UPnP "
                    "(turn on UPnP/NAT-PMP in its settings, or forward the port by hand)"
                ) from None
            self._chosen = self.upnp
        return mapping

    async def unmap(self, mapping: PortMapping) -> None:
        await (self.upnp if mapping.method == UpnpMapper.method else self.pmp).unmap(mapping)
