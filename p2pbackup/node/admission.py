"""Admission: which connections a storage node serves, and for how long (pure).

A node answers whoever connects, within bounds that keep any one party — above
all a stranger with many throwaway identities, which cost nothing to make —
from crowding out the friends the node is there for. :class:`ServerLimits`
holds every bound; :class:`Admission` keeps the count; the server
(:mod:`p2pbackup.node.server`) asks it at each step and does what it says.

Nouns:

* **source** — where a connection comes from, as far as these bounds go
  (:func:`source_of`): an IPv4 address, an IPv6 /64 (one host may hold a
  whole /64, so its addresses count as one), or the text of an address that is
  not IP (the memory network's names).
* **handshake** — a connection whose Noise handshake is not over: nobody
  knows yet who it is, so friend and stranger look alike. At most
  ``handshakes`` at once, ``handshakes_per_source`` of them from one source,
  each at most ``handshake`` seconds. A new connection is never turned away
  for these bounds: it **displaces** an older handshake — the oldest of its
  own source when that source is at its bound, else the oldest of the source
  with the most — whose connection is closed. A silent connection thus keeps
  its slot only until fresher connections need it, and a flood from one
  source displaces mostly its own.
* **session** — a connection whose peer proved its node id. The peer is a
  **friend** (a node this home stores for; in open mode, too, friends come
  first) or a **stranger**. At most ``sessions`` at once; strangers at most
  ``stranger_sessions`` of them, so that ``sessions - stranger_sessions`` are
  always kept for friends; at most ``stranger_sessions_per_source`` strangers
  from one source; and at most ``sessions_per_node`` sessions of any one node
  id, friend or not. A session beyond a bound is **turned away**: closed
  without an answer, as an owner's client expects of a busy node. A friend's
  session may wait ``idle`` seconds between requests, a stranger's
  ``stranger_idle``.
* **transfer** — the pieces of one upload or download. Each message of a
  transfer gets ``transfer`` seconds; beyond that, an upload must keep ahead
  of ``min_upload_rate`` (:meth:`ServerLimits.upload_deadline`), so that a
  trickle of bytes cannot hold the room it reserved; a download reads the
  shard ``download_piece`` bytes at a time, and only once the peer has taken
  the previous piece, so that a reader that stops reading holds one piece of
  the node's memory, not a shard.
* **log throttle** — :class:`LogThrottle`: what a flood makes the node say
  (a line per connection turned away, displaced, failed or timed out) is
  logged at most ``burst`` times a period for each kind, and the next line
  of that kind after a quiet spell says how many were left out.

Clocks are passed in (seconds, any monotonic origin), as everywhere in the
node.
"""

from __future__ import annotations

import ipaddress
from typing import TypeVar

import attrs

from p2pbackup.model import NODE_ID_SIZE

_K = TypeVar("_K")


@attrs.frozen
class ServerLimits:
    """Every bound a storage server keeps (module docstring). Times in seconds,
    rates in bytes a second, sizes in bytes."""

    handshake: float = 10.0
    #: Between two requests of a friend's session.
    idle: float = 300.0
    #: Between two requests of a stranger's session.
    stranger_idle: float = 60.0
    #: For each message of a request to arrive or leave (the pieces of a transfer).
    transfer: float = 60.0
    #: Sessions served at once; connections beyond are closed unanswered.
    sessions: int = 256
    #: Of those, the most strangers may have: the rest is kept for friends.
    stranger_sessions: int = 128
    stranger_sessions_per_source: int = 16
    sessions_per_node: int = 8
    #: Handshakes in progress at once, and from one source.
    handshakes: int = 128
    handshakes_per_source: int = 32
    #: Past the first ``transfer`` seconds, the least an upload must average.
    min_upload_rate: float = 16 * 1024
    #: A download is read and sent this many bytes at a time.
    download_piece: int = 256 * 1024

    def __attrs_post_init__(self) -> None:
        counts = (
            self.sessions,
            self.stranger_sessions,
            self.stranger_sessions_per_source,
            self.sessions_per_node,
            self.handshakes,
            self.handshakes_per_source,
            self.download_piece,
        )
        if min(counts) < 1 or not self.min_upload_rate > 0:
            raise ValueError(f"every bound of a server must be positive: {self}")

    def upload_deadline(self, started: float, received: int, now: float) -> float:
        """When the next piece of an upload that began at ``started`` and has
        ``received`` bytes must have arrived: ``transfer`` seconds for this
        piece, and no later than the line ``transfer`` + ``received`` /
        ``min_upload_rate`` from the start."""
        return min(now + self.transfer, started + self.transfer + received / self.min_upload_rate)


def source_of(host: str | None) -> str:
    """The source a connection from ``host`` (None: unknown) counts against
    (module docstring)."""
    if host is None:
        return "unknown"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@attrs.define(eq=False)
class Handshake:
    """One connection's handshake slot (module docstring)."""

    source: str


@attrs.define(eq=False)
class Session:
    """One admitted session's place in the count."""

    source: str
    node_id: bytes = attrs.field(repr=lambda value: value.hex()[:16])
    friend: bool


