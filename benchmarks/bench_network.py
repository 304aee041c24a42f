"""Loopback throughput of the storage protocol, with and without the secure session.

One storage server runs in a process of its own on 127.0.0.1 (this script
started as ``--serve-mode MODE --root DIR``: the real ``StorageServer`` over a
real ``ShardHost`` in DIR). The benchmark process is the client: one
``RemoteShardStore`` with ``--concurrency`` connections and as many concurrent
requests. It **puts** ``--size-mb`` MiB of shards (1024 by default) and then
**gets** them all back, compared byte for byte with what was put. Each of the
two modes gets a fresh server and a fresh shard host:

* **secure** — as in production: the Noise XX handshake (``handle_connection``
  on the server, ``RemoteShardStore.open_channel`` on the client) and every
  byte encrypted and authenticated;
* **plain** — the same protocol on bare TCP: the client sends its node id (20
  bytes) and Ed25519 public key (32 bytes) in clear, and the server serves the
  session for that owner (``StorageServer.serve_session``) without a
  handshake. Owners still sign their puts; the server still checks every
  shard against its Merkle root. Only the session differs.

Nouns:

* **shard** — 3 MiB of random bytes plus a shard header's worth: what a
  12 MiB pack gives at 4-of-10. A pool of at most 32 distinct shards is
  cycled under distinct shard ids, so the client's memory stays small.
* **phase** — one direction (put or get) of one mode in one round: wall
  seconds from the client, CPU seconds (user + system) of the client process
  (``getrusage``) and of the server process (``/proc/PID/stat``), both over
  all their threads. MB/s = 10^6 bytes of shards moved / wall second.
* **round** — both modes once; rounds alternate which mode goes first, and
  the summary takes each phase's best round.
* **Merkle root cost** — ``RemoteShardStore.put`` computes the Merkle root of
  every shard (in a worker thread) before sending it; the CPU time of those
  calls is measured in the client (``time.thread_time`` around each) and
  reported apart.

The target (issue 3): the secure session costs at most 20 % of plain TCP's
throughput, i.e. secure MB/s ≥ 0.8 × plain MB/s, for puts and for gets.

Run from the repository::

    .venv/bin/python benchmarks/bench_network.py [--size-mb 1024] [--concurrency 4]
        [--rounds 2] [--workdir DIR] [--server-dir DIR]

The server's shards go to ``WORKDIR/network/server-MODE`` unless
``--server-dir`` (e.g. ``/dev/shm`` to keep the disk out of the figures); the
output names the file system. Gets read shards just written; a storage node
writes shards around the page cache (``durable.DirectWriter``), so on a disk
they are read back from the disk, in both modes alike. On ``/dev/shm``
(tmpfs) the shards live in memory: that measures the protocol alone.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import resource
import shutil
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

# The sibling benchmark scripts are modules of this directory.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_backup
import trio

from p2pbackup.core import crypto, formats, keys, merkle
from p2pbackup.engine.runtime import tune_process
from p2pbackup.model import NODE_ID_SIZE, BytesLike
from p2pbackup.net.network import Address, TcpNetwork
from p2pbackup.node.server import StorageServer
from p2pbackup.node.shardhost import ShardCharge, ShardHost
from p2pbackup.stores.remote import RemoteShardStore
from p2pbackup.wire.rpc import MessageChannel
from p2pbackup.wire.session import Identity

MiB = 1 << 20
MB = 1e6
#: A 12 MiB pack at 4-of-10: 3 MiB of data per shard, and the shard header.
SHARD_SIZE = 3 * MiB + formats.SHARD_HEADER_SIZE
#: Distinct random shards held by the client, cycled under distinct ids.
POOL_SHARDS = 32
MODES = ("plain", "secure")
DIRECTIONS = ("put", "get")
#: Issue 3: secure MB/s ≥ this × plain MB/s.
TARGET_RATIO = 0.8
#: What a plain client says before the protocol: its node id and signing key.
PREAMBLE_SIZE = NODE_ID_SIZE + crypto.PUBLIC_KEY_SIZE
LOOPBACK = Address("127.0.0.1", 0)


# -- the server (a child process) ---------------------------------------------------------


async def _receive_exactly(stream: trio.abc.Stream, size: int) -> bytes | None:
    buffer = bytearray()
    while len(buffer) < size:
        data = await stream.receive_some(size - len(buffer))
        if not data:
            return None
        buffer += data
    return bytes(buffer)


async def serve_plain(server: StorageServer, stream: trio.abc.Stream) -> None:
    """One plain-TCP connection: the peer names itself in clear, the benchmark vouches."""
    with trio.fail_after(server.limits.handshake):
        preamble = await _receive_exactly(stream, PREAMBLE_SIZE)
    if preamble is None:
        return
    owner, key = preamble[:NODE_ID_SIZE], preamble[NODE_ID_SIZE:]
    if keys.node_id_for(key) != owner:
        raise ValueError("plain preamble: the node id is not the one of the key that follows")
    await server.serve_session(stream, owner, key)


async def serve(mode: str, root: Path) -> None:
    """Serve ``root`` on 127.0.0.1 until SIGTERM; print the node id and the address."""
    identity = Identity.generate()
    host = await trio.to_thread.run_sync(ShardHost.open, root)
    try:
        server = StorageServer(host, identity)
        handler = (
            server.handle_connection if mode == "secure" else functools.partial(serve_plain, server)
        )
        async with trio.open_nursery() as nursery:
            address = await nursery.start(TcpNetwork().serve, LOOPBACK, handler)
            print(f"{bench_backup.NODE_PREFIX}{identity.node_id.hex()}", flush=True)
            print(f"{bench_backup.SERVING_PREFIX}{address}", flush=True)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _signal in signals:
                    nursery.cancel_scope.cancel()
                    break
    finally:
        host.close()


# -- the client ---------------------------------------------------------------------------


class PlainRemoteShardStore(RemoteShardStore):
    """The storage protocol's client on bare TCP, announcing its owner in clear."""

    async def open_channel(self) -> MessageChannel:
        stream = await self.network.connect(self.address)
        await stream.send_all(self.identity.node_id + self.identity.signing_public)
        return MessageChannel(stream)


