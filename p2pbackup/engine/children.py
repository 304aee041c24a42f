"""A backup's child processes: the sealers and the lister, spoken to in frames.

Nouns:

* **child** — a process of the backup's own interpreter and package
  (``python -P -m MODULE``: -P, not a package of that name in whatever
  directory the backup runs in) with a pipe for each of its stdin, stdout
  and stderr; :class:`PipedChild` is the backup's handle. Frames go in on
  its stdin and come out on its stdout; what it writes on stderr is kept
  for the error that says why it stopped.
* **last words** — the last line a child that died wrote on stderr.

The **sealers** (:mod:`.sealer`) and the **lister** (:mod:`.lister`) are
children. A child that cannot start, dies, or sends a frame that does not
decode is the error of its kind (a :class:`~p2pbackup.errors.LocalProtocolError`);
the backup then does that work in threads of its own.
"""

from __future__ import annotations

import subprocess
import sys
from typing import ClassVar, TypeVar

import trio

from p2pbackup.core.framing import PIPE_READ_SIZE, FrameReader
from p2pbackup.errors import LocalProtocolError

_C = TypeVar("_C", bound="PipedChild")

#: The most of a dead child's stderr kept for the error message.
_STDERR_KEPT = 4096


def child_command(module: str) -> tuple[str, ...]:
    """How the backup starts the child that ``module`` runs (module docstring)."""
    return (sys.executable, "-P", "-m", module)


class PipedChild:
    """A running child process (module docstring)."""

    #: The child's kind, as its errors name it ("sealer", "lister").
    kind: ClassVar[str]
    #: What its failures raise.
    error: ClassVar[type[LocalProtocolError]]

    def __init__(self, process: trio.Process, reader: FrameReader) -> None:
        self._process = process
        self._reader = reader

    @classmethod
    async def _spawn(
        cls: type[_C], command: tuple[str, ...], reader: FrameReader, first_frame: bytes
    ) -> _C:
        """Start the child and send it ``first_frame``."""
        try:
            process = await trio.lowlevel.open_process(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            raise cls.error(f"cannot start a {cls.kind} process: {exc}") from exc
        child = cls(process, reader)
        try:
            await child._send(first_frame)
        except BaseException:
            await child.aclose()
            raise
        return child

    @property
    def pid(self) -> int:
        return self._process.pid

    async def _send(self, frame: bytes) -> None:
        stdin = self._process.stdin
        assert stdin is not None
        try:
            await stdin.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise await self._died(f"its input broke ({exc})") from None

    async def _receive_body(self) -> bytes:
        """The body of the child's next frame (a frame over the reader's
        limit raises the reader's error)."""
        stdout = self._process.stdout
        assert stdout is not None
        while (body := self._reader.next_body()) is None:
            try:
                data = await stdout.receive_some(PIPE_READ_SIZE)
            except trio.BrokenResourceError as exc:
                raise await self._died(f"its output broke ({exc})") from None
            if not data:
                raise await self._died("it closed its output")
            self._reader.feed(data)
        return body

    async def _died(self, how: str) -> LocalProtocolError:
        """The error for a child that stopped answering, with its last words."""
        with trio.move_on_after(5):
            await self._process.wait()
        words = b""
        if self._process.stderr is not None:
            with trio.move_on_after(1):
                while len(words) < 64 * _STDERR_KEPT and (
                    piece := await self._process.stderr.receive_some(PIPE_READ_SIZE)
                ):
                    words += piece
        last = words.decode(errors="replace").strip().splitlines()[-1:] or ["nothing on stderr"]
        code = self._process.returncode
        status = "still running" if code is None else f"exit status {code}"
        return self.error(
            f"{self.kind} process {self._process.pid} failed: {how}; {status}; "
            f"it said: {last[0][:_STDERR_KEPT]}"
        )

    async def aclose(self) -> None:
        """End the child: close its pipes and wait; kill it if cancelled or stuck."""
        process = self._process
        try:
            with trio.CancelScope(shield=True):
                for stream in (process.stdin, process.stdout, process.stderr):
                    if stream is not None:
                        await stream.aclose()
            # A child reading its input exits at once when it closes.
            with trio.move_on_after(5):
                await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()

    async def __aenter__(self: _C) -> _C:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
