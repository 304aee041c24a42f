"""Process-wide tuning, applied once by the CLI before any thread starts.

* **GIL switch interval** — the backup and restore pipelines run several
  threads whose work (hashing, zstd, libsodium, numpy) releases the GIL many
  times per second in short calls. With CPython's default 5 ms interval a
  thread that wants the GIL back waits behind one that holds it — a convoy
  that costs a backup much of its throughput. 1 ms keeps both cores busy.
* **malloc arenas** — glibc gives each thread its own arena, and the many
  short-lived I/O threads left freed multi-MiB buffers parked in a dozen of
  them: a backup's peak RSS grew far past the data in flight. Two arenas
  keep the same speed in much less memory, and serving buffers of 4 MiB and
  more (packs, shards) straight from mmap returns them to the system when
  freed instead of leaving them to fragment a heap. The smaller buffers
  (sealed blobs of up to a few MiB) still fragment it: a backup gives their
  pages back after each pack it writes (:func:`release_free_memory`).

* **BLAS threads** — numpy starts OpenBLAS worker threads at import, which
  spin between calls (they show in ``perf`` profiles of a backup); p2pbackup
  never multiplies matrices, so one is enough. Set before numpy is first
  imported.
* **garbage collection during bulk work** — a backup allocates millions of
  short-lived containers (tuples, tree nodes, sealed blobs) that reference
  counting frees; the cyclic collector finds nothing among them, yet with
  CPython's default threshold it ran hundreds of times over a backup of
  many small files, and each full pass over the objects alive then stopped
  every thread (it holds the GIL). :func:`rare_collections` makes passes
  rare for the length of a backup or restore.

The figures behind each choice, with the commands that measured them:
docs/performance.md#runtime.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import sys
from collections.abc import Callable, Iterator

SWITCH_INTERVAL = 0.001
#: Allocations between two young-generation collections during bulk work
#: (CPython's default is 700).
BULK_GC_THRESHOLD = 50_000
MALLOC_ARENAS = 2
MMAP_THRESHOLD = 4 << 20
_M_ARENA_MAX = -8  # glibc's mallopt parameter numbers
_M_MMAP_THRESHOLD = -3


def tune_process() -> None:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    sys.setswitchinterval(SWITCH_INTERVAL)
    if sys.platform.startswith("linux"):
        _tune_malloc(MALLOC_ARENAS)


def _tune_malloc(arenas: int) -> None:
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return  # not glibc (musl has no arenas to limit)
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mallopt(_M_ARENA_MAX, arenas)
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    global _malloc_trim
    with contextlib.suppress(AttributeError):
        trim = libc.malloc_trim
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
        _malloc_trim = trim


#: glibc's ``malloc_trim``, once :func:`tune_process` has found it.
_malloc_trim: Callable[[int], int] | None = None


def release_free_memory() -> None:
    """Give the pages of freed heap memory back to the system (glibc only).

    Called once per pack a backup writes: between two packs the buffers of
    the last (sealed blobs under the mmap threshold) lie freed across the
    heap, and without a trim the process keeps their pages.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


_bulk_depth = 0
_saved_threshold: tuple[int, int, int] = gc.get_threshold()


@contextlib.contextmanager
def rare_collections() -> Iterator[None]:
    """Collect garbage rarely while the block runs (nestable; main thread only).

    Objects alive on entry are frozen (left out of every pass until exit), and
    the young generation is collected every :data:`BULK_GC_THRESHOLD`
    allocations. Cycles made meanwhile are still collected, only later.
    """
    global _bulk_depth, _saved_threshold
    _bulk_depth += 1
    if _bulk_depth == 1:
        _saved_threshold = gc.get_threshold()
        gc.freeze()
        gc.set_threshold(BULK_GC_THRESHOLD, *_saved_threshold[1:])
    try:
        yield
    finally:
        # Blocks may end in any order (a restore beside a backup in the
        # daemon): whichever ends last puts the collector back.
        _bulk_depth -= 1
        if _bulk_depth == 0:
            gc.set_threshold(*_saved_threshold)
            gc.unfreeze()
