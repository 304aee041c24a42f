"""What a command imports before it answers (docs/performance.md#start-up).

Commands that only read a home's index or files (``snapshots``, ``stats``,
``forget --dry-run``, ``peer list``, ``id``), ``status`` (which asks its
peers, but not the DHT), and ``--version``, ``--help``,
``completion`` and ``man``, start without the DHT (kademlia, trio-asyncio,
asyncio) and without the erasure code (numpy): the heaviest imports of the
package, which only commands that reach the network or code a pack need.

Each command runs the CLI's ``main`` in a fresh interpreter, which then
prints the modules it imported: nothing is timed, so a busy machine cannot
fail the test, and a module-level import that brings them back can.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .cli_helpers import World, base_env, make_world

#: The imports an index-only command does without: the DHT and its asyncio
#: bridge, the erasure code and numpy.
HEAVY = frozenset(
    {
        "kademlia",
        "trio_asyncio",
        "asyncio",
        "numpy",
        "p2pbackup.dht.adapter",
        "p2pbackup.app.homedht",
        "p2pbackup.core.erasure",
    }
)

#: Runs ``main`` with the arguments it is given; prints the exit code, the
#: output and every module imported, as JSON.
PROBE = """
import contextlib, io, json, sys
from p2pbackup.cli.main import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        code = main(sys.argv[1:])
    except SystemExit as exit:
        code = exit.code
print(json.dumps({"code": code, "stdout": out.getvalue(), "modules": sorted(sys.modules)}))
"""


def imported_by(*args: str) -> tuple[str, frozenset[str]]:
    """The output of ``p2pbackup ARGS`` run in a fresh interpreter, and the
    modules it imported; the command must succeed."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=base_env(),
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    report = json.loads(proc.stdout.decode().splitlines()[-1])
    assert report["code"] in (0, None), report["stdout"]
    return report["stdout"], frozenset(report["modules"])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    world = make_world(tmp_path_factory.mktemp("startup"), k=2, n=3)
    source = world.root / "source"
    source.mkdir()
    (source / "a.txt").write_text("some words to back up\n")
    world.backup(source)
    return world


@pytest.mark.parametrize(
    "args",
    [
        ["--version"],
        ["--help"],
        ["completion", "bash"],
        ["man"],
        ["snapshots"],
        ["snapshots", "--json"],
        ["stats"],
        ["forget", "--dry-run", "--keep-last", "1"],
        ["peer", "list"],
        ["id"],
        ["status"],
    ],
    ids=" ".join,
)
def test_a_command_that_reads_the_index_starts_without_the_dht_or_numpy(
    world: World, args: list[str]
) -> None:
    stdout, modules = imported_by("--home", str(world.home), *args)
    assert stdout.strip()  # the command did its work
    assert sorted(HEAVY & modules) == []


def test_the_probe_sees_them_when_a_command_needs_them(world: World) -> None:
    # `ls` reads a tree from its pack, which decodes the pack's shards.
    stdout, modules = imported_by("--home", str(world.home), "ls", "latest")
    assert "a.txt" in stdout
    assert {"numpy", "p2pbackup.core.erasure"} <= modules


def test_the_parser_still_completes_with_shtab(tmp_path: Path) -> None:
    # shtab is imported by `completion` alone, when it writes the script.
    stdout, modules = imported_by("--home", str(tmp_path / "none"), "completion", "bash")
    assert "p2pbackup" in stdout and "shtab" in modules
    _, modules = imported_by("--home", str(tmp_path / "none"), "--version")
    assert "shtab" not in modules
