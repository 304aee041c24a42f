"""``p2pbackup devnet``: N befriended nodes on loopback, and stopping them.

The command runs as a real process with real children; the test reads what it
prints as a user would, drives the nodes through the CLI, and checks by pid
that every child is gone after Ctrl-C (SIGINT); a node killed from outside is
reported once and the others go on.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import attrs
import pytest
import trio

from p2pbackup.app.devnet import DevnetNodeDied, open_devnet

from .cli_helpers import (
    CLI,
    KEY_RE,
    SNAPSHOT_ID_RE,
    base_env,
    cli_error,
    cli_ok,
    make_source,
    restored,
    tree_state,
)

NODE_LINE_RE = re.compile(r"^(node-\d\d)  node ([0-9a-f]{40})  at (\S+)  \(pid (\d+)\)$")


def gone(pid: int) -> bool:
    """No process has this pid any more (nor a zombie: devnet reaps its children)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@attrs.frozen
class ShownNode:
    name: str
    node_id: str
    address: str
    pid: int


@attrs.define
class DevnetProcess:
    """A ``p2pbackup devnet`` process and what it printed."""

    root: Path
    process: subprocess.Popen[bytes]
    lines: list[str] = attrs.Factory(list)
    nodes: list[ShownNode] = attrs.Factory(list)
    _queue: queue.Queue[str | None] = attrs.Factory(queue.Queue)

    @classmethod
    def start(cls, root: Path, count: int, *extra: str) -> DevnetProcess:
        process = subprocess.Popen(
            [*CLI, "devnet", "--nodes", str(count), "--dir", os.fspath(root), *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=base_env(),
        )
        devnet = cls(root, process)
        threading.Thread(target=devnet._read, daemon=True).start()
        return devnet

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self._queue.put(raw.decode(errors="replace").rstrip("\n"))
        self._queue.put(None)

    def read_until(self, prefix: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line {prefix!r} in time: {self.lines}") from None
            if line is None:
                raise AssertionError(f"devnet ended before {prefix!r}: {self.finish()}")
            self.lines.append(line)
            match = NODE_LINE_RE.match(line)
            if match:
                name, node_id, address, pid = match.groups()
                self.nodes.append(ShownNode(name, node_id, address, int(pid)))
            if line.startswith(prefix):
                return

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        """Wait for the end: exit status, the rest of stdout, all of stderr."""
        assert self.process.stderr is not None
        self.process.wait(timeout)
        err = self.process.stderr.read().decode(errors="replace")
        rest = []
        while (line := self._queue.get(timeout=10)) is not None:
            rest.append(line)
        self.lines.extend(rest)
        return self.process.returncode, "\n".join(rest), err

    def cleanup(self) -> None:
        """Whatever a failed test left running: this devnet and the children it showed."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        for node in self.nodes:
            if not gone(node.pid):
                os.kill(node.pid, signal.SIGKILL)


def test_devnet_refuses_too_few_nodes_and_a_used_directory(tmp_path: Path) -> None:
    message = cli_error("devnet", "--nodes", "3", "--dir", tmp_path / "net")
    assert "at least 4 nodes" in message and "3" in message
    assert not (tmp_path / "net" / "node-01").exists()
    (tmp_path / "used" / "node-02").mkdir(parents=True)
    message = cli_error("devnet", "--nodes", "4", "--dir", tmp_path / "used")
    assert str(tmp_path / "used" / "node-02") in message and "--dir" in message
    assert not (tmp_path / "used" / "node-01").exists()  # nothing was created
    # A code wider than a home's friends could never be the code used.
    message = cli_error("devnet", "--nodes", "6", "--shards", "4/10", "--dir", tmp_path / "wide")
    assert "--shards 4/10" in message and "5 friends" in message and "--nodes 11" in message
    assert not (tmp_path / "wide" / "node-01").exists()


@pytest.mark.slow
def test_devnet_nodes_are_friends_back_up_and_stop_on_ctrl_c(tmp_path: Path) -> None:
    root = tmp_path / "net"
    devnet = DevnetProcess.start(root, 4, "--shards", "2/3")
    try:
        devnet.read_until("running; Ctrl-C")
        shown = devnet.nodes
        assert [n.name for n in shown] == ["node-01", "node-02", "node-03", "node-04"]
        assert all(not gone(n.pid) for n in shown)
        assert len({n.address for n in shown}) == 4
        assert all(n.address.startswith("127.0.0.1:") for n in shown)
        # Each node's commands name its home; no recovery key is ever shown.
        text = "\n".join(devnet.lines)
        assert f"--home {root / 'node-02'} backup PATH" in text
        assert not KEY_RE.search(text)
        for number in range(1, 5):
            key_file = root / f"node-{number:02}.key"
            assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
            assert KEY_RE.fullmatch(key_file.read_text().strip())

        # Every node is every other node's friend, as the CLI lists them.
        home = root / "node-01"
        listed = json.loads(cli_ok("friend", "list", "--json", home=home).stdout)
        assert {f["node_id"] for f in listed} == {n.node_id for n in shown[1:]}
        assert {tuple(f["addresses"]) for f in listed} == {(n.address,) for n in shown[1:]}
        assert cli_ok("id", home=home).lines[-1] == shown[0].node_id

        # A backup from one home goes to its three friends, which store for a
        # friend only; a restore gives it all back.
        source = make_source(tmp_path / "source", big=200_000)
        before = tree_state(source)
        result = cli_ok("backup", source, home=root / "node-02")
        assert "(2-of-3 shards" in result.stdout, result.stdout  # --shards 2/3
        snapshot = result.lines[-1]
        assert SNAPSHOT_ID_RE.fullmatch(snapshot)
        for other in ("node-01", "node-03", "node-04"):
            assert list((root / other / "hosted").rglob("*")), f"{other} holds no shard"
        target = tmp_path / "restored"
        cli_ok("restore", snapshot, "--target", target, home=root / "node-02")
        assert tree_state(restored(target, source)) == before

        devnet.process.send_signal(signal.SIGINT)
        code, rest, err = devnet.finish()
        assert code == 0, (rest, err)
        assert err == ""
        assert rest.splitlines()[0] == "SIGINT: stopping every node"
        assert rest.splitlines()[-1] == f"stopped; the homes stay in {root}"
        assert all(gone(n.pid) for n in shown)
    finally:
        devnet.cleanup()

    # The homes that stayed start again: same nodes, new ports, friends as before.
    again = DevnetProcess.start(root, 4)
    try:
        again.read_until("running; Ctrl-C")
        assert f"devnet of 4 nodes in {root}, started again" in again.lines[0]
        assert [n.node_id for n in again.nodes] == [n.node_id for n in shown]
        listed = json.loads(cli_ok("friend", "list", "--json", home=root / "node-01").stdout)
        assert {tuple(f["addresses"]) for f in listed} == {(n.address,) for n in again.nodes[1:]}
        # node-02's snapshot comes back from its friends where they listen now.
        target = tmp_path / "restored-again"
        cli_ok("restore", snapshot, "--target", target, home=root / "node-02")
        assert tree_state(restored(target, source)) == before
        again.process.send_signal(signal.SIGINT)
        code, rest, err = again.finish()
        assert code == 0, (rest, err)
    finally:
        again.cleanup()
    # Another count than the homes there: said, with the count to use.
    message = cli_error("devnet", "--nodes", "5", "--dir", root)
    assert "holds 4 homes of an earlier devnet" in message and "--nodes 4" in message


@pytest.mark.slow
def test_a_node_killed_from_outside_is_reported_and_the_others_go_on(tmp_path: Path) -> None:
    root = tmp_path / "net"
    devnet = DevnetProcess.start(root, 4)
    try:
        devnet.read_until("running; Ctrl-C")
        victim = devnet.nodes[2]
        os.kill(victim.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not gone(victim.pid) and time.monotonic() < deadline:
            time.sleep(0.1)  # reaped by the devnet once it has noticed
        time.sleep(1)
        assert devnet.process.poll() is None, "the devnet stopped with one node"
        others = [n for n in devnet.nodes if n is not victim]
        assert not any(gone(n.pid) for n in others)
        # The others still answer for their homes.
        assert cli_ok("snapshots", home=root / "node-01").returncode == 0
        devnet.process.send_signal(signal.SIGINT)
        code, rest, err = devnet.finish()
        assert code == 0
        first, *_log_tail = err.splitlines()
        assert first == (
            f"node-03 (pid {victim.pid}) exited unexpectedly (killed by SIGKILL); "
            f"its log is {root / 'node-03.log'}; the other nodes go on"
        )
        assert "Traceback" not in err
        # Said once: the summary on the way out does not repeat it.
        assert "node-03" not in rest
        assert all(gone(n.pid) for n in devnet.nodes)
    finally:
        devnet.cleanup()


@pytest.mark.slow
async def test_stop_and_kill_are_expected_but_a_death_is_raised(tmp_path: Path) -> None:
    pids = []
    with pytest.raises(DevnetNodeDied) as raised:
        async with open_devnet(tmp_path / "net", 4) as devnet:
            pids = [node.pid for node in devnet.nodes]
            assert await devnet.stop(1) == 0  # serve exits cleanly on SIGTERM
            assert await devnet.kill(2) == -signal.SIGKILL
            assert not devnet.running(1) and not devnet.running(2) and devnet.running(3)
            await trio.sleep(0.3)  # neither counted as a failure
            os.kill(devnet.nodes[3].pid, signal.SIGTERM)
            await trio.sleep(30)
            raise AssertionError("the death of node-04 went unnoticed")
    assert raised.value.node == "node-04"
    assert raised.value.returncode == 0  # a polite exit, but nobody asked for it
    assert all(gone(pid) for pid in pids)
