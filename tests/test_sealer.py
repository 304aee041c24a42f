"""Sealer processes: the pipe protocol, the child, and backups that use them."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from p2pbackup.app import operations
from p2pbackup.app.home import Home
from p2pbackup.core import blobs, chunker
from p2pbackup.engine import pipeline, sealer, sealwire, snapshots
from p2pbackup.engine.backup import Backup
from p2pbackup.engine.reading import CHANGED_WHILE_READ, prefetch
from p2pbackup.engine.restore import Restorer
from p2pbackup.engine.sealer import Sealer, SealerError
from p2pbackup.engine.sealwire import SealedChunk, SealedFile, SealwireError, Setup
from p2pbackup.engine.treediff import diff_trees
from p2pbackup.model import BlobType, FileStat, ReadOutcome, SealingKeys

from .engine_helpers import make_setup, make_tree, restored_path

KEYS = SealingKeys(bytes(range(32)), bytes(range(32, 64)))
PARAMS = chunker.ChunkerParams(min_size=16 * 1024, avg_size=32 * 1024, max_size=128 * 1024, seed=7)
SETUP = Setup(KEYS, PARAMS)

# -- the codec ----------------------------------------------------------------------------

ids = st.binary(min_size=32, max_size=32)
stats = st.builds(FileStat, *([st.integers(0, 2**63 - 1)] * 7))
chunks = st.builds(SealedChunk, ids, st.integers(0, 2**40), st.none() | st.binary(max_size=64))
read_files = st.lists(chunks, max_size=4).flatmap(
    lambda cs: st.builds(
        SealedFile,
        st.builds(ReadOutcome, st.just(tuple(c.ident for c in cs)), stats),
        st.just(tuple(cs)),
    )
)
failed_files = st.builds(SealedFile, st.builds(ReadOutcome, error=st.text(max_size=40)))


def body_of(frame: bytes) -> bytes:
    reader = sealwire.frame_reader()
    reader.feed(frame)
    body = reader.next_body()
    assert body is not None and reader.buffered == 0
    return body


@given(st.lists(read_files | failed_files, max_size=6))
def test_results_round_trip(files: list[SealedFile]) -> None:
    assert sealwire.decode_results(body_of(sealwire.encode_results(files))) == tuple(files)


@given(st.lists(st.binary(min_size=1, max_size=60), max_size=10))
def test_batches_round_trip(paths: list[bytes]) -> None:
    assert sealwire.decode_batch(body_of(sealwire.encode_batch(paths))) == tuple(paths)


def test_setup_round_trips() -> None:
    assert sealwire.decode_setup(body_of(sealwire.encode_setup(SETUP))) == SETUP


@given(st.lists(st.binary(min_size=1, max_size=30), min_size=1, max_size=5), st.data())
def test_frames_come_out_whole_whatever_pieces_the_bytes_arrive_in(
    paths: list[bytes], data: st.DataObject
) -> None:
    frames = [sealwire.encode_batch([p]) for p in paths]
    stream = b"".join(frames)
    reader = sealwire.frame_reader()
    bodies = []
    position = 0
    while position < len(stream):
        step = data.draw(st.integers(1, 7))
        reader.feed(stream[position : position + step])
        position += step
        while (body := reader.next_body()) is not None:
            bodies.append(body)
    assert [sealwire.decode_batch(b) for b in bodies] == [(p,) for p in paths]
    assert reader.buffered == 0


def test_a_frame_fed_a_byte_at_a_time_appears_only_when_whole() -> None:
    frame = sealwire.encode_batch([b"/a/b"])
    reader = sealwire.frame_reader()
    for i, byte in enumerate(frame):
        assert reader.next_body() is None
        reader.feed(bytes([byte]))
        assert reader.buffered == i + 1
    assert sealwire.decode_batch(reader.next_body() or b"") == (b"/a/b",)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (body_of(sealwire.encode_batch([b"/x"])), "expected a setup frame, got a frame of kind 2"),
        (b"\xc1", "setup frame does not parse"),
        (
            body_of(sealwire._frame([1, 99, b"k" * 32, b"d" * 32, [1, 2, 3, 4]])),
            "protocol version 99; this sealer speaks 1",
        ),
        (
            body_of(sealwire._frame([1, 1, b"short", b"d" * 32, [1, 2, 3, 4]])),
            "dedup key: expected 32 bytes, got 5 bytes",
        ),
        (
            body_of(sealwire._frame([1, 1, b"k" * 32, b"d" * 32, [1, 2, 3, 4]])),
            "chunker params: ",
        ),
        (body_of(sealwire._frame([1, 1])), "expected 5 fields, got 2"),
    ],
)
def test_a_bad_setup_frame_says_what_is_wrong(body: bytes, message: str) -> None:
    with pytest.raises(SealwireError, match=message):
        sealwire.decode_setup(body)


def test_bad_results_say_which_file_and_field() -> None:
    good_stat = [0o100644, 5, 1, 2, 3, 4, 5]
    with pytest.raises(SealwireError, match="result 1 chunk 0 id: expected 32 bytes"):
        sealwire.decode_results(
            body_of(
                sealwire._frame(
                    [3, [[None, good_stat, []], [None, good_stat, [[b"short", 5, None]]]]]
                )
            )
        )
    with pytest.raises(SealwireError, match=r"result 0 stat: -1 is out of range \[0, "):
        sealwire.decode_results(body_of(sealwire._frame([3, [[None, [-1] * 7, []]]])))
    with pytest.raises(SealwireError, match="result 0 error: expected a string"):
        sealwire.decode_results(body_of(sealwire._frame([3, [[5, None, []]]])))


def test_a_frame_claiming_more_than_the_limit_is_refused_before_it_is_read() -> None:
    reader = sealwire.frame_reader()
    reader.feed((sealwire.MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(SealwireError, match="exceeds the limit"):
        reader.next_body()


# -- the child ---------------------------------------------------------------------------


def opened(chunk: SealedChunk) -> bytes:
    assert chunk.sealed is not None
    return blobs.open_blob(KEYS.data_key, KEYS.dedup_key, BlobType.DATA, chunk.ident, chunk.sealed)


class PipedSealer:
    """sealer.serve in a thread, on pipes: the child without a process."""

    def __init__(self) -> None:
        self.to_child, self._to_child_w = os.pipe()
        self._from_child_r, self.from_child = os.pipe()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        self.reader = sealwire.frame_reader()

    def _run(self) -> None:
        try:
            sealer.serve(self.to_child, self.from_child)
        except BaseException as exc:
            self.error = exc
        finally:
            os.close(self.from_child)

    def send(self, frame: bytes) -> None:
        os.write(self._to_child_w, frame)

    def seal(self, paths: list[bytes]) -> tuple[SealedFile, ...]:
        self.send(sealwire.encode_batch(paths))
        while (body := self.reader.next_body()) is None:
            self.reader.feed(os.read(self._from_child_r, 1 << 20))
        return sealwire.decode_results(body)

    def close(self) -> None:
        os.close(self._to_child_w)
        self.thread.join()
        os.close(self.to_child)
        os.close(self._from_child_r)


def test_the_child_reads_seals_and_sends_each_blob_once(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"same bytes" * 100)
    (tmp_path / "b").write_bytes(b"same bytes" * 100)
    big = os.urandom(300_000)
    (tmp_path / "big").write_bytes(big)
    child = PipedSealer()
    child.send(sealwire.encode_setup(SETUP))
    a, b, missing, directory, large = child.seal(
        [os.fsencode(tmp_path / name) for name in ("a", "b", "missing", ".", "big")]
    )
    again = child.seal([os.fsencode(tmp_path / "a")])[0]
    child.close()
    assert child.error is None

    assert a.outcome.content == b.outcome.content == again.outcome.content
    (chunk,) = a.chunks
    assert chunk.sealed is not None
    assert blobs.open_blob(
        KEYS.data_key, KEYS.dedup_key, BlobType.DATA, chunk.ident, chunk.sealed
    ) == (b"same bytes" * 100)
    assert chunk.ident == blobs.blob_id(KEYS.dedup_key, b"same bytes" * 100)
    # Sent once per run: the copy and the second batch carry no blob.
    assert [c.sealed for c in b.chunks + again.chunks] == [None, None]
    assert a.outcome.stat is not None
    assert (
        a.outcome.stat.st_size == 1000 and a.outcome.stat.st_ino == os.stat(tmp_path / "a").st_ino
    )
    assert missing.outcome.error == "cannot read: No such file or directory"
    assert directory.outcome.error == "cannot read: Is a directory"
    # A file larger than a chunk is cut as the chunker cuts it.
    assert [c.length for c in large.chunks] == [len(c) for c in chunker.chunk_bytes(big, PARAMS)]
    assert b"".join(opened(c) for c in large.chunks) == big


def test_a_file_changing_under_the_child_sends_only_the_whole_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"first version")
    real = blobs.blob_id
    calls = [0]

    def changing_once(key: bytes, plaintext: bytes | memoryview) -> bytes:
        calls[0] += 1
        if calls[0] == 1:  # the first read sees the file change under it
            path.write_bytes(b"second version, longer")
        return real(key, plaintext)

    monkeypatch.setattr(blobs, "blob_id", changing_once)
    sent: set[bytes] = set()
    result = sealer._seal_file(os.fsencode(path), SETUP, sent)
    assert result.outcome.error is None
    (chunk,) = result.chunks
    assert chunk.length == len(b"second version, longer")
    assert blobs.open_blob(
        KEYS.data_key, KEYS.dedup_key, BlobType.DATA, chunk.ident, chunk.sealed or b""
    ) == (b"second version, longer")
    assert sent == {chunk.ident}

    def always_changing(key: bytes, plaintext: bytes | memoryview) -> bytes:
        with open(path, "ab") as file:
            file.write(b"+")
        return real(key, plaintext)

    monkeypatch.setattr(blobs, "blob_id", always_changing)
    result = sealer._seal_file(os.fsencode(path), SETUP, sent)
    assert result.outcome == ReadOutcome(error=CHANGED_WHILE_READ) and result.chunks == ()


def test_a_child_whose_input_ends_inside_a_frame_says_so() -> None:
    child = PipedSealer()
    child.send(sealwire.encode_setup(SETUP)[:-3])
    child.close()
    assert isinstance(child.error, SealwireError)
    assert "stdin closed inside a frame" in str(child.error)


def test_a_child_refuses_a_setup_of_another_version() -> None:
    child = PipedSealer()
    child.send(sealwire._frame([1, 2, b"k" * 32, b"d" * 32, [1, 2, 3, 4]]))
    child.close()
    assert isinstance(child.error, SealwireError)
    assert "protocol version 2" in str(child.error)


# -- the process -------------------------------------------------------------------------


async def test_a_sealer_process_seals_and_exits_when_closed(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"hello")
    worker = await Sealer.start(SETUP)
    async with worker:
        (result,) = await worker.seal([os.fsencode(tmp_path / "a")])
        assert result.outcome.content == (blobs.blob_id(KEYS.dedup_key, b"hello"),)
    assert worker._process.returncode == 0


async def test_a_killed_sealer_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"hello")
    worker = await Sealer.start(SETUP)
    async with worker:
        os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(SealerError, match=rf"sealer process {worker.pid} failed: .*-9"):
            await worker.seal([os.fsencode(tmp_path / "a")])


async def test_a_sealer_that_cannot_start_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sealer, "SEALER_COMMAND", ("/nonexistent/python3", "-m", "x"))
    with pytest.raises(SealerError, match="cannot start a sealer process"):
        await Sealer.start(SETUP)


async def test_a_sealer_that_crashes_says_its_last_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        sealer,
        "SEALER_COMMAND",
        (
            sealer.SEALER_COMMAND[0],
            "-c",
            "import sys; sys.stdin.read(); raise SystemExit('broken')",
        ),
    )
    worker = await Sealer.start(SETUP)
    async with worker:
        await worker._process.stdin.aclose()  # type: ignore[union-attr]
        with pytest.raises(SealerError, match="exit status 1; it said: broken"):
            await worker.seal([b"/x"])


async def test_a_sealer_sending_a_bad_frame_is_a_sealer_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One byte of body that is not msgpack, then it waits for its input to close.
    child = "import os, sys; os.write(1, bytes([0, 0, 0, 1, 0xC1])); sys.stdin.buffer.read()"
    monkeypatch.setattr(sealer, "SEALER_COMMAND", (sealer.SEALER_COMMAND[0], "-c", child))
    worker = await Sealer.start(SETUP)
    async with worker:
        with pytest.raises(SealerError, match=rf"sealer process {worker.pid} sent a bad frame"):
            await worker.seal([b"/x"])


# -- backups -----------------------------------------------------------------------------


def many_small_files(root: Path, count: int) -> Path:
    for i in range(count):
        directory = root / f"d{i % 7}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"f{i}.txt").write_bytes(f"file {i % 150}\n".encode() * (i % 50 + 1))
    return root


async def run_backup(home: Home, source: Path, *, sealer_min_files: int) -> Backup:
    async with operations.open_repository(home) as repo:
        backup = Backup(repo)
        backup.sealer_min_files = sealer_min_files
        await backup.run([source])
    return backup


async def restore_latest(home: Home, target: Path) -> None:
    async with operations.open_repository(home) as repo:
        _, snap = snapshots.resolve(repo.index, "latest")
        summary = await Restorer(repo, target).run(snap, None)
    assert summary.ok, summary.lines()


async def test_a_backup_through_sealers_restores_exactly_and_counts_as_threads_do(
    tmp_path: Path,
) -> None:
    source = make_tree(tmp_path / "src")
    many_small_files(source / "many", 400)
    by_process = await make_setup(tmp_path / "p")
    by_thread = await make_setup(tmp_path / "t")
    started = []
    real_start = Sealer.start

    async def counting_start(setup: Setup) -> Sealer:
        started.append(setup)
        return await real_start(setup)

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(Sealer, "start", counting_start)
        processes = (await run_backup(by_process.home, source, sealer_min_files=1)).summary
        assert len(started) == 2  # one per file worker
        threads = (await run_backup(by_thread.home, source, sealer_min_files=10**9)).summary
        assert len(started) == 2
    # (blobs_new is left out: two runs of the same backup differ in it by a
    # blob or two, through threads as well.)
    for field in ("files_new", "files_changed", "bytes_read", "bytes_new", "bytes_deduplicated"):
        assert getattr(processes, field) == getattr(threads, field), field
    # 400 files of 150 distinct contents: the copies were deduplicated.
    assert processes.bytes_deduplicated > 0
    await restore_latest(by_process.home, tmp_path / "out")
    assert diff_trees(source, restored_path(tmp_path / "out", source)) == []


async def test_a_sealer_dying_mid_backup_hands_its_batch_to_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    source = many_small_files(tmp_path / "src", 300)
    setup = await make_setup(tmp_path / "repo")
    real_seal = Sealer.seal
    killed: list[int] = []

    async def dying_seal(self: Sealer, paths: list[bytes]) -> tuple[SealedFile, ...]:
        if not killed:
            killed.append(self.pid)
            os.kill(self.pid, signal.SIGKILL)
        return await real_seal(self, paths)

    monkeypatch.setattr(Sealer, "seal", dying_seal)
    with caplog.at_level(logging.WARNING, logger="p2pbackup.engine.pipeline"):
        backup = await run_backup(setup.home, source, sealer_min_files=1)
    assert killed
    assert backup.summary.files_new == 300 and backup.summary.skipped == []
    assert any(
        f"sealer process {killed[0]} failed" in r.message and "threads instead" in r.message
        for r in caplog.records
    )
    await restore_latest(setup.home, tmp_path / "out")
    assert diff_trees(source, restored_path(tmp_path / "out", source)) == []


async def test_a_small_backup_starts_no_sealer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(setup: Setup) -> Sealer:
        raise AssertionError("a backup of a few files started a sealer")

    monkeypatch.setattr(Sealer, "start", refuse)
    setup = await make_setup(tmp_path / "repo")
    source = make_tree(tmp_path / "src")
    backup = await run_backup(setup.home, source, sealer_min_files=pipeline.SEALER_MIN_FILES)
    assert backup.summary.files_new > 5


async def test_a_cancelled_backup_leaves_no_sealer_running(tmp_path: Path) -> None:
    source = many_small_files(tmp_path / "src", 600)
    setup = await make_setup(tmp_path / "repo")
    pids: list[int] = []
    real_seal = Sealer.seal

    with trio.CancelScope() as scope:

        async def cancelling_seal(self: Sealer, paths: list[bytes]) -> tuple[SealedFile, ...]:
            pids.append(self.pid)
            scope.cancel()  # as a Ctrl-C would, while the sealer works
            return await real_seal(self, paths)

        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setattr(Sealer, "seal", cancelling_seal)
            await run_backup(setup.home, source, sealer_min_files=1)
    assert scope.cancelled_caught and pids
    for pid in set(pids):
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reaped: it exited or was killed


# -- reading a batch ahead ------------------------------------------------------------


def test_prefetch_passes_over_what_is_not_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x" * 10_000)
    os.mkfifo(tmp_path / "fifo")  # opened without waiting for a writer
    (tmp_path / "link").symlink_to(tmp_path / "file")
    # A fifo opened to be read would wait for a writer: this returns.
    prefetch(os.fsencode(tmp_path / n) for n in ("file", "fifo", "link", "missing"))
    assert (tmp_path / "file").read_bytes() == b"x" * 10_000
