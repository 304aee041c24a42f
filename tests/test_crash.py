"""Crash safety: ``backup`` and ``restore`` killed with SIGKILL at many moments.

A backup killed anywhere must leave a repository that the next backup
completes, that restores byte for byte, that ``check --read-data`` passes, in
which every listed snapshot restores, and whose leftovers (shards no index
entry names) ``prune`` removes. A restore killed anywhere must leave no file
under its final name that is partial; running it again completes it.

Kills are timed by watching the peer folders (or the restore target), so they
land mid-work on a fast machine as on a slow one; each check that a kill really
interrupted something is an assertion, not a hope.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest
import trio

from p2pbackup.app import operations
from p2pbackup.app.home import Home
from p2pbackup.core import formats

from .cli_helpers import (
    CLI,
    SNAPSHOT_ID_RE,
    World,
    base_env,
    cli_inprocess,
    make_world,
    restored,
    shard_files,
    tree_state,
)

TEMP_RE = re.compile(r"\.p2pbackup-.+\.tmp")
POLL = 0.002
PACK_SIZE = 4 * 1024 * 1024


def make_crash_tree(root: Path, *, seed: int = 11) -> Path:
    """About 24 MB: random files of 0.5–3 MB and a few hundred text files."""
    rng = random.Random(seed)
    words = [f"w{i:04}" for i in range(3000)]
    for d in range(6):
        folder = root / "text" / f"d{d}"
        folder.mkdir(parents=True)
        for i in range(50):
            count = rng.randrange(200, 4000)
            (folder / f"t{i:03}.txt").write_text(" ".join(rng.choice(words) for _ in range(count)))
    (root / "bin" / "nested").mkdir(parents=True)
    for i in range(10):
        size = rng.randrange(500_000, 3_000_000)
        (root / "bin" / "nested" / f"r{i:02}.bin").write_bytes(rng.randbytes(size))
    (root / "empty").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[World, Path]]:
    root = tmp_path_factory.mktemp("crash")
    # 4 MiB packs (the default is 16): the tree spans several, so there are
    # more pack boundaries to be killed at, and they come sooner.
    world = make_world(root, k=3, n=5, pack_size=PACK_SIZE)
    source = make_crash_tree(root / "src")
    total = sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
    assert 20_000_000 < total < 40_000_000
    yield world, source


def start(world: World, *args: str | os.PathLike[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*CLI, "--home", os.fspath(world.home), *[os.fspath(a) for a in args]],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=base_env(),
    )


def kill_when(
    proc: subprocess.Popen[bytes], condition: Callable[[], bool], *, timeout: float = 60
) -> bool:
    """SIGKILL ``proc`` as soon as ``condition()`` holds; True if that interrupted it."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(POLL)
    proc.send_signal(signal.SIGKILL)
    stderr = proc.communicate()[1].decode(errors="replace")
    assert "Traceback" not in stderr, stderr
    return proc.returncode == -signal.SIGKILL


def peer_entries(world: World) -> tuple[set[Path], set[Path]]:
    """(shard files under final names, shard temp files) on every peer."""
    shards: set[Path] = set()
    temps: set[Path] = set()
    for peer in world.peers:
        shards.update(shard_files(peer))
        temps.update(peer.glob("p2pbackup-peer/owners/*/shards/*/.tmp-*"))
    return shards, temps


def root_records(world: World) -> dict[Path, int]:
    """Each peer's root record for this owner, by modification time."""
    return {
        path: path.stat().st_mtime_ns
        for peer in world.peers
        for path in peer.glob("p2pbackup-peer/owners/*/root")
    }


def expected_shard_files(world: World) -> set[Path]:
    """Where the shards that the index names live, worked out from the index."""

    async def read() -> set[Path]:
        async with operations.open_repository(Home(world.home)) as repo:
            locations = {p.peer_id: Path(p.location) for p in repo.peers()}
            owner = repo.keyring.node_id.hex()
            wanted = set()
            for pack_id in repo.index.pack_ids():
                record = repo.index.pack(pack_id)
                assert record is not None
                for shard in record.shards:
                    name = formats.shard_id(pack_id, shard.index).hex()
                    wanted.add(
                        locations[shard.peer_id]
                        / "p2pbackup-peer"
                        / "owners"
                        / owner
                        / "shards"
                        / name[:2]
                        / name
                    )
            return wanted

    return trio.run(read)


def wait(seconds: float) -> bool:
    time.sleep(seconds)
    return True


@attrs.frozen
class Baseline:
    shards: set[Path]
    temps: set[Path]
    roots: dict[Path, int]


def snapshot_ids(world: World) -> list[str]:
    return [s["id"] for s in json.loads(world.ok("snapshots", "--json").stdout)]


