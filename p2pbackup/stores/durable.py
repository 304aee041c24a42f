"""Durable writes on a local filesystem: the few system calls every store repeats.

Nouns:

* **durable** — on disk once the call returns, through a crash or power loss
  (as far as the filesystem keeps its promises): file data by ``fsync`` of the
  file, a new or renamed name by ``fsync`` of its directory.
* **direct write** — a write with ``O_DIRECT``: the disk takes the bytes from
  the writer's own buffer instead of through the page cache. The buffer, the
  length and the file offset must be multiples of the device's block size.
* **private file** — a small file only its owner may read (0600), written
  whole or not at all: secrets, the DHT's remembered neighbours.
* **temp file** — a new file written and synced under a name of its own,
  then moved into place by the caller (or removed), so that no final name
  ever holds a partial file. Which name, and who cleans up after a crash, is
  each store's business.
* **store error** — what an ``OSError`` becomes when a store meets it:
  :class:`~p2pbackup.errors.StoreFullError` when the disk (or the user's
  quota on it) is full, :class:`~p2pbackup.errors.StoreError` naming the
  action and the path otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

from p2pbackup.errors import StoreError, StoreFullError
from p2pbackup.model import BytesLike

#: errno values that mean the disk, or the user's quota on it, is full.
NO_SPACE_ERRNOS = frozenset(
    code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if code is not None
)


def store_error(action: str, path: Path | str, error: OSError) -> StoreError:
    """The store error for ``error``, met while trying to ``action`` ``path``."""
    reason = error.strerror or str(error)
    if error.errno in NO_SPACE_ERRNOS:
        return StoreFullError(f"no room on disk to {action} {path}: {reason}")
    return StoreError(f"could not {action} {path}: {reason}")


@contextlib.contextmanager
def os_errors(action: str, path: Path | str) -> Iterator[None]:
    """Raise an ``OSError`` from inside as its :func:`store_error`."""
    try:
        yield
    except OSError as error:
        raise store_error(action, path, error) from error


def unlink_quietly(path: Path) -> None:
    """Remove ``path`` if it can be: where it may be gone already, or where a
    leftover is garbage that the store's next clean-up removes."""
    with contextlib.suppress(OSError):
        os.unlink(path)


def write_temp_file(path: Path, data: BytesLike, *, direct: bool = False) -> None:
    """Write ``data`` to the new file ``path`` (0600; it must not exist) and
    sync it. On any failure the file is removed before the error propagates.
    ``direct`` writes around the page cache (:class:`DirectWriter`): for
    shards, written once and rarely read back soon."""
    # Opened outside the clean-up: if it fails, there is no file of ours to remove.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            writer = DirectWriter(fd, direct=direct)
            try:
                writer.write(data)
                writer.flush()
                os.fsync(fd)
            finally:
                writer.close()
        finally:
            os.close(fd)
    except BaseException:
        unlink_quietly(path)
        raise


def fsync_dir(path: Path) -> None:
    """Make the names in directory ``path`` durable (after a create or rename)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as error:
        # Some filesystems (certain FUSE and network mounts) cannot sync a
        # directory; the rename is then as durable as they make it.
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def make_dirs(path: Path, base: Path, *, mode: int = 0o777) -> None:
    """Create ``path`` and its missing ancestors below ``base`` (which exists),
    with ``mode`` (less the umask), syncing each new directory's parent so the
    new entry survives a crash."""
    missing: list[Path] = []
    current = path
    while current != base and not current.is_dir():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=mode)
        except FileExistsError:
            continue  # made meanwhile by a concurrent put
        fsync_dir(directory.parent)


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, readable only by its owner (0600)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)  # no half-written copy of a secret left behind
        raise


def write_all(fd: int, data: BytesLike) -> None:
    """Write every byte of ``data`` (``os.write`` may write fewer)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


#: What a direct write's buffer, length and offset are multiples of: the
#: logical block size of every common device divides it.
DIRECT_ALIGNMENT = 4096

#: The page-aligned buffer a DirectWriter gathers bytes in.
STAGING_SIZE = 1 << 20

