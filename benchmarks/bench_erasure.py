"""Throughput of p2pbackup.core.erasure against zfec (Tahoe-LAFS's C erasure coder).

Each **case** is one code (k-of-n) and one **operation**:

* ``encode`` — one buffer in, all n shards out;
* ``decode, 2 data missing`` — k shards of which two are parity: real decoding;
* ``decode, all data`` — the k data shards: concatenation only.

Throughput is MB/s (10^6 bytes) of *input data* per second, the best of a few
repeats after a warm-up that fills the caches (matrices, product tables).
zfec is driven through ``zfec.easyfec``, whose calls do the same work as ours
(split and pad the buffer; join and truncate the result). Run:

    .venv/bin/python benchmarks/bench_erasure.py [--size-mb N] [--repeat R]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

from p2pbackup.core import erasure

try:
    from zfec import easyfec
except ImportError:  # zfec is a dev-only comparison
    easyfec = None

CODES = ((4, 10), (10, 16))
MISSING_DATA = 2


def best_seconds(call: Callable[[], object], repeat: int) -> float:
    """The fastest of ``repeat`` timed calls (the other benchmarks use it too)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def _ours(data: bytes, k: int, n: int) -> dict[str, Callable[[], object]]:
    shards = erasure.encode(data, k, n)
    some_parity = {i: shards[i] for i in range(MISSING_DATA, k + MISSING_DATA)}
    all_data = {i: shards[i] for i in range(k)}
    assert erasure.decode(some_parity, k, n, len(data)) == data
    return {
        "encode": lambda: erasure.encode(data, k, n),
        "decode, 2 data missing": lambda: erasure.decode(some_parity, k, n, len(data)),
        "decode, all data": lambda: erasure.decode(all_data, k, n, len(data)),
    }


def _zfec(data: bytes, k: int, n: int) -> dict[str, Callable[[], object]]:
    assert easyfec is not None
    encoder = easyfec.Encoder(k, n)
    decoder = easyfec.Decoder(k, n)
    shards = encoder.encode(data)
    padlen = k * len(shards[0]) - len(data)
    some = list(range(MISSING_DATA, k + MISSING_DATA))
    first = list(range(k))
    assert decoder.decode([shards[i] for i in some], some, padlen) == data
    return {
        "encode": lambda: encoder.encode(data),
        "decode, 2 data missing": lambda: decoder.decode([shards[i] for i in some], some, padlen),
        "decode, all data": lambda: decoder.decode([shards[i] for i in first], first, padlen),
    }


def _warm_up(k: int, n: int) -> None:
    # Builds the generator matrix, the pair tables and the decoding matrix.
    sample = os.urandom(4096)
    shards = erasure.encode(sample, k, n)
    erasure.decode({i: shards[i] for i in range(MISSING_DATA, k + MISSING_DATA)}, k, n, 4096)


def run(size_mb: int, repeat: int = 3) -> list[dict[str, Any]]:
    """Time every case on ``size_mb`` MiB of random data; one dict per case."""
    data = os.urandom(size_mb << 20)
    results: list[dict[str, Any]] = []
    for k, n in CODES:
        _warm_up(k, n)
        ours = _ours(data, k, n)
        theirs = _zfec(data, k, n) if easyfec is not None else {}
        for operation, call in ours.items():
            ours_rate = len(data) / best_seconds(call, repeat) / 1e6
            zfec_rate = (
                len(data) / best_seconds(theirs[operation], repeat) / 1e6
                if operation in theirs
                else None
            )
            results.append(
                {
                    "code": f"{k}-of-{n}",
                    "operation": operation,
                    "size_mb": size_mb,
                    "ours_mb_s": ours_rate,
                    "zfec_mb_s": zfec_rate,
                    "ratio": ours_rate / zfec_rate if zfec_rate else None,
                }
            )
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    header = f"{'code':<9}{'operation':<25}{'ours MB/s':>11}{'zfec MB/s':>11}{'ours/zfec':>11}"
    lines = [header, "-" * len(header)]
    for row in results:
        zfec_rate = "-" if row["zfec_mb_s"] is None else f"{row['zfec_mb_s']:.0f}"
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        lines.append(
            f"{row['code']:<9}{row['operation']:<25}{row['ours_mb_s']:>11.0f}"
            f"{zfec_rate:>11}{ratio:>11}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mb", type=int, default=64, help="MiB of random data (64)")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs (3)")
    args = parser.parse_args()
    results = run(args.size_mb, args.repeat)
    print(f"erasure coding throughput, {args.size_mb} MiB of random data, MB/s of input")
    if easyfec is None:
        print("(zfec is not importable: install the 'bench' extra to compare)")
    print(format_table(results))


if __name__ == "__main__":
    main()
