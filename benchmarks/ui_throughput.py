"""What the dashboard costs a backup's throughput: the same backup with and without it.

Each **measurement** builds everything afresh under WORKDIR: ``--peers``
storage nodes (``p2pbackup serve --listen 127.0.0.1:0 --open --no-ui``, each
with its own home) and a home at ``--shards`` (4 peers at 2-of-4 by default)
that has them as peers and runs its own ``p2pbackup serve --listen
127.0.0.1:0``, in one of two **modes**:

* **no-ui** — ``serve --no-ui``;
* **ui** — the dashboard on (on a port the system picks, as with ``--listen
  …:0``), and a **tab** polling it as a browser tab with the dashboard open
  would, from threads of this process: the overview page with its script
  and style sheet once, then ``GET /api/status`` every ``--poll-every``
  seconds (2), the overview and the peers pages every 10 s, and one
  ``/api/events`` stream read for as long as the backup runs. Every answer
  must be 200, or the run fails.

After ``--settle`` seconds (5; the tab already polling), ``p2pbackup --home
HOME backup DATA`` runs as a process: the command
hands the backup to the home's daemon over its control socket (the run
fails if the socket is missing), so the backup runs in the same process as
the dashboard. DATA is ``--size-mb`` MiB of random bytes in 64 MiB files,
made once and the same for every measurement; each home is fresh, so
nothing is deduplicated. MiB/s = DATA's bytes (2^20) / the command's wall
seconds. Printed beside: the CPU seconds during the backup of the daemon
(all threads and its sealer processes, ``/proc/PID/stat``), of the peers,
and of other programs (the machine's busy seconds from ``/proc/stat`` less
those, the command's and this process's: on 2 cores, another program's
work slows a backup visibly).

Rounds alternate the modes (no-ui, ui, no-ui, ui, …: ``--rounds`` of each),
so that drift of this machine (its disk after heavy writing, other
programs) falls on both alike; the summary is each mode's median MiB/s,
the median (and range) of each round's ui / no-ui, and, last, the ratio of
the two medians (1.00: the dashboard costs nothing).

Run from the repository::

    .venv/bin/python benchmarks/ui_throughput.py [--size-mb 512] [--rounds 6]
        [--peers 4] [--shards 2/4] [--poll-every 2] [--settle 5] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import re
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

# The sibling benchmark scripts are modules of this directory.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_backup
from bench_backup import (
    ServeProcess,
    StepFailed,
    machine_busy_seconds,
    p2pbackup_command,
    process_cpu_seconds,
    run_quiet,
)

from p2pbackup.app.home import Home
from p2pbackup.cli import main as cli_main
from p2pbackup.ui.access import load_token, read_address

MODES = ("no-ui", "ui")
SNAPSHOT_ID = re.compile(r"[0-9a-f]{64}")
MIB = 1 << 20
#: DATA is cut into files of this size (the last one smaller).
FILE_SIZE = 64 * MIB
#: Seconds between the overview's and the peers page's reloads in the tab.
PAGES_EVERY = 10.0


@dataclass
class Measurement:
    mode: str
    round: int
    seconds: float
    daemon_cpu: float
    peers_cpu: float
    #: CPU seconds of other programs on this machine during the backup.
    other_cpu: float
    size: int
    #: Requests the tab made (ui mode): status polls, pages, events received.
    requests: dict[str, int] = field(default_factory=dict)

    @property
    def mib_s(self) -> float:
        return self.size / MIB / self.seconds


def make_data(root: Path, size_mb: int) -> Path:
    """``size_mb`` MiB of random bytes under ``root/data`` (kept while its size matches)."""
    data = root / "data"
    stamp = data / ".size"
    if stamp.exists() and stamp.read_text() == str(size_mb):
        return data
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    left, number = size_mb * MIB, 0
    with open("/dev/urandom", "rb") as random:
        while left > 0:
            part = min(left, FILE_SIZE)
            with open(data / f"random-{number:03d}.bin", "wb") as out:
                for _ in range(part // MIB):
                    out.write(random.read(MIB))
                out.write(random.read(part % MIB))
            left, number = left - part, number + 1
    stamp.write_text(str(size_mb))
    return data


# -- the browser tab ------------------------------------------------------------------


class Tab:
    """A browser tab with the dashboard open (module docstring), in threads."""

    def __init__(self, url: str, token: str, poll_every: float) -> None:
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None, url
        self.host, self.port = parts.hostname, parts.port
        self.headers = {"X-P2PBackup-Token": token}
        self.poll_every = poll_every
        self.counts = {"status": 0, "pages": 0, "events": 0}
        self.problems: list[str] = []
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.events_connection: http.client.HTTPConnection | None = None

    def get(self, connection: http.client.HTTPConnection, path: str) -> bytes:
        connection.request("GET", path, headers=self.headers)
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise StepFailed(f"the dashboard answered {response.status} to GET {path}: {body!r}")
        return body

    def start(self) -> None:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
        for path in ("/", "/static/app.js", "/static/style.css"):
            self.get(connection, path)
        self.counts["pages"] += 1
        connection.close()
        for target in (self._poll, self._listen):
            thread = threading.Thread(target=self._guarded(target), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _guarded(self, target: object) -> object:
        def run() -> None:
            try:
                target()  # type: ignore[operator]
            except Exception as problem:  # reported by stop(), which fails the run
                if not self.stopping.is_set():
                    self.problems.append(f"{type(problem).__name__}: {problem}")

        return run

    def _poll(self) -> None:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
        next_pages = time.monotonic() + PAGES_EVERY
        while not self.stopping.wait(self.poll_every):
            self.get(connection, "/api/status")
            self.counts["status"] += 1
            if time.monotonic() >= next_pages:
                next_pages += PAGES_EVERY
                for path in ("/", "/peers"):
                    self.get(connection, path)
                self.counts["pages"] += 1
        connection.close()

    def _listen(self) -> None:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=None)
        self.events_connection = connection
        connection.request("GET", "/api/events", headers=self.headers)
        response = connection.getresponse()
        if response.status != 200:
            raise StepFailed(f"the dashboard answered {response.status} to /api/events")
        while not self.stopping.is_set():
            line = response.fp.readline()
            if not line:
                if not self.stopping.is_set():
                    raise StepFailed("the dashboard closed the event stream")
                return
            if line.startswith(b"data:"):
                self.counts["events"] += 1

    def stop(self) -> None:
        self.stopping.set()
        if self.events_connection is not None and self.events_connection.sock is not None:
            with contextlib.suppress(OSError):
                self.events_connection.sock.shutdown(2)
        for thread in self.threads:
            thread.join(30)
        if self.problems:
            raise StepFailed("the dashboard tab failed: " + "; ".join(self.problems))


# -- one measurement ------------------------------------------------------------------


def setup(*argv: str) -> None:
    """Run a command that sets up a home in this process (quicker than a process
    of its own; what is measured always runs as a process)."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cli_main.main(list(argv))
    if code != 0:
        raise StepFailed(f"`p2pbackup {' '.join(argv)}` exited {code}: {err.getvalue().strip()}")


