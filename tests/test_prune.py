"""The prune plan: which packs die, which are repacked, and that no live blob is lost."""

from __future__ import annotations

import attrs
from hypothesis import given
from hypothesis import strategies as st

from p2pbackup.engine.prune import REPACK_THRESHOLD, PrunePlan, Repack, plan_prune
from p2pbackup.model import BlobEntry, BlobType, PackRecord

#: Few blob ids, so that packs share blobs (copies of one blob in several packs).
BLOB_IDS = st.sampled_from([bytes([i]) * 32 for i in range(10)])


def pack(pack_id: bytes, blobs: dict[bytes, int]) -> PackRecord:
    entries = []
    offset = 0
    for blob_id, length in blobs.items():
        entries.append(BlobEntry(BlobType.DATA, blob_id, offset, length, length))
        offset += length
    return PackRecord(pack_id, offset, 2, 4, 1, 4096, (), tuple(entries))


@attrs.frozen
class Index:
    """What a plan is made from: the data packs, index packs, live blobs and copies."""

    packs: tuple[PackRecord, ...]
    index_packs: tuple[bytes, ...]
    live: frozenset[bytes]
    copies: tuple[tuple[bytes, bytes], ...]
    #: Kept bytes below which a pack is small, and how many make a repack.
    small_below: int = 0
    min_small: int = 1

    def plan(self) -> PrunePlan:
        return plan_prune(
            self.packs,
            self.index_packs,
            self.live,
            self.copies,
            small_below=self.small_below,
            min_small=self.min_small,
        )


@st.composite
def indexes(draw: st.DrawFn) -> Index:
    contents = draw(st.lists(st.dictionaries(BLOB_IDS, st.integers(1, 1000)), max_size=8))
    packs = tuple(pack(b"p%d" % i, blobs) for i, blobs in enumerate(contents))
    copies = [(b.blob_id, p.pack_id) for p in packs for b in p.blobs]
    return Index(
        packs=packs,
        index_packs=tuple(b"i%d" % i for i in range(draw(st.integers(0, 3)))),
        live=frozenset(draw(st.sets(BLOB_IDS))),
        copies=tuple(draw(st.permutations(copies))),
        small_below=draw(st.sampled_from([0, 500, 2000])),
        min_small=draw(st.integers(1, 4)),
    )


def kept_pack(index: Index, blob_id: bytes) -> bytes:
    """The pack of the copy of ``blob_id`` a prune keeps: the first listed."""
    return next(pack_id for listed, pack_id in index.copies if listed == blob_id)


@given(indexes())
def test_every_data_pack_is_dead_repacked_or_kept_once(index: Index) -> None:
    plan = index.plan()
    repacked = [r.pack_id for r in plan.repack]
    assert sorted([*plan.dead, *repacked, *plan.keep]) == sorted(p.pack_id for p in index.packs)
    assert plan.old_index == index.index_packs
    assert plan.removed == (*plan.dead, *repacked, *index.index_packs)


@given(indexes())
def test_no_live_blob_is_lost(index: Index) -> None:
    plan = index.plan()
    stored = {b.blob_id for p in index.packs for b in p.blobs}
    kept_as_is = {b.blob_id for p in index.packs if p.pack_id in plan.keep for b in p.blobs}
    copied = {blob_id for r in plan.repack for blob_id in r.blobs}
    assert index.live & stored <= kept_as_is | copied
    for blob_id in index.live & stored:
        # The kept copy stays where it is, or is copied out of its pack first.
        home = kept_pack(index, blob_id)
        assert home in plan.keep or blob_id in _copied_from(plan, home)


def _copied_from(plan: PrunePlan, pack_id: bytes) -> frozenset[bytes]:
    return next((r.blobs for r in plan.repack if r.pack_id == pack_id), frozenset())


