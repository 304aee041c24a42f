"""What the dashboard remembers between runs: samples over time and alert state.

Nouns:

* **history file** — ``HOME/ui.sqlite`` (SQLite, ``PRAGMA user_version`` 1),
  the dashboard's own, apart from the index.
* **sample** — :class:`Sample`: the node's state at one time, taken from a
  status every few minutes while ``serve`` runs: bytes stored on peers, the
  spare shards of the worst pack, the peers' mean audit score, peers online.
  The activity page plots them.
* **alert state** — the last state each alert was in (key → text), so that
  an alert goes out once when its state changes, and a restart of ``serve``
  does not send it again (:mod:`p2pbackup.ui.alerts`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import attrs

from p2pbackup.errors import UsageError

HISTORY_FILE: Final = "ui.sqlite"
HISTORY_VERSION: Final = 1
#: Samples kept: a year of one every ten minutes.
SAMPLES_KEPT: Final = 52_560

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    time INTEGER NOT NULL,
    stored INTEGER NOT NULL,
    min_margin INTEGER,
    audit_score REAL,
    online INTEGER NOT NULL,
    peers INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS alert_state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@attrs.frozen
class Sample:
    time: int
    stored: int
    min_margin: int | None
    audit_score: float | None
    online: int
    peers: int

    @classmethod
    def from_status(cls, time: int, status: Mapping[str, object]) -> Sample:
        """A sample of a status as ``status --json`` gives it."""
        peers: list[dict[str, object]] = status["peers"]  # type: ignore[assignment]
        data: dict[str, object] = status["data"]  # type: ignore[assignment]
        scores = [p["audit_score"] for p in peers if isinstance(p["audit_score"], float)]
        margin = data["min_margin"]
        return cls(
            time=time,
            stored=sum(int(p["bytes_held_for_us"]) for p in peers),  # type: ignore[call-overload]
            min_margin=margin if isinstance(margin, int) else None,
            audit_score=sum(scores) / len(scores) if scores else None,
            online=sum(1 for p in peers if p["online"]),
            peers=len(peers),
        )


class History:
    """The history file of one home (module docstring)."""

    def __init__(self, home: Path) -> None:
        path = home / HISTORY_FILE
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, HISTORY_VERSION):
            self._db.close()
            raise UsageError(
                f"{path} is of version {version}; this p2pbackup reads version "
                f"{HISTORY_VERSION} (remove it to start the dashboard's history afresh)"
            )
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version = {HISTORY_VERSION}")
        path.chmod(0o600)

    def close(self) -> None:
        self._db.close()

    def add_sample(self, sample: Sample) -> None:
        self._db.execute(
            "INSERT INTO samples(time, stored, min_margin, audit_score, online, peers)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            attrs.astuple(sample),
        )
        self._db.execute(
            "DELETE FROM samples WHERE rowid <= (SELECT MAX(rowid) FROM samples) - ?",
            (SAMPLES_KEPT,),
        )

    def samples(self, since: int = 0) -> list[Sample]:
        rows = self._db.execute(
            "SELECT time, stored, min_margin, audit_score, online, peers FROM samples"
            " WHERE time >= ? ORDER BY time",
            (since,),
        )
        return [Sample(*row) for row in rows]

    def alert_state(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT key, value FROM alert_state"))

    def set_alert_state(self, state: Mapping[str, str]) -> None:
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM alert_state")
            self._db.executemany("INSERT INTO alert_state(key, value) VALUES (?, ?)", state.items())
