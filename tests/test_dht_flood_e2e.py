"""A friend's backup and restore go through while the node's DHT port is flooded.

Real processes on loopback: Bob serves; Alice befriends him and backs up to
him. First strangers fill Bob's record storage with valid records (as
anyone can: keys cost nothing). Then senders on 120 loopback addresses in three /24 networks
send Bob's UDP port pings from crafted ids (next to his own, where a node
used to hand over every record it held), lookups of random keys and
malformed datagrams — a bounded flood, stopped by the test. Alice's backup
and restore must succeed, Bob must stay up, send the flooders back no more
bytes than they sent him, and stay under the memory bound in
docs/discovery.md.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import umsgpack

from p2pbackup.core import crypto
from p2pbackup.dht import records

from .cli_helpers import cli_ok, make_source, restored, tree_state
from .test_friends_e2e import person

pytestmark = pytest.mark.slow

#: Three /24 networks of 40 addresses each, all on loopback.
SOURCES = [f"127.{net}.{host}.{host}" for net in (61, 62, 63) for host in range(1, 41)]
#: Strangers' records stored on the node first: three /24s, each under the
#: per-network allowance (docs/discovery.md) and the rate limit's burst.
FILL_SOURCES = [f"127.64.{net}.1" for net in (1, 2, 3)]
FILL_PER_SOURCE = 180
#: The flood: at most this many datagrams, for at most this long.
MAX_DATAGRAMS = 40_000
MAX_SECONDS = 60.0
#: docs/discovery.md: a node's resident memory under DHT floods stays under this.
RSS_BOUND = 250 << 20


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def fill_record_storage(target: tuple[str, int]) -> int:
    """Store valid contact records of throwaway identities on the node; how many were taken."""
    now = int(time.time())
    taken = 0
    for n, address in enumerate(FILL_SOURCES):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((address, 0))
            sock.settimeout(2.0)
            for i in range(FILL_PER_SOURCE):
                record = records.sign_contact(
                    crypto.random_bytes(32),
                    addresses=[records.RecordAddress.from_host_port("127.64.0.9", 1000 + i)],
                    storage_offered=0,
                    sequence=1,
                    now=now,
                    lifetime=3600,
                )
                key = records.dht_key(records.RecordKind.CONTACT, record.node_id)
                request = ["store", [bytes([n]) * 20, key, records.encode_record(record)]]
                sock.sendto(b"\x00" + os.urandom(20) + umsgpack.packb(request), target)
                answer = umsgpack.unpackb(sock.recv(65536)[21:])
                taken += answer is True
    return taken


class Flood:
    """Senders on many addresses, counting what they send and what comes back."""

    def __init__(self, target: tuple[str, int], own_id: bytes, pid: int) -> None:
        self.target = target
        self.own_id = own_id
        self.pid = pid
        self.sent = 0
        self.sent_bytes = 0
        self.received_bytes = 0
        #: Records the node tried to hand the flooders (they never answered it once).
        self.stores_received = 0
        self.peak_rss = 0
        self._stop = threading.Event()
        self._sockets = []
        for address in SOURCES:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((address, 0))
            sock.setblocking(False)
            self._sockets.append(sock)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _datagram(self, rng: random.Random) -> bytes:
        msg_id = rng.randbytes(20)
        roll = rng.random()
        if roll < 0.5:
            # A ping from an id next to the node's own: the closest a stranger can claim.
            claimed = self.own_id[:-1] + bytes([self.own_id[-1] ^ rng.randrange(1, 256)])
            return b"\x00" + msg_id + umsgpack.packb(["ping", [claimed]])
        if roll < 0.8:
            return (
                b"\x00"
                + msg_id
                + umsgpack.packb(["find_value", [rng.randbytes(20), rng.randbytes(20)]])
            )
        return b"\x00" + msg_id + rng.randbytes(rng.randrange(0, 200))  # malformed

    def _run(self) -> None:
        rng = random.Random(7)
        started = time.monotonic()
        rounds = 0
        while (
            not self._stop.is_set()
            and self.sent < MAX_DATAGRAMS
            and time.monotonic() - started < MAX_SECONDS
        ):
            for sock in self._sockets:
                data = self._datagram(rng)
                try:
                    sock.sendto(data, self.target)
                except BlockingIOError:
                    continue
                self.sent += 1
                self.sent_bytes += len(data)
            self._drain()
            rounds += 1
            if rounds % 20 == 0:
                self.peak_rss = max(self.peak_rss, rss(self.pid))
            time.sleep(0.002)

    def _drain(self) -> None:
        for sock in self._sockets:
            while True:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    break
                self.received_bytes += len(data)
                if data[:1] == b"\x00" and b"store" in data[21:40]:
                    self.stores_received += 1

    def __enter__(self) -> Flood:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        time.sleep(1.0)  # answers still on their way
        self._drain()
        for sock in self._sockets:
            sock.close()


def test_a_friend_backs_up_and_restores_through_a_dht_flood(tmp_path: Path) -> None:
    alice, bob = person(tmp_path, "alice"), person(tmp_path, "bob")
    try:
        bob.node.start("127.0.0.1:0", open_mode=False)
        alice.node.start("127.0.0.1:0", open_mode=False)
        bob_code = cli_ok("invite", home=bob.node.home).lines[-1]
        alice_code = cli_ok("invite", home=alice.node.home).lines[-1]
        cli_ok("friend", "add", alice_code, home=bob.node.home)
        cli_ok("friend", "add", bob_code, home=alice.node.home)
        cli_ok("peer", "add-dir", alice.folder, home=alice.node.home)
        source = make_source(alice.root / "source", seed=3, big=2_000_000)
        before = tree_state(source)
        assert bob.node.process is not None
        host, port = bob.node.address.rsplit(":", 1)
        idle_rss = rss(bob.node.process.pid)
        assert fill_record_storage((host, int(port))) == len(FILL_SOURCES) * FILL_PER_SOURCE

        flood_at = ((host, int(port)), bytes.fromhex(bob.node.node_id), bob.node.process.pid)
        with Flood(*flood_at) as flood:
            time.sleep(2.0)  # the flood is on before the backup starts
            snapshot = cli_ok("backup", source, home=alice.node.home).lines[-1]
            for entry in alice.folder.iterdir():
                shutil.rmtree(entry)  # only Bob holds Alice's data now
            target = alice.root / "restored"
            cli_ok("restore", snapshot, "--target", target, home=alice.node.home)
            assert bob.node.process.poll() is None
        assert tree_state(restored(target, source)) == before
        assert flood.sent >= 5_000, flood.sent  # a flood, not a trickle
        # Nothing is handed to a source that never answered a request of Bob's,
        # and no amplification: the flooders got back less than they sent.
        assert flood.stores_received == 0, flood.stores_received
        assert flood.received_bytes <= flood.sent_bytes, (flood.received_bytes, flood.sent_bytes)
        assert flood.peak_rss < RSS_BOUND, (idle_rss, flood.peak_rss)
        print(
            f"flood: {flood.sent} datagrams, {flood.sent_bytes} bytes sent, "
            f"{flood.received_bytes} bytes back; bob's RSS {idle_rss >> 20} -> "
            f"{flood.peak_rss >> 20} MiB"
        )
        assert bob.node.process.poll() is None
    finally:
        errors = [alice.node.stop(), bob.node.stop()]
    assert not [e for e in errors if "Traceback" in e], errors
    assert os.path.exists(target)
