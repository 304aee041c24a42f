"""Scheduled backups: what the home's ``config.toml`` asks ``serve`` to back up.

Nouns:

* **config** — ``HOME/config.toml``, written by the user::

      version = 1

      [backup]
      paths = ["/home/me"]          # what to back up
      interval = "6h"               # how often: seconds, or a number with s, m, h, d
      exclude = ["*.tmp", ".cache"] # patterns, as `backup --exclude` takes them
      tags = ["scheduled"]          # tags for the snapshots (optional)

  A config without a ``[backup]`` table schedules nothing.
* **schedule** — :class:`BackupSchedule`, the parsed ``[backup]`` table.

Parsing is pure (:func:`parse_config` takes the text); :func:`load_schedule`
only reads the file.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Final

import attrs

from p2pbackup.errors import UsageError
from p2pbackup.exclude import ExcludeRules

CONFIG_VERSION: Final = 1
#: Backups more often than this are refused as a likely typo ("6" for "6h").
MIN_INTERVAL: Final = 60.0
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_INTERVAL = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*\Z")


@attrs.frozen
class BackupSchedule:
    paths: tuple[str, ...]
    #: Seconds between the start of one scheduled backup and the next.
    interval: float
    exclude: ExcludeRules = attrs.Factory(ExcludeRules)
    tags: tuple[str, ...] = ()


def parse_interval(value: object, where: str) -> float:
    """Seconds from ``3600``, ``"90m"``, ``"6h"``, ``"1d"``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UsageError(f'{where}: interval must be seconds or text such as "6h"')
    if isinstance(value, str):
        match = _INTERVAL.match(value)
        if match is None:
            raise UsageError(f"{where}: interval {value!r} is not a number with s, m, h or d")
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    else:
        seconds = float(value)
    if seconds < MIN_INTERVAL:
        raise UsageError(
            f'{where}: interval {value!r} is under {MIN_INTERVAL:g} s; write e.g. "6h"'
        )
    return seconds


def _strings(value: object, what: str, *, required: bool = False) -> tuple[str, ...]:
    if value is None and not required:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise UsageError(f"{what} must be a list of non-empty strings")
    if required and not value:
        raise UsageError(f"{what} must name at least one path")
    return tuple(value)


def parse_config(text: str, where: str) -> BackupSchedule | None:
    """The schedule in a config's text; None if it schedules no backup."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"{where} is not valid TOML: {error}") from None
    version = document.get("version")
    if version != CONFIG_VERSION:
        raise UsageError(
            f"{where}: version = {version!r}; this p2pbackup reads version = {CONFIG_VERSION}"
        )
    unknown = set(document) - {"version", "backup"}
    if unknown:
        raise UsageError(f"{where}: unknown settings {', '.join(sorted(unknown))}")
    table = document.get("backup")
    if table is None:
        return None
    if not isinstance(table, dict):
        raise UsageError(f"{where}: [backup] must be a table")
    unknown = set(table) - {"paths", "interval", "exclude", "tags"}
    if unknown:
        raise UsageError(f"{where}: unknown [backup] settings {', '.join(sorted(unknown))}")
    if "interval" not in table:
        raise UsageError(f'{where}: [backup] needs an interval, e.g. interval = "6h"')
    paths = _strings(table.get("paths"), f"{where}: [backup] paths", required=True)
    for path in paths:
        if not path.startswith("/"):
            raise UsageError(f"{where}: backup path {path!r} must be absolute")
    return BackupSchedule(
        paths=paths,
        interval=parse_interval(table["interval"], f"{where}: [backup]"),
        exclude=ExcludeRules.from_patterns(_strings(table.get("exclude"), f"{where}: exclude")),
        tags=_strings(table.get("tags"), f"{where}: tags"),
    )


def load_schedule(path: Path) -> BackupSchedule | None:
    """The schedule in the config file at ``path``; None if there is no file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read {path}: {error}") from None
    return parse_config(text, str(path))
