"""The dashboard as an ASGI application: pages, the JSON API, live events.

Nouns:

* **app** — :func:`make_app`: a Starlette application on a
  :class:`~p2pbackup.ui.source.Source`. Pages are HTML
  (:mod:`p2pbackup.ui.pages`); under ``/api/`` the same data is JSON, with
  ``/api/status`` exactly what ``status --json`` prints; ``/api/events`` is a
  stream of server-sent events (each job's progress and end).
* **guard** — every request but the static files must carry the token
  (:mod:`p2pbackup.ui.access`): as the ``p2pbackup_token`` cookie, the
  ``X-P2PBackup-Token`` header, or on a GET as ``?token=`` (which sets the
  cookie, then sends the browser to the address without it). An **action**
  (every POST) must carry it in the header — a cookie alone is what a
  cross-site form would send — and, when the browser names an Origin, come
  from the dashboard's own. With ``hosts``, the Host header must be one of
  them (a page on another site cannot reach it by renaming its own address
  to 127.0.0.1). Refused: 403 with one line that says why.

The only module that imports starlette.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from p2pbackup.app.service import error_message
from p2pbackup.engine.progress import human_bytes
from p2pbackup.errors import P2PBackupError
from p2pbackup.stores.durable import write_private_file
from p2pbackup.ui import pages, plots
from p2pbackup.ui.access import token_matches
from p2pbackup.ui.history import History
from p2pbackup.ui.qr import qr_svg
from p2pbackup.ui.settings import check_settings, settings_summary
from p2pbackup.ui.source import Source, verdict

STATIC = Path(__file__).parent / "static"
COOKIE = "p2pbackup_token"
HEADER = "x-p2pbackup-token"
#: Seconds between keep-alive comments on an idle event stream.
EVENTS_KEEPALIVE = 15.0
#: Largest action body read (an invite code, a config file).
MAX_BODY = 256 * 1024

Handler = Callable[[Request], Awaitable[Response]]


def _refuse(why: str, status: int = 403) -> Response:
    return PlainTextResponse(f"refused: {why}\n", status_code=status)


def _guard(token: str, hosts: frozenset[str] | None) -> Callable[[Handler], Handler]:
    def wrap(handler: Handler) -> Handler:
        async def guarded(request: Request) -> Response:
            host = (request.headers.get("host") or "").rpartition(":")[0] or request.headers.get(
                "host", ""
            )
            if hosts is not None and host not in hosts:
                return _refuse(f"the dashboard does not answer to the host {host!r}")
            header = request.headers.get(HEADER)
            if request.method == "POST":
                if not token_matches(token, header):
                    return _refuse("an action needs the dashboard token in its header")
                origin = request.headers.get("origin")
                if origin and urlsplit(origin).netloc != request.headers.get("host"):
                    return _refuse("an action from another site")
                return await handler(request)
            query = request.query_params.get("token")
            if query is not None and token_matches(token, query):
                response = RedirectResponse(request.url.remove_query_params("token"), 303)
                response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
                return response
            if token_matches(token, header) or token_matches(token, request.cookies.get(COOKIE)):
                return await handler(request)
            if request.url.path.startswith("/api/"):
                return _refuse("no dashboard token", 401)
            return HTMLResponse(pages.refused_page(), status_code=401)

        return guarded

    return wrap


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise P2PBackupError("the request is too large")
    try:
        value = json.loads(raw or b"{}")
    except ValueError:
        raise P2PBackupError("the request is not JSON") from None
    if not isinstance(value, dict):
        raise P2PBackupError("the request is not a JSON object")
    return value


def _text(body: dict[str, Any], name: str, *, required: bool = True) -> str:
    value = body.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise P2PBackupError(f"{name} is missing")
    return value


def make_app(
    source: Source,
    token: str,
    history: History,
    *,
    hosts: frozenset[str] | None = None,
) -> Starlette:
    """The dashboard of ``source`` (module docstring)."""
    guard = _guard(token, hosts)
    home = source.home

    def page(html: str) -> Response:
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    async def overview(request: Request) -> Response:
        status = await source.status()
        snapshots = await source.snapshots()
        return page(
            pages.overview_page(token, status, verdict(status), snapshots, source.schedule())
        )

    async def peers(request: Request) -> Response:
        status = await source.status()
        invite = source.invite()
        return page(pages.peers_page(token, status, invite, qr_svg(invite) if invite else None))

    async def snapshots(request: Request) -> Response:
        found = await source.snapshots()
        chosen = request.query_params.get("snapshot")
        path = request.query_params.get("path") or "/"
        entries = await source.ls(chosen, path) if chosen else None
        target = os.path.join(os.path.expanduser("~"), "p2pbackup-restore")
        return page(pages.snapshots_page(token, found, chosen, path, entries, target))

    async def activity(request: Request) -> Response:
        status = await source.status()
        found = await source.snapshots()
        return page(pages.activity_page(token, await _plots(), status, found))

    async def _plots() -> list[tuple[str, str]]:
        samples = history.samples(since=int(time.time()) - 30 * 86400)
        traffic = await source.traffic()

        def day(d: float) -> str:
            return time.strftime("%m-%d", time.gmtime(d * 86400))

        def moment(t: float) -> str:
            return time.strftime("%m-%d %H:%M", time.localtime(t))

        def count(v: float) -> str:
            return f"{v:g}"

        return [
            (
                "Stored on peers",
                plots.line_plot(
                    "bytes stored on peers",
                    [(s.time, s.stored) for s in samples],
                    moment,
                    human_bytes,
                ),
            ),
            (
                "Spare shards of the worst pack",
                plots.line_plot(
                    "spare shards of the worst pack",
                    [(s.time, s.min_margin) for s in samples if s.min_margin is not None],
                    moment,
                    count,
                ),
            ),
            (
                "Mean audit score",
                plots.line_plot(
                    "mean audit score",
                    [(s.time, s.audit_score) for s in samples if s.audit_score is not None],
                    moment,
                    lambda v: f"{v:.2f}",
                ),
            ),
            (
                "Traffic per day (backup, audits, repair)",
                plots.bar_plot(
                    "traffic per day", [(t["day"], t["bytes"]) for t in traffic], day, human_bytes
                ),
            ),
        ]

    async def settings(request: Request) -> Response:
        path = home.config_path
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = "version = 1\n"
        error = ""
        try:
            summary = settings_summary(check_settings(text, str(path)))
        except P2PBackupError as problem:
            summary, error = [], str(problem)
        return page(pages.settings_page(token, str(path), text, summary, error))

    # -- the JSON API -------------------------------------------------------------

    async def api_status(request: Request) -> Response:
        return JSONResponse(await source.status(fresh="fresh" in request.query_params))

    async def api_overview(request: Request) -> Response:
        status = await source.status()
        return JSONResponse(
            {
                "verdict": verdict(status),
                "schedule": source.schedule(),
                "snapshots": await source.snapshots(),
                "status": status,
            }
        )

    async def api_snapshots(request: Request) -> Response:
        return JSONResponse(await source.snapshots())

    async def api_ls(request: Request) -> Response:
        snapshot = request.query_params.get("snapshot", "latest")
        return JSONResponse(await source.ls(snapshot, request.query_params.get("path") or "/"))

    async def api_friends(request: Request) -> Response:
        return JSONResponse({"friends": await source.friends(), "invite": source.invite()})

    async def api_activity(request: Request) -> Response:
        return JSONResponse(
            {
                "samples": [attrs.asdict(s) for s in history.samples()],
                "traffic": await source.traffic(),
            }
        )

    async def api_jobs(request: Request) -> Response:
        return JSONResponse([job.to_json() for job in source.jobs.values()])

    async def api_events(request: Request) -> Response:
        async def stream() -> AsyncIterator[str]:
            seen = source.events.last
            for job in source.jobs.values():
                yield f"data: {json.dumps({'job': job.to_json()})}\n\n"
            while True:
                with trio.move_on_after(EVENTS_KEEPALIVE):
                    for number, event in await source.events.after(seen):
                        seen = number
                        yield f"id: {number}\ndata: {json.dumps(event)}\n\n"
                    continue
                yield ": still here\n\n"

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    # -- actions ------------------------------------------------------------------

    async def act_friend(request: Request) -> Response:
        body = await _body(request)
        ran = await source.add_friend(_text(body, "code"))
        return JSONResponse(
            {"ok": ran.ok, "lines": list(ran.lines), "error": ran.outcome.error},
            status_code=200 if ran.ok else 400,
        )

    async def act_restore(request: Request) -> Response:
        body = await _body(request)
        job = source.start_restore(
            _text(body, "snapshot"), _text(body, "target"), _text(body, "path", required=False)
        )
        return JSONResponse({"ok": True, "job": job.to_json()})

    async def act_backup(request: Request) -> Response:
        job = source.start_backup()
        return JSONResponse({"ok": True, "job": job.to_json()})

    async def act_settings(request: Request) -> Response:
        body = await _body(request)
        text = _text(body, "text")
        checked = check_settings(text, str(home.config_path))
        write_private_file(home.config_path, text.encode())
        lines = [*settings_summary(checked), "saved; restart serve for the changes to count"]
        return JSONResponse({"ok": True, "lines": lines})

    def handled(handler: Handler) -> Handler:
        """An expected failure as one line (JSON for the API, a page otherwise)."""

        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except (P2PBackupError, OSError) as error:
                message = error_message(error) or "unexpected error"
                if request.url.path.startswith("/api/"):
                    return JSONResponse({"ok": False, "error": message}, status_code=400)
                return HTMLResponse(
                    pages.frame("Error", "", token, f'<p class="bad">{pages.e(message)}</p>'),
                    status_code=400,
                )

        return guard(run)

    get: Sequence[tuple[str, Handler]] = [
        ("/", overview),
        ("/peers", peers),
        ("/snapshots", snapshots),
        ("/activity", activity),
        ("/settings", settings),
        ("/api/status", api_status),
        ("/api/overview", api_overview),
        ("/api/snapshots", api_snapshots),
        ("/api/ls", api_ls),
        ("/api/friends", api_friends),
        ("/api/activity", api_activity),
        ("/api/jobs", api_jobs),
        ("/api/events", api_events),
    ]
    post: Sequence[tuple[str, Handler]] = [
        ("/api/friends", act_friend),
        ("/api/restore", act_restore),
        ("/api/backup", act_backup),
        ("/api/settings", act_settings),
    ]
    routes: list[Route | Mount] = [
        Route(path, handled(h), methods=["GET"], name=f"get {path}") for path, h in get
    ]
    routes += [Route(path, handled(h), methods=["POST"], name=f"post {path}") for path, h in post]
    routes.append(Mount("/static", StaticFiles(directory=STATIC), name="static"))
    return Starlette(routes=routes)
