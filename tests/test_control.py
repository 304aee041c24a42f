"""The control socket: the CLI's commands run by the home's daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import trio

from p2pbackup.errors import RemoteProtocolError
from p2pbackup.node import control

from .cli_helpers import CLI, base_env, cli_ok, make_source, make_world, run_cli


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


@pytest.mark.parametrize(
    ("request_", "problem"),
    [
        ({"v": 2, "argv": [], "cwd": "/"}, "version 2"),
        ({"v": 1, "argv": "backup", "cwd": "/"}, "argv must be a list"),
        ({"v": 1, "argv": ["backup"], "cwd": "relative"}, "cwd must be an absolute"),
    ],
)
def test_bad_requests_name_what_is_wrong(request_: dict[str, object], problem: str) -> None:
    with pytest.raises(RemoteProtocolError, match=problem):
        control.parse_request(request_)


async def test_output_streams_then_the_exit_code(tmp_path: Path, nursery: trio.Nursery) -> None:
    path = tmp_path / "control.sock"
    seen: list[tuple[list[str], str]] = []

    async def handler(
        argv: list[str], cwd: str, write: object, progress: object
    ) -> tuple[int, str]:
        seen.append((argv, cwd))
        for i in range(3):
            write(f"step {i}")  # type: ignore[operator]
            await trio.sleep(0)
        return 3, "some packs could not be restored"

    await nursery.start(control.serve_control, path, handler)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    lines: list[str] = []
    errors: list[str] = []
    code = await control.forward(
        path, ["restore", "latest"], "/home/me", write=lines.append, report=errors.append
    )
    assert code == 3
    assert lines == ["step 0", "step 1", "step 2"]
    assert errors == ["some packs could not be restored"]
    assert seen == [(["restore", "latest"], "/home/me")]
    # Nothing listening: the CLI runs the command itself.
    assert await control.forward(tmp_path / "none.sock", [], "/", write=print, report=print) is None


async def test_progress_goes_only_to_a_client_that_shows_it(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    path = tmp_path / "control.sock"
    offered: list[bool] = []

    async def handler(
        argv: list[str], cwd: str, write: control.LineSink, progress: control.LineSink | None
    ) -> tuple[int, str]:
        offered.append(progress is not None)
        write("start")
        if progress is not None:
            progress("backup: 3 files [  0.1s]")
            progress("")
        write("done")
        return 0, ""

    await nursery.start(control.serve_control, path, handler)
    lines: list[str] = []
    shown: list[str] = []
    code = await control.forward(
        path, ["backup"], "/", write=lines.append, report=print, progress=shown.append
    )
    assert code == 0 and lines == ["start", "done"]
    assert shown == ["backup: 3 files [  0.1s]", ""]
    lines.clear()
    assert await control.forward(path, ["backup"], "/", write=lines.append, report=print) == 0
    assert lines == ["start", "done"]
    assert offered == [True, False]


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


def start_daemon(home: Path) -> subprocess.Popen[bytes]:
    """``serve`` for ``home`` on a free loopback port, once its control socket is there."""
    process = subprocess.Popen(
        [*CLI, "--home", str(home), "serve", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=base_env(),
    )
    deadline = time.monotonic() + 30
    while not (home / "control.sock").exists():
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
        assert (world.home / "serve.log").read_text().count("running `snapshots`") == 1
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
        argv: list[str], cwd: str, write: object, progress: object
    ) -> tuple[int, str]:
        write("hello")  # type: ignore[operator]
        return 0, ""

    await nursery.start(control.serve_control, path, handler)
    assert path.exists() and oct(path.stat().st_mode & 0o777) == "0o600"
    lines: list[str] = []
    assert await control.forward(path, ["status"], "/", write=lines.append, report=print) == 0
    assert lines == ["hello"]


async def test_no_socket_is_a_warning_not_a_failure(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(
        argv: list[str], cwd: str, write: object, progress: object
    ) -> tuple[int, str]:
        raise AssertionError("never called")

    missing = tmp_path / "no-such-dir" / "control.sock"
    await nursery.start(control.serve_control, missing, handler)
    assert "no control socket" in caplog.text
    assert await control.forward(missing, [], "/", write=print, report=print) is None


@pytest.mark.slow
def test_sigterm_mid_backup_stops_the_daemon_cleanly_and_loses_nothing(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=2, n=3)
    first = make_source(tmp_path / "first", seed=2)
    assert run_cli("backup", first, home=world.home).returncode == 0
    big = tmp_path / "big"
    big.mkdir()
    for i in range(6):
        (big / f"part{i}.bin").write_bytes(os.urandom(40 << 20))
    serve = start_daemon(world.home)
    try:
        log = world.home / "serve.log"
        backup = subprocess.Popen(
            [*CLI, "--home", str(world.home), "backup", str(big)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=base_env(),
        )
        # Stop the daemon once its first packs of the new data are out.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if "running `backup`" in (log.read_text() if log.exists() else ""):
                shards = list(world.peers[0].rglob("*"))
                if len([p for p in shards if p.is_file()]) > 8:
                    break
            time.sleep(0.05)
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