class MerkleMeter:
    """CPU seconds spent in ``merkle.merkle_root`` while installed, over all threads."""

    def __init__(self) -> None:
        self.cpu_seconds = 0.0
        self.bytes = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        # RemoteShardStore.put looks merkle.merkle_root up on the module at each
        # call, so a wrapper there sees every root the client computes.
        original = merkle.merkle_root

        def timed(data: BytesLike, block_size: int) -> bytes:
            start = time.thread_time()
            try:
                return original(data, block_size)
            finally:
                spent = time.thread_time() - start
                with self._lock:
                    self.cpu_seconds += spent
                    self.bytes += len(data)

        merkle.merkle_root = timed
        try:
            yield
        finally:
            merkle.merkle_root = original


@dataclass
class Phase:
    mode: str
    direction: str
    round: int
    seconds: float
    client_cpu: float
    server_cpu: float
    data_bytes: int
    merkle_cpu: float = 0.0

    @property
    def mb_s(self) -> float:
        return self.data_bytes / MB / self.seconds if self.seconds > 0 else float("nan")


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def shard_id(index: int) -> bytes:
    return hashlib.blake2b(index.to_bytes(8, "big"), digest_size=32).digest()


async def _in_parallel(
    count: int, concurrency: int, work: Callable[[int], Awaitable[None]]
) -> None:
    """``await work(i)`` for every i < count, ``concurrency`` at a time."""
    indices = iter(range(count))

    async def worker() -> None:
        for index in indices:
            await work(index)

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)


