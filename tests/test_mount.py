"""``p2pbackup mount``: the snapshots as a read-only FUSE file system.

A real mount through the CLI, as a process: the test lists the snapshots by
id and by time, reads every file and compares it byte for byte, reads a
large file in odd pieces at odd offsets, follows a symlink, is refused a
write, and unmounts with Ctrl-C. Needs /dev/fuse, fusermount3 and pyfuse3
(the ``mount`` extra; .ci/run installs Debian's fuse3 and libfuse3-dev).
"""

from __future__ import annotations

import errno
import importlib.util
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from p2pbackup.engine.browse import Span, chunk_spans

from .cli_helpers import CLI, base_env, cli_error, cli_inprocess, make_source, make_world


def _no_mount() -> str | None:
    if importlib.util.find_spec("pyfuse3") is None:
        return "pyfuse3 is not installed (pip install -e '.[mount]', after libfuse3-dev)"
    if not os.path.exists("/dev/fuse"):
        return "this machine has no /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing (apt-get install fuse3)"
    return None


def test_chunk_spans_cover_exactly_the_bytes_asked() -> None:
    sizes = [5, 3, 0, 7]
    assert chunk_spans(sizes, 0, 15) == [Span(0, 0, 5), Span(1, 0, 3), Span(3, 0, 7)]
    assert chunk_spans(sizes, 4, 2) == [Span(0, 4, 5), Span(1, 0, 1)]
    assert chunk_spans(sizes, 8, 100) == [Span(3, 0, 7)]
    assert chunk_spans(sizes, 15, 10) == []
    rng = random.Random(5)
    for _ in range(200):
        sizes = [rng.randrange(0, 9) for _ in range(rng.randrange(0, 6))]
        data = bytes(rng.randrange(256) for _ in range(sum(sizes)))
        chunks, at = [], 0
        for size in sizes:
            chunks.append(data[at : at + size])
            at += size
        offset, length = rng.randrange(0, len(data) + 3), rng.randrange(0, 12)
        got = b"".join(chunks[s.chunk][s.start : s.end] for s in chunk_spans(sizes, offset, length))
        assert got == data[offset : offset + length]


@pytest.mark.slow
def test_mount_shows_snapshots_and_reads_them_byte_for_byte(tmp_path: Path) -> None:
    reason = _no_mount()
    if reason is not None:
        pytest.skip(reason)
    world = make_world(tmp_path, k=2, n=4, pack_size=1 << 20)
    source = make_source(tmp_path / "src", big=3_000_000)
    (source / "to-note").symlink_to("docs/note1.txt")
    assert cli_inprocess("--home", world.home, "backup", source) == 0
    (source / "later.txt").write_text("second snapshot\n")
    assert cli_inprocess("--home", world.home, "backup", source) == 0
    where = tmp_path / "mnt"
    where.mkdir()
    process = subprocess.Popen(
        [*CLI, "--home", str(world.home), "mount", str(where)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=base_env(),
    )
    try:
        deadline = time.monotonic() + 30
        while not (where / "ids").exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the mount did not appear"
            time.sleep(0.1)
        ids = sorted(os.listdir(where / "ids"))
        times = sorted(os.listdir(where / "snapshots"))
        assert len(ids) == 2 and all(len(i) == 12 for i in ids)
        assert len(times) == 3 and "latest" in times  # two snapshots and `latest`
        latest = where / "snapshots" / "latest"
        assert os.readlink(latest) == max(t for t in times if t != "latest")
        tree = latest / str(source).lstrip("/")
        # Every file, byte for byte; modes and mtimes as backed up.
        for path in source.rglob("*"):
            mounted = tree / path.relative_to(source)
            if path.is_symlink():
                assert os.readlink(mounted) == os.readlink(path)
            elif path.is_file():
                assert mounted.read_bytes() == path.read_bytes(), path
                assert mounted.stat().st_mode == path.stat().st_mode
                assert mounted.stat().st_mtime_ns == path.stat().st_mtime_ns
        # The first snapshot has no later.txt.
        first = where / "snapshots" / min(t for t in times if t != "latest")
        assert not (first / str(source).lstrip("/") / "later.txt").exists()
        # Odd pieces at odd offsets of the big file (it spans several chunks).
        big = (source / "photos" / "big.jpg").read_bytes()
        rng = random.Random(3)
        with open(tree / "photos" / "big.jpg", "rb") as mounted_file:
            for _ in range(40):
                offset, length = rng.randrange(len(big)), rng.randrange(1, 200_000)
                mounted_file.seek(offset)
                assert mounted_file.read(length) == big[offset : offset + length]
        # Read-only.
        with pytest.raises(OSError) as refused:
            (tree / "new.txt").write_text("no")
        assert refused.value.errno in (errno.EROFS, errno.EACCES)
        # A second mount on it: one line.
        message = cli_error("mount", where, home=world.home)
        assert "mount point already" in message or "not empty" in message
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert b"mounted 2 snapshots at" in out and out.rstrip().endswith(b"unmounted")
    assert b"Traceback" not in err
    assert not os.path.ismount(where) and os.listdir(where) == []


def test_mount_without_pyfuse3_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    world = make_world(tmp_path, k=1, n=3)
    monkeypatch.setitem(sys.modules, "pyfuse3", None)  # an import of it fails
    monkeypatch.delitem(sys.modules, "p2pbackup.app.mount", raising=False)
    (tmp_path / "mnt").mkdir()
    code = cli_inprocess("--home", world.home, "mount", tmp_path / "mnt")
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip() == (
        "p2pbackup: error: mount needs pyfuse3: pip install 'p2pbackup[mount]' (it builds "
        "against libfuse3: apt-get install libfuse3-dev pkg-config)"
    )
