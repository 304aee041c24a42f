"""The DHT adapter: the ``kademlia`` package, run inside trio, and nowhere else.

Nouns:

* **DHT node** — :class:`DhtNode`: one participant in the Kademlia DHT, with
  the node's own id (BLAKE2b-160 of its Ed25519 key, the same 160 bits the
  package expects). The package does the routing table, the RPCs and the
  iterative lookups; this module feeds it datagrams and decides what it stores
  and returns.
* **asyncio loop** — the package is asyncio code. Each DHT node opens one
  ``trio_asyncio`` loop for its whole life; asyncio's clock *is* trio's clock,
  so timers follow ``trio.testing.MockClock`` in tests and the simulator.
* **datagram pump** — two trio tasks between a :class:`~p2pbackup.net.network.DatagramEndpoint`
  (real UDP, or the memory network) and the package's protocol object, which
  believes it talks to an asyncio transport. Incoming datagrams pass the
  per-source :mod:`~p2pbackup.dht.ratelimit` first.
* **codec** — a datagram is a kind byte, a message id and msgpack. The
  package's RPC layer (``rpcudp``) encodes with the pure-Python ``umsgpack``;
  this module sends and reads every datagram itself with the C ``msgpack``,
  which writes the same bytes for the same values (:func:`_encode`).
* **record storage** — :class:`RecordStorage`, the package's ``IStorage``: it
  holds only valid signed records (:mod:`p2pbackup.dht.records`), each replaced
  only by a newer one, drops them when they expire, and caps how many it holds.
* **verified contact** — an address that has answered a request of ours. A
  request's source address may be forged; an answer to our request (which
  carries our random message id) comes from whoever is at that address.
* **handover** — Kademlia's replication on join: the records a newly verified
  contact should hold because it is closer to their keys than this node,
  stored on it once, nearest its id first and bounded (``MAX_HANDOVER_*``).
* **newest lookup** — :meth:`DhtNode.lookup` asks every one of the k closest
  nodes and returns the newest *valid* record, never the majority value.
* **routing state** — the neighbours worth remembering between runs, saved as
  versioned JSON (never pickle).

The package's weaknesses and what this module does about each:

- stores are unauthenticated and overwrite blindly → :class:`RecordStorage`
  takes only a valid record, newer than the one held;
- ``get`` returns the majority value → :meth:`DhtNode.lookup` crawls to the end
  and returns the newest valid record, and repairs the replicas that were stale;
- every node republishes every key older than an hour, forever →
  :meth:`RecordStorage.iter_older_than` yields nothing: only owners republish;
- requests above ~8 KiB are dropped → records are at most
  :data:`records.MAX_RECORD_SIZE` bytes, and a larger value is refused before
  it is sent or stored;
- state is saved with pickle → :func:`save_routing_state` writes JSON;
- one missed reply evicts a contact → a contact is evicted after
  :data:`MISSED_REPLIES_TO_EVICT` missed replies in a row;
- the sender of any request is handed, at once, every record it is closer to
  than this node (one forged ping drew hundreds of stores to its claimed
  source), after a walk over every record held → only a verified contact
  gets a handover, once, with the records looked at and sent bounded;
- ``set_digest`` fails when no contact answers its search →
  :meth:`DhtNode.publish` stores by itself and reports a record nobody took;
- requests and answers are not validated (a malformed one kills the task
  serving it, or a whole lookup) → every request and answer is checked
  against the shape the protocol gives it, and a bad one is logged and dropped.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import ipaddress
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
import kademlia.routing
import kademlia.storage
import kademlia.utils
import msgpack
import trio
import trio_asyncio
from kademlia.crawling import NodeSpiderCrawl, RPCFindResponse, SpiderCrawl
from kademlia.network import Server
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.storage import IStorage

from p2pbackup.dht import records
from p2pbackup.dht.ratelimit import RateLimit, RateLimiter, source_network
from p2pbackup.errors import FormatError, UsageError
from p2pbackup.model import NODE_ID_SIZE
from p2pbackup.net.network import MAX_DATAGRAM_SIZE, Address, DatagramEndpoint, Network
from p2pbackup.nurseries import unwrap_single
from p2pbackup.stores.durable import write_private_file

log = logging.getLogger(__name__)

#: Contacts per bucket and per lookup (the paper's k), and parallel requests (alpha).
KSIZE: Final = 20
ALPHA: Final = 3
#: A contact is dropped from the routing table after this many missed replies in a row.
MISSED_REPLIES_TO_EVICT: Final = 3
#: Records one node holds for others at most (each at most 4 KiB).
DEFAULT_MAX_RECORDS: Final = 10_000
#: New keys one source network (an IPv4 /24, an IPv6 /64) may bring into a
#: node's storage. An honest node's own records, and the replicas it hands
#: on, are far fewer; it takes 40 networks to fill :data:`DEFAULT_MAX_RECORDS`.
DEFAULT_MAX_KEYS_PER_SOURCE: Final = 256
#: Datagrams per second one source network may send us, sustained and in a burst.
DEFAULT_RATE_LIMIT: Final = RateLimit(rate=50.0, burst=200.0)
#: Seconds a join waits for more bootstrap answers after the first.
BOOTSTRAP_GRACE: Final = 0.5
#: Seconds a request waits for its answer (the package waits 5: a lookup that
#: meets a dead contact stalls that long, and round trips rarely pass 1 s).
REPLY_TIMEOUT: Final = 2.0
#: Datagrams queued for sending before new ones are dropped (UDP promises nothing).
SEND_QUEUE: Final = 1024
#: Most contacts an answer may list (the package sends k).
MAX_CONTACTS_IN_ANSWER: Final = 2 * KSIZE
#: The handover to one newly verified contact: records looked at, records
#: sent and their bytes, at most. Owners republish every hour, so what does
#: not fit reaches the newcomer then.
MAX_HANDOVER_EXAMINED: Final = 128
MAX_HANDOVER_RECORDS: Final = 32
MAX_HANDOVER_BYTES: Final = 16 * 1024
#: Addresses remembered as verified (each has had its handover) at most.
MAX_VERIFIED: Final = 4096
#: Bits in a node id and a DHT key.
ID_BITS: Final = 8 * NODE_ID_SIZE

#: The node id a read-only client presents (as BitTorrent's BEP 43 "ro" flag):
#: nodes answer it but never put it in their routing tables, so a short-lived
#: lookup leaves no dead contact behind for others to time out on.
READ_ONLY_ID: Final = bytes(NODE_ID_SIZE)

ROUTING_STATE_FORMAT: Final = "p2pbackup-dht-state"
#: Version 2 added the records a node keeps for its friends; 1 is still read.
ROUTING_STATE_VERSION: Final = 2
_READABLE_ROUTING_STATES: Final = (1, 2)
#: Records kept in the routing state at most (a node's friends' root pointers).
MAX_KEPT_RECORDS: Final = 256


# -- virtual time ------------------------------------------------------------------------------


class _TrioClock:
    """Stands in for the ``time`` module inside the package: its bucket ages
    and lonely-bucket refresh then follow trio's clock, virtual or real."""

    @staticmethod
    def monotonic() -> float:
        try:
            return trio.current_time()
        except RuntimeError:  # outside trio.run: nothing virtual to follow
            return time.monotonic()


