"""The dashboard's and the alerts' part of ``config.toml``, and the whole file checked.

Nouns:

* **ui config** — :class:`UiConfig`, the ``[ui]`` table::

      [ui]
      port = 47471     # where the dashboard listens on 127.0.0.1 (0: any free port)

  ``serve --ui-port`` overrides it, ``--no-ui`` turns the dashboard off.
* **settings** — :class:`Settings`: the whole file as ``serve`` reads it —
  the node's tables (:func:`p2pbackup.node.schedule.parse_home_config`),
  ``[alerts]`` (:mod:`p2pbackup.ui.alerts`) and ``[ui]``. :func:`check_settings`
  takes the text (pure), :func:`load_settings` reads the file.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import attrs

from p2pbackup.engine.progress import human_bytes
from p2pbackup.errors import UsageError
from p2pbackup.node.schedule import HomeConfig, parse_home_config
from p2pbackup.ui.alerts import AlertConfig, Email, parse_alerts


@attrs.frozen
class UiConfig:
    #: None: the default (:data:`p2pbackup.ui.access.DEFAULT_UI_PORT`).
    port: int | None = None


@attrs.frozen
class Settings:
    home: HomeConfig = attrs.Factory(HomeConfig)
    alerts: AlertConfig = attrs.Factory(AlertConfig)
    ui: UiConfig = attrs.Factory(UiConfig)


def _parse_ui(table: object, where: str) -> UiConfig:
    if table is None:
        return UiConfig()
    if not isinstance(table, dict):
        raise UsageError(f"{where}: [ui] must be a table")
    unknown = set(table) - {"port"}
    if unknown:
        raise UsageError(f"{where}: unknown [ui] settings {', '.join(sorted(unknown))}")
    port = table.get("port")
    if port is not None and (
        isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536
    ):
        raise UsageError(f"{where}: [ui] port must be a number from 0 to 65535")
    return UiConfig(port)


def check_settings(text: str, where: str) -> Settings:
    """Every table of a config's text, checked; UsageError naming the first problem."""
    home = parse_home_config(text, where)  # the version, the syntax, the node's tables
    document = tomllib.loads(text)
    return Settings(
        home=home,
        alerts=parse_alerts(document.get("alerts"), where),
        ui=_parse_ui(document.get("ui"), where),
    )


def load_settings(path: Path) -> Settings:
    """The settings in the file at ``path``; the defaults if there is none."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Settings()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read {path}: {error}") from None
    return check_settings(text, str(path))


def settings_summary(settings: Settings) -> list[str]:
    """What the settings say, in plain lines."""
    lines = []
    backup = settings.home.backup
    if backup is None:
        lines.append("backups: none scheduled")
    else:
        lines.append(
            f"backups: {', '.join(backup.paths)} every {backup.interval / 3600:g} h"
            + (
                f", leaving out {', '.join(backup.exclude.patterns)}"
                if backup.exclude.patterns
                else ""
            )
        )
    storage = settings.home.storage
    lines.append(
        "storage for peers: "
        + (human_bytes(storage.capacity) if storage.capacity else "what the disk has")
        + " in all, "
        + (human_bytes(storage.per_friend) if storage.per_friend else "no bound")
        + " each"
    )
    bandwidth = settings.home.bandwidth
    lines.append(
        "bandwidth: "
        + ", ".join(
            f"{way} {human_bytes(int(rate)) + '/s' if rate is not None else 'unlimited'}"
            for way, rate in (("up", bandwidth.upload), ("down", bandwidth.download))
        )
    )
    alerts = settings.alerts
    targets = [f"webhook ({hook.format}) {hook.url}" for hook in alerts.webhooks]
    if isinstance(alerts.email, Email):
        targets.append(f"email to {', '.join(alerts.email.to)} via {alerts.email.host}")
    lines.append("alerts: " + ("; ".join(targets) if targets else "none configured"))
    if targets and alerts.no_backup_days:
        lines.append(f"alert when no backup succeeded for {alerts.no_backup_days:g} days")
    return lines
