"""Scenarios of the simulator: a small TOML file read into a frozen value (pure).

Nouns (docs/simulation.md documents every key):

* **scenario** — :class:`Scenario`: the network (``[nodes]``, ``[links]``),
  the repository's code and pack size (``[repository]``), what the owners
  back up (``[workload]``), the node's ``[maintenance]`` settings and the
  owners' ``[forget]`` policy (each handed to every home's config.toml as it
  is, ``[forget]`` only to owners) and the **faults** over time
  (``[[faults]]``), for ``days`` virtual days. ``version`` is
  :data:`SCENARIO_VERSION`.
* **node index** — nodes are ``node00``, ``node01``… by index; the first
  ``workload.owners`` of them back up (the **owners**); every node stores
  shards for its friends.
* **fault** — :class:`Fault`: on ``day`` (a float: 2.5 is noon of the third
  day), something happens to some nodes, named by ``nodes`` (indices), or
  ``count`` or ``fraction`` of them picked by the seed. :data:`FAULT_KINDS`
  lists the kinds.
* **small size** — ``[small]``: fewer nodes and days for CI; every day in
  the scenario (faults, ``holiday_days``…) is scaled by ``small.days / days``,
  and node i of a fault is node ``i * small.nodes // count``
  (:meth:`Scenario.small_size`).

:func:`parse` reads TOML text, refusing an unknown key or a bad value with a
one-line :class:`~p2pbackup.errors.UsageError`; :func:`dumps` writes a
scenario back (``parse(dumps(s)) == s``).
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from typing import Any, Final

import attrs

from p2pbackup.errors import UsageError
from p2pbackup.node.schedule import CONFIG_VERSION, parse_home_config

SCENARIO_VERSION: Final = 1

#: What a fault can do (docs/simulation.md says what each means).
FAULT_KINDS: Final = (
    "depart",  # machines gone for good, without notice
    "holiday",  # machines off for ``duration`` days, then back
    "partition",  # machines cut off from the rest for ``duration`` days, then healed
    "corrupt",  # a flipped byte in every block of ``share`` of the shard files held
    "lose_disk",  # every shard a node holds gone (a new disk); the node comes back empty
    "cheat",  # from now on the node keeps only the first block of each shard it takes
    "join",  # ``count`` new machines join, befriending ``friends`` nodes each
    "lose_home",  # an owner's machine lost; after ``duration`` days recovered from its key
)
#: Kinds that take a ``duration`` (days).
_WITH_DURATION: Final = ("holiday", "partition", "lose_home")


def _positive_int(name: str, value: object, *, zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero else 1):
        least = 0 if zero else 1
        raise UsageError(f"{name} must be a whole number of at least {least}, not {value!r}")
    return value


def _number(name: str, value: object, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{name} must be a number, not {value!r}")
    if not (low <= value <= high) or math.isnan(value):
        bound = f"from {low:g} to {high:g}" if high != math.inf else f"at least {low:g}"
        raise UsageError(f"{name} must be {bound}, not {value!r}")
    return float(value)


@attrs.frozen
class Nodes:
    """``[nodes]``: the machines and how they come and go."""

    count: int
    #: Each node's friends (both ways, a random graph by the seed); None: everyone.
    friends: int | None = None
    #: Hours a day a node is on (24: always), from a bedtime of its own.
    online_hours: float = 24.0
    #: Bedtimes spread evenly over this many hours from 22:00.
    bedtime_spread_hours: float = 4.0
    #: Holidays (away ``holiday_days`` at a random time) per node per year.
    holidays_per_year: float = 0.0
    holiday_days: float = 14.0
    #: Nodes (not owners) that leave for good per 30 days, each replaced by a newcomer.
    churn_per_month: float = 0.0
    #: Hours between a node's DHT refreshes (``serve``'s refresh period; 1 is its default).
    dht_refresh_hours: float = 1.0


@attrs.frozen
class Links:
    """``[links]``: every node's line to the internet."""

    latency_ms: float = 20.0
    #: Home uplink and downlink in kbit/s (asymmetric); 0: unlimited.
    uplink_kbps: float = 10_000.0
    downlink_kbps: float = 50_000.0
    #: Probability that a datagram (the DHT's UDP) is lost.
    loss: float = 0.0


