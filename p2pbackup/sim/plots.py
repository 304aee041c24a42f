"""The simulator's plots, as PNG files through matplotlib (the optional
extra ``plots``: ``pip install 'p2pbackup[plots]'``); the only module that
imports it.

* ``redundancy.png`` — the worst pack's redundancy (healthy shards beyond
  k) at each day's sample: below 0 a pack is lost;
* ``traffic.png`` — repair and audit bytes per machine per day (each
  machine a faint line, their mean a bold one);
* ``online.png`` — machines up at each tick.
"""

from __future__ import annotations

from pathlib import Path

from p2pbackup.errors import UsageError
from p2pbackup.sim.world import TICK, Figures

DAY = 86400.0


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plots(directory: Path, figures: Figures, title: str) -> list[Path]:
    """The three plots in ``directory``; their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(
            "plots need matplotlib: pip install 'p2pbackup[plots]' (or pass --no-plots)"
        ) from None
    written = []

    figure, axes = plt.subplots(figsize=(8, 3.5))
    days = [d + 1 for d, w in enumerate(figures.worst_redundancy) if w is not None]
    worst = [w for w in figures.worst_redundancy if w is not None]
    axes.step(days, worst, where="post", color="tab:blue")
    axes.axhline(0, color="tab:red", linewidth=0.8, linestyle="--")
    axes.set(xlabel="day", ylabel="healthy shards beyond k", title=f"{title}: worst pack")
    written.append(_save(figure, directory / "redundancy.png"))

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    for axes, series, what in ((top, figures.repair, "repair"), (bottom, figures.audit, "audit")):
        if series:
            length = max(len(values) for values in series.values())
            for values in series.values():
                axes.plot(range(1, len(values) + 1), values, color="grey", alpha=0.3, linewidth=0.7)
            mean = [
                sum(v[d] for v in series.values() if d < len(v)) / len(series)
                for d in range(length)
            ]
            axes.plot(range(1, length + 1), mean, color="tab:blue", linewidth=2, label="mean")
        axes.set(ylabel=f"{what} bytes / day")
    bottom.set(xlabel="day")
    top.set(title=f"{title}: traffic per machine")
    written.append(_save(figure, directory / "traffic.png"))

    figure, axes = plt.subplots(figsize=(8, 3))
    axes.plot([i * TICK / DAY for i in range(len(figures.online))], figures.online, linewidth=0.8)
    axes.set(xlabel="day", ylabel="machines up", title=f"{title}: peers online", ylim=(0, None))
    written.append(_save(figure, directory / "online.png"))
    return written


def _save(figure: object, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()  # type: ignore[attr-defined]
    figure.savefig(path, dpi=100)  # type: ignore[attr-defined]
    plt.close(figure)  # type: ignore[arg-type]
    return path
