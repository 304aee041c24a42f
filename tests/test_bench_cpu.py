"""The CPU breakdown benchmark's reading of ``perf report`` (benchmarks/bench_cpu.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

#: ``perf report --stdio --sort dso -g none --no-children`` of a p2pbackup
#: restore, as perf 6.1 prints it (cpu-clock: the count is in nanoseconds).
REPORT = """\
# Total Lost Samples: 0
#
# Samples: 6K of event 'cpu-clock:ppp'
# Event count (approx.): 12900000000
#
# Overhead  Shared Object
# ........  ...........................................
#
    42.50%  [kernel.kallsyms]
    30.00%  libpython3.11.so.1.0
    15.00%  _sodium.abi3.so
     5.00%  backend_c.cpython-311-x86_64-linux-gnu.so
     5.00%  libc.so.6
     2.00%  libsqlite3.so.0.8.6
     0.50%  [vdso]


#
# (Tip: If you have debuginfo enabled, try: perf report -s sym,srcline)
#
"""


@pytest.fixture(scope="module")
def bench_cpu() -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("bench_cpu", BENCHMARKS / "bench_cpu.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_a_report_is_split_into_cpu_seconds_by_part(bench_cpu: ModuleType) -> None:
    parts = bench_cpu.parse_report(REPORT)
    assert parts == pytest.approx(
        {
            "kernel": 5.4825,
            "interpreter": 3.87,
            "ciphers and hashes": 1.935,
            "zstd": 0.645,
            "copies (libc)": 0.645,
            "SQLite": 0.258,
            "other": 0.0645,
        }
    )
    assert sum(parts.values()) == pytest.approx(12.9)


def test_restic_is_its_binary_and_the_kernel(bench_cpu: ModuleType) -> None:
    report = REPORT.replace("12900000000", "10000000000")
    lines = [line for line in report.splitlines() if "%" not in line]
    lines.insert(8, "    65.00%  restic")
    lines.insert(9, "    35.00%  [kernel.kallsyms]")
    assert bench_cpu.parse_report("\n".join(lines)) == pytest.approx({"restic": 6.5, "kernel": 3.5})


def test_a_report_without_an_event_count_is_refused(bench_cpu: ModuleType) -> None:
    with pytest.raises(Exception, match="no event count"):
        bench_cpu.parse_report("# Samples: 0\n")


def test_the_ceiling_takes_away_the_interpreter_alone(bench_cpu: ModuleType) -> None:
    ours = {"kernel": 5.0, "interpreter": 4.0, "ciphers and hashes": 3.0}
    theirs = {"restic": 6.0, "kernel": 3.0}
    (_header, _rule, p2p_row, restic_row) = bench_cpu.table([("full restore", ours, theirs)])
    # restic's 9 CPU-s against p2pbackup's 12 less its interpreter's 4.
    assert p2p_row == "| full restore | p2pbackup | 12.0 | 5.0 | 4.0 | 3.0 | 1.12× |"
    assert restic_row == "| full restore | restic | 9.0 | 3.0 | — | 6.0 | |"
