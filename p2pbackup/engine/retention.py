"""Retention: which snapshots a ``forget`` policy keeps (pure).

Nouns, as restic has them:

* **policy** — :class:`RetentionPolicy`: ``--keep-last N`` keeps the N
  newest snapshots; ``--keep-hourly/-daily/-weekly/-monthly/-yearly N`` keep
  the newest snapshot of each of the N newest hours (days, ISO weeks, months,
  years) that have one; ``--keep-within DURATION`` keeps every snapshot
  younger than DURATION, counted back from the newest snapshot of its group
  (not from now, so that a home that stopped backing up keeps its last ones);
  ``--keep-tag TAG`` keeps every snapshot tagged TAG. A snapshot any rule
  keeps is kept. A policy with no rule keeps nothing and is refused: a
  ``forget`` that would drop every snapshot is a typo, not a wish.
* **group** — the policy applies to each group of snapshots apart: those
  alike in the **group keys** (``host``, ``paths``, ``tags``; by default
  ``paths`` and ``tags``, so that a backup of other folders, or a scheduled
  run tagged ``scheduled`` beside manual ones, keeps its own history).
  restic groups by ``host,paths``; here one recovery key writes one home at a
  time, so a home recovered on a machine of another name carries on the same
  history rather than starting a new group.
* **duration** — ``--keep-within``'s text, restic's form: numbers with
  ``y`` (years), ``m`` (months), ``d`` (days) and ``h`` (hours), such as
  ``1y6m`` or ``7d12h``; counted back in the calendar.
* **decision** — :class:`RetentionDecision`: per group, the snapshots kept
  (each with the rules that keep it) and those removed.

Buckets (hour, day …) are read in the time zone given, the user's local one
when the command line asks.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final

import attrs

from p2pbackup.errors import UsageError
from p2pbackup.model import Snapshot


def tag_group(text: str) -> tuple[str, ...]:
    """The tags of one ``--tag a,b`` option: comma-separated, each once."""
    return tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))


#: The keys snapshots may be grouped by, and the default grouping.
GROUP_KEYS: Final = ("host", "paths", "tags")
DEFAULT_GROUP_BY: Final = ("paths", "tags")

_DURATION = re.compile(r"(\d+)([ymdh])")


@attrs.frozen
class KeepDuration:
    """A ``--keep-within`` duration (module docstring)."""

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> KeepDuration:
        """``1y6m``, ``7d``, ``36h``…; UsageError naming the text."""
        cleaned = text.strip().replace(" ", "")
        parts = _DURATION.findall(cleaned)
        if not cleaned or "".join(n + u for n, u in parts) != cleaned:
            raise UsageError(
                f"{text!r} is not a duration: use numbers with y, m, d and h "
                "(years, months, days, hours), such as 7d or 1y6m"
            )
        amounts = {"y": 0, "m": 0, "d": 0, "h": 0}
        for number, unit in parts:
            amounts[unit] += int(number)
        return cls(amounts["y"], amounts["m"], amounts["d"], amounts["h"], cleaned)

    def before(self, when: datetime.datetime) -> datetime.datetime:
        """``when`` less this duration, in the calendar (the 31st of a month
        less a month is the last day of the month before)."""
        months = when.year * 12 + (when.month - 1) - self.years * 12 - self.months
        year, month = divmod(months, 12)
        day = min(when.day, _days_in(year, month + 1))
        moved = when.replace(year=max(year, datetime.MINYEAR), month=month + 1, day=day)
        return moved - datetime.timedelta(days=self.days, hours=self.hours)

    def __bool__(self) -> bool:
        return bool(self.years or self.months or self.days or self.hours)


def _days_in(year: int, month: int) -> int:
    if month == 12:
        return 31
    start = datetime.date(max(year, datetime.MINYEAR), month, 1)
    return (datetime.date(start.year, month + 1, 1) - start).days


def _check_count(_policy: object, field: attrs.Attribute[int], value: int) -> None:
    if value < 0:
        raise UsageError(f"--{field.name.replace('_', '-')} must not be negative")


@attrs.frozen(kw_only=True)
class RetentionPolicy:
    """What ``forget`` keeps (module docstring)."""

    keep_last: int = attrs.field(default=0, validator=_check_count)
    keep_hourly: int = attrs.field(default=0, validator=_check_count)
    keep_daily: int = attrs.field(default=0, validator=_check_count)
    keep_weekly: int = attrs.field(default=0, validator=_check_count)
    keep_monthly: int = attrs.field(default=0, validator=_check_count)
    keep_yearly: int = attrs.field(default=0, validator=_check_count)
    keep_within: KeepDuration = attrs.Factory(KeepDuration)
    #: Each entry keeps the snapshots that carry all of its tags (``a,b``).
    keep_tags: tuple[tuple[str, ...], ...] = ()

    @classmethod
    def from_options(
        cls,
        *,
        keep_last: int = 0,
        keep_hourly: int = 0,
        keep_daily: int = 0,
        keep_weekly: int = 0,
        keep_monthly: int = 0,
        keep_yearly: int = 0,
        keep_within: str | None = None,
        keep_tag: Iterable[str] = (),
    ) -> RetentionPolicy:
        """The policy the command line's (or config.toml's) options state."""
        return cls(
            keep_last=keep_last,
            keep_hourly=keep_hourly,
            keep_daily=keep_daily,
            keep_weekly=keep_weekly,
            keep_monthly=keep_monthly,
            keep_yearly=keep_yearly,
            keep_within=KeepDuration.parse(keep_within) if keep_within else KeepDuration(),
            keep_tags=tuple(tag_group(text) for text in keep_tag),
        )

    @property
    def empty(self) -> bool:
        """Whether no rule keeps anything."""
        counted = any(count for _name, count, _bucket in self.rules())
        return not (counted or self.keep_within or any(self.keep_tags))

    def rules(self) -> list[tuple[str, int, Callable[[datetime.datetime], object] | None]]:
        """Each counted rule: its name, its count and its bucket (None: each snapshot its own)."""
        return [
            ("last", self.keep_last, None),
            ("hourly", self.keep_hourly, lambda t: (t.year, t.month, t.day, t.hour)),
            ("daily", self.keep_daily, lambda t: (t.year, t.month, t.day)),
            ("weekly", self.keep_weekly, lambda t: t.isocalendar()[:2]),
            ("monthly", self.keep_monthly, lambda t: (t.year, t.month)),
            ("yearly", self.keep_yearly, lambda t: t.year),
        ]

    def describe(self) -> str:
        """The policy as the options that state it."""
        words = [f"--keep-{name} {count}" for name, count, _ in self.rules() if count]
        if self.keep_within:
            words.append(f"--keep-within {self.keep_within.text}")
        words += [f"--keep-tag {','.join(tags)}" for tags in self.keep_tags if tags]
        return " ".join(words)


@attrs.frozen
class Kept:
    snapshot_id: bytes
    snapshot: Snapshot
    #: The rules that keep it: ``last``, ``daily``, ``within 7d``, ``tag x``…
    reasons: tuple[str, ...]


@attrs.frozen
class GroupDecision:
    """The policy applied to one group, newest snapshot first."""

    #: The group key's values: ``host``, ``paths``, ``tags`` as asked.
    key: Mapping[str, object]
    keep: tuple[Kept, ...]
    remove: tuple[tuple[bytes, Snapshot], ...]


@attrs.frozen
class RetentionDecision:
    groups: tuple[GroupDecision, ...]

    @property
    def removed(self) -> list[bytes]:
        return [sid for group in self.groups for sid, _ in group.remove]

    @property
    def kept(self) -> list[bytes]:
        return [kept.snapshot_id for group in self.groups for kept in group.keep]


def parse_group_by(text: str | None) -> tuple[str, ...]:
    """``host,paths,tags`` (any of them; empty: one group); None: the default."""
    if text is None:
        return DEFAULT_GROUP_BY
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in keys if k not in GROUP_KEYS]
    if unknown:
        raise UsageError(f"--group-by: {', '.join(unknown)} is not one of {', '.join(GROUP_KEYS)}")
    return tuple(k for k in GROUP_KEYS if k in keys)


def group_key(snapshot: Snapshot, group_by: Sequence[str]) -> tuple[tuple[str, object], ...]:
    values: dict[str, object] = {
        "host": snapshot.hostname,
        "paths": tuple(sorted(snapshot.paths)),
        "tags": tuple(sorted(snapshot.tags)),
    }
    return tuple((key, values[key]) for key in group_by)


def apply_policy(
    policy: RetentionPolicy,
    snapshots: Iterable[tuple[bytes, Snapshot]],
    *,
    tz: datetime.tzinfo,
    group_by: Sequence[str] = DEFAULT_GROUP_BY,
) -> RetentionDecision:
    """Which of ``snapshots`` the policy keeps, group by group; UsageError
    for a policy that keeps nothing."""
    if policy.empty:
        raise UsageError(
            "a policy that keeps nothing would forget every snapshot: give at least one "
            "--keep-… option (or name the snapshots to forget)"
        )
    groups: dict[tuple[tuple[str, object], ...], list[tuple[bytes, Snapshot]]] = {}
    for item in snapshots:
        groups.setdefault(group_key(item[1], group_by), []).append(item)
    decided = [
        _apply_to_group(policy, dict(key), members, tz)
        for key, members in sorted(groups.items(), key=lambda g: repr(g[0]))
    ]
    return RetentionDecision(tuple(decided))


def _apply_to_group(
    policy: RetentionPolicy,
    key: Mapping[str, object],
    members: list[tuple[bytes, Snapshot]],
    tz: datetime.tzinfo,
) -> GroupDecision:
    newest_first = sorted(members, key=lambda item: (item[1].time_ns, item[0]), reverse=True)
    times = [
        datetime.datetime.fromtimestamp(s.time_ns / 1e9, tz=datetime.UTC).astimezone(tz)
        for _sid, s in newest_first
    ]
    reasons: list[list[str]] = [[] for _ in newest_first]
    for name, count, bucket in policy.rules():
        left, last_bucket = count, object()
        for i, when in enumerate(times):
            if left <= 0:
                break
            value = i if bucket is None else bucket(when)
            if value != last_bucket:
                reasons[i].append(name)
                left -= 1
                last_bucket = value
    if policy.keep_within and times:
        since = policy.keep_within.before(times[0])
        for i, when in enumerate(times):
            if when >= since:
                reasons[i].append(f"within {policy.keep_within.text}")
    for tags in policy.keep_tags:
        if not tags:
            continue
        for i, (_sid, snap) in enumerate(newest_first):
            if set(tags) <= set(snap.tags):
                reasons[i].append(f"tag {','.join(tags)}")
    keep = tuple(
        Kept(sid, snap, tuple(why))
        for (sid, snap), why in zip(newest_first, reasons, strict=True)
        if why
    )
    remove = tuple(item for item, why in zip(newest_first, reasons, strict=True) if not why)
    return GroupDecision(key, keep, remove)
