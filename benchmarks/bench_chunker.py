"""Chunker throughput: MB/s of iter_chunks reading ~256 MiB of random data from
a file (also from two threads at once, which shows whether the GIL is
released), and of chunk_bytes on the same data in memory (which must also
fault in a fresh 256 MiB for its result list, so it is slower).

Run: ``.venv/bin/python benchmarks/bench_chunker.py [--size-mib N] [--dir DIR]``.
The input file is written under ``bench-work/`` (git-ignored) and removed after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from pathlib import Path

from p2pbackup.core.chunker import DEFAULT_PARAMS, ChunkerParams, chunk_bytes, iter_chunks

MiB = 1024 * 1024
KEYED = ChunkerParams(
    min_size=DEFAULT_PARAMS.min_size,
    avg_size=DEFAULT_PARAMS.avg_size,
    max_size=DEFAULT_PARAMS.max_size,
    seed=0x5EED_1234,
)


def write_random_file(path: Path, size: int) -> None:
    with path.open("wb") as out:
        for _ in range(size // MiB):
            out.write(os.urandom(MiB))
        out.write(os.urandom(size % MiB))


def report(label: str, size: int, seconds: float, sizes: list[int]) -> None:
    body = sizes[:-1] or sizes
    print(
        f"{label:<28} {size / seconds / 1e6:8.0f} MB/s  {len(sizes):5d} chunks  "
        f"mean {statistics.mean(body) / MiB:.3f} MiB  "
        f"median {statistics.median(body) / MiB:.3f} MiB  "
        f"min {min(body) / MiB:.3f}  max {max(body) / MiB:.3f} MiB"
    )


def bench_file(path: Path, size: int) -> None:
    start = time.perf_counter()
    with path.open("rb") as stream:
        sizes = [len(chunk) for chunk in iter_chunks(stream, KEYED)]
    report("iter_chunks (file, cached)", size, time.perf_counter() - start, sizes)


def bench_two_threads(path: Path, size: int) -> None:
    # pyfastcdc drops the GIL while it scans, so two threads should approach
    # twice the single-thread rate on two free cores.
    results: list[list[int]] = [[], []]

    def work(slot: int) -> None:
        with path.open("rb") as stream:
            results[slot] = [len(chunk) for chunk in iter_chunks(stream, KEYED)]

    threads = [threading.Thread(target=work, args=(slot,)) for slot in range(2)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report("iter_chunks x2 threads", 2 * size, time.perf_counter() - start, results[0])


def bench_memory(path: Path, size: int) -> None:
    data = path.read_bytes()
    start = time.perf_counter()
    sizes = [len(chunk) for chunk in chunk_bytes(data, KEYED)]
    report("chunk_bytes (256 MiB list)", size, time.perf_counter() - start, sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--dir", type=Path, default=Path(__file__).parent.parent / "bench-work")
    args = parser.parse_args()
    size = args.size_mib * MiB
    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / "chunker-input.bin"
    write_random_file(path, size)
    try:
        print(f"params: {KEYED}")
        bench_file(path, size)
        bench_file(path, size)
        bench_two_threads(path, size)
        bench_memory(path, size)
    finally:
        path.unlink()


if __name__ == "__main__":
    main()
