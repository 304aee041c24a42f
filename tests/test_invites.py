"""Invite codes: the layout, round trips, and that a damaged code never decodes
into another invite."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pbackup.core.keys import node_id_for
from p2pbackup.dht import invites
from p2pbackup.dht.invites import Invite, decode_invite, decode_invite_bytes, encode_invite
from p2pbackup.dht.records import RecordAddress
from p2pbackup.errors import FormatError

KEY = bytes(range(32))
SAMPLE = Invite(KEY, (RecordAddress("203.0.113.7", 47470),))
ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"


def raw_of(code: str) -> bytes:
    body = code.removeprefix("p2pb-").upper()
    return base64.b32decode(body + "=" * (-len(body) % 8))


def code_of(raw: bytes) -> str:
    return "p2pb-" + base64.b32encode(raw).decode().rstrip("=").lower()


def with_checksum(body: bytes) -> bytes:
    return body + hashlib.blake2b(body, digest_size=4, person=b"p2pb-invite").digest()


def damaged(code: str) -> str:
    with pytest.raises(FormatError) as info:
        decode_invite(code)
    return str(info.value)


# -- layout and basics ----------------------------------------------------------------


def test_the_binary_layout_is_as_documented() -> None:
    code = encode_invite(SAMPLE)
    raw = raw_of(code)
    port = struct.pack(">H", 47470)
    body = bytes([1]) + KEY + bytes([1, 4]) + bytes([203, 0, 113, 7]) + port
    assert raw == with_checksum(body)
    assert code == code.lower() and "=" not in code and code.startswith("p2pb-")


def test_an_invite_names_the_node_its_key_hashes_to() -> None:
    assert SAMPLE.node_id == node_id_for(KEY)
    assert decode_invite(encode_invite(SAMPLE)).node_id == node_id_for(KEY)


def test_a_typical_code_is_short_enough_to_paste() -> None:
    code = encode_invite(SAMPLE)
    assert len(code) < 90
    assert len(code) == 77


def test_every_address_type_round_trips() -> None:
    invite = Invite(
        bytes(32),
        (
            RecordAddress("2001:db8::1", 1),
            RecordAddress("node.example.org", 65535),
            RecordAddress("10.0.0.1", 2),
            RecordAddress(str(ipaddress.ip_address("::ffff:192.0.2.1")), 3),
        ),
    )
    assert decode_invite(encode_invite(invite)) == invite


ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
ipv6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
label = st.from_regex(r"[a-z0-9_]([a-z0-9_-]{0,10}[a-z0-9_])?", fullmatch=True)
top_label = label.filter(lambda s: not s.isdigit())
dns = st.builds(lambda head, top: ".".join([*head, top]), st.lists(label, max_size=4), top_label)
addresses = st.builds(RecordAddress, st.one_of(ipv4, ipv6, dns), st.integers(1, 65535))


@given(st.binary(min_size=32, max_size=32), st.lists(addresses, min_size=1, max_size=4))
def test_round_trip(key: bytes, listed: list[RecordAddress]) -> None:
    invite = Invite(key, tuple(listed))
    code = encode_invite(invite)
    assert decode_invite(code) == invite
    assert encode_invite(decode_invite(code)) == code
    assert decode_invite_bytes(invites.encode_invite_bytes(invite)) == invite


# -- forgiving reading, canonical writing ---------------------------------------------


def test_whitespace_case_and_inserted_breaks_are_forgiven() -> None:
    code = encode_invite(SAMPLE)
    body = code.removeprefix("p2pb-")
    messy = [
        f"  {code}\n",
        code.upper(),
        "P2PB-" + body,
        "p2pb-" + body[:30] + "\n" + body[30:],
        "p2pb-" + body[:10] + "-" + body[10:40] + " " + body[40:],
        "p2pb-" + body[:20] + "\u2010" + body[20:],  # a Unicode hyphen from a chat client
        "p2pb-" + "\r\n\t".join([body[:25], body[25:50], body[50:]]),
    ]
    for text in messy:
        decoded = decode_invite(text)
        assert decoded == SAMPLE, text
        assert encode_invite(decoded) == code  # canonical again


def test_unused_final_bits_must_be_zero() -> None:
    # A name of 4 characters makes 46 bytes, not a multiple of 5, so the last
    # base32 digit carries bits beyond the last byte.
    invite = Invite(KEY, (RecordAddress("abcd", 1),))
    code = encode_invite(invite)
    assert (len(code) - 5) % 8 != 0
    last = ALPHABET.index(code[-1])
    twin = code[:-1] + ALPHABET[last ^ 1]  # same bytes to a lax base32 decoder
    assert base64.b32decode(twin[5:].upper() + "=" * (-(len(twin) - 5) % 8)) == raw_of(code)
    assert "damaged" in damaged(twin)


# -- damage is detected -----------------------------------------------------------------


def test_every_single_character_substitution_is_detected() -> None:
    code = encode_invite(encode_and_pick_sample())
    replacements = ALPHABET + "0189!- "
    tried = 0
    for position in range(len(code)):
        for char in replacements:
            if char == code[position]:
                continue
            changed = code[:position] + char + code[position + 1 :]
            damaged(changed)
            tried += 1
    assert tried > 2500


def test_every_single_character_deletion_is_detected() -> None:
    code = encode_invite(encode_and_pick_sample())
    for position in range(len(code)):
        damaged(code[:position] + code[position + 1 :])


def test_every_single_character_insertion_is_detected() -> None:
    code = encode_invite(encode_and_pick_sample())
    for position in range(len(code) + 1):
        for char in ALPHABET + "019":
            damaged(code[:position] + char + code[position:])


def test_noise_inside_the_prefix_is_not_forgiven() -> None:
    code = encode_invite(SAMPLE)
    for position in range(1, 5):
        assert "start with p2pb-" in damaged(code[:position] + " " + code[position:])


def encode_and_pick_sample() -> Invite:
    """A sample with every address type, so damage lands in each kind of field."""
    return Invite(
        KEY,
        (
            RecordAddress("198.51.100.20", 47470),
            RecordAddress("2001:db8::7", 47471),
            RecordAddress("home.example.net", 443),
        ),
    )


def test_truncated_codes_are_damaged() -> None:
    code = encode_invite(SAMPLE)
    for keep in range(5, len(code)):
        message = damaged(code[:keep])
        assert "damaged" in message or "short" in message or "nothing after" in message


def test_the_checksum_message_says_what_to_do() -> None:
    code = encode_invite(SAMPLE)
    flipped = code[:20] + ("a" if code[20] != "a" else "b") + code[21:]
    assert damaged(flipped) == (
        "the invite code is damaged: a character is wrong, missing or extra — copy it again"
    )


def test_a_wrong_or_missing_prefix() -> None:
    body = encode_invite(SAMPLE).removeprefix("p2pb-")
    for text in (body, "p2pc-" + body, "p2p-" + body, "", "   ", "p2pb" + body):
        assert damaged(text) == "not an invite code: it should start with p2pb-"


def test_a_character_outside_the_alphabet_is_named() -> None:
    code = encode_invite(SAMPLE)
    message = damaged(code[:30] + "0" + code[31:])
    assert "'0'" in message and "a-z" in message
    assert "'!'" in damaged(code + "!")


# -- structure behind a valid checksum ---------------------------------------------------


def body_of(invite: Invite) -> bytes:
    return invites.encode_invite_bytes(invite)[:-4]


def test_an_unknown_version_is_reported_as_such() -> None:
    body = bytearray(body_of(SAMPLE))
    body[0] = 2
    message = damaged(code_of(with_checksum(bytes(body))))
    assert "version 2" in message and "upgrade" in message


def test_truncated_or_trailing_bytes() -> None:
    body = body_of(SAMPLE)
    assert "truncated" in damaged(code_of(with_checksum(body[:-1])))
    assert "truncated" in damaged(code_of(with_checksum(body[:20])))
    assert "stray" in damaged(code_of(with_checksum(body + b"\0")))


def test_zero_or_too_many_addresses() -> None:
    head = bytes([1]) + KEY
    assert "0 addresses" in damaged(code_of(with_checksum(head + bytes([0]))))
    one = bytes([4, 10, 0, 0, 1, 0, 80])
    assert "5 addresses" in damaged(code_of(with_checksum(head + bytes([5]) + one * 5)))


def test_bad_addresses_behind_a_valid_checksum() -> None:
    head = bytes([1]) + KEY + bytes([1])
    cases = {
        bytes([4, 10, 0, 0, 1, 0, 0]): "port 0",
        bytes([9, 10, 0, 0, 1, 0, 80]): "unknown type 9",
        bytes([0, 11]) + b"EXAMPLE.org" + b"\0\x50": "canonical",
        bytes([0, 7]) + b"1.2.3.4" + b"\0\x50": "canonical",
        bytes([0, 4]) + b"a b." + b"\0\x50": "neither an IP address nor",
        bytes([0, 2]) + b"\xff\xfe" + b"\0\x50": "not ASCII",
    }
    for address, expected in cases.items():
        assert expected in damaged(code_of(with_checksum(head + address))), expected


def test_encoding_refuses_what_decoding_would() -> None:
    good = RecordAddress("192.0.2.1", 80)
    bad = [
        Invite(KEY, ()),
        Invite(KEY, (good,) * 5),
        Invite(KEY[:31], (good,)),
        Invite(KEY, (RecordAddress("192.0.2.1", 0),)),
        Invite(KEY, (RecordAddress("Example.org", 80),)),
        Invite(KEY, (RecordAddress("fe80::1%eth0", 80),)),
        Invite(KEY, (RecordAddress("x" * 300, 80),)),
    ]
    for invite in bad:
        with pytest.raises(FormatError, match=r"^invite code: "):
            encode_invite(invite)
    with pytest.raises(FormatError):
        invites.invite_for(KEY, [])
