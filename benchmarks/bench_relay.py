"""Loopback throughput of the storage protocol, direct against through a relay.

Three nodes in one process on 127.0.0.1 (one trio run, so the figures are
those of one core shared by all three: a floor, not what two homes and a
friend on three machines would see):

* **B** — a storage node (``StorageServer`` over a ``ShardHost``) that
  listens on loopback and also holds a reservation at R;
* **R** — a storage node whose server relays for its friends A and B
  (``node.relay.Relay``, with no byte rate limit);
* **A** — the client: one ``RemoteShardStore`` to B, either **direct**
  (dialling B's listener) or **relayed** (dialling R and joined to B: Noise
  runs end to end inside A's and B's sessions with R, so every byte is
  sealed twice and R copies it once).

Each mode puts ``--size-mb`` MiB of 3 MiB shards and gets them back
(compared with what was put). MB/s = 10^6 bytes of shards / wall second;
the summary takes each phase's best of ``--rounds``.

Run from the repository::

    .venv/bin/python benchmarks/bench_relay.py [--size-mb 96] [--rounds 2]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from p2pbackup.core.keys import Keyring
from p2pbackup.net.network import Address, TcpNetwork
from p2pbackup.node.relay import Relay, RelayLimits
from p2pbackup.node.server import StorageServer
from p2pbackup.node.shardhost import ShardHost
from p2pbackup.stores.remote import RemoteShardStore
from p2pbackup.wire.relay import Route, hold_reservation
from p2pbackup.wire.session import Identity

SHARD_SIZE = 3 << 20
LOOPBACK = Address("127.0.0.1", 0)


def identity(name: str) -> Identity:
    secret = hashlib.blake2b(name.encode(), digest_size=32).digest()
    return Identity.from_keyring(Keyring.from_master_secret(secret))


async def measure(store: RemoteShardStore, count: int, shards: list[bytes]) -> tuple[float, float]:
    """Seconds to put ``count`` shards, then to get them all back."""
    started = time.perf_counter()
    for i in range(count):
        await store.put(i.to_bytes(32, "big"), shards[i % len(shards)])
    put = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(count):
        if await store.get(i.to_bytes(32, "big")) != shards[i % len(shards)]:
            raise SystemExit(f"shard {i} came back different")
    return put, time.perf_counter() - started


async def run(size_mb: int, rounds: int, workdir: Path) -> None:
    network = TcpNetwork()
    a, b, r = identity("bench-a"), identity("bench-b"), identity("bench-r")
    count = max(1, (size_mb << 20) // SHARD_SIZE)
    shards = [os.urandom(SHARD_SIZE) for _ in range(min(count, 8))]
    best: dict[str, list[float]] = {}
    async with trio.open_nursery() as nursery:
        relay = Relay(
            r.node_id, {a.node_id, b.node_id}.__contains__, RelayLimits(bytes_per_second=None)
        )
        r_server = StorageServer(ShardHost.open(workdir / "r"), r, relay=relay.serve)
        r_address = await nursery.start(network.serve, LOOPBACK, r_server.handle_connection)
        route = Route(r_address, r.node_id)
        for round_number in range(rounds):
            for mode in ("direct", "relayed"):
                host = ShardHost.open(workdir / f"b-{mode}-{round_number}")
                b_server = StorageServer(host, b)
                async with trio.open_nursery() as node:
                    b_address = await node.start(
                        network.serve, LOOPBACK, b_server.handle_connection
                    )
                    await node.start(
                        hold_reservation, network, b, route, b_server.handle_connection
                    )

                    async def locate(node_id: bytes) -> Sequence[Route]:
                        return [route]

                    # Relayed: B's own address is one where nothing listens.
                    address = b_address if mode == "direct" else Address("127.0.0.1", 9)
                    store = RemoteShardStore(
                        network, a, address, b.node_id, locate=locate, io_timeout=600
                    )
                    put, get = await measure(store, count, shards)
                    await store.aclose()
                    node.cancel_scope.cancel()
                host.close()
                megabytes = count * SHARD_SIZE / 1e6
                figures = [megabytes / put, megabytes / get]
                print(
                    f"round {round_number + 1} {mode:8} put {figures[0]:7.1f} MB/s"
                    f"   get {figures[1]:7.1f} MB/s"
                )
                old = best.get(mode, [0.0, 0.0])
                best[mode] = [max(x, y) for x, y in zip(old, figures, strict=True)]
        nursery.cancel_scope.cancel()
    print(f"\n{count} shards of {SHARD_SIZE >> 20} MiB each way; best of {rounds}:")
    for mode, (put, get) in best.items():
        print(f"  {mode:8} put {put:7.1f} MB/s   get {get:7.1f} MB/s")
    direct, relayed = best["direct"], best["relayed"]
    print(f"  relayed/direct: put {relayed[0] / direct[0]:.2f}×, get {relayed[1] / direct[1]:.2f}×")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-relay-") as workdir:
        trio.run(run, args.size_mb, args.rounds, Path(workdir))


if __name__ == "__main__":
    main()