# The package reads time.monotonic() directly; this is the one place it can
# be pointed at trio's clock, which is the real monotonic clock outside tests.
# The package logs every crawl and store at INFO; the adapter logs what a node
# operator needs to know itself.
logging.getLogger("kademlia").setLevel(logging.WARNING)
logging.getLogger("rpcudp").setLevel(logging.WARNING)

kademlia.routing.time = _TrioClock
kademlia.storage.time = _TrioClock


# -- the asyncio loop --------------------------------------------------------------------------

#: Asyncio callbacks run in one turn of trio's scheduler, at most (see below).
LOOP_BATCH: Final = 64

# A private method of trio-asyncio's loop, replaced below: pyproject.toml
# takes no release of the package this has not been checked against.
_run_one_callback = trio_asyncio.TrioEventLoop._main_loop_one


async def _run_ready_callbacks(self: trio_asyncio.TrioEventLoop, no_wait: bool = False) -> None:
    # trio-asyncio runs one asyncio callback per turn of trio's scheduler,
    # each turn a cancel scope and a channel receive: a DHT request costs
    # some five callbacks (its task, its timer, its answer, the gather
    # around it), and these turns were a fifth of a simulation. Asyncio
    # itself runs every ready callback in one pass of its loop; so does
    # this, after the first, up to LOOP_BATCH of them, then lets trio's
    # other tasks run. The order of the callbacks is unchanged.
    await _run_one_callback(self, no_wait)
    for _ in range(LOOP_BATCH):
        try:
            await _run_one_callback(self, no_wait=True)
        except trio.WouldBlock:  # nothing more ready now
            return


trio_asyncio.TrioEventLoop._main_loop_one = _run_ready_callbacks


async def _crawl_round(self: SpiderCrawl, rpcmethod: Callable[..., Awaitable[Any]]) -> Any:
    # The package's round of a lookup (``SpiderCrawl._find``), as it is, less
    # its INFO line: that formats every contact of the lookup (a sort and a
    # repr each) whether or not INFO is logged, every round of every lookup.
    count = self.alpha
    if self.nearest.get_ids() == self.last_ids_crawled:
        count = len(self.nearest)
    self.last_ids_crawled = self.nearest.get_ids()
    asked = {}
    for peer in self.nearest.get_uncontacted()[:count]:
        asked[peer.id] = rpcmethod(peer, self.node)
        self.nearest.mark_contacted(peer)
    found = await kademlia.utils.gather_dict(asked)
    return await self._nodes_found(found)


SpiderCrawl._find = _crawl_round


# -- record storage ----------------------------------------------------------------------------


class RecordStorage(IStorage):  # type: ignore[misc]
    """The DHT storage of one node: valid signed records only, newest wins.

    ``wall_clock`` gives unix seconds (records expire in wall time); the
    simulator passes a virtual one.
    """

    def __init__(
        self,
        wall_clock: Callable[[], float] = time.time,
        *,
        max_records: int = DEFAULT_MAX_RECORDS,
        max_keys_per_source: int = DEFAULT_MAX_KEYS_PER_SOURCE,
    ) -> None:
        self.wall_clock = wall_clock
        self.max_records = max_records
        self.max_keys_per_source = max_keys_per_source
        #: Who brought each key first, and how many keys each source brought.
        self._origin: dict[bytes, str] = {}
        self._keys_from: collections.Counter[str] = collections.Counter()
        #: key → (record bytes, verified on the way in; its expiry).
        self._values: dict[bytes, tuple[bytes, int]] = {}
        #: The keys of ``_values`` in order (bytes of one length sort as
        #: numbers), so the records near a point are found without a scan.
        self._keys: list[bytes] = []
        self.refused = 0

    def offer(self, key: object, value: object, source: str | None = None) -> bool:
        """Store ``value`` under ``key`` if it is a valid record newer than the
        one held; log why not otherwise. ``source`` (the sending host) is
        charged to its network (:func:`~p2pbackup.dht.ratelimit.source_network`),
        which may bring at most :attr:`max_keys_per_source` new keys: one
        host alone, whatever addresses of its network it sends from, cannot
        fill the table."""
        if not (isinstance(key, bytes) and len(key) == NODE_ID_SIZE):
            return self._refuse("a key that is not 20 bytes")
        if not isinstance(value, bytes):
            return self._refuse(f"a {type(value).__name__} value under {key.hex()}, not a record")
        if len(value) > records.MAX_RECORD_SIZE:
            return self._refuse(f"a value of {len(value)} bytes under {key.hex()}")
        now = self._now()
        existing = self._live(key, now)
        if value == existing:
            return True  # a replica arriving again: nothing to change
        problem = records.store_refusal(existing, value, key=key, now=now)
        if problem is not None:
            return self._refuse(problem)
        if source is not None:
            source = source_network(source)
        if existing is None:
            if source is not None and self._keys_from[source] >= self.max_keys_per_source:
                self._drop_expired(now)
                if self._keys_from[source] >= self.max_keys_per_source:
                    return self._refuse(
                        f"a new key {key.hex()} from {source}: it brought "
                        f"{self.max_keys_per_source} already"
                    )
            if len(self._values) >= self.max_records:
                self._drop_expired(now)
                if len(self._values) >= self.max_records:
                    return self._refuse(f"a new key {key.hex()}: {self.max_records} records held")
            if source is not None:
                self._origin[key] = source
                self._keys_from[source] += 1
        if key not in self._values:
            bisect.insort(self._keys, key)
        self._values[key] = (value, records.decode_record(value).expiry)
        return True

    def _refuse(self, what: str) -> bool:
        self.refused += 1
        log.info("DHT storage refused %s", what)
        return False

    def _now(self) -> int:
        return int(self.wall_clock())

    def _live(self, key: bytes, now: int) -> bytes | None:
        held = self._values.get(key)
        if held is None:
            return None
        value, expiry = held
        if expiry <= now:
            del self._values[key]  # nobody keeps an expired record alive
            del self._keys[bisect.bisect_left(self._keys, key)]
            source = self._origin.pop(key, None)
            if source is not None:
                self._keys_from[source] -= 1
                if not self._keys_from[source]:
                    del self._keys_from[source]
            return None
        return value

    def _drop_expired(self, now: int) -> None:
        for key in list(self._values):
            self._live(key, now)

    def in_range(self, low: bytes, high: bytes) -> Iterator[tuple[bytes, bytes]]:
        """The live records whose keys lie between ``low`` and ``high`` (both
        included), in key order, one at a time: a caller that stops early
        has looked at no more records than it took."""
        now = self._now()
        index = bisect.bisect_left(self._keys, low)
        while index < len(self._keys) and self._keys[index] <= high:
            key = self._keys[index]
            value = self._live(key, now)
            if value is None:
                continue  # expired and dropped: the next key moved up to ``index``
            index += 1
            yield key, value

    # IStorage ----------------------------------------------------------------

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.offer(key, value)

    def __getitem__(self, key: bytes) -> bytes:
        value = self._live(key, self._now())
        if value is None:
            raise KeyError(key)
        return value

    def get(self, key: bytes, default: bytes | None = None) -> bytes | None:
        value = self._live(key, self._now())
        return default if value is None else value

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, bytes]]:
        # The package republishes whatever this returns, on every node, forever.
        # Owners republish their own records; nobody else does.
        return []

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        now = self._now()
        live = [(key, self._live(key, now)) for key in list(self._values)]
        return iter([(key, value) for key, value in live if value is not None])

    @property
    def count(self) -> int:
        """Records held, expired ones included until next looked at."""
        return len(self._values)


