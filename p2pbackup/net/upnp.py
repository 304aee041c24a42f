"""UPnP-IGD port mapping, the messages: SSDP, the device description, SOAP (sans-IO).

Many home routers that do not speak NAT-PMP or PCP speak UPnP's Internet
Gateway Device protocol instead. Its client is three steps: find the router
(an SSDP search, a UDP multicast), read its description (XML over HTTP) for
the **control URL** of its WANIPConnection (or WANPPPConnection) service, and
call that service's actions over SOAP: ``AddPortMapping``,
``DeletePortMapping``, ``GetExternalIPAddress``. This module builds and reads
those messages and does no I/O; :mod:`p2pbackup.net.portmap` sends them.

This is a small client of our own, not a library: a router's answers come from
the LAN and are treated as hostile. Every answer is bounded
(:data:`MAX_ANSWER_SIZE`); XML with a document type declaration (where entity
bombs and external entities live) is refused before it is parsed; only the
few elements needed are read.

Nouns:

* **search answer** — an SSDP response; its ``LOCATION`` header is the
  description URL (:func:`parse_search_answer`).
* **gateway service** — :class:`GatewayService`: the service type and the
  absolute control URL found in a description (:func:`parse_description`).
* **action** — a SOAP request (:func:`soap_request`) and its answer
  (:func:`parse_soap_answer`): the output arguments by name, or a
  :class:`~p2pbackup.errors.PortMappingError` with the router's UPnP error.

Errors: answers that do not parse raise
:class:`~p2pbackup.errors.RemoteProtocolError` naming the problem; a SOAP fault
(the router understood and refused) raises
:class:`~p2pbackup.errors.PortMappingError`.
"""

from __future__ import annotations

import re
import urllib.parse
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping, Sequence

import attrs

from p2pbackup.errors import PortMappingError, RemoteProtocolError

#: Where SSDP searches go.
SSDP_GROUP = "239.255.255.250"
SSDP_PORT = 1900
#: The most bytes of any answer read from a router (a description is a few KiB).
MAX_ANSWER_SIZE = 64 * 1024
#: Services that can map ports, best first.
SERVICE_TYPES = (
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
)
_SEARCH_TARGET = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
_DEVICE_NS = "{urn:schemas-upnp-org:device-1-0}"
_DECLARATION = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)

#: UPnP errors a user can act on (UPnP IGD WANIPConnection:2, section 2.4).
_UPNP_ERRORS = {
    606: "the router only lets authorised clients map ports",
    718: "another machine already holds that external port",
    724: "the router maps an external port only to the same internal port",
    725: "the router grants only permanent mappings",
    729: "the router has no room for another mapping",
}


@attrs.frozen
class GatewayService:
    service_type: str
    control_url: str


def search_request() -> bytes:
    """An SSDP M-SEARCH for Internet gateway devices."""
    return (
        "M-SEARCH * HTTP/1.1\r\n"
        f"HOST: {SSDP_GROUP}:{SSDP_PORT}\r\n"
        'MAN: "ssdp:discover"\r\n'
        "MX: 2\r\n"
        f"ST: {_SEARCH_TARGET}\r\n"
        "\r\n"
    ).encode("ascii")


def _headers(data: bytes, what: str) -> tuple[str, dict[str, str], bytes]:
    """The status line, the headers (names lowered) and what follows them."""
    if len(data) > MAX_ANSWER_SIZE:
        raise RemoteProtocolError(f"{what} is longer than {MAX_ANSWER_SIZE} bytes")
    head, separator, body = data.partition(b"\r\n\r\n")
    if not separator:
        raise RemoteProtocolError(f"{what} has no end of headers")
    try:
        lines = head.decode("latin-1").split("\r\n")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes anything
        raise RemoteProtocolError(f"{what} is not text") from None
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            raise RemoteProtocolError(f"{what} has a header line without a colon")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers, body


def parse_search_answer(data: bytes) -> str:
    """The description URL in an SSDP answer."""
    status, headers, _ = _headers(data, "an SSDP answer")
    if not status.startswith("HTTP/1.") or " 200" not in status:
        raise RemoteProtocolError(f"an SSDP answer says {status[:60]!r}")
    location = headers.get("location", "")
    parsed = urllib.parse.urlsplit(location)
    if parsed.scheme != "http" or not parsed.hostname:
        raise RemoteProtocolError(f"an SSDP answer names no http location ({location[:80]!r})")
    return location


def http_get(url: str) -> bytes:
    """An HTTP/1.1 GET of ``url`` that asks the server to close afterwards."""
    parts = urllib.parse.urlsplit(url)
    path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    return (f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n").encode(
        "ascii"
    )


