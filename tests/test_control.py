"""The control socket: the CLI's commands run by the home's daemon."""

from __future__ import annotations

import itertools
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from p2pbackup.app import requests
from p2pbackup.app.home import Home
from p2pbackup.app.service import EXIT_ERROR, Service
from p2pbackup.cli import main as cli
from p2pbackup.errors import RemoteProtocolError
from p2pbackup.node import control

from .cli_helpers import (
    CLI,
    ODD_NAME,
    World,
    all_shards,
    base_env,
    cli_ok,
    holding_lock,
    interruptible,
    make_source,
    make_world,
    restored,
    run_cli,
)

STATUS = control.ControlRequest("status")


def test_lines_decode_whatever_the_chunking() -> None:
    stream = b"".join(control.encode_message({"out": f"line {i} \u00e9"}) for i in range(5))
    decoder = control.LineDecoder()
    got = []
    for i in range(len(stream)):
        got.extend(decoder.feed(stream[i : i + 1]))
    assert got == [{"out": f"line {i} \u00e9"} for i in range(5)]


@pytest.mark.parametrize(
    ("data", "problem"),
    [(b"{nope\n", "not a JSON line"), (b"[1]\n", "not a JSON object")],
)
def test_junk_lines_are_protocol_errors(data: bytes, problem: str) -> None:
    with pytest.raises(RemoteProtocolError, match=problem):
        control.LineDecoder().feed(data)


def test_an_endless_line_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="longer than"):
        control.LineDecoder().feed(b"x" * (control.MAX_LINE + 1))


#: Lines that are JSON by their syntax but that Python cannot read: a number
#: of more digits than it converts, arrays nested deeper than it recurses.
UNREADABLE_LINES = [
    b'{"v": 2, "command": "status", "args": {"n": ' + b"9" * 5000 + b"}}\n",
    b"[" * 200_000 + b"\n",
    b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b"\n",
]


@pytest.mark.parametrize("line", UNREADABLE_LINES, ids=["long-number", "deep-array", "deep-object"])
def test_a_line_too_long_a_number_or_too_deep_is_a_protocol_error(line: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="not a JSON line"):
        control.LineDecoder().feed(line)
    # The same, a byte at a time: nothing until the end of the line, then the error.
    decoder = control.LineDecoder()
    for i in range(len(line) - 1):
        assert decoder.feed(line[i : i + 1]) == []
    with pytest.raises(RemoteProtocolError, match="not a JSON line"):
        decoder.feed(line[-1:])


def _chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def _decode_all(chunks: list[bytes]) -> list[dict[str, object]]:
    """Every object the chunks hold, or RemoteProtocolError (nothing else)."""
    decoder = control.LineDecoder()
    return [message for chunk in chunks for message in decoder.feed(chunk)]


#: Pieces that JSON parsers stumble on, for lines made of them.
_PIECES = [b"[", b"]", b"{", b"}", b'"', b":", b",", b"\\", b"\\u", b"d800", b"\n", b"-",
           b"1e999", b"9" * 4400, b"0", b"null", b"NaN", b"\xff", b"\xc3", b"\x00", b" ",
           b'{"v": 2', b'"command": "status"', b"\xfe\xff", b"\x00\x00"]  # fmt: skip


@given(st.binary(max_size=4096), st.lists(st.integers(min_value=0), max_size=8))
def test_random_bytes_decode_or_are_a_protocol_error(data: bytes, cuts: list[int]) -> None:
    try:
        messages = _decode_all(_chunked(data, cuts))
    except RemoteProtocolError:
        return
    assert all(isinstance(m, dict) for m in messages)


@given(
    st.lists(st.sampled_from(_PIECES), max_size=60),
    st.integers(min_value=0, max_value=200),
    st.lists(st.integers(min_value=0), max_size=8),
)
def test_lines_of_awkward_pieces_decode_or_are_a_protocol_error(
    pieces: list[bytes], depth: int, cuts: list[int]
) -> None:
    data = b"[" * depth * 10 + b"".join(pieces) + b"\n"
    try:
        messages = _decode_all(_chunked(data, cuts))
    except RemoteProtocolError:
        return
    assert all(isinstance(m, dict) for m in messages)


@pytest.mark.parametrize(
    ("request_", "problem"),
    [
        ({"v": 1, "argv": ["backup"], "cwd": "/"}, "version 1; this daemon speaks 2"),
        ({"v": 2, "command": ["backup"], "args": {}}, "command must be"),
        ({"v": 2, "command": "backup", "args": ["/x"]}, "args must be a JSON object"),
    ],
)
def test_bad_requests_name_what_is_wrong(request_: dict[str, object], problem: str) -> None:
    with pytest.raises(RemoteProtocolError, match=problem):
        control.parse_request(request_)


