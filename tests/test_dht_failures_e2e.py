"""A running node's DHT role under failure, through real ``serve`` processes.

A node whose DHT contacts are all gone must go on serving: publishing its
records then reaches nobody, which it logs and tries again later, and no
failure in its DHT tasks may end ``p2pbackup serve``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from .cli_helpers import cli_ok
from .test_network_e2e import new_node

pytestmark = pytest.mark.slow


def wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def log_lines(home: Path) -> list[dict[str, str]]:
    path = home / "serve.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def knows(home: Path, node_id: str) -> bool:
    """Whether the node of ``home`` saved ``node_id`` among its DHT neighbours."""
    path = home / "dht-state.json"
    if not path.exists():
        return False
    state = json.loads(path.read_text())
    return node_id in {n["node_id"] for n in state["neighbours"]}


def test_a_node_whose_only_dht_contact_died_survives_publishing(tmp_path: Path) -> None:
    contact = new_node(tmp_path / "contact")
    home = new_node(tmp_path / "home")
    peer = new_node(tmp_path / "peer")
    try:
        contact.start("127.0.0.1:0")
        peer.start("127.0.0.1:0")
        home.start("127.0.0.1:0", "--bootstrap", contact.address)
        wait_for(lambda: knows(home.home, contact.node_id), 30, "the node to join the DHT")
        contact.kill()  # the home node's only DHT contact, gone without a word
        # A new storage node changes the root holders: the node publishes its
        # root pointer, and the crawl for the nodes closest to it finds no one.
        cli_ok("peer", "add", peer.address, peer.node_id, home=home.home)

        def warned() -> bool:
            return any(
                line["level"] == "WARNING" and "root pointer" in line["message"]
                for line in log_lines(home.home)
            )

        wait_for(lambda: warned() or home.process.poll() is not None, 60, "the publish")  # type: ignore[union-attr]
        assert home.process is not None and home.process.poll() is None, home.stop()
        assert warned(), log_lines(home.home)
        # Still serving: the daemon runs the next command.
        listed = cli_ok("peer", "list", home=home.home).stdout
        assert peer.node_id in listed
        ran = [m for m in (line["message"] for line in log_lines(home.home)) if "client" in m]
        assert ran == ["running `peer add` for a client", "running `peer list` for a client"]
        assert home.process.poll() is None
    finally:
        errors = {node.home: node.stop() for node in (home, peer, contact)}
    assert not [e for e in errors.values() if "Traceback" in e], errors
