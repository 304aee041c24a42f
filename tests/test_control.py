"""The control socket: the CLI's commands run by the home's daemon."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import trio

from p2pbackup import control
from p2pbackup.errors import RemoteProtocolError

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

    async def handler(argv: list[str], cwd: str, write: object) -> tuple[int, str]:
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


@pytest.mark.slow
def test_the_cli_hands_commands_to_a_running_daemon(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=1, n=3)
    make_source(tmp_path / "work" / "src", big=100_000)
    process = subprocess.Popen(
        [*CLI, "--home", str(world.home), "serve", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=base_env(),
    )
    try:
        socket_path = world.home / "control.sock"
        deadline = time.monotonic() + 30
        while not socket_path.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
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

    async def handler(argv: list[str], cwd: str, write: object) -> tuple[int, str]:
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
    async def handler(argv: list[str], cwd: str, write: object) -> tuple[int, str]:
        raise AssertionError("never called")

    missing = tmp_path / "no-such-dir" / "control.sock"
    await nursery.start(control.serve_control, missing, handler)
    assert "no control socket" in caplog.text
    assert await control.forward(missing, [], "/", write=print, report=print) is None