@given(indexes())
def test_every_pack_without_a_kept_live_blob_is_deleted(index: Index) -> None:
    plan = index.plan()
    for record in index.packs:
        holds_kept = any(
            b.blob_id in index.live and kept_pack(index, b.blob_id) == record.pack_id
            for b in record.blobs
        )
        assert (record.pack_id in plan.dead) == (not holds_kept)
        assert holds_kept or record.pack_id in plan.removed


@given(indexes())
def test_packs_mostly_dead_or_small_are_repacked_and_copy_only_their_kept_blobs(
    index: Index,
) -> None:
    plan = index.plan()
    by_id = {p.pack_id: p for p in index.packs}
    kept_by_pack = {}
    for pack_id in [*plan.keep, *(r.pack_id for r in plan.repack)]:
        record = by_id[pack_id]
        kept_by_pack[pack_id] = {
            b.blob_id: b.length
            for b in record.blobs
            if b.blob_id in index.live and kept_pack(index, b.blob_id) == pack_id
        }
    mostly_dead = {
        pack_id
        for pack_id, kept in kept_by_pack.items()
        if sum(kept.values()) < sum(b.length for b in by_id[pack_id].blobs) * REPACK_THRESHOLD
    }
    small = {
        pack_id
        for pack_id, kept in kept_by_pack.items()
        if pack_id not in mostly_dead and sum(kept.values()) < index.small_below
    }
    repacked = mostly_dead | (small if len(small) >= index.min_small else set())
    assert set(plan.keep) == set(kept_by_pack) - repacked
    for pack_id in repacked:
        assert Repack(pack_id, frozenset(kept_by_pack[pack_id])) in plan.repack


def test_small_packs_are_repacked_only_when_there_are_enough_of_them() -> None:
    # Each pack all live: none is mostly dead; a and b hold less than 100 bytes.
    packs = (pack(b"a", {b"x": 40}), pack(b"b", {b"y": 60}), pack(b"c", {b"z": 300}))
    copies = tuple((b.blob_id, p.pack_id) for p in packs for b in p.blobs)
    live = frozenset({b"x", b"y", b"z"})

    def plan(min_small: int) -> PrunePlan:
        return plan_prune(packs, (), live, copies, small_below=100, min_small=min_small)

    assert plan(2) == PrunePlan(
        dead=(),
        repack=(Repack(b"a", frozenset({b"x"})), Repack(b"b", frozenset({b"y"}))),
        keep=(b"c",),
        old_index=(),
    )
    # One fewer small pack than needed: every pack stays as it is.
    assert plan(3) == PrunePlan(dead=(), repack=(), keep=(b"a", b"b", b"c"), old_index=())


def test_a_plan_with_nothing_live_deletes_every_pack() -> None:
    packs = (pack(b"a", {b"x": 10}), pack(b"b", {b"y": 10, b"z": 5}))
    copies = tuple((b.blob_id, p.pack_id) for p in packs for b in p.blobs)
    plan = plan_prune(packs, (b"i",), frozenset(), copies)
    assert plan == PrunePlan((b"a", b"b"), (), (), (b"i",))


def test_a_mostly_dead_pack_is_repacked_and_a_mostly_live_one_kept() -> None:
    mostly_dead = pack(b"a", {b"live1": 30, b"gone1": 70})
    mostly_live = pack(b"b", {b"live2": 60, b"gone2": 40})
    # live1 also sits in b, listed after a's copy: a's is the one kept.
    both = pack(b"c", {b"live1": 30})
    packs = (mostly_dead, mostly_live, both)
    copies = ((b"live1", b"a"), (b"gone1", b"a"), (b"live2", b"b"), (b"gone2", b"b"))
    copies += ((b"live1", b"c"),)
    plan = plan_prune(packs, (), frozenset({b"live1", b"live2"}), copies)
    assert plan == PrunePlan(
        dead=(b"c",), repack=(Repack(b"a", frozenset({b"live1"})),), keep=(b"b",), old_index=()
    )
