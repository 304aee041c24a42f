"""Whole-system tests over the network: `p2pbackup serve` processes on 127.0.0.1.

Everything a user would do, through the CLI, with real processes, real sockets
and real kills (SIGKILL, not a polite shutdown).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from p2pbackup.core import formats, merkle
from p2pbackup.node.shardhost import ShardHost

from .cli_helpers import (
    CLI,
    SNAPSHOT_ID_RE,
    base_env,
    cli_error,
    cli_inprocess,
    cli_ok,
    make_source,
    restored,
    tree_state,
)

pytestmark = pytest.mark.slow

SERVING_RE = re.compile(r"^serving on (\S+)$")
NODE_RE = re.compile(r"^[0-9a-f]{40}$")


@attrs.define
class ServeProcess:
    home: Path
    node_id: str
    process: subprocess.Popen[bytes] | None = None
    address: str = ""
    #: What the last start printed, up to its ``serving on`` line.
    started: list[str] = attrs.Factory(list)

    def start(self, listen: str = "127.0.0.1:0", *extra: str, open_mode: bool = True) -> None:
        # Open by default: these nodes store for owners that are not their friends.
        mode = ["--open"] if open_mode else []
        self.process = subprocess.Popen(
            [*CLI, "--home", os.fspath(self.home), "serve", "--listen", listen, *mode, *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=base_env(),
        )
        assert self.process.stdout is not None
        deadline = time.monotonic() + 30
        lines = []
        while time.monotonic() < deadline:
            line = self.process.stdout.readline().decode()
            if not line:
                break
            lines.append(line)
            match = SERVING_RE.match(line.strip())
            if match:
                self.address = match.group(1)
                self.started = [line.rstrip("\n") for line in lines]
                assert f"node {self.node_id}\n" in lines
                return
        raise AssertionError(f"serve did not start: {lines} {self.stop()}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> str:
        """Stop politely (SIGTERM); return what it wrote on stderr."""
        if self.process is None:
            return ""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            _out, err = self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _out, err = self.process.communicate()
        return err.decode(errors="replace")

    def hosted_shards(self) -> list[Path]:
        return sorted(
            p
            for p in (self.home / "hosted" / "shards").rglob("*")
            if p.is_file() and re.fullmatch(r"[0-9a-f]{64}", p.name)
        )


def new_node(root: Path) -> ServeProcess:
    home = root / "home"
    assert cli_inprocess("--home", home, "init", "--recovery-key-file", root / "key") == 0
    result = cli_ok("id", home=home)
    node_id = result.lines[-1]
    assert NODE_RE.fullmatch(node_id), str(result)
    return ServeProcess(home, node_id)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[ServeProcess]]:
    started = [new_node(tmp_path / f"node{i}") for i in range(8)]
    try:
        for node in started:
            node.start()
        yield started
    finally:
        for node in started:
            node.stop()


def test_backup_to_eight_nodes_survives_five_killed_and_a_corrupt_shard(
    tmp_path: Path, nodes: list[ServeProcess]
) -> None:
    source = make_source(tmp_path / "source", seed=3)
    before = tree_state(source)
    home = tmp_path / "owner"
    cli_ok("init", "--shards", "3/8", "--recovery-key-file", tmp_path / "owner.key", home=home)
    for node in nodes:
        cli_ok("peer", "add", node.address, node.node_id, home=home)
    listed = cli_ok("peer", "list", home=home).stdout
    assert all(node.node_id in listed for node in nodes)

    result = cli_ok("backup", source, home=home)
    snapshot = result.lines[-1]
    assert SNAPSHOT_ID_RE.fullmatch(snapshot)
    assert all(node.hosted_shards() for node in nodes), "every node holds shards"

    # A corrupted shard on one node is detected and routed around.
    victim = nodes[7].hosted_shards()[0]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))
    target = tmp_path / "restore1"
    cli_ok("restore", snapshot, "--target", target, home=home)
    assert tree_state(restored(target, source)) == before

    # Five of eight killed: any three shards of each pack are enough.
    for node in nodes[3:]:
        node.kill()
    target = tmp_path / "restore2"
    cli_ok("restore", snapshot, "--target", target, home=home, timeout=300)
    assert tree_state(restored(target, source)) == before

    # The home is lost too: the recovery key and one surviving node suffice.
    shutil.rmtree(home)
    new_home = tmp_path / "new-home"
    survivor = nodes[1]
    result = cli_ok(
        "recover",
        "--recovery-key-file",
        tmp_path / "owner.key",
        "--peer",
        survivor.address,
        survivor.node_id,
        home=new_home,
        timeout=300,
    )
    assert "3 of 8" in result.stdout, str(result)  # peers reachable
    target = tmp_path / "restore3"
    cli_ok("restore", snapshot, "--target", target, home=new_home, timeout=300)
    assert tree_state(restored(target, source)) == before


def test_a_node_killed_mid_upload_restarts_consistent(tmp_path: Path) -> None:
    node = new_node(tmp_path / "node")
    other = new_node(tmp_path / "other")
    node.start()
    other.start()
    home = tmp_path / "owner"
    cli_ok("init", "--shards", "1/2", "--recovery-key-file", tmp_path / "owner.key", home=home)
    cli_ok("peer", "add", node.address, node.node_id, home=home)
    cli_ok("peer", "add", other.address, other.node_id, home=home)
    source = make_source(tmp_path / "source", seed=4, big=30_000_000)
    backup = subprocess.Popen(
        [*CLI, "--home", os.fspath(home), "backup", os.fspath(source)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=base_env(),
    )
    try:
        # Kill the node in the middle of an upload: its temp file is growing.
        uploads = node.home / "hosted" / "tmp"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
            p.stat().st_size > 0 for p in uploads.glob("*") if p.is_file()
        ):
            time.sleep(0.002)
        assert time.monotonic() < deadline, "the backup never reached the node"
        node.kill()
        # One of two peers died under it: a pack cannot get its two shards.
        assert backup.wait(60) != 0
    finally:
        if backup.poll() is None:
            backup.kill()
    node.start(listen=node.address)
    err = node.stop()
    assert "Traceback" not in err

    # Whatever the node kept is whole: each file matches the Merkle root its
    # metadata holds, and no file is unaccounted for.
    host = ShardHost.open(node.home / "hosted")
    try:
        owner_id = bytes.fromhex(cli_ok("id", home=home).lines[-1])
        shards, more = host.list(owner_id, None, 10_000)
        assert not more
        assert len(shards) == len(node.hosted_shards())
        for shard in shards:
            data = host.read(owner_id, shard.shard_id)
            assert len(data) == shard.size
            assert len(data) > formats.SHARD_HEADER_SIZE
            merkle.verify_root(data, shard.block_size, shard.merkle_root)
    finally:
        host.close()

    # And the next backup completes against the restarted node.
    node.start(listen=node.address)
    try:
        cli_ok("backup", source, home=home, timeout=300)
    finally:
        node.stop()
        other.stop()


def test_network_mistakes_are_one_clear_line(tmp_path: Path) -> None:
    node = new_node(tmp_path / "node")
    node.start()
    try:
        home = tmp_path / "owner"
        cli_ok("init", "--recovery-key-file", tmp_path / "owner.key", home=home)
        wrong = "ab" * 20
        message = cli_error("peer", "add", node.address, wrong, home=home)
        assert wrong in message and node.node_id in message
        message = cli_error("peer", "add", node.address, "not-a-node-id", home=home)
        assert "not a node id" in message
        message = cli_error("peer", "add", "localhost", node.node_id, home=home)
        assert "localhost" in message and "port" in message
        own = cli_ok("id", home=home).lines[-1]
        assert "own" in cli_error("peer", "add", node.address, own, home=home)
        # A second serve on the same home, and another home on a port in use.
        assert "already serving" in cli_error("serve", "--listen", "127.0.0.1:0", home=node.home)
        other = new_node(tmp_path / "other")
        assert node.address in cli_error("serve", "--listen", node.address, home=other.home)
        assert cli_ok("peer", "list", home=home).stdout.startswith("no peers")
        cli_ok("peer", "add", node.address, node.node_id, home=home)
        assert "already" in cli_error("peer", "add", node.address, node.node_id, home=home)
    finally:
        err = node.stop()
    assert "Traceback" not in err
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
    message = cli_error("peer", "add", closed, "cd" * 20, home=tmp_path / "owner")
    assert closed in message
    assert "not an initialised" in cli_error("id", home=tmp_path / "nowhere")
