"""What the dashboard shows and does, from what the node already has.

Nouns:

* **source** — :class:`Source`, bound to one home: every read the pages and
  the JSON API make, and every action they take. Reads and actions alike run
  the service's typed requests (:mod:`p2pbackup.app.requests`) as the
  control socket does (:meth:`p2pbackup.app.service.Service.answer`), so the
  JSON is that of ``status --json``, ``snapshots --json`` and the others, and
  an action fails with the line the command line would print. The index is
  read directly only for what no command prints (traffic per day).
* **job** — :class:`Job`: an action that runs for a while (a restore, a
  backup) in the dashboard's nursery; its progress lines and its end are
  **events** that :class:`EventHub` hands to every page listening (server-sent
  events).
* **verdict** — the one word for our data: ``safe``, ``at risk``,
  ``unrecoverable`` or ``nothing backed up yet`` (:func:`verdict`, from the
  status's pack health).
"""

from __future__ import annotations

import collections
import itertools
import json
import time
from collections.abc import Mapping
from typing import Any

import attrs
import trio

from p2pbackup.app import operations
from p2pbackup.app.home import Home
from p2pbackup.app.requests import (
    BackupRequest,
    FriendAddRequest,
    FriendListRequest,
    LsRequest,
    Request,
    RestoreRequest,
    SnapshotsRequest,
    StatusRequest,
    command_name,
    encode_arguments,
)
from p2pbackup.app.service import Service
from p2pbackup.errors import P2PBackupError, UsageError
from p2pbackup.node.control import ControlRequest, Outcome
from p2pbackup.node.schedule import BackupRecord, load_schedule

#: Seconds a status is shared: pages asked for at once wait for one answer.
STATUS_TTL = 2.0
#: Events kept for a page that reconnects.
EVENTS_KEPT = 200
#: Days of traffic the activity page plots.
TRAFFIC_DAYS = 30

JSON = dict[str, Any]


def verdict(status: Mapping[str, Any]) -> str:
    """The verdict (module docstring) of a status as ``status --json`` gives it."""
    data = status["data"]
    if not data["packs"]:
        return "nothing backed up yet"
    if data["unrecoverable"]:
        return "unrecoverable"
    if data["at_risk"]:
        return "at risk"
    return "safe"


@attrs.frozen
class Ran:
    """How a request ended, and the lines it wrote."""

    outcome: Outcome
    lines: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.outcome.code == 0

    def json(self) -> Any:
        return json.loads("\n".join(self.lines))


@attrs.define(eq=False)
class EventHub:
    """Events for the pages, numbered from 1; a listener waits for the next."""

    _events: collections.deque[tuple[int, JSON]] = attrs.Factory(
        lambda: collections.deque(maxlen=EVENTS_KEPT)
    )
    _count: int = 0
    _changed: trio.Event = attrs.Factory(trio.Event)

    def publish(self, event: JSON) -> None:
        self._count += 1
        self._events.append((self._count, event))
        self._changed.set()
        self._changed = trio.Event()

    @property
    def last(self) -> int:
        return self._count

    async def after(self, seen: int) -> list[tuple[int, JSON]]:
        """The events after number ``seen``, waiting for one if there are none."""
        while self._count <= seen:
            await self._changed.wait()
        return [(number, event) for number, event in self._events if number > seen]


@attrs.define(eq=False)
class Job:
    id: int
    kind: str
    state: str = "running"
    progress: str = ""
    lines: tuple[str, ...] = ()
    error: str = ""

    def to_json(self) -> JSON:
        return attrs.asdict(self)


