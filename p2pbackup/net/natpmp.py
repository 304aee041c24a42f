"""NAT-PMP (RFC 6886) and PCP (RFC 6887) messages: codecs, sans-IO.

A home router forwards a port of its public address to a machine behind it when
that machine asks: NAT-PMP and its successor PCP are the small UDP protocols for
asking, spoken to the router (the **gateway**) on port :data:`SERVER_PORT`.
This module turns their messages into bytes and back and does no I/O; the trio
client is :mod:`p2pbackup.net.portmap`; the memory network's routers answer
with the same codecs (the router's side is at the end of this module).

Nouns:

* **protocol** — what a mapping forwards: :class:`Transport` TCP or UDP. A node
  maps both (its storage server is TCP, its DHT is UDP on the same port).
* **mapping request** — :class:`MapRequest`: forward ``external_port``
  (a suggestion; 0 lets the router choose) of the public address to
  ``internal_port`` of the asking machine, for ``lifetime`` seconds (0 deletes
  the mapping). The same value is encoded as NAT-PMP or as PCP's MAP opcode.
* **mapping answer** — :class:`MapAnswer`: the result code and, on success, the
  external port and lifetime granted (and, from PCP, the external address).
* **address request / answer** — NAT-PMP's opcode 0: the router's public IPv4
  address (:class:`AddressAnswer`). PCP carries the address in every answer.
* **result code** — :class:`NatPmpResult` or :class:`PcpResult`; 0 is success.
  :func:`describe_result` words a failure for a person.

Errors: bytes that are not a well-formed answer of the expected kind raise
:class:`~p2pbackup.errors.RemoteProtocolError` naming the problem (the router
broke the protocol), never anything else; encoding a request out of bounds
raises :class:`~p2pbackup.errors.LocalProtocolError`.
"""

from __future__ import annotations

import enum
import ipaddress
import struct

import attrs

from p2pbackup.errors import LocalProtocolError, RemoteProtocolError

#: The port NAT-PMP and PCP servers listen on (both protocols share it).
SERVER_PORT = 5351
#: NAT-PMP's version number, and PCP's.
NATPMP_VERSION = 0
PCP_VERSION = 2
#: Longest lifetime a request may carry (PCP and NAT-PMP use 32-bit seconds).
MAX_LIFETIME = 0xFFFFFFFF
#: Bytes of PCP's mapping nonce.
NONCE_SIZE = 12
#: Largest datagram either protocol sends (RFC 6887 section 7: 1100 bytes).
MAX_MESSAGE_SIZE = 1100

_NATPMP_ADDRESS_OPCODE = 0
_ANSWER_BIT = 0x80
_PCP_MAP_OPCODE = 1
_PCP_HEADER = struct.Struct("!BBHI16s")  # version, R|opcode, reserved, lifetime, client IP
_PCP_ANSWER_HEADER = struct.Struct("!BBBBII12s")  # ..., result, lifetime, epoch, reserved
_PCP_MAP = struct.Struct("!12sB3sHH16s")  # nonce, protocol, reserved, ports, external IP
_NATPMP_MAP = struct.Struct("!BBHHHI")  # version, opcode, reserved, ports, lifetime
_NATPMP_MAP_ANSWER = struct.Struct("!BBHIHHI")  # ..., result, epoch, ports, lifetime
_NATPMP_ADDRESS_ANSWER = struct.Struct("!BBHI4s")  # ..., result, epoch, address


class Transport(enum.IntEnum):
    """What a mapping forwards; the values are IANA protocol numbers (PCP's)."""

    TCP = 6
    UDP = 17

    @property
    def natpmp_opcode(self) -> int:
        return 2 if self is Transport.TCP else 1


class NatPmpResult(enum.IntEnum):
    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    NOT_AUTHORIZED = 2
    NETWORK_FAILURE = 3
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5


class PcpResult(enum.IntEnum):
    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13


