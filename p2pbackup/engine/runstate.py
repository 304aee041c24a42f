"""The run state: what a repository learns of its peers during one run.

The nouns — **down**, **slow**, **full**, **refused**, **space** and
**room**, **passed over**, **observations** — are defined in :mod:`p2pbackup.engine.repository`'s
docstring, beside the operations that feed them. This module only keeps
them: it does no I/O, and reads the time through the clock it is given.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping

from p2pbackup.engine.progress import human_bytes
from p2pbackup.stores.shardstore import Space

#: Seconds a peer that could not be reached is passed over (tried last).
DOWN_SECONDS = 300.0


class RunState:
    """The run state of one repository (see the module docstring)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        #: Seconds, on the clock that :data:`DOWN_SECONDS` counts in.
        self._clock = clock
        #: Peer id -> the time until which it counts as down.
        self._down_until: dict[str, float] = {}
        #: Peer id -> why it was last found down (kept once it is up again,
        #: for the run's report).
        self._down_reason: dict[str, str] = {}
        self._slow: set[str] = set()
        #: Peer id -> why it is full, refused a shard, or was passed over.
        self._full: dict[str, str] = {}
        self._refused: dict[str, str] = {}
        self._passed_over: dict[str, str] = {}
        #: Peer id -> its space when last asked.
        self._space: dict[str, Space] = {}
        #: Bytes sent (or being sent) to each peer since its space was asked.
        self._taken: collections.Counter[str] = collections.Counter()
        #: Peer id -> whether it answered, as last counted.
        self._observed: dict[str, bool] = {}

    # -- down -----------------------------------------------------------------

    def mark_down(self, peer_id: str, reason: str = "") -> None:
        """Remember that ``peer_id`` could not be reached (and why), for
        :data:`DOWN_SECONDS`.

        A dead peer costs a connect timeout; without this, every pack of a
        backup would pay it again before turning to a spare.
        """
        self._down_until[peer_id] = self._clock() + DOWN_SECONDS
        self._down_reason[peer_id] = reason or "it could not be reached"

    def is_down(self, peer_id: str) -> bool:
        until = self._down_until.get(peer_id)
        return until is not None and self._clock() < until

    def down(self) -> dict[str, str]:
        """The peers down now, each with why."""
        return {peer: self._down_reason[peer] for peer in self._down_until if self.is_down(peer)}

    # -- slow -----------------------------------------------------------------

    def mark_slow(self, peer_id: str) -> None:
        """Remember that ``peer_id`` had not answered a read while the others
        had: later reads ask it after them, for the rest of the run. It is
        not down (it may only be far away), so placement still counts it."""
        self._slow.add(peer_id)

    def is_slow(self, peer_id: str) -> bool:
        return peer_id in self._slow

    # -- full -----------------------------------------------------------------

    def mark_full(self, peer_id: str, reason: str) -> None:
        """Remember that ``peer_id`` refused a shard for want of room: it gets
        no more for the rest of this run (a quota does not grow by itself)."""
        self._full.setdefault(peer_id, reason)

    def is_full(self, peer_id: str) -> bool:
        return peer_id in self._full

    def mark_refused(self, peer_id: str, reason: str) -> None:
        """Remember that ``peer_id`` refused a shard for another reason than
        room (a node that stores only for its friends, a failing disk): it
        gets no more for the rest of this run either."""
        self._refused.setdefault(peer_id, reason)

    def is_refusing(self, peer_id: str) -> bool:
        """Whether ``peer_id`` refused a shard in this run, as full or otherwise."""
        return peer_id in self._full or peer_id in self._refused

    def refused(self) -> Mapping[str, str]:
        """Each peer that refused a shard in this run, as full or otherwise, and why."""
        return {**self._refused, **self._full}

    def full_peers(self) -> dict[str, str]:
        """Each peer found full in this run or passed over for want of room,
        and why."""
        return {**self._passed_over, **self._full}

    def passed_over(self) -> dict[str, tuple[str, str]]:
        """Each peer that did not get every shard it would have in this run:
        peer id -> (what it was: ``full``, ``refused``, ``no room`` or
        ``down``, and why), the first of those that applies."""
        found: dict[str, tuple[str, str]] = {}
        for what, reasons in (
            ("full", self._full),
            ("refused", self._refused),
            ("no room", self._passed_over),
            ("down", self._down_reason),
        ):
            for peer_id, reason in reasons.items():
                found.setdefault(peer_id, (what, reason))
        return found

    # -- space and room -------------------------------------------------------

    def answered(self, peer_id: str, space: Space) -> None:
        """``peer_id`` answered a probe with ``space``: it is up, and its room
        is what it said (which counts every shard sent before)."""
        self._space[peer_id] = space
        self._taken.pop(peer_id, None)
        self._down_until.pop(peer_id, None)

    def room(self, peer_id: str) -> int | None:
        """Bytes more ``peer_id`` would take, from what it said when last
        asked less what was sent there since; None if not known."""
        space = self._space.get(peer_id)
        if space is None or space.room is None:
            return None
        return max(0, space.room - self._taken[peer_id])

    def reserve(self, peer_id: str, size: int) -> None:
        """``size`` bytes are on their way to ``peer_id``: its room shrinks
        now, as the node reserves them when the put starts."""
        self._taken[peer_id] += size

    def release(self, peer_id: str, size: int) -> None:
        """The put of ``size`` bytes to ``peer_id`` failed: give them back."""
        self._taken[peer_id] -= size

    def no_room(self, peer_id: str) -> str:
        """Why ``peer_id``, which offers us no room, takes nothing more."""
        space = self._space.get(peer_id)
        held = human_bytes(0 if space is None else space.used)
        # Also what a node that stores only for its friends answers an owner
        # it has not added: nothing beyond what it holds. Say both, or the
        # user looks for a full disk when a friend has yet to add this node.
        return (
            f"it offers us no room beyond the {held} it holds for us: "
            "a full peer, or a node that has not added this one as a friend"
        )

    def pass_over(self, peer_id: str, need: int) -> None:
        """Note that ``peer_id``, by its own offer, has no room for a shard of
        ``need`` bytes (nothing if its offer is not known)."""
        space = self._space.get(peer_id)
        room = self.room(peer_id)
        if space is None or space.offered is None or room is None:
            return
        if space.room == 0:
            reason = self.no_room(peer_id)
        else:
            reason = (
                f"it offers us {human_bytes(space.offered)}, {human_bytes(room)} of it free: "
                f"no room for a shard of {human_bytes(need)}"
            )
        self._passed_over.setdefault(peer_id, reason)

    # -- observations ---------------------------------------------------------

    def observe(self, peer_id: str, answered: bool) -> bool:
        """Whether this answer of ``peer_id`` is to be counted in its uptime
        record: the first of the run, or one that differs from the last."""
        if self._observed.get(peer_id) is answered:
            return False
        self._observed[peer_id] = answered
        return True