_O_DIRECT: int = getattr(os, "O_DIRECT", 0)


class DirectWriter:
    """Appends to an open file with direct writes where the filesystem allows.

    For files written once and rarely read soon after: shards. Through the
    page cache, storage nodes writing shards at once spend many times more
    CPU in the kernel than with direct writes (docs/performance.md#durable);
    and a shard has no business evicting the page cache of the files its
    host is using.

    Bytes are gathered in a page-aligned buffer (STAGING_SIZE) and written
    from it; :meth:`flush` writes what is left, its unaligned tail through
    the page cache. A filesystem that refuses direct writes (at the start or
    at any write) gets ordinary ones from then on: the bytes are the same
    either way, and ``fsync`` is still what makes them durable. The file
    descriptor stays the caller's; :meth:`close` frees the buffer.
    """

    def __init__(self, fd: int, *, direct: bool = True, staging_size: int = STAGING_SIZE) -> None:
        if staging_size <= 0 or staging_size % DIRECT_ALIGNMENT:
            raise ValueError(f"staging size {staging_size} is not a multiple of {DIRECT_ALIGNMENT}")
        self._fd = fd
        self._size = staging_size
        self._direct = direct and _O_DIRECT != 0 and _set_direct(fd, True)
        self._memory: mmap.mmap | None = None
        self._staged: memoryview | None = None
        self._filled = 0
        if self._direct:
            self._memory = mmap.mmap(-1, staging_size, flags=mmap.MAP_PRIVATE)
            self._staged = memoryview(self._memory)

    @property
    def direct(self) -> bool:
        """Whether writes still bypass the page cache."""
        return self._direct

    def write(self, data: BytesLike) -> None:
        """Append every byte of ``data`` (staged: :meth:`flush` before syncing)."""
        view = memoryview(data).cast("B")
        while view:
            staged = self._staged
            if staged is None:
                write_all(self._fd, view)
                return
            taken = min(len(view), self._size - self._filled)
            staged[self._filled : self._filled + taken] = view[:taken]
            self._filled += taken
            view = view[taken:]
            if self._filled == self._size:
                self._write_staged(self._size)

    def flush(self) -> None:
        """Write everything staged, so that an ``fsync`` covers every byte."""
        if self._staged is None or not self._filled:
            return
        aligned = self._filled - self._filled % DIRECT_ALIGNMENT
        if aligned:
            self._write_staged(aligned)
        if self._filled:
            # The tail is not a whole block: it goes through the page cache,
            # and so does anything written after it.
            self._stop_direct()

    def close(self) -> None:
        """Free the staging buffer (unflushed bytes are dropped)."""
        self._filled = 0
        staged, memory = self._staged, self._memory
        self._staged = self._memory = None
        # A traceback may still hold a slice of the buffer (a write that
        # failed); the mapping then goes with the last reference to it.
        with contextlib.suppress(BufferError):
            if staged is not None:
                staged.release()
            if memory is not None:
                memory.close()

    def _write_staged(self, length: int) -> None:
        """Write the first ``length`` staged bytes directly and keep the rest
        staged; if the filesystem stops taking direct writes midway, write
        everything left through the page cache instead."""
        assert self._staged is not None
        done = 0
        while done < length:
            try:
                written = os.write(self._fd, self._staged[done:length])
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise
                break  # an alignment this filesystem refuses: nothing was written
            done += written
            if written % DIRECT_ALIGNMENT:
                break  # a short write left the offset unaligned for direct writes
        rest = self._filled - done
        if rest:
            self._staged[:rest] = self._staged[done : self._filled]
        self._filled = rest
        if done < length:
            self._stop_direct()

    def _stop_direct(self) -> None:
        """Write through the page cache from now on; nothing stays staged."""
        if self._direct:
            self._direct = False
            _set_direct(self._fd, False)
        if self._filled:
            assert self._staged is not None
            write_all(self._fd, self._staged[: self._filled])
        self.close()


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for ``fd``; whether the filesystem accepted."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | _O_DIRECT if on else flags & ~_O_DIRECT)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        return False
    return True
