"""The backup benchmark's verdicts on the targets (benchmarks/bench_backup.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench_backup() -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(
            "bench_backup", BENCHMARKS / "bench_backup.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_backup"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def _steps(bench_backup: ModuleType, tool: str, seconds: dict[str, float]) -> list[object]:
    return [
        bench_backup.Measurement(tool, step, spent, spent, 200.0, 1_000_000_000, 0)
        for step, spent in seconds.items()
    ]


def test_each_step_must_reach_restic_and_into_nodes_the_backup_three_quarters(
    bench_backup: ModuleType,
) -> None:
    ours = _steps(
        bench_backup,
        "p2pbackup",
        {"initial backup": 24.0, "incremental backup": 4.0, "full restore": 12.5},
    )
    theirs = _steps(
        bench_backup,
        "restic",
        {"initial backup": 20.0, "incremental backup": 4.0, "full restore": 12.0},
    )
    folders = bench_backup.targets_lines(ours, theirs, [])
    nodes = bench_backup.targets_lines(ours, theirs, [], over_nodes=True)
    # 20/24 = 0.83x: short of restic's speed into folders, enough into nodes.
    assert folders[0].split() == ["initial", "backup", "≥", "1.00×", "restic:", "0.83×", "MISS"]
    assert nodes[0].split() == ["initial", "backup", "≥", "0.75×", "restic:", "0.83×", "PASS"]
    assert folders[1].endswith("1.00×  PASS") and nodes[1].endswith("1.00×  PASS")
    assert folders[2].endswith("0.96×  MISS") and nodes[2].endswith("0.96×  MISS")
    assert all(line.endswith("200 MB  PASS") for line in folders[3:])


def test_the_measured_modules_are_compiled_as_an_install_would(
    bench_backup: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on a machine with PYTHONDONTWRITEBYTECODE: imports write no bytecode.
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    package = tmp_path / "pkg"
    (package / "inner").mkdir(parents=True)
    modules = [package / "__init__.py", package / "a.py", package / "inner" / "b.py"]
    for module in modules:
        module.write_text("VALUE = 1\n")
    line = bench_backup.compile_bytecode(package)
    assert line.startswith("bytecode: compiled")
    for module in modules:
        assert Path(importlib.util.cache_from_source(str(module))).is_file(), module

    (package / "broken.py").write_text("def (:\n")
    assert "did not compile" in bench_backup.compile_bytecode(package)


def test_the_warm_steps_are_reported_beside_restic_without_a_target(
    bench_backup: ModuleType,
) -> None:
    warm = {bench_backup.UNCHANGED_STEP: 2.0, bench_backup.WARM_RESTORE_STEP: 10.0}
    ours = _steps(bench_backup, "p2pbackup", {"full restore": 12.5, **warm})
    theirs = _steps(bench_backup, "restic", {"full restore": 12.0, **warm})
    lines = bench_backup.targets_lines(ours, theirs, [])
    assert [line for line in lines if "restic:" in line] == [
        "  full restore               ≥ 1.00× restic: 0.96×  MISS"
    ]
    assert len(lines) == 4  # and each step's peak RSS
    table = bench_backup.comparison_table(ours, theirs).splitlines()
    rows = {row.split("|")[0].strip(): row.split("|")[-1].strip() for row in table[3:]}
    assert rows == {"full restore": "0.96x", **dict.fromkeys(warm, "1.00x")}