def test_backup_killed_at_any_moment_leaves_a_sound_repository(
    world: tuple[World, Path], tmp_path: Path
) -> None:
    w, source = world
    state = tree_state(source)
    n = 5

    # Each condition compares the peers with how they were when that run started.
    def new_shards(base: Baseline) -> int:
        return len(peer_entries(w)[0] - base.shards)

    moments: list[tuple[str, Callable[[Baseline], bool]]] = [
        # Early: starting up, walking, chunking; nothing on the peers yet.
        ("after 0.3 s", lambda base: wait(0.3)),
        # A shard is being written (a temp file on a peer), none finished.
        ("mid-write of a first shard", lambda base: bool(peer_entries(w)[1] - base.temps)),
        # Some shards of a pack are stored, but not (all) of it.
        ("after the first shard", lambda base: new_shards(base) >= 1),
        # A pack is stored (and maybe committed) and the next is on its way.
        ("during a second pack", lambda base: new_shards(base) >= n + 1),
        # The snapshot is in the index; the root record is going out to the peers.
        ("while the root record is written", lambda base: root_records(w) != base.roots),
    ]
    interrupted = []
    for label, condition in moments:
        base = Baseline(*peer_entries(w), root_records(w))
        proc = start(w, "backup", source)
        if kill_when(proc, functools.partial(condition, base)):
            interrupted.append(label)
    # The kills that wait for the peer folders must have landed mid-backup.
    assert {"after the first shard", "during a second pack"} <= set(interrupted), interrupted
    left, _ = peer_entries(w)
    orphans = left - expected_shard_files(w)
    assert orphans, "the killed runs left no shard outside the index: nothing was tested"

    # Whatever the killed runs committed is consistent: every listed snapshot
    # (a run may have finished just before its kill) restores, and check passes.
    report = json.loads(w.run("check", "--json").stdout)
    assert report["errors"] == [] and report["unrecoverable"] == 0, report
    assert report["orphan_shards"] == len(orphans)

    # The next backup succeeds.
    result = w.ok("backup", source)
    assert SNAPSHOT_ID_RE.fullmatch(result.lines[-1])

    # prune: the orphans of the killed runs go, nothing the index names does.
    w.ok("prune")
    on_disk, _ = peer_entries(w)
    assert on_disk == expected_shard_files(w)
    assert not on_disk & orphans
    report = json.loads(w.ok("check", "--read-data", "--json").stdout)
    assert report["errors"] == [] and report["orphan_shards"] == 0, report
    assert report["healthy"] == report["packs"] > 0
    assert report["shards_corrupt"] == 0 and report["shards_missing"] == 0

    # Every snapshot restores, byte for byte.
    ids = snapshot_ids(w)
    assert result.lines[-1] in ids
    for number, snapshot_id in enumerate(ids):
        target = tmp_path / f"restore-{number}"
        w.ok("restore", snapshot_id, "--target", target)
        assert tree_state(restored(target, source)) == state, snapshot_id


def test_restore_killed_midway_leaves_no_partial_file_and_a_rerun_completes_it(
    world: tuple[World, Path], tmp_path: Path
) -> None:
    w, source = world
    state = tree_state(source)
    # (quick if the test above has run: nothing changed)
    assert cli_inprocess("--home", w.home, "backup", source) == 0
    target = tmp_path / "target"
    out = restored(target, source)

    def some_file_is_done() -> bool:
        return any(
            p.is_file() and not TEMP_RE.fullmatch(p.name) and p.stat().st_size > 0
            for p in target.rglob("*")
        )

    proc = start(w, "restore", "latest", "--target", target)
    assert kill_when(proc, some_file_is_done), "the restore finished before it was killed"

    present = {os.path.relpath(os.fsencode(p), os.fsencode(out)) for p in out.rglob("*")}
    temps = {p for p in present if TEMP_RE.fullmatch(os.fsdecode(os.path.basename(p)))}
    files = {p for p, entry in state.items() if entry[0] == "file"}
    complete = files & present
    # Mid-way indeed: some files are there, some are not yet.
    assert complete and files - complete, (len(complete), len(files))
    partial = tree_state(out)
    for rel in complete:
        # Under its final name, a file is whole: bytes, size, mode and mtime.
        assert partial[rel] == state[rel], os.fsdecode(rel)
    assert present - temps <= set(state), "something unexpected under a final name"

    # Running it again completes the restore.
    w.ok("restore", "latest", "--target", target)
    final = tree_state(out)
    leftovers = [rel for rel in final if TEMP_RE.fullmatch(os.fsdecode(os.path.basename(rel)))]
    for rel in leftovers:
        del final[rel]
    assert final == state
    # ... and leaves nothing of its own behind: the temp files of the killed run
    # are gone too, so the target holds exactly the snapshot.
    assert leftovers == [], (
        f"{len(leftovers)} of the killed restore's temp files are left in the target, "
        f"e.g. {os.fsdecode(leftovers[0])}"
    )
