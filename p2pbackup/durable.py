"""Durable writes on a local filesystem: the few system calls every store repeats.

Nouns:

* **durable** — on disk once the call returns, through a crash or power loss
  (as far as the filesystem keeps its promises): file data by ``fsync`` of the
  file, a new or renamed name by ``fsync`` of its directory.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


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


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write every byte of ``data`` (``os.write`` may write fewer)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