_WORDS = {
    1: "it does not speak this protocol version",
    2: "it does not allow port mappings (look for UPnP/NAT-PMP in its settings)",
}
_NATPMP_WORDS = {
    3: "it has no public address itself (is it behind another router?)",
    4: "it has no room for another mapping",
    5: "it does not know this request",
}
_PCP_WORDS = {
    3: "it found the request malformed",
    4: "it does not know this request",
    7: "it has no public address itself (is it behind another router?)",
    8: "it has no room for another mapping",
    10: "this machine has used up its mapping quota",
    11: "it cannot give the external port asked for",
    12: "it sees this machine at another address (is there a second router?)",
}


def describe_result(protocol: str, code: int) -> str:
    """Why a router refused, in words a person can act on."""
    table = {**_WORDS, **(_PCP_WORDS if protocol == "PCP" else _NATPMP_WORDS)}
    return table.get(code, f"it answered with {protocol} result code {code}")


def _check_port(value: int, what: str) -> None:
    if not 0 <= value <= 0xFFFF:
        raise LocalProtocolError(f"{what} {value} is out of range 0..65535")


def _check_lifetime(instance: object, attribute: object, value: int) -> None:
    if not 0 <= value <= MAX_LIFETIME:
        raise LocalProtocolError(f"a mapping lifetime of {value} s is out of range")


@attrs.frozen
class MapRequest:
    """Ask for (or, with lifetime 0, delete) one port mapping."""

    transport: Transport
    internal_port: int
    #: The port wanted outside; 0 lets the router choose.
    external_port: int
    lifetime: int = attrs.field(validator=_check_lifetime)
    #: PCP only: ties answers and renewals to one mapping.
    nonce: bytes = bytes(NONCE_SIZE)
    #: PCP only: the asking machine's address, as it believes it to be.
    client_ip: str = "0.0.0.0"

    def __attrs_post_init__(self) -> None:
        _check_port(self.internal_port, "internal port")
        _check_port(self.external_port, "external port")
        if len(self.nonce) != NONCE_SIZE:
            raise LocalProtocolError(f"a PCP nonce has {NONCE_SIZE} bytes, not {len(self.nonce)}")


@attrs.frozen
class MapAnswer:
    """A router's answer to a :class:`MapRequest`."""

    transport: Transport
    result: int
    internal_port: int
    external_port: int
    lifetime: int
    #: Router's seconds since it started (or lost its mappings).
    epoch: int
    nonce: bytes = bytes(NONCE_SIZE)
    #: PCP only (NAT-PMP answers leave it None: ask with an address request).
    external_ip: str | None = None

    @property
    def ok(self) -> bool:
        return self.result == 0


@attrs.frozen
class AddressAnswer:
    """A NAT-PMP router's public IPv4 address (``None`` with a failure result)."""

    result: int
    epoch: int
    external_ip: str | None


# -- IP addresses in PCP's 16-byte form (IPv4 as ::ffff:a.b.c.d) --------------------------


def _ip_bytes(text: str) -> bytes:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise LocalProtocolError(f"{text!r} is not an IP address") from None
    if isinstance(address, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed).packed
    return address.packed


def _ip_text(data: bytes) -> str:
    address = ipaddress.IPv6Address(data)
    mapped = address.ipv4_mapped
    return str(mapped if mapped is not None else address)


# -- requests ------------------------------------------------------------------------------


def encode_address_request() -> bytes:
    """NAT-PMP: what is your public address?"""
    return bytes((NATPMP_VERSION, _NATPMP_ADDRESS_OPCODE))


def encode_natpmp_map(request: MapRequest) -> bytes:
    return _NATPMP_MAP.pack(
        NATPMP_VERSION,
        request.transport.natpmp_opcode,
        0,
        request.internal_port,
        request.external_port,
        request.lifetime,
    )


def encode_pcp_map(request: MapRequest) -> bytes:
    header = _PCP_HEADER.pack(
        PCP_VERSION, _PCP_MAP_OPCODE, 0, request.lifetime, _ip_bytes(request.client_ip)
    )
    body = _PCP_MAP.pack(
        request.nonce,
        request.transport,
        bytes(3),
        request.internal_port,
        request.external_port,
        bytes(16),  # no preference for the external address
    )
    return header + body


