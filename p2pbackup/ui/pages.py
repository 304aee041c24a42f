"""The dashboard's pages as HTML, from the JSON the source gives (pure).

Nouns:

* **page** — one screen: :func:`overview_page`, :func:`peers_page`,
  :func:`snapshots_page`, :func:`activity_page`, :func:`settings_page`; each
  is a whole document in the common frame (:func:`frame`), which names the
  page's stylesheet and script (shipped in the package) and carries the
  token for the script's actions (a ``<meta>``: only a page served to the
  token's holder has it).
* **id** — HTML ids the script and the browser tests find things by:
  ``verdict``, ``peers``, ``relay``, ``entries``, ``job``, ``plots``,
  ``settings-form``.

Every value from outside (names, paths, errors) is escaped here.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

from p2pbackup.engine.progress import human_bytes
from p2pbackup.maintenance.status import ROUTE_DIRECT, ROUTE_RELAYED
from p2pbackup.model import PEER_KIND_NODE

JSON = Mapping[str, Any]

NAV = (
    ("/", "Overview"),
    ("/peers", "Peers and friends"),
    ("/snapshots", "Snapshots"),
    ("/activity", "Activity"),
    ("/settings", "Settings"),
)

_VERDICT_CLASS = {
    "safe": "good",
    "at risk": "warn",
    "unrecoverable": "bad",
    "nothing backed up yet": "none",
}


def e(value: object) -> str:
    return html.escape(str(value), quote=True)


def when(unix: float | None, never: str = "never") -> str:
    if unix is None:
        return never
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(unix))


def frame(title: str, path: str, token: str, body: str) -> str:
    nav = "".join(
        f'<a href="{href}"{" class=here" if href == path else ""}>{e(name)}</a>'
        for href, name in NAV
    )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="p2pbackup-token" content="{e(token)}">'
        f"<title>{e(title)} · p2pbackup</title>"
        '<link rel="stylesheet" href="/static/style.css">'
        '<script src="/static/app.js" defer></script></head>'
        f"<body><header><strong>p2pbackup</strong><nav>{nav}</nav></header>"
        f"<main><h1>{e(title)}</h1>{body}</main></body></html>"
    )


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], table_id: str) -> str:
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _job_area() -> str:
    return '<section id="job" class="job" hidden><p class="job-state"></p><pre></pre></section>'


# -- overview ---------------------------------------------------------------------------


def overview_page(
    token: str,
    status: JSON,
    verdict: str,
    snapshots: Sequence[JSON],
    schedule: JSON,
) -> str:
    peers = status["peers"]
    online = sum(1 for p in peers if p["online"])
    stored = sum(p["bytes_held_for_us"] for p in peers)
    latest = snapshots[-1] if snapshots else None
    protected = latest["size"] if latest else 0
    last_backup = when(latest["time_ns"] / 1e9 if latest else None)
    if schedule.get("error"):
        next_backup = f"config.toml: {schedule['error']}"
    elif not schedule.get("paths"):
        next_backup = "none scheduled (Settings: [backup])"
    else:
        next_backup = when(schedule.get("next_at"), "when serve starts it")
    failed = ""
    if (
        schedule.get("last_failed")
        and (schedule.get("last_succeeded") or 0) < schedule["last_failed"]
    ):
        failed = (
            f'<p class="bad">The last scheduled backup failed {e(when(schedule["last_failed"]))}: '
            f"{e(schedule.get('last_error', ''))}</p>"
        )
    data_lines = "".join(f"<li>{e(line)}</li>" for line in _data_lines(status["data"]))
    body = (
        f'<section class="verdict {_VERDICT_CLASS.get(verdict, "none")}">'
        f'<p>Your data is</p><p id="verdict">{e(verdict)}</p><ul>{data_lines}</ul></section>'
        f"{failed}"
        '<dl class="facts">'
        f"<dt>Last backup</dt><dd id=last-backup>{e(last_backup)}</dd>"
        f"<dt>Next backup</dt><dd id=next-backup>{e(next_backup)}</dd>"
        f"<dt>Peers online</dt><dd id=peers-online>{online} of {len(peers)}</dd>"
        f"<dt>Stored on peers</dt><dd>{e(human_bytes(stored))}</dd>"
        f"<dt>Protected (latest snapshot)</dt><dd>{e(human_bytes(protected))}</dd>"
        f"<dt>Kept for others</dt><dd>{e(human_bytes(status['node']['hosting_bytes']))}</dd>"
        "</dl>"
        '<p><button data-action="/api/backup">Back up now</button></p>'
        f"{_job_area()}"
        f"<p class=note>Node {e(status['node']['node_id'])}</p>"
    )
    return frame("Overview", "/", token, body)


def _data_lines(data: JSON) -> list[str]:
    packs = data["packs"]
    if not packs:
        return ["nothing backed up yet"]
    lines = [f"{packs} packs: {data['safe']} safe"]
    if data["at_risk"]:
        lines.append(f"{data['at_risk']} at risk (fewer than 2 spare shards)")
    if data["unrecoverable"]:
        lines.append(f"{data['unrecoverable']} unrecoverable until their peers come back")
    if data["min_margin"] is not None and data["min_margin"] >= 0:
        lines.append(f"the worst pack has {data['min_margin']} spare shards")
    return lines


# -- peers and friends ------------------------------------------------------------------


def peers_page(token: str, status: JSON, invite: str | None, qr: str | None) -> str:
    rows = []
    for p in status["peers"]:
        score = "not audited" if p["audit_score"] is None else f"{p['audit_score']:.2f}"
        if p["disqualified_at"] is not None:
            score = f"disqualified {when(p['disqualified_at'])}"
        state = "online" if p["online"] else f"offline ({p['problem']})"
        rows.append(
            [
                f'<span title="{e(p["peer_id"])}">{e(_peer_label(p))}</span>'
                + (" (friend)" if p["is_friend"] else ""),
                e(_where(p)),
                f'<span class="{"good" if p["online"] else "bad"}">{e(state)}</span>',
                e(when(p["last_seen"])),
                e(score),
                e(p["shards_held_for_us"]),
                e(human_bytes(p["bytes_held_for_us"])),
                e(human_bytes(p["bytes_we_hold_for_it"])),
                e(_balance(p["balance"])),
            ]
        )
    table = _table(
        [
            "Peer",
            "Where",
            "State",
            "Last seen",
            "Audit score",
            "Shards of ours",
            "Bytes of ours",
            "We keep for it",
            "Balance",
        ],
        rows,
        "peers",
    )
    if invite is None:
        ours = "<p>No invite code yet: this node has no address to hand out.</p>"
    else:
        ours = (
            f'<p>Send this to a friend, who adds it under "Add a friend":</p>'
            f'<textarea id="invite" readonly rows=3>{e(invite)}</textarea>'
            f'<div class="qr">{qr or ""}</div>'
        )
    relay = status.get("relay")
    relaying = "" if relay is None else f'<p id="relay">{e(relay["summary"])}</p>'
    body = (
        f"{table}"
        "<p class=note>Balance: bytes a peer keeps for us minus bytes we keep for it.</p>"
        f"{relaying}"
        "<h2>Add a friend</h2>"
        '<form data-action="/api/friends" class="action">'
        '<textarea name="code" rows=3 required placeholder="their invite code"></textarea>'
        "<button>Add friend</button></form>"
        '<p class="result" id="friend-result"></p>'
        f"<h2>Our invite code</h2>{ours}"
    )
    return frame("Peers and friends", "/peers", token, body)


def _where(peer: JSON) -> str:
    """The peer's location and how the node reached it (its route in ``status --json``)."""
    route = peer.get("route")
    if route == ROUTE_RELAYED:
        relay = peer.get("relay") or "?"
        met = f"relayed by {relay[:16]} at {peer.get('relay_address')}"
        if peer.get("direct_address"):
            return f"{peer['kind']}, direct at {peer['direct_address']} ({met} first)"
        return f"{peer['kind']}, {met}"
    if route == ROUTE_DIRECT:
        return f"{peer['kind']}, direct: {peer['location']}"
    if peer["kind"] == PEER_KIND_NODE:
        return f"{peer['kind']}, not reached: {peer['location']}"
    return f"{peer['kind']}: {peer['location']}"


