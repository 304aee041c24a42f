"""What padding costs: bytes the peers store for backups of each size.

Each **case** is one backup of ``SIZE`` bytes of new, incompressible data
(one random file) into a fresh home with the default configuration (12 MiB
packs, 3-of-6) and six folder peers, followed by a backup that changes
nothing. For each it prints:

* **stored** — every byte of every shard file on the peers, headers
  included, and the root records;
* **unpadded** — what the same packs and root records would take unpadded,
  coded the same way (n/k times the bytes of sealed blobs, pack headers and
  trailers, plus the shard headers; the root record's envelope), and what
  the padding before size buckets would have made of them (packs padded to
  a Padmé size, root records not at all);
* **overhead** — stored over unpadded, less one.

Then, without backing anything up, the padding overhead of a single pack
over contents spread log-uniformly across each bucket range (the mean cost
of the buckets, against Padmé's). Run:

    .venv/bin/python benchmarks/bench_padding.py [--max-mb N]
"""

from __future__ import annotations

import argparse
import math
import random
import tempfile
from pathlib import Path

import attrs
import trio

from p2pbackup.app import operations
from p2pbackup.app.home import Home
from p2pbackup.core import crypto, formats, packer
from p2pbackup.engine import rootrecord
from p2pbackup.engine.backup import Backup
from p2pbackup.engine.repository import Repository

K, N = operations.DEFAULT_K, operations.DEFAULT_N
TARGET = operations.DEFAULT_PACK_SIZE
SIZES_KB = (1, 10, 100, 500, 1000, 1300, 3000, 5000, 11000, 13000, 30000, 100000, 300000)


def padme(length: int) -> int:
    """Padmé (Nikitin et al., 2019): how packs were padded before buckets."""
    if length < 2:
        return length
    exponent = length.bit_length() - 1
    significant = exponent.bit_length()
    mask = (1 << (exponent - significant)) - 1
    return (length + mask) & ~mask


def coded(pack_bytes: int) -> int:
    """Bytes the n shards of a pack of ``pack_bytes`` take on the peers."""
    return N * (formats.SHARD_HEADER_SIZE + -(-pack_bytes // K))


def peer_bytes(peers: list[Path]) -> int:
    return sum(path.stat().st_size for peer in peers for path in peer.rglob("*") if path.is_file())


@attrs.frozen
class Case:
    size: int
    packs: int
    stored: int
    unpadded: int
    padme: int
    noop_stored: int


async def content_sizes(repo: Repository, pack_ids: list[bytes]) -> list[int]:
    """Each pack's bytes without padding: blobs, sealed header, trailer."""
    sizes = []
    for pack_id in pack_ids:
        record = repo.index.pack(pack_id)
        assert record is not None
        data = await repo.read_pack(record, use_cache=False)
        header = packer.read_pack_header(repo.keyring.data_key, data)
        blobs = sum(entry.length for entry in header.entries)
        sealed_header = len(formats.encode_pack_header(header)) + crypto.SEAL_OVERHEAD
        sizes.append(blobs + sealed_header + packer.TRAILER_SIZE)
    return sizes


async def run_case(workdir: Path, size: int) -> Case:
    home = Home(workdir / "home")
    operations.init_home(home, operations.default_config(K, N))
    peers = []
    async with operations.open_repository(home) as repo:
        for i in range(N):
            path = workdir / f"peer{i}"
            path.mkdir()
            await operations.add_folder_peer(repo, path)
            peers.append(path)
    source = workdir / "source"
    source.mkdir()
    with open(source / "data.bin", "wb") as out:
        rng = random.Random(size)
        left = size
        while left:
            step = min(left, 1 << 20)
            out.write(rng.randbytes(step))
            left -= step
    empty = peer_bytes(peers)
    async with operations.open_repository(home) as repo:
        await Backup(repo).run([source])
        pack_ids = repo.index.pack_ids()
        contents = await content_sizes(repo, pack_ids)
        raw = await repo.store(repo.peers()[0].peer_id).get_root()
        assert raw is not None
        record = rootrecord.open_root_record(repo.keyring, raw)
    stored = peer_bytes(peers) - empty
    async with operations.open_repository(home) as repo:
        await Backup(repo).run([source])
    noop = peer_bytes(peers) - empty - stored
    # One root record per peer, unpadded.
    root = N * (len(formats.encode_root_record(record)) + rootrecord._ENVELOPE_OVERHEAD)
    return Case(
        size=size,
        packs=len(pack_ids),
        stored=stored,
        unpadded=sum(coded(c) for c in contents) + root,
        padme=sum(coded(padme(c)) for c in contents) + root,
        noop_stored=noop,
    )


def bucket_sweep() -> list[tuple[int, float, float]]:
    """Per bucket: its size, and the mean overhead of buckets and of Padmé
    over contents log-uniform in (previous bucket, bucket]."""
    rows = []
    previous = packer.pack_buckets(TARGET)[0] // 4
    for bucket in packer.pack_buckets(TARGET):
        samples = [
            int(previous * math.exp(math.log(bucket / previous) * (i + 0.5) / 400))
            for i in range(400)
        ]
        ours = sum(packer.pack_bucket(s, TARGET) / s for s in samples) / len(samples) - 1
        theirs = sum(padme(s) / s for s in samples) / len(samples) - 1
        rows.append((bucket, ours, theirs))
        previous = bucket
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-mb", type=float, default=300, help="largest backup (default 300)")
    args = parser.parse_args()
    print(f"default config: {TARGET >> 20} MiB packs, {K}-of-{N}, six folder peers")
    print(
        f"{'new data':>12} {'packs':>5} {'stored':>12} {'unpadded':>12} {'overhead':>8} "
        f"{'Padmé':>12} {'overhead':>8} {'no-op backup':>12}"
    )
    for kb in SIZES_KB:
        if kb > args.max_mb * 1000:
            break
        with tempfile.TemporaryDirectory(prefix="bench-padding-") as tmp:
            case = trio.run(run_case, Path(tmp), kb * 1000)
        print(
            f"{case.size:>12,} {case.packs:>5} {case.stored:>12,} {case.unpadded:>12,} "
            f"{case.stored / case.unpadded - 1:>8.1%} {case.padme:>12,} "
            f"{case.padme / case.unpadded - 1:>8.1%} {case.noop_stored:>12,}"
        )
    print()
    print("one pack, contents log-uniform over each bucket's range: mean overhead")
    print(f"{'bucket':>12} {'buckets':>8} {'Padmé':>8}")
    for bucket, ours, theirs in bucket_sweep():
        print(f"{bucket:>12,} {ours:>8.1%} {theirs:>8.1%}")


if __name__ == "__main__":
    main()