# -- checking what peers send ------------------------------------------------------------------


def _is_node_id(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == NODE_ID_SIZE


def _is_host(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= records.MAX_HOST_LENGTH


def _is_port(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536


def _is_contact(value: object) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == 3
        and _is_node_id(value[0])
        and _is_host(value[1])
        and _is_port(value[2])
    )


def _is_contact_list(value: object) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) <= MAX_CONTACTS_IN_ANSWER
        and all(_is_contact(c) for c in value)
    )


def _is_record_value(value: object) -> bool:
    return isinstance(value, bytes) and len(value) <= records.MAX_RECORD_SIZE


#: Each request the protocol serves, and a check for each of its arguments.
_REQUESTS: Final[dict[str, tuple[Callable[[object], bool], ...]]] = {
    "ping": (_is_node_id,),
    "stun": (),
    "store": (_is_node_id, _is_node_id, _is_record_value),
    "find_node": (_is_node_id, _is_node_id),
    "find_value": (_is_node_id, _is_node_id),
}


def _shared_bits(a: int, b: int) -> int:
    """How many leading bits the ids ``a`` and ``b`` have in common."""
    return ID_BITS - (a ^ b).bit_length()


def _subtree(value: int, depth: int) -> tuple[int, int]:
    """The ids that share their first ``depth`` bits with ``value``: a range."""
    free = ID_BITS - depth
    low = value >> free << free
    return low, low | ((1 << free) - 1)


def _as_key(value: int) -> bytes:
    return value.to_bytes(NODE_ID_SIZE, "big")


def _handover_ranges(own: int, new: int, occupied: set[int]) -> Iterator[tuple[int, int]]:
    """The key ranges where this node (``own``) may owe records to a new
    contact (``new``), nearest the newcomer first.

    A key is owed when the newcomer is closer to it than this node and no
    contact is closer still. Keys sharing exactly ``d`` leading bits with
    ``own`` form a range (the subtree beside this node at depth ``d``); a
    contact in it is closer than this node to all of its keys, so a depth in
    ``occupied`` (the depths of the contacts, the newcomer left out) owes
    nothing and is skipped without looking at a record. The newcomer shares
    ``p`` bits with this node: keys sharing more with the newcomer come first
    (nearest first), then the subtrees beside this node above ``p``, from the
    deepest up; the subtree at ``p`` is this node's side, nearer to it.
    """
    p = _shared_bits(own, new)
    if p not in occupied:
        yield new, new
        for depth in range(ID_BITS - 1, p, -1):
            yield _subtree(new ^ (1 << (ID_BITS - 1 - depth)), depth + 1)
    for depth in range(p - 1, -1, -1):
        if depth not in occupied:
            yield _subtree(own ^ (1 << (ID_BITS - 1 - depth)), depth + 1)


_Result = tuple[bool, Any]
_NO_ANSWER: Final[_Result] = (False, None)

#: Bytes of a request's payload a stock node still reads (its RPC layer's limit).
MAX_REQUEST_SIZE: Final = 8192


def _encode(value: object) -> bytes:
    """A datagram's payload, byte for byte as the package's pure-Python
    msgpack (``umsgpack``) writes it: bytes as bin, str as str, tuples as
    arrays, the smallest integer forms. The C msgpack does it some forty
    times faster; a simulation's DHT sends millions."""
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def _decode(data: bytes) -> Any:
    """A datagram's payload decoded as ``umsgpack`` decodes it (arrays as
    lists, bin as bytes, str as str); raises on anything malformed."""
    return msgpack.unpackb(data, raw=False)