# -- answers -------------------------------------------------------------------------------


def _transport(protocol_number: int, what: str) -> Transport:
    try:
        return Transport(protocol_number)
    except ValueError:
        raise RemoteProtocolError(
            f"{what} names protocol {protocol_number}, not TCP or UDP"
        ) from None


def _check_size(data: bytes, least: int, what: str) -> None:
    if len(data) > MAX_MESSAGE_SIZE:
        raise RemoteProtocolError(f"{what} of {len(data)} bytes is longer than any valid one")
    if len(data) < least:
        raise RemoteProtocolError(f"{what} of {len(data)} bytes is too short (at least {least})")


def answer_version(data: bytes) -> int:
    """The protocol version of an answer: NAT-PMP's 0 or PCP's 2."""
    _check_size(data, 4, "a port-mapping answer")
    if data[0] not in (NATPMP_VERSION, PCP_VERSION) or not data[1] & _ANSWER_BIT:
        raise RemoteProtocolError(
            f"a port-mapping answer starts with {data[:2].hex()}: neither NAT-PMP nor PCP"
        )
    return data[0]


def unsupported_version(data: bytes) -> bool:
    """Whether an answer says "I do not speak that version" (either protocol's
    way, including a NAT-PMP router refusing a PCP request)."""
    version = answer_version(data)
    result = struct.unpack_from("!H", data, 2)[0] if version == NATPMP_VERSION else data[3]
    return bool(result == 1)


def decode_natpmp_map(data: bytes) -> MapAnswer:
    what = "a NAT-PMP mapping answer"
    _check_size(data, 4, what)
    version, opcode, result = struct.unpack_from("!BBH", data)
    if version != NATPMP_VERSION:
        raise RemoteProtocolError(f"{what} has version {version}, not {NATPMP_VERSION}")
    if opcode not in (_ANSWER_BIT | 1, _ANSWER_BIT | 2):
        raise RemoteProtocolError(f"{what} has opcode {opcode}")
    transport = Transport.UDP if opcode == _ANSWER_BIT | 1 else Transport.TCP
    if result != 0 and len(data) < _NATPMP_MAP_ANSWER.size:
        # Failures may be cut short (RFC 6886 section 3.5: version errors are 8 bytes).
        epoch = struct.unpack_from("!I", data, 4)[0] if len(data) >= 8 else 0
        return MapAnswer(transport, result, 0, 0, 0, epoch)
    if len(data) != _NATPMP_MAP_ANSWER.size:
        raise RemoteProtocolError(f"{what} has {len(data)} bytes, not {_NATPMP_MAP_ANSWER.size}")
    _, _, _, epoch, internal, external, lifetime = _NATPMP_MAP_ANSWER.unpack(data)
    return MapAnswer(transport, result, internal, external, lifetime, epoch)


def decode_address_answer(data: bytes) -> AddressAnswer:
    what = "a NAT-PMP address answer"
    _check_size(data, 4, what)
    version, opcode, result = struct.unpack_from("!BBH", data)
    if version != NATPMP_VERSION or opcode != _ANSWER_BIT | _NATPMP_ADDRESS_OPCODE:
        raise RemoteProtocolError(f"{what} starts with {data[:2].hex()}, not 0080")
    if result != 0 and len(data) < _NATPMP_ADDRESS_ANSWER.size:
        epoch = struct.unpack_from("!I", data, 4)[0] if len(data) >= 8 else 0
        return AddressAnswer(result, epoch, None)
    if len(data) != _NATPMP_ADDRESS_ANSWER.size:
        raise RemoteProtocolError(f"{what} has {len(data)} bytes, not 12")
    _, _, _, epoch, packed = _NATPMP_ADDRESS_ANSWER.unpack(data)
    return AddressAnswer(result, epoch, str(ipaddress.IPv4Address(packed)) if result == 0 else None)


