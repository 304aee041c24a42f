"""The simulator: unmodified nodes on the memory network in virtual time.

Nouns:

* **world** — :class:`World`: one :class:`~p2pbackup.net.memory.MemoryNetwork`
  and the **machines** on it (:class:`Machine`), each a real home served by
  :func:`p2pbackup.app.daemon.serve` — storage server, DHT, scheduled
  backups, audits, repair, leases — listening at ``nodeNN:47470``. A
  machine that is **up** runs ``serve``; one that is down (asleep, on
  holiday, gone) runs nothing and the network does not reach it.
* **virtual machine** — :func:`virtual_machine`, the one place the simulator
  patches the process (its docstring says what and why): worker threads run
  inline, the wall clock and the randomness of keys and pack ids follow
  the virtual clock and the seed, trio schedules deterministically.
* **tick** — :data:`TICK` virtual seconds: machines go up and down, faults
  apply, and the figures are sampled on ticks.
* **event log** — one JSON object a line (:class:`EventLog`): ``t`` (virtual
  days), ``event`` and what it concerns, only values the seed decides (no
  wall times), so that two runs of a scenario with one seed give the same
  log.
* **ground truth** — what the simulator, not the owner, knows of a pack: a
  shard index is **healthy** where a machine not gone for good holds its
  file untouched by a fault (the end checks the files against their Merkle
  roots); a pack's **redundancy** is its healthy shard indices less k; it is
  **lost** below 0. While an owner's home is lost its index is gone: its
  packs as they were when it was lost (:class:`LostPack`) stand in, and a
  shard counts wherever a machine holds it (a delegate may have moved it).
* **delegates** — ``workload.delegates`` of each owner's friends, made
  its delegates before the first backup (docs/delegation.md): their nodes
  keep its backups alive while it is away.

Homes' files live in a work directory on disk (``--out``'s ``work``),
which the simulation deletes as it goes only where a fault says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import attrs
import trio
import trio.testing

from p2pbackup.app import daemon, operations
from p2pbackup.app.home import Home
from p2pbackup.app.service import error_message
from p2pbackup.core import crypto, formats, merkle
from p2pbackup.engine import lister, snapshots
from p2pbackup.engine.index import Index
from p2pbackup.engine.restore import Restorer
from p2pbackup.errors import P2PBackupError
from p2pbackup.maintenance import auditor, delegated, repairer
from p2pbackup.net.memory import LinkProfile, MemoryNetwork
from p2pbackup.net.network import Address
from p2pbackup.node.server import StorageServer
from p2pbackup.node.shardhost import SHARDS_DIR, ShardHost
from p2pbackup.sim.scenario import Fault, Scenario, home_config

log = logging.getLogger(__name__)

PORT = 47470
HOUR = 3600.0
DAY = 86400.0
#: Virtual seconds between two looks at the world.
TICK = 1200.0
#: Unix seconds at virtual time 0 (a Monday, 00:00 UTC).
EPOCH = 1_900_051_200.0
#: Seconds a connection to a machine that is down waits before it fails.
CONNECT_TIMEOUT = 5.0
#: Seconds before a recovery that found too little is tried again.
RECOVER_AGAIN = 4 * HOUR
#: Bedtimes start at 22:00.
FIRST_BEDTIME = 22 * HOUR


def virtual_now() -> float:
    """Unix seconds in the simulation (the real clock outside a trio run)."""
    try:
        return EPOCH + trio.current_time()
    except RuntimeError:
        return _REAL_TIME()


_REAL_TIME = time.time
_REAL_TIME_NS = time.time_ns


def _virtual_ns() -> int:
    return int(virtual_now() * 1e9)


_REAL_FROM_THREAD_RUN = trio.from_thread.run


class _Threads:
    """``trio.to_thread.run_sync`` and ``trio.from_thread.run`` in a
    simulation (see :func:`virtual_machine`)."""

    def __init__(self) -> None:
        #: Calls back into trio made by the function running inline now.
        self.deferred: list[tuple[Callable[..., Awaitable[Any]], tuple[Any, ...]]] | None = None

    async def run_sync(self, function: Callable[..., Any], *args: Any, **_: Any) -> Any:
        await trio.lowlevel.checkpoint()
        deferred: list[tuple[Callable[..., Awaitable[Any]], tuple[Any, ...]]] = []
        self.deferred = deferred
        try:
            result = function(*args)
        finally:
            self.deferred = None
        for call_back, call_args in deferred:
            await call_back(*call_args)
        return result

    def from_thread_run(self, function: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        if self.deferred is None:
            return _REAL_FROM_THREAD_RUN(function, *args)
        self.deferred.append((function, args))
        return None


def _steady_lstat(work: Path) -> Callable[..., os.stat_result]:
    """``os.lstat`` with the times of ``work``, its ancestors and the
    directories right under it (the machines') set to :data:`EPOCH`."""
    real = _REAL_LSTAT
    base = os.fsencode(os.path.abspath(work))
    above = {os.fsencode(str(p)) for p in Path(os.fsdecode(base)).parents}

    def lstat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        st = real(path, *args, **kwargs)
        if args or kwargs or not isinstance(path, (str, bytes, os.PathLike)):
            return st
        name = os.fsencode(path)
        if not (name == base or name in above or os.path.dirname(name) == base):
            return st
        reduced: tuple[tuple[int, ...], dict[str, Any]] = st.__reduce__()[1]  # type: ignore[assignment]
        fields, extra = reduced
        seconds = int(EPOCH)
        fields = (*fields[:7], seconds, seconds, seconds)
        for kind in ("atime", "mtime", "ctime"):
            extra[f"st_{kind}"] = float(seconds)
            extra[f"st_{kind}_ns"] = seconds * 10**9
        return os.stat_result(fields, extra)

    return lstat


_REAL_LSTAT = os.lstat


@contextlib.contextmanager
def virtual_machine(seed: int, work: Path | None = None) -> Iterator[None]:
    """Patch the process for a simulation, and put everything back after.

    The node is left as it is; what changes is the machine under it:

    * ``trio.to_thread.run_sync`` runs its function inline. Under
      ``MockClock(autojump_threshold=0)`` the clock jumps as soon as every
      task waits, and a task waiting for a thread counts as waiting: a
      thread's work would let deadlines pass that real time would not; and
      a real thread's pace would make runs differ.
    * ``trio.from_thread.run``, called by a function running so (the
      backup pipeline's file workers hand their sealed blobs to the packer
      with it), is put off until the function returns, then awaited in
      order; its result is None (the pipeline ignores it). A job's blobs
      are then all in memory at once: harmless for the simulator's small
      files.
    * ``time.time`` and ``time.time_ns`` read the virtual clock: the node
      stamps snapshots, traffic days and scheduled runs with them (the
      parts that take a clock, ``serve(clock=)``, get :func:`virtual_now`).
    * ``crypto.random_bytes`` (master secrets, pack ids, handshake keys)
      draws from a generator seeded by ``seed``: pack ids decide placement,
      so without this no two runs would place alike. Only simulations run
      with it: it is anything but a CSPRNG.
    * trio's scheduler takes its deterministic mode (the one Hypothesis
      turns on), seeded by ``seed``: tasks ready together run in an order
      the seed decides, not one that varies run to run.
    * the ``random`` module's own generator is seeded (kademlia draws the
      ids it refreshes its buckets with from it).
    * ``os.lstat`` gives the directories above the owners' trees (``work``,
      its ancestors and the machines' directories) the times of
      :data:`EPOCH`: a snapshot records the directories above its paths,
      and their real times (the day the work directory was made; /dev/shm's,
      which changes whenever anyone makes a file there) made the trees'
      compressed sizes, so the packs' sizes and placement, differ from one
      process to the next.
    * a backup lists its directories itself (in a "thread", so inline), not
      in a lister process: virtual time cannot wait for another process,
      and the clock would jump while the walk waits for its listings.
    """
    import trio._core._run as trio_run

    stream = random.Random(seed ^ 0x5EED)
    threads = _Threads()
    # Private to trio: the switch Hypothesis's plugin throws, and its generator.
    deterministic = "_ALLOW_DETERMINISTIC_SCHEDULING"
    saved_run_sync, saved_flag = trio.to_thread.run_sync, getattr(trio_run, deterministic)
    saved_from_thread = trio.from_thread.run
    saved_state, saved_global = trio_run._r.getstate(), random.getstate()
    saved_random_bytes = crypto.random_bytes
    saved_lister = lister.LISTER_COMMAND

    def seeded_bytes(n: int) -> bytes:
        if n < 0:
            raise ValueError(f"cannot make {n} random bytes")
        return stream.randbytes(n)

    trio.to_thread.run_sync = threads.run_sync  # type: ignore[assignment]
    trio.from_thread.run = threads.from_thread_run  # type: ignore[assignment]
    time.time = virtual_now
    time.time_ns = _virtual_ns
    crypto.random_bytes = seeded_bytes
    lister.LISTER_COMMAND = None
    setattr(trio_run, deterministic, True)
    trio_run._r.seed(seed)
    random.seed(seed)
    if work is not None:
        os.lstat = _steady_lstat(work)
    try:
        yield
    finally:
        os.lstat = _REAL_LSTAT
        trio.to_thread.run_sync = saved_run_sync
        trio.from_thread.run = saved_from_thread
        time.time, time.time_ns = _REAL_TIME, _REAL_TIME_NS
        crypto.random_bytes = saved_random_bytes
        lister.LISTER_COMMAND = saved_lister
        setattr(trio_run, deterministic, saved_flag)
        trio_run._r.setstate(saved_state)
        random.setstate(saved_global)


class EventLog:
    """The event log: JSON lines on ``stream``, and the events kept."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: str, **fields: Any) -> None:
        record = {"t": round(trio.current_time() / DAY, 4), "event": event, **fields}
        self.events.append(record)
        if self.stream is not None:
            self.stream.write(json.dumps(record, sort_keys=True) + "\n")


@attrs.frozen
class LostPack:
    """What the simulator keeps of a pack of a lost home: its code and the
    Merkle root of each shard index (the same wherever it is rebuilt)."""

    pack_id: bytes
    k: int
    block_size: int
    roots: tuple[tuple[int, bytes], ...]


@attrs.define(eq=False)
class Machine:
    """One simulated machine and its home."""

    index: int
    name: str
    home: Home
    #: Its recovery key (kept by the simulator as a user keeps it on paper).
    key: str
    node_id: bytes
    owner: bool
    #: Seconds after midnight it goes to sleep.
    bedtime: float
    rng: random.Random
    tree: Path | None = None
    #: The tree's content at each change: (virtual seconds, file → digest).
    versions: list[tuple[float, dict[str, str]]] = attrs.Factory(list)
    #: Gone for good (departed, or its home lost and not yet recovered).
    gone: bool = False
    lost_home: bool = False
    away_until: float = 0.0
    cheating: bool = False
    scope: trio.CancelScope | None = None
    stopped: trio.Event | None = None
    #: Shard files a fault damaged: path → the mtime it left them with.
    damaged: dict[Path, int] = attrs.Factory(dict)
    #: Traffic an earlier home of this machine counted: (day, purpose) → bytes.
    old_traffic: dict[tuple[int, str], int] = attrs.Factory(dict)
    #: The packs of its home when it was lost (until it is recovered).
    lost_packs: list[LostPack] = attrs.Factory(list)

    @property
    def address(self) -> Address:
        return Address(self.name, PORT)

    @property
    def up(self) -> bool:
        return self.scope is not None

    def shard_files(self) -> list[Path]:
        root = self.home.hosted_path / SHARDS_DIR
        if not root.is_dir():
            return []
        return sorted(p for p in root.rglob("*") if p.is_file())


@attrs.define
class Figures:
    """What a run measured (``summary`` and the series the plots draw)."""

    #: Per day: the lowest redundancy of any pack of any owner (None: no packs yet).
    worst_redundancy: list[int | None] = attrs.Factory(list)
    #: Per tick: machines up.
    online: list[int] = attrs.Factory(list)
    #: Machine → day → bytes, for repair and audits.
    repair: dict[str, list[int]] = attrs.Factory(dict)
    audit: dict[str, list[int]] = attrs.Factory(dict)


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class World:
    """A scenario played out (module docstring)."""

    def __init__(
        self,
        scenario: Scenario,
        work: Path,
        events: EventLog,
        *,
        progress: Callable[[float], None] = lambda day: None,
    ) -> None:
        self.scenario = scenario
        self.work = work
        self.events = events
        self.progress = progress
        self.rng = random.Random(scenario.seed)
        links = scenario.links
        self.net = MemoryNetwork(
            seed=scenario.seed,
            default_link=LinkProfile(latency=links.latency_ms / 1000, loss=links.loss),
            connect_timeout=CONNECT_TIMEOUT,
        )
        self.machines: list[Machine] = []
        self.figures = Figures()
        #: (virtual seconds, order, what) waiting to happen.
        self._agenda: list[tuple[float, int, str, Callable[[], Awaitable[None]]]] = []
        self._order = 0
        self.node_failures = 0
        self.restore_exact: bool | None = None
        self.packs = 0
        self.packs_lost = 0
        self.disqualified: set[str] = set()
        self.snapshots = 0
        #: Owner → (snapshots, disqualified peers) at the last daily look.
        self._seen: dict[str, tuple[int, frozenset[str]]] = {}
        self._nursery: trio.Nursery | None = None

    # -- building ---------------------------------------------------------------

    def _config(self) -> Any:
        repo = self.scenario.repository
        pack = repo.pack_kib * 1024
        base = operations.default_config(repo.k, repo.n)
        return attrs.evolve(
            base,
            pack_size=pack,
            chunk_min=max(pack // 16, 4096),
            chunk_avg=max(pack // 8, 8192),
            chunk_max=max(pack // 2, 16384),
            block_size=4096,
        )

    def add_machine(self, *, owner: bool) -> Machine:
        index = len(self.machines)
        name = f"node{index:02}"
        home = Home(self.work / name / "home")
        key = operations.init_home(home, self._config())
        spread = self.scenario.nodes.bedtime_spread_hours * HOUR
        count = max(self.scenario.nodes.count, 1)
        machine = Machine(
            index=index,
            name=name,
            home=home,
            key=key,
            node_id=daemon.node_identity(home).node_id,
            owner=owner,
            bedtime=(FIRST_BEDTIME + spread * (index % count) / count) % DAY,
            rng=random.Random(self.scenario.seed * 1_000_003 + index),
        )
        if owner:
            machine.tree = self.work / name / "tree"
            self._write_tree(machine, first=True)
        self._write_config(machine)
        up, down = self.scenario.links.uplink_kbps, self.scenario.links.downlink_kbps
        self.net.set_access(
            name, uplink=up * 125 if up else None, downlink=down * 125 if down else None
        )
        self.machines.append(machine)
        return machine

    def _write_config(self, machine: Machine) -> None:
        paths = [str(machine.tree)] if machine.tree is not None else []
        machine.home.config_path.write_text(home_config(self.scenario, paths))

    def _write_tree(self, machine: Machine, *, first: bool = False) -> None:
        """The owner's generated tree; after the first, rewrite a share of its files."""
        assert machine.tree is not None
        workload = self.scenario.workload
        size = max(workload.tree_kib * 1024 // workload.files, 1)
        names = [f"dir{i % 4}/file{i:04}.bin" for i in range(workload.files)]
        if first:
            chosen = names
        else:
            count = max(1, round(workload.change * len(names))) if workload.change else 0
            chosen = sorted(machine.rng.sample(names, count))
        for name in chosen:
            path = machine.tree / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(machine.rng.randbytes(size))
        # Times the seed decides, not the machine's: a snapshot's trees
        # carry them, and their compressed size decides a pack's.
        stamp = int(virtual_now() * 1e9)
        for path in [*(machine.tree / name for name in chosen), *machine.tree.rglob("*/")]:
            os.utime(path, ns=(stamp, stamp))
        os.utime(machine.tree, ns=(stamp, stamp))
        manifest = {name: _digest((machine.tree / name).read_bytes()) for name in names}
        machine.versions.append((trio.current_time(), manifest))

    async def befriend(self, machine: Machine, friends: list[Machine]) -> None:
        """``machine`` and each of ``friends`` add one another by invite code."""
        async with operations.open_repository(
            machine.home, network=self.net.interface(machine.name)
        ) as repo:
            for friend in friends:
                code = operations.make_invite(friend.home, [str(friend.address)])
                await operations.add_friend(repo, code, now=virtual_now)
        for friend in friends:
            async with operations.open_repository(
                friend.home, network=self.net.interface(friend.name)
            ) as repo:
                await operations.add_friend(
                    repo,
                    operations.make_invite(machine.home, [str(machine.address)]),
                    now=virtual_now,
                )

    async def _make_delegates(self, owner: Machine, count: int) -> None:
        """``delegate add`` for the owner's first ``count`` friends that are
        no owners. Nobody serves yet: the first backup hands them grants."""
        by_id = {m.node_id: m for m in self.machines}
        index = Index(owner.home.index_path, create=False)
        try:
            friends = [by_id[f.node_id] for f in index.friends() if f.node_id in by_id]
            chosen = sorted((m for m in friends if not m.owner), key=lambda m: m.index)[:count]
            with index.transaction():
                for delegate in chosen:
                    index.add_delegate(delegate.node_id, int(virtual_now()))
        finally:
            index.close()
        self.events("delegates", node=owner.name, delegates=[m.name for m in chosen])

    def _friend_graph(self, count: int, degree: int | None) -> list[tuple[int, int]]:
        """Pairs of friends: everyone, or each node with about ``degree``."""
        if degree is None:
            return [(a, b) for a in range(count) for b in range(a + 1, count)]
        links: set[tuple[int, int]] = set()
        degrees = [0] * count
        for a in range(count):
            others = [b for b in range(count) if b != a and (min(a, b), max(a, b)) not in links]
            self.rng.shuffle(others)
            others.sort(key=lambda b: degrees[b])
            for b in others[: max(degree - degrees[a], 0)]:
                links.add((min(a, b), max(a, b)))
                degrees[a] += 1
                degrees[b] += 1
        return sorted(links)

    # -- machines up and down ------------------------------------------------------

    def _bootstrap(self, machine: Machine) -> tuple[Address, ...]:
        return tuple(m.address for m in self.machines[:3] if m is not machine)

    def start(self, machine: Machine) -> None:
        assert self._nursery is not None
        if machine.up:
            return
        self.net.revive_host(machine.name)
        machine.scope = trio.CancelScope()
        machine.stopped = trio.Event()
        self._nursery.start_soon(self._serve, machine, machine.scope, machine.stopped)

    async def _serve(self, machine: Machine, scope: trio.CancelScope, stopped: trio.Event) -> None:
        options = daemon.ServeOptions(
            listen=machine.address,
            bootstrap=self._bootstrap(machine),
            port_mapping=False,
            refresh_period=self.scenario.nodes.dht_refresh_hours * HOUR,
        )
        try:
            with scope:
                await daemon.serve(
                    machine.home,
                    options,
                    network=self.net.interface(machine.name),
                    clock=virtual_now,
                    rng=machine.rng,
                )
        except Exception as error:
            # Switched off between two of its checkpoints, a node runs on
            # until the next one and finds its host gone: on a real machine
            # that code never runs, so it is the switch-off, not a failure.
            if scope.cancel_called:
                return
            self.node_failures += 1
            self.events("node_failed", node=machine.name, error=error_message(error) or repr(error))
        finally:
            if machine.scope is scope:
                machine.scope = None
            stopped.set()

    async def stop(self, machine: Machine) -> None:
        """Switch the machine off (it answers nothing from now on)."""
        self.net.kill_host(machine.name)
        scope, stopped = machine.scope, machine.stopped
        if scope is None or stopped is None:
            return
        scope.cancel()
        machine.scope = None
        await stopped.wait()

    def awake(self, machine: Machine, t: float) -> bool:
        hours = self.scenario.nodes.online_hours
        if hours >= 24:
            return True
        return (t - machine.bedtime) % DAY >= (24 - hours) * HOUR

    def should_be_up(self, machine: Machine, t: float) -> bool:
        return not machine.gone and t >= machine.away_until and self.awake(machine, t)

    async def settle(self, t: float) -> None:
        for machine in self.machines:
            want = self.should_be_up(machine, t)
            if want and not machine.up:
                self.start(machine)
            elif not want and machine.up:
                await self.stop(machine)

    # -- the agenda ----------------------------------------------------------------

    def at(self, when: float, what: str, action: Callable[[], Awaitable[None]]) -> None:
        heapq.heappush(self._agenda, (when, self._order, what, action))
        self._order += 1

    def _pick(self, fault: Fault) -> list[Machine]:
        """The machines a fault names (by index, or drawn by the seed)."""
        candidates = [m for m in self.machines if not m.gone]
        if fault.kind == "lose_home":
            candidates = [m for m in candidates if m.owner]
        elif fault.kind in ("depart", "cheat", "lose_disk"):
            # Owners keep their data to the end: the restore checks it.
            candidates = [m for m in candidates if not m.owner] or candidates
        if fault.nodes:
            return [self.machines[i] for i in fault.nodes if not self.machines[i].gone]
        count = (
            fault.count
            if fault.count is not None
            else round((fault.fraction or 0) * len(self.machines))
        )
        return sorted(
            self.rng.sample(candidates, min(count, len(candidates))), key=lambda m: m.index
        )

    def schedule_faults(self) -> None:
        for fault in self.scenario.faults:
            self.at(fault.day * DAY, fault.kind, lambda f=fault: self.apply(f))  # type: ignore[misc]
        nodes = self.scenario.nodes
        horizon = self.scenario.days * DAY
        if nodes.churn_per_month > 0:
            t = 0.0
            while True:
                t += self.rng.expovariate(nodes.churn_per_month / (30 * DAY))
                if t >= horizon:
                    break
                self.at(t, "churn", self._churn)
        if nodes.holidays_per_year > 0:
            for machine in self.machines:
                t = 0.0
                while True:
                    t += self.rng.expovariate(nodes.holidays_per_year / (365 * DAY))
                    if t >= horizon:
                        break
                    self.at(t, "holiday", lambda m=machine, s=t: self._holiday(m, s))  # type: ignore[misc]
        t = DAY
        while t < horizon:
            self.at(t, "day", self._new_day)
            t += DAY

    async def apply(self, fault: Fault) -> None:
        if fault.kind == "join":
            await self._join(fault.count or 1, fault.friends)
            return
        chosen = self._pick(fault)
        names = [m.name for m in chosen]
        now = trio.current_time()
        if fault.kind == "depart":
            for machine in chosen:
                await self.stop(machine)
                machine.gone = True
            self.events("depart", nodes=names)
        elif fault.kind == "holiday":
            for machine in chosen:
                await self._holiday(machine, now, fault.duration * DAY)
        elif fault.kind == "partition":
            self.net.partition(names)
            self.events("partition", nodes=names, days=fault.duration)
            self.at(now + fault.duration * DAY, "heal", self._heal)
        elif fault.kind == "corrupt":
            for machine in chosen:
                hit = self._corrupt(machine, fault.share)
                self.events("corrupt", node=machine.name, files=hit)
        elif fault.kind == "lose_disk":
            for machine in chosen:
                was_up = machine.up
                await self.stop(machine)
                files = len(machine.shard_files())
                shutil.rmtree(machine.home.hosted_path, ignore_errors=True)
                machine.damaged.clear()
                self.events("lose_disk", node=machine.name, files=files)
                if was_up:
                    self.start(machine)
        elif fault.kind == "cheat":
            for machine in chosen:
                machine.cheating = True
            self.events("cheat", nodes=names)
        elif fault.kind == "lose_home":
            for machine in chosen:
                await self._lose_home(machine, fault.duration * DAY)

    async def _heal(self) -> None:
        self.net.heal()
        self.events("heal")

    async def _holiday(self, machine: Machine, start: float, length: float | None = None) -> None:
        if machine.gone:
            return
        length = self.scenario.nodes.holiday_days * DAY if length is None else length
        machine.away_until = max(machine.away_until, start + length)
        self.events("holiday", node=machine.name, days=round(length / DAY, 3))

    async def _churn(self) -> None:
        candidates = [m for m in self.machines if not m.gone and not m.owner]
        if len(candidates) <= 4:
            return
        leaving = self.rng.choice(candidates)
        await self.stop(leaving)
        leaving.gone = True
        self.events("depart", nodes=[leaving.name], churn=True)
        await self._join(1, self.scenario.nodes.friends)

    async def _join(self, count: int, degree: int | None) -> None:
        for _ in range(count):
            machine = self.add_machine(owner=False)
            living = [m for m in self.machines if not m.gone and m is not machine]
            if degree is None or degree >= len(living):
                friends = living
            else:
                friends = sorted(self.rng.sample(living, degree), key=lambda m: m.index)
            # A friend's user adds the newcomer: their node restarts to read it.
            running = [f for f in friends if f.up]
            for friend in running:
                await self.stop(friend)
            await self.befriend(machine, friends)
            self.events("join", node=machine.name, friends=[f.name for f in friends])
        await self.settle(trio.current_time())

    def _corrupt(self, machine: Machine, share: float) -> int:
        files = [p for p in machine.shard_files() if p not in machine.damaged]
        count = round(share * len(files))
        for path in sorted(self.rng.sample(files, count)):
            data = bytearray(path.read_bytes())
            for at in range(0, len(data), 4096):
                data[at] ^= 0xA5
            path.write_bytes(bytes(data))
            machine.damaged[path] = path.stat().st_mtime_ns
        return count

    def _cheat(self, machine: Machine) -> None:
        """Keep the first block of every new shard, and zeros for the rest
        (the size stays, so only an audit can tell)."""
        for path in machine.shard_files():
            if path in machine.damaged and machine.damaged[path] == path.stat().st_mtime_ns:
                continue
            data = path.read_bytes()
            path.write_bytes(data[:4096] + bytes(max(len(data) - 4096, 0)))
            machine.damaged[path] = path.stat().st_mtime_ns

    async def _lose_home(self, machine: Machine, after: float) -> None:
        await self.stop(machine)
        self._note_owner(machine)
        self._keep_traffic(machine)
        machine.lost_packs = self._packs_of(machine)
        files = len(machine.shard_files())
        shutil.rmtree(machine.home.path)
        assert machine.tree is not None
        shutil.rmtree(machine.tree)
        machine.gone = machine.lost_home = True
        machine.damaged.clear()
        self.events("lose_home", node=machine.name, shard_files=files, recover_in_days=after / DAY)
        self.at(trio.current_time() + after, "recover", lambda: self._recover(machine))

    async def _recover(self, machine: Machine) -> None:
        """A new machine under the same name, set up from the recovery key
        through the DHT, then the owner's files restored from it."""
        helpers = [m for m in self.machines if m.up and m is not machine]
        network = self.net.interface(machine.name)
        self.net.revive_host(machine.name)
        # Through the DHT first (`recover --bootstrap`); failing that, as the
        # error then advises, through friends' invite codes (`--friend`).
        friends = [
            node
            for m in helpers[:3]
            for node in operations.invite_nodes(operations.make_invite(m.home, [str(m.address)]))
        ]
        summary = None
        for via, peers, bootstrap in (
            ("dht", [], [m.address for m in helpers[:3]]),
            ("friends", friends, []),
        ):
            try:
                summary = await operations.recover(
                    machine.home,
                    machine.key,
                    [],
                    peers,
                    bootstrap=bootstrap,
                    network=network,
                    clock=virtual_now,
                )
            except P2PBackupError as error:
                self.events("recover_failed", node=machine.name, via=via, error=str(error))
            else:
                break
        if summary is not None and (
            summary.snapshots == 0 or summary.packs_restorable < summary.packs
        ):
            # Friends asleep hold what the home needs: a user tries again
            # later (a new home each time: recover wants none).
            self.events(
                "recover_incomplete",
                node=machine.name,
                via=via,
                snapshots=summary.snapshots,
                packs=summary.packs,
                packs_restorable=summary.packs_restorable,
            )
            shutil.rmtree(machine.home.path)
            summary = None
        if summary is None:
            self.at(trio.current_time() + RECOVER_AGAIN, "recover", lambda: self._recover(machine))
            return
        self.events(
            "recovered",
            node=machine.name,
            via=via,
            snapshots=summary.snapshots,
            packs=summary.packs,
            packs_restorable=summary.packs_restorable,
        )
        assert machine.tree is not None
        exact = await self._restore_latest(machine, self.work / machine.name / "restored")
        if exact is not None:
            # The owner's files are back where they were.
            shutil.copytree(
                self.work / machine.name / "restored" / str(machine.tree).lstrip("/"), machine.tree
            )
        else:
            self._write_tree(machine, first=True)
        self.events("home_restored", node=machine.name, exact=exact)
        self._write_config(machine)
        machine.gone = machine.lost_home = False
        machine.lost_packs = []
        await self.settle(trio.current_time())

    async def _new_day(self) -> None:
        """Owners' files change overnight, with their node off."""
        for machine in self.machines:
            if machine.owner and not machine.gone and self.scenario.workload.change > 0:
                if machine.up:
                    await self.stop(machine)
                self._write_tree(machine)
        self._sample_day()

    # -- figures ----------------------------------------------------------------------

    def _holder_path(self, holder: Machine, owner: Machine, pack_id: bytes, index: int) -> Path:
        name = formats.shard_id(pack_id, index).hex()
        return holder.home.hosted_path / SHARDS_DIR / owner.node_id.hex() / name[:2] / name

    def redundancy(self, owner: Machine, *, verify: bool = False) -> list[int]:
        """Ground truth: each pack's healthy shard indices less k."""
        by_id = {m.node_id.hex(): m for m in self.machines}
        index = Index(owner.home.index_path, create=False)
        try:
            result = []
            for pack_id in index.pack_ids():
                record = index.pack(pack_id, with_blobs=False)
                if record is None:
                    continue
                healthy = set()
                for location in record.shards:
                    holder = by_id.get(location.peer_id)
                    if holder is None or holder.gone:
                        continue
                    path = self._holder_path(holder, owner, pack_id, location.index)
                    try:
                        mtime = path.stat().st_mtime_ns
                    except FileNotFoundError:
                        continue
                    if verify:
                        root = merkle.merkle_root(path.read_bytes(), record.block_size)
                        if root != location.merkle_root:
                            continue
                    elif holder.damaged.get(path) == mtime:
                        continue
                    healthy.add(location.index)
                result.append(len(healthy) - record.k)
            return result
        finally:
            index.close()

    def _packs_of(self, owner: Machine) -> list[LostPack]:
        index = Index(owner.home.index_path, create=False)
        try:
            packs = []
            for pack_id in index.pack_ids():
                record = index.pack(pack_id, with_blobs=False)
                if record is not None:
                    roots = tuple(sorted((s.index, s.merkle_root) for s in record.shards))
                    packs.append(LostPack(pack_id, record.k, record.block_size, roots))
            return packs
        finally:
            index.close()

    def lost_redundancy(self, owner: Machine, *, verify: bool = False) -> list[int]:
        """Ground truth for a lost home: each of its packs' shard indices
        held untouched by any machine not gone, less k."""
        living = [m for m in self.machines if not m.gone and m is not owner]
        result = []
        for pack in owner.lost_packs:
            healthy = 0
            for index, root in pack.roots:
                for holder in living:
                    path = self._holder_path(holder, owner, pack.pack_id, index)
                    try:
                        mtime = path.stat().st_mtime_ns
                    except FileNotFoundError:
                        continue
                    if verify:
                        if merkle.merkle_root(path.read_bytes(), pack.block_size) != root:
                            continue
                    elif holder.damaged.get(path) == mtime:
                        continue
                    healthy += 1
                    break
            result.append(healthy - pack.k)
        return result

    def _sample_day(self) -> None:
        worst: int | None = None
        for machine in self.machines:
            if machine.owner and not machine.gone:
                self._note_owner(machine)
                levels = self.redundancy(machine)
            elif machine.lost_home:
                levels = self.lost_redundancy(machine)
            else:
                continue
            if levels:
                worst = min(levels) if worst is None else min(worst, min(levels))
        self.figures.worst_redundancy.append(worst)
        self.events("day", worst_redundancy=worst, up=sum(m.up for m in self.machines))

    def _note_owner(self, owner: Machine) -> None:
        """Log what the owner's index says changed since the last day:
        snapshots taken, shards repaired, peers disqualified."""
        names = {m.node_id.hex(): m.name for m in self.machines}
        index = Index(owner.home.index_path, create=False)
        try:
            snapshots_now = len(index.snapshots())
            disqualified = {names.get(p, p) for p in index.disqualified_peers()}
        finally:
            index.close()
        seen = self._seen.setdefault(owner.name, (0, frozenset()))
        if snapshots_now != seen[0]:
            self.events("snapshots", node=owner.name, count=snapshots_now)
        for peer in sorted(disqualified - seen[1]):
            self.events("disqualified", node=owner.name, peer=peer)
        self._seen[owner.name] = (snapshots_now, frozenset(disqualified))

    def _keep_traffic(self, machine: Machine) -> None:
        for (day, purpose), count in self._traffic(machine).items():
            key = (day, purpose)
            machine.old_traffic[key] = machine.old_traffic.get(key, 0) + count

    def _traffic(self, machine: Machine) -> dict[tuple[int, str], int]:
        """The machine's traffic by (day, purpose): its home's, and what it
        moved as a delegate (counted in its grant indexes)."""
        totals: dict[tuple[int, str], int] = {}
        if not machine.home.index_path.exists():
            return totals
        grant_indexes = sorted((machine.home.path / delegated.GRANT_INDEX_DIR).glob("*.sqlite"))
        for path in [machine.home.index_path, *grant_indexes]:
            index = Index(path, create=False)
            try:
                for row in index.traffic():
                    key = (row.day, row.purpose)
                    totals[key] = totals.get(key, 0) + row.sent + row.received
            finally:
                index.close()
        return totals

    # -- the run ----------------------------------------------------------------------

    async def run(self) -> None:
        scenario = self.scenario
        count = scenario.nodes.count
        for i in range(count):
            self.add_machine(owner=i < scenario.workload.owners)
        pairs = self._friend_graph(count, scenario.nodes.friends)
        for a in range(count):
            friends = [self.machines[b] for x, b in pairs if x == a]
            if friends:
                await self.befriend(self.machines[a], friends)
        if scenario.workload.delegates:
            for machine in self.machines:
                if machine.owner:
                    await self._make_delegates(machine, scenario.workload.delegates)
        self.events(
            "start",
            scenario=scenario.name,
            nodes=count,
            owners=scenario.workload.owners,
            friendships=len(pairs),
        )
        self.schedule_faults()
        horizon = scenario.days * DAY
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            t = 0.0
            while t < horizon:
                while self._agenda and self._agenda[0][0] <= t:
                    _, _, _, action = heapq.heappop(self._agenda)
                    await action()
                for machine in self.machines:
                    if machine.cheating and not machine.gone:
                        self._cheat(machine)
                await self.settle(t)
                self.figures.online.append(sum(m.up for m in self.machines))
                self.progress(t / DAY)
                t += TICK
                await trio.sleep_until(t)
            for machine in self.machines:
                await self.stop(machine)
            self.progress(scenario.days)
            self._nursery = None
        await self._finish()

    async def _finish(self) -> None:
        """Every machine not gone for good back up as a bare storage node
        (no maintenance), the partitions healed; then the ground truth, and
        each owner's latest snapshot restored and compared."""
        self.net.heal()
        days = math.ceil(self.scenario.days)
        for machine in self.machines:
            if machine.owner and not machine.gone:
                self.disqualified |= self._disqualified(machine)
            traffic = dict(machine.old_traffic)
            for key, value in self._traffic(machine).items():
                traffic[key] = traffic.get(key, 0) + value
            first = int(EPOCH // DAY)
            self.figures.repair[machine.name] = [
                traffic.get((first + d, repairer.PURPOSE), 0) for d in range(days)
            ]
            self.figures.audit[machine.name] = [
                traffic.get((first + d, auditor.PURPOSE), 0) for d in range(days)
            ]
        levels: list[int] = []
        for machine in self.machines:
            if machine.owner and not machine.gone:
                levels.extend(self.redundancy(machine, verify=True))
            elif machine.lost_home:
                levels.extend(self.lost_redundancy(machine, verify=True))
        self.packs = len(levels)
        self.packs_lost = sum(1 for level in levels if level < 0)
        async with trio.open_nursery() as nursery:
            hosts: list[ShardHost] = []
            for machine in self.machines:
                if machine.gone:
                    continue
                self.net.revive_host(machine.name)
                host = ShardHost.open(machine.home.hosted_path, clock=virtual_now)
                hosts.append(host)
                server = StorageServer(host, daemon.node_identity(machine.home))
                await nursery.start(
                    self.net.interface(machine.name).serve,
                    machine.address,
                    server.handle_connection,
                )
            exact: bool | None = None  # no owner has a snapshot (yet)
            for machine in self.machines:
                if machine.owner and not machine.gone:
                    result = await self._restore_latest(machine, self.work / machine.name / "final")
                    self.events("restore", node=machine.name, exact=result)
                    if result is not None:
                        exact = result and exact is not False
                elif machine.lost_home:
                    # Never recovered: nothing of its files came back.
                    self.events("restore", node=machine.name, exact=False, recovered=False)
                    exact = False
            self.restore_exact = exact
            nursery.cancel_scope.cancel()
        for host in hosts:
            host.close()
        self.events(
            "end",
            packs=self.packs,
            packs_lost=self.packs_lost,
            restore_exact=self.restore_exact,
            disqualified=sorted(self.disqualified),
        )

    def _disqualified(self, owner: Machine) -> set[str]:
        names = {m.node_id.hex(): m.name for m in self.machines}
        index = Index(owner.home.index_path, create=False)
        try:
            self.snapshots += len(index.snapshots())
            return {names.get(p, p) for p in index.disqualified_peers()}
        finally:
            index.close()

    async def _restore_latest(self, machine: Machine, target: Path) -> bool | None:
        """Restore the owner's latest snapshot into ``target``; whether it is
        the tree as it was when the snapshot was taken (None: no snapshot)."""
        assert machine.tree is not None
        shutil.rmtree(target, ignore_errors=True)
        try:
            async with operations.open_repository(
                machine.home, network=self.net.interface(machine.name)
            ) as repo:
                if not repo.index.snapshots():
                    return None
                _, snap = snapshots.resolve(repo.index, "latest")
                summary = await Restorer(repo, target).run(snap, None)
        except P2PBackupError as error:
            self.events("restore_failed", node=machine.name, error=str(error))
            return False
        if not summary.ok:
            return False
        taken = snap.time_ns / 1e9 - EPOCH
        manifest = next(m for t, m in reversed(machine.versions) if t <= taken)
        root = target / str(machine.tree).lstrip("/")
        found = {
            str(p.relative_to(root)): _digest(p.read_bytes())
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }
        return found == manifest


@attrs.frozen
class Outcome:
    """A finished run: the summary ``--json`` prints, and the series."""

    summary: dict[str, Any]
    figures: Figures


def work_directory() -> Path:
    """A new directory for a run's homes: on tmpfs where there is one, since
    the node fsyncs what it writes and a simulation needs no durability.
    Its name is the first free of ``p2pbackup-sim-0000``, ``-0001``, …, not a
    random one: the owners' snapshots record their paths, and two runs of
    one seed, one after the other, give the same figures only with the
    same names."""
    shm = Path("/dev/shm")
    parent = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    for number in range(10_000):
        path = parent / f"p2pbackup-sim-{number:04}"
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        return path
    return Path(tempfile.mkdtemp(prefix="p2pbackup-sim-", dir=parent))


def run(
    scenario: Scenario,
    work: Path,
    events_path: Path | None = None,
    *,
    node_log: Path | None = None,
    progress: Callable[[float], None] = lambda day: None,
) -> Outcome:
    """Play ``scenario`` out in ``work`` (which must be empty or absent);
    the event log goes to ``events_path``, the nodes' warnings and errors to
    ``node_log`` (default: ``work/node.log``)."""
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    stream = events_path.open("w") if events_path is not None else None
    quiet = logging.getLogger("p2pbackup")
    saved_level, saved_propagate = quiet.level, quiet.propagate
    # Hundreds of nodes log every round; the event log says what matters,
    # and node.log (warnings and worse) the rest.
    handler = logging.FileHandler(node_log if node_log is not None else work / "node.log")
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    quiet.addHandler(handler)
    quiet.setLevel(logging.WARNING)
    quiet.propagate = False
    try:
        events = EventLog(stream)
        world = World(scenario, work, events, progress=progress)
        with virtual_machine(scenario.seed, work):
            trio.run(world.run, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        quiet.removeHandler(handler)
        handler.close()
        quiet.setLevel(saved_level)
        quiet.propagate = saved_propagate
        if stream is not None:
            stream.close()
    figures = world.figures
    summary = {
        "scenario": scenario.name,
        "seed": scenario.seed,
        "nodes": len(world.machines),
        "virtual_days": scenario.days,
        "packs": world.packs,
        "packs_lost": world.packs_lost,
        "restore_exact": world.restore_exact,
        "repair_bytes": sum(sum(v) for v in figures.repair.values()),
        "audit_bytes": sum(sum(v) for v in figures.audit.values()),
        "worst_redundancy": min(
            (w for w in figures.worst_redundancy if w is not None), default=None
        ),
        "departed": sum(1 for m in world.machines if m.gone),
        "disqualified": sorted(world.disqualified),
        "node_failures": world.node_failures,
        "snapshots": world.snapshots,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    return Outcome(summary, figures)
