"""UPnP-IGD: the messages (pure), and the client against a fake gateway in memory."""

from __future__ import annotations

import contextlib

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from p2pbackup.errors import PortMappingError, RemoteProtocolError
from p2pbackup.net import natpmp, upnp
from p2pbackup.net.memory import MemoryNetwork, NatProfile
from p2pbackup.net.network import Address
from p2pbackup.net.portmap import AnyMapper, PortMapping, RouterSilentError, UpnpMapper

LOCATION = "http://192.168.1.1:5000/rootDesc.xml"
SERVICE = "urn:schemas-upnp-org:service:WANIPConnection:1"

#: Shaped like miniupnpd's description (trimmed).
DESCRIPTION = b"""<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0">
<specVersion><major>1</major><minor>0</minor></specVersion>
<device><deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1</deviceType>
<serviceList><service>
<serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType>
<controlURL>/ctl/L3F</controlURL></service></serviceList>
<deviceList><device><deviceList><device><serviceList><service>
<serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>
<serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId>
<controlURL>/ctl/IPConn</controlURL>
</service></serviceList></device></deviceList></device></deviceList>
</device></root>
"""


def _http(status: str, body: bytes, *, chunked: bool = False) -> bytes:
    if chunked:
        encoded = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        return f"HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + encoded
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def _soap_answer(action: str, **outputs: str) -> bytes:
    args = "".join(f"<{k}>{v}</{k}>" for k, v in outputs.items())
    return (
        '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">'
        f'<s:Body><u:{action}Response xmlns:u="{SERVICE}">{args}</u:{action}Response>'
        "</s:Body></s:Envelope>"
    ).encode()


def _soap_fault(code: int, description: str) -> bytes:
    return (
        '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">'
        "<s:Body><s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring>"
        '<detail><UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
        f"<errorCode>{code}</errorCode><errorDescription>{description}</errorDescription>"
        "</UPnPError></detail></s:Fault></s:Body></s:Envelope>"
    ).encode()


def test_a_search_answer_names_the_description() -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nST: x\r\n"
        b"Location: " + LOCATION.encode() + b"\r\n\r\n"
    )
    assert upnp.parse_search_answer(answer) == LOCATION
    assert b"M-SEARCH * HTTP/1.1\r\n" in upnp.search_request()
    with pytest.raises(RemoteProtocolError, match="no http location"):
        upnp.parse_search_answer(b"HTTP/1.1 200 OK\r\nLOCATION: file:///etc/passwd\r\n\r\n")


def test_the_description_gives_the_control_url() -> None:
    service = upnp.parse_description(DESCRIPTION, LOCATION)
    assert service == upnp.GatewayService(SERVICE, "http://192.168.1.1:5000/ctl/IPConn")
    without = DESCRIPTION.replace(b"WANIPConnection", b"Something")
    with pytest.raises(PortMappingError, match="no port-mapping service"):
        upnp.parse_description(without, LOCATION)


def test_document_types_and_entities_are_refused_before_parsing() -> None:
    bomb = (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        b'<!ENTITY lol2 "&lol;&lol;&lol;">]><root>&lol2;</root>'
    )
    with pytest.raises(RemoteProtocolError, match="refused"):
        upnp.parse_description(bomb, LOCATION)
    with pytest.raises(RemoteProtocolError, match="longer than"):
        upnp.parse_description(b"<root>" + b" " * upnp.MAX_ANSWER_SIZE + b"</root>", LOCATION)


def test_soap_requests_escape_their_arguments() -> None:
    service = upnp.GatewayService(SERVICE, "http://192.168.1.1:5000/ctl/IPConn")
    request = upnp.soap_request(service, "AddPortMapping", [("NewPortMappingDescription", "<&>")])
    head, _, body = request.partition(b"\r\n\r\n")
    assert b"POST /ctl/IPConn HTTP/1.1" in head
    assert f'SOAPAction: "{SERVICE}#AddPortMapping"'.encode() in head
    assert b"&lt;&amp;&gt;" in body and f"Content-Length: {len(body)}".encode() in head


