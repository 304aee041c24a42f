"""The dashboard's parts without a browser: token, settings, plots, alerts and their delivery."""

from __future__ import annotations

import http.server
import json
import socketserver
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from p2pbackup.errors import UsageError
from p2pbackup.ui import access, notify, plots
from p2pbackup.ui.alerts import (
    AlertConfig,
    Email,
    Observation,
    PeerSeen,
    Webhook,
    evaluate,
    parse_alerts,
)
from p2pbackup.ui.history import History
from p2pbackup.ui.settings import check_settings, settings_summary

DAY = 86400.0


def test_the_token_is_made_once_private_and_checked(tmp_path: Path) -> None:
    token = access.load_token(tmp_path)
    assert stat.S_IMODE(access.token_path(tmp_path).stat().st_mode) == 0o600
    assert access.load_token(tmp_path) == token
    assert access.token_matches(token, token)
    assert not access.token_matches(token, None)
    assert not access.token_matches(token, token[:-1])
    assert access.dashboard_url("http://127.0.0.1:5", token).endswith(f"/?token={token}")
    access.token_path(tmp_path).write_text("garbage\n")
    with pytest.raises(UsageError, match="not a dashboard token"):
        access.load_token(tmp_path)


CONFIG = """
version = 1

[ui]
port = 8123

[alerts]
no_backup_days = 2
peer_lost_after = "12h"

[[alerts.webhook]]
url = "http://127.0.0.1:1/hook"

[[alerts.webhook]]
url = "https://ntfy.example.org/backups"
format = "ntfy"

[alerts.email]
server = "127.0.0.1:2525"
security = "none"
from = "node@example.org"
to = ["me@example.org"]
"""


def test_settings_read_the_alerts_and_ui_tables() -> None:
    settings = check_settings(CONFIG, "config.toml")
    assert settings.ui.port == 8123
    alerts = settings.alerts
    assert alerts.no_backup_days == 2 and alerts.peer_lost_after == 12 * 3600
    assert [hook.format for hook in alerts.webhooks] == ["json", "ntfy"]
    assert alerts.email == Email("127.0.0.1", 2525, "node@example.org", ("me@example.org",), "none")


def test_the_settings_summary_says_the_bandwidth_limits() -> None:
    limited = check_settings('version = 1\n[bandwidth]\nupload = "512K"\n', "config.toml")
    assert "bandwidth: up 512.0 KiB/s, down unlimited" in settings_summary(limited)
    assert "bandwidth: up unlimited, down unlimited" in settings_summary(
        check_settings("version = 1\n", "config.toml")
    )


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ({"webhook": [{"url": "ftp://x"}]}, "must start with http"),
        ({"webhook": [{"url": "http://x", "format": "slack"}]}, "format 'slack'"),
        ({"email": {"server": "smtp", "from": "a@b", "to": ["c@d"]}}, "HOST:PORT"),
        ({"email": {"server": "s:25", "from": "a@b", "to": []}}, "list of addresses"),
        ({"no_backup_days": -1}, "no_backup_days"),
        ({"peer_lost_after": "soon"}, "peer_lost_after"),
        ({"colour": "red"}, "unknown settings colour"),
    ],
)
def test_bad_alert_settings_are_named(table: dict[str, Any], problem: str) -> None:
    with pytest.raises(UsageError, match=problem) as error:
        parse_alerts(table, "config.toml")
    assert "config.toml" in str(error.value)


def test_a_bad_ui_port_is_named() -> None:
    with pytest.raises(UsageError, match=r"\[ui\] port"):
        check_settings("version = 1\n[ui]\nport = 70000\n", "config.toml")


def test_plots_are_svg_with_their_points_counted() -> None:
    line = plots.line_plot("t", [(0, 1), (10, 5), (20, 3)], str, str)
    assert line.startswith("<svg") and 'data-points="3"' in line and "<polyline" in line
    bars = plots.bar_plot("t", [(100, 5), (103, 1)], str, str)
    assert 'data-points="2"' in bars and bars.count('class="bar"') == 4  # days 100..103
    assert 'data-points="0"' in plots.line_plot("t", [], str, str)


# -- alerts -------------------------------------------------------------------------------


def _seen(
    now: float,
    *,
    verdict: str = "safe",
    failure: str | None = None,
    last_success: float | None = None,
    peer_online: bool = True,
    peer_seen: float | None = None,
    repaired: int = 0,
) -> Observation:
    peer = PeerSeen("ab" * 20, peer_online, int(peer_seen if peer_seen is not None else now))
    return Observation(
        now,
        verdict,
        now if last_success is None else last_success,
        failure,
        (peer,),
        repaired,
        "cd" * 20,
    )


