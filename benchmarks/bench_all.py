"""Every p2pbackup benchmark in one command: the components, then the whole system.

1. **chunking** — MB/s of ``chunker.iter_chunks`` (FastCDC, ~1 MiB chunks)
   reading a file of random data from the page cache, in one thread and in two
   (``bench_chunker``);
2. **hashing and encryption** — MB/s of the blob id (keyed BLAKE2b-256),
   ``crypto.seal`` / ``crypto.unseal`` (XChaCha20-Poly1305) and
   ``blobs.seal_blob`` / ``blobs.open_blob`` (zstd probe + AEAD) on 1 MiB
   pieces of random data, and ``seal_blob`` from two threads;
3. **erasure coding** — encode and decode at 4-of-10 and 10-of-16, against
   zfec on the same data when it is installed (``bench_erasure``);
4. **the whole system** — ``bench_backup``: initial backup, incremental
   backup and full restore of the corpus of ``make_corpus.py`` (beside this
   script), cold, and an unchanged backup and the restore again, warm,
   with 10 folder peers at 4-of-10 (or ``--peers nodes``: 10 storage nodes
   on 127.0.0.1), against restic in the same run, and the peak memory of
   backing up one big file;
5. **the network**, only with ``--network`` — ``bench_network``: put and get
   of ``--network-size-mb`` MiB of shards into one storage server on
   127.0.0.1, with the secure session and on plain TCP; then the whole-system
   steps again (not the big file) with p2pbackup's 10 peers as ``p2pbackup
   serve`` processes on 127.0.0.1, beside restic (skipped when part 4 already
   ran with ``--peers nodes``);
6. **the devnet**, only with ``--devnet`` — the whole-system steps again (not
   the big file) as a user of ``p2pbackup devnet`` runs them: 11 befriended
   homes at 4-of-10, every step handed to node-01's daemon, beside restic
   (skipped when part 4 already ran with ``--peers devnet``).

Component figures are the best of ``--repeat`` runs on warm caches; MB is
10^6 bytes. Run from the repository::

    .venv/bin/python benchmarks/bench_all.py                # the full benchmark
    .venv/bin/python benchmarks/bench_all.py --quick        # a 1–2 minute smoke run
    .venv/bin/python benchmarks/bench_all.py --network      # and the network part
    .venv/bin/python benchmarks/bench_all.py --devnet       # and the devnet part
    .venv/bin/python benchmarks/bench_all.py --network --skip-components --skip-system
                                                            # the network part alone

Every option of ``bench_backup.py`` is accepted and passed on (``--workdir``,
``--size-mb``, ``--seed``, ``--skip-restic``, ``--big-file-mb``,
``--skip-big-file``, ``--corpus-script``, ``--peers``, ``--keep``), and those
of ``bench_network.py`` with ``network-`` in front (``--network-size-mb``,
``--network-concurrency``, ``--network-rounds``, ``--network-server-dir``).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# The sibling benchmark scripts are modules of this directory.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_backup
import bench_chunker
import bench_erasure
import bench_network

from p2pbackup.core import blobs, crypto
from p2pbackup.core.chunker import iter_chunks
from p2pbackup.model import BlobType

MiB = 1 << 20
MB = 1e6
PIECE = MiB

FULL = {"chunk_mb": 256, "crypto_mb": 256, "erasure_mb": 64, "size_mb": 1024, "big_file_mb": 2048,
        "network_size_mb": 1024}  # fmt: skip
QUICK = {"chunk_mb": 32, "crypto_mb": 32, "erasure_mb": 16, "size_mb": 100, "big_file_mb": 200,
         "network_size_mb": 100}  # fmt: skip


def _rate(size: int, seconds: float) -> float:
    return size / seconds / MB


# -- chunking ----------------------------------------------------------------------------


def bench_chunking(workdir: Path, size_mb: int, repeat: int) -> list[tuple[str, float]]:
    size = size_mb * MiB
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "chunker-input.bin"
    bench_chunker.write_random_file(path, size)
    rows: list[tuple[str, float]] = []
    try:
        sizes: list[int] = []

        def one() -> None:
            with path.open("rb") as stream:
                sizes[:] = [len(chunk) for chunk in iter_chunks(stream, bench_chunker.KEYED)]

        one()  # warm the page cache
        seconds = bench_erasure.best_seconds(one, repeat)
        bench_chunker.report("iter_chunks (file, cached)", size, seconds, sizes)
        rows.append(("chunking, 1 thread", _rate(size, seconds)))

        def two() -> None:
            threads = [threading.Thread(target=one) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

        seconds = bench_erasure.best_seconds(two, repeat)
        bench_chunker.report("iter_chunks x2 threads", 2 * size, seconds, sizes)
        rows.append(("chunking, 2 threads", _rate(2 * size, seconds)))
    finally:
        path.unlink()
    return rows


# -- hashing and encryption --------------------------------------------------------------


def bench_crypto(size_mb: int, repeat: int) -> list[tuple[str, float]]:
    data = os.urandom(size_mb * MiB)
    view = memoryview(data)
    pieces = [view[i : i + PIECE] for i in range(0, len(data), PIECE)]
    key, dedup_key = os.urandom(32), os.urandom(32)
    size = len(data)

    ids = [blobs.blob_id(dedup_key, p) for p in pieces]
    sealed = [crypto.seal(key, p) for p in pieces]
    sealed_blobs = [
        blobs.seal_blob(key, BlobType.DATA, i, p) for i, p in zip(ids, pieces, strict=True)
    ]

    def seal_blobs(part: Sequence[int]) -> None:
        for j in part:
            blobs.seal_blob(key, BlobType.DATA, ids[j], pieces[j])

    def seal_blobs_two_threads() -> None:
        threads = [
            threading.Thread(target=seal_blobs, args=(range(t, len(pieces), 2),)) for t in (0, 1)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    cases: list[tuple[str, Callable[[], object]]] = [
        ("blob id (keyed BLAKE2b-256)", lambda: [blobs.blob_id(dedup_key, p) for p in pieces]),
        ("crypto.seal (XChaCha20-Poly1305)", lambda: [crypto.seal(key, p) for p in pieces]),
        ("crypto.unseal", lambda: [crypto.unseal(key, s) for s in sealed]),
        ("blobs.seal_blob (zstd probe + seal)", lambda: seal_blobs(range(len(pieces)))),
        (
            "blobs.open_blob (unseal + id check)",
            lambda: [
                blobs.open_blob(key, dedup_key, BlobType.DATA, i, s)
                for i, s in zip(ids, sealed_blobs, strict=True)
            ],
        ),
        ("blobs.seal_blob x2 threads", seal_blobs_two_threads),
    ]
    rows = []
    for label, call in cases:
        rate = _rate(size, bench_erasure.best_seconds(call, repeat))
        print(f"{label:<38} {rate:8.0f} MB/s", flush=True)
        rows.append((label, rate))
    return rows


# -- main --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"small sizes for a smoke run: {', '.join(f'{k}={v}' for k, v in QUICK.items())}",
    )
    parser.add_argument("--repeat", type=int, default=3, help="component runs, best of (3)")
    parser.add_argument("--chunk-mb", type=int, help=f"MiB for chunking ({FULL['chunk_mb']})")
    parser.add_argument("--crypto-mb", type=int, help=f"MiB for encryption ({FULL['crypto_mb']})")
    parser.add_argument("--erasure-mb", type=int, help=f"MiB for erasure ({FULL['erasure_mb']})")
    parser.add_argument("--skip-components", action="store_true", help="only the whole system")
    parser.add_argument("--skip-system", action="store_true", help="only the components")
    parser.add_argument(
        "--network",
        action="store_true",
        help="then the network: bench_network, and the whole system with 10 storage nodes",
    )
    parser.add_argument(
        "--devnet",
        action="store_true",
        help="then the whole system as a devnet of 11 homes, run by node-01's daemon",
    )
    bench_backup.add_arguments(parser)
    bench_network.add_arguments(parser, prefix="network-")
    # None means "the full or the --quick size", decided after parsing.
    parser.set_defaults(size_mb=None, big_file_mb=None, network_size_mb=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sizes = QUICK if args.quick else FULL
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    start = time.perf_counter()

    summary: list[tuple[str, float]] = []
    erasure_rows: list[dict[str, object]] = []
    if not args.skip_components:
        print("p2pbackup component benchmarks (benchmarks/bench_all.py)")
        for line in bench_backup.machine_lines():
            print(line)

        print(f"\n== chunking: {args.chunk_mb} MiB of random data, best of {args.repeat} ==")
        summary += bench_chunking(args.workdir.resolve(), args.chunk_mb, args.repeat)

        print(
            f"\n== hashing and encryption: {args.crypto_mb} MiB of random data in "
            f"1 MiB pieces, best of {args.repeat} =="
        )
        summary += bench_crypto(args.crypto_mb, args.repeat)

        print(
            f"\n== erasure coding: {args.erasure_mb} MiB of random data, best of "
            f"{args.repeat}, MB/s of input =="
        )
        if getattr(bench_erasure, "easyfec", None) is None:
            print("(zfec is not importable: `pip install -e '.[bench]'` to compare)")
        erasure_rows = bench_erasure.run(args.erasure_mb, args.repeat)
        print(bench_erasure.format_table(erasure_rows))
        print(flush=True)

    code = 0
    if not args.skip_system:
        code = bench_backup.run(args)

    network_rows: list[dict[str, object]] = []
    if args.network:
        print(f"\n== network: {args.network_size_mb:g} MiB of shards each way ==", flush=True)
        network_code, network_rows = bench_network.run(
            args.workdir,
            args.network_size_mb,
            args.network_concurrency,
            args.network_rounds,
            args.network_server_dir,
        )
        code = code or network_code
        if args.peers == "nodes" and not args.skip_system:
            print("\n(the whole system with storage nodes already ran above: --peers nodes)")
        else:
            print("\n== network: the whole system with 10 storage nodes ==", flush=True)
            nodes_args = copy.copy(args)
            nodes_args.peers, nodes_args.skip_big_file = "nodes", True
            code = bench_backup.run(nodes_args) or code

    if args.devnet:
        if args.peers == "devnet" and not args.skip_system:
            print("\n(the whole system as a devnet already ran above: --peers devnet)")
        else:
            print("\n== devnet: the whole system run by a devnet node's daemon ==", flush=True)
            devnet_args = copy.copy(args)
            devnet_args.peers, devnet_args.skip_big_file = "devnet", True
            code = bench_backup.run(devnet_args) or code

    if summary:
        print("\n== components, MB/s (one thread unless said) ==")
        for label, rate in summary:
            print(f"  {label:<38} {rate:8.0f}")
        print(f"\n== erasure coding, MB/s of input ({args.erasure_mb} MiB) ==")
        print(bench_erasure.format_table(erasure_rows))
    if network_rows:
        print("\n== network: secure session against plain TCP (bench_network) ==")
        print(bench_network.summary_table(network_rows))
        for line in bench_network.target_lines(network_rows):
            print(line)
    print(f"\nbench_all: done in {time.perf_counter() - start:.0f} s", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
