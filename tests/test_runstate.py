"""The run state: what a repository learns of its peers in one run, on a clock of the test's."""

from __future__ import annotations

from p2pbackup.engine.runstate import DOWN_SECONDS, RunState
from p2pbackup.stores.shardstore import Space


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_peer_is_down_for_a_while_and_up_again_once_it_answers() -> None:
    clock = Clock()
    run = RunState(clock)
    run.mark_down("a")
    clock.now += DOWN_SECONDS - 1
    assert run.is_down("a") and not run.is_down("b")
    clock.now += 1
    assert not run.is_down("a")
    run.mark_down("a")
    run.answered("a", Space(0, 100))
    assert not run.is_down("a")


def test_room_is_what_a_peer_offered_less_what_was_sent_since() -> None:
    run = RunState(Clock())
    assert run.room("a") is None
    run.answered("a", Space(used=40, offered=100))
    run.reserve("a", 50)
    assert run.room("a") == 10
    run.reserve("a", 50)
    assert run.room("a") == 0  # never below nothing
    run.release("a", 50)
    assert run.room("a") == 10
    # A new answer counts every shard sent before it.
    run.answered("a", Space(used=90, offered=100))
    assert run.room("a") == 10
    run.answered("b", Space(used=5, offered=None))
    assert run.room("b") is None


def test_a_full_peer_is_named_over_a_passed_over_one() -> None:
    run = RunState(Clock())
    run.answered("a", Space(used=990, offered=1000))
    run.answered("b", Space(used=0, offered=None))
    run.pass_over("a", 100)
    run.pass_over("b", 100)  # no offer known: nothing to say
    run.pass_over("c", 100)
    assert list(run.full_peers()) == ["a"]
    assert "no room for a shard of" in run.full_peers()["a"]
    assert not run.is_full("a") and run.refused() == {}
    run.mark_full("a", "quota reached")
    run.mark_full("a", "said again")
    assert run.is_full("a")
    assert run.full_peers() == {"a": "quota reached"} == run.refused()


def test_an_answer_is_counted_once_and_again_when_it_changes() -> None:
    run = RunState(Clock())
    counted = [run.observe("a", answer) for answer in (True, True, False, False, True)]
    assert counted == [True, False, True, False, True]
    assert run.observe("b", False)
