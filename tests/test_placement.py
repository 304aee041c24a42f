"""Placement: the peer ranking and the code chosen for the peers there are."""

from __future__ import annotations

import collections
import math
import random

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pbackup.core.placement import (
    MAX_EXPANSION,
    MIN_PEERS,
    Code,
    PackPlan,
    PeerWeight,
    choose_code,
    fit_code,
    hash_fraction,
    plan_pack,
    rank_peers,
    rank_weighted,
    spread_hosts,
    uptime,
    weigh_peers,
)
from p2pbackup.errors import UsageError

PACK_IDS = st.binary(min_size=32, max_size=32)
PEER_NAMES = st.text(min_size=1, max_size=8)
WEIGHTS = st.dictionaries(
    PEER_NAMES, st.floats(0, 1e15, allow_nan=False, allow_infinity=False), max_size=12
)


def peer_weights(most_free: int) -> st.SearchStrategy[dict[str, PeerWeight]]:
    return st.dictionaries(
        PEER_NAMES,
        st.builds(
            PeerWeight,
            free=st.none() | st.integers(0, most_free),
            uptime=st.floats(0.01, 1),
            reputation=st.floats(0.01, 1),
        ),
        max_size=12,
    )


def pack_ids(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(32) for _ in range(count)]


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


def test_the_code_counts_only_peers_with_room_for_its_shard() -> None:
    def need(k: int) -> int:
        return 600 // k  # a pack of 600 bytes

    # Seven peers, two of which offer nothing: 3-of-6 would put two of its
    # six shards where they are refused. Five take shards: 2-of-5.
    assert fit_code(3, 6, [None, 10_000, 10_000, 10_000, 10_000, 0, 0], need) == Code(
        2, 5, adapted=True
    )
    # Room for a 3-of-6 shard (200) but not for a 2-of-5 one (300): the
    # count is taken again for the smaller code's larger shards.
    assert fit_code(3, 6, [None] * 4 + [250, 0, 0], need) == Code(2, 4, adapted=True)
    assert fit_code(3, 6, [None] * 7, need) == Code(3, 6)
    with pytest.raises(UsageError, match="2 usable"):
        fit_code(3, 6, [None, None, 0, 0, 0], need)


@given(
    configured(),
    st.lists(st.one_of(st.none(), st.integers(0, 2000)), max_size=20),
    st.integers(0, 3000),
)
def test_a_fitted_code_has_n_peers_with_room(
    code: tuple[int, int], rooms: list[int | None], size: int
) -> None:
    k, n = code

    def need(data_shards: int) -> int:
        return -(-size // data_shards)

    try:
        chosen = fit_code(k, n, rooms, need)
    except UsageError:
        return
    assert sum(1 for room in rooms if room is None or room >= need(chosen.k)) >= chosen.n


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


# -- weighted ranking ---------------------------------------------------------------------


@given(PACK_IDS, PEER_NAMES)
def test_the_hash_fraction_is_strictly_inside_zero_and_one(pack_id: bytes, peer: str) -> None:
    fraction = hash_fraction(pack_id, peer)
    assert 0 < fraction < 1
    assert -math.log(fraction) > 0  # every score is finite


@given(PACK_IDS, WEIGHTS)
def test_the_weighted_ranking_depends_on_the_pack_and_the_weights_alone(
    pack_id: bytes, weights: dict[str, float]
) -> None:
    ranked = rank_weighted(pack_id, weights)
    assert sorted(ranked) == sorted(weights)
    shuffled = dict(reversed(list(weights.items())))
    assert rank_weighted(pack_id, shuffled) == ranked


@given(PACK_IDS, st.lists(PEER_NAMES, unique=True), st.floats(1e-6, 1e15))
def test_equal_weights_rank_as_the_unweighted_ranking(
    pack_id: bytes, peers: list[str], weight: float
) -> None:
    assert rank_weighted(pack_id, dict.fromkeys(peers, weight)) == rank_peers(pack_id, peers)


@given(PACK_IDS, WEIGHTS)
def test_a_peer_of_weight_zero_never_comes_before_one_with_weight(
    pack_id: bytes, weights: dict[str, float]
) -> None:
    ranked = rank_weighted(pack_id, weights)
    zero = [weights[peer] == 0 for peer in ranked]
    assert zero == sorted(zero)  # every positive weight first


@given(PACK_IDS, peer_weights(1 << 44), st.integers(1, 1 << 30))
def test_a_peer_without_room_for_the_shard_is_never_chosen_before_one_with_room(
    pack_id: bytes, peers: dict[str, PeerWeight], need: int
) -> None:
    ranked = rank_weighted(pack_id, weigh_peers(peers, need))
    no_room = [peers[p].free is not None and peers[p].free < need for p in ranked]  # type: ignore[operator]
    assert no_room == sorted(no_room)


def test_rank_weighted_refuses_weights_that_are_not_finite_and_non_negative() -> None:
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="weight"):
            rank_weighted(b"p" * 32, {"a": 1.0, "b": bad})