def test_soap_answers_and_faults() -> None:
    status, body = upnp.http_body(
        _http("200 OK", _soap_answer("GetExternalIPAddress", NewExternalIPAddress="11.20.30.1"),
              chunked=True),
        "answer",
    )  # fmt: skip
    assert upnp.parse_soap_answer(status, body, "GetExternalIPAddress") == {
        "NewExternalIPAddress": "11.20.30.1"
    }
    with pytest.raises(PortMappingError, match="another machine already holds"):
        upnp.parse_soap_answer(500, _soap_fault(718, "ConflictInMappingEntry"), "AddPortMapping")
    with pytest.raises(PortMappingError, match=r"Odd thing \(UPnP error 799\)"):
        upnp.parse_soap_answer(500, _soap_fault(799, "Odd thing"), "AddPortMapping")


_PARSERS = (
    upnp.parse_search_answer,
    lambda data: upnp.parse_description(data, LOCATION),
    lambda data: upnp.http_body(data, "answer"),
    lambda data: upnp.parse_soap_answer(200, data, "AddPortMapping"),
)


@pytest.mark.parametrize("parse", _PARSERS)
@given(st.binary(max_size=600))
def test_garbage_raises_only_the_two_clear_errors(parse: object, data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError, PortMappingError):
        parse(data)  # type: ignore[operator]


@pytest.mark.parametrize("parse", _PARSERS)
def test_every_prefix_of_a_valid_answer_is_read_or_refused(parse: object) -> None:
    whole = _http("200 OK", DESCRIPTION)
    for end in range(0, len(whole), 7):
        with contextlib.suppress(RemoteProtocolError, PortMappingError):
            parse(whole[:end])  # type: ignore[operator]


# -- the client, against a fake gateway on the memory network -------------------------------

HOME = "192.168.1.20"
GATEWAY = "192.168.1.1"


class FakeGateway:
    """Serves the description and answers SOAP, recording the actions."""

    def __init__(self, refuse: int | None = None) -> None:
        self.actions: list[bytes] = []
        self.refuse = refuse

    async def handle(self, stream: trio.abc.Stream) -> None:
        request = b""
        while b"\r\n\r\n" not in request or (
            b"POST" in request[:4] and not request.rstrip().endswith(b"</s:Envelope>")
        ):
            request += await stream.receive_some()
        if request.startswith(b"GET /rootDesc.xml"):
            await stream.send_all(_http("200 OK", DESCRIPTION))
            return
        self.actions.append(request)
        action = request.split(b"#", 1)[1].split(b'"', 1)[0].decode()
        if action == "GetExternalIPAddress":
            answer = _soap_answer(action, NewExternalIPAddress="11.20.30.1")
        elif self.refuse is not None:
            await stream.send_all(_http("500 Internal Server Error", _soap_fault(self.refuse, "x")))
            return
        else:
            answer = _soap_answer(action)
        await stream.send_all(_http("200 OK", answer))


async def test_the_client_maps_through_a_gateway(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    world = MemoryNetwork()
    gateway = FakeGateway()
    await nursery.start(world.interface(GATEWAY).serve, Address(GATEWAY, 5000), gateway.handle)
    mapper = UpnpMapper(world.interface(HOME), location=LOCATION)
    mapping = await mapper.map(natpmp.Transport.UDP, 4001)
    assert mapping == PortMapping("UPnP", natpmp.Transport.UDP, 4001, Address("11.20.30.1", 4001),
                                  3600)  # fmt: skip
    add = gateway.actions[-1]
    assert b"<NewInternalClient>192.168.1.20</NewInternalClient>" in add
    assert b"<NewProtocol>UDP</NewProtocol>" in add
    await mapper.unmap(mapping)
    assert b"#DeletePortMapping" in gateway.actions[-1]


async def test_a_refusal_is_worded(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    world = MemoryNetwork()
    await nursery.start(
        world.interface(GATEWAY).serve, Address(GATEWAY, 5000), FakeGateway(729).handle
    )
    with pytest.raises(PortMappingError, match="no room for another mapping"):
        await UpnpMapper(world.interface(HOME), location=LOCATION).map(natpmp.Transport.TCP, 1)


async def test_a_router_silent_in_every_protocol_is_reported_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = MemoryNetwork()
    world.put_behind_nat(HOME, NatProfile("11.20.30.2", GATEWAY, port_mapping=False))
    with pytest.raises(RouterSilentError, match="did not answer NAT-PMP, PCP or UPnP"):
        await AnyMapper(world.interface(HOME), GATEWAY).map(natpmp.Transport.TCP, 4001)
