"""Tests for process-wide tuning (p2pbackup.engine.runtime)."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref

from p2pbackup.engine import runtime


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_rare_collections_raises_the_threshold_and_puts_it_back() -> None:
    before = gc.get_threshold()
    with runtime.rare_collections():
        assert gc.get_threshold() == (runtime.BULK_GC_THRESHOLD, *before[1:])
        # What was alive on entry is left out of every pass.
        assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_blocks_that_end_out_of_order_still_restore_the_collector() -> None:
    before = gc.get_threshold()
    first, second = runtime.rare_collections(), runtime.rare_collections()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    # One block is still running: collections stay rare.
    assert gc.get_threshold()[0] == runtime.BULK_GC_THRESHOLD
    second.__exit__(None, None, None)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_cycles_made_meanwhile_are_still_collected() -> None:
    with runtime.rare_collections():
        a, b = _Node(), _Node()
        a.other, b.other = b, a
        alive = weakref.ref(a)
        del a, b
        gc.collect()
        assert alive() is None


FRAGMENTED_HEAP = """
import os
from p2pbackup.engine import runtime

runtime.tune_process()


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# Sealed blobs of 1 MiB (under the mmap threshold) with small objects made
# between them that stay: when the blobs are freed the heap cannot shrink.
blobs, pins = [], []
for i in range(200):
    blobs.append(bytes([i % 251]) * (1 << 20))
    pins.append(bytearray(1024))  # past pymalloc: on the heap
del blobs
before = rss()
runtime.release_free_memory()
print(before, rss())
"""


def test_freed_blobs_are_given_back_to_the_system() -> None:
    run = subprocess.run(
        [sys.executable, "-c", FRAGMENTED_HEAP], capture_output=True, text=True, check=True
    )
    before, after = map(int, run.stdout.split())
    # 200 MiB freed but kept by the process until the trim.
    assert before > 150 << 20
    assert after < before - (150 << 20)