def http_body(data: bytes, what: str) -> tuple[int, bytes]:
    """The status code and body of a whole HTTP answer (read until close)."""
    status, headers, body = _headers(data, what)
    match = re.fullmatch(r"HTTP/1\.[01] (\d{3})( .*)?", status)
    if match is None:
        raise RemoteProtocolError(f"{what} starts with {status[:60]!r}, not an HTTP status")
    if headers.get("transfer-encoding", "identity").lower() != "identity":
        body = _unchunk(body, what)
    elif "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise RemoteProtocolError(f"{what} has a bad Content-Length") from None
        if not 0 <= length <= len(body):
            raise RemoteProtocolError(f"{what} is shorter than its Content-Length")
        body = body[:length]
    return int(match.group(1)), body


def _unchunk(body: bytes, what: str) -> bytes:
    pieces: list[bytes] = []
    while True:
        size_line, separator, rest = body.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            raise RemoteProtocolError(f"{what} has a bad chunk size") from None
        if not separator or size < 0 or len(rest) < size:
            raise RemoteProtocolError(f"{what} ends inside a chunk")
        if size == 0:
            return b"".join(pieces)
        pieces.append(rest[:size])
        body = rest[size + 2 :]


def _xml(data: bytes, what: str) -> ElementTree.Element:
    if len(data) > MAX_ANSWER_SIZE:
        raise RemoteProtocolError(f"{what} is longer than {MAX_ANSWER_SIZE} bytes")
    if _DECLARATION.search(data):
        raise RemoteProtocolError(f"{what} declares a document type or entities; refused")
    try:
        return ElementTree.fromstring(data)
    except ElementTree.ParseError as error:
        raise RemoteProtocolError(f"{what} is not well-formed XML: {error}") from None


def parse_description(data: bytes, location: str) -> GatewayService:
    """The best port-mapping service in a device description fetched from ``location``."""
    root = _xml(data, "the router's device description")
    found: dict[str, str] = {}
    for service in root.iter(f"{_DEVICE_NS}service"):
        kind = (service.findtext(f"{_DEVICE_NS}serviceType") or "").strip()
        control = (service.findtext(f"{_DEVICE_NS}controlURL") or "").strip()
        if kind in SERVICE_TYPES and control and kind not in found:
            found[kind] = control
    for kind in SERVICE_TYPES:
        if kind in found:
            base = (root.findtext(f"{_DEVICE_NS}URLBase") or "").strip() or location
            url = urllib.parse.urljoin(base, found[kind])
            if urllib.parse.urlsplit(url).scheme != "http":
                raise RemoteProtocolError(f"the router's control URL {url[:80]!r} is not http")
            return GatewayService(kind, url)
    raise PortMappingError("the router's UPnP device offers no port-mapping service")


def soap_request(
    service: GatewayService, action: str, arguments: Sequence[tuple[str, str]]
) -> bytes:
    """An HTTP POST calling ``action`` with ``arguments`` (in the order the
    specification lists them; values are escaped)."""
    from xml.sax.saxutils import escape

    args = "".join(f"<{name}>{escape(value)}</{name}>" for name, value in arguments)
    body = (
        '<?xml version="1.0"?>\r\n'
        '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/">'
        f'<s:Body><u:{action} xmlns:u="{service.service_type}">{args}</u:{action}>'
        "</s:Body></s:Envelope>\r\n"
    ).encode()
    parts = urllib.parse.urlsplit(service.control_url)
    path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: {parts.netloc}\r\n"
        'Content-Type: text/xml; charset="utf-8"\r\n'
        f'SOAPAction: "{service.service_type}#{action}"\r\n'
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    return head + body


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def parse_soap_answer(status: int, body: bytes, action: str) -> Mapping[str, str]:
    """The output arguments of ``action``'s answer; PortMappingError for a fault."""
    root = _xml(body, f"the router's answer to {action}")
    fault = next((e for e in root.iter() if _local(e.tag) == "UPnPError"), None)
    if fault is not None or status != 200:
        code_text = "" if fault is None else _child_text(fault, "errorCode")
        description = "" if fault is None else _child_text(fault, "errorDescription")
        code = int(code_text) if code_text.isdigit() else 0
        reason = _UPNP_ERRORS.get(code) or description[:200] or f"HTTP status {status}"
        raise PortMappingError(f"the router refused {action}: {reason} (UPnP error {code})")
    answer = next((e for e in root.iter() if _local(e.tag) == f"{action}Response"), None)
    if answer is None:
        raise RemoteProtocolError(f"the router's answer to {action} has no {action}Response")
    return {_local(child.tag): (child.text or "").strip() for child in answer}


def _child_text(element: ElementTree.Element, name: str) -> str:
    for child in element.iter():
        if _local(child.tag) == name:
            return (child.text or "").strip()
    return ""
