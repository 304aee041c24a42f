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

from p2pbackup.app import cli, requests
from p2pbackup.app.home import Home
from p2pbackup.app.service import EXIT_ERROR, Service
from p2pbackup.errors import RemoteProtocolError
from p2pbackup.node import control

from .cli_helpers import (
    CLI,
    ODD_NAME,
    base_env,
    cli_ok,
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


# -- typed requests and the service's answer ------------------------------------------------

ODD_PATH = os.fsdecode(b"/home/caf\xe9")  # not UTF-8: a str with a lone surrogate

#: One request of each command, with no argument left at its default, and a
#: command line that asks for it.
SAMPLES: list[tuple[str, requests.Request]] = [
    (
        f"backup /home/me {ODD_PATH} --exclude *.tmp --tag daily --tag é --json",
        requests.BackupRequest(
            paths=("/home/me", ODD_PATH), exclude=("*.tmp",), tags=("daily", "é"), json=True
        ),
    ),
    (
        "restore latest --target /tmp/out --path /home/me --overwrite --json",
        requests.RestoreRequest(
            snapshot="latest", target="/tmp/out", path="/home/me", overwrite=True, json=True
        ),
    ),
    ("snapshots --json", requests.SnapshotsRequest(json=True)),
    ("ls 0123abcd /home --json", requests.LsRequest(snapshot="0123abcd", path="/home", json=True)),
    ("forget 0123abcd latest", requests.ForgetRequest(snapshots=("0123abcd", "latest"))),
    ("prune --json", requests.PruneRequest(json=True)),
    ("check --read-data --json", requests.CheckRequest(read_data=True, json=True)),
    ("status --json", requests.StatusRequest(json=True)),
    (
        "repair --grace 0 --rate 2M --json",
        requests.RepairRequest(grace="0", rate="2M", json=True),
    ),
    ("peer add-dir /mnt/disk", requests.PeerAddDirRequest(path="/mnt/disk")),
    (
        f"peer add 192.0.2.1:47470 {'ab' * 20}",
        requests.PeerAddRequest(address="192.0.2.1:47470", node_id="ab" * 20),
    ),
    ("peer list --json", requests.PeerListRequest(json=True)),
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
