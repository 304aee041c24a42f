"""The control socket: how the CLI reaches a running ``serve`` of the same home.

Nouns:

* **control socket** — ``HOME/control.sock``, a Unix socket that ``serve``
  opens with mode 0600 and that answers only processes of the same user
  (checked with ``SO_PEERCRED`` where the system has it).
* **request** — :class:`ControlRequest`: the name of one command and its
  arguments as a JSON object. What the names and arguments mean is the
  app's (:mod:`p2pbackup.app.requests`); this module only carries them.
* **reply** — a stream of output lines as the daemon produces them, then the
  command's :class:`Outcome`: its exit code and error line (if any).

Wire format (version 2): one JSON object a line, at most :data:`MAX_LINE`
bytes, pure ASCII (other characters, and the lone surrogates that stand for a
file name's undecodable bytes, travel as ``\\u`` escapes). Request
``{"v": 2, "command": "restore", "args": {...}}``, with ``"progress": true``
when the client shows progress (its stderr is a terminal); replies
``{"out": "text"}`` and, only if asked for, ``{"progress": "line"}`` (an
empty line: the progress is over), then ``{"exit": code, "error":
"message"}``. A request of another version gets ``{"exit": 2, "error": …}``;
keys a side does not know are ignored.

A connection is one client's business alone: a line that is not a JSON object
(whatever its bytes: junk, a number too long to read, nesting too deep) gets
``{"exit": 2, …}``, a handler's bug gets ``{"exit": 1, …}`` and is logged, and
a client that goes away closes only its own connection. The client keeps its
side open until the exit line comes: when it closes it (or only shuts its
sending side, as an interrupted client does), the daemon cancels the command
and closes the connection once the command has stopped, sending nothing more.

Encoding and decoding are pure (:func:`encode_message`, :class:`LineDecoder`,
:func:`parse_request`); the rest is thin trio.
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
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import attrs
import trio

from p2pbackup.errors import RemoteProtocolError

log = logging.getLogger(__name__)

CONTROL_VERSION: Final = 2
MAX_LINE: Final = 1 << 20
#: The exit code of a request the daemon cannot run (as argparse's for a bad command line).
EXIT_BAD_REQUEST: Final = 2
#: The exit code of a command whose handler failed unexpectedly (a bug; as any failure's).
EXIT_HANDLER_FAILED: Final = 1
#: Seconds an interrupted client waits for the daemon to stop its command.
HANG_UP_WAIT: Final = 10.0

#: Takes one line (of output, or of progress).
LineSink = Callable[[str], None]


@attrs.frozen
class ControlRequest:
    """One command for the daemon: its name and its arguments (a JSON object)."""

    command: str
    args: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class Outcome:
    """How a command ended: its exit code, and the one line that says what
    went wrong (empty when nothing did, or when its output says it all)."""

    code: int
    error: str = ""


#: What runs a request in the daemon: (the request, send an output line, send
#: a progress line or None if the client shows none) → how it ended.
Handler = Callable[[ControlRequest, LineSink, LineSink | None], Awaitable[Outcome]]


def encode_message(message: Mapping[str, Any]) -> bytes:
    # ASCII: a lone surrogate (a file name's undecodable byte) has no UTF-8
    # form, but survives as a \u escape.
    return json.dumps(message).encode("ascii") + b"\n"


class LineDecoder:
    """Bytes in, JSON objects out, one a line; RemoteProtocolError for junk."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        # Only the new bytes are searched for the end of a line: a line that
        # comes a byte at a time costs its length, not its length squared.
        start = len(self._buffer)
        self._buffer += data
        messages = []
        while (end := self._buffer.find(b"\n", start)) >= 0:
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            start = 0
            try:
                message = json.loads(line)
            except (ValueError, RecursionError) as error:
                # ValueError: not JSON, not Unicode, or a number with more
                # digits than Python converts; RecursionError: nested too deep.
                raise RemoteProtocolError(f"control socket: not a JSON line: {error}") from None
            if not isinstance(message, dict):
                raise RemoteProtocolError("control socket: a line is not a JSON object")
            messages.append(message)
        if len(self._buffer) > MAX_LINE:
            raise RemoteProtocolError(f"control socket: a line longer than {MAX_LINE} bytes")
        return messages


def request_message(request: ControlRequest, *, progress: bool = False) -> dict[str, Any]:
    """The line a client sends for ``request`` (asking for progress lines or not)."""
    message: dict[str, Any] = {
        "v": CONTROL_VERSION,
        "command": request.command,
        "args": dict(request.args),
    }
    if progress:
        message["progress"] = True
    return message


def parse_request(message: Mapping[str, Any]) -> ControlRequest:
    """The request a client's line holds; RemoteProtocolError naming what is
    wrong. (Whether it asks for progress: :func:`wants_progress`.)"""
    if message.get("v") != CONTROL_VERSION:
        raise RemoteProtocolError(
            f"control request version {message.get('v')!r}; this daemon speaks "
            f"{CONTROL_VERSION} (restart serve after an upgrade, or run the command "
            "with P2PBACKUP_LOCAL=1)"
        )
    command, args = message.get("command"), message.get("args", {})
    if not (isinstance(command, str) and command):
        raise RemoteProtocolError("control request: command must be a command's name")
    if not isinstance(args, dict):
        raise RemoteProtocolError("control request: args must be a JSON object")
    return ControlRequest(command, args)