@attrs.frozen
class TurnedAway:
    """Why a session was turned away: ``kind`` names the bound (a log throttle
    key), ``reason`` says it for a human."""

    kind: str
    reason: str


class Admission:
    """The handshakes and sessions a server holds, against its limits."""

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        # Per source, its handshakes oldest first (a dict keeps insertion order).
        self._handshakes: dict[str, dict[Handshake, None]] = {}
        self._handshaking = 0
        self._sessions = 0
        self._strangers = 0
        self._strangers_by_source: dict[str, int] = {}
        self._by_node: dict[bytes, int] = {}

    @property
    def handshaking(self) -> int:
        return self._handshaking

    @property
    def sessions(self) -> int:
        return self._sessions

    @property
    def strangers(self) -> int:
        return self._strangers

    def begin_handshake(self, source: str) -> tuple[Handshake, Handshake | None]:
        """A slot for a new connection from ``source``, and the handshake it
        displaced (whose connection must be closed), if any."""
        limits = self.limits
        displaced = None
        own = self._handshakes.get(source, {})
        if len(own) >= limits.handshakes_per_source:
            displaced = next(iter(own))
        elif self._handshaking >= limits.handshakes:
            heaviest = max(self._handshakes.values(), key=len)
            displaced = next(iter(heaviest))
        if displaced is not None:
            self.end_handshake(displaced)
        handshake = Handshake(source)
        self._handshakes.setdefault(source, {})[handshake] = None
        self._handshaking += 1
        return handshake, displaced

    def end_handshake(self, handshake: Handshake) -> None:
        """Free a handshake's slot (once; again does nothing)."""
        own = self._handshakes.get(handshake.source)
        if own is None or handshake not in own:
            return
        del own[handshake]
        if not own:
            del self._handshakes[handshake.source]
        self._handshaking -= 1

    def admit(self, source: str, node_id: bytes, *, friend: bool) -> Session | TurnedAway:
        """A session for ``node_id`` from ``source``, or why it is turned away."""
        if len(node_id) != NODE_ID_SIZE:
            raise ValueError(f"a node id is {NODE_ID_SIZE} bytes, got {len(node_id)}")
        limits = self.limits
        name = node_id.hex()[:16]
        if self._by_node.get(node_id, 0) >= limits.sessions_per_node:
            return TurnedAway(
                "node",
                f"node {name} already has {limits.sessions_per_node} sessions, "
                "the most one node may have",
            )
        if self._sessions >= limits.sessions:
            return TurnedAway("sessions", f"already serving {limits.sessions} sessions")
        if not friend:
            if self._strangers >= limits.stranger_sessions:
                return TurnedAway(
                    "strangers",
                    f"node {name} is not a friend, and strangers already have "
                    f"{limits.stranger_sessions} sessions, all they may have "
                    f"(the other {limits.sessions - limits.stranger_sessions} are kept "
                    "for friends)",
                )
            if self._strangers_by_source.get(source, 0) >= limits.stranger_sessions_per_source:
                return TurnedAway(
                    "source",
                    f"node {name} is not a friend, and strangers from {source} already "
                    f"have {limits.stranger_sessions_per_source} sessions, the most one "
                    "source may have",
                )
            self._strangers += 1
            self._strangers_by_source[source] = self._strangers_by_source.get(source, 0) + 1
        self._sessions += 1
        self._by_node[node_id] = self._by_node.get(node_id, 0) + 1
        return Session(source, node_id, friend)

    def end_session(self, session: Session) -> None:
        """Free an admitted session's place (call once per session)."""
        self._sessions -= 1
        _decrement(self._by_node, session.node_id)
        if not session.friend:
            self._strangers -= 1
            _decrement(self._strangers_by_source, session.source)

    def idle_limit(self, session: Session) -> float:
        return self.limits.idle if session.friend else self.limits.stranger_idle


def _decrement(counts: dict[_K, int], key: _K) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]


@attrs.define
class _Kind:
    started: float
    logged: int = 0
    held_back: int = 0


class LogThrottle:
    """At most ``burst`` lines of each kind per ``period`` seconds (module docstring)."""

    def __init__(self, *, period: float = 60.0, burst: int = 20, max_kinds: int = 64) -> None:
        self.period = period
        self.burst = burst
        self.max_kinds = max_kinds
        self._kinds: dict[str, _Kind] = {}

    def allow(self, kind: str, now: float) -> tuple[bool, int]:
        """Whether to log a line of ``kind`` at ``now``; and if so, how many
        lines of that kind were left out since the last one logged."""
        state = self._kinds.get(kind)
        if state is None:
            if len(self._kinds) >= self.max_kinds:
                # Kinds are a fixed set in practice; never let them grow unbounded.
                self._kinds.pop(next(iter(self._kinds)))
            state = self._kinds[kind] = _Kind(now)
        if now - state.started >= self.period:
            state.started, state.logged = now, 0
        if state.logged >= self.burst:
            state.held_back += 1
            return False, 0
        state.logged += 1
        held_back, state.held_back = state.held_back, 0
        return True, held_back
