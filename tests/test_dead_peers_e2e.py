"""A dead peer does not slow restore or status down.

Real processes on loopback, through the CLI: five ``serve`` nodes hold a
3-of-5 backup. Then one node is killed, so that its port refuses
connections, and another is replaced by a plain TCP listener on its port
that accepts connections and never says a word (a **hung** peer). Both hold
data shards, the ones a restore asks for first. ``restore`` and ``status``
finish without waiting out the hung peer's timeout: the listener sees each
connection given up long before the probe timeout, and at most one per pack
read at once.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import attrs
import pytest

from p2pbackup.app import operations
from p2pbackup.app.home import Home
from p2pbackup.engine.index import Index
from p2pbackup.engine.repository import PROBE_SECONDS
from p2pbackup.maintenance.status import PROBE_TIMEOUT
from p2pbackup.net.network import DEFAULT_CONNECT_TIMEOUT

from .cli_helpers import cli_ok, make_source, restored, tree_state
from .test_network_e2e import new_node

pytestmark = pytest.mark.slow


class HungPeer:
    """Accepts TCP connections on 127.0.0.1:``port`` and never answers; notes
    when each connection came and when the other side gave it up."""

    def __init__(self, port: int) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", port))
        self._socket.listen(16)
        self._socket.settimeout(0.1)
        self._stop = threading.Event()
        #: [accepted, given up (None: still open)] per connection, monotonic seconds.
        self.connections: list[list[float | None]] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._socket.accept()
            except TimeoutError:
                continue
            record: list[float | None] = [time.monotonic(), None]
            self.connections.append(record)
            threading.Thread(target=self._hold, args=(conn, record), daemon=True).start()

    def _hold(self, conn: socket.socket, record: list[float | None]) -> None:
        with conn:
            try:
                while conn.recv(65536):  # the handshake's first message; never answered
                    pass
            except OSError:
                pass
            record[1] = time.monotonic()

    def held(self, start: int = 0) -> list[float]:
        """Seconds each connection from the ``start``-th on was held open."""
        now = time.monotonic()
        return [
            (now if closed is None else closed) - opened  # type: ignore[operator]
            for opened, closed in self.connections[start:]
        ]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()


def data_shard_holders(home: Path) -> Counter[str]:
    """How many packs each peer holds a data shard of (index < k): the
    shards a restore asks for first."""
    index = Index(Home(home).index_path)
    try:
        return Counter(
            peer for _pack, k, _n, shards in index.pack_placements() for peer, i in shards if i < k
        )
    finally:
        index.close()


def test_a_refusing_and_a_hung_peer_hold_up_neither_restore_nor_status(tmp_path: Path) -> None:
    nodes = [new_node(tmp_path / f"node{i}") for i in range(5)]
    hung: HungPeer | None = None
    try:
        for node in nodes:
            node.start()
        home = tmp_path / "owner"
        # Small packs, so that 7 MiB spans several and every peer holds data
        # shards of some.
        config = attrs.evolve(operations.default_config(3, 5), pack_size=1 << 20)
        operations.init_home(Home(home), config)
        for node in nodes:
            cli_ok("peer", "add", node.address, node.node_id, home=home)
        source = make_source(tmp_path / "source", big=7 << 20)
        before = tree_state(source)
        snapshot = cli_ok("backup", source, home=home).lines[-1]

        by_id = {node.node_id: node for node in nodes}
        ranked = [by_id[peer] for peer, _count in data_shard_holders(home).most_common()]
        hung_node, refusing = ranked[0], ranked[1]
        refusing.kill()
        hung_node.kill()
        hung = HungPeer(int(hung_node.address.rsplit(":", 1)[1]))

        started = time.monotonic()
        target = tmp_path / "restored"
        cli_ok("restore", snapshot, "--target", target, home=home)
        took = time.monotonic() - started
        assert tree_state(restored(target, source)) == before
        # Asked first (it holds the most data shards), given up on as soon as
        # the others had answered, and asked no more for the rest of the run:
        # at most once per pack read at once.
        assert 1 <= len(hung.connections) <= 2, hung.connections
        assert max(hung.held()) < PROBE_SECONDS, hung.held()
        # Far below what waiting for it would cost: its connect timeout.
        assert took < DEFAULT_CONNECT_TIMEOUT, took

        asked = len(hung.connections)
        report = json.loads(cli_ok("status", "--json", home=home).stdout)
        online = {peer["peer_id"]: peer for peer in report["peers"]}
        assert {p for p, peer in online.items() if not peer["online"]} == {
            hung_node.node_id,
            refusing.node_id,
        }
        # The hung peer was asked once, and given up on once the others had
        # answered: well within the probe timeout, not at it.
        assert len(hung.connections) == asked + 1
        [held] = hung.held(asked)
        assert held < PROBE_TIMEOUT - 1, held
        problem = online[hung_node.node_id]["problem"]
        waited = re.fullmatch(r"no answer within ([0-9.]+) s, the others within [0-9.]+ s", problem)
        assert waited and float(waited.group(1)) < PROBE_TIMEOUT - 1, problem
    finally:
        if hung is not None:
            hung.close()
        errors = [node.stop() for node in nodes]
    assert all("Traceback" not in err for err in errors), errors
