"""Delivering alerts: webhooks (generic JSON, ntfy, Gotify) and email (SMTP).

Nouns:

* **target** — where alerts go (:class:`~p2pbackup.ui.alerts.Webhook`,
  :class:`~p2pbackup.ui.alerts.Email`).
* **message body** — what a webhook gets, by its format:

  - ``json``: a POST of ``{"version": 1, "event", "severity", "title",
    "message", "node", "time"}``;
  - ``ntfy``: a POST of the message as text, with ``Title``, ``Priority``
    and ``Tags`` headers (ntfy's own), the token as a bearer;
  - ``gotify``: a POST of ``{"title", "message", "priority"}`` to the URL
    (Gotify's ``…/message``), the token in ``X-Gotify-Key``.

  An email is plain text, its subject the title.

The standard library speaks both protocols (http.client, smtplib), each
call in a worker thread with a timeout, so that a slow server never stalls
the node. A delivery that fails is reported (the caller logs it or shows
it), never raised: the other targets still get theirs.
"""

from __future__ import annotations

import http.client
import json
import smtplib
import ssl
import time
from email.message import EmailMessage
from urllib.parse import urlsplit

import attrs
import trio

from p2pbackup.net.network import os_reason
from p2pbackup.ui.alerts import Email, Event, Webhook

#: Seconds one delivery may take.
TIMEOUT = 20.0
BODY_VERSION = 1
_PRIORITY = {"error": 5, "warning": 4, "info": 3}


@attrs.frozen
class Delivery:
    target: str
    #: Why it failed; "" if it was delivered.
    problem: str = ""


def describe(target: Webhook | Email) -> str:
    if isinstance(target, Webhook):
        return f"webhook ({target.format}) {target.url}"
    return f"email to {', '.join(target.to)} via {target.host}:{target.port}"


def webhook_request(
    hook: Webhook, event: Event, node: str, now: float
) -> tuple[bytes, dict[str, str]]:
    """The body and headers a webhook gets for ``event`` (module docstring)."""
    if hook.format == "ntfy":
        headers = {
            "Title": event.title,
            "Priority": str(_PRIORITY[event.severity]),
            "Tags": f"p2pbackup,{event.kind.replace(' ', '_')}",
            "Content-Type": "text/plain; charset=utf-8",
        }
        if hook.token:
            headers["Authorization"] = f"Bearer {hook.token}"
        return event.message.encode(), headers
    if hook.format == "gotify":
        headers = {"Content-Type": "application/json"}
        if hook.token:
            headers["X-Gotify-Key"] = hook.token
        body = {
            "title": event.title,
            "message": event.message,
            "priority": _PRIORITY[event.severity],
        }
        return json.dumps(body).encode(), headers
    headers = {"Content-Type": "application/json"}
    if hook.token:
        headers["Authorization"] = f"Bearer {hook.token}"
    body = {
        "version": BODY_VERSION,
        "event": event.kind,
        "severity": event.severity,
        "title": event.title,
        "message": event.message,
        "node": node,
        "time": int(now),
    }
    return json.dumps(body).encode(), headers


def _post(url: str, body: bytes, headers: dict[str, str]) -> None:
    parts = urlsplit(url)
    host = parts.hostname or ""
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(
            host, parts.port, timeout=TIMEOUT, context=ssl.create_default_context()
        )
    else:
        connection = http.client.HTTPConnection(host, parts.port, timeout=TIMEOUT)
    try:
        path = parts.path or "/"
        if parts.query:
            path += f"?{parts.query}"
        connection.request("POST", path, body, {"User-Agent": "p2pbackup", **headers})
        response = connection.getresponse()
        response.read()
        if not 200 <= response.status < 300:
            raise OSError(f"the server answered {response.status} {response.reason}")
    finally:
        connection.close()


def _send_mail(email: Email, event: Event, node: str) -> None:
    message = EmailMessage()
    message["Subject"] = f"[p2pbackup] {event.title}"
    message["From"] = email.sender
    message["To"] = ", ".join(email.to)
    message.set_content(f"{event.message}\n\nnode {node}\n")
    smtp: smtplib.SMTP
    if email.security == "tls":
        smtp = smtplib.SMTP_SSL(
            email.host, email.port, timeout=TIMEOUT, context=ssl.create_default_context()
        )
    else:
        smtp = smtplib.SMTP(email.host, email.port, timeout=TIMEOUT)
    with smtp:
        if email.security == "starttls":
            smtp.starttls(context=ssl.create_default_context())
        if email.username:
            smtp.login(email.username, email.password)
        smtp.send_message(message)


def _deliver_one(target: Webhook | Email, event: Event, node: str, now: float) -> None:
    if isinstance(target, Webhook):
        body, headers = webhook_request(target, event, node, now)
        _post(target.url, body, headers)
    else:
        _send_mail(target, event, node)


async def deliver(
    targets: tuple[Webhook | Email, ...], event: Event, node: str, now: float | None = None
) -> list[Delivery]:
    """Send ``event`` to every target; what became of each (module docstring)."""
    when = time.time() if now is None else now
    results = []
    for target in targets:
        name = describe(target)
        try:
            await trio.to_thread.run_sync(_deliver_one, target, event, node, when)
        except (OSError, smtplib.SMTPException, http.client.HTTPException) as error:
            results.append(Delivery(name, os_reason(error)))
        else:
            results.append(Delivery(name))
    return results