def _balance(balance: int) -> str:
    if balance > 0:
        return f"we owe {human_bytes(balance)}"
    if balance < 0:
        return f"owed {human_bytes(-balance)}"
    return "even"


# -- snapshots ---------------------------------------------------------------------------


def snapshots_page(
    token: str,
    snapshots: Sequence[JSON],
    chosen: str | None,
    path: str,
    entries: Sequence[JSON] | None,
    default_target: str,
) -> str:
    rows = [
        [
            f'<a href="/snapshots?snapshot={e(s["id"])}&amp;path=/">{e(s["id"][:12])}</a>',
            e(s["time"]),
            e(s["hostname"]),
            e(", ".join(s["paths"])),
            e(s["files"]),
            e(human_bytes(s["size"])),
        ]
        for s in reversed(snapshots)
    ]
    body = _table(["Snapshot", "Time", "Host", "Paths", "Files", "Size"], rows, "snapshots")
    if not snapshots:
        body += "<p>No snapshots yet.</p>"
    if chosen is not None and entries is not None:
        body += _browser(chosen, path, entries, default_target)
    return frame("Snapshots", "/snapshots", token, body)


def _link(snapshot: str, path: str) -> str:
    return f"/snapshots?snapshot={quote(snapshot)}&amp;path={quote(path)}"


