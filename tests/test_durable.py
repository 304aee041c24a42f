"""DirectWriter: every byte lands once, in order, whether or not the
filesystem takes direct writes, and whatever sizes the writes come in."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pbackup.errors import StoreError, StoreFullError
from p2pbackup.stores import durable
from p2pbackup.stores.durable import DIRECT_ALIGNMENT, DirectWriter

STAGING = 2 * DIRECT_ALIGNMENT


@pytest.fixture
def new_file(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    path = tmp_path / "shard"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    yield fd, path
    os.close(fd)


def fd_is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))


def write_through(path: Path, pieces: list[bytes], *, direct: bool) -> DirectWriter:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        writer = DirectWriter(fd, direct=direct, staging_size=STAGING)
        for piece in pieces:
            writer.write(piece)
        writer.flush()
        os.fsync(fd)
        writer.close()
        return writer
    finally:
        os.close(fd)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(0, 3 * STAGING + 100), max_size=8),
    direct=st.booleans(),
)
def test_the_file_holds_exactly_the_bytes_written(
    tmp_path: Path, sizes: list[int], direct: bool
) -> None:
    pieces = [os.urandom(size) for size in sizes]
    path = tmp_path / "shard"
    write_through(path, pieces, direct=direct)
    assert path.read_bytes() == b"".join(pieces)


def test_whole_blocks_go_out_while_writing_and_the_tail_at_flush(
    new_file: tuple[int, Path],
) -> None:
    fd, path = new_file
    writer = DirectWriter(fd, staging_size=STAGING)
    data = os.urandom(STAGING + 100)
    writer.write(data)
    assert os.fstat(fd).st_size == STAGING  # the full buffer was written
    if writer.direct:
        assert fd_is_direct(fd)
    writer.flush()
    assert os.fstat(fd).st_size == len(data)
    # The unaligned tail went through the page cache, and so would any more.
    assert not writer.direct and not fd_is_direct(fd)
    writer.close()
    assert path.read_bytes() == data


def test_an_aligned_end_stays_direct(new_file: tuple[int, Path]) -> None:
    fd, path = new_file
    writer = DirectWriter(fd, staging_size=STAGING)
    data = os.urandom(3 * DIRECT_ALIGNMENT)
    writer.write(data)
    direct = writer.direct
    writer.flush()
    assert writer.direct == direct == fd_is_direct(fd)
    writer.close()
    assert path.read_bytes() == data


def test_a_filesystem_refusing_direct_writes_gets_ordinary_ones(
    new_file: tuple[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    fd, path = new_file
    real_fcntl = fcntl.fcntl

    def refusing(fd: int, command: int, arg: int = 0) -> int:
        if command == fcntl.F_SETFL and arg & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_fcntl(fd, command, arg)

    monkeypatch.setattr(fcntl, "fcntl", refusing)
    writer = DirectWriter(fd, staging_size=STAGING)
    assert not writer.direct
    writer.write(b"abc")
    assert os.fstat(fd).st_size == 3  # nothing staged: written at once
    writer.flush()
    writer.close()
    assert path.read_bytes() == b"abc"


def test_other_fcntl_failures_are_not_taken_for_a_refusal(
    new_file: tuple[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    fd, _ = new_file

    def broken(fd: int, command: int, arg: int = 0) -> int:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    monkeypatch.setattr(fcntl, "fcntl", broken)
    with pytest.raises(OSError, match="Bad file descriptor"):
        DirectWriter(fd, staging_size=STAGING)


class StrictDirectDisk:
    """A filesystem that takes direct writes and holds them to its rules:
    O_DIRECT is a per-descriptor flag, and a direct write's buffer address,
    length and file offset must be whole blocks, or EINVAL. It lets the
    tests see what DirectWriter asks of the kernel on any filesystem."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fd: int) -> None:
        self.fd = fd
        self.direct = False
        self.direct_writes: list[int] = []
        self.refuse_next = False
        self.short_next: int | None = None
        self._real_write = os.write
        monkeypatch.setattr(durable, "_set_direct", self._set_direct)
        monkeypatch.setattr(os, "write", self._write)

    def _set_direct(self, fd: int, on: bool) -> bool:
        assert fd == self.fd
        self.direct = on
        return True

    def _write(self, fd: int, data: memoryview) -> int:
        if fd != self.fd or not self.direct:
            return self._real_write(fd, data)
        address = ctypes.addressof(ctypes.c_char.from_buffer(data))
        offset = os.lseek(fd, 0, os.SEEK_CUR)
        if (address | len(data) | offset) % DIRECT_ALIGNMENT or self.refuse_next:
            self.refuse_next = False
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        if self.short_next is not None:
            data, self.short_next = data[: self.short_next], None
        self.direct_writes.append(len(data))
        return self._real_write(fd, data)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(0, 3 * STAGING + 100), max_size=8))
