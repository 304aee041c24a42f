"""The conformance suite every ShardStore implementation must pass.

To test an implementation, subclass :class:`ShardStoreConformance` in a
``test_*.py`` module under a ``Test*`` name and implement :meth:`make_store`
(each call returns a fresh, empty store). A store that needs a running server
or a teardown overrides the ``store`` fixture instead, e.g. with an async
generator fixture that takes pytest-trio's ``nursery``.

This module's name does not match ``test_*.py`` and the base class's name does
not start with ``Test``, so pytest collects only the subclasses.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import trio

from p2pbackup.core import merkle
from p2pbackup.errors import ShardNotFoundError, StoreError
from p2pbackup.stores.shardstore import ShardRoot, ShardStore
from p2pbackup.wire.messages import MAX_AUDIT_BLOCKS

MiB = 1024 * 1024


def shard_id(n: int) -> bytes:
    """A 32-byte shard id; ids of consecutive ``n`` are not in sorted order."""
    return hashlib.blake2b(n.to_bytes(8, "big"), digest_size=32).digest()


class ShardStoreConformance:
    """Behaviour common to every ShardStore (see p2pbackup.stores.shardstore)."""

    async def make_store(self, tmp_path: Path) -> ShardStore:
        raise NotImplementedError("conformance subclasses implement make_store")

    @pytest.fixture
    async def store(self, tmp_path: Path) -> ShardStore:
        return await self.make_store(tmp_path)

    # -- put / get --

    async def test_put_get_round_trip(self, store: ShardStore) -> None:
        await store.put(shard_id(1), b"first shard")
        await store.put(shard_id(2), b"second")
        assert await store.get(shard_id(1)) == b"first shard"
        assert await store.get(shard_id(2)) == b"second"

    async def test_empty_shard_round_trip(self, store: ShardStore) -> None:
        await store.put(shard_id(1), b"")
        assert await store.has(shard_id(1))
        assert await store.get(shard_id(1)) == b""

    async def test_binary_content_survives(self, store: ShardStore) -> None:
        data = bytes(range(256)) * 4 + b"\r\n\x00\r"
        await store.put(shard_id(1), data)
        assert await store.get(shard_id(1)) == data

    async def test_ranges(self, store: ShardStore) -> None:
        data = bytes(range(100))
        await store.put(shard_id(1), data)
        assert await store.get(shard_id(1), 0, 10) == data[:10]
        assert await store.get(shard_id(1), 10, 5) == data[10:15]
        assert await store.get(shard_id(1), 90) == data[90:]
        assert await store.get(shard_id(1), offset=50, length=None) == data[50:]
        assert await store.get(shard_id(1), 0, 0) == b""

    async def test_ranges_beyond_end_return_what_exists(self, store: ShardStore) -> None:
        data = bytes(range(100))
        await store.put(shard_id(1), data)
        assert await store.get(shard_id(1), 95, 10) == data[95:]
        assert await store.get(shard_id(1), 100, 10) == b""
        assert await store.get(shard_id(1), 1000) == b""
        assert await store.get(shard_id(1), 0, 1000) == data

    async def test_negative_ranges_are_rejected(self, store: ShardStore) -> None:
        await store.put(shard_id(1), b"data")
        with pytest.raises(ValueError):
            await store.get(shard_id(1), -1)
        with pytest.raises(ValueError):
            await store.get(shard_id(1), 0, -1)

    async def test_get_missing_raises(self, store: ShardStore) -> None:
        with pytest.raises(ShardNotFoundError):
            await store.get(shard_id(1))
        with pytest.raises(ShardNotFoundError):
            await store.get(shard_id(1), 0, 10)

    async def test_shard_ids_must_be_32_bytes(self, store: ShardStore) -> None:
        for bad in (b"", b"x" * 31, b"x" * 33):
            with pytest.raises(ValueError):
                await store.put(bad, b"data")
            with pytest.raises(ValueError):
                await store.get(bad)
        assert await store.list() == []

    # -- write-once --

    async def test_idempotent_put(self, store: ShardStore) -> None:
        await store.put(shard_id(1), b"same bytes")
        await store.put(shard_id(1), b"same bytes")
        assert await store.get(shard_id(1)) == b"same bytes"
        assert await store.list() == [shard_id(1)]
        assert await store.usage() == len(b"same bytes")

    @pytest.mark.parametrize("other", [b"other bytes", b"same byteZ", b"same bytes plus", b""])
    async def test_conflicting_put_keeps_original(self, store: ShardStore, other: bytes) -> None:
        await store.put(shard_id(1), b"same bytes")
        with pytest.raises(StoreError):
            await store.put(shard_id(1), other)
        assert await store.get(shard_id(1)) == b"same bytes"
        assert await store.usage() == len(b"same bytes")

    async def test_put_after_delete_may_change_content(self, store: ShardStore) -> None:
        await store.put(shard_id(1), b"old")
        await store.delete(shard_id(1))
        await store.put(shard_id(1), b"new content")
        assert await store.get(shard_id(1)) == b"new content"

    # -- has / list / delete --

    async def test_collecting_garbage_keeps_every_stored_shard(self, store: ShardStore) -> None:
        ids = [bytes([i]) * 32 for i in range(3)]
        for i, shard_id in enumerate(ids):
            await store.put(shard_id, b"shard %d" % i)
        assert await store.collect_garbage(older_than=0) >= 0
        assert await store.list() == sorted(ids)
        assert [await store.get(shard_id) for shard_id in ids] == [
            b"shard 0",
            b"shard 1",
            b"shard 2",
        ]

    async def test_has(self, store: ShardStore) -> None:
        assert not await store.has(shard_id(1))
        await store.put(shard_id(1), b"x")
        assert await store.has(shard_id(1))
        assert not await store.has(shard_id(2))

    async def test_list_is_sorted(self, store: ShardStore) -> None:
        assert await store.list() == []
        ids = [shard_id(n) for n in range(20)]
        assert ids != sorted(ids)
        for sid in ids:
            await store.put(sid, sid)
        assert await store.list() == sorted(ids)

    async def test_list_includes_ids_sharing_a_prefix(self, store: ShardStore) -> None:
        ids = [bytes([0xAB, n]) + bytes(30) for n in (3, 1, 2)]
        for sid in ids:
            await store.put(sid, b"x")
        assert await store.list() == sorted(ids)

    async def test_delete(self, store: ShardStore) -> None:
        await store.put(shard_id(1), b"one")
        await store.put(shard_id(2), b"two")
        await store.delete(shard_id(1))
        assert not await store.has(shard_id(1))
        assert await store.list() == [shard_id(2)]
        with pytest.raises(ShardNotFoundError):
            await store.get(shard_id(1))
        assert await store.get(shard_id(2)) == b"two"

    async def test_delete_absent_is_fine(self, store: ShardStore) -> None:
        await store.delete(shard_id(1))
        await store.put(shard_id(2), b"two")
        await store.delete(shard_id(1))
        await store.delete(shard_id(2))
        await store.delete(shard_id(2))
        assert await store.list() == []

    # -- audits --

    async def test_audit_answers_verify_against_the_root(self, store: ShardStore) -> None:
        data = os.urandom(5 * 1024 + 100)
        root = merkle.merkle_root(data, 1024)
        await store.put(shard_id(1), data, ShardRoot(1024, root))
        answer = await store.audit(shard_id(1), b"nonce-" * 4, (5, 0, 3), 1024)
        assert answer.nonce == b"nonce-" * 4
        assert answer.blocks == (data[5120:], data[:1024], data[3072:4096])
        for index, block, proof in zip((5, 0, 3), answer.blocks, answer.proofs, strict=True):
            merkle.verify_block(root, index=index, leaf_count=6, block=block, proof=proof)

    async def test_audit_of_an_empty_shard(self, store: ShardStore) -> None:
        await store.put(shard_id(1), b"", ShardRoot(1024, merkle.merkle_root(b"", 1024)))
        answer = await store.audit(shard_id(1), bytes(16), (0,), 1024)
        assert (answer.blocks, answer.proofs) == ((b"",), ((),))

    async def test_audit_of_an_absent_shard_raises(self, store: ShardStore) -> None:
        await store.put(shard_id(2), b"other")
        with pytest.raises(ShardNotFoundError):
            await store.audit(shard_id(1), bytes(16), (0,), 1024)

    async def test_audit_past_the_last_block_is_refused(self, store: ShardStore) -> None:
        data = os.urandom(3 * 1024)
        await store.put(shard_id(1), data, ShardRoot(1024, merkle.merkle_root(data, 1024)))
        for indices in [(3,), (0, 7), tuple(range(MAX_AUDIT_BLOCKS + 1))]:
            with pytest.raises(StoreError) as caught:
                await store.audit(shard_id(1), bytes(16), indices, 1024)
            assert not isinstance(caught.value, ShardNotFoundError)
        assert len((await store.audit(shard_id(1), bytes(16), (2,), 1024)).blocks) == 1

    # -- root record --

    async def test_root_absent_is_none(self, store: ShardStore) -> None:
        assert await store.get_root() is None

    async def test_root_replace(self, store: ShardStore) -> None:
        await store.put_root(b"root v1, rather long")
        assert await store.get_root() == b"root v1, rather long"
        await store.put_root(b"root v2")
        assert await store.get_root() == b"root v2"
        await store.put_root(b"")
        assert await store.get_root() == b""

    async def test_root_is_not_a_shard(self, store: ShardStore) -> None:
        await store.put_root(b"root")
        assert await store.list() == []

    # -- accounting --

    async def test_usage_accounting(self, store: ShardStore) -> None:
        assert await store.usage() == 0
        await store.put(shard_id(1), b"a" * 100)
        await store.put(shard_id(2), b"b" * 50)
        assert await store.usage() == 150
        await store.put(shard_id(1), b"a" * 100)  # idempotent: not counted twice
        assert await store.usage() == 150
        await store.put_root(b"r" * 10)
        assert await store.usage() == 160
        await store.put_root(b"r" * 4)
        assert await store.usage() == 154
        await store.delete(shard_id(1))
        assert await store.usage() == 54
        await store.delete(shard_id(1))
        assert await store.usage() == 54

    # -- scale --

    async def test_space_is_the_usage_and_an_offer_above_it(self, store: ShardStore) -> None:
        empty = await store.space()
        assert empty.used == 0
        assert empty.offered is None or empty.offered >= 0
        await store.put(shard_id(1), b"x" * 100)
        await store.put_root(b"r" * 10)
        space = await store.space()
        assert space.used == await store.usage() == 110
        if space.offered is None:
            assert space.room is None
        else:
            assert space.offered >= space.used
            assert space.room == space.offered - space.used
        await store.delete(shard_id(1))
        assert (await store.space()).used == 10

    async def test_many_concurrent_puts_all_land(self, store: ShardStore) -> None:
        ids = [shard_id(n) for n in range(64)]
        async with trio.open_nursery() as nursery:
            for sid in ids:
                nursery.start_soon(store.put, sid, sid * 3)
        assert await store.list() == sorted(ids)
        for sid in ids:
            assert await store.get(sid) == sid * 3
        assert await store.usage() == 64 * 96

    async def test_concurrent_identical_puts_of_one_id(self, store: ShardStore) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(store.put, shard_id(1), b"same")
        assert await store.list() == [shard_id(1)]
        assert await store.get(shard_id(1)) == b"same"

    async def test_concurrent_conflicting_puts_have_one_winner(self, store: ShardStore) -> None:
        winners: list[bytes] = []

        async def attempt(content: bytes) -> None:
            try:
                await store.put(shard_id(1), content)
            except StoreError:
                return
            winners.append(content)

        async with trio.open_nursery() as nursery:
            for n in range(8):
                nursery.start_soon(attempt, b"content %d" % n)
        assert len(winners) == 1
        assert await store.get(shard_id(1)) == winners[0]

    async def test_large_shard_round_trip(self, store: ShardStore) -> None:
        data = os.urandom(8 * MiB)
        await store.put(shard_id(1), data)
        assert await store.get(shard_id(1)) == data
        assert await store.get(shard_id(1), 5 * MiB, 1000) == data[5 * MiB : 5 * MiB + 1000]
        assert await store.usage() == 8 * MiB
