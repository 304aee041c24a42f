"""The race: asking several peers at once, in virtual time (exact to the tick)."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from p2pbackup.engine.race import Patience, race
from p2pbackup.errors import PeerUnavailableError
from p2pbackup.nurseries import unwrap_single

PATIENCE = Patience(floor=1.0, factor=3.0, limit=5.0)


class Peers:
    """Fake peers: each answers its own name after its delay, fails (a
    delay given as a negative number of seconds), or never answers (inf)."""

    def __init__(self, **delays: float) -> None:
        self.delays = delays
        #: (peer, when it was asked), in order.
        self.asked: list[tuple[str, float]] = []
        self.cancelled: list[str] = []

    async def ask(self, peer: str) -> str:
        self.asked.append((peer, trio.current_time()))
        delay = self.delays[peer]
        try:
            if delay < 0:
                await trio.sleep(-delay)
                raise PeerUnavailableError(f"{peer}: refused")
            await trio.sleep(delay)
        except trio.Cancelled:
            self.cancelled.append(peer)
            raise
        return peer


def test_patience_is_a_multiple_of_the_slowest_answer_above_a_floor() -> None:
    assert PATIENCE.overdue_after(None) == 5.0
    assert PATIENCE.overdue_after(0.01) == 1.0
    assert PATIENCE.overdue_after(0.5) == 1.5
    assert PATIENCE.overdue_after(4.0) == 12.0  # the limit is for while nothing answered


async def test_a_failure_starts_the_next_candidate_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peers = Peers(a=0.1, b=-0.05, c=0.2, d=0.1)
    result = await race("abcd", peers.ask, wanted=2, patience=PATIENCE)
    assert sorted(peers.asked) == [("a", 0), ("b", 0), ("c", pytest.approx(0.05))]
    assert list(result.answers) == ["a", "c"] and list(result.failures) == ["b"]
    assert trio.current_time() == pytest.approx(0.25)
    assert result.overdue == [] and result.slowest == pytest.approx(0.2)


async def test_an_overdue_request_gets_the_next_candidate_beside_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peers = Peers(a=0.1, hung=math.inf, b=0.1, c=0.1)
    late: list[str] = []
    result = await race(
        ["a", "hung", "b", "c"], peers.ask, wanted=2, patience=PATIENCE, overdue=late.append
    )
    # a answered at 0.1, so hung is overdue at its start plus max(1.0,
    # 3 x 0.1) = 1.0; b is asked then and answers at 1.1, and hung is
    # cancelled. c is never asked.
    assert sorted(peers.asked) == [("a", 0), ("b", pytest.approx(1.0)), ("hung", 0)]
    assert late == result.overdue == ["hung"] and peers.cancelled == ["hung"]
    assert list(result.answers) == ["a", "b"]
    assert trio.current_time() == pytest.approx(1.1)


async def test_an_overdue_request_may_still_answer_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peers = Peers(a=0.5, slow=1.7, b=3.0)
    result = await race(["a", "slow", "b"], peers.ask, wanted=2, patience=PATIENCE)
    # Overdue at 1.5 (3 x 0.5); b, asked then, would answer at 4.5: slow's
    # answer at 1.7 counts, and b is cancelled.
    assert peers.asked[-1] == ("b", pytest.approx(1.5))
    assert list(result.answers) == ["a", "slow"] and peers.cancelled == ["b"]
    assert trio.current_time() == pytest.approx(1.7)


async def test_with_nothing_answered_a_request_is_overdue_at_the_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peers = Peers(hung=math.inf, b=0.2)
    result = await race(["hung", "b"], peers.ask, wanted=1, patience=PATIENCE)
    assert peers.asked == [("hung", 0), ("b", pytest.approx(5.0))]
    assert list(result.answers) == ["b"]
    assert trio.current_time() == pytest.approx(5.2)


async def test_given_up_when_no_candidate_is_left(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peers = Peers(a=0.01, b=0.02, refused=-0.01, hung=math.inf, far=0.9)
    result = await race(
        ["a", "b", "refused", "hung", "far"], peers.ask, wanted=5, patience=PATIENCE, give_up=True
    )
    # Everyone is asked at once; the hung one is given up on at the floor,
    # since the others answered long before; the far one answered in time.
    assert {peer for peer, when in peers.asked if when == 0} == {"a", "b", "refused", "hung", "far"}
    assert set(result.answers) == {"a", "b", "far"} and list(result.failures) == ["refused"]
    assert result.given_up == {"hung": pytest.approx(2.7)}
    assert trio.current_time() == pytest.approx(2.7)  # 3 x far's 0.9


async def test_without_give_up_an_overdue_request_with_no_spare_is_waited_for(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peers = Peers(a=0.1, late=2.0)
    result = await race(["a", "late"], peers.ask, wanted=2, patience=PATIENCE)
    assert list(result.answers) == ["a", "late"] and result.overdue == ["late"]
    assert trio.current_time() == pytest.approx(2.0)


async def test_other_errors_end_the_race(autojump_clock: trio.testing.MockClock) -> None:
    async def ask(peer: str) -> str:
        raise ValueError(peer)

    with pytest.raises(ValueError), unwrap_single():
        await race(["a"], ask, wanted=1, patience=PATIENCE)
