"""NAT-PMP and PCP codecs: round trips, known bytes, and garbage from a router."""

from __future__ import annotations

import contextlib
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pbackup.errors import LocalProtocolError, RemoteProtocolError
from p2pbackup.net import natpmp

ports = st.integers(0, 0xFFFF)
lifetimes = st.integers(0, natpmp.MAX_LIFETIME)
transports = st.sampled_from(list(natpmp.Transport))
nonces = st.binary(min_size=natpmp.NONCE_SIZE, max_size=natpmp.NONCE_SIZE)
ipv4 = st.ip_addresses(v=4).map(str)
ips = st.ip_addresses().map(str).filter(lambda t: ipaddress.ip_address(t).version == 4 or
                                        ipaddress.IPv6Address(t).ipv4_mapped is None)  # fmt: skip
results = st.integers(0, 255)


@given(transports, ports, ports, lifetimes)
def test_natpmp_requests_round_trip(
    transport: natpmp.Transport, internal: int, external: int, lifetime: int
) -> None:
    request = natpmp.MapRequest(transport, internal, external, lifetime)
    assert natpmp.decode_request(natpmp.encode_natpmp_map(request)) == request


@given(transports, ports, ports, lifetimes, nonces, ips)
def test_pcp_requests_round_trip(
    transport: natpmp.Transport, internal: int, external: int, lifetime: int, nonce: bytes, ip: str
) -> None:
    request = natpmp.MapRequest(transport, internal, external, lifetime, nonce, ip)
    assert natpmp.decode_request(natpmp.encode_pcp_map(request)) == request


@given(transports, ports, ports, lifetimes, st.integers(0, 0xFFFFFFFF))
def test_natpmp_answers_round_trip(
    transport: natpmp.Transport, internal: int, external: int, lifetime: int, epoch: int
) -> None:
    answer = natpmp.MapAnswer(transport, 0, internal, external, lifetime, epoch)
    assert natpmp.decode_natpmp_map(natpmp.encode_natpmp_map_answer(answer)) == answer


@given(transports, ports, ports, lifetimes, st.integers(0, 0xFFFFFFFF), nonces, ips)
def test_pcp_answers_round_trip(
    transport: natpmp.Transport,
    internal: int,
    external: int,
    lifetime: int,
    epoch: int,
    nonce: bytes,
    ip: str,
) -> None:
    answer = natpmp.MapAnswer(transport, 0, internal, external, lifetime, epoch, nonce, ip)
    assert natpmp.decode_pcp_map(natpmp.encode_pcp_map_answer(answer)) == answer


@given(st.integers(0, 0xFFFFFFFF), ipv4)
def test_address_answers_round_trip(epoch: int, ip: str) -> None:
    answer = natpmp.AddressAnswer(0, epoch, ip)
    assert natpmp.decode_address_answer(natpmp.encode_address_answer(answer)) == answer


def test_known_bytes_from_rfc_6886() -> None:
    assert natpmp.encode_address_request() == b"\x00\x00"
    request = natpmp.MapRequest(natpmp.Transport.TCP, 4001, 4001, 3600)
    assert natpmp.encode_natpmp_map(request).hex() == "000200000fa10fa100000e10"
    answer = bytes.fromhex("0080000000000064cb007101")
    assert natpmp.decode_address_answer(answer) == natpmp.AddressAnswer(0, 100, "203.0.113.1")


def test_a_pcp_request_carries_the_client_address_as_ipv4_mapped() -> None:
    data = natpmp.encode_pcp_map(
        natpmp.MapRequest(natpmp.Transport.UDP, 1, 2, 3, bytes(12), "192.168.1.20")
    )
    assert len(data) == 60 and data[:2] == b"\x02\x01"
    assert data[8:24] == bytes(10) + b"\xff\xff" + bytes((192, 168, 1, 20))
    assert data[36] == 17  # UDP


def test_short_failures_are_read() -> None:
    # A NAT-PMP router refusing PCP answers with an 8-byte version error.
    refusal = bytes.fromhex("0081000100000005")
    assert natpmp.unsupported_version(refusal)
    assert natpmp.decode_natpmp_map(refusal).result == natpmp.NatPmpResult.UNSUPPORTED_VERSION
    pcp_refusal = bytes((2, 0x81, 0, 2)) + bytes(20)
    assert natpmp.decode_pcp_map(pcp_refusal).result == natpmp.PcpResult.NOT_AUTHORIZED
    assert not natpmp.unsupported_version(pcp_refusal)


def test_failures_are_worded_for_a_person() -> None:
    assert "allow port mappings" in natpmp.describe_result("NAT-PMP", 2)
    assert "second router" in natpmp.describe_result("PCP", 12)
    assert "result code 99" in natpmp.describe_result("PCP", 99)


def test_requests_out_of_bounds_are_refused_locally() -> None:
    with pytest.raises(LocalProtocolError):
        natpmp.MapRequest(natpmp.Transport.TCP, 70000, 0, 1)
    with pytest.raises(LocalProtocolError):
        natpmp.MapRequest(natpmp.Transport.TCP, 1, 0, -1)
    with pytest.raises(LocalProtocolError):
        natpmp.MapRequest(natpmp.Transport.TCP, 1, 0, 1, b"short")
    with pytest.raises(LocalProtocolError, match="not an IP"):
        natpmp.encode_pcp_map(natpmp.MapRequest(natpmp.Transport.TCP, 1, 0, 1, client_ip="x"))


_DECODERS = (
    natpmp.decode_natpmp_map,
    natpmp.decode_pcp_map,
    natpmp.decode_address_answer,
    natpmp.decode_request,
    natpmp.answer_version,
    natpmp.unsupported_version,
)


@pytest.mark.parametrize("decode", _DECODERS)
def test_every_prefix_of_a_valid_answer_is_refused_or_read(decode: object) -> None:
    """Byte at a time: a truncated answer is one clear error, never a crash."""
    whole = [
        natpmp.encode_natpmp_map_answer(natpmp.MapAnswer(natpmp.Transport.TCP, 0, 1, 2, 3, 4)),
        natpmp.encode_pcp_map_answer(
            natpmp.MapAnswer(natpmp.Transport.UDP, 0, 1, 2, 3, 4, bytes(12), "203.0.113.1")
        ),
        natpmp.encode_address_answer(natpmp.AddressAnswer(0, 4, "203.0.113.1")),
    ]
    for data in whole:
        for end in range(len(data) + 1):
            try:
                decode(data[:end])  # type: ignore[operator]
            except RemoteProtocolError as error:
                assert str(error)


@pytest.mark.parametrize("decode", _DECODERS)
@given(st.binary(max_size=1200))
def test_garbage_raises_only_the_protocol_error(decode: object, data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode(data)  # type: ignore[operator]


def test_an_oversized_answer_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="longer than any valid"):
        natpmp.decode_pcp_map(bytes((2, 0x81, 0, 0)) + bytes(2000))