@attrs.define(eq=False)
class Source:
    """Reads and actions on one home (module docstring)."""

    home: Home
    backups: BackupRecord = attrs.Factory(BackupRecord)
    events: EventHub = attrs.Factory(EventHub)
    jobs: dict[int, Job] = attrs.Factory(dict)
    #: Where jobs run; set by the dashboard role.
    nursery: trio.Nursery | None = None
    _status: tuple[float, JSON] | None = None
    _status_lock: trio.Lock = attrs.Factory(trio.Lock)
    _ids: itertools.count[int] = attrs.Factory(lambda: itertools.count(1))

    async def run(self, request: Request, progress: Any = None) -> Ran:
        """Run ``request`` as the daemon runs a client's (module docstring)."""
        lines: list[str] = []
        sent = ControlRequest(command_name(request), encode_arguments(request))
        outcome = await Service(self.home).answer(
            sent, lines.append, progress, asker="the dashboard"
        )
        return Ran(outcome, tuple(lines))

    async def _json(self, request: Request) -> Any:
        ran = await self.run(request)
        if not ran.ok:
            raise UsageError(ran.outcome.error or "the request failed")
        return ran.json()

    # -- reads ----------------------------------------------------------------------

    async def status(self, *, fresh: bool = False) -> JSON:
        """What ``status --json`` says, at most :data:`STATUS_TTL` old."""
        async with self._status_lock:
            now = trio.current_time()
            if fresh or self._status is None or now - self._status[0] > STATUS_TTL:
                report: JSON = await self._json(StatusRequest(json=True))
                self._status = (trio.current_time(), report)
            return self._status[1]

    async def snapshots(self) -> list[JSON]:
        found: list[JSON] = await self._json(SnapshotsRequest(json=True))
        return found

    async def ls(self, snapshot: str, path: str) -> list[JSON]:
        """The entries directly in ``path`` of a snapshot (``ls --json`` lists all below)."""
        entries: list[JSON] = await self._json(LsRequest(snapshot=snapshot, path=path, json=True))
        base = path.rstrip("/")
        return [e for e in entries if e["path"].rpartition("/")[0] == base and e["path"] != path]

    async def friends(self) -> list[JSON]:
        found: list[JSON] = await self._json(FriendListRequest(json=True))
        return found

    def invite(self) -> str | None:
        """This home's invite code; None while it has no address to hand out."""
        try:
            return operations.make_invite(self.home)
        except UsageError:
            return None

    async def traffic(self, now: float | None = None) -> list[JSON]:
        """Bytes moved each day of the last :data:`TRAFFIC_DAYS`, by purpose."""
        today = int(time.time() if now is None else now) // 86400
        async with operations.open_repository(self.home, access="read") as repo:
            rows = repo.index.traffic(since_day=today - TRAFFIC_DAYS + 1)
        by_day: dict[tuple[int, str], int] = {}
        for row in rows:
            key = (row.day, row.purpose)
            by_day[key] = by_day.get(key, 0) + row.sent + row.received
        return [{"day": d, "purpose": p, "bytes": b} for (d, p), b in sorted(by_day.items())]

    def schedule(self) -> JSON:
        """Last and next scheduled backup, as the running node knows them."""
        record = self.backups
        try:
            schedule = load_schedule(self.home.config_path)
        except P2PBackupError as error:
            return {"error": str(error), **attrs.asdict(record)}
        return {
            "paths": list(schedule.paths) if schedule else [],
            **attrs.asdict(record),
        }

    # -- actions --------------------------------------------------------------------

    async def add_friend(self, code: str) -> Ran:
        ran = await self.run(FriendAddRequest(code=code.strip()))
        self._status = None
        return ran

    def start_restore(self, snapshot: str, target: str, path: str | None) -> Job:
        request = RestoreRequest(snapshot=snapshot, target=target, path=path or None)
        return self._start("restore", request)

    def start_backup(self) -> Job:
        schedule = load_schedule(self.home.config_path)
        if schedule is None:
            raise UsageError("config.toml schedules no backup: set [backup] paths in Settings")
        request = BackupRequest(
            paths=schedule.paths, exclude=schedule.exclude.patterns, tags=schedule.tags
        )
        return self._start("backup", request)

    def _start(self, kind: str, request: Request) -> Job:
        if self.nursery is None:
            raise UsageError("the dashboard is not running jobs")
        job = Job(next(self._ids), kind)
        self.jobs[job.id] = job
        self.nursery.start_soon(self._run_job, job, request)
        self.events.publish({"job": job.to_json()})
        return job

    async def _run_job(self, job: Job, request: Request) -> None:
        def progress(line: str) -> None:
            job.progress = line
            self.events.publish({"job": job.to_json()})

        ran = await self.run(request, progress)
        if job.kind == "backup":
            # What the alerts and the overview read of backups, whoever started them.
            if ran.ok:
                self.backups.last_succeeded = time.time()
            else:
                self.backups.last_failed = time.time()
                self.backups.last_error = ran.outcome.error
        job.lines = ran.lines
        job.state = "done" if ran.ok else "failed"
        job.error = ran.outcome.error
        job.progress = ""
        if job.kind == "backup":
            self._status = None
        self.events.publish({"job": job.to_json()})