@contextlib.contextmanager
def started(processes: list[ServeProcess]) -> Iterator[None]:
    """Stop ``processes`` on the way out; fail on what they logged."""
    try:
        yield
    finally:
        problems = [problem for process in processes for problem in process.stop()]
    if problems:
        raise StepFailed("; ".join(problems))


def measure(
    base: Path, data: Path, size: int, mode: str, number: int, args: argparse.Namespace
) -> Measurement:
    logs = base / "logs"
    cli = p2pbackup_command()
    peers: list[ServeProcess] = []
    homes = []
    for i in range(args.peers):
        setup("--home", str(base / f"peer-{i}"), "init", "--recovery-key-file", f"{base}/{i}.key")
        homes.append([*cli, "--home", str(base / f"peer-{i}")])
    processes: list[ServeProcess] = []
    with started(processes):
        for i, peer in enumerate(homes):
            serve = [*peer, "serve", "--listen", "127.0.0.1:0", "--open", "--no-ui"]
            processes.append(ServeProcess.start(serve, logs, f"peer-{i}"))
            peers.append(processes[-1])
        for peer_process in peers:
            peer_process.wait_serving()
        home_path = base / "home"
        home = [*cli, "--home", str(home_path)]
        setup("--home", str(home_path), "init", "--shards", args.shards,
              "--recovery-key-file", str(base / "home.key"))  # fmt: skip
        for peer_process in peers:
            setup("--home", str(home_path), "peer", "add", peer_process.address,
                  peer_process.node_id)  # fmt: skip
        serve = [*home, "serve", "--listen", "127.0.0.1:0"]
        if mode == "no-ui":
            serve.append("--no-ui")
        daemon = ServeProcess.start(serve, logs, "home", kind="home daemon")
        processes.append(daemon)
        daemon.wait_serving()
        if not Home(home_path).control_path.exists():
            raise StepFailed(f"the home's daemon has no control socket ({daemon.err_path})")
        tab = None
        if mode == "ui":
            url = read_address(home_path)
            if url is None:
                raise StepFailed(f"the home's dashboard did not start ({daemon.err_path})")
            tab = Tab(url, load_token(home_path), args.poll_every)
            tab.start()
        time.sleep(args.settle)
        probe = cpu_now(daemon, peers)
        began = time.perf_counter()
        out = run_quiet([*home, "backup", str(data)])
        seconds = time.perf_counter() - began
        cpu, peers_cpu, other = (b - a for a, b in zip(probe, cpu_now(daemon, peers), strict=True))
        requests = {}
        if tab is not None:
            tab.stop()
            requests = dict(tab.counts)
        if not SNAPSHOT_ID.fullmatch(out.strip().splitlines()[-1] if out.strip() else ""):
            raise StepFailed(f"the backup printed no snapshot id:\n{out}")
    return Measurement(mode, number, seconds, cpu, peers_cpu, other, size, requests)


