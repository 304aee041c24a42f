"""The home's ``config.toml``: what ``serve`` backs up, and what it offers peers.

Nouns:

* **config** — ``HOME/config.toml``, written by the user::

      version = 1

      [backup]
      paths = ["/home/me"]          # what to back up
      interval = "6h"               # how often: seconds, or a number with s, m, h, d
      exclude = ["*.tmp", ".cache"] # patterns, as `backup --exclude` takes them
      exclude_if_present = ["CACHEDIR.TAG"]  # as `backup --exclude-if-present`
      one_file_system = true        # as `backup --one-file-system`
      tags = ["scheduled"]          # tags for the snapshots (optional)

      [storage]
      capacity = "200G"             # most space for all peers together
      per_friend = "50G"            # most space for any one peer

      [maintenance]
      enabled = true                # audits and repair in the background
      audit_period = "7d"           # every shard audited at least this often
      repair_interval = "6h"        # a repair pass at least this often
      grace = "3d"                  # an unreachable peer is lost after this
      repair_rate = "1M"            # a size per second, or "unlimited"

      [bandwidth]                   # all serve moves together (optional)
      upload = "500K"               # a size per second, or "unlimited"
      download = "2M"

      [forget]                      # after each scheduled backup (optional)
      keep_daily = 7                # as `forget --keep-daily 7`; also keep_last,
      keep_weekly = 4               # keep_hourly, keep_monthly, keep_yearly,
      keep_within = "2d"            # keep_within, keep_tag = ["a", "b,c"],
      prune = true                  # group_by = "paths,tags"; prune afterwards

  Every table is optional: without ``[backup]`` nothing is scheduled,
  without ``[storage]`` (or one of its keys) the node gives what the disk
  has, without ``[maintenance]`` (or one of its keys) the defaults of
  :class:`~p2pbackup.maintenance.keeper.MaintenanceOptions` hold, and
  without ``[forget]`` no snapshot is forgotten. ``HomeConfig`` is the whole
  parsed file.
* **schedule** — :class:`BackupSchedule`, the parsed ``[backup]`` table.
* **backup record** — :class:`BackupRecord`: what the scheduled backups of
  the running ``serve`` did and when the next is due, found through
  :data:`RUNNING_BACKUPS` by the commands it runs (``status``).
* **retention** — :class:`RetentionConfig`, the parsed ``[forget]`` table:
  the policy ``serve`` applies to the group of each scheduled backup's
  snapshot after the run (:mod:`p2pbackup.engine.retention`), and whether it
  prunes then.
* **storage offer** — :class:`StorageOffer`, the parsed ``[storage]`` table:
  what this home states it offers its peers (``serve --capacity`` and
  ``--owner-quota`` override it).
* **maintenance** — the parsed ``[maintenance]`` table, as the keeper's
  :class:`~p2pbackup.maintenance.keeper.MaintenanceOptions`.
* **bandwidth** — the parsed ``[bandwidth]`` table, as
  :class:`~p2pbackup.net.limits.BandwidthLimits`: what ``serve`` sends and
  reads at most, its scheduled backups, audits, repairs, the commands it
  runs and what it serves to friends all together.
* **size** — bytes, or a number with ``K``, ``M``, ``G`` or ``T`` (binary
  units; a trailing ``B`` or ``iB`` is allowed): :func:`parse_size`, shared
  with the command line.

Parsing is pure (:func:`parse_home_config` takes the text); :func:`load_config`
only reads the file. :func:`parse_config` and :func:`load_schedule` are the
``[backup]`` table alone.
"""

from __future__ import annotations

import contextvars
import math
import re
import tomllib
from pathlib import Path
from typing import Final

import attrs

from p2pbackup.core.exclude import ExcludeRules
from p2pbackup.engine.retention import DEFAULT_GROUP_BY, RetentionPolicy, parse_group_by
from p2pbackup.errors import UsageError
from p2pbackup.maintenance.keeper import MaintenanceOptions
from p2pbackup.net.limits import BandwidthLimits

CONFIG_VERSION: Final = 1
#: Backups more often than this are refused as a likely typo ("6" for "6h").
MIN_INTERVAL: Final = 60.0
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_INTERVAL = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*\Z")
_SIZE_UNITS: Final = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_TABLES: Final = ("backup", "storage", "maintenance", "forget", "bandwidth")
#: Tables read by the layers above (the dashboard and the alerts: p2pbackup.ui.settings).
_OTHER_TABLES: Final = ("alerts", "ui")
#: Audit periods and repair intervals shorter than this are refused as a
#: likely typo ("7" for "7d").
MIN_MAINTENANCE_PERIOD: Final = 3600.0
_KEEP_COUNTS: Final = tuple(
    f"keep_{unit}" for unit in ("last", "hourly", "daily", "weekly", "monthly", "yearly")
)


