"""Throughput and space saved by p2pbackup.core.compression, per zstd level.

Usage::

    python3 benchmarks/make_corpus.py /tmp/corpus-comp --size-mb 200 --seed 1
    .venv/bin/python benchmarks/bench_compression.py /tmp/corpus-comp

Every file of the corpus directory is read into memory and cut into pieces
of ``--piece-size`` bytes (default 1 MiB, the chunker's average chunk), which
are compressed one by one as the engine compresses chunks. For each level it
prints MB of input per CPU second of one thread (CPU time rather than wall
time, so a busy machine skews it less) and the share of bytes saved:

* ``all`` — every piece, with the incompressibility probe (the default) and
  without it (``probe=False``);
* ``compressible`` — only pieces that zstd level 1 shrinks by at least 10 %,
  the worst case for speed (a home directory of text);
* ``2 threads`` — all pieces split over two threads with the probe, to show
  that compression runs on two cores at once (wall-clock, so only
  meaningful on an otherwise idle machine).

Numbers only, no assertions: this is for choosing ``DEFAULT_LEVEL``.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from p2pbackup.core import compression


def load_pieces(root: Path, piece_size: int) -> list[bytes]:
    pieces: list[bytes] = []
    for directory, _dirs, files in sorted(os.walk(root)):
        for name in sorted(files):
            data = (Path(directory) / name).read_bytes()
            pieces.extend(data[i : i + piece_size] for i in range(0, len(data), piece_size))
    return pieces


def measure(pieces: Sequence[bytes], level: int, probe: bool) -> tuple[float, float]:
    """(MB per CPU second, % saved) of compressing ``pieces`` one by one in this thread."""
    total = sum(map(len, pieces))
    # CPU time of this thread, so that other load on the machine skews it less.
    start = time.thread_time()
    stored = sum(len(compression.compress(p, level=level, probe=probe)[1]) for p in pieces)
    elapsed = time.thread_time() - start
    return total / elapsed / 1e6, 100 * (1 - stored / total)


def measure_threads(pieces: Sequence[bytes], level: int, threads: int) -> float:
    """Wall-clock MB/s of compressing ``pieces`` split over ``threads`` threads."""
    total = sum(map(len, pieces))

    def work(part: Sequence[bytes]) -> None:
        for piece in part:
            compression.compress(piece, level=level)

    workers = [threading.Thread(target=work, args=(pieces[i::threads],)) for i in range(threads)]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return total / (time.perf_counter() - start) / 1e6


def _shrinks_by_a_tenth(piece: bytes) -> bool:
    _method, stored = compression.compress(piece, level=1, probe=False)
    return len(stored) < 0.9 * len(piece)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--piece-size", type=int, default=1 << 20)
    parser.add_argument("--levels", default="1,3,6")
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs")
    args = parser.parse_args()

    pieces = load_pieces(args.corpus, args.piece_size)
    compressible = [p for p in pieces if _shrinks_by_a_tenth(p)]
    mib = sum(map(len, pieces)) / 2**20
    cmib = sum(map(len, compressible)) / 2**20
    print(f"{len(pieces)} pieces, {mib:.1f} MiB; compressible: {len(compressible)}, {cmib:.1f} MiB")
    print(
        f"{'level':>5} {'all MB/s':>9} {'saved':>7} {'no-probe':>9} {'saved':>7}"
        f" {'compr MB/s':>10} {'saved':>7} {'2 threads':>10}"
    )
    for level in (int(x) for x in args.levels.split(",")):
        best = {}
        for name, subset, probe in (
            ("all", pieces, True),
            ("noprobe", pieces, False),
            ("compr", compressible, True),
        ):
            runs = [measure(subset, level, probe) for _ in range(args.repeat)]
            best[name] = max(runs)
        threaded = max(measure_threads(pieces, level, 2) for _ in range(args.repeat))
        print(
            f"{level:>5} {best['all'][0]:>9.1f} {best['all'][1]:>6.2f}%"
            f" {best['noprobe'][0]:>9.1f} {best['noprobe'][1]:>6.2f}%"
            f" {best['compr'][0]:>10.1f} {best['compr'][1]:>6.2f}% {threaded:>10.1f}"
        )


if __name__ == "__main__":
    main()