def test_a_request_survives_its_line() -> None:
    # A file name that is not UTF-8 is a str with lone surrogates: it has no
    # UTF-8 form, but must reach the daemon (and come back in output) whole.
    odd = os.fsdecode(b"/home/me/caf\xe9")
    sent = control.ControlRequest("backup", {"paths": [odd], "json": True})
    line = control.encode_message(control.request_message(sent, progress=True))
    assert line.isascii()
    [message] = control.LineDecoder().feed(line)
    assert control.parse_request(message) == sent
    assert control.wants_progress(message)
    assert not control.wants_progress(control.request_message(sent))


async def test_output_streams_then_the_exit_code(tmp_path: Path, nursery: trio.Nursery) -> None:
    path = tmp_path / "control.sock"
    seen: list[control.ControlRequest] = []

    async def handler(
        request: control.ControlRequest,
        write: control.LineSink,
        progress: control.LineSink | None,
    ) -> control.Outcome:
        seen.append(request)
        for i in range(3):
            write(f"step {i}")
            await trio.sleep(0)
        return control.Outcome(3, "some packs could not be restored")

    await nursery.start(control.serve_control, path, handler)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    lines: list[str] = []
    request = control.ControlRequest("restore", {"snapshot": "latest", "target": "/home/me/x"})
    outcome = await control.forward(path, request, write=lines.append)
    assert outcome == control.Outcome(3, "some packs could not be restored")
    assert lines == ["step 0", "step 1", "step 2"]
    assert seen == [request]
    # Nothing listening: the CLI runs the command itself.
    assert await control.forward(tmp_path / "none.sock", STATUS, write=print) is None


