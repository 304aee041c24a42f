"""The dashboard's throughput benchmark (benchmarks/ui_throughput.py) runs end to
end at a tiny size: real nodes, a real daemon with and without its dashboard,
a tab polling it, and a summary with the ratio."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "ui_throughput.py"


def test_the_benchmark_runs_both_modes_and_prints_the_ratio(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--size-mb", "2", "--rounds", "1", "--peers", "2",
         "--shards", "1/2", "--settle", "0", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(re.fullmatch(r"round 1 no-ui: .* MiB/s .*", line) for line in lines), done.stdout
    ui = [line for line in lines if line.startswith("round 1    ui:")]
    assert len(ui) == 1 and "tab: " in ui[0], done.stdout
    assert re.fullmatch(r"ratio ui/no-ui: \d+\.\d{3}", lines[-1]), done.stdout
    assert "Traceback" not in done.stderr
