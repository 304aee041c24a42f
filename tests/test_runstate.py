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


def test_a_peer_that_refused_gets_no_more_and_every_peer_passed_over_is_named() -> None:
    run = RunState(Clock())
    run.answered("nofriend", Space(used=0, offered=0))
    run.pass_over("nofriend", 100)
    run.mark_refused("nofriend", "stores only for its friends")
    run.mark_full("full", "quota reached")
    run.mark_down("gone", "connection refused")
    run.answered("small", Space(used=0, offered=50))
    run.pass_over("small", 100)
    assert run.is_refusing("nofriend") and run.is_refusing("full")
    assert not run.is_refusing("small") and not run.is_refusing("gone")
    assert run.refused() == {"nofriend": "stores only for its friends", "full": "quota reached"}
    passed = run.passed_over()
    # A refusal says more than the room it offered, which was none.
    assert passed["nofriend"] == ("refused", "stores only for its friends")
    assert passed["full"] == ("full", "quota reached")
    assert passed["gone"] == ("down", "connection refused")
    assert passed["small"][0] == "no room"
    # Up again, still named: it was passed over for a while.
    run.answered("gone", Space(0, None))
    assert not run.is_down("gone") and run.passed_over()["gone"][0] == "down"


def test_no_room_offered_at_all_is_said_so() -> None:
    run = RunState(Clock())
    run.answered("a", Space(used=4096, offered=4096))
    run.pass_over("a", 100)
    reason = run.full_peers()["a"]
    assert reason.startswith("it offers us no room beyond the 4.0 KiB it holds for us")
    assert "has not added this one as a friend" in reason


def test_a_slow_peer_stays_slow_for_the_run_but_is_not_down() -> None:
    clock = Clock()
    run = RunState(clock)
    run.mark_slow("a")
    clock.now += DOWN_SECONDS * 10
    assert run.is_slow("a") and not run.is_slow("b") and not run.is_down("a")
    assert run.passed_over() == {}