@attrs.frozen
class BackupSchedule:
    paths: tuple[str, ...]
    #: Seconds between the start of one scheduled backup and the next.
    interval: float
    exclude: ExcludeRules = attrs.Factory(ExcludeRules)
    tags: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for ``serve`` to say what it loaded."""
        return (
            f"scheduled backup of {', '.join(self.paths)} every "
            f"{interval_text(self.interval)} (from config.toml)"
        )


def interval_text(seconds: float) -> str:
    """``seconds`` as config.toml would write it: ``"6h"``, ``"90m"``, ``"1d"``."""
    for unit in ("d", "h", "m"):
        size = _UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


@attrs.frozen
class StorageOffer:
    """What a home offers its peers, in bytes (None: as much as the disk has)."""

    #: Most space for all peers together.
    capacity: int | None = None
    #: Most space for any one peer (owner).
    per_friend: int | None = None


#: What the ``serve`` this code runs in offers (its options, which may
#: override config.toml), if any: ``status`` run by the daemon reports that.
RUNNING_OFFER: contextvars.ContextVar[StorageOffer | None] = contextvars.ContextVar(
    "p2pbackup_running_offer", default=None
)


@attrs.define
class BackupRecord:
    """What the scheduled backups of a running node did (unix seconds; None: not yet)."""

    last_started: float | None = None
    last_succeeded: float | None = None
    last_failed: float | None = None
    #: The one line that says why the last failed run failed.
    last_error: str = ""
    next_at: float | None = None
    #: Seconds between runs; None: nothing is scheduled.
    interval: float | None = None

    def failing(self) -> bool:
        """Whether the last scheduled run failed (no success since)."""
        return self.last_failed is not None and (
            self.last_succeeded is None or self.last_failed > self.last_succeeded
        )


#: The scheduled backups' record of the ``serve`` this code runs in (None
#: outside ``serve``): ``status`` run by the daemon says when the last
#: failed and why, and when the next is due.
RUNNING_BACKUPS: contextvars.ContextVar[BackupRecord | None] = contextvars.ContextVar(
    "p2pbackup_running_backups", default=None
)


@attrs.frozen
class RetentionConfig:
    """The ``[forget]`` table: what ``serve`` keeps after a scheduled backup."""

    policy: RetentionPolicy
    group_by: tuple[str, ...] = DEFAULT_GROUP_BY
    prune: bool = False


@attrs.frozen
class HomeConfig:
    """The whole of ``config.toml``."""

    backup: BackupSchedule | None = None
    storage: StorageOffer = StorageOffer()
    maintenance: MaintenanceOptions = attrs.Factory(MaintenanceOptions)
    forget: RetentionConfig | None = None
    bandwidth: BandwidthLimits = attrs.Factory(BandwidthLimits)


def parse_size(text: str) -> int:
    """Bytes from ``500M``, ``20G``, ``1.5T`` or plain ``1000`` (binary units).

    UsageError naming the text when it is not a positive size.
    """
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = cleaned, ""
    if cleaned and cleaned[-1] in _SIZE_UNITS:
        number, unit = cleaned[:-1], cleaned[-1]
    try:
        value = float(number)
    except ValueError:
        raise UsageError(f"{text!r} is not a size (examples: 500M, 20G, 1T)") from None
    # Also refuses NaN, and inf (which int() cannot take).
    if not 0 < value < float("inf"):
        raise UsageError(f"size {text!r} must be positive")
    return int(value * _SIZE_UNITS[unit])


def _size(value: object, what: str) -> int:
    """A size from the config: text as :func:`parse_size` reads it, or an integer of bytes."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UsageError(f'{what} must be a size such as "200G", got {value!r}')
    if isinstance(value, int):
        if value <= 0:
            raise UsageError(f"{what}: size {value} must be positive")
        return value
    try:
        return parse_size(value)
    except UsageError as error:
        raise UsageError(f"{what}: {error}") from None