def _run(config: AlertConfig, observations: list[Observation]) -> list[list[str]]:
    state: dict[str, str] = {}
    told = []
    for observation in observations:
        state, events = evaluate(state, observation, config)
        told.append([event.kind for event in events])
    return told


def test_each_change_of_state_is_told_once_and_nothing_while_nothing_changes() -> None:
    config = AlertConfig(no_backup_days=2, peer_lost_after=DAY)
    t = 1_000_000.0
    told = _run(
        config,
        [
            _seen(t),
            _seen(t + 1),
            _seen(t + 2, failure="peer x refused"),
            _seen(t + 3, failure="peer x refused"),
            _seen(t + 4),
            _seen(t + 5, verdict="at risk"),
            _seen(t + 6, verdict="at risk"),
            _seen(t + 7, verdict="unrecoverable"),
            _seen(t + 8, verdict="safe"),
            _seen(t + 9, peer_online=False, peer_seen=t),
            _seen(t + 2 * DAY, peer_online=False, peer_seen=t),
            _seen(t + 2 * DAY + 1, peer_online=False, peer_seen=t),
            _seen(t + 3 * DAY, last_success=t),
            _seen(t + 3 * DAY + 1, last_success=t),
            _seen(t + 3 * DAY + 2, repaired=4),
            _seen(t + 3 * DAY + 3, repaired=4),
        ],
    )
    assert told == [
        [],
        [],
        ["backup failed"],
        [],
        ["backup ok"],
        ["data at risk"],
        [],
        ["data unrecoverable"],
        ["data safe"],
        [],  # offline, but not for long yet
        ["peer lost"],
        [],
        ["no backup", "peer ok"],
        [],
        ["backup ok", "repair done"],
        [],
    ]


def test_a_friend_never_reached_yet_is_not_told_as_lost_until_it_answered_once() -> None:
    config = AlertConfig(peer_lost_after=DAY)
    t = 1_000_000.0
    never = Observation(t, "safe", t, None, (PeerSeen("ab" * 20, False, None),), 0, "cd" * 20)
    state, events = evaluate({}, never, config)
    assert events == [] and state["peer " + "ab" * 20] == "ok"
    # Once it has answered, a long silence is a loss.
    seen = attrs.evolve(never, now=t + 2 * DAY, peers=(PeerSeen("ab" * 20, False, int(t)),))
    _state, events = evaluate(state, seen, config)
    assert [e.kind for e in events] == ["peer lost"]


def test_a_bad_state_at_the_first_look_is_told_and_a_kept_state_is_not_told_again() -> None:
    config = AlertConfig()
    state, events = evaluate({}, _seen(1e6, verdict="at risk"), config)
    assert [e.kind for e in events] == ["data at risk"]
    # What a restart reads back from the history file: no second alert.
    _state, again = evaluate(dict(state), _seen(1e6 + 60, verdict="at risk"), config)
    assert again == []


def test_the_alert_state_survives_in_the_history_file(tmp_path: Path) -> None:
    history = History(tmp_path)
    history.set_alert_state({"data": "at risk", "backup": "ok"})
    history.close()
    again = History(tmp_path)
    assert again.alert_state() == {"data": "at risk", "backup": "ok"}
    again.close()


# -- delivery against local servers -----------------------------------------------------