@attrs.frozen
class Repository:
    """``[repository]``: every home's code and pack size."""

    k: int = 3
    n: int = 6
    pack_kib: int = 256


@attrs.frozen
class Workload:
    """``[workload]``: what the owners back up."""

    owners: int = 1
    #: The generated tree of each owner: this many files, this many KiB in all.
    files: int = 12
    tree_kib: int = 512
    #: Hours between scheduled backups.
    interval_hours: float = 24.0
    #: Share of the files rewritten each day (while the owner sleeps).
    change: float = 0.05
    #: Delegates of each owner: its first this many friends that are no
    #: owners, by node index (0: no delegation).
    delegates: int = 0


@attrs.frozen
class Fault:
    """One ``[[faults]]`` entry."""

    day: float
    kind: str
    nodes: tuple[int, ...] = ()
    count: int | None = None
    fraction: float | None = None
    #: Days it lasts (holiday, partition, lose_home).
    duration: float = 0.0
    #: corrupt: share of the node's shard files hit.
    share: float = 1.0
    #: join: friends of each newcomer; None: everyone.
    friends: int | None = None


@attrs.frozen
class Small:
    """``[small]``: the size CI runs (``--small``)."""

    nodes: int
    days: float


@attrs.frozen
class Scenario:
    name: str
    days: float
    nodes: Nodes
    small: Small
    description: str = ""
    seed: int = 1
    links: Links = Links()
    repository: Repository = Repository()
    workload: Workload = Workload()
    #: The node's ``[maintenance]`` table, as (key, value) pairs in file order.
    maintenance: tuple[tuple[str, str | int | float | bool], ...] = ()
    #: The owners' ``[forget]`` table, as (key, value) pairs in file order
    #: (``keep_tag`` is a tuple of strings); empty: nothing is forgotten.
    forget: tuple[tuple[str, str | int | float | bool | tuple[str, ...]], ...] = ()
    faults: tuple[Fault, ...] = ()
    version: int = SCENARIO_VERSION

    def small_size(self) -> Scenario:
        """The scenario at its ``[small]`` size: fewer nodes, every day scaled."""
        scale = self.small.days / self.days
        count = self.nodes.count

        def index(i: int) -> int:
            # Node i of count is node i × small / count of the small size.
            return i * self.small.nodes // count

        faults = tuple(
            attrs.evolve(
                f,
                day=f.day * scale,
                duration=f.duration * scale,
                nodes=tuple(dict.fromkeys(index(i) for i in f.nodes)),
            )
            for f in self.faults
        )
        nodes = attrs.evolve(
            self.nodes,
            count=self.small.nodes,
            friends=None
            if self.nodes.friends is None
            else min(self.nodes.friends, self.small.nodes - 1),
            holiday_days=self.nodes.holiday_days * scale,
        )
        workload = attrs.evolve(self.workload, owners=min(self.workload.owners, self.small.nodes))
        return check(
            attrs.evolve(self, days=self.small.days, nodes=nodes, workload=workload, faults=faults)
        )

    def resized(self, *, nodes: int | None = None, days: float | None = None) -> Scenario:
        """The scenario with ``nodes`` and ``days`` given on the command line."""
        changed = self
        if days is not None:
            scale = days / self.days
            changed = attrs.evolve(
                changed,
                days=days,
                faults=tuple(attrs.evolve(f, day=f.day * scale) for f in self.faults),
            )
        if nodes is not None:
            changed = attrs.evolve(changed, nodes=attrs.evolve(changed.nodes, count=nodes))
        return check(changed)


# -- reading ------------------------------------------------------------------------