def test_equal_weights_spread_packs_evenly() -> None:
    peers = [f"peer{i}" for i in range(5)]
    firsts = collections.Counter(
        rank_weighted(pack, dict.fromkeys(peers, 3.0))[0] for pack in pack_ids(5000, seed=1)
    )
    # Binomial(5000, 1/5): standard deviation 28; 150 is over five of them.
    assert all(abs(firsts[peer] - 1000) < 150 for peer in peers), firsts


def test_a_heavier_peer_wins_proportionally_more_packs() -> None:
    weights = {"light": 1.0, "middle": 2.0, "heavy": 4.0}
    packs = pack_ids(7000, seed=2)
    firsts = collections.Counter(rank_weighted(pack, weights)[0] for pack in packs)
    # Weighted rendezvous hashing: first place in proportion to the weight
    # (1000, 2000, 4000 expected; standard deviations 32, 38, 41).
    for peer, weight in weights.items():
        assert abs(firsts[peer] - 1000 * weight) < 200, firsts
    # Among the top two (what a 2-shard pack of three peers uses), the
    # lightest still gets a fair part: weighting prefers, it does not exclude.
    top_two = collections.Counter(p for pack in packs for p in rank_weighted(pack, weights)[:2])
    assert top_two["light"] > 0.15 * len(packs)


def test_weights_follow_free_space_uptime_and_reputation() -> None:
    gib = 1 << 30
    weights = weigh_peers(
        {
            "big": PeerWeight(free=8 * gib),
            "small": PeerWeight(free=2 * gib),
            "full": PeerWeight(free=100),
            "flaky": PeerWeight(free=8 * gib, uptime=0.5),
            "distrusted": PeerWeight(free=8 * gib, reputation=0.25),
        },
        need=1 << 20,
    )
    assert weights["big"] == 4 * weights["small"]
    assert weights["full"] == 0
    assert weights["flaky"] == weights["big"] / 2
    assert weights["distrusted"] == weights["big"] / 4
    # A peer whose room is not known counts as the median of those known.
    known = {name: PeerWeight(free=size * gib) for name, size in (("a", 1), ("b", 4), ("c", 16))}
    weights = weigh_peers({**known, "unknown": PeerWeight(free=None)}, need=1)
    assert weights["unknown"] == weights["b"] == 4 * weights["a"]


def test_small_drifts_of_free_space_do_not_change_the_weights() -> None:
    gib = 1 << 30
    before = weigh_peers({"a": PeerWeight(free=100 * gib), "b": PeerWeight(free=50 * gib)}, 1)
    after = weigh_peers(
        {"a": PeerWeight(free=100 * gib - (1 << 26)), "b": PeerWeight(free=50 * gib + (1 << 26))},
        1,
    )
    assert before == after
    assert weigh_peers({"a": PeerWeight()}, 1 << 40) == {"a": 1.0}  # nothing known: alike


