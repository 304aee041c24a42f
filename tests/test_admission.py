"""Admission bookkeeping (pure): sources, displaced handshakes, the sessions
kept for friends, and the log throttle."""

from __future__ import annotations

import pytest

from p2pbackup.node.admission import (
    Admission,
    LogThrottle,
    ServerLimits,
    Session,
    TurnedAway,
    source_of,
)


def node(n: int) -> bytes:
    return n.to_bytes(20, "big")


def test_a_source_is_an_ipv4_address_or_an_ipv6_slash_64() -> None:
    assert source_of("203.0.113.7") == "203.0.113.7"
    assert source_of("2001:db8:1:2:aaaa::1") == source_of("2001:db8:1:2:bbbb::9")
    assert source_of("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert source_of("2001:db8:1:3::1") != source_of("2001:db8:1:2::1")
    assert source_of("::ffff:203.0.113.7") == "203.0.113.7"
    assert source_of("node4") == "node4"  # the memory network's names
    assert source_of(None) == "unknown"


def test_a_new_handshake_displaces_the_oldest_of_its_source_then_of_the_busiest() -> None:
    admission = Admission(ServerLimits(handshakes=4, handshakes_per_source=2))
    a1, none = admission.begin_handshake("a")
    a2, _ = admission.begin_handshake("a")
    assert none is None
    a3, displaced = admission.begin_handshake("a")
    assert displaced is a1  # its own source's oldest
    b1, _ = admission.begin_handshake("b")
    c1, displaced = admission.begin_handshake("c")
    assert displaced is None and admission.handshaking == 4
    d1, displaced = admission.begin_handshake("d")
    assert displaced is a2  # all taken: the oldest of the source holding most
    admission.end_handshake(a2)  # ending a displaced one again changes nothing
    assert admission.handshaking == 4
    for handshake in (a3, b1, c1, d1):
        admission.end_handshake(handshake)
    assert admission.handshaking == 0


def test_strangers_never_take_the_sessions_kept_for_friends() -> None:
    limits = ServerLimits(
        sessions=5, stranger_sessions=3, stranger_sessions_per_source=2, sessions_per_node=2
    )
    admission = Admission(limits)
    strangers = [admission.admit("a", node(1), friend=False) for _ in range(2)]
    assert all(isinstance(s, Session) for s in strangers)
    refused = admission.admit("a", node(2), friend=False)
    assert isinstance(refused, TurnedAway) and refused.kind == "source"
    third = admission.admit("b", node(3), friend=False)
    assert isinstance(third, Session)
    refused = admission.admit("c", node(4), friend=False)
    assert isinstance(refused, TurnedAway) and refused.kind == "strangers"
    assert "the other 2 are kept for friends" in refused.reason
    friends = [admission.admit("a", node(9), friend=True) for _ in range(2)]
    assert all(isinstance(s, Session) for s in friends)
    refused = admission.admit("a", node(9), friend=True)
    assert isinstance(refused, TurnedAway) and refused.kind == "node"
    refused = admission.admit("d", node(8), friend=True)
    assert isinstance(refused, TurnedAway) and refused.kind == "sessions"
    for session in [*strangers, third, *friends]:
        assert isinstance(session, Session)
        admission.end_session(session)
    assert (admission.sessions, admission.strangers) == (0, 0)
    assert isinstance(admission.admit("c", node(4), friend=False), Session)


def test_idle_limits_differ_for_friends_and_strangers() -> None:
    admission = Admission(ServerLimits(idle=300, stranger_idle=60))
    friend = admission.admit("a", node(1), friend=True)
    stranger = admission.admit("a", node(2), friend=False)
    assert isinstance(friend, Session) and isinstance(stranger, Session)
    assert (admission.idle_limit(friend), admission.idle_limit(stranger)) == (300, 60)


def test_the_log_throttle_logs_a_burst_then_says_how_many_it_left_out() -> None:
    throttle = LogThrottle(period=60, burst=3)
    seen = [throttle.allow("refused", 1000 + i * 0.01) for i in range(10)]
    assert seen == [(True, 0)] * 3 + [(False, 0)] * 7
    assert throttle.allow("other", 1000.5) == (True, 0)  # kinds are apart
    assert throttle.allow("refused", 1061) == (True, 7)  # a new period: the count
    assert throttle.allow("refused", 1062) == (True, 0)


def test_bad_node_ids_are_our_bug() -> None:
    with pytest.raises(ValueError, match="20 bytes"):
        Admission(ServerLimits()).admit("a", b"short", friend=False)
