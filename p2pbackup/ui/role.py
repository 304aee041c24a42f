"""The dashboard and the alerts as one more role of ``serve``.

Nouns:

* **ui options** — :class:`UiOptions`: whether the dashboard runs, where it
  listens (127.0.0.1 unless told otherwise), how often the node is looked at.
* **watcher** — every :attr:`UiOptions.look_every` seconds (and once at the
  start) it takes the status, keeps a sample of it for the plots
  (:mod:`p2pbackup.ui.history`), works out the alerts its changes make
  (:mod:`p2pbackup.ui.alerts`) and sends them (:mod:`p2pbackup.ui.notify`).
  It runs with or without the dashboard.
* **dashboard role** — :class:`UiRole`: the watcher, and the dashboard's
  HTTP server when it is on. A port that cannot be bound is logged and the
  node goes on without its dashboard (alerts still run): the dashboard is
  the node's window, not its work.
"""

from __future__ import annotations

import logging
import time

import attrs
import trio

from p2pbackup.app.daemon import Serving
from p2pbackup.app.home import Home
from p2pbackup.app.service import error_message
from p2pbackup.errors import P2PBackupError
from p2pbackup.ui.access import DEFAULT_UI_PORT, load_token, write_address
from p2pbackup.ui.alerts import AlertConfig, evaluate, observation_from
from p2pbackup.ui.history import History, Sample
from p2pbackup.ui.notify import deliver
from p2pbackup.ui.source import Source, verdict

log = logging.getLogger(__name__)

#: Seconds between looks at the node (samples and alerts).
LOOK_EVERY = 600.0
#: The names a browser may call the dashboard by when it listens on loopback.
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "[::1]", "::1"})


@attrs.frozen
class UiOptions:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = DEFAULT_UI_PORT
    look_every: float = LOOK_EVERY
    alerts: AlertConfig = attrs.Factory(AlertConfig)

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK_NAMES or self.host.startswith("127.")


@attrs.define(eq=False)
class UiRole:
    """The role (module docstring); :attr:`url` once the dashboard listens."""

    home: Home
    options: UiOptions
    url: str | None = None

    async def run(
        self, serving: Serving, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        source = Source(self.home, backups=serving.backups)
        history = History(self.home.path)
        try:
            async with trio.open_nursery() as nursery:
                source.nursery = nursery
                if self.options.enabled:
                    await self._start_dashboard(source, history, nursery)
                nursery.start_soon(watch, source, history, self.options)
                task_status.started()
        finally:
            history.close()

    async def _start_dashboard(
        self, source: Source, history: History, nursery: trio.Nursery
    ) -> None:
        # Imported here: a node without its dashboard never loads the web stack.
        from p2pbackup.ui.asgi import make_app
        from p2pbackup.ui.http import serve_http

        options = self.options
        app = make_app(
            source,
            load_token(self.home.path),
            history,
            hosts=LOOPBACK_NAMES if options.loopback else None,
        )
        try:
            self.url = await nursery.start(serve_http, app, options.host, options.port)
        except OSError as error:
            log.error(
                "the dashboard is off: cannot listen on %s port %d: %s (serve --ui-port "
                "chooses another)",
                options.host,
                options.port,
                error.strerror or error,
            )
            return
        write_address(self.home.path, self.url)
        log.info("dashboard on %s (`p2pbackup ui` prints it with its token)", self.url)


async def watch(source: Source, history: History, options: UiOptions) -> None:
    """The watcher (module docstring), until cancelled."""
    while True:
        try:
            await look(source, history, options.alerts)
        except (P2PBackupError, OSError) as error:
            log.warning("the dashboard could not look at the node: %s", error_message(error))
        await trio.sleep(options.look_every)


async def look(source: Source, history: History, alerts: AlertConfig) -> None:
    """One look: a sample kept, the alerts it makes sent."""
    status = await source.status(fresh=True)
    snapshots = await source.snapshots()
    now = time.time()
    history.add_sample(Sample.from_status(int(now), status))
    record = source.backups
    successes = [s["time_ns"] / 1e9 for s in snapshots]
    if record.last_succeeded is not None:
        successes.append(record.last_succeeded)
    last_success = max(successes) if successes else None
    failure = None
    if record.last_failed is not None and record.last_failed > (last_success or 0):
        failure = record.last_error or "the last backup failed"
    observation = observation_from(now, status, verdict(status), last_success, failure)
    state, events = evaluate(history.alert_state(), observation, alerts)
    for event in events:
        log.info("alert: %s: %s", event.title, event.message)
        for result in await deliver(alerts.targets, event, observation.node_id, now):
            if result.problem:
                log.warning(
                    "alert %r not delivered to %s: %s", event.title, result.target, result.problem
                )
    history.set_alert_state(state)