def decode_pcp_map(data: bytes) -> MapAnswer:
    what = "a PCP mapping answer"
    _check_size(data, 4, what)
    version, opcode, _, result = data[:4]
    if version != PCP_VERSION:
        raise RemoteProtocolError(f"{what} has version {version}, not {PCP_VERSION}")
    if opcode != _ANSWER_BIT | _PCP_MAP_OPCODE:
        raise RemoteProtocolError(f"{what} has opcode {opcode}, not MAP's answer")
    least = _PCP_ANSWER_HEADER.size + _PCP_MAP.size
    if result != 0:
        # A failure says only why; what it echoes of the request is not needed.
        return MapAnswer(Transport.TCP, result, 0, 0, 0, 0)
    if len(data) < least or len(data) % 4:
        raise RemoteProtocolError(f"{what} has {len(data)} bytes, not {least} plus options")
    _, _, _, _, lifetime, epoch, _ = _PCP_ANSWER_HEADER.unpack_from(data)
    nonce, protocol, _, internal, external, ip = _PCP_MAP.unpack_from(data, _PCP_ANSWER_HEADER.size)
    # Options after the MAP body (none are asked for) are skipped.
    return MapAnswer(
        _transport(protocol, what),
        result,
        internal,
        external,
        lifetime,
        epoch,
        nonce,
        _ip_text(ip) if result == 0 else None,
    )


# -- the router's side (the memory network's routers, and tests) ---------------------------


def decode_request(data: bytes) -> MapRequest | None:
    """A mapping request as a router reads it; None for NAT-PMP's address
    request. NAT-PMP and PCP are told apart by the version byte."""
    what = "a port-mapping request"
    _check_size(data, 2, what)
    if data[0] == NATPMP_VERSION:
        if data[1] == _NATPMP_ADDRESS_OPCODE and len(data) == 2:
            return None
        if len(data) != _NATPMP_MAP.size or data[1] not in (1, 2):
            raise RemoteProtocolError(f"{what}: not a NAT-PMP request ({len(data)} bytes)")
        _, opcode, _, internal, external, lifetime = _NATPMP_MAP.unpack(data)
        transport = Transport.UDP if opcode == 1 else Transport.TCP
        return MapRequest(transport, internal, external, lifetime)
    if data[0] == PCP_VERSION:
        size = _PCP_HEADER.size + _PCP_MAP.size
        if len(data) < size or len(data) % 4 or data[1] != _PCP_MAP_OPCODE:
            raise RemoteProtocolError(f"{what}: not a PCP MAP request ({len(data)} bytes)")
        _, _, _, lifetime, client = _PCP_HEADER.unpack_from(data)
        nonce, protocol, _, internal, external, _ = _PCP_MAP.unpack_from(data, _PCP_HEADER.size)
        return MapRequest(
            _transport(protocol, what), internal, external, lifetime, nonce, _ip_text(client)
        )
    raise RemoteProtocolError(f"{what} has version {data[0]}, neither NAT-PMP nor PCP")


def encode_natpmp_map_answer(answer: MapAnswer) -> bytes:
    return _NATPMP_MAP_ANSWER.pack(
        NATPMP_VERSION,
        _ANSWER_BIT | answer.transport.natpmp_opcode,
        answer.result,
        answer.epoch,
        answer.internal_port,
        answer.external_port,
        answer.lifetime,
    )


def encode_address_answer(answer: AddressAnswer) -> bytes:
    ip = ipaddress.IPv4Address(answer.external_ip or "0.0.0.0").packed
    return _NATPMP_ADDRESS_ANSWER.pack(
        NATPMP_VERSION, _ANSWER_BIT | _NATPMP_ADDRESS_OPCODE, answer.result, answer.epoch, ip
    )


def encode_pcp_map_answer(answer: MapAnswer) -> bytes:
    header = _PCP_ANSWER_HEADER.pack(
        PCP_VERSION,
        _ANSWER_BIT | _PCP_MAP_OPCODE,
        0,
        answer.result,
        answer.lifetime,
        answer.epoch,
        bytes(12),
    )
    ip = _ip_bytes(answer.external_ip) if answer.external_ip else bytes(16)
    body = _PCP_MAP.pack(
        answer.nonce, answer.transport, bytes(3), answer.internal_port, answer.external_port, ip
    )
    return header + body