class _Protocol(KademliaProtocol):  # type: ignore[misc]
    """The package's protocol with every input checked and eviction made patient."""

    def __init__(self, source_node: Node, storage: RecordStorage, ksize: int) -> None:
        super().__init__(source_node, storage, ksize)
        self._wait_timeout = REPLY_TIMEOUT
        self.record_storage = storage
        #: Missed replies in a row, for contacts in the routing table.
        self._missed: dict[bytes, int] = {}
        self.malformed = 0
        #: Tasks started in passing; held so they are not collected mid-flight.
        self._background: set[asyncio.Future[Any]] = set()
        #: Ids whose old address is being asked whether it still answers.
        self._checking: set[bytes] = set()
        #: Addresses that answered a request of ours (oldest first).
        self._verified: collections.OrderedDict[tuple[str, int], None] = collections.OrderedDict()
        #: (deadline, message id) of the requests sent, oldest first: each
        #: waits as long, so this is in deadline order too.
        self._deadlines: collections.deque[tuple[float, bytes]] = collections.deque()
        #: The wait of :func:`_expire_requests`, due when the oldest
        #: unanswered request is; None while that task is not running.
        self._expiry: trio.CancelScope | None = None

    def _malformed(self, what: str, address: object) -> None:
        self.malformed += 1
        log.info("DHT: %s from %s; ignored", what, address)

    # incoming ------------------------------------------------------------------

    def datagram_received(self, data: bytes, address: tuple[str, int]) -> None:
        # Handled in place: every request the protocol serves is synchronous,
        # so the package's two asyncio tasks per datagram buy nothing but cost.
        if len(data) < 22:
            self._malformed("a datagram too short to be a message", address)
            return
        kind, msg_id = data[:1], data[1:21]
        try:
            payload = _decode(data[21:])
        # Decoding is pure, and the decoder raises more than its own family on
        # hostile input (RecursionError on deep nesting, OverflowError on a
        # timestamp out of range): whatever it raises, the datagram is bad.
        except Exception as error:
            self._malformed(f"an undecodable datagram ({type(error).__name__})", address)
            return
        if kind == b"\x00":
            self._serve_request(msg_id, payload, address)
        elif kind == b"\x01":
            self._accept_response(msg_id, payload, address)
        else:
            self._malformed("a datagram of unknown kind", address)

    def _serve_request(self, msg_id: bytes, data: object, address: tuple[str, int]) -> None:
        if not (isinstance(data, list) and len(data) == 2 and isinstance(data[1], list)):
            self._malformed("a request that is not [name, arguments]", address)
            return
        name, args = data
        checks = _REQUESTS.get(name) if isinstance(name, str) else None
        if checks is None:
            self._malformed(f"an unknown request {str(name)[:40]!r}", address)
            return
        well_formed = len(args) == len(checks) and all(
            check(a) for check, a in zip(checks, args, strict=True)
        )
        if not well_formed:
            self._malformed(f"a {name} request with malformed arguments", address)
            return
        response = getattr(self, f"rpc_{name}")(address, *args)
        self.transport.sendto(b"\x01" + msg_id + _encode(response), address)

    def _timeout(self, msg_id: bytes) -> None:
        # The package logs every lost datagram as an ERROR; on UDP it is weather.
        waiting = self._outstanding.pop(msg_id, None)
        if waiting is not None and not waiting[0].done():
            waiting[0].set_result(_NO_ANSWER)

    def _accept_response(self, msg_id: bytes, data: object, address: tuple[str, int]) -> None:
        waiting = self._outstanding.pop(msg_id, None)
        if waiting is None:
            self._malformed("an answer to no request of ours", address)
            return
        future = waiting[0]
        if not future.done():
            future.set_result((True, data))
        if self._deadlines and self._deadlines[0][1] == msg_id:
            self._next_expiry()

    def _next_expiry(self) -> None:
        """Forget the answered requests at the head of the deadlines; the
        expiry task waits for the first one still unanswered."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][1] not in self._outstanding:
            deadlines.popleft()
        due = deadlines[0][0] if deadlines else math.inf
        if self._expiry is not None and self._expiry.deadline != due:
            self._expiry.deadline = due

    def _expire(self, now: float) -> None:
        """Every request unanswered at ``now`` ends unanswered."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            self._timeout(deadlines.popleft()[1])
        self._next_expiry()

    def welcome_if_new(self, node: Node) -> None:
        # The package calls this for the sender of every request and answer,
        # and hands a newcomer the records it should hold at once: a request
        # with a forged source address and a chosen id drew hundreds of stores
        # to that address. Here a newcomer enters the routing table (a contact
        # that never answers is dropped after missed replies) and is sent
        # nothing beyond the answer; it gets its handover once it has
        # answered a request of ours (:meth:`_answered`).
        if node.id == READ_ONLY_ID:
            return
        if not self.router.is_new_node(node):
            self._check_move(node)
            return
        self.router.add_contact(node)

    def _answered(self, node: Node) -> None:
        """``node`` answered a request of ours, so its address is real and
        asks for what it gets: the first time, it gets its handover."""
        if node.id in (READ_ONLY_ID, self.source_node.id):
            return
        address = (node.ip, node.port)
        if address in self._verified:
            self._verified.move_to_end(address)
            return
        self._verified[address] = None
        while len(self._verified) > MAX_VERIFIED:
            self._verified.popitem(last=False)
        self._hand_over(node)

    def _hand_over(self, node: Node) -> None:
        """Store on a newly verified contact the records it should hold:
        those whose key it is closer to than this node, while this node is
        the closest holder it knows (Kademlia's replication on join). The
        package hashes the (already hashed) key again, so it handed records
        to nodes near the wrong point, and walked every record held; here
        the keys nearest the newcomer are looked at first, and the work is
        bounded (``MAX_HANDOVER_*``)."""
        own, new = self.source_node.long_id, node.long_id
        contacts = [
            c.long_id
            for bucket in self.router.buckets
            for c in bucket.nodes.values()
            if c.id != node.id
        ]
        occupied = {_shared_bits(own, c) for c in contacts}
        examined = sent = size = 0
        for low, high in _handover_ranges(own, new, occupied):
            for key, value in self.record_storage.in_range(_as_key(low), _as_key(high)):
                if examined == MAX_HANDOVER_EXAMINED:
                    return
                examined += 1
                target = int.from_bytes(key, "big")
                distance = own ^ target
                if new ^ target > distance or any(c ^ target < distance for c in contacts):
                    continue
                if sent == MAX_HANDOVER_RECORDS or size + len(value) > MAX_HANDOVER_BYTES:
                    return
                sent += 1
                size += len(value)
                self._in_background(self.call_store(node, key, value))

    def _in_background(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Future[Any]) -> None:
        self._background.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            log_failure(log, "a request sent in passing", error, then="going on")

    def _check_move(self, node: Node) -> None:
        # A known id speaking from a new address: a node whose IP changed, or
        # someone claiming its id. The package keeps the old address until it
        # fails; here the old address is asked at once, and only if it no
        # longer answers as that id does the new one replace it.
        bucket = self.router.buckets[self.router.get_bucket_for(node)]
        known = bucket[node.id]
        if known is None or (known.ip, known.port) == (node.ip, node.port):
            return
        if node.id in self._checking:
            return
        self._checking.add(node.id)

        async def check() -> None:
            try:
                result = await self.ping((known.ip, known.port), self.source_node.id)
                if result[0] and result[1] == known.id:
                    return  # still there: the newcomer is not taking its place
                log.info("DHT: node %s moved from %s to %s", node.id.hex(), known, node)
                bucket.remove_node(known)
                self._verified.pop((known.ip, known.port), None)
                self._missed.pop(node.id, None)
                self.router.add_contact(node)
            finally:
                self._checking.discard(node.id)

        self._in_background(check())

    def rpc_store(self, sender: tuple[str, int], nodeid: bytes, key: bytes, value: bytes) -> bool:
        self.welcome_if_new(Node(nodeid, sender[0], sender[1]))
        # Answer truthfully: a refused store is not "stored" (the package says True).
        return self.record_storage.offer(key, value, source=sender[0])

    # The package's two lookups served, as they are, less the work thrown
    # away: a find_value of a key not held went through find_node, which
    # welcomed the sender a second time, and an INFO line built eagerly.

    def rpc_find_node(
        self, sender: tuple[str, int], nodeid: bytes, key: bytes
    ) -> list[tuple[bytes, str, int]]:
        source = Node(nodeid, sender[0], sender[1])
        self.welcome_if_new(source)
        return self._neighbours_of(key, source)

    def rpc_find_value(
        self, sender: tuple[str, int], nodeid: bytes, key: bytes
    ) -> list[tuple[bytes, str, int]] | dict[str, bytes]:
        source = Node(nodeid, sender[0], sender[1])
        self.welcome_if_new(source)
        value = self.storage.get(key, None)
        if value is None:
            return self._neighbours_of(key, source)
        return {"value": value}

    def _neighbours_of(self, key: bytes, source: Node) -> list[tuple[bytes, str, int]]:
        neighbours = self.router.find_neighbors(Node(key), exclude=source)
        return [(node.id, node.ip, node.port) for node in neighbours]

    # outgoing ------------------------------------------------------------------

    def _request(self, name: str, address: tuple[str, int], *args: object) -> asyncio.Future[Any]:
        """Send request ``name`` to ``address``; a future for its
        :data:`_Result`. The package's RPC layer makes these requests too (any
        attribute it lacks is one), encoded by the pure-Python msgpack."""
        data = _encode([name, args])
        if len(data) > MAX_REQUEST_SIZE:
            raise FormatError(f"a {name} request of {len(data)} bytes: peers drop it")
        msg_id = os.urandom(20)
        future = asyncio.get_event_loop().create_future()
        # Not an asyncio timer per request, as the package's: each costs the
        # loop two callbacks and a wake-up when it is due, answered or not
        # (most are). One trio task per node expires them (_expire_requests).
        deadline = trio.current_time() + self._wait_timeout
        self._outstanding[msg_id] = (future, deadline)
        self._deadlines.append((deadline, msg_id))
        if self._expiry is not None and self._expiry.deadline == math.inf:
            self._expiry.deadline = deadline
        self.transport.sendto(b"\x00" + msg_id + data, address)
        return future

    def ping(self, address: tuple[str, int], node_id: bytes) -> asyncio.Future[Any]:
        return self._request("ping", address, node_id)

    def store(
        self, address: tuple[str, int], node_id: bytes, key: bytes, value: bytes
    ) -> asyncio.Future[Any]:
        return self._request("store", address, node_id, key, value)

    def find_node(
        self, address: tuple[str, int], node_id: bytes, key: bytes
    ) -> asyncio.Future[Any]:
        return self._request("find_node", address, node_id, key)

    def find_value(
        self, address: tuple[str, int], node_id: bytes, key: bytes
    ) -> asyncio.Future[Any]:
        return self._request("find_value", address, node_id, key)

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node) -> _Result:
        address = (node_to_ask.ip, node_to_ask.port)
        result = await self.find_node(address, self.source_node.id, node_to_find.id)
        if result[0] and not _is_contact_list(result[1]):
            self._malformed("a malformed find_node answer", address)
            result = _NO_ANSWER
        return self.handle_call_response(result, node_to_ask)

    async def call_find_value(self, node_to_ask: Node, node_to_find: Node) -> _Result:
        address = (node_to_ask.ip, node_to_ask.port)
        result = await self.find_value(address, self.source_node.id, node_to_find.id)
        if result[0]:
            answer = result[1]
            is_value = (
                isinstance(answer, dict)
                and list(answer) == ["value"]
                and _is_record_value(answer["value"])
            )
            if not (is_value or _is_contact_list(answer)):
                self._malformed("a malformed find_value answer", address)
                result = _NO_ANSWER
        return self.handle_call_response(result, node_to_ask)

    async def call_ping(self, node_to_ask: Node) -> _Result:
        address = (node_to_ask.ip, node_to_ask.port)
        result = await self.ping(address, self.source_node.id)
        if result[0] and result[1] != node_to_ask.id:
            # Someone else answers at that address now: the contact is gone.
            result = _NO_ANSWER
        return self.handle_call_response(result, node_to_ask)

    async def call_store(self, node_to_ask: Node, key: bytes, value: bytes) -> _Result:
        address = (node_to_ask.ip, node_to_ask.port)
        result = await self.store(address, self.source_node.id, key, value)
        if result[0] and not isinstance(result[1], bool):
            self._malformed("a malformed store answer", address)
            result = _NO_ANSWER
        return self.handle_call_response(result, node_to_ask)

    def handle_call_response(self, result: _Result, node: Node) -> _Result:
        if result[0]:
            self._missed.pop(node.id, None)
            self._answered(node)
            self.welcome_if_new(node)
            return result
        if self.router.is_new_node(node):
            return result
        missed = self._missed.get(node.id, 0) + 1
        if missed >= MISSED_REPLIES_TO_EVICT:
            log.info("DHT: %s missed %d replies in a row; dropped", node, missed)
            self._missed.pop(node.id, None)
            self._verified.pop((node.ip, node.port), None)  # if it comes back, it is new
            self.router.remove_contact(node)
        else:
            self._missed[node.id] = missed
        return result


