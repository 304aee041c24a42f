"""The repair plan (pure): what each pack needs, from the state of its shards."""

from __future__ import annotations

import hashlib

import hypothesis.strategies as st
import pytest
from hypothesis import given

from p2pbackup.core.placement import PeerWeight
from p2pbackup.maintenance.repair import (
    DEFAULT_GRACE,
    Action,
    PackState,
    PeerPool,
    RepairPolicy,
    ShardCopy,
    ShardState,
    decide_pack,
    most_urgent_first,
    plan_repair,
    reachability,
)

H = ShardState.HEALTHY
OFF = ShardState.OFFLINE
LOST = ShardState.LOST
NOW = 10_000_000.0
POLICY = RepairPolicy()


def pack_id(seed: int = 0) -> bytes:
    return hashlib.blake2b(seed.to_bytes(4, "big"), digest_size=32).digest()


def pack(states: list[ShardState], *, k: int = 4, seed: int = 0, need: int = 100) -> PackState:
    """Shard i on peer "p{i}" in states[i]; n = len(states)."""
    copies = tuple(ShardCopy(i, f"p{i}", state) for i, state in enumerate(states))
    return PackState(pack_id(seed), k, len(states), need, copies)


def pool(
    peers: list[str], *, hosts: dict[str, str] | None = None, free: int | None = None
) -> PeerPool:
    everyone = {f"p{i}" for i in range(30)} | set(peers)
    host_map = {p: (hosts or {}).get(p, f"host-{p}") for p in everyone}
    return PeerPool({p: PeerWeight(free=free) for p in peers}, host_map)


def spare_peers(count: int) -> list[str]:
    return [f"s{i}" for i in range(count)]


def test_the_threshold_keeps_three_spares_within_the_code() -> None:
    assert POLICY.threshold(4, 10) == 7
    assert POLICY.threshold(3, 6) == 6
    assert POLICY.threshold(1, 2) == 2
    assert POLICY.threshold(29, 110) == 32
    assert RepairPolicy(spares=1).threshold(4, 10) == 5
    with pytest.raises(ValueError):
        RepairPolicy(spares=0)
    with pytest.raises(ValueError):
        RepairPolicy(grace=-1)


def test_reachability_tells_a_sleeping_peer_from_a_lost_one() -> None:
    assert reachability(NOW - 3600, NOW, DEFAULT_GRACE) is OFF
    assert reachability(NOW - DEFAULT_GRACE, NOW, DEFAULT_GRACE) is LOST
    assert reachability(None, NOW, DEFAULT_GRACE) is LOST
    assert reachability(NOW, NOW, 0) is LOST  # --grace 0: every unreachable peer is lost


def test_a_pack_at_the_threshold_is_left_alone() -> None:
    states = [H] * 7 + [LOST] * 3
    decision = decide_pack(pack(states), pool(spare_peers(5)), POLICY, NOW)
    assert decision.action is Action.NOTHING and decision.rebuild == ()
    assert decision.healthy == 7


def test_lost_shards_below_the_threshold_are_rebuilt_on_peers_holding_none() -> None:
    states = [H] * 6 + [LOST, ShardState.FAILED, ShardState.MISSING, ShardState.REMOVED]
    decision = decide_pack(
        pack(states), pool([f"p{i}" for i in range(10)] + spare_peers(6)), POLICY, NOW
    )
    assert decision.action is Action.REPAIR
    assert [step.index for step in decision.rebuild] == [6, 7, 8, 9]
    targets = [step.peer_id for step in decision.rebuild]
    # p0..p5 hold healthy shards; p7 and p8 answered and lost theirs, so may
    # take one again; the lost peer p6 is not usable.
    assert not set(targets) & {f"p{i}" for i in range(6)}
    assert len(set(targets)) == 4
    assert decision.healthy_after == 10
    # The lost copy is remembered as an extra; the failed and removed ones
    # are deleted; the missing one forgotten.
    assert [c.peer_id for c in decision.displace] == ["p6"]
    assert {c.peer_id for c in decision.delete} == {"p7", "p9"}
    assert [c.peer_id for c in decision.forget] == ["p8"]


def test_offline_peers_within_grace_are_waited_for() -> None:
    states = [H] * 6 + [OFF] * 3 + [LOST]
    decision = decide_pack(pack(states), pool(spare_peers(5)), POLICY, NOW)
    assert decision.action is Action.WAIT
    assert decision.rebuild == ()
    assert "offline" in decision.reason


def test_a_pack_near_k_does_not_wait_and_rebuilds_the_offline_shards_too() -> None:
    states = [H] * 4 + [OFF] * 5 + [LOST]
    decision = decide_pack(pack(states), pool(spare_peers(8)), POLICY, NOW)
    assert decision.action is Action.REPAIR
    assert sorted(step.index for step in decision.rebuild) == list(range(4, 10))
    # The lost shard goes first; the offline copies are kept as extras.
    assert decision.rebuild[0].index == 9
    assert {c.peer_id for c in decision.displace} == {f"p{i}" for i in range(4, 10)}