def _parse_storage(table: object, where: str) -> StorageOffer:
    if not isinstance(table, dict):
        raise UsageError(f"{where}: [storage] must be a table")
    unknown = set(table) - {"capacity", "per_friend"}
    if unknown:
        raise UsageError(f"{where}: unknown [storage] settings {', '.join(sorted(unknown))}")
    sizes = {
        key: _size(table[key], f"{where}: [storage] {key}")
        for key in ("capacity", "per_friend")
        if key in table
    }
    return StorageOffer(**sizes)


def parse_duration(text: str) -> float:
    """Seconds from ``"0"``, ``"90"``, ``"90m"``, ``"36h"``, ``"3d"`` (a
    number with s, m, h or d; seconds without). UsageError naming the text."""
    match = _INTERVAL.match(text)
    if match is None:
        raise UsageError(f"{text!r} is not a duration (a number with s, m, h or d, such as 3d)")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def parse_interval(
    value: object,
    where: str,
    *,
    name: str = "interval",
    minimum: float = MIN_INTERVAL,
    example: str = "6h",
) -> float:
    """Seconds from ``3600``, ``"90m"``, ``"6h"``, ``"1d"``; the setting
    ``name`` in errors, which refuse less than ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UsageError(f'{where}: {name} must be seconds or text such as "{example}"')
    if isinstance(value, str):
        if _INTERVAL.match(value) is None:
            raise UsageError(f"{where}: {name} {value!r} is not a number with s, m, h or d")
        seconds = parse_duration(value)
    else:
        seconds = float(value)
    if seconds == math.inf:
        raise UsageError(f"{where}: {name} {value!r} is not a finite duration")
    if not seconds >= minimum:
        raise UsageError(
            f'{where}: {name} {value!r} is under {minimum:g} s; write e.g. "{example}"'
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


def parse_home_config(text: str, where: str) -> HomeConfig:
    """Everything a config's text says; ``where`` names it in errors."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"{where} is not valid TOML: {error}") from None
    version = document.get("version")
    if version != CONFIG_VERSION:
        raise UsageError(
            f"{where}: version = {version!r}; this p2pbackup reads version = {CONFIG_VERSION}"
        )
    unknown = set(document) - {"version", *_TABLES, *_OTHER_TABLES}
    if unknown:
        raise UsageError(f"{where}: unknown settings {', '.join(sorted(unknown))}")
    backup = document.get("backup")
    storage = document.get("storage")
    maintenance = document.get("maintenance")
    forget = document.get("forget")
    return HomeConfig(
        backup=None if backup is None else _parse_backup(backup, where),
        storage=StorageOffer() if storage is None else _parse_storage(storage, where),
        maintenance=(
            MaintenanceOptions() if maintenance is None else _parse_maintenance(maintenance, where)
        ),
        forget=None if forget is None else _parse_forget(forget, where),
        bandwidth=_parse_bandwidth(document.get("bandwidth"), where),
    )


def _parse_bandwidth(table: object, where: str) -> BandwidthLimits:
    if table is None:
        return BandwidthLimits()
    if not isinstance(table, dict):
        raise UsageError(f"{where}: [bandwidth] must be a table")
    unknown = set(table) - {"upload", "download"}
    if unknown:
        raise UsageError(f"{where}: unknown [bandwidth] settings {', '.join(sorted(unknown))}")
    here = f"{where}: [bandwidth]"
    return BandwidthLimits(
        upload=_rate(table.get("upload", "unlimited"), here, "upload"),
        download=_rate(table.get("download", "unlimited"), here, "download"),
    )


def _rate(value: object, where: str, name: str = "repair_rate") -> float | None:
    """Bytes a second from a size, or None from ``"unlimited"``."""
    if value == "unlimited":
        return None
    try:
        return float(_size(value, f"{where} {name}"))
    except UsageError as error:
        raise UsageError(f'{error} (a size per second, or "unlimited")') from None