async def run_client(
    mode: str,
    server: bench_backup.ServeProcess,
    pool: Sequence[bytes],
    count: int,
    concurrency: int,
    round_number: int,
) -> list[Phase]:
    """Put ``count`` shards, then get them back; the two phases."""
    store_class = RemoteShardStore if mode == "secure" else PlainRemoteShardStore
    store = store_class(
        TcpNetwork(),
        Identity.generate(),
        Address.parse(server.address),
        bytes.fromhex(server.node_id),
        connections=concurrency,
    )
    total = count * SHARD_SIZE
    phases: list[Phase] = []

    def phase(direction: str, start: tuple[float, float, float], merkle_cpu: float) -> None:
        end = (time.perf_counter(), _self_cpu(), server.cpu_seconds())
        seconds, client_cpu, server_cpu = (b - a for a, b in zip(start, end, strict=True))
        phases.append(
            Phase(mode, direction, round_number, seconds, client_cpu, server_cpu, total,
                  merkle_cpu)
        )  # fmt: skip

    async def put(index: int) -> None:
        await store.put(shard_id(index), pool[index % len(pool)])

    async def get(index: int) -> None:
        data = await store.get(shard_id(index))
        if data != pool[index % len(pool)]:
            raise AssertionError(f"{mode}: shard {index} came back different from what was put")

    try:
        meter = MerkleMeter()
        start = (time.perf_counter(), _self_cpu(), server.cpu_seconds())
        with meter.installed():
            await _in_parallel(count, concurrency, put)
        phase("put", start, meter.cpu_seconds)
        used = await store.usage()
        # The node charges each shard its disk blocks and metadata (shardhost).
        charged = sum(ShardCharge().of(len(pool[index % len(pool)])) for index in range(count))
        if used != charged:
            raise AssertionError(
                f"{mode}: the server charges {used} bytes after putting {total} "
                f"(expected {charged})"
            )
        start = (time.perf_counter(), _self_cpu(), server.cpu_seconds())
        await _in_parallel(count, concurrency, get)
        phase("get", start, 0.0)
    finally:
        await store.aclose()
    return phases


def measure_mode(
    mode: str,
    round_number: int,
    server_dir: Path,
    logs: Path,
    pool: Sequence[bytes],
    count: int,
    concurrency: int,
) -> tuple[list[Phase], list[str]]:
    """One mode against a fresh server process; its phases and the server's problems."""
    root = server_dir / f"server-{mode}"
    if root.exists():
        shutil.rmtree(root)
    name = f"server-{mode}-round{round_number}"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-mode", mode, "--root", str(root)]
    server = bench_backup.ServeProcess.start(cmd, logs, name)
    try:
        server.wait_serving()
        phases = trio.run(run_client, mode, server, pool, count, concurrency, round_number)
    finally:
        problems = server.stop()
        shutil.rmtree(root, ignore_errors=True)
    return phases, problems


# -- report -------------------------------------------------------------------------------


def best(phases: Sequence[Phase], mode: str, direction: str) -> Phase | None:
    mine = [p for p in phases if p.mode == mode and p.direction == direction]
    return max(mine, key=lambda p: p.mb_s) if mine else None


def phase_table(phases: Sequence[Phase]) -> str:
    head = (
        f"{'round':>5}  {'mode':<7}{'dir':<5}{'s':>8}{'MB/s':>9}"
        f"{'client CPU s':>14}{'server CPU s':>14}{'CPU s/GB':>10}"
    )
    lines = [head, "-" * len(head)]
    for p in phases:
        per_gb = (p.client_cpu + p.server_cpu) / (p.data_bytes / 1e9)
        lines.append(
            f"{p.round:>5}  {p.mode:<7}{p.direction:<5}{p.seconds:>8.2f}{p.mb_s:>9.1f}"
            f"{p.client_cpu:>14.2f}{p.server_cpu:>14.2f}{per_gb:>10.2f}"
        )
    return "\n".join(lines)