async def test_progress_goes_only_to_a_client_that_shows_it(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    path = tmp_path / "control.sock"
    offered: list[bool] = []

    async def handler(
        request: control.ControlRequest,
        write: control.LineSink,
        progress: control.LineSink | None,
    ) -> control.Outcome:
        offered.append(progress is not None)
        write("start")
        if progress is not None:
            progress("backup: 3 files [  0.1s]")
            progress("")
        write("done")
        return control.Outcome(0)

    await nursery.start(control.serve_control, path, handler)
    lines: list[str] = []
    shown: list[str] = []
    backup = control.ControlRequest("backup", {"paths": ["/home/me"]})
    outcome = await control.forward(path, backup, write=lines.append, progress=shown.append)
    assert outcome == control.Outcome(0) and lines == ["start", "done"]
    assert shown == ["backup: 3 files [  0.1s]", ""]
    lines.clear()
    assert await control.forward(path, backup, write=lines.append) == control.Outcome(0)
    assert lines == ["start", "done"]
    assert offered == [True, False]


class SlowCommand:
    """A handler whose ``backup`` writes a line, then works until cancelled;
    any other command answers at once."""

    def __init__(self) -> None:
        self.stopped = trio.Event()

    async def __call__(
        self,
        request: control.ControlRequest,
        write: control.LineSink,
        progress: control.LineSink | None,
    ) -> control.Outcome:
        if request.command != "backup":
            write("quick")
            return control.Outcome(0)
        write("working")
        try:
            await trio.sleep_forever()
        finally:
            # A killed backup's cleanup takes a moment; the client that
            # waits for the daemon's close must see it done.
            with trio.CancelScope(shield=True):
                await trio.sleep(0.2)
            self.stopped.set()


async def _connect_and_ask(path: Path, command: str) -> trio.SocketStream:
    stream = await trio.open_unix_socket(str(path))
    await stream.send_all(control.encode_message(control.request_message(
        control.ControlRequest(command))))  # fmt: skip
    return stream


async def test_a_client_that_goes_away_cancels_its_command_and_nothing_else(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    path = tmp_path / "control.sock"
    handler = SlowCommand()
    await nursery.start(control.serve_control, path, handler)
    stream = await _connect_and_ask(path, "backup")
    assert await stream.receive_some(65536) == control.encode_message({"out": "working"})
    await stream.aclose()
    with trio.fail_after(10):
        await handler.stopped.wait()
        # Logged once the command's cancellation is over, just after.
        while "the client of `backup` went away; it was cancelled" not in caplog.text:
            await trio.sleep(0.01)
    # The daemon answers the next client as ever.
    lines: list[str] = []
    assert await control.forward(path, STATUS, write=lines.append) == control.Outcome(0)
    assert lines == ["quick"]


async def test_a_client_that_stops_reading_and_leaves_is_only_its_own_loss(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    path = tmp_path / "control.sock"

    async def chatty(
        request: control.ControlRequest,
        write: control.LineSink,
        progress: control.LineSink | None,
    ) -> control.Outcome:
        for i in range(20_000):  # more than any socket buffer holds
            write(f"line {i} " + "x" * 100)
            await trio.sleep(0)
        return control.Outcome(0)

    await nursery.start(control.serve_control, path, chatty)
    for _ in range(3):
        stream = await _connect_and_ask(path, "ls")
        await stream.receive_some(100)  # the start of the first line, as `head -c` would
        await stream.aclose()
    lines: list[str] = []
    with trio.fail_after(20):
        assert await control.forward(path, STATUS, write=lines.append) == control.Outcome(0)
    assert len(lines) == 20_000


async def test_an_interrupted_client_returns_once_the_command_has_stopped(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    path = tmp_path / "control.sock"
    handler = SlowCommand()
    await nursery.start(control.serve_control, path, handler)
    lines: list[str] = []

    def write_then_interrupted(line: str) -> None:
        lines.append(line)
        raise KeyboardInterrupt  # Ctrl-C as the line is shown

    backup = control.ControlRequest("backup")
    with pytest.raises(KeyboardInterrupt), trio.fail_after(10):
        await control.forward(path, backup, write=write_then_interrupted)
    # forward returned only after the daemon's side of the command had
    # cleaned up (it shuts its sending side and waits for the daemon's close).
    assert handler.stopped.is_set()
    assert lines == ["working"]


async def test_a_handlers_bug_is_its_clients_error_and_the_daemon_goes_on(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "control.sock"

    async def buggy(
        request: control.ControlRequest,
        write: control.LineSink,
        progress: control.LineSink | None,
    ) -> control.Outcome:
        if request.command == "status":
            return control.Outcome(0)
        write("about to fail")
        raise ZeroDivisionError("division by zero")

    await nursery.start(control.serve_control, path, buggy)
    lines: list[str] = []
    outcome = await control.forward(path, control.ControlRequest("check"), write=lines.append)
    assert outcome == control.Outcome(
        1,
        "`check` failed in the daemon: ZeroDivisionError: division by zero "
        "(a bug; the traceback is in serve's log)",
    )
    assert lines == ["about to fail"]
    assert "`check` failed unexpectedly" in caplog.text and "Traceback" in caplog.text
    assert await control.forward(path, STATUS, write=print) == control.Outcome(0)


def test_progress_lines_go_to_a_sink_rate_limited_and_cleared_at_the_end() -> None:
    from p2pbackup.engine.progress import Progress

    sent: list[str] = []
    progress = Progress("restore", sink=sent.append)
    progress.update("pack 1")
    progress.update("pack 2")  # within a fifth of a second: dropped
    progress.update("pack 3", force=True)
    progress.close()
    progress.close()
    assert [line.split(" [")[0] for line in sent[:2]] == ["restore: pack 1", "restore: pack 3"]
    assert sent[2:] == [""]
    silent: list[str] = []
    off = Progress("restore", sink=silent.append, enabled=False)
    off.update("pack 1")
    off.close()
    assert silent == []


def backup_on_a_terminal(home: Path, source: Path) -> tuple[int, bytes]:
    """Run ``backup`` with its stderr on a pseudo-terminal, as a user at a
    terminal would: (exit code, what the terminal got)."""
    import pty

    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [*CLI, "--home", str(home), "backup", str(source)],
            stdout=subprocess.DEVNULL,
            stderr=terminal,
            stdin=subprocess.DEVNULL,
            env=base_env(),
        )
        os.close(terminal)
        shown = bytearray()
        while True:
            try:
                data = os.read(controller, 65536)
            except OSError:  # the terminal's last holder closed it
                break
            if not data:
                break
            shown += data
        return process.wait(timeout=60), bytes(shown)
    finally:
        os.close(controller)


def answers(path: Path) -> bool:
    """Whether a daemon listens on the control socket at ``path`` (one left
    by a serve that was killed is there, but nobody answers)."""
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def start_daemon(home: Path) -> subprocess.Popen[bytes]:
    """``serve`` for ``home`` on a free loopback port, once its control socket is there."""
    process = subprocess.Popen(
        [*CLI, "--home", str(home), "serve", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=base_env(),
    )
    deadline = time.monotonic() + 30
    while not answers(home / "control.sock"):
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            _out, err = process.communicate(timeout=10)
            raise AssertionError(f"no control socket in {home}: {err.decode(errors='replace')}")
        time.sleep(0.1)
    return process


@pytest.mark.slow
def test_the_cli_hands_commands_to_a_running_daemon(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=1, n=3)
    make_source(tmp_path / "work" / "src", big=100_000)
    process = start_daemon(world.home)
    try:
        socket_path = world.home / "control.sock"
        assert oct(socket_path.stat().st_mode & 0o777) == "0o600"
        # A relative path means the user's directory, not the daemon's.
        result = run_cli("backup", "src", "--json", home=world.home, cwd=tmp_path / "work")
        assert result.returncode == 0, str(result)
        summary = json.loads(result.stdout)
        assert summary["files_new"] > 5
        listed = cli_ok("snapshots", "--json", home=world.home).stdout
        assert summary["snapshot_id"] in listed
        # A file name that is not UTF-8 comes back whole, and the daemon lives on.
        files = cli_ok("ls", "latest", home=world.home).stdout
        assert os.fsdecode(ODD_NAME) in files
        assert process.poll() is None
        # An expected failure in the daemon is one line and an exit code here.
        failed = run_cli("restore", "feedbeef", "--target", "out", home=world.home)
        assert failed.returncode == 1
        assert failed.stderr.startswith("p2pbackup: error: ") and "feedbeef" in failed.stderr
        assert "Traceback" not in failed.stderr
        log = (world.home / "serve.log").read_text()
        assert log.count("running `backup` for a client") == 1
        assert log.count("running `snapshots` for a client") == 1
        # On a terminal, the daemon's progress shows there, in place.
        code, shown = backup_on_a_terminal(world.home, make_source(tmp_path / "more", seed=4))
        assert code == 0
        assert b"\r\x1b[Kbackup: " in shown and b" files, " in shown
        assert b"Traceback" not in shown
        # P2PBACKUP_LOCAL=1: this process does the work itself.
        local = run_cli("snapshots", home=world.home, env=base_env(P2PBACKUP_LOCAL="1"))
        assert local.returncode == 0
        assert (world.home / "serve.log").read_text().count("running `snapshots` for a client") == 1
    finally:
        process.terminate()
        _out, err = process.communicate(timeout=10)
    assert b"Traceback" not in err
    assert not (world.home / "control.sock").exists()
    assert os.path.exists(world.home / "serve.log")


async def test_a_home_deeper_than_a_socket_path_allows_still_has_one(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "control.sock"
    assert len(os.fsencode(path)) > 108  # past every system's limit

    async def handler(
        request: control.ControlRequest,
        write: control.LineSink,
        progress: control.LineSink | None,
    ) -> control.Outcome:
        write("hello")
        return control.Outcome(0)

    await nursery.start(control.serve_control, path, handler)
    assert path.exists() and oct(path.stat().st_mode & 0o777) == "0o600"
    lines: list[str] = []
    assert await control.forward(path, STATUS, write=lines.append) == control.Outcome(0)
    assert lines == ["hello"]


async def test_no_socket_is_a_warning_not_a_failure(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(
        request: control.ControlRequest,
        write: control.LineSink,
        progress: control.LineSink | None,
    ) -> control.Outcome:
        raise AssertionError("never called")

    missing = tmp_path / "no-such-dir" / "control.sock"
    await nursery.start(control.serve_control, missing, handler)
    assert "no control socket" in caplog.text
    assert await control.forward(missing, STATUS, write=print) is None


def random_files(root: Path, count: int) -> Path:
    """``count`` files of 40 MiB of random data: a backup of them takes a while."""
    root.mkdir()
    for i in range(count):
        (root / f"part{i}.bin").write_bytes(os.urandom(40 << 20))
    return root


def backup_under_way(world: World, source: Path) -> subprocess.Popen[bytes]:
    """A client backing ``source`` up through the daemon, once the daemon has
    stored the first pack of it (and has most of it still to store)."""
    backup = subprocess.Popen(
        [*CLI, "--home", str(world.home), "backup", str(source)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=base_env(),
        preexec_fn=interruptible,
    )
    log = world.home / "serve.log"
    stored_before = len(all_shards(world.peers))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        started = "running `backup`" in (log.read_text() if log.exists() else "")
        if started and len(all_shards(world.peers)) > stored_before:
            return backup
        time.sleep(0.05)
    backup.kill()
    raise AssertionError("the backup did not start storing within a minute")


@pytest.mark.slow
def test_sigterm_mid_backup_stops_the_daemon_cleanly_and_loses_nothing(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=2, n=3)
    first = make_source(tmp_path / "first", seed=2)
    assert run_cli("backup", first, home=world.home).returncode == 0
    big = random_files(tmp_path / "big", 6)
    serve = start_daemon(world.home)
    try:
        # Stop the daemon once its first packs of the new data are out.
        backup = backup_under_way(world, big)
        serve.send_signal(signal.SIGTERM)
        out, err = serve.communicate(timeout=30)
        client_out, client_err = backup.communicate(timeout=30)
    finally:
        if serve.poll() is None:
            serve.kill()
    assert serve.returncode == 0, err
    assert b"stopping" in out and b"Traceback" not in err
    # The client was told, in one line, and no snapshot was claimed.
    assert backup.returncode != 0
    assert client_err.decode().startswith("p2pbackup: error: ")
    assert b"Traceback" not in client_err and b"snapshot" not in client_out
    # Nothing half-written: the repository checks clean, and is usable at once.
    local = base_env(P2PBACKUP_LOCAL="1")
    assert run_cli("check", "--read-data", home=world.home, env=local).returncode == 0
    again = run_cli("backup", big, "--json", home=world.home, env=local, timeout=300)
    assert again.returncode == 0, str(again)
    assert len(json.loads(cli_ok("snapshots", "--json", home=world.home).stdout)) == 2
    restored = tmp_path / "restored"
    cli_ok("restore", "latest", "--target", restored, home=world.home, timeout=300)
    assert all(
        (restored / p.relative_to("/")).read_bytes() == p.read_bytes() for p in big.iterdir()
    )


def stop_daemon(process: subprocess.Popen[bytes]) -> bytes:
    """Stop ``serve`` as systemd would; its stderr, which must hold no traceback."""
    if process.poll() is None:
        process.terminate()
    _out, err = process.communicate(timeout=30)
    assert b"Traceback" not in err, err.decode(errors="replace")
    return err


def ask_raw(home: Path, data: bytes) -> bytes:
    """Send ``data`` to the home's control socket; the reply, up to the daemon's close."""
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(30)
        client.connect(str(home / "control.sock"))
        client.sendall(data)
        reply = b""
        while chunk := client.recv(65536):
            reply += chunk
        return reply


@pytest.mark.slow
def test_no_line_on_the_control_socket_ends_the_daemon(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=1, n=2)
    process = start_daemon(world.home)
    try:
        junk = [*UNREADABLE_LINES, b"\xff\xfe\x00junk\n", b"[1, 2]\n", b'{"v": 2, "command": 7}\n']
        for line in junk:
            reply = json.loads(ask_raw(world.home, line))
            assert reply["exit"] == control.EXIT_BAD_REQUEST and reply["error"], reply
            assert process.poll() is None, line[:40]
        # And the daemon still runs commands.
        assert cli_ok("snapshots", home=world.home).lines == ["no snapshots yet"]
        assert "running `snapshots` for a client" in (world.home / "serve.log").read_text()
        # Killed outright, serve leaves its socket: the CLI says so, and runs
        # the command itself.
        process.kill()
        process.wait(timeout=10)
        killed = run_cli("snapshots", home=world.home)
        assert killed.returncode == 0 and killed.lines == ["no snapshots yet"], str(killed)
        assert killed.stderr.startswith(
            f"p2pbackup: warning: the serve of {world.home} stopped unexpectedly"
        ), str(killed)
        # The next serve replaces the socket, and the CLI is quiet again.
        process = start_daemon(world.home)
        assert cli_ok("snapshots", home=world.home).lines == ["no snapshots yet"]
    finally:
        stop_daemon(process)


@pytest.mark.slow
def test_a_client_that_goes_away_early_is_its_business_only(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=1, n=2)
    many = tmp_path / "many"
    many.mkdir()
    # Long names: the listing is more than the socket's buffers hold, so the
    # daemon is still sending when the client goes.
    for i in range(4000):
        (many / f"{i:05}-{'n' * 150}").write_text(str(i))
    world.backup(many)
    process = start_daemon(world.home)
    try:
        ls_head = f"{shlex.join(CLI)} --home {shlex.quote(str(world.home))} ls latest | head -2"
        for _ in range(3):
            piped = subprocess.run(
                ls_head, shell=True, capture_output=True, env=base_env(), timeout=60
            )
            assert piped.returncode == 0 and len(piped.stdout.splitlines()) == 2, piped
            assert b"Traceback" not in piped.stderr, piped.stderr
            assert process.poll() is None
        # A client that asks and leaves without reading a byte.
        ls = control.request_message(control.ControlRequest("ls", {"snapshot": "latest"}))
        for _ in range(3):
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(world.home / "control.sock"))
                client.sendall(control.encode_message(ls))
        # The daemon lives on and answers the next command in full.
        listed = cli_ok("ls", "latest", home=world.home).lines
        assert sum("n" * 150 in line for line in listed) == 4000
        assert process.poll() is None
        log = (world.home / "serve.log").read_text()
        assert log.count("running `ls` for a client") == 7
        assert "went away" in log
    finally:
        err = stop_daemon(process)
    assert process.returncode == 0 and b"Broken pipe" not in err


@pytest.mark.slow
def test_ctrl_c_cancels_the_backup_in_the_daemon(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=2, n=3)
    world.backup(make_source(tmp_path / "first", seed=2))
    # Large enough that the backup is far from done when the client is interrupted.
    big = random_files(tmp_path / "big", 8)
    serve = start_daemon(world.home)
    try:
        log = world.home / "serve.log"
        # Interrupt the client once the daemon is storing packs of the new data.
        backup = backup_under_way(world, big)
        backup.send_signal(signal.SIGINT)
        out, err = backup.communicate(timeout=30)
        assert backup.returncode == 130, err
        assert err == b"p2pbackup: interrupted\n" and b"snapshot" not in out
        # The daemon stopped the backup (before the client returned), and lives on.
        assert "the client of `backup` went away; it was cancelled" in log.read_text()
        assert serve.poll() is None
        assert len(json.loads(cli_ok("snapshots", "--json", home=world.home).stdout)) == 1
        # The repository is as a killed backup leaves it: it checks clean, and
        # the next backup (through the daemon again) succeeds.
        cli_ok("check", "--read-data", home=world.home, timeout=300)
        again = run_cli("backup", big, "--json", home=world.home, timeout=300)
        assert again.returncode == 0, str(again)
        assert len(json.loads(cli_ok("snapshots", "--json", home=world.home).stdout)) == 2
        cli_ok("check", home=world.home)
        assert serve.poll() is None
    finally:
        stop_daemon(serve)
    assert serve.returncode == 0


def test_the_cli_says_when_a_serve_does_not_answer(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=1, n=2)
    home = world.home
    # A serve that stopped unexpectedly leaves its socket, where nobody answers.
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(home / "control.sock"))
    dead.close()
    result = run_cli("snapshots", home=home)
    assert result.returncode == 0 and result.lines == ["no snapshots yet"], str(result)
    assert result.stderr == (
        f"p2pbackup: warning: the serve of {home} stopped unexpectedly (see {home}/serve.log): "
        "nothing stores for friends or runs scheduled backups until `p2pbackup serve` runs "
        "again; running `snapshots` in this process\n"
    )
    # P2PBACKUP_LOCAL=1 asks for this process: nothing to warn about.
    cli_ok("snapshots", home=home, env=base_env(P2PBACKUP_LOCAL="1"))
    # A serve that holds the home but has no socket (yet).
    (home / "control.sock").unlink()
    with holding_lock(home, "serve.lock"):
        result = run_cli("snapshots", home=home)
    assert result.returncode == 0 and result.lines == ["no snapshots yet"], str(result)
    assert result.stderr == (
        f"p2pbackup: warning: serve (pid {os.getpid()}) does not answer on "
        f"{home}/control.sock (still starting? see {home}/serve.log); "
        "running `snapshots` in this process\n"
    )
    # No serve, and none that stopped unexpectedly: the CLI just runs it.
    cli_ok("snapshots", home=home)
    assert Home(home).serving_pid() is None


# -- typed requests and the service's answer ------------------------------------------------

ODD_PATH = os.fsdecode(b"/home/caf\xe9")  # not UTF-8: a str with a lone surrogate

#: One request of each command, with no argument left at its default, and a
#: command line that asks for it.
SAMPLES: list[tuple[str, requests.Request]] = [
    (
        f"backup /home/me {ODD_PATH} --exclude *.tmp --tag daily --tag é --json "
        "--exclude-file /x.txt --exclude-if-present CACHEDIR.TAG --one-file-system "
        "--files-from /list.txt --dry-run --skip-if-unchanged --takeover",
        requests.BackupRequest(
            paths=("/home/me", ODD_PATH),
            exclude=("*.tmp",),
            exclude_file=("/x.txt",),
            exclude_if_present=("CACHEDIR.TAG",),
            one_file_system=True,
            files_from=("/list.txt",),
            tags=("daily", "é"),
            takeover=True,
            dry_run=True,
            skip_if_unchanged=True,
            json=True,
        ),
    ),
    (
        "restore latest --target /tmp/out --path /home/me --overwrite --json",
        requests.RestoreRequest(
            snapshot="latest", target="/tmp/out", path="/home/me", overwrite=True, json=True
        ),
    ),
    (
        "snapshots --tag a,b --tag c --path /home/me --host h --json",
        requests.SnapshotsRequest(tag=("a,b", "c"), path=("/home/me",), host=("h",), json=True),
    ),
    (
        "stats 0123 --mode raw-data --by-peer --tag a --json",
        requests.StatsRequest(
            snapshots=("0123",), mode="raw-data", by_peer=True, tag=("a",), json=True
        ),
    ),
    (
        "tag 0123 latest --add a,b --remove c --json",
        requests.TagRequest(snapshots=("0123", "latest"), add=("a,b",), remove=("c",), json=True),
    ),
    ("ls 0123abcd /home --json", requests.LsRequest(snapshot="0123abcd", path="/home", json=True)),
    ("forget 0123abcd latest", requests.ForgetRequest(snapshots=("0123abcd", "latest"))),
    ("prune --json", requests.PruneRequest(json=True)),
    (
        "diff 0123 latest --json",
        requests.DiffRequest(snapshot1="0123", snapshot2="latest", json=True),
    ),
    (
        "find *.jpg /home/*/x --snapshot 0123 --json",
        requests.FindRequest(patterns=("*.jpg", "/home/*/x"), snapshot=("0123",), json=True),
    ),
    ("dump latest /home/me/a.txt", requests.DumpRequest(snapshot="latest", path="/home/me/a.txt")),
    ("check --read-data --json", requests.CheckRequest(read_data=True, json=True)),
    ("status --json", requests.StatusRequest(json=True)),
    (
        "repair --grace 0 --rate 2M --json --for abababab",
        requests.RepairRequest(grace="0", rate="2M", json=True, owner="abababab"),
    ),
    ("leave --json", requests.LeaveRequest(json=True)),
    ("peer add-dir /mnt/disk", requests.PeerAddDirRequest(path="/mnt/disk")),
    (
        f"peer add 192.0.2.1:47470 {'ab' * 20}",
        requests.PeerAddRequest(address="192.0.2.1:47470", node_id="ab" * 20),
    ),
    ("peer list --json", requests.PeerListRequest(json=True)),
    (
        "peer rename dir-0123abcd disk-1",
        requests.PeerRenameRequest(id="dir-0123abcd", name="disk-1"),
    ),
    ("peer remove dir-0123abcd --force", requests.PeerRemoveRequest(id="dir-0123abcd", force=True)),
    (
        "peer find --count 3 --add --bootstrap 192.0.2.1:1 --json",
        requests.PeerFindRequest(count=3, add=True, bootstrap=("192.0.2.1:1",), json=True),
    ),
    ("friend add p2pb1-code", requests.FriendAddRequest(code="p2pb1-code")),
    ("friend list --json", requests.FriendListRequest(json=True)),
    (
        "friend remove abababab --force",
        requests.FriendRemoveRequest(id="abababab", force=True),
    ),
    ("delegate add abababab", requests.DelegateAddRequest(id="abababab")),
    ("delegate list --json", requests.DelegateListRequest(json=True)),
    ("delegate remove abababab", requests.DelegateRemoveRequest(id="abababab")),
]
REQUESTS = [request for _argv, request in SAMPLES]


def typed_from(command_line: str) -> requests.Request:
    """The request the command line builds from ``command_line`` (words split at spaces)."""
    args = cli.build_parser().parse_args(command_line.split())
    return cli._request(args.request, args)


def test_every_command_has_a_sample() -> None:
    assert sorted(requests.command_name(r) for r in REQUESTS) == sorted(requests.COMMANDS)


@pytest.mark.parametrize(
    ("command_line", "request_"), SAMPLES, ids=[requests.command_name(r) for r in REQUESTS]
)
def test_the_command_line_asks_for_each_request(
    command_line: str, request_: requests.Request
) -> None:
    assert typed_from(command_line) == request_


def test_paths_on_the_users_side_are_made_absolute_where_the_user_typed_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert typed_from("backup src /abs ../up") == requests.BackupRequest(
        paths=(str(tmp_path / "src"), "/abs", f"{tmp_path}/../up")
    )
    assert typed_from("restore latest --target out --path docs") == (
        requests.RestoreRequest(snapshot="latest", target=str(tmp_path / "out"), path="docs")
    )
    assert typed_from("peer add-dir disk") == requests.PeerAddDirRequest(
        path=str(tmp_path / "disk")
    )
    # Options left out take the request's defaults.
    assert typed_from("peer find") == requests.PeerFindRequest()


@pytest.mark.parametrize("request_", REQUESTS, ids=requests.command_name)
def test_a_typed_request_survives_the_control_socket(request_: requests.Request) -> None:
    name = requests.command_name(request_)
    line = control.encode_message(
        control.request_message(control.ControlRequest(name, requests.encode_arguments(request_)))
    )
    [message] = control.LineDecoder().feed(line)
    received = control.parse_request(message)
    assert requests.decode_arguments(requests.COMMANDS[received.command], received.args) == (
        request_
    )


def test_arguments_left_out_take_their_defaults_and_unknown_ones_are_ignored() -> None:
    decoded = requests.decode_arguments(
        requests.CheckRequest, {"read_data": True, "from_a_newer_client": 1}
    )
    assert decoded == requests.CheckRequest(read_data=True, json=False)


@pytest.mark.parametrize(
    ("sent", "problem"),
    [
        (control.ControlRequest("init"), "the daemon does not run `init`"),
        (control.ControlRequest("backup", {"paths": "/x"}), "paths must be a list of strings"),
        (control.ControlRequest("backup", {"paths": ["x"]}), "'x' is not an absolute path"),
        (control.ControlRequest("restore", {"snapshot": "latest"}), "needs the argument target"),
        (control.ControlRequest("peer find", {"count": True}), "count must be an integer"),
        (control.ControlRequest("peer find", {"count": 0}), "--count must be at least 1"),
    ],
)
async def test_the_daemon_refuses_a_request_it_cannot_run(
    tmp_path: Path, sent: control.ControlRequest, problem: str
) -> None:
    lines: list[str] = []
    outcome = await Service(Home(tmp_path)).answer(sent, lines.append, None)
    assert outcome.code == control.EXIT_BAD_REQUEST
    assert problem in outcome.error
    assert lines == []


async def test_an_expected_failure_in_the_daemon_is_the_clients_outcome(tmp_path: Path) -> None:
    lines: list[str] = []
    home = Home(tmp_path / "nothing-here")
    outcome = await Service(home).answer(control.ControlRequest("snapshots"), lines.append, None)
    assert outcome.code == EXIT_ERROR
    assert str(home.path) in outcome.error and "\n" not in outcome.error


@pytest.mark.slow
def test_a_restore_that_fails_in_the_daemon_says_so_to_its_client(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=1, n=3)
    source = make_source(tmp_path / "src", big=50_000)
    world.backup(source)
    target = tmp_path / "out"
    process = start_daemon(world.home)
    try:
        cli_ok("restore", "latest", "--target", target, home=world.home)
        edited = restored(target, source) / "docs" / "note0.txt"
        edited.write_text("changed since the backup\n")
        # A file in the way: the restore ends part done, and the client says so.
        conflict = run_cli("restore", "latest", "--target", target, home=world.home)
        assert conflict.returncode == 3, str(conflict)
        assert conflict.stderr == (
            "p2pbackup: error: the restore is incomplete (see the list above)\n"
        ), str(conflict)
        shown = source.absolute() / "docs" / "note0.txt"  # as the snapshot names it
        assert f"conflict (exists and differs; use --overwrite): {shown}" in conflict.lines
        # A path the snapshot does not have: refused, in one line, here.
        missing = run_cli(
            "restore", "latest", "--target", tmp_path / "out2", "--path", "/no/such",
            home=world.home,
        )  # fmt: skip
        assert missing.returncode == 1, str(missing)
        assert missing.stderr == ("p2pbackup: error: path /no/such is not in this snapshot\n"), str(
            missing
        )
        log = (world.home / "serve.log").read_text()
        assert log.count("running `restore` for a client") == 3
    finally:
        process.terminate()
        _out, err = process.communicate(timeout=10)
    # Neither went to the daemon's stderr or its log.
    for said in ("restore is incomplete", "not in this snapshot", "conflict"):
        assert said not in err.decode(), err.decode()
        assert said not in log


#: Samples of options a command's first sample leaves out.
MORE_SAMPLES = [
    (
        "forget --keep-daily 7 --keep-within 1y --keep-tag a,b --group-by paths --prune --dry-run",
        requests.ForgetRequest(
            keep_daily=7,
            keep_within="1y",
            keep_tag=("a,b",),
            group_by="paths",
            prune=True,
            dry_run=True,
        ),
    ),
    ("prune --dry-run", requests.PruneRequest(dry_run=True)),
    (
        "friend add p2pb1-code --name alice",
        requests.FriendAddRequest(code="p2pb1-code", name="alice"),
    ),
    (
        "backup /home --limit-upload 500 --limit-download 2000 --quiet",
        requests.BackupRequest(paths=("/home",), limit_upload=500, limit_download=2000, quiet=True),
    ),
    ("backup /home -v", requests.BackupRequest(paths=("/home",), verbose=True)),
    (
        "restore latest --target /tmp/out --include *.jpg --exclude cache --verify",
        requests.RestoreRequest(
            snapshot="latest",
            target="/tmp/out",
            include=("*.jpg",),
            exclude=("cache",),
            verify=True,
        ),
    ),
]


@pytest.mark.parametrize(("command_line", "request_"), MORE_SAMPLES)
def test_the_command_line_asks_for_each_option(
    command_line: str, request_: requests.Request
) -> None:
    assert typed_from(command_line) == request_
    name = requests.command_name(request_)
    arguments = json.loads(json.dumps(requests.encode_arguments(request_)))
    assert requests.decode_arguments(requests.COMMANDS[name], arguments) == request_