def wants_progress(message: Mapping[str, Any]) -> bool:
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
    """Answer requests on the control socket at ``path`` until cancelled.

    The socket file stays when this ends: the caller removes it on a clean
    stop, and one left behind tells the CLI that no daemon answers any more."""
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
    task_status.started()
    await trio.serve_listeners(functools.partial(_serve_one, handler=handler), [listener])


async def _serve_one(stream: trio.SocketStream, *, handler: Handler) -> None:
    """One client: its request, run with the replies sent back as they come.
    Whatever goes wrong here ends this connection, never the daemon."""
    async with stream:
        try:
            if not _same_user(stream.socket):
                log.warning("control socket: refused a process of another user")
                return
            await _converse(stream, handler)
        except trio.BrokenResourceError:
            log.info("control socket: the client went away")
        except Exception:
            log.exception("control socket: a client's connection failed unexpectedly")


async def _converse(stream: trio.SocketStream, handler: Handler) -> None:
    try:
        message = await _receive_request(stream)
        if message is None:
            return  # gone before asking anything
        request = parse_request(message)
    except RemoteProtocolError as problem:
        await stream.send_all(encode_message({"exit": EXIT_BAD_REQUEST, "error": str(problem)}))
        return
    outcome = await _run_for_client(stream, request, handler, progress=wants_progress(message))
    if outcome is None:
        log.info("control socket: the client of `%s` went away; it was cancelled", request.command)
        return
    await stream.send_all(encode_message({"exit": outcome.code, "error": outcome.error}))


async def _receive_request(stream: trio.SocketStream) -> dict[str, Any] | None:
    """The client's first line; None if it closes before sending one."""
    decoder = LineDecoder()
    while data := await stream.receive_some(65536):
        if messages := decoder.feed(data):
            return messages[0]
    return None


async def _run_for_client(
    stream: trio.SocketStream, request: ControlRequest, handler: Handler, *, progress: bool
) -> Outcome | None:
    """Run ``request``, sending its lines to the client as they come: how it
    ended, or None if the client went away first, which cancels it."""
    replies_in, replies_out = trio.open_memory_channel[dict[str, str]](math.inf)
    gone = False
    outcome = None

    def out(line: str) -> None:
        replies_in.send_nowait({"out": line})

    def show(line: str) -> None:
        replies_in.send_nowait({"progress": line})

    async with trio.open_nursery() as nursery:

        def client_gone() -> None:
            nonlocal gone
            gone = True
            nursery.cancel_scope.cancel()

        async def watch() -> None:
            await _until_hang_up(stream)
            client_gone()

        async def relay() -> None:
            try:
                async for reply in replies_out:
                    await stream.send_all(encode_message(reply))
            except trio.BrokenResourceError:
                client_gone()
            else:
                nursery.cancel_scope.cancel()  # all sent: stop watching

        nursery.start_soon(watch)
        nursery.start_soon(relay)
        with replies_in:
            try:
                outcome = await handler(request, out, show if progress else None)
            except Exception as error:
                log.exception("control socket: `%s` failed unexpectedly", request.command)
                outcome = Outcome(
                    EXIT_HANDLER_FAILED,
                    f"`{request.command}` failed in the daemon: {type(error).__name__}: "
                    f"{error} (a bug; the traceback is in serve's log)",
                )
    return None if gone else outcome


async def _until_hang_up(stream: trio.abc.ReceiveStream) -> None:
    """Return once the other side has closed, or shut its sending side (what
    else it sends is ignored)."""
    with contextlib.suppress(trio.BrokenResourceError):
        while await stream.receive_some(65536):
            pass


# -- the CLI's side ---------------------------------------------------------------------------


async def forward(
    path: Path,
    request: ControlRequest,
    *,
    write: LineSink,
    progress: LineSink | None = None,
) -> Outcome | None:
    """Run ``request`` in the daemon behind ``path``, writing its output (and
    with ``progress``, its progress lines) as they come; how it ended, or
    None when no daemon answers there."""
    try:
        with _reachable(path) as name:
            stream = await trio.open_unix_socket(name)
    except OSError:
        return None  # no daemon (or a stale socket): run in this process
    async with stream:
        await stream.send_all(
            encode_message(request_message(request, progress=progress is not None))
        )
        try:
            return await _receive_outcome(stream, write, progress)
        except KeyboardInterrupt:
            # Interrupted: the daemon cancels the command once this side
            # shuts; wait (a little) until it has, so that the home is free
            # again when the user gets the prompt back.
            with trio.move_on_after(HANG_UP_WAIT):
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_eof()
                await _until_hang_up(stream)
            raise


async def _receive_outcome(
    stream: trio.SocketStream, write: LineSink, progress: LineSink | None
) -> Outcome:
    decoder = LineDecoder()
    while True:
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""
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
            return Outcome(code, str(message.get("error") or ""))
