"""The dashboard's HTTP server: Hypercorn's trio worker, inside the node.

Nouns:

* **listen address** — host and port the dashboard binds (port 0: one the
  system picks); :func:`serve_http` reports the ``http://HOST:PORT`` it
  bound once it accepts connections.

The only module that imports hypercorn.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

log = logging.getLogger(__name__)

#: Seconds a request has to finish once the node stops.
GRACEFUL_TIMEOUT = 1.0


async def serve_http(
    app: Any,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` (ASGI) on ``host:port`` until cancelled; report the
    address bound. OSError if the address cannot be bound."""
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    # The node's own log says what matters; no access log of every request.
    config.accesslog = None
    config.errorlog = log
    config.graceful_timeout = GRACEFUL_TIMEOUT
    async with trio.open_nursery() as nursery:
        # OSError from here when the address cannot be bound.
        binds: list[str] = await nursery.start(functools.partial(serve, app, config, mode="asgi"))
        task_status.started(binds[0])