class _Receiver(http.server.BaseHTTPRequestHandler):
    got: list[tuple[str, dict[str, str], bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.got.append((self.path, dict(self.headers), body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class _SmtpSink(socketserver.StreamRequestHandler):
    """Just enough SMTP to take a message."""

    got: list[bytes]

    def handle(self) -> None:
        self.wfile.write(b"220 sink\r\n")
        while line := self.rfile.readline():
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                self.wfile.write(b"250 sink\r\n")
            elif verb == b"DATA":
                self.wfile.write(b"354 go on\r\n")
                data = b""
                while (part := self.rfile.readline()) not in (b".\r\n", b""):
                    data += part
                self.got.append(data)
                self.wfile.write(b"250 taken\r\n")
            elif verb == b"QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            else:
                self.wfile.write(b"250 ok\r\n")


@pytest.fixture
def receivers() -> Iterator[tuple[int, int, list[Any], list[bytes]]]:
    hooks: list[Any] = []
    mails: list[bytes] = []
    receiver = type("Receiver", (_Receiver,), {"got": hooks})
    sink = type("Sink", (_SmtpSink,), {"got": mails})
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), receiver)
    smtp = socketserver.ThreadingTCPServer(("127.0.0.1", 0), sink)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (web, smtp)]
    for thread in threads:
        thread.start()
    try:
        yield web.server_address[1], smtp.server_address[1], hooks, mails
    finally:
        for server in (web, smtp):
            server.shutdown()
            server.server_close()


async def test_alerts_reach_webhooks_and_email_once_per_change(
    receivers: tuple[int, int, list[Any], list[bytes]],
) -> None:
    web_port, smtp_port, hooks, mails = receivers
    base = f"http://127.0.0.1:{web_port}"
    config = AlertConfig(
        webhooks=(
            Webhook(f"{base}/generic"),
            Webhook(f"{base}/ntfy-topic", "ntfy", "tk"),
            Webhook(f"{base}/message", "gotify", "app"),
        ),
        email=Email("127.0.0.1", smtp_port, "node@example.org", ("me@example.org",), "none"),
    )
    state: dict[str, str] = {}
    t = 2_000_000.0
    for observation in [
        _seen(t),
        _seen(t + 1, failure="no peer answered"),
        _seen(t + 2, failure="no peer answered"),
        _seen(t + 3, failure="no peer answered"),
    ]:
        state, events = evaluate(state, observation, config)
        for event in events:
            results = await notify.deliver(config.targets, event, observation.node_id, t)
            assert [r.problem for r in results] == ["", "", "", ""]
    assert [path for path, _headers, _body in hooks] == [
        "/generic",
        "/ntfy-topic",
        "/message",
    ]
    generic = json.loads(hooks[0][2])
    assert generic["version"] == 1 and generic["event"] == "backup failed"
    assert generic["message"] == "no peer answered" and generic["node"] == "cd" * 20
    assert hooks[1][1]["Title"] == "Backup failed" and hooks[1][2] == b"no peer answered"
    assert hooks[1][1]["Authorization"] == "Bearer tk"
    assert hooks[2][1]["X-Gotify-Key"] == "app"
    assert json.loads(hooks[2][2])["title"] == "Backup failed"
    assert len(mails) == 1
    assert b"Subject: [p2pbackup] Backup failed" in mails[0]
    assert b"no peer answered" in mails[0]


async def test_a_target_that_fails_is_reported_and_the_others_still_get_theirs(
    receivers: tuple[int, int, list[Any], list[bytes]],
) -> None:
    web_port, _smtp_port, hooks, _mails = receivers
    from p2pbackup.ui.alerts import test_event

    results = await notify.deliver(
        (Webhook("http://127.0.0.1:9/closed"), Webhook(f"http://127.0.0.1:{web_port}/ok")),
        test_event(),
        "node",
    )
    assert results[0].problem and not results[1].problem
    assert len(hooks) == 1


# -- the commands ------------------------------------------------------------------------


def _home(tmp_path: Path) -> Path:
    from tests.cli_helpers import cli_ok

    home = tmp_path / "home"
    cli_ok("--home", home, "init", "--recovery-key-file", tmp_path / "key")
    return home


def test_ui_prints_the_address_with_the_token_on_its_last_line(tmp_path: Path) -> None:
    from tests.cli_helpers import cli_ok

    home = _home(tmp_path)
    (home / "config.toml").write_text("version = 1\n[ui]\nport = 8123\n")
    result = cli_ok("--home", home, "ui", "--no-browser")
    token = access.load_token(home)
    assert result.lines[-1] == f"http://127.0.0.1:8123/?token={token}"
    assert "start `p2pbackup serve`" in result.lines[0]
    assert stat.S_IMODE(access.token_path(home).stat().st_mode) == 0o600


def test_alerts_test_sends_to_each_target_and_names_the_one_that_failed(
    tmp_path: Path, receivers: tuple[int, int, list[Any], list[bytes]]
) -> None:
    from tests.cli_helpers import cli_error, cli_ok, run_cli

    web_port, smtp_port, hooks, mails = receivers
    home = _home(tmp_path)
    config = home / "config.toml"
    config.write_text(
        f'version = 1\n[[alerts.webhook]]\nurl = "http://127.0.0.1:{web_port}/h"\n'
        f'[alerts.email]\nserver = "127.0.0.1:{smtp_port}"\nsecurity = "none"\n'
        'from = "n@example.org"\nto = ["me@example.org"]\n'
    )
    result = cli_ok("--home", home, "alerts", "test")
    assert [line.endswith(": sent") for line in result.lines] == [True, True]
    assert json.loads(hooks[0][2])["event"] == "test" and len(mails) == 1
    config.write_text('version = 1\n[[alerts.webhook]]\nurl = "http://127.0.0.1:9/closed"\n')
    assert "1 of 1 alert targets" in cli_error("--home", home, "alerts", "test")
    # The reason in words, as elsewhere: not Python's "[Errno 111] …".
    failed = run_cli("--home", home, "alerts", "test")
    assert failed.lines == [
        "webhook (json) http://127.0.0.1:9/closed: FAILED: connection refused"
    ], str(failed)
    config.write_text('version = 1\n[alerts]\nno_backup_days = "soon"\n')
    assert "no_backup_days" in cli_error("--home", home, "alerts", "test")