class _Server(Server):  # type: ignore[misc]
    protocol_class = _Protocol

    async def bootstrap_node(self, addr: tuple[str, int]) -> Node | None:
        result = await self.protocol.ping(addr, self.node.id)
        if not result[0]:
            return None
        if not _is_node_id(result[1]):
            self.protocol._malformed("a malformed ping answer", addr)
            return None
        return Node(result[1], addr[0], addr[1])


class _NewestValueCrawl(SpiderCrawl):  # type: ignore[misc]
    """A value lookup that asks all k closest nodes and keeps every answer.

    The package's crawl stops at the first round that finds a value and
    returns the most common one; here the crawl goes on to the end, so one
    honest replica among the k closest outvotes any number of liars.
    """

    def __init__(self, protocol: _Protocol, node: Node, peers: list[Node], ksize: int, alpha: int):
        super().__init__(protocol, node, peers, ksize, alpha)
        self.answers: dict[bytes, bytes | None] = {}

    async def find(self) -> dict[bytes, bytes | None]:
        return await self._find(self.protocol.call_find_value)  # type: ignore[no-any-return]

    async def _nodes_found(self, responses: dict[bytes, _Result]) -> dict[bytes, bytes | None]:
        unanswered = []
        for peer_id, response in responses.items():
            answer = RPCFindResponse(response)
            if not answer.happened():
                unanswered.append(peer_id)
            elif answer.has_value():
                self.answers[peer_id] = answer.get_value()
            else:
                self.answers[peer_id] = None
                self.nearest.push(answer.get_node_list())
        self.nearest.remove(unanswered)
        if self.nearest.have_contacted_all():
            return self.answers
        return await self.find()


# -- the datagram pump -------------------------------------------------------------------------


class _Transport:
    """The one method of an asyncio datagram transport the package calls:
    a datagram goes out at once where the endpoint can send without waiting
    (the memory network), else through the outgoing pump."""

    def __init__(
        self,
        endpoint: DatagramEndpoint,
        outgoing: trio.MemorySendChannel[tuple[bytes, tuple[str, int]]],
    ) -> None:
        self._endpoint = endpoint
        self._outgoing = outgoing
        self.dropped = 0

    def sendto(self, data: bytes, address: tuple[str, int]) -> None:
        host, port = address
        if len(data) > MAX_DATAGRAM_SIZE:
            log.warning("DHT: a datagram of %d bytes to %s:%s not sent", len(data), host, port)
            self.dropped += 1
            return
        try:
            if self._endpoint.send_nowait(bytes(data), Address(host, port)):
                return
        except (OSError, UsageError, ValueError) as error:
            log.info("DHT: datagram to %s:%s not sent: %s", host, port, error)
            return
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            # The node is closing, or its host was killed: nothing goes out.
            self.dropped += 1
            return
        try:
            self._outgoing.send_nowait((bytes(data), address))
        except (trio.WouldBlock, trio.ClosedResourceError):
            self.dropped += 1

    def close(self) -> None:
        self._outgoing.close()