def _browser(snapshot: str, path: str, entries: Sequence[JSON], target: str) -> str:
    crumbs = [f'<a href="{_link(snapshot, "/")}">/</a>']
    so_far = ""
    for part in [p for p in path.split("/") if p]:
        so_far += "/" + part
        crumbs.append(f'<a href="{_link(snapshot, so_far)}">{e(part)}</a>/')
    rows = []
    for entry in entries:
        name = entry["path"].rpartition("/")[2]
        shown = e(name)
        if entry["type"] == "dir":
            shown = f'<a href="{_link(snapshot, entry["path"])}">{e(name)}/</a>'
        rows.append(
            [
                shown,
                e(entry["type"]),
                e(human_bytes(entry["size"])) if entry["type"] == "file" else "",
                e(when(entry["mtime_ns"] / 1e9)),
                f'<button class="pick" data-path="{e(entry["path"])}">Restore…</button>',
            ]
        )
    return (
        f"<h2>Snapshot {e(snapshot[:12])}: {''.join(crumbs)}</h2>"
        + _table(["Name", "Type", "Size", "Modified", ""], rows, "entries")
        + '<form data-action="/api/restore" class="action" id="restore-form">'
        f'<input type="hidden" name="snapshot" value="{e(snapshot)}">'
        f'<label>Restore <input name="path" value="{e(path)}" size=40></label> '
        f'<label>into the directory <input name="target" value="{e(target)}" size=40 '
        "required></label> <button>Restore</button></form>"
        '<p class="result"></p>' + _job_area()
    )


# -- activity ------------------------------------------------------------------------------


def activity_page(
    token: str, plots: Sequence[tuple[str, str]], status: JSON, snapshots: Sequence[JSON]
) -> str:
    figures = "".join(f"<figure><figcaption>{e(t)}</figcaption>{svg}</figure>" for t, svg in plots)
    backups = _table(
        ["Backup", "Files", "Size"],
        [[e(s["time"]), e(s["files"]), e(human_bytes(s["size"]))] for s in reversed(snapshots)],
        "backups",
    )
    upkeep = _table(
        ["Peer", "Last audit", "Score", "Last failure", "Repairs"],
        [
            [
                e(_peer_label(p)),
                e(when(p["last_audit"])),
                "" if p["audit_score"] is None else e(f"{p['audit_score']:.2f}"),
                e(p["audit_failure"]),
                e(
                    f"{p['maintenance']['moved_off']} moved off, "
                    f"{p['maintenance']['placed']} rebuilt onto it, "
                    f"{p['maintenance']['pending']} waiting"
                ),
            ]
            for p in status["peers"]
        ],
        "audits",
    )
    body = (
        f'<section id="plots">{figures}</section>'
        f"<h2>Backups</h2>{backups}<h2>Audits and repairs (last 30 days)</h2>{upkeep}"
    )
    return frame("Activity and history", "/activity", token, body)


# -- settings ------------------------------------------------------------------------------


def _peer_label(peer: JSON) -> str:
    """A peer as the pages name it: its name, with its id's start."""
    short = str(peer["peer_id"])[:16]
    return f"{peer['name']} ({short})" if peer.get("name") else short


def settings_page(token: str, path: str, text: str, summary: Sequence[str], error: str) -> str:
    lines = "".join(f"<li>{e(line)}</li>" for line in summary)
    problem = f'<p class="bad">{e(error)}</p>' if error else ""
    body = (
        f"{problem}<ul>{lines}</ul>"
        f"<p>The settings are <code>{e(path)}</code>, checked before they are saved; "
        "serve reads them when it starts.</p>"
        '<form data-action="/api/settings" class="action" id="settings-form">'
        f'<textarea name="text" rows=24 cols=80 spellcheck=false>{e(text)}</textarea>'
        "<p><button>Check and save</button></p></form>"
        '<p class="result"></p>'
    )
    return frame("Settings", "/settings", token, body)


def refused_page() -> str:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        "<title>p2pbackup: no access</title></head><body><h1>No access</h1>"
        "<p>Open the address that <code>p2pbackup ui</code> prints: it carries this "
        "node's dashboard token.</p></body></html>"
    )