def summary_rows(phases: Sequence[Phase]) -> list[dict[str, object]]:
    """Per direction: the best plain and secure phases and their ratio."""
    rows: list[dict[str, object]] = []
    for direction in DIRECTIONS:
        plain, secure = (best(phases, mode, direction) for mode in MODES)
        if plain is None or secure is None:
            continue
        rows.append(
            {"direction": direction, "plain": plain, "secure": secure,
             "ratio": secure.mb_s / plain.mb_s if plain.mb_s > 0 else float("nan")}
        )  # fmt: skip
    return rows


def summary_table(rows: Sequence[dict[str, object]]) -> str:
    head = (
        f"{'':<5}|{'plain TCP':^32}|{'secure session':^32}| {'secure/plain':>12}\n"
        f"{'dir':<5}|{'MB/s':>8}{'client CPU':>12}{'server CPU':>12}|"
        f"{'MB/s':>8}{'client CPU':>12}{'server CPU':>12}| {'MB/s':>12}"
    )
    lines = [head, "-" * len(head.splitlines()[1])]
    for row in rows:
        cells = []
        for mode in MODES:
            p = row[mode]
            assert isinstance(p, Phase)
            cells.append(f"{p.mb_s:>8.1f}{p.client_cpu:>11.2f}s{p.server_cpu:>11.2f}s")
        ratio = row["ratio"]
        assert isinstance(ratio, float)
        lines.append(f"{row['direction']:<5}|{cells[0]}|{cells[1]}| {ratio:>11.2f}x")
    return "\n".join(lines)


def target_lines(rows: Sequence[dict[str, object]]) -> list[str]:
    lines = []
    for row in rows:
        ratio = row["ratio"]
        assert isinstance(ratio, float)
        verdict = "PASS" if ratio >= TARGET_RATIO else "MISS"
        lines.append(
            f"  {row['direction']:<4} secure ≥ {TARGET_RATIO:.1f}× plain TCP (session costs "
            f"≤ {1 - TARGET_RATIO:.0%}): {ratio:.2f}× (costs {1 - ratio:.0%})  {verdict}"
        )
    return lines


def merkle_lines(phases: Sequence[Phase]) -> list[str]:
    lines = []
    for mode in MODES:
        p = best(phases, mode, "put")
        if p is None or p.merkle_cpu <= 0:
            continue
        lines.append(
            f"  {mode:<7}put: {p.merkle_cpu:.2f} CPU s for {p.data_bytes / MB:.0f} MB "
            f"({p.data_bytes / MB / p.merkle_cpu:.0f} MB/s per core), "
            f"{p.merkle_cpu / p.client_cpu:.0%} of the client's CPU, "
            f"{p.merkle_cpu / p.seconds:.2f} cores on average"
        )
    return lines


def _filesystem(path: Path) -> str:
    """The file system type and mount point holding ``path``, from /proc/mounts."""
    found, target = "?", path.resolve()
    with contextlib.suppress(OSError):
        longest = -1
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) < 3:
                continue
            mount = Path(fields[1])
            if (target == mount or mount in target.parents) and len(fields[1]) > longest:
                longest, found = len(fields[1]), f"{fields[2]} at {fields[1]}"
    return found


# -- main ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, *, prefix: str = "") -> None:
    """The benchmark's options; bench_all passes ``prefix="network-"`` for its own."""
    parser.add_argument(
        f"--{prefix}size-mb", type=float, default=1024, help="MiB of shards to put and get (1024)"
    )
    parser.add_argument(
        f"--{prefix}concurrency", type=int, default=4, help="connections and requests (4)"
    )
    parser.add_argument(
        f"--{prefix}rounds", type=int, default=2, help="rounds of both modes, best of (2)"
    )
    parser.add_argument(
        f"--{prefix}server-dir",
        type=Path,
        help="where the server keeps its shards (default WORKDIR/network)",
    )


