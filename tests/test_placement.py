"""Placement: the peer ranking and the code chosen for the peers there are."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pbackup.errors import UsageError
from p2pbackup.placement import (
    MAX_EXPANSION,
    MIN_PEERS,
    Code,
    choose_code,
    rank_peers,
    spread_hosts,
)


@st.composite
def configured(draw: st.DrawFn) -> tuple[int, int]:
    n = draw(st.integers(2, 255))
    return draw(st.integers(1, n - 1)), n


@given(configured(), st.integers(0, 300))
def test_the_code_fits_the_peers_and_survives_two_losses(code: tuple[int, int], peers: int) -> None:
    k, n = code
    if peers < n and peers < MIN_PEERS:
        with pytest.raises(UsageError, match=f"add {MIN_PEERS - peers} more"):
            choose_code(k, n, peers)
        return
    chosen = choose_code(k, n, peers)
    if peers >= n:
        assert chosen == Code(k, n)
        return
    assert chosen.adapted and chosen.n == peers
    assert chosen.n - chosen.k >= 2  # two peers may be lost
    assert chosen.n <= MAX_EXPANSION * chosen.k  # expansion at most 3
    assert 1 <= chosen.k < chosen.n


def test_adapted_codes_follow_the_configured_ratio() -> None:
    assert choose_code(3, 6, 6) == Code(3, 6)
    assert choose_code(3, 6, 9) == Code(3, 6)
    assert choose_code(3, 6, 4) == Code(2, 4, adapted=True)
    assert choose_code(3, 6, 5) == Code(2, 5, adapted=True)  # 2.5 rounds to 2
    assert choose_code(4, 10, 6) == Code(2, 6, adapted=True)  # the ratio 2/5 of 6
    assert choose_code(4, 10, 3) == Code(1, 3, adapted=True)
    assert choose_code(8, 10, 9) == Code(7, 9, adapted=True)  # two losses bound k
    assert choose_code(1, 10, 9) == Code(3, 9, adapted=True)  # expansion bounds k


def test_too_few_peers_is_a_refusal_saying_how_many_more() -> None:
    with pytest.raises(UsageError, match=r"at least 3 peers.*2 usable.*add 1 more"):
        choose_code(3, 6, 2)
    with pytest.raises(UsageError, match=r"0 usable.*add 3 more"):
        choose_code(1, 2, 0)
    # A configured code smaller than three peers still works with its n.
    assert choose_code(1, 2, 2) == Code(1, 2)


@given(st.binary(min_size=32, max_size=32), st.lists(st.text(min_size=1), unique=True))
def test_ranking_is_a_stable_permutation(pack_id: bytes, peers: list[str]) -> None:
    ranked = rank_peers(pack_id, peers)
    assert sorted(ranked) == sorted(peers)
    assert rank_peers(pack_id, list(reversed(peers))) == ranked


@given(
    st.lists(
        st.tuples(st.text(min_size=1, max_size=4), st.sampled_from("abcd")),
        unique_by=lambda p: p[0],
    )
)
def test_spreading_puts_one_peer_per_host_first(peers: list[tuple[str, str]]) -> None:
    host = dict(peers)
    ranked = [name for name, _ in peers]
    spread = spread_hosts(ranked, host.__getitem__)
    assert sorted(spread) == sorted(ranked)
    distinct = len(set(host.values()))
    assert len({host[p] for p in spread[:distinct]}) == distinct
    # Within the first-per-host group and the rest, the ranking's order holds.
    firsts = spread[:distinct]
    assert firsts == [p for p in ranked if p in firsts]


def test_two_nodes_on_one_machine_share_a_pack_only_when_they_must() -> None:
    host = {"a1": "10.0.0.1", "a2": "10.0.0.1", "b": "10.0.0.2", "c": "10.0.0.3"}
    assert spread_hosts(["a1", "a2", "b", "c"], host.__getitem__) == ["a1", "b", "c", "a2"]
