"""The control socket: how the CLI reaches a running ``serve`` of the same home.

Nouns:

* **control socket** — ``HOME/control.sock``, a Unix socket that ``serve``
  opens with mode 0600 and that answers only processes of the same user
  (checked with ``SO_PEERCRED`` where the system has it).
* **request** — one command line as the user typed it, with the directory it
  was typed in (relative paths mean what they meant to the user).
* **reply** — a stream of output lines as the daemon produces them, then the
  command's error message (if any) and exit code.

Wire format (version 1): one JSON object a line, at most
:data:`MAX_LINE` bytes. Request ``{"v": 1, "argv": [...], "cwd": "..."}``,
with ``"progress": true`` when the client shows progress (its stderr is a
terminal); replies ``{"out": "text"}`` and, only if asked for,
``{"progress": "line"}`` (an empty line: the progress is over), then
``{"exit": code, "error": "message"}``. Keys a side does not know are
ignored, so a client and a daemon of neighbouring releases understand each
other.
Encoding and decoding are pure (:func:`encode_message`,
:class:`LineDecoder`); the rest is thin trio.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Final

import trio

from p2pbackup.errors import RemoteProtocolError

log = logging.getLogger(__name__)

CONTROL_VERSION: Final = 1
MAX_LINE: Final = 1 << 20

#: Sends one line to the client.
LineSink = Callable[[str], None]
#: What runs a request in the daemon: (argv, cwd, send an output line, send a
#: progress line or None if the client shows none) → (exit code, error).
Handler = Callable[[list[str], str, LineSink, LineSink | None], Awaitable[tuple[int, str]]]


def encode_message(message: dict[str, Any]) -> bytes:
    return json.dumps(message, ensure_ascii=False).encode() + b"\n"


class LineDecoder:
    """Bytes in, JSON objects out, one a line; RemoteProtocolError for junk."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        messages = []
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            try:
                message = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise RemoteProtocolError(f"control socket: not a JSON line: {error}") from None
            if not isinstance(message, dict):
                raise RemoteProtocolError("control socket: a line is not a JSON object")
            messages.append(message)
        if len(self._buffer) > MAX_LINE:
            raise RemoteProtocolError(f"control socket: a line longer than {MAX_LINE} bytes")
        return messages


def parse_request(message: dict[str, Any]) -> tuple[list[str], str]:
    """(argv, cwd) from a request; RemoteProtocolError naming what is wrong.
    (Whether it asks for progress: :func:`wants_progress`.)"""
    if message.get("v") != CONTROL_VERSION:
        raise RemoteProtocolError(
            f"control request version {message.get('v')!r}; this daemon speaks {CONTROL_VERSION}"
        )
    argv, cwd = message.get("argv"), message.get("cwd")
    if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
        raise RemoteProtocolError("control request: argv must be a list of strings")
    if not (isinstance(cwd, str) and cwd.startswith("/")):
        raise RemoteProtocolError("control request: cwd must be an absolute path")
    return argv, cwd


def wants_progress(message: dict[str, Any]) -> bool:
    return message.get("progress") is True


# -- the daemon's side ------------------------------------------------------------------------

#: Longest socket path every system takes (Linux allows 107 bytes, macOS 103).
_MAX_SOCKET_PATH = 100


@contextlib.contextmanager
def _reachable(path: Path) -> Iterator[str]:
    """A name for the socket at ``path`` short enough to bind or connect to:
    the path itself, or for a deep home, the same file reached through an
    open descriptor of its directory (``/proc/self/fd/N/…``, Linux)."""
    if len(os.fsencode(path)) <= _MAX_SOCKET_PATH:
        yield os.fspath(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _same_user(sock: trio.socket.SocketType) -> bool:
    """Whether the peer of a Unix socket runs as this user (True where the
    system cannot tell: the socket's 0600 mode still guards it)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return True
    credentials = sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", credentials)
    return bool(uid == os.getuid())


async def serve_control(
    path: Path, handler: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Answer requests on the control socket at ``path`` until cancelled."""
    # A socket left by a crash: the caller holds the serve lock, so it is stale.
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # created 0600: no moment when others may connect
    try:
        with _reachable(path) as name:
            await sock.bind(name)
    except OSError as error:
        # The node's real work goes on; the CLI then runs commands itself.
        log.warning("no control socket at %s (%s); commands run in their own process", path, error)
        sock.close()
        task_status.started()
        return
    finally:
        os.umask(old_umask)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    try:
        task_status.started()
        await trio.serve_listeners(functools.partial(_serve_one, handler=handler), [listener])
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


async def _serve_one(stream: trio.SocketStream, *, handler: Handler) -> None:
    async with stream:
        if not _same_user(stream.socket):
            log.warning("control socket: refused a process of another user")
            return
        decoder = LineDecoder()
        request = None
        try:
            while request is None:
                data = await stream.receive_some(65536)
                if not data:
                    return
                messages = decoder.feed(data)
                if messages:
                    request = messages[0]
            argv, cwd = parse_request(request)
        except RemoteProtocolError as problem:
            await stream.send_all(encode_message({"exit": 2, "error": str(problem)}))
            return
        replies_in, replies_out = trio.open_memory_channel[dict[str, str]](math.inf)

        def out(line: str) -> None:
            replies_in.send_nowait({"out": line})

        def progress(line: str) -> None:
            replies_in.send_nowait({"progress": line})

        async def relay() -> None:
            async for reply in replies_out:
                await stream.send_all(encode_message(reply))

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(relay)
                try:
                    code, message = await handler(
                        argv, cwd, out, progress if wants_progress(request) else None
                    )
                finally:
                    replies_in.close()
            await stream.send_all(encode_message({"exit": code, "error": message}))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.info("control socket: the client went away")


# -- the CLI's side ---------------------------------------------------------------------------


async def forward(
    path: Path,
    argv: list[str],
    cwd: str,
    *,
    write: LineSink,
    report: LineSink,
    progress: LineSink | None = None,
) -> int | None:
    """Run ``argv`` in the daemon behind ``path``, writing its output (and
    with ``progress``, its progress lines) as they come; its exit code, or
    None when no daemon answers there."""
    try:
        with _reachable(path) as name:
            stream = await trio.open_unix_socket(name)
    except OSError:
        return None  # no daemon (or a stale socket): run in this process
    request: dict[str, Any] = {"v": CONTROL_VERSION, "argv": argv, "cwd": cwd}
    if progress is not None:
        request["progress"] = True
    async with stream:
        await stream.send_all(encode_message(request))
        decoder = LineDecoder()
        while True:
            data = await stream.receive_some(65536)
            if not data:
                raise RemoteProtocolError("the daemon closed the control socket mid-command")
            for message in decoder.feed(data):
                if "out" in message:
                    write(str(message["out"]))
                    continue
                if "progress" in message:
                    if progress is not None:
                        progress(str(message["progress"]))
                    continue
                code = message.get("exit")
                if not isinstance(code, int):
                    raise RemoteProtocolError(f"control socket: unexpected reply {message!r}")
                if message.get("error"):
                    report(str(message["error"]))
                return code