# -- the node ----------------------------------------------------------------------------------


@attrs.frozen
class Contact:
    """A DHT participant as the routing table knows it."""

    node_id: bytes
    address: Address


@attrs.frozen
class DhtOptions:
    """How a DHT node behaves; the defaults are the real network's."""

    ksize: int = KSIZE
    alpha: int = ALPHA
    max_records: int = DEFAULT_MAX_RECORDS
    rate_limit: RateLimit = DEFAULT_RATE_LIMIT


class DhtNode:
    """One running DHT participant (see :func:`open_dht`). Call from trio."""

    def __init__(
        self,
        server: _Server,
        endpoint: DatagramEndpoint,
        storage: RecordStorage,
        limiter: RateLimiter,
        wall_clock: Callable[[], float],
        loop: trio_asyncio.TrioEventLoop,
    ) -> None:
        self._loop = loop
        self._server = server
        self._endpoint = endpoint
        self.storage = storage
        self.limiter = limiter
        self.wall_clock = wall_clock

    @property
    def node_id(self) -> bytes:
        return self._server.node.id  # type: ignore[no-any-return]

    @property
    def local_address(self) -> Address:
        return self._endpoint.local_address

    @property
    def _protocol(self) -> _Protocol:
        return self._server.protocol  # type: ignore[no-any-return]

    @property
    def malformed(self) -> int:
        """Requests and answers dropped as malformed so far."""
        return self._protocol.malformed

    async def _aio(self, function: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        # This node's own loop, whichever trio task calls: a caller outside the
        # ``open_dht`` block has no current asyncio loop of its own.
        return await self._loop.run_aio_coroutine(function(*args))

    def contacts(self) -> list[Contact]:
        """Every contact in the routing table."""
        return [
            Contact(node.id, Address(node.ip, node.port))
            for bucket in self._protocol.router.buckets
            for node in bucket.get_nodes()
        ]

    def neighbours(self, count: int = KSIZE) -> list[Contact]:
        """The contacts closest to this node: the ones worth remembering."""
        nodes = self._protocol.router.find_neighbors(self._server.node, count)
        return [Contact(node.id, Address(node.ip, node.port)) for node in nodes]

    async def bootstrap(self, addresses: Sequence[Address]) -> int:
        """Join the DHT through ``addresses``; the number of contacts then known.

        Every address is pinged at once. The package waits for the slowest
        (a dead address costs the full reply timeout); here the join goes on
        :data:`BOOTSTRAP_GRACE` seconds after the first answer, without the
        stragglers.
        """
        wanted = list(dict.fromkeys((a.host, a.port) for a in addresses))
        wanted = [a for a in wanted if a != self._own_address()]
        answered: list[Node] = []
        first_answer = trio.Event()
        remaining = len(wanted)

        async with trio.open_nursery() as pings:

            async def ping(address: tuple[str, int]) -> None:
                nonlocal remaining
                try:
                    found = await self._aio(self._server.bootstrap_node, address)
                    if found is not None:
                        answered.append(found)
                        first_answer.set()
                finally:
                    remaining -= 1
                    if not remaining:
                        pings.cancel_scope.cancel()

            async def stop_after_grace() -> None:
                await first_answer.wait()
                await trio.sleep(BOOTSTRAP_GRACE)
                pings.cancel_scope.cancel()

            for address in wanted:
                pings.start_soon(ping, address)
            if wanted:
                pings.start_soon(stop_after_grace)

        if answered:
            crawl = NodeSpiderCrawl(
                self._protocol, self._server.node, answered, self._server.ksize, self._server.alpha
            )
            await self._aio(crawl.find)
        return len(self.contacts())

    def _own_address(self) -> tuple[str, int]:
        local = self.local_address
        return (local.host, local.port)

    async def ping_neighbours(self, count: int = KSIZE) -> int:
        """Ping the ``count`` closest contacts once; how many answered.

        Behind a NAT router this keeps the UDP mapping of the node's port
        open: a router forgets an idle mapping (Linux after 30 s), and
        then nobody's requests reach the node any more.
        """
        nodes = self._protocol.router.find_neighbors(self._server.node, count)
        answered = 0

        async def ping(node: Node) -> None:
            nonlocal answered
            result = await self._aio(self._protocol.call_ping, node)
            answered += bool(result[0])

        async with trio.open_nursery() as pings:
            for node in nodes:
                pings.start_soon(ping, node)
        return answered

    async def ping(self, address: Address) -> bytes | None:
        """The node id that answers a ping at ``address``, or None: one
        datagram each way, where a lookup costs dozens."""

        async def ask() -> _Result:
            # The package's request makes its future at once: inside the loop.
            result: _Result = await self._protocol.ping(
                (address.host, address.port), self._server.node.id
            )
            return result

        answered, node_id = await self._aio(ask)
        return node_id if answered and _is_node_id(node_id) else None

    async def refresh(self) -> None:
        """Look up the buckets nobody has touched for an hour (the paper's refresh)."""
        await self._aio(self._server._refresh_table)

    async def publish(self, record: records.Record) -> bool:
        """Store a record on the k nodes closest to its key (and here, if this
        node is among them); whether any of them took it.

        A node that knows no other keeps the record itself and counts that as
        published (it is the whole DHT it knows). A node whose contacts all
        fail to answer also keeps it, but reports False: nobody else has it.
        """
        value = records.encode_record(record)
        key = records.dht_key(records.record_kind(record), record.node_id)
        if not self.contacts():
            return self.storage.offer(key, value)
        target = Node(key)
        nearest = self._protocol.router.find_neighbors(target, self._server.ksize)
        crawl = NodeSpiderCrawl(
            self._protocol, target, nearest, self._server.ksize, self._server.alpha
        )
        nodes: list[Node] = await self._aio(crawl.find)
        # The package's ``set_digest`` keeps a copy when this node is closer
        # than the farthest node found, and fails (``max`` of nothing) when
        # none answered; here it keeps one then too.
        own = self._server.node.distance_to(target)
        if not nodes or own < max(n.distance_to(target) for n in nodes):
            self.storage.offer(key, value)
        if not nodes:
            log.info("DHT: no node answered the search for the nodes closest to %s", key.hex())
            return False
        return any(await self._store_on(nodes, key, value))

    async def _store_on(self, nodes: Sequence[Node], key: bytes, value: bytes) -> list[bool]:
        """Ask each of ``nodes`` to store ``value`` under ``key``; which took it."""

        async def store_all() -> list[_Result]:
            return list(
                await asyncio.gather(*(self._protocol.call_store(n, key, value) for n in nodes))
            )

        results: list[_Result] = await self._aio(store_all)
        return [answered and taken is True for answered, taken in results]

    async def lookup(self, kind: records.RecordKind, node_id: bytes) -> records.Record | None:
        """The newest valid record of ``kind`` for ``node_id`` among all the
        k closest nodes; stale replicas are then given the newest one."""
        return await self._newest(kind, node_id)

    async def keep(
        self, kind: records.RecordKind, node_id: bytes, kept: Sequence[bytes] = ()
    ) -> records.Record | None:
        """The newest valid record of ``kind`` for ``node_id`` among all the
        k closest nodes and ``kept`` (encoded records held elsewhere), stored
        again on every one of those nodes that does not hold it: a
        :meth:`lookup` and a :meth:`publish` of what it found, without the
        publish's second search for the same nodes, nor stores on the nodes
        that already hold the record."""
        return await self._newest(kind, node_id, kept, spread=True)

    async def _newest(
        self,
        kind: records.RecordKind,
        node_id: bytes,
        kept: Sequence[bytes] = (),
        *,
        spread: bool = False,
    ) -> records.Record | None:
        key = records.dht_key(kind, node_id)
        now = int(self.wall_clock())
        local = self.storage.get(key)
        target = Node(key)
        nearest = self._protocol.router.find_neighbors(target, self._server.ksize)
        answers: dict[bytes, bytes | None] = {}
        if nearest:
            crawl = _NewestValueCrawl(
                self._protocol, target, nearest, self._server.ksize, self._server.alpha
            )
            answers = await self._aio(crawl.find)
        # Replicas mostly agree: check each distinct value once.
        candidates = {v for v in answers.values() if v is not None}
        candidates.update(kept)
        if local is not None:
            candidates.add(local)
        newest = records.choose_newest(candidates, key=key, now=now)
        if newest is None:
            return None
        value = records.encode_record(newest)
        self.storage.offer(key, value)
        # Replicas that served something else (older, forged, expired) get the
        # newest; so does the closest node that had none (as the paper caches),
        # or, spreading, every one of the k closest that had none.
        wrong = [peer for peer, answer in answers.items() if answer is not None and answer != value]
        closest = sorted(answers, key=lambda peer: int.from_bytes(peer, "big") ^ target.long_id)
        if spread:
            repair = wrong + [
                peer for peer in closest[: self._server.ksize] if answers[peer] is None
            ]
        else:
            repair = wrong + [peer for peer in closest if answers[peer] is None][:1]
        if repair:
            await self._repair(crawl, key, value, repair)
        return newest

    async def _repair(
        self, crawl: SpiderCrawl, key: bytes, value: bytes, peers: list[bytes]
    ) -> None:
        nodes = [node for node in (crawl.nearest.get_node(p) for p in peers) if node is not None]
        await self._store_on(nodes, key, value)

    async def find_contact(self, node_id: bytes) -> records.ContactRecord | None:
        """The newest valid contact record of ``node_id``."""
        record = await self.lookup(records.RecordKind.CONTACT, node_id)
        assert record is None or isinstance(record, records.ContactRecord)
        return record

    async def closest_nodes(self, key: bytes) -> list[Contact]:
        """The k nodes closest to ``key`` that answer (for open-mode placement)."""
        target = Node(key)
        nearest = self._protocol.router.find_neighbors(target, self._server.ksize)
        if not nearest:
            return []
        crawl = NodeSpiderCrawl(
            self._protocol, target, nearest, self._server.ksize, self._server.alpha
        )
        nodes = await self._aio(crawl.find)
        return [Contact(node.id, Address(node.ip, node.port)) for node in nodes]


@contextlib.asynccontextmanager
async def open_dht(
    network: Network,
    address: Address,
    *,
    node_id: bytes | None = None,
    wall_clock: Callable[[], float] = time.time,
    options: DhtOptions = DhtOptions(),
) -> AsyncIterator[DhtNode]:
    """A DHT node on a datagram endpoint bound to ``address``, for the duration.

    ``node_id`` None: a read-only client (:data:`READ_ONLY_ID`), for a
    short-lived lookup that must neither pass for this home's node nor linger
    in other nodes' routing tables. The asyncio loop the package runs in lives
    as long as the node and closes after the package has stopped.
    """
    if node_id is not None and len(node_id) != NODE_ID_SIZE:
        raise UsageError(f"a DHT node id has {NODE_ID_SIZE} bytes, not {len(node_id)}")
    endpoint = await network.open_datagram(address)
    try:
        # Errors from the caller's block come out as themselves, not as
        # groups of one from the loop's and the pumps' nurseries.
        with unwrap_single():
            async with trio_asyncio.open_loop() as loop:
                loop.set_exception_handler(_log_loop_error)
                storage = RecordStorage(wall_clock, max_records=options.max_records)
                server = _Server(
                    ksize=options.ksize,
                    alpha=options.alpha,
                    node_id=node_id if node_id is not None else READ_ONLY_ID,
                    storage=storage,
                )
                outgoing, queued = trio.open_memory_channel[tuple[bytes, tuple[str, int]]](
                    SEND_QUEUE
                )
                transport = _Transport(endpoint, outgoing)
                protocol = server._create_protocol()
                protocol.connection_made(transport)
                server.protocol = protocol
                server.transport = transport
                limiter = RateLimiter(options.rate_limit)
                node = DhtNode(server, endpoint, storage, limiter, wall_clock, loop)
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(_pump_out, endpoint, queued)
                        nursery.start_soon(_expire_requests, protocol)
                        nursery.start_soon(_pump_in, endpoint, loop, protocol, limiter)
                        yield node
                        nursery.cancel_scope.cancel()
                finally:
                    server.stop()
                    _fail_outstanding(protocol)
    finally:
        await endpoint.aclose()


def _fail_outstanding(protocol: _Protocol) -> None:
    # Requests still waiting for an answer would otherwise die with the loop
    # as "never retrieved" noise; they end as unanswered, which is the truth.
    for future, _ in list(protocol._outstanding.values()):
        if not future.done():
            future.set_result(_NO_ANSWER)
    protocol._outstanding.clear()
    protocol._deadlines.clear()


async def _expire_requests(protocol: _Protocol) -> None:
    """End each request of ``protocol`` that is not answered within its
    time as unanswered, until cancelled: one wait, due when the oldest
    unanswered request is, moved on as answers come."""
    while True:
        deadlines = protocol._deadlines
        with trio.CancelScope(deadline=deadlines[0][0] if deadlines else math.inf) as wait:
            protocol._expiry = wait
            try:
                await trio.sleep_forever()
            finally:
                protocol._expiry = None
        protocol._expire(trio.current_time())


async def _pump_out(
    endpoint: DatagramEndpoint,
    queued: trio.MemoryReceiveChannel[tuple[bytes, tuple[str, int]]],
) -> None:
    async for data, (host, port) in queued:
        try:
            await endpoint.send(data, Address(host, port))
        except (OSError, UsageError, ValueError) as error:
            log.info("DHT: datagram to %s:%s not sent: %s", host, port, error)


#: Seconds the incoming pump waits after the endpoint fails to receive.
RECEIVE_RETRY: Final = 1.0


async def _pump_in(
    endpoint: DatagramEndpoint,
    loop: asyncio.AbstractEventLoop,
    protocol: _Protocol,
    limiter: RateLimiter,
) -> None:
    while True:
        try:
            data, source = await endpoint.receive()
        except OSError as error:
            # Not a lost datagram (the endpoint absorbs those): the socket
            # itself failed. The node keeps serving and tries again.
            log.error("DHT: receiving failed: %s; trying again", error)
            await trio.sleep(RECEIVE_RETRY)
            continue
        if not limiter.allow(source_network(source.host), trio.current_time()):
            continue
        # Straight in from this trio task (inside the loop's context): the
        # protocol only sets futures and starts tasks, never blocks.
        try:
            protocol.datagram_received(data, (source.host, source.port))
        except Exception as error:
            # A bug met by one datagram costs that datagram, not the node.
            log_failure(log, f"handling a datagram from {source}", error, then="dropped")


def log_failure(logger: logging.Logger, what: str, error: BaseException, *, then: str) -> None:
    """One clear line (ERROR) for an unexpected failure in the DHT's work,
    saying what the node does ``then``; the traceback goes to DEBUG. A node
    goes on without that piece of work rather than stop."""
    logger.error("DHT: %s failed: %s: %s; %s", what, type(error).__name__, error, then)
    logger.debug("DHT: %s failed", what, exc_info=error)


def _log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # trio-asyncio's default handler raises a background task's error into
    # the loop's nursery, which would end the node; the package starts tasks
    # it never awaits (a ping to a bucket's head, stores to a newcomer).
    error = context.get("exception")
    what = f"a background task ({context.get('message', 'no message')})"
    if error is None:
        log.error("DHT: %s; going on", what)
    else:
        log_failure(log, what, error, then="going on")


# -- routing state -----------------------------------------------------------------------------


def encode_routing_state(
    node_id: bytes, neighbours: Sequence[Contact], kept: Sequence[bytes] = ()
) -> bytes:
    """The routing state file's bytes: versioned JSON, no pickle. ``kept``:
    encoded records the node keeps for others (its friends' root pointers)."""
    document = {
        "format": ROUTING_STATE_FORMAT,
        "version": ROUTING_STATE_VERSION,
        "node_id": node_id.hex(),
        "neighbours": [
            {"node_id": c.node_id.hex(), "host": c.address.host, "port": c.address.port}
            for c in neighbours
        ],
        "kept": [record.hex() for record in kept[:MAX_KEPT_RECORDS]],
    }
    return (json.dumps(document, indent=1) + "\n").encode()


def decode_routing_state(data: bytes) -> tuple[bytes, list[Contact], list[bytes]]:
    """(node id, neighbours, kept records) from a routing state file;
    :class:`FormatError` naming what is wrong with it. The records are
    bytes of a record's size, not checked further: whoever uses one checks
    it (:func:`records.choose_newest`)."""
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FormatError(f"DHT routing state is not JSON: {error}") from None
    if not isinstance(document, dict) or document.get("format") != ROUTING_STATE_FORMAT:
        raise FormatError("not a p2pbackup DHT routing state")
    if document.get("version") not in _READABLE_ROUTING_STATES:
        raise FormatError(
            f"DHT routing state version {document.get('version')!r}; "
            f"this p2pbackup reads {ROUTING_STATE_VERSION}"
        )
    try:
        node_id = bytes.fromhex(document["node_id"])
        neighbours = [
            Contact(bytes.fromhex(entry["node_id"]), Address(entry["host"], entry["port"]))
            for entry in document["neighbours"]
        ]
        kept_texts = document.get("kept", [])  # none in version 1
        if not isinstance(kept_texts, list):
            raise TypeError("kept is not a list")
        kept = [bytes.fromhex(text) for text in kept_texts]
    except (KeyError, TypeError, ValueError, UsageError) as error:
        raise FormatError(f"DHT routing state is malformed: {error}") from None
    for contact in [Contact(node_id, Address("0", 1)), *neighbours]:
        if not (
            _is_node_id(contact.node_id)
            and _is_host(contact.address.host)
            and _is_port(contact.address.port)
        ):
            raise FormatError(f"DHT routing state holds a malformed contact {contact}")
    if len(kept) > MAX_KEPT_RECORDS or not all(map(_is_record_value, kept)):
        raise FormatError("DHT routing state holds too many records, or one too large")
    return node_id, neighbours, kept


def save_routing_state(
    path: Path, node: DhtNode, previous: bytes | None = None, kept: Sequence[bytes] = ()
) -> bytes | None:
    """Remember ``node``'s neighbours (if it knows any) and the records it
    keeps for others (``kept``) in ``path``; returns
    the state the file now holds. Nothing is written when that is
    ``previous`` (what the last call returned): a node saves every few
    minutes, and its neighbours rarely change, so most saves would only
    rewrite and fsync the same bytes."""
    neighbours = node.neighbours()
    if not neighbours:
        return previous
    data = encode_routing_state(node.node_id, neighbours, kept)
    if data != previous:
        write_private_file(path, data)
    return data


def load_routing_state(path: Path, node_id: bytes) -> list[Contact]:
    """The neighbours remembered in ``path`` for ``node_id``; none if the file
    is missing, damaged or another node's (it is only a cache)."""
    return read_routing_state(path, node_id)[0]


def read_routing_state(path: Path, node_id: bytes) -> tuple[list[Contact], list[bytes]]:
    """The neighbours and kept records remembered in ``path`` for
    ``node_id``; none if the file is missing, damaged or another node's."""
    try:
        saved_id, neighbours, kept = decode_routing_state(path.read_bytes())
    except FileNotFoundError:
        return [], []
    except (OSError, FormatError) as error:
        log.warning("ignoring %s: %s", path, error)
        return [], []
    if saved_id != node_id:
        log.warning("ignoring %s: it is the state of node %s", path, saved_id.hex())
        return [], []
    return neighbours, kept


# -- addresses ---------------------------------------------------------------------------------


def is_wildcard(host: str) -> bool:
    """Whether ``host`` means "every interface" rather than one address."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False