def test_uptime_counts_a_peer_never_asked_as_up() -> None:
    assert uptime(0, 0) == 1.0
    assert uptime(0, 1) == 0.5
    assert uptime(9, 9) == 1.0
    assert uptime(1, 9) == 0.2
    with pytest.raises(ValueError):
        uptime(3, 2)


# -- a pack's plan ------------------------------------------------------------------------


#: A pack id, n, the peers, the bytes of a shard, each peer's host, the peers down.
PlanInputs = tuple[bytes, int, dict[str, PeerWeight], int, dict[str, str], frozenset[str]]


@st.composite
def plan_inputs(draw: st.DrawFn) -> PlanInputs:
    # Free space and shard sizes of the same scale: some peers have room, some not.
    peers = draw(peer_weights(1 << 20))
    hosts = {peer: draw(st.sampled_from("abcdef")) for peer in peers}
    down = frozenset(draw(st.sets(st.sampled_from(sorted(peers)))) if peers else ())
    return (
        draw(PACK_IDS),
        draw(st.integers(1, 12)),
        peers,
        draw(st.integers(1, 1 << 20)),
        hosts,
        down,
    )


@given(plan_inputs())
def test_a_plan_places_every_peer_once_and_depends_on_its_inputs_alone(
    inputs: PlanInputs,
) -> None:
    pack_id, n, peers, need, hosts, down = inputs
    plan = plan_pack(pack_id, n, peers, need, hosts.__getitem__, down)
    assert len(plan.targets) == min(n, len(peers))
    assert sorted(plan.targets + plan.spares) == sorted(peers)
    shuffled = dict(reversed(list(peers.items())))
    assert plan_pack(pack_id, n, shuffled, need, hosts.__getitem__, set(down)) == plan


@given(plan_inputs())
def test_a_plan_turns_to_peers_down_or_without_room_last(
    inputs: PlanInputs,
) -> None:
    pack_id, n, peers, need, hosts, down = inputs
    plan = plan_pack(pack_id, n, peers, need, hosts.__getitem__, down)
    order = plan.targets + plan.spares

    def short(peer: str) -> bool:
        free = peers[peer].free
        return free is not None and free < need

    # Down peers after every other; among each group, no room after room.
    assert [p in down for p in order] == sorted(p in down for p in order)
    for group in ([p for p in order if p not in down], [p for p in order if p in down]):
        assert [short(p) for p in group] == sorted(short(p) for p in group)
    # The spares reported short of room: exactly those up and without room.
    assert plan.short_of_room == tuple(p for p in plan.spares if short(p) and p not in down)


@given(plan_inputs())
def test_a_plan_spreads_its_targets_over_hosts_while_it_can(
    inputs: PlanInputs,
) -> None:
    pack_id, n, peers, need, hosts, _down = inputs
    # With every peer up and room unknown, all weigh alike but for uptime:
    # the hosts alone decide who shares a pack.
    unbounded = {peer: attrs.evolve(weight, free=None) for peer, weight in peers.items()}
    plan = plan_pack(pack_id, n, unbounded, need, hosts.__getitem__)
    distinct = len(set(hosts.values()))
    assert len({hosts[p] for p in plan.targets}) == min(len(plan.targets), distinct)


def test_a_plan_with_equal_peers_follows_the_ranking() -> None:
    peers = {f"p{i}": PeerWeight() for i in range(8)}
    plan = plan_pack(b"x" * 32, 5, peers, 100, lambda peer: peer)
    ranked = rank_peers(b"x" * 32, peers)
    assert plan == PackPlan(tuple(ranked[:5]), tuple(ranked[5:]), ())


def test_a_full_spare_is_short_of_room_and_a_down_one_is_not() -> None:
    peers = {
        "roomy": PeerWeight(free=1000),
        "also": PeerWeight(free=1000),
        "cramped": PeerWeight(free=10),
        "gone": PeerWeight(free=10),
    }
    plan = plan_pack(b"y" * 32, 2, peers, 100, lambda peer: peer, down={"gone"})
    assert set(plan.targets) == {"roomy", "also"}
    assert plan.spares == ("cramped", "gone")
    assert plan.short_of_room == ("cramped",)
