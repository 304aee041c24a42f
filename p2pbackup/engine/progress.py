"""Progress lines on stderr for long work, shown only when stderr is a terminal,
and the human units every command's lines use.

A command the daemon runs for a client (see :mod:`p2pbackup.node.control`) formats
its progress there and hands each line to a **sink**, which sends it to the
client; the client shows it in place with :func:`terminal_line`.

**Human units**: sizes in binary units (:func:`human_bytes`: ``12.3 MiB``),
rates in the same units a second (:func:`human_rate`), and counts with their
noun in the number it needs (:func:`plural`: ``1 pack``, ``2 packs``). Every
line a command prints goes through these, not through a formatting of its own.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


class Progress:
    """A single self-overwriting status line, rate-limited to a few updates a second.

    With ``sink``, each line (label, text and elapsed time) goes there instead
    of to a stream, and an empty line when the progress is over.
    """

    def __init__(
        self,
        label: str,
        *,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        sink: Callable[[str], None] | None = None,
    ):
        self._label = label
        self._stream = stream if stream is not None else sys.stderr
        self._sink = sink if sink is not None else terminal_line(self._stream)
        if enabled is None:
            enabled = sink is not None or self._stream.isatty()
        self._enabled = enabled
        self._started = time.monotonic()
        self._last = 0.0
        self._shown = False

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def elapsed(self) -> float:
        """Seconds since the work began."""
        return time.monotonic() - self._started

    def update(self, text: str, *, force: bool = False) -> None:
        if not self._enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        elapsed = now - self._started
        self._sink(f"{self._label}: {text} [{elapsed:5.1f}s]")
        self._shown = True

    def close(self) -> None:
        if self._shown:
            self._sink("")
            self._shown = False


def fraction_line(done: int, total: int, elapsed: float) -> str:
    """``30 %, ETA 2:31``: how far along, and the time left at the rate so
    far (none until something is done)."""
    if total <= 0:
        return "100 %"
    fraction = min(done / total, 1.0)
    if done <= 0 or elapsed <= 0:
        return f"{fraction * 100:.0f} %"
    left = elapsed * (total - done) / done if done < total else 0.0
    minutes, seconds = divmod(int(left + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    eta = f"{hours}:{minutes:02}:{seconds:02}" if hours else f"{minutes}:{seconds:02}"
    return f"{fraction * 100:.0f} %, ETA {eta}"


def terminal_line(stream: TextIO) -> Callable[[str], None]:
    """Show each line given in place of the one before on ``stream`` (an
    empty line clears it)."""

    def show(line: str) -> None:
        stream.write(f"\r\x1b[K{line}")
        stream.flush()

    return show


def human_bytes(count: float) -> str:
    """``512 B``, ``1.5 KiB``, ``12.3 MiB`` … ``TiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def human_rate(count: float, seconds: float) -> str:
    """``count`` bytes over ``seconds``, a second, in :func:`human_bytes`'
    units (``16.1 MiB/s``; ``0 B/s`` for no time)."""
    return f"{human_bytes(count / seconds if seconds > 0 else 0)}/s"


def plural(count: int, noun: str, many: str | None = None) -> str:
    """``count`` with ``noun``, or its plural ``many`` (by default the noun
    with ``s``, or ``y`` made ``ies`` after a consonant): ``1 pack``,
    ``0 directories``."""
    if count == 1:
        return f"{count} {noun}"
    if many is None:
        consonant_y = noun.endswith("y") and noun[-2:-1] not in ("a", "e", "i", "o", "u")
        many = noun[:-1] + "ies" if consonant_y else noun + "s"
    return f"{count} {many}"
