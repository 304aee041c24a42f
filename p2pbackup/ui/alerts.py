"""Alerts: what is worth telling the user without being asked (pure).

Nouns:

* **alert config** — :class:`AlertConfig`, the ``[alerts]`` table of
  ``config.toml``::

      [alerts]
      no_backup_days = 3        # no successful backup for this long (0: never alert)
      peer_lost_after = "3d"    # a peer unseen this long counts as lost

      [[alerts.webhook]]        # repeatable
      url = "https://ntfy.example.org/my-backups"
      format = "ntfy"           # "json" (a generic JSON POST), "ntfy" or "gotify"
      token = "…"               # optional: ntfy's access token, Gotify's app token

      [alerts.email]
      server = "smtp.example.org:587"
      security = "starttls"     # "starttls" (default), "tls" or "none"
      username = "me"           # optional, with password
      password = "…"
      from = "backup@example.org"
      to = ["me@example.org"]

* **observation** — :class:`Observation`: what the node sees now (from its
  status, its snapshots and its scheduled backups).
* **alert state** — key → state for each thing watched: ``backup``
  (ok / failed), ``stale`` (ok / stale: no success for ``no_backup_days``),
  ``data`` (the status's verdict), ``peer ID`` (ok / lost / failing audits /
  disqualified; a peer that has never answered — a friend just added, whose
  node has not been reached yet — is ok until it has answered once, as its
  silence says nothing of how long it has been gone; what its absence does
  to the data shows in ``data``) and ``repairs`` (shards rebuilt so far).
* **event** — :class:`Event`: one message, made only when a state changes
  (:func:`evaluate`): into a bad state (backup failed, no backup for days,
  data at risk or unrecoverable, a peer lost or failing audits), back out of
  one, or more shards rebuilt (repair done). Nothing while nothing changes:
  no alert storms. A key seen for the first time counts as having been
  good, so a bad state at the first look is told once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final, Literal

import attrs

from p2pbackup.errors import UsageError
from p2pbackup.node.schedule import parse_duration

WebhookFormat = Literal["json", "ntfy", "gotify"]
Security = Literal["starttls", "tls", "none"]
Severity = Literal["error", "warning", "info"]

FORMATS: Final = ("json", "ntfy", "gotify")
SECURITIES: Final = ("starttls", "tls", "none")
DEFAULT_NO_BACKUP_DAYS: Final = 3
DEFAULT_PEER_LOST_AFTER: Final = 3 * 86400.0

#: The verdicts that are bad, worst last.
_BAD_DATA: Final = ("at risk", "unrecoverable")


@attrs.frozen
class Webhook:
    url: str
    format: WebhookFormat = "json"
    token: str = attrs.field(default="", repr=False)


@attrs.frozen
class Email:
    host: str
    port: int
    sender: str
    to: tuple[str, ...]
    security: Security = "starttls"
    username: str = ""
    password: str = attrs.field(default="", repr=False)


@attrs.frozen
class AlertConfig:
    no_backup_days: float = DEFAULT_NO_BACKUP_DAYS
    peer_lost_after: float = DEFAULT_PEER_LOST_AFTER
    webhooks: tuple[Webhook, ...] = ()
    email: Email | None = None

    @property
    def targets(self) -> tuple[Webhook | Email, ...]:
        return (*self.webhooks, *((self.email,) if self.email else ()))


def _check_keys(table: Mapping[str, object], allowed: set[str], where: str) -> None:
    unknown = set(table) - allowed
    if unknown:
        raise UsageError(f"{where}: unknown settings {', '.join(sorted(unknown))}")


def _string(table: Mapping[str, object], key: str, where: str, default: str | None = None) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or (default is None and not value):
        raise UsageError(f'{where}: {key} must be text, such as {key} = "…"')
    return value


def _url(value: str, where: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise UsageError(f"{where}: url {value!r} must start with http:// or https://")
    return value


def _webhook(table: object, where: str) -> Webhook:
    if not isinstance(table, dict):
        raise UsageError(f"{where} must be a table")
    _check_keys(table, {"url", "format", "token"}, where)
    form = _string(table, "format", where, "json")
    if form not in FORMATS:
        raise UsageError(f"{where}: format {form!r} is not one of {', '.join(FORMATS)}")
    url = _url(_string(table, "url", where), where)
    return Webhook(url, form, _string(table, "token", where, ""))  # type: ignore[arg-type]


def _email(table: object, where: str) -> Email:
    if not isinstance(table, dict):
        raise UsageError(f"{where} must be a table")
    _check_keys(table, {"server", "security", "username", "password", "from", "to"}, where)
    host, _, port_text = _string(table, "server", where).rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f'{where}: server must be HOST:PORT, such as "smtp.example.org:587"')
    security = _string(table, "security", where, "starttls")
    if security not in SECURITIES:
        raise UsageError(f"{where}: security {security!r} is not one of {', '.join(SECURITIES)}")
    to = table.get("to")
    if isinstance(to, str):
        to = [to]
    if not isinstance(to, list) or not to or not all(isinstance(a, str) and "@" in a for a in to):
        raise UsageError(
            f'{where}: to must be a list of addresses, such as to = ["me@example.org"]'
        )
    sender = _string(table, "from", where)
    if "@" not in sender:
        raise UsageError(f"{where}: from {sender!r} is not an email address")
    username = _string(table, "username", where, "")
    password = _string(table, "password", where, "")
    if bool(username) != bool(password):
        raise UsageError(f"{where}: username and password go together")
    return Email(host, int(port_text), sender, tuple(to), security, username, password)  # type: ignore[arg-type]


def parse_alerts(table: object, where: str) -> AlertConfig:
    """The ``[alerts]`` table; ``where`` names the file in errors."""
    if table is None:
        return AlertConfig()
    here = f"{where}: [alerts]"
    if not isinstance(table, dict):
        raise UsageError(f"{here} must be a table")
    _check_keys(table, {"no_backup_days", "peer_lost_after", "webhook", "email"}, here)
    days = table.get("no_backup_days", DEFAULT_NO_BACKUP_DAYS)
    if isinstance(days, bool) or not isinstance(days, (int, float)) or days < 0:
        raise UsageError(f"{here}: no_backup_days must be a number of days (0: never alert)")
    lost = table.get("peer_lost_after")
    lost_after = DEFAULT_PEER_LOST_AFTER
    if lost is not None:
        if not isinstance(lost, str):
            raise UsageError(f'{here}: peer_lost_after must be text such as "3d"')
        try:
            lost_after = parse_duration(lost)
        except UsageError as error:
            raise UsageError(f"{here}: peer_lost_after: {error}") from None
    hooks = table.get("webhook", [])
    if isinstance(hooks, dict):
        hooks = [hooks]
    if not isinstance(hooks, list):
        raise UsageError(f"{here}: webhook must be a table ([[alerts.webhook]])")
    return AlertConfig(
        no_backup_days=float(days),
        peer_lost_after=lost_after,
        webhooks=tuple(
            _webhook(hook, f"{where}: [[alerts.webhook]] #{i + 1}") for i, hook in enumerate(hooks)
        ),
        email=None if "email" not in table else _email(table["email"], f"{where}: [alerts.email]"),
    )


# -- watching -----------------------------------------------------------------------------


@attrs.frozen
class PeerSeen:
    peer_id: str
    online: bool
    #: Unix seconds of its last answer; None if never.
    last_seen: int | None
    audit_failing: bool = False
    disqualified: bool = False


@attrs.frozen
class Observation:
    #: Unix seconds.
    now: float
    #: The status's verdict (:func:`p2pbackup.ui.source.verdict`).
    verdict: str
    #: When a backup last succeeded (the newest snapshot), None if never.
    last_success: float | None
    #: Why the last scheduled backup failed, if it failed after the last success.
    backup_failure: str | None
    peers: tuple[PeerSeen, ...]
    #: Shards repair rebuilt onto peers (over the status's window).
    repaired: int
    node_id: str = ""


@attrs.frozen
class Event:
    kind: str
    severity: Severity
    title: str
    message: str


def _peer_state(peer: PeerSeen, now: float, lost_after: float) -> str:
    if peer.disqualified:
        return "disqualified"
    if peer.audit_failing:
        return "failing audits"
    if not peer.online and peer.last_seen is not None and now - peer.last_seen > lost_after:
        return "lost"
    return "ok"


def watched(observation: Observation, config: AlertConfig) -> dict[str, str]:
    """The alert state (module docstring) of an observation."""
    o = observation
    state = {"backup": "failed" if o.backup_failure is not None else "ok"}
    if config.no_backup_days and o.last_success is not None:
        stale = o.now - o.last_success > config.no_backup_days * 86400
        state["stale"] = "stale" if stale else "ok"
    state["data"] = o.verdict
    for peer in o.peers:
        state[f"peer {peer.peer_id}"] = _peer_state(peer, o.now, config.peer_lost_after)
    state["repairs"] = str(o.repaired)
    return state


def evaluate(
    previous: Mapping[str, str], observation: Observation, config: AlertConfig
) -> tuple[dict[str, str], list[Event]]:
    """The new alert state and the events its changes make (module docstring)."""
    now = watched(observation, config)
    events: list[Event] = []
    for key, value in now.items():
        before = previous.get(key)
        if key == "repairs":
            if before is not None and before.isdigit() and int(value) > int(before):
                events.append(_repaired(int(value) - int(before)))
            continue
        good = "safe" if key == "data" else "ok"
        was = before if before is not None else good
        if value != was:
            event = _changed(key, was, value, observation, config)
            if event is not None:
                events.append(event)
    return now, events


def _repaired(count: int) -> Event:
    return Event(
        "repair done",
        "info",
        "Repair done",
        f"repair rebuilt {count} shards on other peers; the data has its redundancy back",
    )


def _changed(key: str, was: str, now: str, o: Observation, config: AlertConfig) -> Event | None:
    if key == "backup":
        if now == "failed":
            return Event("backup failed", "error", "Backup failed", f"{o.backup_failure}")
        return Event("backup ok", "info", "Backup works again", "the last backup succeeded")
    if key == "stale":
        if now == "stale":
            days = f"{config.no_backup_days:g}"
            return Event(
                "no backup",
                "error",
                f"No backup for {days} days",
                f"no backup has succeeded for more than {days} days",
            )
        return Event("backup ok", "info", "Backups again", "a backup succeeded again")
    if key == "data":
        if now in _BAD_DATA:
            severity: Severity = "error" if now == "unrecoverable" else "warning"
            text = (
                "some data cannot be restored until its peers come back"
                if now == "unrecoverable"
                else "some packs have fewer than 2 spare shards: two more lost peers lose them"
            )
            return Event(f"data {now}", severity, f"Data {now}", text)
        if was in _BAD_DATA:
            return Event("data safe", "info", "Data safe again", f"your data is {now}")
        return None
    peer = key.removeprefix("peer ")[:16]
    if now == "ok":
        return Event("peer ok", "info", f"Peer {peer} is back", f"peer {peer} is {now} again")
    text = {
        "lost": f"peer {peer} has not answered for more than "
        f"{config.peer_lost_after / 86400:g} days",
        "failing audits": f"peer {peer} failed its last audit",
        "disqualified": f"audits disqualified peer {peer}: its shards count as lost",
    }[now]
    return Event(f"peer {now}", "warning", f"Peer {peer} {now}", text)


def test_event() -> Event:
    return Event("test", "info", "p2pbackup test alert", "this is a test: alerts reach you here")


def observation_from(
    now: float,
    status: Mapping[str, object],
    verdict: str,
    last_success: float | None,
    backup_failure: str | None,
) -> Observation:
    """An observation from a status as ``status --json`` gives it."""
    peers: Sequence[Mapping[str, object]] = status["peers"]  # type: ignore[assignment]
    seen = tuple(
        PeerSeen(
            peer_id=str(p["peer_id"]),
            online=bool(p["online"]),
            last_seen=p["last_seen"] if isinstance(p["last_seen"], int) else None,
            audit_failing=bool(p["audit_failure"]),
            disqualified=p["disqualified_at"] is not None,
        )
        for p in peers
    )
    repaired = 0
    for p in peers:
        maintenance: Mapping[str, int] = p["maintenance"]  # type: ignore[assignment]
        repaired += maintenance["placed"]
    node: Mapping[str, object] = status["node"]  # type: ignore[assignment]
    return Observation(
        now, verdict, last_success, backup_failure, seen, repaired, str(node["node_id"])
    )
