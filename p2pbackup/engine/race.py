"""Asking several peers at once without waiting on the slow ones.

A home asks many peers at once: every peer its space (``status``, ``check``,
the start of a backup), k peers a pack's shards (a restore). A peer that is
down, **hung** (it accepts a connection and then says nothing) or being looked
for at a new address may take its whole timeout to fail, while the others
answer in milliseconds. Run through :func:`race`, such a peer costs a short
delay once, not its timeout.

Nouns:

* **request** — one question to one **candidate** (a peer, a shard's
  location), run as a task of its own.
* **answer time** — how long a request that succeeded took.
* **patience** — :class:`Patience`: when a running request becomes
  **overdue**: ``factor`` times the longest answer time so far in the race,
  but not before ``floor`` seconds; while nothing has answered yet, after
  ``limit`` seconds. A peer that takes several times as long as the others
  that answered is most likely down, hung or being looked for; a floor keeps
  a fast race from calling a merely distant peer overdue.
* **race** — :func:`race`: requests to the candidates in their order,
  ``wanted`` of them running at once. A request that fails starts the next
  candidate; one that becomes overdue does too (a **hedge**: both run, the
  first to answer counts), and its candidate is reported to ``overdue`` so
  that the caller may ask it last next time. The race ends when ``wanted``
  requests have succeeded (the others are cancelled) or when none is left
  running. An overdue request with no candidate left to start beside it is
  waited for, or with ``give_up`` cancelled and **given up**.

What to ask, which failures count, and what to remember of an overdue peer
are the caller's; the race only decides whom to wait for.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Generic, TypeVar

import attrs
import trio

from p2pbackup.errors import P2PBackupError

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")


@attrs.frozen
class Patience:
    """When a running request becomes overdue (module docstring)."""

    #: Seconds a request may always run once something answered.
    floor: float
    #: How many times the longest answer time so far a request may run.
    factor: float
    #: Seconds a request may run while nothing has answered yet.
    limit: float

    def overdue_after(self, slowest: float | None) -> float:
        """Seconds after its start at which a request is overdue, ``slowest``
        being the longest answer time so far (None: nothing answered yet)."""
        if slowest is None:
            return self.limit
        return max(self.floor, self.factor * slowest)


@attrs.define
class RaceResult(Generic[K, R]):
    """How a race ended."""

    #: Candidate -> its answer, in the order the answers came.
    answers: dict[K, R] = attrs.Factory(dict)
    #: Candidate -> why its request failed (one of the caught errors).
    failures: dict[K, Exception] = attrs.Factory(dict)
    #: Candidates whose request became overdue, in that order.
    overdue: list[K] = attrs.Factory(list)
    #: Candidate -> seconds its request had run when it was given up.
    given_up: dict[K, float] = attrs.Factory(dict)
    #: The longest answer time (None: nothing answered).
    slowest: float | None = None


async def race(
    candidates: Iterable[K],
    ask: Callable[[K], Awaitable[R]],
    *,
    wanted: int,
    patience: Patience,
    catch: type[Exception] | tuple[type[Exception], ...] = P2PBackupError,
    give_up: bool = False,
    overdue: Callable[[K], None] = lambda candidate: None,
) -> RaceResult[K, R]:
    """Ask ``candidates`` (distinct) with ``ask`` until ``wanted`` answered
    (module docstring). A request that raises one of ``catch`` failed; any
    other exception ends the race and propagates."""
    waiting = collections.deque(candidates)
    result: RaceResult[K, R] = RaceResult()
    #: Running requests -> when each started; the overdue ones among them.
    started: dict[K, float] = {}
    late: set[K] = set()
    scopes: dict[K, trio.CancelScope] = {}
    finished_send, finished = trio.open_memory_channel[K](math.inf)

    async def run(candidate: K, scope: trio.CancelScope) -> None:
        with scope:
            try:
                answer = await ask(candidate)
            except catch as error:
                result.failures[candidate] = error
            else:
                took = trio.current_time() - started[candidate]
                result.answers[candidate] = answer
                result.slowest = took if result.slowest is None else max(result.slowest, took)
        del started[candidate], scopes[candidate]
        late.discard(candidate)
        finished_send.send_nowait(candidate)

    async with trio.open_nursery() as nursery:

        def start_next() -> bool:
            if not waiting:
                return False
            candidate = waiting.popleft()
            started[candidate] = trio.current_time()
            scopes[candidate] = trio.CancelScope()
            nursery.start_soon(run, candidate, scopes[candidate])
            return True

        while len(result.answers) < wanted:
            # Enough requests that are not overdue to make up what is missing.
            while len(result.answers) + len(started) - len(late) < wanted and start_next():
                pass
            if not started:
                break
            after = patience.overdue_after(result.slowest)
            deadline = min(
                (since + after for candidate, since in started.items() if candidate not in late),
                default=math.inf,
            )
            with trio.move_on_at(deadline):
                await finished.receive()
                continue
            now = trio.current_time()
            for candidate, since in list(started.items()):
                if candidate in late or now < since + after:
                    continue
                late.add(candidate)
                result.overdue.append(candidate)
                overdue(candidate)
                if give_up and not waiting:
                    scopes[candidate].cancel()
                    result.given_up[candidate] = now - since
        nursery.cancel_scope.cancel()
    return result