def _parse_maintenance(table: object, where: str) -> MaintenanceOptions:
    if not isinstance(table, dict):
        raise UsageError(f"{where}: [maintenance] must be a table")
    keys = {"enabled", "audit_period", "repair_interval", "grace", "repair_rate"}
    unknown = set(table) - keys
    if unknown:
        raise UsageError(f"{where}: unknown [maintenance] settings {', '.join(sorted(unknown))}")
    options = MaintenanceOptions()
    here = f"{where}: [maintenance]"
    if "enabled" in table:
        if not isinstance(table["enabled"], bool):
            raise UsageError(f"{here} enabled must be true or false, got {table['enabled']!r}")
        options = attrs.evolve(options, enabled=table["enabled"])
    if "audit_period" in table:
        period = parse_interval(
            table["audit_period"],
            here,
            name="audit_period",
            minimum=MIN_MAINTENANCE_PERIOD,
            example="7d",
        )
        options = attrs.evolve(options, audit=attrs.evolve(options.audit, period=period))
    if "repair_interval" in table:
        interval = parse_interval(
            table["repair_interval"],
            here,
            name="repair_interval",
            minimum=MIN_MAINTENANCE_PERIOD,
            example="6h",
        )
        options = attrs.evolve(options, repair_interval=interval)
    if "grace" in table:
        grace = parse_interval(table["grace"], here, name="grace", minimum=0, example="3d")
        options = attrs.evolve(options, repair=attrs.evolve(options.repair, grace=grace))
    if "repair_rate" in table:
        options = attrs.evolve(options, repair_rate=_rate(table["repair_rate"], here))
    return options


def _parse_forget(table: object, where: str) -> RetentionConfig:
    if not isinstance(table, dict):
        raise UsageError(f"{where}: [forget] must be a table")
    known = {*_KEEP_COUNTS, "keep_within", "keep_tag", "group_by", "prune"}
    unknown = set(table) - known
    if unknown:
        raise UsageError(f"{where}: unknown [forget] settings {', '.join(sorted(unknown))}")
    counts = {}
    for key in _KEEP_COUNTS:
        value = table.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UsageError(f"{where}: [forget] {key} must be a whole number, got {value!r}")
        counts[key] = value
    within = table.get("keep_within")
    if within is not None and not isinstance(within, str):
        raise UsageError(f'{where}: [forget] keep_within must be text such as "7d"')
    group_by = table.get("group_by")
    if group_by is not None and not isinstance(group_by, str):
        raise UsageError(f'{where}: [forget] group_by must be text such as "paths,tags"')
    prune = table.get("prune", False)
    if not isinstance(prune, bool):
        raise UsageError(f"{where}: [forget] prune must be true or false")
    try:
        policy = RetentionPolicy.from_options(
            **counts,
            keep_within=within,
            keep_tag=_strings(table.get("keep_tag"), "keep_tag"),
        )
        grouping = parse_group_by(group_by)
    except UsageError as error:
        raise UsageError(f"{where}: [forget] {error}") from None
    if policy.empty:
        raise UsageError(
            f"{where}: [forget] keeps nothing: it needs at least one keep_… setting, "
            "such as keep_daily = 7"
        )
    return RetentionConfig(policy, grouping, prune)


def _parse_backup(table: object, where: str) -> BackupSchedule:
    if not isinstance(table, dict):
        raise UsageError(f"{where}: [backup] must be a table")
    unknown = set(table) - {
        "paths", "interval", "exclude", "exclude_if_present", "one_file_system", "tags"
    }  # fmt: skip
    if unknown:
        raise UsageError(f"{where}: unknown [backup] settings {', '.join(sorted(unknown))}")
    if "interval" not in table:
        raise UsageError(f'{where}: [backup] needs an interval, e.g. interval = "6h"')
    paths = _strings(table.get("paths"), f"{where}: [backup] paths", required=True)
    for path in paths:
        if not path.startswith("/"):
            raise UsageError(f"{where}: backup path {path!r} must be absolute")
    one_file_system = table.get("one_file_system", False)
    if not isinstance(one_file_system, bool):
        raise UsageError(f"{where}: [backup] one_file_system must be true or false")
    return BackupSchedule(
        paths=paths,
        interval=parse_interval(table["interval"], f"{where}: [backup]"),
        exclude=ExcludeRules.from_patterns(
            _strings(table.get("exclude"), f"{where}: exclude"),
            if_present=_strings(table.get("exclude_if_present"), f"{where}: exclude_if_present"),
            one_file_system=one_file_system,
        ),
        tags=_strings(table.get("tags"), f"{where}: tags"),
    )


def parse_config(text: str, where: str) -> BackupSchedule | None:
    """The schedule in a config's text; None if it schedules no backup."""
    return parse_home_config(text, where).backup


def load_config(path: Path) -> HomeConfig:
    """The config file at ``path``; an empty config if there is no file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return HomeConfig()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read {path}: {error}") from None
    return parse_home_config(text, str(path))


def load_schedule(path: Path) -> BackupSchedule | None:
    """The schedule in the config file at ``path``; None if there is none."""
    return load_config(path).backup
