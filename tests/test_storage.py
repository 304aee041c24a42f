"""Tests for p2pbackup.stores: the conformance suite for each store, then
what only one store does (capacity; folder layout, atomicity, identity)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from p2pbackup.errors import ShardNotFoundError, StoreError, StoreFullError, StoreRequestError
from p2pbackup.node.shardhost import ShardConflictError
from p2pbackup.stores.folder import (
    PEER_DIR,
    FolderShardStore,
    init_folder_peer,
    read_folder_peer_id,
)
from p2pbackup.stores.memory import MemoryShardStore
from p2pbackup.stores.shardstore import ShardStore, Space, check_range, check_shard_id, conflict
from tests.storage_conformance import ShardStoreConformance, shard_id

OWNER = bytes(range(20))
OTHER_OWNER = bytes(range(1, 21))
HAS_PROC_FD = Path("/proc/self/fd").is_dir()


class TestMemoryShardStore(ShardStoreConformance):
    async def make_store(self, tmp_path: Path) -> ShardStore:
        return MemoryShardStore()


class TestMemoryShardStoreWithCapacity(ShardStoreConformance):
    async def make_store(self, tmp_path: Path) -> ShardStore:
        return MemoryShardStore(capacity=64 * 1024 * 1024)


class TestFolderShardStore(ShardStoreConformance):
    async def make_store(self, tmp_path: Path) -> ShardStore:
        init_folder_peer(tmp_path / "peer")
        return FolderShardStore(tmp_path / "peer", OWNER)


class TestFolderShardStoreWithoutHardLinks(ShardStoreConformance):
    """As on FAT or exFAT disks, where link() fails and a checked rename is used."""

    @pytest.fixture(autouse=True)
    def no_hard_links(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def refuse(*_args: object, **_kwargs: object) -> None:
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))

        monkeypatch.setattr(os, "link", refuse)

    async def make_store(self, tmp_path: Path) -> ShardStore:
        init_folder_peer(tmp_path / "peer")
        return FolderShardStore(tmp_path / "peer", OWNER)


# --- memory capacity ------------------------------------------------------


async def test_a_memory_store_offers_its_capacity() -> None:
    assert await MemoryShardStore().space() == Space(0, None)
    store = MemoryShardStore(capacity=100)
    await store.put(shard_id(1), b"a" * 60)
    assert await store.space() == Space(60, 100)
    assert (await store.space()).room == 40


async def test_a_folder_offers_the_free_space_of_its_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    init_folder_peer(tmp_path / "peer")
    store = FolderShardStore(tmp_path / "peer", OWNER)
    await store.put(shard_id(1), b"a" * 60)

    class Disk:
        f_frsize = 4096
        f_bavail = 10

    monkeypatch.setattr(os, "statvfs", lambda path: Disk)
    assert await store.space() == Space(60, 60 + 40960)


async def test_memory_capacity() -> None:
    store = MemoryShardStore(capacity=100)
    await store.put(shard_id(1), b"a" * 60)
    with pytest.raises(StoreFullError, match="capacity of 100"):
        await store.put(shard_id(2), b"b" * 50)
    assert not await store.has(shard_id(2))
    assert await store.usage() == 60
    await store.put(shard_id(1), b"a" * 60)  # idempotent even when nearly full
    await store.put(shard_id(2), b"b" * 40)
    assert await store.usage() == 100
    with pytest.raises(StoreFullError):
        await store.put(shard_id(3), b"c")
    await store.delete(shard_id(2))
    await store.put(shard_id(3), b"c" * 40)
    assert await store.usage() == 100


async def test_memory_capacity_counts_root_record() -> None:
    store = MemoryShardStore(capacity=100)
    await store.put(shard_id(1), b"a" * 60)
    with pytest.raises(StoreFullError):
        await store.put_root(b"r" * 41)
    assert await store.get_root() is None
    await store.put_root(b"r" * 40)
    # Replacing frees the old record's bytes first.
    await store.put_root(b"R" * 40)
    assert await store.get_root() == b"R" * 40
    assert await store.usage() == 100


# --- folder helpers -------------------------------------------------------


@pytest.fixture
def peer_root(tmp_path: Path) -> Path:
    root = tmp_path / "disk"
    init_folder_peer(root)
    return root


def owner_dir(root: Path, owner: bytes = OWNER) -> Path:
    return root / PEER_DIR / "owners" / owner.hex()


def shard_path(root: Path, sid: bytes, owner: bytes = OWNER) -> Path:
    return owner_dir(root, owner) / "shards" / sid.hex()[:2] / sid.hex()


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def failing_writes_under(
    monkeypatch: pytest.MonkeyPatch, under: Path, error: int
) -> Callable[[], int]:
    """Make os.write on files below ``under`` write half its data, then fail
    with ``error`` on the next call, as a filling disk does. Returns a
    function that counts the failures injected."""
    real_write = os.write
    started: set[int] = set()
    failures = [0]

    def write(fd: int, data: bytes) -> int:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if not target.startswith(str(under)):
            return real_write(fd, data)
        if fd in started or len(data) < 2:
            failures[0] += 1
            raise OSError(error, os.strerror(error))
        started.add(fd)
        return real_write(fd, bytes(data[: len(data) // 2]))

    monkeypatch.setattr(os, "write", write)
    return lambda: failures[0]


# --- folder layout and atomicity ------------------------------------------


async def test_folder_layout(peer_root: Path) -> None:
    store = await FolderShardStore.open(peer_root, OWNER)
    sid = shard_id(1)
    await store.put(sid, b"shard bytes")
    await store.put_root(b"root bytes")
    assert shard_path(peer_root, sid).read_bytes() == b"shard bytes"
    assert (owner_dir(peer_root) / "root").read_bytes() == b"root bytes"
    assert files_under(peer_root) == sorted(
        [peer_root / PEER_DIR / "PEER", shard_path(peer_root, sid), owner_dir(peer_root) / "root"]
    )


async def test_crash_leftover_temp_files_are_ignored_and_collected(peer_root: Path) -> None:
    store = FolderShardStore(peer_root, OWNER)
    sid = shard_id(1)
    await store.put(sid, b"complete")
    # What a crash mid-write leaves: partial temp files beside final names.
    leftovers = [
        shard_path(peer_root, sid).parent / ".tmp-0123456789abcdef",
        owner_dir(peer_root) / ".tmp-fedcba9876543210",
    ]
    for leftover in leftovers:
        leftover.write_bytes(b"partial")
    # Nor is a stray file that is not named like a shard.
    (shard_path(peer_root, sid).parent / (sid.hex()[:2] + "-notes.txt")).write_text("hello")
    assert await store.list() == [sid]
    assert await store.usage() == len(b"complete")
    assert await store.get_root() is None
    # Fresh temp files might be another writer's: the default spares them.
    assert await store.collect_garbage() == 0
    assert all(leftover.exists() for leftover in leftovers)
    assert await store.collect_garbage(older_than=0) == 2
    assert not any(leftover.exists() for leftover in leftovers)
    assert await store.get(sid) == b"complete"


async def test_stale_temp_files_are_removed_before_the_first_write(peer_root: Path) -> None:
    store = FolderShardStore(peer_root, OWNER)
    await store.put(shard_id(1), b"complete")
    prefix_dir = shard_path(peer_root, shard_id(1)).parent
    stale = prefix_dir / ".tmp-aaaaaaaaaaaaaaaa"
    fresh = prefix_dir / ".tmp-bbbbbbbbbbbbbbbb"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    reopened = await FolderShardStore.open(peer_root, OWNER)
    # Reading sweeps nothing (a restore must not pay for it) ...
    assert await reopened.list() == [shard_id(1)]
    assert stale.exists()
    # ... the first write does, sparing temp files that may still be in use.
    await reopened.put(shard_id(2), b"another")
    assert not stale.exists()
    assert fresh.exists()
    assert await reopened.list() == [shard_id(1), shard_id(2)]


async def test_failed_write_leaves_no_partial_shard(
    peer_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await FolderShardStore.open(peer_root, OWNER)

    def broken_fsync(_fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(StoreError, match="Input/output error") as caught:
        await store.put(shard_id(1), b"never durable")
    assert not isinstance(caught.value, StoreFullError)
    monkeypatch.undo()
    assert await store.list() == []
    assert files_under(owner_dir(peer_root)) == []


@pytest.mark.skipif(not HAS_PROC_FD, reason="needs /proc/self/fd to spot the store's files")
@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EDQUOT])
async def test_full_disk_raises_store_full_and_leaves_no_partial_shard(
    peer_root: Path, monkeypatch: pytest.MonkeyPatch, error: int
) -> None:
    store = await FolderShardStore.open(peer_root, OWNER)
    await store.put(shard_id(1), b"already here")
    await store.put_root(b"old root")
    failures = failing_writes_under(monkeypatch, peer_root, error)

    with pytest.raises(StoreFullError, match=re.escape(str(owner_dir(peer_root)))):
        await store.put(shard_id(2), b"x" * 100_000)
    with pytest.raises(StoreFullError):
        await store.put_root(b"new root that does not fit")
    assert failures() == 2
    monkeypatch.undo()

    assert await store.list() == [shard_id(1)]
    assert not shard_path(peer_root, shard_id(2)).exists()
    assert await store.get_root() == b"old root"
    assert files_under(owner_dir(peer_root)) == sorted(
        [shard_path(peer_root, shard_id(1)), owner_dir(peer_root) / "root"]
    )
    # Once space is back the same shard goes in whole.
    await store.put(shard_id(2), b"x" * 100_000)
    assert await store.get(shard_id(2)) == b"x" * 100_000


async def test_unwritable_folder_raises_store_error_naming_path(
    peer_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await FolderShardStore.open(peer_root, OWNER)
    real_open = os.open

    def denied(path: str | Path, flags: int, mode: int = 0o777, **kwargs: object) -> int:
        if flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(StoreError, match="Permission denied") as caught:
        await store.put(shard_id(1), b"data")
    assert str(owner_dir(peer_root)) in str(caught.value)
    assert not isinstance(caught.value, StoreFullError)


async def test_corrupted_shard_is_returned_as_is(peer_root: Path) -> None:
    store = FolderShardStore(peer_root, OWNER)
    await store.put(shard_id(1), b"original")
    shard_path(peer_root, shard_id(1)).write_bytes(b"bit-rot!")
    assert await store.get(shard_id(1)) == b"bit-rot!"
    assert await store.get(shard_id(1), 4, 3) == b"rot"


async def test_shard_files_are_private(peer_root: Path) -> None:
    store = FolderShardStore(peer_root, OWNER)
    await store.put(shard_id(1), b"data")
    assert shard_path(peer_root, shard_id(1)).stat().st_mode & 0o077 == 0


async def test_two_owners_in_one_folder_are_isolated(peer_root: Path) -> None:
    mine = FolderShardStore(peer_root, OWNER)
    theirs = FolderShardStore(peer_root, OTHER_OWNER)
    sid = shard_id(1)
    await mine.put(sid, b"mine")
    await theirs.put(sid, b"theirs, different")  # no conflict across owners
    await mine.put(shard_id(2), b"only mine")
    await mine.put_root(b"my root")

    assert await mine.get(sid) == b"mine"
    assert await theirs.get(sid) == b"theirs, different"
    assert await mine.list() == sorted([sid, shard_id(2)])
    assert await theirs.list() == [sid]
    assert not await theirs.has(shard_id(2))
    assert await theirs.get_root() is None
    assert await mine.usage() == len(b"mine") + len(b"only mine") + len(b"my root")
    assert await theirs.usage() == len(b"theirs, different")
    await theirs.delete(sid)
    assert await mine.get(sid) == b"mine"


async def test_folder_that_vanished_is_an_error_not_an_absence(peer_root: Path) -> None:
    store = await FolderShardStore.open(peer_root, OWNER)
    await store.put(shard_id(1), b"data")
    # An unplugged disk leaves an empty mount point behind.
    shutil.rmtree(peer_root / PEER_DIR)
    with pytest.raises(StoreError, match="has gone") as caught:
        await store.get(shard_id(1))
    assert not isinstance(caught.value, ShardNotFoundError)
    with pytest.raises(StoreError, match="has gone"):
        await store.has(shard_id(1))
    with pytest.raises(StoreError, match="has gone"):
        await store.list()
    with pytest.raises(StoreError, match="has gone"):
        await store.get_root()


# --- folder identity ------------------------------------------------------


def test_peer_id_is_stable_across_reopen(tmp_path: Path) -> None:
    root = tmp_path / "disk"
    peer_id = init_folder_peer(root)
    assert re.fullmatch(r"dir-[0-9a-f]{16}", peer_id)
    assert init_folder_peer(root) == peer_id
    assert read_folder_peer_id(root) == peer_id
    marker = json.loads((root / PEER_DIR / "PEER").read_text())
    assert marker == {"format": "p2pbackup-peer", "version": 1, "peer_id": peer_id}
    # A different folder is a different peer.
    assert init_folder_peer(tmp_path / "other") != peer_id


async def test_store_reopened_on_same_folder_sees_same_data(peer_root: Path) -> None:
    store = FolderShardStore(peer_root, OWNER)
    await store.put(shard_id(1), b"kept")
    await store.put_root(b"root")
    reopened = await FolderShardStore.open(peer_root, OWNER)
    assert await reopened.get(shard_id(1)) == b"kept"
    assert await reopened.get_root() == b"root"


def test_non_peer_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not a p2pbackup peer folder") as caught:
        read_folder_peer_id(tmp_path)
    assert str(tmp_path) in str(caught.value)


def test_missing_folder_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "unmounted"
    with pytest.raises(StoreError, match="does not exist") as caught:
        read_folder_peer_id(missing)
    assert str(missing) in str(caught.value)


def test_init_does_not_create_missing_parents(tmp_path: Path) -> None:
    root = tmp_path / "not-mounted" / "backups"
    with pytest.raises(StoreError) as caught:
        init_folder_peer(root)
    assert str(root) in str(caught.value)
    assert not (tmp_path / "not-mounted").exists()


async def test_store_on_non_peer_folder_refuses_and_writes_nothing(tmp_path: Path) -> None:
    store = FolderShardStore(tmp_path, OWNER)
    with pytest.raises(StoreError, match="not a p2pbackup peer folder"):
        await store.put(shard_id(1), b"data")
    with pytest.raises(StoreError, match="not a p2pbackup peer folder"):
        await store.get_root()
    with pytest.raises(StoreError, match="does not exist"):
        await FolderShardStore.open(tmp_path / "missing", OWNER)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe not json", "not a valid p2pbackup peer marker"),
        (b"[1, 2]", "not a valid p2pbackup peer marker"),
        (b'{"format": "something-else", "version": 1}', "not a valid p2pbackup peer marker"),
        (
            b'{"format": "p2pbackup-peer", "version": 2, "peer_id": "dir-0123456789abcdef"}',
            "version 2",
        ),
        (b'{"format": "p2pbackup-peer", "version": 1, "peer_id": "dir-xyz"}', "bad peer_id"),
        (b'{"format": "p2pbackup-peer", "version": 1}', "bad peer_id"),
    ],
)
def test_malformed_marker_is_refused_and_kept(tmp_path: Path, content: bytes, message: str) -> None:
    marker = tmp_path / PEER_DIR / "PEER"
    marker.parent.mkdir()
    marker.write_bytes(content)
    with pytest.raises(StoreError, match=message):
        read_folder_peer_id(tmp_path)
    with pytest.raises(StoreError, match=message):
        init_folder_peer(tmp_path)
    assert marker.read_bytes() == content


def test_bad_owner_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        FolderShardStore(tmp_path, b"")
    with pytest.raises(ValueError):
        FolderShardStore(tmp_path, b"x" * 65)


# --- the checks every store shares ----------------------------------------


def test_the_shared_checks_raise_the_callers_error() -> None:
    with pytest.raises(ValueError, match="a shard id is 32 bytes, got 31"):
        check_shard_id(bytes(31))
    with pytest.raises(StoreRequestError, match="a shard id is 32 bytes, got str"):
        check_shard_id("0" * 32, StoreRequestError)
    check_shard_id(bytes(32))
    with pytest.raises(StoreRequestError, match="bad shard range: offset -1, length None"):
        check_range(-1, None, StoreRequestError)
    check_range(0, 0)
    error = conflict(bytes(32), "in the vault", ShardConflictError)
    assert isinstance(error, ShardConflictError)
    assert str(error) == (
        f"conflict: another shard is stored under id {'00' * 32} in the vault; "
        "shards are write-once, the stored one was kept"
    )