def cpu_now(daemon: ServeProcess, peers: list[ServeProcess]) -> tuple[float, float, float]:
    """CPU seconds so far of the daemon, of the peers, and of the rest of the machine
    (its busy seconds less theirs, the finished commands' and this process's own:
    the tab's requests)."""
    mine = resource.getrusage(resource.RUSAGE_SELF)
    done = resource.getrusage(resource.RUSAGE_CHILDREN)
    daemon_cpu = process_cpu_seconds(daemon.process.pid)
    peers_cpu = sum(process_cpu_seconds(peer.process.pid) for peer in peers)
    own = mine.ru_utime + mine.ru_stime + done.ru_utime + done.ru_stime
    busy, _steal = machine_busy_seconds()
    return daemon_cpu, peers_cpu, busy - daemon_cpu - peers_cpu - own


def run(args: argparse.Namespace) -> int:
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="bench-ui-"))).absolute()
    work.mkdir(parents=True, exist_ok=True)
    for line in bench_backup.machine_lines():
        print(line)
    print(
        f"{args.size_mb} MiB of random data, {args.peers} storage nodes at {args.shards}, "
        f"{args.rounds} round(s) of each mode; the tab polls /api/status every "
        f"{args.poll_every:g} s; workdir {work}",
        flush=True,
    )
    data = make_data(work, args.size_mb)
    size = sum(path.stat().st_size for path in data.glob("*.bin"))
    results: dict[str, list[Measurement]] = {mode: [] for mode in MODES}
    try:
        for number in range(1, args.rounds + 1):
            for mode in MODES:
                base = work / f"round-{number}-{mode}"
                shutil.rmtree(base, ignore_errors=True)
                m = measure(base, data, size, mode, number, args)
                results[mode].append(m)
                tab = (
                    f"; tab: {m.requests['status']} status polls, {m.requests['pages']} page "
                    f"loads, {m.requests['events']} events"
                    if m.requests
                    else ""
                )
                print(
                    f"round {number} {mode:>5}: {m.seconds:7.2f} s  {m.mib_s:7.2f} MiB/s  "
                    f"CPU s: daemon {m.daemon_cpu:6.2f}, peers {m.peers_cpu:6.2f}, "
                    f"other programs {m.other_cpu:5.2f}{tab}",
                    flush=True,
                )
                if not args.keep:
                    shutil.rmtree(base, ignore_errors=True)
    except StepFailed as failure:
        print(f"FAILED: {failure}", file=sys.stderr)
        return 1
    medians = {mode: statistics.median(m.mib_s for m in results[mode]) for mode in MODES}
    cpus = {mode: statistics.median(m.daemon_cpu for m in results[mode]) for mode in MODES}
    for mode in MODES:
        print(
            f"median {mode:>5}: {medians[mode]:7.2f} MiB/s  (daemon CPU {cpus[mode]:.2f} s; "
            f"all: {', '.join(f'{m.mib_s:.2f}' for m in results[mode])})"
        )
    pairs = sorted(b.mib_s / a.mib_s for a, b in zip(results["no-ui"], results["ui"], strict=True))
    print(
        f"each round's ui/no-ui: median {statistics.median(pairs):.3f} "
        f"(from {pairs[0]:.3f} to {pairs[-1]:.3f})"
    )
    print(f"ratio ui/no-ui: {medians['ui'] / medians['no-ui']:.3f}")
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=512, help="MiB of data backed up")
    parser.add_argument("--rounds", type=int, default=6, help="measurements of each mode")
    parser.add_argument("--peers", type=int, default=4, help="storage nodes")
    parser.add_argument("--shards", default="2/4", help="the home's code, K/N")
    parser.add_argument("--poll-every", type=float, default=2.0, help="seconds between polls")
    parser.add_argument(
        "--settle", type=float, default=5.0, help="seconds between the start and the backup"
    )
    parser.add_argument("--workdir", type=Path, help="default: a new temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep every home and node")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: the homes' processes are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda _signal, _frame: sys.exit(143))
    if args.size_mb < 1 or args.rounds < 1:
        parser.error("--size-mb and --rounds must be at least 1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
