"""Whole-system benchmark: p2pbackup against restic on the same corpus, same run.

On the deterministic corpus of ``benchmarks/make_corpus.py`` (1024 MiB, seed
1 by default) it measures, for p2pbackup with 10 local folder peers at
4-of-10:

* **initial backup** of the corpus;
* **incremental backup** after ``make_corpus.py --mutate 2``;
* **full restore** of the latest snapshot into an empty directory (checked
  byte for byte, mode and mtime against the source);
* and **warm**, the page cache left as the step before left it: a backup
  with nothing changed straight after the incremental one, and the full
  restore again into a second empty directory straight after the first;

and the same steps for restic to a local repository when ``restic`` is on
PATH, with the ratio of the two throughputs. Then the peak memory of backing
up one big random file (2048 MiB by default; the target is < 300 MB).

With ``--peers nodes`` the 10 peers are storage nodes instead of folders:
10 ``p2pbackup serve --listen 127.0.0.1:0`` processes, each with its own home
under WORKDIR, started before the first step and stopped (SIGTERM) after the
restore, and added with ``peer add``. The CPU seconds of the 10 nodes during
each step (summed, from ``/proc/PID/stat`` before and after) are reported
beside the client's. Logs and results then go to ``logs-nodes/`` and
``last-results-nodes.json``, so that a folder run's stay.

With ``--peers devnet`` p2pbackup runs as a user of ``p2pbackup devnet``
does: a devnet of 11 befriended homes (:func:`p2pbackup.app.devnet.open_devnet`,
every home at 4-of-10) in a child process of this script
(``--devnet-serve DIR``), started before the first step and stopped after
the restore. Every step is ``p2pbackup --home node-01 …``, which hands the
command to node-01's daemon over its control socket: the backup and the
restore run in that daemon, and its 10 friends hold the shards. The client
process does little, so each step's CPU is the client's plus the daemon's
(from ``/proc/PID/stat``), its peak RSS the daemon's during the step (its
``VmHWM``, reset before the step through ``/proc/PID/clear_refs``), and the
10 other nodes' CPU is reported beside. Logs and results go to
``logs-devnet/`` and ``last-results-devnet.json``.

Every measured step is one child process: wall seconds, CPU seconds
(user + system) and peak RSS come from ``os.wait4`` on that child alone.
MB/s is 10^6 bytes of corpus per wall second (for the incremental backup:
the whole corpus after mutation, as restic reports it); peak RSS is in MB
(10^6 bytes). The page cache is dropped before each step but the warm ones
when the process may (root); the output says whether it was.

Run from the repository::

    .venv/bin/python benchmarks/bench_backup.py [--workdir DIR] [--size-mb 1024] [--seed 1]
        [--skip-restic] [--big-file-mb 2048] [--skip-big-file] [--peers dirs|nodes|devnet]
        [--keep]

The corpus is generated once into ``WORKDIR/corpus-<size>MiB-seed<seed>`` (with
a stamp file beside it, which names the generator by a digest of its source)
and reused while it matches the stamp; every run works on a fresh copy of it,
so reruns are deterministic. Everything else under
WORKDIR is rebuilt each run and removed afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = REPO / "bench-work"
DEFAULT_CORPUS_SCRIPT = REPO / "benchmarks" / "make_corpus.py"
MiB = 1 << 20
MB = 1e6
PEERS = 10
SHARDS = "4/10"
RESTIC_PASSWORD = "p2pbackup-benchmark-password\n"
STAMP_VERSION = 1

#: Steps measured with the page cache as the step before left it (each
#: straight after that step, before the other tool's next step drops the
#: cache): a backup with nothing changed since the incremental one, and the
#: full restore again into a second directory. They have no targets; they
#: say what a warm cache does to each tool.
UNCHANGED_STEP = "unchanged backup, warm"
WARM_RESTORE_STEP = "full restore, warm"
#: The targets the project set (p2pbackup MB/s ≥ factor × restic MB/s): at
#: least restic's speed where the work is the same.
TARGET_RATIOS = {"initial backup": 1.0, "incremental backup": 1.0, "full restore": 1.0}
#: Into storage nodes (or a devnet) every shard also crosses a Noise
#: session: the initial backup's target is lower there.
TARGET_RATIOS_OVER_NODES = {**TARGET_RATIOS, "initial backup": 0.75}
TARGET_RSS_MB = 300.0
#: What the details keep of ``p2pbackup backup --json`` and ``restic backup --json``.
P2P_SUMMARY_KEYS = ("bytes_read", "bytes_new", "bytes_stored", "packs_written", "k", "n",
                    "files_new", "files_changed", "files_unchanged")  # fmt: skip
RESTIC_SUMMARY_KEYS = ("data_added", "files_new", "files_changed", "files_unmodified",
                       "total_bytes_processed")  # fmt: skip
#: Details that are byte counts, shown in MB.
BYTE_KEYS = {"bytes_read", "bytes_new", "bytes_stored", "data_added", "total_bytes_processed"}
#: The detail with the storage nodes' CPU seconds during a step (peers "nodes").
NODES_CPU_KEY = "nodes_cpu_seconds"
#: Details of a devnet step: the client's own CPU and peak RSS, and the CPU of
#: the daemon that ran the command (the measurement's CPU is the two summed,
#: its peak RSS the daemon's).
CLIENT_CPU_KEY = "client_cpu_seconds"
CLIENT_RSS_KEY = "client_peak_rss_mb"
DAEMON_CPU_KEY = "daemon_cpu_seconds"
#: CPU seconds the machine spent during a step outside the measured tool and
#: its peers (from /proc/stat): another program's work, which slows the step.
OTHER_CPU_KEY = "other_cpu_seconds"
#: CPU seconds the hypervisor gave to someone else while this machine's CPUs
#: had work (steal time, from /proc/stat): a shared host slowing the step.
STEAL_CPU_KEY = "steal_cpu_seconds"
#: The devnet daemon's RSS when a step began (what it kept from earlier steps).
DAEMON_RSS_BEFORE_KEY = "daemon_rss_before_mb"
#: For a restic step beside running peers: their CPU meanwhile (idle upkeep).
IDLE_PEERS_CPU_KEY = "idle_peers_cpu_seconds"
PEER_KINDS = ("dirs", "nodes", "devnet")
#: A devnet home's friends are the other nodes: 11 nodes give node-01 its 10 peers.
DEVNET_NODES = PEERS + 1
#: The line the devnet child prints, with a JSON list of its nodes, once they run.
DEVNET_READY = "devnet ready "


class StepFailed(Exception):
    """A measured command exited non-zero."""


@dataclass
class Measurement:
    tool: str
    step: str
    seconds: float
    cpu_seconds: float
    peak_rss_mb: float
    data_bytes: int  # the bytes MB/s is computed on
    returncode: int
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def mb_s(self) -> float:
        return self.data_bytes / MB / self.seconds if self.seconds > 0 else float("nan")


# -- environment -----------------------------------------------------------------------


def _read(cmd: Sequence[str]) -> str:
    try:
        return subprocess.run(
            cmd, capture_output=True, text=True, check=True, cwd=REPO
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def machine_lines() -> list[str]:
    from p2pbackup import __version__

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        f"date:    {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
        f"commit:  {_read(['git', 'rev-parse', '--short', 'HEAD'])}{_dirty()} "
        f"(p2pbackup {__version__}, sources {source_fingerprint()})",
        f"machine: {usable} CPUs usable ({os.cpu_count()} online), {cpu_model()}",
        f"         {platform.system()} {platform.release()}, "
        f"{_mem_total_gb():.1f} GB RAM, load average {_loadavg()}",
        f"python:  {platform.python_version()} ({sys.executable})",
    ]
    return lines


def _dirty() -> str:
    # --no-optional-locks: read only, never refresh the index.
    status = _read(["git", "--no-optional-locks", "status", "--porcelain", "--", "p2pbackup"])
    changed = [line for line in status.splitlines() if line.strip()] if status != "?" else []
    return f" + {len(changed)} uncommitted file(s) in p2pbackup/" if changed else ""


def source_fingerprint() -> str:
    """A short hash of the p2pbackup sources, to notice them changing during a run."""
    digest = hashlib.sha256()
    package = REPO / "p2pbackup"
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0")
        with contextlib.suppress(OSError):
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _mem_total_gb() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _self_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


def restic_binary() -> str | None:
    return shutil.which("restic")


def p2pbackup_command() -> list[str]:
    script = Path(sys.executable).parent / "p2pbackup"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "p2pbackup.cli"]


def compile_bytecode(package: Path = REPO / "p2pbackup") -> str:
    """Compile ``package``'s modules to bytecode, as installing a wheel does;
    a line for the header saying so.

    An editable install writes bytecode at a module's first import, unless
    ``PYTHONDONTWRITEBYTECODE`` is set (as on the project's machine): then
    every measured step would compile some 200 modules from source at its
    start: work the installed program does not do, and a restic binary has
    no counterpart of (its cost: docs/performance.md, "Bytecode")."""
    import compileall

    if compileall.compile_dir(package, quiet=1):
        return "bytecode: compiled before the run, as a wheel's install does"
    return "bytecode: some modules did not compile; those steps compile them as they start"


def drop_caches() -> bool:
    """Write back and drop the page cache; False when not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


# -- processes -------------------------------------------------------------------------


def time_binary() -> str | None:
    """GNU time, to read a child's rusage from a small process rather than from us."""
    path = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    if path is None:
        return None
    probe = subprocess.run([path, "-f", "%M", "true"], capture_output=True, text=True)
    return path if probe.returncode == 0 and probe.stderr.strip().isdigit() else None


#: Set by :func:`run` from :func:`time_binary`.
TIME_BINARY: str | None = None


def run_measured(
    cmd: Sequence[str],
    logs: Path,
    name: str,
    *,
    env: dict[str, str] | None = None,
    allowed: Sequence[int] = (0,),
) -> tuple[float, float, float, int, str]:
    """Run ``cmd``; (wall s, CPU s, peak RSS MB, exit code, stdout) of that child alone.

    stdout and stderr go to ``logs/NAME.out`` and ``logs/NAME.err``.

    Linux starts a child's peak RSS at its parent's RSS at the fork (the
    high-water mark of the address space that exec replaces), so a child
    forked from this Python process would report at least our own RSS. The
    child is therefore started by GNU time, a process of about 1 MB, which
    reads its rusage; only without GNU time is ``os.wait4`` used here, and
    the figure then includes this process's RSS (said in the output).
    """
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logs / f"{name}.out", logs / f"{name}.err"
    rusage_path = logs / f"{name}.rusage"
    wrapped = list(cmd)
    if TIME_BINARY is not None:
        wrapped = [TIME_BINARY, "-o", str(rusage_path), "-f", "%U %S %M", *cmd]
    with out_path.open("wb") as out, err_path.open("wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(wrapped, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        _pid, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    # ru_maxrss and %M are in KiB on Linux.
    cpu, rss_kib = usage.ru_utime + usage.ru_stime, usage.ru_maxrss
    if TIME_BINARY is not None:
        # The last line; a line before it says "Command exited with non-zero status N".
        last = rusage_path.read_text().strip().splitlines()[-1].split()
        cpu, rss_kib = float(last[0]) + float(last[1]), int(last[2])
    stdout = out_path.read_text(errors="replace")
    if code not in allowed:
        tail = err_path.read_text(errors="replace").strip().splitlines()[-15:]
        raise StepFailed(
            f"`{' '.join(cmd)}` exited {code}; stderr ({err_path}):\n  " + "\n  ".join(tail)
        )
    return seconds, cpu, rss_kib * 1024 / MB, code, stdout


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process, all its threads, and
    the children it has waited for (a backup's sealer processes), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # utime, stime, cutime and cstime are fields 14-17 of proc(5), counted
    # from the pid.
    return sum(int(field) for field in fields[11:15]) / os.sysconf("SC_CLK_TCK")


SERVING_PREFIX = "serving on "
NODE_PREFIX = "node "


@dataclass
class ServeProcess:
    """A storage node in a process of its own, one that prints ``node HEX`` and
    then ``serving on HOST:PORT`` once it listens (``p2pbackup serve`` and the
    server of ``bench_network.py``), and stops on SIGTERM."""

    name: str
    process: subprocess.Popen[bytes]
    out_path: Path
    err_path: Path
    address: str = ""
    node_id: str = ""
    stopped: bool = False
    #: What the process is, in messages.
    kind: str = "storage node"

    @classmethod
    def start(
        cls, cmd: Sequence[str], logs: Path, name: str, kind: str = "storage node"
    ) -> ServeProcess:
        """Start ``cmd``; its output goes to ``logs/NAME.out`` and ``.err`` (a file,
        never a pipe: nobody reads a pipe while the node runs, and a full one blocks it)."""
        logs.mkdir(parents=True, exist_ok=True)
        out_path, err_path = logs / f"{name}.out", logs / f"{name}.err"
        with out_path.open("wb") as out, err_path.open("wb") as err:
            process = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        return cls(name, process, out_path, err_path, kind=kind)

    def wait_serving(self, timeout: float = 60.0) -> None:
        """Wait for the ``serving on`` line; StepFailed if the node exits or takes too long."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.out_path.read_text(errors="replace").splitlines():
                if line.startswith(NODE_PREFIX):
                    self.node_id = line.removeprefix(NODE_PREFIX).strip()
                if line.startswith(SERVING_PREFIX):
                    self.address = line.removeprefix(SERVING_PREFIX).strip()
            if self.address and self.node_id:
                return
            code = self.process.poll()
            if code is not None or time.monotonic() > deadline:
                why = f"exited {code}" if code is not None else f"not listening after {timeout:g} s"
                self.stop()
                tail = self.err_path.read_text(errors="replace").strip().splitlines()[-15:]
                raise StepFailed(
                    f"{self.kind} {self.name} {why}; stderr ({self.err_path}):\n  "
                    + "\n  ".join(tail)
                )
            time.sleep(0.02)

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.process.pid)

    def stop(self) -> list[str]:
        """SIGTERM and wait (SIGKILL after 30 s); what went wrong, if anything.

        Idempotent: only the first call reports.
        """
        if self.stopped:
            return []
        self.stopped = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return [f"{self.kind} {self.name} ignored SIGTERM for 30 s and was killed"]
        problems = []
        if code != 0:
            problems.append(f"{self.kind} {self.name} exited {code} (see {self.err_path})")
        if "Traceback" in self.err_path.read_text(errors="replace"):
            problems.append(f"{self.kind} {self.name} logged a traceback (see {self.err_path})")
        return problems


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, steal): CPU seconds the whole machine has spent busy, all CPUs
    (user, nice, system, irq, softirq from /proc/stat), and stolen by the
    hypervisor; NaN if unknown.

    A process's own CPU time (``/proc/PID/stat``, rusage) is measured
    precisely and includes time stolen while it ran, /proc/stat counts
    ticks: the two agree within a few per cent once steal is added.
    """
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[1:9])
    except (OSError, ValueError, IndexError):
        return float("nan"), float("nan")
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def process_rss_mb(pid: int) -> float:
    """The RSS (``VmRSS``) of a running process now, MB; NaN if unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / MB
    return float("nan")


def process_peak_rss_mb(pid: int) -> float:
    """The peak RSS (``VmHWM``) of a running process, MB; NaN if unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MB
    return float("nan")


def reset_peak_rss(pid: int) -> bool:
    """Start a running process's ``VmHWM`` again from its RSS now (Linux ≥ 4.0;
    the process's owner or root); False when not possible."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5\n")
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class DevnetNodeInfo:
    """One node of the devnet child, as it reported it."""

    name: str
    home: str
    pid: int
    address: str


@dataclass
class DevnetProcess:
    """A devnet of :data:`DEVNET_NODES` homes run by a child process of this
    script (``--devnet-serve ROOT``, see :func:`serve_devnet`); node 0 is the
    home the benchmark backs up from, the others its friends."""

    root: Path
    child: ServeProcess
    logs: Path
    label: str
    nodes: list[DevnetNodeInfo] = field(default_factory=list)
    #: False when the daemon's peak RSS could not be reset (not root, old kernel).
    peak_resettable: bool = True

    @classmethod
    def start(cls, root: Path, logs: Path, label: str = "") -> DevnetProcess:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--devnet-serve", str(root)]
        child = ServeProcess.start(cmd, logs, f"{label}devnet", kind="devnet")
        return cls(root, child, logs, label)

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Wait for the ready line; StepFailed if the devnet exits or takes too long."""
        deadline = time.monotonic() + timeout
        while not self.nodes:
            for line in self.child.out_path.read_text(errors="replace").splitlines():
                if line.startswith(DEVNET_READY):
                    listed = json.loads(line.removeprefix(DEVNET_READY))
                    self.nodes = [DevnetNodeInfo(**node) for node in listed]
            if self.nodes:
                break
            code = self.child.process.poll()
            if code is not None or time.monotonic() > deadline:
                why = f"exited {code}" if code is not None else f"not ready after {timeout:g} s"
                self.child.stop()
                tail = self.child.err_path.read_text(errors="replace").strip().splitlines()[-15:]
                raise StepFailed(
                    f"devnet {why}; stderr ({self.child.err_path}):\n  " + "\n  ".join(tail)
                )
            time.sleep(0.1)
        control = Path(self.daemon.home) / "control.sock"
        if not control.exists():
            self.stop()
            raise StepFailed(
                f"{self.daemon.name}'s daemon has no control socket at {control}: "
                "the CLI would not reach it"
            )

    @property
    def daemon(self) -> DevnetNodeInfo:
        """The node whose home the benchmark uses: its daemon runs every step."""
        return self.nodes[0]

    def daemon_cpu(self) -> float:
        return self._cpu(self.daemon)

    def others_cpu(self) -> float:
        """CPU seconds of the other nodes and of the devnet process itself."""
        return sum(self._cpu(node) for node in self.nodes[1:]) + self.child.cpu_seconds()

    def _cpu(self, node: DevnetNodeInfo) -> float:
        try:
            return process_cpu_seconds(node.pid)
        except OSError:
            # The devnet reaps a node that dies: its /proc entry is gone.
            raise StepFailed(
                f"devnet node {node.name} (pid {node.pid}) is gone; its log is "
                f"{self.root / node.name}.log"
            ) from None

    def reset_daemon_peak(self) -> None:
        self.peak_resettable = reset_peak_rss(self.daemon.pid) and self.peak_resettable

    def daemon_peak_rss_mb(self) -> float:
        return process_peak_rss_mb(self.daemon.pid)

    def daemon_rss_mb(self) -> float:
        return process_rss_mb(self.daemon.pid)

    def hosted_bytes(self) -> int:
        """Disk space of the shards the other nodes hold."""
        return sum(_disk_usage(Path(node.home) / "hosted") for node in self.nodes[1:])

    def stop(self) -> list[str]:
        """Stop the devnet (SIGTERM: it stops its nodes); what went wrong, if anything.

        The nodes' logs are copied to ``logs/LABELdevnet-node-NN.log``.
        """
        problems = self.child.stop()
        for log in sorted(self.root.glob("node-*.log")):
            copy = self.logs / f"{self.label}devnet-{log.name}"
            with contextlib.suppress(OSError):
                shutil.copyfile(log, copy)
                if "Traceback" in copy.read_text(errors="replace"):
                    problems.append(f"devnet {log.stem} logged a traceback (see {copy})")
        return problems


async def serve_devnet(root: Path, count: int = DEVNET_NODES) -> int:
    """The devnet child: ``count`` befriended homes at 4-of-10 under ``root``,
    as ``p2pbackup devnet`` starts them, until SIGTERM or SIGINT.

    ``p2pbackup devnet`` gives its homes the default code (3-of-6) and has no
    option for another; :func:`~p2pbackup.app.devnet.open_devnet` takes a config.
    Prints :data:`DEVNET_READY` and a JSON list of the nodes once they run.
    """
    import trio

    from p2pbackup.app import operations
    from p2pbackup.app.devnet import open_devnet

    k, n = operations.parse_shards(SHARDS)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_devnet(root, count, config=operations.default_config(k, n)) as devnet:
            for warning in devnet.warnings:
                print(f"warning: {warning}", flush=True)
            nodes = [
                asdict(DevnetNodeInfo(node.name, str(node.home.path), node.pid, node.address))
                for node in devnet.nodes
            ]
            print(DEVNET_READY + json.dumps(nodes), flush=True)
            async for _signum in signals:
                print("stopping", flush=True)
                break
    bad = [
        f"{node.name} exited {devnet.returncode(index)}"
        for index, node in enumerate(devnet.nodes)
        if devnet.returncode(index) != 0
    ]
    for line in bad:
        print(f"devnet: {line}", file=sys.stderr, flush=True)
    print("stopped", flush=True)
    return 1 if bad else 0


def run_quiet(cmd: Sequence[str], *, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise StepFailed(
            f"`{' '.join(cmd)}` exited {result.returncode}:\n{result.stderr.strip()[-2000:]}"
        )
    return result.stdout


# -- corpus ----------------------------------------------------------------------------


def tree_size(root: Path) -> tuple[int, int]:
    """(regular files, bytes) under ``root``."""
    files = size = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            if not os.path.islink(os.path.join(dirpath, name)):
                files += 1
                size += st.st_size
    return files, size


def ensure_corpus(workdir: Path, script: Path, size_mb: float, seed: int) -> Path:
    """``WORKDIR/corpus-<size>MiB-seed<seed>``, generated unless its stamp matches."""
    name = f"corpus-{size_mb:g}MiB-seed{seed}"
    corpus, stamp_path = workdir / name, workdir / f"{name}.stamp"
    # The generator's digest: a corpus made by another generator, or another
    # version of it, is made again.
    generator = hashlib.sha256(script.read_bytes()).hexdigest()[:16]
    wanted = {"version": STAMP_VERSION, "size_mb": size_mb, "seed": seed, "generator": generator}
    if corpus.is_dir() and stamp_path.exists():
        with contextlib.suppress(ValueError, OSError):
            stamp = json.loads(stamp_path.read_text())
            if {k: stamp.get(k) for k in wanted} == wanted:
                files, size = tree_size(corpus)
                if (files, size) == (stamp.get("files"), stamp.get("bytes")):
                    print(f"corpus: reusing {corpus} ({files} files, {size / MB:.1f} MB)")
                    return corpus
    print(f"corpus: generating {corpus} ({size_mb:g} MiB, seed {seed}) with {script}")
    stamp_path.unlink(missing_ok=True)
    if corpus.exists():
        shutil.rmtree(corpus)
    out = run_quiet([sys.executable, str(script), str(corpus), "--size-mb", f"{size_mb:g}",
                     "--seed", str(seed)])  # fmt: skip
    print("  " + out.strip())
    files, size = tree_size(corpus)
    stamp_path.write_text(json.dumps({**wanted, "files": files, "bytes": size}) + "\n")
    return corpus


def fresh_copy(corpus: Path, run: Path) -> None:
    """A copy of the pristine corpus at ``run`` (modes and mtimes kept; no hard links)."""
    if run.exists():
        shutil.rmtree(run)
    subprocess.run(["cp", "-a", str(corpus), str(run)], check=True)


def mutate(script: Path, run: Path, seed: int, percent: float = 2) -> dict[str, Any]:
    out = run_quiet([sys.executable, str(script), str(run), "--mutate", f"{percent:g}",
                     "--seed", str(seed)]).strip()  # fmt: skip
    details: dict[str, Any] = {"mutation": out.split(": ", 1)[-1].split(" seed=")[0]}
    for word in out.split():
        if word.startswith("new_bytes="):
            details["mutated_new_bytes"] = int(word.split("=", 1)[1])
    return details


def verify(source: Path, restored: Path) -> list[str]:
    """Differences between ``source`` and its restored copy (content, mode, file mtimes)."""
    from p2pbackup.engine.treediff import diff_trees

    if not restored.is_dir():
        return [f"missing: {restored} (nothing restored there)"]
    return diff_trees(source, restored, check_dir_mtime=False)


def restored_path(target: Path, source: Path) -> Path:
    # Both tools restore under TARGET with the full absolute source path.
    return target / os.path.abspath(source).lstrip("/")


# -- the tools -------------------------------------------------------------------------


@dataclass
class Context:
    workdir: Path
    script: Path
    seed: int
    logs: Path
    keep: bool = False
    #: "dirs": folder peers; "nodes": `p2pbackup serve` processes on 127.0.0.1.
    peers: str = "dirs"
    caches_dropped: list[bool] = field(default_factory=list)
    #: The storage nodes running now (peers "nodes"), and what went wrong with any.
    nodes: list[ServeProcess] = field(default_factory=list)
    node_problems: list[str] = field(default_factory=list)
    #: The devnet running now (peers "devnet").
    devnet: DevnetProcess | None = None
    #: Whether the devnet daemon's peak RSS could be reset before every step.
    daemon_peak_reset: list[bool] = field(default_factory=list)

    def cold(self) -> None:
        self.caches_dropped.append(drop_caches())

    def nodes_cpu(self) -> float:
        """CPU seconds of the running storage nodes (devnet: all but the daemon), summed."""
        total = sum(node.cpu_seconds() for node in self.nodes)
        return total + (self.devnet.others_cpu() if self.devnet is not None else 0.0)

    def stop_nodes(self) -> None:
        """SIGTERM the storage nodes or the devnet and wait for them; idempotent."""
        nodes, self.nodes = self.nodes, []
        for node in nodes:
            self.node_problems.extend(node.stop())
        devnet, self.devnet = self.devnet, None
        if devnet is not None:
            self.daemon_peak_reset.append(devnet.peak_resettable)
            self.node_problems.extend(devnet.stop())

    def begin_step(self, *, cold: bool = True) -> StepProbe:
        """Before a step: drop the page cache (unless the step is a warm
        one), read the peers' CPU and reset the devnet daemon's peak RSS."""
        if cold:
            self.cold()
        daemon_cpu, daemon_rss = 0.0, float("nan")
        if self.devnet is not None:
            self.devnet.reset_daemon_peak()
            daemon_cpu, daemon_rss = self.devnet.daemon_cpu(), self.devnet.daemon_rss_mb()
        busy, steal = machine_busy_seconds()
        return StepProbe(self.nodes_cpu(), daemon_cpu, busy, steal, daemon_rss)

    def end_step(
        self, probe: StepProbe, cpu: float, rss: float, *, peers_of_tool: bool = True
    ) -> tuple[float, float, dict[str, float]]:
        """After a step: (CPU s, peak RSS MB, details) of the tool doing it.

        With folders, the client's own; with storage nodes, the same and the
        nodes' CPU as a detail; in a devnet, where the client hands the
        command to the daemon, CPU is the client's plus the daemon's and peak
        RSS the daemon's, the client's kept as details. ``peers_of_tool``
        False (restic's steps, which run while the peers idle): the peers'
        CPU is only a detail. Every step has the machine's other CPU.
        """
        busy, steal = machine_busy_seconds()
        busy, steal = busy - probe.busy, steal - probe.steal
        peers = self.nodes_cpu() - probe.nodes_cpu
        daemon = self.devnet.daemon_cpu() - probe.daemon_cpu if self.devnet is not None else 0.0
        # Processes' CPU is measured precisely, /proc/stat counts ticks: a
        # small negative remainder is noise.
        other = round(max(0.0, busy + steal - cpu - peers - daemon), 2)
        details: dict[str, float] = {}
        if not peers_of_tool:
            if self.nodes or self.devnet is not None:
                details[IDLE_PEERS_CPU_KEY] = round(peers + daemon, 2)
        elif self.nodes or self.devnet is not None:
            details[NODES_CPU_KEY] = round(peers, 2)
        if self.devnet is not None and peers_of_tool:
            details.update(
                {CLIENT_CPU_KEY: round(cpu, 2), CLIENT_RSS_KEY: round(rss, 1),
                 DAEMON_CPU_KEY: round(daemon, 2),
                 DAEMON_RSS_BEFORE_KEY: round(probe.daemon_rss_mb, 1)}
            )  # fmt: skip
            cpu, rss = cpu + daemon, self.devnet.daemon_peak_rss_mb()
        details[OTHER_CPU_KEY] = other
        details[STEAL_CPU_KEY] = round(steal, 2)
        return cpu, rss, details

    def peers_disk_bytes(self, base: Path) -> int:
        if self.devnet is not None:
            return self.devnet.hosted_bytes()
        return _disk_usage(base / "peers")

    def discard(self, *paths: Path) -> None:
        """Free the disk space of a finished part, unless --keep."""
        if not self.keep:
            for path in paths:
                shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class StepProbe:
    """What :meth:`Context.begin_step` read before a step."""

    nodes_cpu: float
    daemon_cpu: float
    #: :func:`machine_busy_seconds` before the step.
    busy: float
    steal: float
    #: The devnet daemon's RSS before the step (NaN without a devnet).
    daemon_rss_mb: float


def _clean(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def p2p_home(ctx: Context, base: Path, label: str = "") -> list[str]:
    """A fresh home with 10 peers at 4-of-10; the command prefix to use it.

    The peers are folders under ``base/peers``, or with ``ctx.peers == "nodes"``
    storage nodes started now (see :func:`start_nodes`; ``label`` starts the
    names of their logs). With ``ctx.peers == "devnet"``, a devnet started now
    under ``base/devnet``: the home is its first node's, served by its daemon.
    """
    if ctx.peers == "devnet":
        ctx.devnet = DevnetProcess.start(base / "devnet", ctx.logs, label)
        ctx.devnet.wait_ready()
        return [*p2pbackup_command(), "--home", ctx.devnet.daemon.home]
    home, peers = base / "home", base / "peers"
    cmd = [*p2pbackup_command(), "--home", str(home)]
    run_quiet([*cmd, "init", "--shards", SHARDS, "--recovery-key-file", str(base / "key.txt")])
    if ctx.peers == "nodes":
        start_nodes(ctx, peers, label)
        for node in ctx.nodes:
            run_quiet([*cmd, "peer", "add", node.address, node.node_id])
        return cmd
    for i in range(PEERS):
        peer = peers / f"peer-{i:02d}"
        peer.mkdir(parents=True)
        run_quiet([*cmd, "peer", "add-dir", str(peer)])
    return cmd


def start_nodes(ctx: Context, root: Path, label: str = "") -> None:
    """Start 10 ``p2pbackup serve --listen 127.0.0.1:0`` processes into ``ctx.nodes``.

    Each has its own home ``root/node-NN`` (its shards under ``hosted/``) and
    its output in ``logs/LABELnode-NN.out|err``. They are started together and
    waited for together, so their start-up overlaps.
    """
    homes = []
    for i in range(PEERS):
        home = root / f"node-{i:02d}"
        cmd = [*p2pbackup_command(), "--home", str(home)]
        run_quiet([*cmd, "init", "--recovery-key-file", str(root / f"node-{i:02d}.key")])
        homes.append((cmd, run_quiet([*cmd, "id"]).strip().splitlines()[-1]))
    for i, (cmd, _node_id) in enumerate(homes):
        serve = [*cmd, "serve", "--listen", "127.0.0.1:0", "--open"]
        ctx.nodes.append(ServeProcess.start(serve, ctx.logs, f"{label}node-{i:02d}"))
    for node, (_cmd, node_id) in zip(ctx.nodes, homes, strict=True):
        node.wait_serving()
        if node.node_id != node_id:
            raise StepFailed(
                f"storage node {node.name} serves as {node.node_id}, but `id` said {node_id}"
            )


def _json_tail(stdout: str) -> dict[str, Any]:
    """The JSON document printed by ``p2pbackup … --json``."""
    start = stdout.find("{")
    if start < 0:
        return {}
    try:
        value = json.loads(stdout[start:])
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _disk_usage(path: Path) -> int:
    total = 0
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def check_code(summary: dict[str, Any]) -> None:
    """StepFailed unless a backup that wrote packs coded them at :data:`SHARDS`."""
    if summary.get("packs_written") and f"{summary.get('k')}/{summary.get('n')}" != SHARDS:
        raise StepFailed(
            f"p2pbackup coded its packs {summary.get('k')}-of-{summary.get('n')}, not "
            f"{SHARDS.replace('/', '-of-')}: the benchmark would not compare what it says"
        )


def measure_restore(
    ctx: Context,
    tool: str,
    step: str,
    name: str,
    command: list[str],
    run: Path,
    target: Path,
    *,
    cold: bool,
    env: dict[str, str] | None = None,
    allowed: Sequence[int] = (0,),
) -> Measurement:
    """One restore of ``run``'s latest snapshot into ``target`` by ``command``,
    verified against ``run``; ``cold``: the page cache dropped first."""
    _files, size = tree_size(run)
    probe = ctx.begin_step(cold=cold)
    seconds, cpu, rss, code, _out = run_measured(command, ctx.logs, name, env=env, allowed=allowed)
    # Restic's steps run while p2pbackup's peers (if any) idle.
    cpu, rss, details = ctx.end_step(probe, cpu, rss, peers_of_tool=tool == "p2pbackup")
    problems = verify(run, restored_path(target, run))
    if code != 0:
        problems.insert(0, f"{tool} restore exited {code} (see {ctx.logs}/{name}.*)")
    return Measurement(
        tool, step, seconds, cpu, rss, size, code,
        {"verified": not problems, "problems": problems[:20],
         "problem_count": len(problems), **details},
    )  # fmt: skip


def bench_p2pbackup(ctx: Context, corpus: Path, results: list[Measurement]) -> Iterator[None]:
    """The steps for p2pbackup, yielding after each (see :func:`interleave`)."""
    base = _clean(ctx.workdir / "p2pbackup")
    run = ctx.workdir / "corpus-run-p2pbackup"
    fresh_copy(corpus, run)
    cmd = p2p_home(ctx, base)
    source = os.path.abspath(run)

    def backup(step: str, name: str, extra: dict[str, Any], *, cold: bool = True) -> None:
        _files, size = tree_size(run)
        probe = ctx.begin_step(cold=cold)
        seconds, cpu, rss, code, out = run_measured(
            [*cmd, "backup", source, "--json"], ctx.logs, name
        )
        cpu, rss, peers_details = ctx.end_step(probe, cpu, rss)
        summary = _json_tail(out)
        check_code(summary)
        details = {
            **extra,
            **{k: summary[k] for k in P2P_SUMMARY_KEYS if k in summary},
            **peers_details,
        }
        results.append(Measurement("p2pbackup", step, seconds, cpu, rss, size, code, details))

    def restore(step: str, name: str, target: Path, *, cold: bool = True) -> Measurement:
        command = [*cmd, "restore", "latest", "--target", str(target), "--json"]
        # Exit 3: some files could not be restored; verify() names them.
        measured = measure_restore(ctx, "p2pbackup", step, name, command, run, target,
                                   cold=cold, allowed=(0, 3))  # fmt: skip
        results.append(measured)
        return measured

    backup("initial backup", "p2p-backup-initial", {})
    yield
    backup("incremental backup", "p2p-backup-incremental", mutate(ctx.script, run, ctx.seed))
    # At once, before the other tool's next step drops the page cache.
    backup(UNCHANGED_STEP, "p2p-backup-unchanged", {}, cold=False)
    yield

    cold = restore("full restore", "p2p-restore", base / "restore")
    warm = restore(WARM_RESTORE_STEP, "p2p-restore-warm", base / "restore-warm", cold=False)
    cold.details["peers_disk_bytes"] = ctx.peers_disk_bytes(base)
    ctx.stop_nodes()
    if cold.details["verified"] and warm.details["verified"]:
        ctx.discard(base, run)
    yield


def restic_env(base: Path) -> dict[str, str]:
    password = base / "password.txt"
    password.write_text(RESTIC_PASSWORD)
    password.chmod(0o600)
    env = dict(os.environ)
    env.pop("RESTIC_PASSWORD", None)
    env.update(
        RESTIC_PASSWORD_FILE=str(password),
        RESTIC_REPOSITORY=str(base / "repo"),
        RESTIC_CACHE_DIR=str(base / "cache"),
        # Same processor count for both tools; restic would use them all anyway.
        GOMAXPROCS=env.get("GOMAXPROCS", str(len(os.sched_getaffinity(0)))),
    )
    return env


def _restic_summary(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        with contextlib.suppress(ValueError):
            message = json.loads(line)
            if isinstance(message, dict) and message.get("message_type") == "summary":
                return message
    return {}


def bench_restic(
    ctx: Context, corpus: Path, restic: str, results: list[Measurement]
) -> Iterator[None]:
    """The steps for restic, yielding after each (see :func:`interleave`)."""
    base = _clean(ctx.workdir / "restic")
    run = ctx.workdir / "corpus-run-restic"
    fresh_copy(corpus, run)
    env = restic_env(base)
    run_quiet([restic, "init"], env=env)
    with contextlib.suppress(StepFailed, ValueError):
        version = json.loads(run_quiet([restic, "cat", "config"], env=env)).get("version")
        print(f"restic repository format {version} (format 2 compresses with zstd, mode 'auto')")
    source = os.path.abspath(run)

    def backup(step: str, name: str, extra: dict[str, Any], *, cold: bool = True) -> None:
        _files, size = tree_size(run)
        probe = ctx.begin_step(cold=cold)
        seconds, cpu, rss, code, out = run_measured(
            [restic, "backup", "--json", source], ctx.logs, name, env=env
        )
        cpu, rss, other = ctx.end_step(probe, cpu, rss, peers_of_tool=False)
        summary = _restic_summary(out)
        details = {
            **extra,
            **{k: summary[k] for k in RESTIC_SUMMARY_KEYS if k in summary},
            **other,
        }
        results.append(Measurement("restic", step, seconds, cpu, rss, size, code, details))

    def restore(step: str, name: str, target: Path, *, cold: bool = True) -> Measurement:
        command = [restic, "restore", "latest", "--target", str(target)]
        measured = measure_restore(ctx, "restic", step, name, command, run, target,
                                   cold=cold, env=env)  # fmt: skip
        results.append(measured)
        return measured

    backup("initial backup", "restic-backup-initial", {})
    yield
    backup("incremental backup", "restic-backup-incremental", mutate(ctx.script, run, ctx.seed))
    backup(UNCHANGED_STEP, "restic-backup-unchanged", {}, cold=False)
    yield

    cold = restore("full restore", "restic-restore", base / "restore")
    warm = restore(WARM_RESTORE_STEP, "restic-restore-warm", base / "restore-warm", cold=False)
    cold.details["repo_disk_bytes"] = _disk_usage(base / "repo")
    if cold.details["verified"] and warm.details["verified"]:
        ctx.discard(base, run)
    yield


def interleave(*tools: Iterator[None]) -> None:
    """Run the tools' steps alternately: p2pbackup's initial backup, restic's,
    p2pbackup's incremental, restic's, and so on.

    This machine's disk slows down after heavy writing and recovers with
    time, so running one tool's three steps and then the other's made each
    step meet different conditions (a restore right after writing 2 GB of
    shards ran ~25 % slower). Alternating puts both tools' same step under
    the same conditions.
    """
    active = list(tools)
    while active:
        for tool in list(active):
            try:
                next(tool)
            except StopIteration:
                active.remove(tool)


def make_big_file(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    piece = 64 * MiB
    with path.open("wb") as f:
        remaining = size
        while remaining:
            n = min(piece, remaining)
            f.write(os.urandom(n))
            remaining -= n


def bench_big_file(ctx: Context, size_mb: int, restic: str | None) -> list[Measurement]:
    base = ctx.workdir / "bigfile"
    big = base / "input" / "big.bin"
    make_big_file(big, size_mb * MiB)
    size = big.stat().st_size
    results: list[Measurement] = []

    p2p = _clean(base / "p2pbackup")
    cmd = p2p_home(ctx, p2p, "bigfile-")
    probe = ctx.begin_step()
    try:
        seconds, cpu, rss, code, out = run_measured(
            [*cmd, "backup", str(big.resolve()), "--json"], ctx.logs, "p2p-backup-bigfile"
        )
        cpu, rss, peers_details = ctx.end_step(probe, cpu, rss)
    finally:
        ctx.stop_nodes()
    summary = _json_tail(out)
    check_code(summary)
    results.append(
        Measurement("p2pbackup", f"backup one {size_mb} MiB file", seconds, cpu, rss, size, code,
                    {**{k: summary[k] for k in ("bytes_stored", "packs_written") if k in summary},
                     **peers_details})
    )  # fmt: skip
    ctx.discard(p2p)

    if restic:
        rbase = _clean(base / "restic")
        env = restic_env(rbase)
        run_quiet([restic, "init"], env=env)
        probe = ctx.begin_step()
        seconds, cpu, rss, code, _out = run_measured(
            [restic, "backup", str(big.resolve())], ctx.logs, "restic-backup-bigfile", env=env
        )
        cpu, rss, other = ctx.end_step(probe, cpu, rss, peers_of_tool=False)
        results.append(
            Measurement("restic", f"backup one {size_mb} MiB file", seconds, cpu, rss, size, code,
                        other)
        )  # fmt: skip
        ctx.discard(rbase)
    return results


# -- report ----------------------------------------------------------------------------


def _cell(m: Measurement | None) -> str:
    if m is None:
        return f"{'-':>8}{'-':>9}{'-':>9}"
    return f"{m.seconds:>8.1f}{m.mb_s:>9.1f}{m.peak_rss_mb:>9.0f}"


def comparison_table(ours: list[Measurement], theirs: list[Measurement]) -> str:
    by_step = {m.step: m for m in theirs}
    head = (
        f"{'step':<26}|{'p2pbackup':^26}|{'restic':^26}| {'ratio':>6}\n"
        f"{'':<26}|{'s':>8}{'MB/s':>9}{'RSS MB':>9}|{'s':>8}{'MB/s':>9}{'RSS MB':>9}|"
        f" {'MB/s':>6}"
    )
    lines = [head, "-" * len(head.splitlines()[1])]
    for m in ours:
        other = by_step.get(m.step)
        ratio = f"{m.mb_s / other.mb_s:.2f}x" if other and other.mb_s > 0 else "-"
        lines.append(f"{m.step:<26}|{_cell(m)}|{_cell(other)}| {ratio:>6}")
    return "\n".join(lines)


def detail_lines(results: list[Measurement]) -> list[str]:
    lines = []
    for m in results:
        parts = [f"{m.tool} {m.step}: {m.seconds:.2f} s wall, {m.cpu_seconds:.2f} s CPU "
                 f"({m.cpu_seconds / m.seconds:.2f} cores), peak RSS {m.peak_rss_mb:.0f} MB, "
                 f"{m.data_bytes / MB:.1f} MB"]  # fmt: skip
        for key, value in m.details.items():
            if key in ("problems",):
                continue
            if isinstance(value, int) and (key in BYTE_KEYS or key.endswith("_bytes")):
                value = f"{value / MB:.1f} MB"
            parts.append(f"{key}={value}")
        lines.append("  " + "; ".join(str(p) for p in parts))
        for problem in m.details.get("problems", [])[:10]:
            lines.append(f"    ! {problem}")
    return lines


def nodes_cpu_lines(results: list[Measurement]) -> list[str]:
    lines = []
    for m in results:
        nodes = m.details.get(NODES_CPU_KEY)
        if not isinstance(nodes, float):
            continue
        total = m.cpu_seconds + nodes
        lines.append(
            f"  {m.step:<26} nodes {nodes:7.2f} s, client {m.cpu_seconds:7.2f} s, together "
            f"{total:7.2f} s ({total / m.seconds:.2f} cores)"
        )
    return lines


def devnet_cpu_lines(results: list[Measurement]) -> list[str]:
    lines = []
    for m in results:
        daemon, nodes = m.details.get(DAEMON_CPU_KEY), m.details.get(NODES_CPU_KEY)
        client = m.details.get(CLIENT_CPU_KEY)
        if not (isinstance(daemon, float) and isinstance(nodes, float)):
            continue
        total = m.cpu_seconds + nodes
        lines.append(
            f"  {m.step:<26} client {client:6.2f} s, daemon {daemon:7.2f} s, other nodes "
            f"{nodes:6.2f} s, together {total:7.2f} s ({total / m.seconds:.2f} cores); "
            f"daemon peak RSS {m.peak_rss_mb:.0f} MB ({m.details.get(DAEMON_RSS_BEFORE_KEY)} MB "
            f"at the start), client {m.details.get(CLIENT_RSS_KEY)} MB"
        )
    return lines


#: Other programs' average CPU use during a step (cores) above which the
#: step counts as disturbed: on 2 cores, a fifth of one is already felt.
DISTURBED_CORES = 0.2


def disturbance_lines(results: list[Measurement]) -> list[str]:
    """Other programs' CPU during each step, and a warning for a disturbed one."""
    lines = []
    for m in results:
        other, steal = m.details.get(OTHER_CPU_KEY), m.details.get(STEAL_CPU_KEY, 0.0)
        if not isinstance(other, float) or not isinstance(steal, float) or m.seconds <= 0:
            continue
        cores = (other + steal) / m.seconds
        flag = "  DISTURBED" if cores > DISTURBED_CORES else ""
        lines.append(
            f"  {m.tool:<9} {m.step:<26} {other:6.2f} s, stolen {steal:5.2f} s "
            f"({cores:.2f} cores){flag}"
        )
    return lines


def targets_lines(
    ours: list[Measurement],
    theirs: list[Measurement],
    big: list[Measurement],
    *,
    over_nodes: bool = False,
) -> list[str]:
    """Each target, met or not; ``over_nodes``: p2pbackup's peers were
    storage nodes (or a devnet), not folders."""
    lines = []
    by_step = {m.step: m for m in theirs}
    targets = TARGET_RATIOS_OVER_NODES if over_nodes else TARGET_RATIOS
    for m in ours:
        factor = targets.get(m.step)
        other = by_step.get(m.step)
        if factor is not None and other is not None:
            ratio = m.mb_s / other.mb_s
            verdict = "PASS" if ratio >= factor else "MISS"
            lines.append(f"  {m.step:<26} ≥ {factor:.2f}× restic: {ratio:.2f}×  {verdict}")
    for m in [*ours, *big]:
        if m.tool != "p2pbackup":
            continue
        verdict = "PASS" if m.peak_rss_mb < TARGET_RSS_MB else "MISS"
        lines.append(
            f"  {m.step:<26} RSS < {TARGET_RSS_MB:.0f} MB: {m.peak_rss_mb:.0f} MB  {verdict}"
        )
    return lines


# -- main ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir", type=Path, default=DEFAULT_WORKDIR, help=f"(default {DEFAULT_WORKDIR})"
    )
    parser.add_argument("--size-mb", type=float, default=1024, help="corpus MiB (1024)")
    parser.add_argument("--seed", type=int, default=1, help="corpus seed (1)")
    parser.add_argument("--skip-restic", action="store_true", help="do not run restic")
    parser.add_argument(
        "--big-file-mb", type=int, default=2048, help="size of the single big file, MiB (2048)"
    )
    parser.add_argument("--skip-big-file", action="store_true")
    parser.add_argument(
        "--corpus-script",
        type=Path,
        default=DEFAULT_CORPUS_SCRIPT,
        help=f"the corpus generator (default {DEFAULT_CORPUS_SCRIPT})",
    )
    parser.add_argument(
        "--peers",
        choices=PEER_KINDS,
        default="dirs",
        help="p2pbackup's 10 peers: local folders (dirs, the default), storage nodes, "
        "each a `p2pbackup serve` process on 127.0.0.1 (nodes), or the 10 friends of "
        f"node-01 in a devnet of {DEVNET_NODES} homes, every step run by node-01's daemon "
        "(devnet)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep homes, peers, repositories and restores"
    )


@contextlib.contextmanager
def _section(title: str) -> Iterator[None]:
    print(f"\n== {title} ==", flush=True)
    start = time.perf_counter()
    yield
    print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)


def run(args: argparse.Namespace) -> int:
    """The whole benchmark; 0 when every step ran and every restore verified."""
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    script: Path = args.corpus_script.resolve()
    if not script.exists():
        sys.exit(f"bench_backup: no corpus script at {script} (use --corpus-script)")
    restic = None if args.skip_restic else restic_binary()
    global TIME_BINARY
    TIME_BINARY = time_binary()
    # A run with storage nodes keeps its logs and results apart, so that
    # bench_all can run both kinds of peers and keep both.
    suffix = "" if args.peers == "dirs" else f"-{args.peers}"
    ctx = Context(
        workdir, script, args.seed, workdir / f"logs{suffix}", keep=args.keep, peers=args.peers
    )
    _clean(ctx.logs)

    print("p2pbackup whole-system benchmark (benchmarks/bench_backup.py)")
    for line in machine_lines():
        print(line)
    if restic:
        print(f"restic:  {_read([restic, 'version'])}")
    else:
        why = "--skip-restic" if args.skip_restic else "not installed"
        print(f"restic:  skipped ({why})")
    print(f"workdir: {workdir}")
    shards = SHARDS.replace("/", "-of-")
    if ctx.peers == "nodes":
        print(f"setup:   {PEERS} storage nodes on 127.0.0.1 (one `p2pbackup serve` process "
              f"each, started before and stopped after), {shards} shards")  # fmt: skip
    elif ctx.peers == "devnet":
        print(f"setup:   a devnet of {DEVNET_NODES} befriended homes on 127.0.0.1 (open_devnet, "
              f"each a `p2pbackup serve` process; started before and stopped after), "
              f"{shards} shards; `p2pbackup --home node-01 …` runs in node-01's daemon, "
              f"its {PEERS} friends hold the shards")  # fmt: skip
    else:
        print(f"setup:   {PEERS} local folder peers, {shards} shards")
    print(f"rusage:  {'GNU time ' + TIME_BINARY if TIME_BINARY else 'os.wait4 (inflated RSS)'}")
    print(compile_bytecode())

    fingerprint = source_fingerprint()
    failures: list[str] = []
    ours: list[Measurement] = []
    theirs: list[Measurement] = []
    big: list[Measurement] = []
    with _section("corpus"):
        corpus = ensure_corpus(workdir, script, args.size_mb, args.seed)
    title = "initial backup, incremental backup, full restore"
    if restic:
        title += ", alternating with restic step by step"
    with _section(f"p2pbackup: {title}"):
        tools = [bench_p2pbackup(ctx, corpus, ours)]
        if restic:
            tools.append(bench_restic(ctx, corpus, restic, theirs))
        try:
            interleave(*tools)
        except StepFailed as exc:
            failures.append(str(exc))
            print(f"FAILED: {exc}")
        finally:
            ctx.stop_nodes()
    if not args.skip_big_file:
        with _section(f"one {args.big_file_mb} MiB random file"):
            try:
                big = bench_big_file(ctx, args.big_file_mb, restic)
            except StepFailed as exc:
                failures.append(f"big file: {exc}")
                print(f"FAILED: {exc}")
            finally:
                ctx.stop_nodes()
    failures.extend(ctx.node_problems)

    dropped = ctx.caches_dropped
    print("\n== results ==")
    files, size = tree_size(corpus)
    print(
        f"corpus: {files} files, {size / MB:.1f} MB (size {args.size_mb:g} MiB, seed {args.seed}), "
        f"mutated with --mutate 2 before the incremental backup"
    )
    if dropped and all(dropped):
        print(
            "page cache: dropped before every measured step (cold reads) but the warm ones, "
            "which follow the step before with the cache as it left it"
        )
    elif any(dropped):
        print("page cache: dropped before some steps only")
    else:
        print("page cache: NOT dropped (not permitted): reads may come from memory")
    print("MB = 10^6 bytes; MB/s = corpus bytes / wall seconds; RSS = peak of the one process")
    if TIME_BINARY is None:
        print(
            "WARNING: GNU time not found: each peak RSS includes this harness's own RSS "
            f"(now {_self_rss_mb():.0f} MB); `apt-get install time` for exact figures"
        )
    print()
    if ours or theirs:
        print(comparison_table(ours, theirs))
    if big:
        print()
        print(comparison_table(big[:1], big[1:]))
    print("\ndetails:")
    for line in detail_lines([*ours, *theirs, *big]):
        print(line)
    for m in [*ours, *theirs]:
        if m.step in ("full restore", WARM_RESTORE_STEP):
            verdict = "OK" if m.details.get("verified") else "FAILED"
            print(f"restore verification ({m.tool}, {m.step}): {verdict}")
            if not m.details.get("verified"):
                failures.append(f"{m.tool} {m.step} differs from the source")
    disturbance = disturbance_lines([*ours, *theirs, *big])
    if disturbance:
        print(
            "\nother programs' CPU during each step (from /proc/stat: the machine's busy time "
            "less the tool's and its peers'; a few per cent of theirs is noise), and CPU time "
            f"the hypervisor stole; over {DISTURBED_CORES} cores on average together is "
            "DISTURBED"
        )
        for line in disturbance:
            print(line)
    if ctx.peers == "nodes":
        print(f"\nstorage nodes ({PEERS} `serve` processes): CPU seconds during each step, summed")
        for line in nodes_cpu_lines([*ours, *big]):
            print(line)
        print("\ntargets (p2pbackup with its 10 peers as storage nodes on 127.0.0.1):")
    elif ctx.peers == "devnet":
        print(
            f"\ndevnet: CPU seconds during each step of the client, node-01's daemon (which "
            f"runs the command) and the {PEERS} other nodes with the devnet process; "
            "p2pbackup's CPU in the table above is client + daemon, its RSS the daemon's"
        )
        if not all(ctx.daemon_peak_reset):
            print("  (the daemon's peak RSS could not be reset: it is the peak since it started)")
        for line in devnet_cpu_lines([*ours, *big]):
            print(line)
        print(f"\ntargets (p2pbackup as a devnet of {DEVNET_NODES} homes, {shards}):")
    else:
        print("\ntargets:")
    for line in targets_lines(ours, theirs, big, over_nodes=ctx.peers in ("nodes", "devnet")):
        print(line)
    if source_fingerprint() != fingerprint:
        print(
            "\nWARNING: the p2pbackup sources changed during this run "
            f"({fingerprint} -> {source_fingerprint()}): the figures mix two versions"
        )
    if failures:
        print("\nFAILURES:")
        for failure in failures:
            print("  " + failure.replace("\n", "\n  "))

    results_path = workdir / f"last-results{suffix}.json"
    results_path.write_text(
        json.dumps(
            {
                "machine": machine_lines(),
                "args": {k: str(v) for k, v in vars(args).items()},
                "peers": ctx.peers,
                "caches_dropped": dropped,
                "results": [{**asdict(m), "mb_s": m.mb_s} for m in [*ours, *theirs, *big]],
                "failures": failures,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\n(results also in {results_path}; logs in {ctx.logs})")
    if failures and not args.keep:
        print("(homes, peers and repositories under the workdir kept for inspection)")
    else:
        ctx.discard(
            *(
                workdir / name
                for name in (
                    "p2pbackup",
                    "restic",
                    "corpus-run-p2pbackup",
                    "corpus-run-restic",
                    "bigfile",
                )
            )
        )
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_arguments(parser)
    # The devnet child of --peers devnet (see DevnetProcess).
    parser.add_argument("--devnet-serve", type=Path, metavar="ROOT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.devnet_serve is not None:
        import trio

        return trio.run(serve_devnet, args.devnet_serve)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
