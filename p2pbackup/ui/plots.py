"""Plots as small hand-written SVG, made on the server (pure).

Nouns:

* **series** — points (x, y) in the order of x: a time (unix seconds or a
  day number) and a value.
* **plot** — :func:`line_plot` (a value over time) or :func:`bar_plot` (a
  value a day): an ``<svg>`` element whose ``data-points`` attribute counts
  its points, with its axes' extremes written at the corners. An empty series
  gives a plot that says there is nothing yet.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence

WIDTH = 560
HEIGHT = 180
_PAD_LEFT = 64
_PAD_RIGHT = 12
_PAD_TOP = 12
_PAD_BOTTOM = 26

Series = Sequence[tuple[float, float]]
Label = Callable[[float], str]


def _frame(title: str, count: int, body: str) -> str:
    return (
        f'<svg class="plot" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" data-points="{count}" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{html.escape(title)}</title>'
        f'<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" class="plot-bg"/>{body}</svg>'
    )


def _empty(title: str) -> str:
    return _frame(
        title,
        0,
        f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" class="plot-note">'
        "nothing recorded yet</text>",
    )


def _scale(low: float, high: float, start: float, end: float) -> Callable[[float], float]:
    span = high - low or 1.0
    return lambda v: start + (v - low) / span * (end - start)


def _axes(x_low: str, x_high: str, y_low: str, y_high: str) -> str:
    left, right = _PAD_LEFT, WIDTH - _PAD_RIGHT
    top, bottom = _PAD_TOP, HEIGHT - _PAD_BOTTOM
    return (
        f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" class="axis"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" class="axis"/>'
        f'<text x="{left - 4}" y="{top + 8}" text-anchor="end" class="tick">'
        f"{html.escape(y_high)}</text>"
        f'<text x="{left - 4}" y="{bottom}" text-anchor="end" class="tick">'
        f"{html.escape(y_low)}</text>"
        f'<text x="{left}" y="{HEIGHT - 8}" class="tick">{html.escape(x_low)}</text>'
        f'<text x="{right}" y="{HEIGHT - 8}" text-anchor="end" class="tick">'
        f"{html.escape(x_high)}</text>"
    )


def line_plot(title: str, series: Series, x_label: Label, y_label: Label) -> str:
    """A value over time (module docstring); y starts at zero."""
    if not series:
        return _empty(title)
    xs = [x for x, _ in series]
    ys = [y for _, y in series]
    y_high = max(max(ys), 1.0)
    sx = _scale(min(xs), max(xs), _PAD_LEFT, WIDTH - _PAD_RIGHT)
    sy = _scale(0.0, y_high, HEIGHT - _PAD_BOTTOM, _PAD_TOP)
    points = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in series)
    dots = "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2"/>' for x, y in series)
    body = (
        _axes(x_label(min(xs)), x_label(max(xs)), y_label(0.0), y_label(y_high))
        + f'<polyline points="{points}" class="line"/><g class="dots">{dots}</g>'
    )
    return _frame(title, len(series), body)


def bar_plot(title: str, series: Series, x_label: Label, y_label: Label) -> str:
    """A value a day (module docstring): one bar for each x from the first to the last."""
    if not series:
        return _empty(title)
    first, last = int(series[0][0]), int(series[-1][0])
    values = dict.fromkeys(range(first, last + 1), 0.0)
    for x, y in series:
        values[int(x)] += y
    y_high = max(max(values.values()), 1.0)
    left, right = _PAD_LEFT, WIDTH - _PAD_RIGHT
    bottom = HEIGHT - _PAD_BOTTOM
    slot = (right - left) / len(values)
    sy = _scale(0.0, y_high, bottom, _PAD_TOP)
    bars = "".join(
        f'<rect x="{left + i * slot + 1:.1f}" y="{sy(v):.1f}" width="{max(slot - 2, 1):.1f}" '
        f'height="{bottom - sy(v):.1f}" class="bar"><title>{html.escape(x_label(x))}: '
        f"{html.escape(y_label(v))}</title></rect>"
        for i, (x, v) in enumerate(values.items())
    )
    body = _axes(x_label(first), x_label(last), y_label(0.0), y_label(y_high)) + bars
    return _frame(title, len(series), body)
