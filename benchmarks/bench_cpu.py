"""Where each tool's CPU goes: the initial backup, the incremental backup and
the restore of the benchmark corpus, p2pbackup into 10 folder peers at
4-of-10 beside restic into a local repository, each step under ``perf
record``, page cache dropped before it.

A **share** is the CPU-seconds that ``perf`` sampled in one part of a
process: the kernel (file creation, reads and writes, page faults), the
Python interpreter (``libpython``: the bytecode, object allocation, the
GIL hand-offs), or a C library doing the format's work (libsodium's
ciphers and BLAKE2b, zstd, numpy's erasure code, libc's copies, SQLite).
Restic, one Go binary, splits into the kernel and itself.

The **ceiling** of a step is the ratio restic's CPU would have against
p2pbackup's with the interpreter's share taken away, every C call and
syscall kept: what the same design would reach were its Python free.
Where the ceiling is near or below 1.0×, that step cannot reach restic's
speed in this design on this machine, whatever the Python around it does.
CPU rather than wall time: on two cores both tools keep 1.1–1.45 of them
busy (docs/performance.md), so the ratio of wall times follows the ratio
of CPU.

Needs ``perf`` (Debian's linux-perf) and restic; run as root, so that the
page cache can be dropped and ``perf`` sees the kernel::

    .venv/bin/python benchmarks/bench_cpu.py --workdir /work/bench
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_backup

#: The parts a process's samples are grouped into, by the shared object
#: ``perf`` names for each sample; the first pattern that matches wins.
PARTS: tuple[tuple[str, str], ...] = (
    ("kernel", r"\[kernel"),
    ("interpreter", r"libpython|^python3"),
    ("ciphers and hashes", r"_sodium|_blake2|_cffi_backend|libcrypto|_hashlib"),
    ("zstd", r"backend_c|zstd"),
    ("erasure code", r"_multiarray|libopenblas|numpy"),
    ("copies (libc)", r"libc\.so|libc-"),
    ("SQLite", r"sqlite"),
    ("restic", r"^restic$"),
)
OTHER = "other"

#: perf's line for one shared object: "  12.34%  libfoo.so   ".
_DSO_LINE = re.compile(r"^\s*([0-9.]+)%\s+(\S.*?)\s*$")
_EVENT_COUNT = re.compile(r"Event count \(approx\.\):\s*(\d+)")


def part_of(dso: str) -> str:
    for part, pattern in PARTS:
        if re.search(pattern, dso):
            return part
    return OTHER


def perf_binary() -> str | None:
    return shutil.which("perf")


def shares(data: Path) -> dict[str, float]:
    """CPU-seconds by part from one ``perf record`` file."""
    command = ["perf", "report", "-i", str(data), "--stdio", "--sort", "dso"]
    report = subprocess.run(
        [*command, "-g", "none", "--no-children"], capture_output=True, text=True, check=True
    ).stdout
    return parse_report(report)


def parse_report(report: str) -> dict[str, float]:
    """CPU-seconds by part from ``perf report --stdio --sort dso`` of
    cpu-clock samples (whose event count is in nanoseconds)."""
    count = _EVENT_COUNT.search(report)
    if count is None:
        raise bench_backup.StepFailed("perf report gave no event count")
    total = int(count.group(1)) / 1e9
    parts: dict[str, float] = {}
    for line in report.splitlines():
        match = _DSO_LINE.match(line)
        if match:
            part = part_of(match.group(2))
            parts[part] = parts.get(part, 0.0) + float(match.group(1)) / 100 * total
    return parts


def recorded(cmd: Sequence[str], data: Path, logs: Path, name: str, env: dict[str, str]) -> None:
    """Run ``cmd`` under ``perf record`` (page cache dropped first)."""
    bench_backup.drop_caches()
    with (logs / f"{name}.out").open("wb") as out, (logs / f"{name}.err").open("wb") as err:
        code = subprocess.run(
            ["perf", "record", "-F", "499", "-o", str(data), "--", *cmd],
            stdout=out,
            stderr=err,
            env=env,
        ).returncode
    if code != 0:
        raise bench_backup.StepFailed(f"`{' '.join(cmd)}` exited {code}; see {logs / name}.err")


def table(steps: list[tuple[str, dict[str, float], dict[str, float]]]) -> list[str]:
    lines = [
        "| step | tool | CPU-s | kernel | interpreter | C libraries | ceiling |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for step, ours, theirs in steps:
        our_total, their_total = sum(ours.values()), sum(theirs.values())
        interpreter = ours.get("interpreter", 0.0)
        c_work = our_total - interpreter - ours.get("kernel", 0.0)
        ceiling = their_total / (our_total - interpreter)
        lines.append(
            f"| {step} | p2pbackup | {our_total:.1f} | {ours.get('kernel', 0.0):.1f} "
            f"| {interpreter:.1f} | {c_work:.1f} | {ceiling:.2f}× |"
        )
        lines.append(
            f"| {step} | restic | {their_total:.1f} | {theirs.get('kernel', 0.0):.1f} "
            f"| — | {their_total - theirs.get('kernel', 0.0):.1f} | |"
        )
    return lines


def detail(step: str, tool: str, parts: dict[str, float]) -> str:
    shown = ", ".join(f"{p} {s:.1f}" for p, s in sorted(parts.items(), key=lambda i: -i[1]))
    return f"  {step}, {tool}: {shown}"


def run(args: argparse.Namespace) -> int:
    restic = bench_backup.restic_binary()
    if perf_binary() is None or restic is None:
        print("bench_cpu: needs perf (apt-get install linux-perf) and restic on PATH")
        return 2
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    script = Path(__file__).resolve().parent / "make_corpus.py"
    corpus = bench_backup.ensure_corpus(work, script, args.size_mb, args.seed)
    base = work / "cpu"
    if base.exists():
        shutil.rmtree(base)
    logs = base / "logs"
    logs.mkdir(parents=True)
    source = base / "source"
    bench_backup.fresh_copy(corpus, source)

    print(bench_backup.compile_bytecode())
    ctx = bench_backup.Context(work, script, args.seed, logs)
    ours = bench_backup.p2p_home(ctx, base / "p2pbackup")
    (base / "restic").mkdir()
    env = bench_backup.restic_env(base / "restic")
    bench_backup.run_quiet([restic, "init"], env=env)
    theirs = [restic, "--quiet"]

    steps: list[tuple[str, dict[str, float], dict[str, float]]] = []

    def step(name: str, our_cmd: list[str], their_cmd: list[str]) -> None:
        parts = []
        for tool, cmd in (("p2pbackup", our_cmd), ("restic", their_cmd)):
            data = base / f"{name}-{tool}.perf"
            recorded(cmd, data, logs, f"{name}-{tool}", env)
            parts.append(shares(data))
            print(detail(name, tool, parts[-1]), flush=True)
        steps.append((name, parts[0], parts[1]))

    step("initial backup", [*ours, "backup", str(source)], [*theirs, "backup", str(source)])
    bench_backup.mutate(script, source, args.seed)
    step("incremental backup", [*ours, "backup", str(source)], [*theirs, "backup", str(source)])
    step(
        "full restore",
        [*ours, "restore", "latest", "--target", str(base / "restored-p2pbackup")],
        [*theirs, "restore", "latest", "--target", str(base / "restored-restic")],
    )
    print()
    print("\n".join(table(steps)))
    if not args.keep:
        shutil.rmtree(base)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=bench_backup.DEFAULT_WORKDIR)
    parser.add_argument("--size-mb", type=float, default=1024)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the homes and perf files")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
