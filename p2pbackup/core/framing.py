"""Length-prefixed frames out of a byte stream (sans-IO).

Nouns:

* **frame** — a big-endian length of a fixed width (the **prefix**, 2 or 4
  bytes), then that many bytes: the **body**. The storage protocol's
  messages, the sealer pipe and the Noise transport all travel this way.
* **frame reader** — :class:`FrameReader`: a receive buffer that is fed
  bytes in pieces of any size, as a stream delivers them, and hands out
  whole frames. It does no I/O: the caller feeds it what it received.
* **limit** — the largest body a reader accepts. A longer length is refused
  as soon as its prefix is in, before any of the body is waited for, so a
  hostile length cannot make a reader buffer more than the bytes it was
  already given. After a refusal the reader is broken for good: the stream
  is no longer known to be at a frame boundary, so it takes no more bytes
  and refuses again on every call.

Errors: the refusal is raised as the error class the caller chose (its
protocol's error), with a message that names the length and the limit.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from p2pbackup.model import BytesLike

_PREFIXES = {2: struct.Struct(">H"), 4: struct.Struct(">I")}

#: Bytes asked of a pipe between processes at a time.
PIPE_READ_SIZE = 1 << 20


class FrameReader:
    """Whole frames from a byte stream fed in pieces (module docstring).

    Bodies are handed out either copied (:meth:`next_body`) or as spans of
    :attr:`buffer` that the caller reads in place and then :meth:`consume`\\ s:
    a reader of large frames need not copy each body once more.
    """

    __slots__ = ("_buffer", "_error", "_limit", "_prefix", "_refused")

    def __init__(
        self,
        *,
        prefix_size: int,
        max_body_size: int | None = None,
        error: Callable[[str], Exception] = ValueError,
    ) -> None:
        """``max_body_size`` None: only the prefix's width bounds a body.
        ``error`` builds what a refused length raises."""
        if prefix_size not in _PREFIXES:
            raise ValueError(f"a frame prefix is 2 or 4 bytes, not {prefix_size}")
        self._prefix = _PREFIXES[prefix_size]
        self._limit = max_body_size
        self._error = error
        self._buffer = bytearray()
        self._refused: str | None = None

    @property
    def buffer(self) -> bytearray:
        """The bytes received and not yet consumed (read it, never change it)."""
        return self._buffer

    @property
    def buffered(self) -> int:
        """How many bytes are received and not yet consumed."""
        return len(self._buffer)

    def feed(self, data: BytesLike) -> None:
        """Add bytes the stream delivered (dropped once the reader is broken)."""
        if self._refused is None:
            self._buffer += data

    def frame_at(self, position: int) -> tuple[int, int] | None:
        """``(start, end)`` in :attr:`buffer` of the body of the frame whose
        prefix begins at ``position``, or None until all of it has arrived.
        A length over the limit raises the caller's error."""
        if self._refused is not None:
            raise self._error(self._refused)
        start = position + self._prefix.size
        if len(self._buffer) < start:
            return None
        (length,) = self._prefix.unpack_from(self._buffer, position)
        if self._limit is not None and length > self._limit:
            self._refused = f"frame of {length} bytes exceeds the limit of {self._limit}"
            self._buffer.clear()
            raise self._error(self._refused)
        end = start + length
        return None if len(self._buffer) < end else (start, end)

    def next_frame(self) -> tuple[int, int] | None:
        """The span of the first frame's body (:meth:`frame_at` 0)."""
        return self.frame_at(0)

    def consume(self, end: int) -> None:
        """Drop the bytes before ``end``: the frames handed out up to there.
        (CPython drops bytes from the front of a bytearray by moving its
        start, not its bytes, so consuming costs nothing per frame.)"""
        del self._buffer[:end]

    def next_body(self) -> bytes | None:
        """A copy of the first frame's body, consumed; None until it is whole."""
        span = self.frame_at(0)
        if span is None:
            return None
        start, end = span
        body = bytes(self._buffer[start:end])
        self.consume(end)
        return body


def length_prefix(length: int, prefix_size: int) -> bytes:
    """The prefix of a frame whose body is ``length`` bytes."""
    return _PREFIXES[prefix_size].pack(length)