def test_below_k_nothing_is_rebuilt_or_deleted() -> None:
    states = [H] * 3 + [OFF] * 2 + [ShardState.FAILED] * 5
    decision = decide_pack(pack(states), pool(spare_peers(8)), POLICY, NOW)
    assert decision.action is Action.UNRECOVERABLE
    assert decision.rebuild == () and decision.delete == ()
    assert "3 healthy shards of the 4 needed" in decision.reason
    assert "offline within the grace period" in decision.reason


def test_too_few_peers_rebuild_what_they_can_and_say_how_many_are_short() -> None:
    states = [H] * 5 + [LOST] * 5
    decision = decide_pack(pack(states), pool(spare_peers(2)), POLICY, NOW)
    assert decision.action is Action.REPAIR
    assert len(decision.rebuild) == 2 and decision.short == 3
    assert decision.healthy_after == 7
    assert "3 shards found no usable peer" in decision.reason


def test_a_peer_without_room_gets_nothing() -> None:
    states = [H] * 5 + [LOST] * 5
    decision = decide_pack(pack(states, need=1000), pool(spare_peers(6), free=999), POLICY, NOW)
    assert decision.rebuild == () and decision.short == 5


def test_a_removed_peer_is_evacuated_even_above_the_threshold() -> None:
    states = [H] * 9 + [ShardState.REMOVED]
    decision = decide_pack(pack(states), pool(spare_peers(3)), POLICY, NOW)
    assert decision.action is Action.REPAIR
    assert [step.index for step in decision.rebuild] == [9]
    assert [c.peer_id for c in decision.delete] == ["p9"]


def test_a_returning_extra_copy_is_counted_again_instead_of_rebuilt() -> None:
    copies = (
        *(ShardCopy(i, f"p{i}", H) for i in range(6)),
        ShardCopy(6, "p6", LOST),
        ShardCopy(6, "back", H, current=False, displaced_at=NOW - 10),
        *(ShardCopy(i, f"p{i}", H) for i in range(7, 10)),
    )
    decision = decide_pack(PackState(pack_id(), 4, 10, 100, copies), pool([]), POLICY, NOW)
    assert decision.action is Action.NOTHING
    assert decision.healthy == 10
    assert [c.peer_id for c in decision.reinstate] == ["back"]
    assert [c.peer_id for c in decision.displace] == ["p6"]


def test_surplus_copies_are_deleted_after_a_while() -> None:
    healthy = tuple(ShardCopy(i, f"p{i}", H) for i in range(10))
    young = ShardCopy(3, "young", H, current=False, displaced_at=NOW - 60)
    old = ShardCopy(4, "old", H, current=False, displaced_at=NOW - POLICY.surplus_after)
    away = ShardCopy(5, "away", OFF, current=False, displaced_at=NOW - 10 * DEFAULT_GRACE)
    state = PackState(pack_id(), 4, 10, 100, (*healthy, young, old, away))
    decision = decide_pack(state, pool([]), POLICY, NOW)
    assert decision.action is Action.NOTHING
    assert decision.delete == (old,)
    assert decision.reinstate == ()


def test_hosts_of_holders_are_avoided_while_other_hosts_are_left() -> None:
    states = [H] * 5 + [LOST] * 2
    hosts = {f"p{i}": "home-a" for i in range(5)} | {"a": "home-a", "b": "home-b", "c": "home-b"}
    decision = decide_pack(pack(states, k=4), pool(["a", "b", "c"], hosts=hosts), POLICY, NOW)
    targets = [step.peer_id for step in decision.rebuild]
    assert len(targets) == 2
    # Only one new host exists: it takes one shard, the holders' host the other.
    assert {hosts[t] for t in targets} == {"home-a", "home-b"}


def test_a_plan_takes_room_from_the_peers_it_fills() -> None:
    packs = [pack([H] * 5 + [LOST] * 5, seed=seed, need=100) for seed in range(3)]
    plan = plan_repair(packs, pool(spare_peers(5), free=1000), POLICY, NOW)
    placed = [step.peer_id for d in plan.decisions for step in d.rebuild]
    # 5 peers with room for 10 shards each: the 15 rebuilt shards all fit,
    # and no peer got more than its room.
    assert len(placed) == 15
    assert max(placed.count(p) for p in set(placed)) <= 10
    tight = plan_repair(packs, pool(spare_peers(5), free=100), POLICY, NOW)
    assert sum(len(d.rebuild) for d in tight.decisions) == 5
    assert tight.count(Action.REPAIR) == 3


def test_the_most_urgent_packs_come_first() -> None:
    safe = pack([H] * 10, seed=1)
    urgent = pack([H] * 4 + [LOST] * 6, seed=2)
    middle = pack([H] * 6 + [LOST] * 4, seed=3)
    assert most_urgent_first([safe, urgent, middle]) == [urgent, middle, safe]


# -- properties ----------------------------------------------------------------------------

STATES = list(ShardState)