def run(
    workdir: Path,
    size_mb: float,
    concurrency: int,
    rounds: int,
    server_dir: Path | None = None,
) -> tuple[int, list[dict[str, object]]]:
    """The whole benchmark; (exit code, summary rows). 0 when every phase ran and checked."""
    tune_process()
    base = workdir.resolve() / "network"
    logs = base / "logs"
    if logs.exists():
        shutil.rmtree(logs)
    logs.mkdir(parents=True)
    server_dir = (server_dir or base).resolve()
    server_dir.mkdir(parents=True, exist_ok=True)
    count = max(1, round(size_mb * MiB / SHARD_SIZE))
    total = count * SHARD_SIZE

    print("p2pbackup storage protocol on loopback (benchmarks/bench_network.py)")
    for line in bench_backup.machine_lines():
        print(line)
    print(
        f"load:    {count} shards of {SHARD_SIZE} bytes ({total / MB:.1f} MB), "
        f"{min(count, POOL_SHARDS)} distinct, {concurrency} connections and requests at once"
    )
    print(f"server:  one process per mode; shards in {server_dir} ({_filesystem(server_dir)})")
    print(f"rounds:  {rounds}, alternating which mode goes first; the summary takes the best")
    pool = [os.urandom(SHARD_SIZE) for _ in range(min(count, POOL_SHARDS))]

    phases: list[Phase] = []
    failures: list[str] = []
    for round_number in range(1, rounds + 1):
        order = MODES if round_number % 2 else MODES[::-1]
        for mode in order:
            print(f"\n== round {round_number}: {mode} ==", flush=True)
            try:
                mine, problems = measure_mode(
                    mode, round_number, server_dir, logs, pool, count, concurrency
                )
            except Exception as exc:
                # Any failure is reported, never dropped: the summary needs both modes.
                failures.append(f"round {round_number}, {mode}: {type(exc).__name__}: {exc}")
                print(f"FAILED: {failures[-1]}")
                continue
            failures.extend(problems)
            phases.extend(mine)
            for p in mine:
                print(
                    f"  {p.direction}: {p.seconds:.2f} s, {p.mb_s:.1f} MB/s, client CPU "
                    f"{p.client_cpu:.2f} s, server CPU {p.server_cpu:.2f} s",
                    flush=True,
                )

    rows = summary_rows(phases)
    print("\n== results ==")
    print(
        f"{total / MB:.1f} MB of {SHARD_SIZE / MiB:.2f} MiB shards each way; MB = 10^6 bytes; "
        "MB/s = bytes / wall s; CPU = user + system s of the whole process"
    )
    print("\nevery phase:")
    print(phase_table(phases))
    print(f"\nbest of {rounds} round(s), secure session against plain TCP:")
    print(summary_table(rows))
    print("\nclient Merkle roots (RemoteShardStore.put hashes every shard before sending it):")
    for line in merkle_lines(phases) or ["  not measured"]:
        print(line)
    print("\ntargets:")
    for line in target_lines(rows) or ["  no figures: a mode failed"]:
        print(line)
    if failures:
        print("\nFAILURES:")
        for failure in failures:
            print("  " + failure.replace("\n", "\n  "))
    results_path = base / "last-results.json"
    results_path.write_text(
        json.dumps(
            {
                "machine": bench_backup.machine_lines(),
                "shards": count,
                "shard_size": SHARD_SIZE,
                "concurrency": concurrency,
                "server_dir": str(server_dir),
                "phases": [{**asdict(p), "mb_s": p.mb_s} for p in phases],
                "failures": failures,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\n(results also in {results_path}; server logs in {logs})")
    return (1 if failures else 0), rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=bench_backup.DEFAULT_WORKDIR,
        help=f"(default {bench_backup.DEFAULT_WORKDIR})",
    )
    add_arguments(parser)
    # The server's entry point: this script in a child process.
    parser.add_argument("--serve-mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_mode is not None:
        if args.root is None:
            parser.error("--serve-mode needs --root")
        tune_process()
        trio.run(serve, args.serve_mode, args.root)
        return 0
    code, _rows = run(args.workdir, args.size_mb, args.concurrency, args.rounds, args.server_dir)
    return code


if __name__ == "__main__":
    sys.exit(main())