def test_direct_writes_are_whole_aligned_blocks_and_the_file_is_exact(
    tmp_path: Path, sizes: list[int]
) -> None:
    pieces = [os.urandom(size) for size in sizes]
    path = tmp_path / "shard"
    with pytest.MonkeyPatch.context() as monkeypatch:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            disk = StrictDirectDisk(monkeypatch, fd)
            writer = DirectWriter(fd, staging_size=STAGING)
            for piece in pieces:
                writer.write(piece)
            writer.flush()
            writer.close()
        finally:
            os.close(fd)
    total = sum(sizes)
    assert path.read_bytes() == b"".join(pieces)
    # Everything but the unaligned tail went around the page cache.
    assert sum(disk.direct_writes) == total - total % DIRECT_ALIGNMENT
    assert disk.direct == (total % DIRECT_ALIGNMENT == 0)


def test_a_direct_write_refused_midway_is_written_again_through_the_page_cache(
    new_file: tuple[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    fd, path = new_file
    disk = StrictDirectDisk(monkeypatch, fd)
    writer = DirectWriter(fd, staging_size=STAGING)
    assert writer.direct
    first = os.urandom(STAGING)
    writer.write(first)
    disk.refuse_next = True
    rest = os.urandom(2 * STAGING + 7)
    writer.write(rest)
    assert disk.direct_writes == [STAGING]
    assert (writer.direct, disk.direct) == (False, False)
    writer.flush()
    writer.close()
    assert path.read_bytes() == first + rest


def test_a_short_direct_write_continues_through_the_page_cache(
    new_file: tuple[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    fd, path = new_file
    disk = StrictDirectDisk(monkeypatch, fd)
    writer = DirectWriter(fd, staging_size=STAGING)
    disk.short_next = 100
    data = os.urandom(STAGING + 50)
    writer.write(data)
    # 100 bytes went direct; the offset is no longer aligned, so the rest
    # is written the ordinary way, each byte once.
    assert disk.direct_writes == [100]
    assert not writer.direct and not disk.direct
    writer.flush()
    writer.close()
    assert path.read_bytes() == data


def test_a_failed_write_leaves_the_writer_closable(
    new_file: tuple[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    fd, _ = new_file

    def full(target: int, data: memoryview) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    writer = DirectWriter(fd, staging_size=STAGING)
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="No space left"):
        writer.write(os.urandom(STAGING + 1))
        writer.flush()
    writer.close()
    writer.close()  # twice is harmless


def test_the_staging_size_must_be_whole_blocks(new_file: tuple[int, Path]) -> None:
    fd, _ = new_file
    with pytest.raises(ValueError, match="multiple of 4096"):
        DirectWriter(fd, staging_size=DIRECT_ALIGNMENT + 1)


def test_the_default_staging_buffer_holds_whole_blocks() -> None:
    assert durable.STAGING_SIZE % DIRECT_ALIGNMENT == 0


# -- the helpers every store shares -------------------------------------------------


@pytest.mark.parametrize("code", sorted(durable.NO_SPACE_ERRNOS))
def test_a_full_disk_is_a_full_store(code: int) -> None:
    error = durable.store_error("write", Path("/x/y"), OSError(code, os.strerror(code)))
    assert isinstance(error, StoreFullError)
    assert str(error) == f"no room on disk to write /x/y: {os.strerror(code)}"


def test_other_os_errors_are_store_errors_naming_the_action_and_path() -> None:
    expected = "could not read /x/y: Permission denied"
    with pytest.raises(StoreError, match=expected) as caught, durable.os_errors("read", "/x/y"):
        raise PermissionError(errno.EACCES, "Permission denied")
    assert not isinstance(caught.value, StoreFullError)
    assert isinstance(caught.value.__cause__, PermissionError)


@pytest.mark.parametrize("direct", [False, True])
def test_a_temp_file_holds_the_bytes_and_only_its_owner_reads_it(
    tmp_path: Path, direct: bool
) -> None:
    path = tmp_path / "temp"
    durable.write_temp_file(path, memoryview(b"x" * 10_000), direct=direct)
    assert path.read_bytes() == b"x" * 10_000
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):  # never over another file
        durable.write_temp_file(path, b"other")
    assert path.read_bytes() == b"x" * 10_000


def test_a_temp_file_that_fails_midway_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        durable.write_temp_file(tmp_path / "temp", b"data")
    assert list(tmp_path.iterdir()) == []


def test_make_dirs_creates_the_missing_ones_below_the_base(tmp_path: Path) -> None:
    durable.make_dirs(tmp_path / "a" / "b" / "c", tmp_path)
    assert (tmp_path / "a" / "b" / "c").is_dir()
    durable.make_dirs(tmp_path / "a" / "b" / "c", tmp_path)  # already there: nothing to do
