"""Process-wide tuning, applied once by the CLI before any thread starts.

* **GIL switch interval** — the backup and restore pipelines run several
  threads whose work (hashing, zstd, libsodium, numpy) releases the GIL many
  times per second in short calls. With CPython's default 5 ms interval a
  thread that wants the GIL back waits behind one that holds it — a convoy
  that halved backup throughput. 0.5 ms keeps both cores busy.
* **malloc arenas** — glibc gives each thread its own arena, and the many
  short-lived I/O threads left freed multi-MiB buffers parked in a dozen of
  them (peak RSS ~600 MB for a 200 MB backup). Two arenas keep the same
  speed at under half the memory, and serving buffers of 4 MiB and more
  (packs, shards) straight from mmap returns them to the system when freed
  instead of leaving them to fragment a heap (another ~35 MB off the peak).

* **BLAS threads** — numpy starts OpenBLAS worker threads at import, which
  spin between calls (~1 % of a backup's CPU in ``perf``); p2pbackup never
  multiplies matrices, so one is enough. Set before numpy is first imported.

Measured with ``benchmarks/bench_backup.py``; see docs/performance.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

SWITCH_INTERVAL = 0.001
MALLOC_ARENAS = 2
MMAP_THRESHOLD = 4 << 20
_M_ARENA_MAX = -8  # glibc's mallopt parameter numbers
_M_MMAP_THRESHOLD = -3


def tune_process() -> None:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    sys.setswitchinterval(SWITCH_INTERVAL)
    if sys.platform.startswith("linux"):
        _limit_malloc_arenas(MALLOC_ARENAS)


def _limit_malloc_arenas(count: int) -> None:
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
    mallopt(_M_ARENA_MAX, count)
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
