"""What a simulator run reports: its table, and its figures on disk (pure
but for the writing).

Nouns:

* **summary** — the dict ``sim SCENARIO --json`` prints (:data:`SUMMARY_KEYS`
  at least); :func:`table` lays it out for people.
* **figures file** — ``figures.json`` in the output directory: the summary
  without its wall time, and the series the plots draw (worst redundancy a
  day, machines up a tick, repair and audit bytes per machine per day).
  Two runs of one scenario with one seed write the same file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import attrs

from p2pbackup.engine.progress import human_bytes
from p2pbackup.sim.world import Figures

#: Keys every summary has (what ``--json`` promises).
SUMMARY_KEYS: Final = (
    "seed",
    "nodes",
    "virtual_days",
    "packs",
    "packs_lost",
    "restore_exact",
    "repair_bytes",
    "audit_bytes",
    "wall_seconds",
)


def table(summary: dict[str, Any]) -> list[str]:
    """The summary as a two-column table."""
    exact = summary["restore_exact"]
    worst = summary["worst_redundancy"]
    rows = [
        ("scenario", f"{summary['scenario']} (seed {summary['seed']})"),
        ("nodes", f"{summary['nodes']} ({summary['departed']} gone for good at the end)"),
        ("virtual days", f"{summary['virtual_days']:g}"),
        ("snapshots", str(summary["snapshots"])),
        ("packs", str(summary["packs"])),
        ("packs lost", str(summary["packs_lost"])),
        (
            "worst redundancy",
            "-" if worst is None else f"{worst:+d} shards beyond k (lowest daily sample)",
        ),
        (
            "restore at the end",
            {True: "exact", False: "NOT exact", None: "nothing to restore"}[exact],
        ),
        ("repair traffic", human_bytes(summary["repair_bytes"])),
        ("audit traffic", human_bytes(summary["audit_bytes"])),
        ("disqualified", ", ".join(summary["disqualified"]) or "none"),
        ("node failures", str(summary["node_failures"])),
        ("wall time", f"{summary['wall_seconds']:g} s"),
    ]
    width = max(len(name) for name, _ in rows)
    return [f"{name:<{width}}  {value}" for name, value in rows]


def figures_document(summary: dict[str, Any], figures: Figures) -> dict[str, Any]:
    """What ``figures.json`` holds: nothing that varies with the machine."""
    return {
        "summary": {k: v for k, v in summary.items() if k != "wall_seconds"},
        "series": attrs.asdict(figures),
    }


def write_figures(path: Path, summary: dict[str, Any], figures: Figures) -> None:
    path.write_text(json.dumps(figures_document(summary, figures), sort_keys=True, indent=1))