def _table(where: str, value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UsageError(f"{where} must be a table")
    return value


def _take(where: str, table: Mapping[str, Any], known: tuple[str, ...]) -> None:
    for key in table:
        if key not in known:
            raise UsageError(f"unknown key {key!r} in {where} (known: {', '.join(known)})")


def _nodes(table: dict[str, Any]) -> Nodes:
    w = "[nodes]"
    _take(w, table, tuple(f.name for f in attrs.fields(Nodes)))
    if "count" not in table:
        raise UsageError(f"{w} needs count")
    friends = table.get("friends", "all")
    return Nodes(
        count=_positive_int(f"{w} count", table["count"]),
        friends=None if friends == "all" else _positive_int(f'{w} friends (or "all")', friends),
        online_hours=_number(f"{w} online_hours", table.get("online_hours", 24.0), 1, 24),
        bedtime_spread_hours=_number(
            f"{w} bedtime_spread_hours", table.get("bedtime_spread_hours", 4.0), 0, 24
        ),
        holidays_per_year=_number(
            f"{w} holidays_per_year", table.get("holidays_per_year", 0.0), 0, 365
        ),
        holiday_days=_number(f"{w} holiday_days", table.get("holiday_days", 14.0), 0),
        churn_per_month=_number(f"{w} churn_per_month", table.get("churn_per_month", 0.0), 0),
        dht_refresh_hours=_number(
            f"{w} dht_refresh_hours", table.get("dht_refresh_hours", 1.0), 0.1, 24 * 365
        ),
    )


def _links(table: dict[str, Any]) -> Links:
    w = "[links]"
    _take(w, table, tuple(f.name for f in attrs.fields(Links)))
    d = Links()
    return Links(
        latency_ms=_number(f"{w} latency_ms", table.get("latency_ms", d.latency_ms), 0, 10_000),
        uplink_kbps=_number(f"{w} uplink_kbps", table.get("uplink_kbps", d.uplink_kbps), 0),
        downlink_kbps=_number(f"{w} downlink_kbps", table.get("downlink_kbps", d.downlink_kbps), 0),
        loss=_number(f"{w} loss", table.get("loss", d.loss), 0, 1),
    )


def _repository(table: dict[str, Any]) -> Repository:
    w = "[repository]"
    _take(w, table, tuple(f.name for f in attrs.fields(Repository)))
    d = Repository()
    k = _positive_int(f"{w} k", table.get("k", d.k))
    n = _positive_int(f"{w} n", table.get("n", d.n))
    if not k < n <= 255:
        raise UsageError(f"{w} needs k < n <= 255, not k = {k}, n = {n}")
    return Repository(k, n, _positive_int(f"{w} pack_kib", table.get("pack_kib", d.pack_kib)))


def _workload(table: dict[str, Any]) -> Workload:
    w = "[workload]"
    _take(w, table, tuple(f.name for f in attrs.fields(Workload)))
    d = Workload()
    return Workload(
        owners=_positive_int(f"{w} owners", table.get("owners", d.owners)),
        files=_positive_int(f"{w} files", table.get("files", d.files)),
        tree_kib=_positive_int(f"{w} tree_kib", table.get("tree_kib", d.tree_kib)),
        interval_hours=_number(
            f"{w} interval_hours", table.get("interval_hours", d.interval_hours), 1
        ),
        change=_number(f"{w} change", table.get("change", d.change), 0, 1),
        delegates=_positive_int(f"{w} delegates", table.get("delegates", d.delegates), zero=True),
    )


def _fault(number: int, table: dict[str, Any]) -> Fault:
    w = f"[[faults]] #{number}"
    _take(w, table, tuple(f.name for f in attrs.fields(Fault)))
    kind = table.get("kind")
    if kind not in FAULT_KINDS:
        raise UsageError(f"{w} kind must be one of {', '.join(FAULT_KINDS)}, not {kind!r}")
    if "day" not in table:
        raise UsageError(f"{w} needs day")
    nodes = table.get("nodes", [])
    if not isinstance(nodes, list):
        raise UsageError(f"{w} nodes must be a list of node indices, not {nodes!r}")
    chosen = [k for k in ("nodes", "count", "fraction") if k in table]
    if kind != "join" and len(chosen) != 1:
        raise UsageError(f"{w} ({kind}) names its nodes by one of nodes, count or fraction")
    if kind == "join" and ("count" not in table or len(chosen) != 1):
        raise UsageError(f"{w} (join) needs count, and no nodes or fraction")
    if kind in _WITH_DURATION and "duration" not in table:
        raise UsageError(f"{w} ({kind}) needs duration (days)")
    friends = table.get("friends", "all")
    return Fault(
        day=_number(f"{w} day", table["day"], 0),
        kind=kind,
        nodes=tuple(_positive_int(f"{w} nodes", i, zero=True) for i in nodes),
        count=None if "count" not in table else _positive_int(f"{w} count", table["count"]),
        fraction=(
            None if "fraction" not in table else _number(f"{w} fraction", table["fraction"], 0, 1)
        ),
        duration=_number(f"{w} duration", table.get("duration", 0.0), 0),
        share=_number(f"{w} share", table.get("share", 1.0), 0, 1),
        friends=None if friends == "all" else _positive_int(f'{w} friends (or "all")', friends),
    )


_TOP: Final = (
    "version",
    "name",
    "description",
    "days",
    "seed",
    "nodes",
    "links",
    "repository",
    "workload",
    "maintenance",
    "forget",
    "faults",
    "small",
)


def parse(text: str, where: str = "scenario") -> Scenario:
    """A scenario from TOML text; ``where`` (its path) starts every error."""
    try:
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise UsageError(f"not valid TOML: {error}") from None
        return _parse(document)
    except UsageError as error:
        raise UsageError(f"{where}: {error}") from None


def _parse(document: dict[str, Any]) -> Scenario:
    _take("the scenario", document, _TOP)
    version = document.get("version")
    if version != SCENARIO_VERSION:
        raise UsageError(
            f"version = {version!r}; this p2pbackup reads version = {SCENARIO_VERSION}"
        )
    name = document.get("name")
    if not isinstance(name, str) or not name:
        raise UsageError("name must be a non-empty string")
    description = document.get("description", "")
    if not isinstance(description, str):
        raise UsageError("description must be a string")
    if "days" not in document:
        raise UsageError("days is missing")
    if "nodes" not in document:
        raise UsageError("[nodes] is missing")
    small = _table("[small]", document.get("small", {}))
    _take("[small]", small, ("nodes", "days"))
    nodes = _nodes(_table("[nodes]", document["nodes"]))
    days = _number("days", document["days"], 0.01)
    maintenance = _table("[maintenance]", document.get("maintenance", {}))
    for key, value in maintenance.items():
        if isinstance(value, (dict, list)):
            raise UsageError(f"[maintenance] {key} must be a plain value")
    forget = dict(_table("[forget]", document.get("forget", {})))
    for key, value in forget.items():
        if isinstance(value, list):
            if not all(isinstance(v, str) for v in value):
                raise UsageError(f"[forget] {key} must be a list of strings")
            forget[key] = tuple(value)
        elif isinstance(value, dict):
            raise UsageError(f"[forget] {key} must be a plain value")
    faults = document.get("faults", [])
    if not isinstance(faults, list):
        raise UsageError("faults must be an array of tables ([[faults]])")
    scenario = Scenario(
        name=name,
        description=description,
        days=days,
        seed=_positive_int("seed", document.get("seed", 1), zero=True),
        nodes=nodes,
        links=_links(_table("[links]", document.get("links", {}))),
        repository=_repository(_table("[repository]", document.get("repository", {}))),
        workload=_workload(_table("[workload]", document.get("workload", {}))),
        maintenance=tuple(maintenance.items()),
        forget=tuple(forget.items()),
        faults=tuple(
            _fault(i + 1, _table(f"[[faults]] #{i + 1}", f)) for i, f in enumerate(faults)
        ),
        small=Small(
            nodes=_positive_int("[small] nodes", small.get("nodes", min(nodes.count, 8))),
            days=_number("[small] days", small.get("days", min(days, 4.0)), 0.01),
        ),
    )
    return check(scenario)


def check(scenario: Scenario) -> Scenario:
    """Refuse what each part allows but the whole does not."""
    count = scenario.nodes.count
    if count < 4:
        raise UsageError(f"[nodes] count = {count}: a backup needs at least 3 other nodes")
    if scenario.workload.owners > count:
        raise UsageError(f"[workload] owners = {scenario.workload.owners} is more than the nodes")
    if scenario.nodes.friends is not None and not 3 <= scenario.nodes.friends < count:
        raise UsageError(
            f"[nodes] friends = {scenario.nodes.friends} must be from 3 to count - 1 ({count - 1})"
        )
    if scenario.workload.delegates >= count:
        raise UsageError(
            f"[workload] delegates = {scenario.workload.delegates} must be less than the nodes"
        )
    if scenario.small.nodes < 4:
        raise UsageError("[small] nodes must be at least 4")
    for number, fault in enumerate(scenario.faults, 1):
        for index in fault.nodes:
            if index >= count:
                raise UsageError(f"[[faults]] #{number} names node {index}; there are {count}")
        if fault.kind == "lose_home" and any(i >= scenario.workload.owners for i in fault.nodes):
            raise UsageError(f"[[faults]] #{number} (lose_home) names a node that is no owner")
    parse_home_config(home_config(scenario, ["/tree"]), "as a home's config.toml")
    return scenario


def home_config(scenario: Scenario, paths: list[str]) -> str:
    """The config.toml of a home: scheduled backups of ``paths`` and the
    scenario's ``[forget]`` (neither for a node that does not back up) and
    its ``[maintenance]``."""
    lines = [f"version = {CONFIG_VERSION}"]
    if paths:
        interval = round(scenario.workload.interval_hours * 3600)
        lines += ["[backup]", f"paths = {_value(paths)}", f'interval = "{interval}s"']
        if scenario.forget:
            lines.append("[forget]")
            lines += [f"{key} = {_value(value)}" for key, value in scenario.forget]
    lines.append("[maintenance]")
    lines += [f"{key} = {_value(value)}" for key, value in scenario.maintenance]
    return "\n".join(lines) + "\n"


# -- writing ------------------------------------------------------------------------


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # TOML's basic strings take no control character, nor DEL, as it is.
        escaped = "".join(
            f"\\u{ord(c):04x}" if c in '"\\' or ord(c) < 0x20 or ord(c) == 0x7F else c
            for c in value
        )
        return f'"{escaped}"'
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else "nan"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return str(value)


def dumps(scenario: Scenario) -> str:
    """The scenario as TOML that :func:`parse` reads back to an equal value."""
    lines = [
        f"version = {scenario.version}",
        f"name = {_value(scenario.name)}",
        f"description = {_value(scenario.description)}",
        f"days = {_value(scenario.days)}",
        f"seed = {scenario.seed}",
    ]

    def table(header: str, values: Mapping[str, object]) -> None:
        lines.extend(["", header])
        for key, value in values.items():
            if value is None:
                if key == "friends":
                    lines.append('friends = "all"')
                continue
            lines.append(f"{key} = {_value(value)}")

    table("[nodes]", attrs.asdict(scenario.nodes))
    table("[links]", attrs.asdict(scenario.links))
    table("[repository]", attrs.asdict(scenario.repository))
    table("[workload]", attrs.asdict(scenario.workload))
    table("[maintenance]", dict(scenario.maintenance))
    table("[forget]", dict(scenario.forget))
    table("[small]", attrs.asdict(scenario.small))
    for fault in scenario.faults:
        values = attrs.asdict(fault, recurse=False)
        if not fault.nodes:
            del values["nodes"]
        table("[[faults]]", values)
    return "\n".join(lines) + "\n"