@st.composite
def situations(draw: st.DrawFn) -> tuple[PackState, PeerPool]:
    n = draw(st.integers(2, 14))
    k = draw(st.integers(1, n - 1))
    hosts_count = draw(st.integers(1, 8))
    peers = [f"peer{i}" for i in range(draw(st.integers(0, 20)))]
    hosts = {p: f"host{draw(st.integers(0, hosts_count - 1))}" for p in peers}
    copies = []
    for index in range(n):
        if not peers or draw(st.integers(0, 9)) == 0:
            continue  # no copy of this index at all
        holder = draw(st.sampled_from(peers))
        copies.append(ShardCopy(index, holder, draw(st.sampled_from(STATES))))
        if draw(st.integers(0, 4)) == 0:
            copies.append(
                ShardCopy(
                    index,
                    draw(st.sampled_from(peers)),
                    draw(st.sampled_from(STATES)),
                    current=False,
                    displaced_at=NOW - draw(st.floats(0, 10 * DEFAULT_GRACE)),
                )
            )
    # One current copy per index, as the index keeps them.
    seen: set[int] = set()
    unique = []
    for copy in copies:
        if copy.current and copy.index in seen:
            continue
        if copy.current:
            seen.add(copy.index)
        unique.append(copy)
    need = draw(st.integers(1, 1000))
    usable = [p for p in peers if draw(st.booleans())]
    weights = {p: PeerWeight(free=draw(st.one_of(st.none(), st.integers(0, 3000)))) for p in usable}
    state = PackState(pack_id(draw(st.integers(0, 1000))), k, n, need, tuple(unique))
    return state, PeerPool(weights, hosts)


def chosen_copies(state: PackState) -> dict[int, ShardCopy]:
    """The healthy copy each index is read from, one index per peer, current
    copies first (as the plan counts them)."""
    chosen: dict[int, ShardCopy] = {}
    for copy in sorted(state.copies, key=lambda c: (not c.current, c.index, c.peer_id)):
        taken = {c.peer_id for c in chosen.values()}
        if copy.state is H and copy.index not in chosen and copy.peer_id not in taken:
            chosen[copy.index] = copy
    return chosen


@given(situations(), st.sampled_from([RepairPolicy(), RepairPolicy(grace=0, spares=1)]))
def test_plan_properties(situation: tuple[PackState, PeerPool], policy: RepairPolicy) -> None:
    state, peers = situation
    decision = decide_pack(state, peers, policy, NOW)
    chosen = chosen_copies(state)
    healthy = {i: c.peer_id for i, c in chosen.items()}
    assert decision.healthy == len(healthy)
    r = policy.threshold(state.k, state.n)
    assert state.k < r <= state.n

    # Never planned as repairable below k.
    if len(healthy) < state.k:
        assert decision.action is Action.UNRECOVERABLE
        assert decision.rebuild == () and decision.delete == ()
    # Left alone at >= r healthy, unless a peer was removed.
    removed = any(c.current and c.state is ShardState.REMOVED for c in state.copies)
    if len(healthy) >= r and not removed:
        assert decision.action is Action.NOTHING and decision.rebuild == ()

    targets = [step.peer_id for step in decision.rebuild]
    indices = [step.index for step in decision.rebuild]
    # Each rebuilt index once, in range, with no healthy copy now.
    assert len(set(indices)) == len(indices)
    assert all(0 <= i < state.n and i not in healthy for i in indices)
    # Never two shards of the pack on one peer: targets are distinct usable
    # peers holding no healthy or offline copy.
    holders = {c.peer_id for c in state.copies if c.state in (H, OFF)}
    assert len(set(targets)) == len(targets)
    assert all(t in peers.weights and t not in holders for t in targets)
    # Every target has room.
    for t in targets:
        free = peers.weights[t].free
        assert free is None or free >= state.need
    # Hosts apart when avoidable: targets take distinct new hosts as long as
    # usable candidates on new hosts remain.
    holder_hosts = {peers.host(p) for p in holders}
    candidates = [
        p
        for p, w in peers.weights.items()
        if p not in holders and (w.free is None or w.free >= state.need)
    ]
    new_hosts = {peers.host(p) for p in candidates} - holder_hosts
    target_hosts = [peers.host(t) for t in targets]
    expected_new = min(len(new_hosts), len(targets))
    assert len(set(target_hosts[:expected_new]) - holder_hosts) == expected_new
    # Waits only within grace and not near k; never waits with grace 0.
    offline = any(c.state is OFF for c in state.copies)
    if decision.action is Action.WAIT:
        assert offline and decision.healthy - state.k >= policy.urgent_spares
        assert decision.healthy < r <= decision.healthy + decision.offline
    if decision.action is Action.REPAIR and decision.healthy - state.k < policy.urgent_spares:
        offline_indices = {
            c.index for c in state.copies if c.state is OFF and c.index not in healthy
        }
        rebuilt_or_short = set(indices) | (offline_indices if decision.short else set())
        assert offline_indices <= rebuilt_or_short
    # Whatever is deleted is never the healthy copy an index is read from.
    assert not set(decision.delete) & set(chosen.values())
    # Short only when the candidates ran out.
    if decision.short:
        assert len(targets) == len(candidates)
