"""Tests for process-wide tuning (p2pbackup.engine.runtime)."""

from __future__ import annotations

import gc
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
