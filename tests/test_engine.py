"""The backup engine end to end, in process, on folder peers."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

from p2pbackup.app import operations
from p2pbackup.app.home import Home
from p2pbackup.core import blobs, formats
from p2pbackup.engine import snapshots
from p2pbackup.engine.backup import Backup
from p2pbackup.engine.check import check
from p2pbackup.engine.index import BlobLocation, Index, ProbeCounts
from p2pbackup.engine.prune import MIN_SMALL_PACKS, prune
from p2pbackup.engine.restore import Restorer
from p2pbackup.engine.treediff import diff_trees
from p2pbackup.errors import IntegrityError, RecoveryKeyError, UsageError
from p2pbackup.model import BlobType, NodeKind
from p2pbackup.stores.folder import FolderShardStore, read_folder_peer_id
from p2pbackup.stores.shardstore import ShardRoot, Space

from .engine_helpers import make_setup, make_tree, restored_path, shard_files


async def _backup(home: Home, *paths: Path) -> bytes:
    async with operations.open_repository(home) as repo:
        summary = await Backup(repo).run(list(paths))
    return summary.snapshot_id


async def _restore(home: Home, target: Path, *, only: bytes | None = None, overwrite: bool = False):
    async with operations.open_repository(home) as repo:
        _, snap = snapshots.resolve(repo.index, "latest")
        return await Restorer(repo, target, overwrite=overwrite).run(snap, only)


async def test_round_trip_is_exact(tmp_path: Path) -> None:
    setup = await make_setup(tmp_path)
    source = make_tree(tmp_path / "src")
    await _backup(setup.home, source)
    summary = await _restore(setup.home, tmp_path / "out")
    assert summary.ok, summary.lines()
    restored = restored_path(tmp_path / "out", source)
    assert diff_trees(source, restored) == []
    # Hard links come back as hard links, the odd name as the same bytes.
    assert os.stat(restored / "hard.txt").st_ino == os.stat(restored / "docs" / "a.txt").st_ino
    assert os.path.exists(os.path.join(os.fsencode(restored), b"\xff\xfename-not-utf8"))
    assert os.path.getsize(restored / "empty.txt") == 0


async def test_every_shard_of_a_pack_is_on_a_different_peer(tmp_path: Path) -> None:
    setup = await make_setup(tmp_path, peers=8)
    await _backup(setup.home, make_tree(tmp_path / "src"))
    async with operations.open_repository(setup.home) as repo:
        pack_ids = repo.index.pack_ids()
        assert len(pack_ids) > 3
        for pack_id in pack_ids:
            record = repo.index.pack(pack_id)
            assert record is not None
            peers = [s.peer_id for s in record.shards]
            assert len(peers) == record.n == len(set(peers))
    # All 8 peers are used across packs.
    assert all(shard_files(p) for p in setup.peers)


async def test_peers_see_no_plaintext_or_names(tmp_path: Path) -> None:
    setup = await make_setup(tmp_path)
    source = tmp_path / "src"
    source.mkdir()
    (source / "secret-name.txt").write_bytes(b"confidential words " * 5000)
    await _backup(setup.home, source)
    for peer in setup.peers:
        for path in peer.rglob("*"):
            assert "secret-name" not in path.name
            if path.is_file():
                data = path.read_bytes()
                assert b"confidential" not in data and b"secret-name" not in data


async def test_restore_survives_n_minus_k_lost_or_corrupt_peers(tmp_path: Path) -> None:
    setup = await make_setup(tmp_path)  # 3-of-6
    source = make_tree(tmp_path / "src")
    await _backup(setup.home, source)
    shutil.rmtree(setup.peers[0])
    for shard in shard_files(setup.peers[1]):
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0x55  # one flipped bit in the shard data
        shard.write_bytes(bytes(data))
    for shard in shard_files(setup.peers[2])[::2]:
        shard.unlink()
    summary = await _restore(setup.home, tmp_path / "out")
    assert summary.ok, summary.lines()
    assert diff_trees(source, restored_path(tmp_path / "out", source)) == []


async def test_pack_below_k_restores_the_rest_and_names_the_lost_files(tmp_path: Path) -> None:
    setup = await make_setup(tmp_path)
    source = make_tree(tmp_path / "src")
    (source / "more").mkdir()
    for i in range(12):  # enough data that several packs survive
        (source / "more" / f"f{i}.bin").write_bytes(os.urandom(120_000))
    await _backup(setup.home, source)
    async with operations.open_repository(setup.home) as repo:
        _, snap = snapshots.resolve(repo.index, "latest")
        found = [n async for path, n in snapshots.walk(repo, snap) if path.endswith(b"/b.bin")]
        (big,) = found
        # Destroy 4 of the 6 shards of the pack that holds b.bin's first chunk.
        location = repo.index.blob_locations(big.content[0])[0]
        record = repo.index.pack(location.pack_id)
        assert record is not None
        assert all(b.type == BlobType.DATA for b in record.blobs), (
            "test wants a pack of data chunks only"
        )
        for shard in record.shards[:4]:
            peer_dir = next(
                p
                for p in setup.peers
                if shard.peer_id in (p / "p2pbackup-peer" / "PEER").read_text()
            )
            for f in shard_files(peer_dir):
                if f.name == formats.shard_id(record.pack_id, shard.index).hex():
                    f.unlink()
        lost_blobs = {b.blob_id for b in record.blobs}
    summary = await _restore(setup.home, tmp_path / "out")
    assert not summary.ok
    restored = restored_path(tmp_path / "out", source)
    expected_lost = set()
    async with operations.open_repository(setup.home) as repo:
        async for path, node in snapshots.walk(repo, snap):
            if lost_blobs & set(node.content):
                expected_lost.add(os.fsdecode(path))
    shown = {u.split(str(tmp_path / "out"))[-1] for u in summary.unrecoverable}
    assert {p.split("/src/", 1)[1] for p in shown} == {
        p.split("/src/", 1)[1] for p in expected_lost
    }
    assert "docs/deep/deeper/b.bin" in {p.split("/src/", 1)[1] for p in shown}
    # Nothing half-written under a final name, and everything else is exact.
    assert not (restored / "docs" / "deep" / "deeper" / "b.bin").exists()
    assert not [p for p in restored.rglob(".p2pbackup-*")]
    lost_rel = {p.split("/src/", 1)[1] for p in expected_lost}
    survivors = [
        p
        for p in source.rglob("*")
        if p.is_file() and not p.is_symlink() and str(p.relative_to(source)) not in lost_rel
    ]
    assert len(survivors) >= 8
    for path in survivors:
        rel = path.relative_to(source)
        assert (restored / rel).read_bytes() == path.read_bytes()
    for rel_lost in lost_rel:
        assert not (restored / rel_lost).exists()


async def test_second_backup_reads_and_uploads_nearly_nothing(tmp_path: Path) -> None:
    setup = await make_setup(tmp_path)
    source = make_tree(tmp_path / "src")
    async with operations.open_repository(setup.home) as repo:
        first = await Backup(repo).run([source])
        second = await Backup(repo).run([source])
    assert first.files_new >= 7 and first.bytes_new > 700_000
    assert second.files_unchanged == first.files_new + first.files_changed + first.files_unchanged
    assert second.bytes_read == 0 and second.bytes_new == 0
    # Only the (unchanged) trees and the new snapshot: a tiny pack or two.
    assert second.bytes_stored < first.bytes_stored / 10
    # The copy of random.bin was deduplicated inside the first backup.
    assert first.bytes_deduplicated >= 150_000


async def test_a_backup_proves_only_the_trees_it_stores_decode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = await make_setup(tmp_path)
    source = make_tree(tmp_path / "src")
    decoded: list[bytes] = []
    real_decode = formats.decode_tree

    def decode_tree(data: bytes) -> formats.Tree:
        decoded.append(bytes(data))
        return real_decode(data)

    monkeypatch.setattr(formats, "decode_tree", decode_tree)
    async with operations.open_repository(setup.home) as repo:
        await Backup(repo).run([source])
        first = set(repo.index.blob_locations_of_type(BlobType.TREE))
        assert {blobs.blob_id(repo.keyring.dedup_key, d) for d in decoded} == first
        (source / "docs" / "deep" / "c.txt").write_text("new\n")
        decoded.clear()
        await Backup(repo).run([source])
        stored = set(repo.index.blob_locations_of_type(BlobType.TREE)) - first
        proved = [blobs.blob_id(repo.keyring.dedup_key, d) for d in decoded]
    # deep, docs, src and the directories above it are new; the others
    # (deeper, empty-dir) are re-encoded but not decoded again.
    assert len(stored) >= 4
    assert sorted(proved) == sorted(stored)


async def test_a_restore_looks_up_every_tree_in_one_query(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = await make_setup(tmp_path)
    source = make_tree(tmp_path / "src")
    await _backup(setup.home, source)
    asked: list[bytes] = []
    real = Index.blob_locations

    def blob_locations(index: Index, blob_id: bytes) -> list[BlobLocation]:
        asked.append(blob_id)
        return real(index, blob_id)

    monkeypatch.setattr(Index, "blob_locations", blob_locations)
    summary = await _restore(setup.home, tmp_path / "out")
    assert summary.ok, summary.lines()
    assert diff_trees(source, restored_path(tmp_path / "out", source)) == []
    assert asked == []


async def test_a_blob_whose_known_location_fails_is_read_where_the_index_says(
    tmp_path: Path,
) -> None:
    setup = await make_setup(tmp_path)
    await _backup(setup.home, make_tree(tmp_path / "src"))
    async with operations.open_repository(setup.home) as repo:
        _, snap = snapshots.resolve(repo.index, "latest")
        (real,) = repo.index.blob_locations(snap.tree)
        gone = BlobLocation(bytes(32), real.entry)  # a pack the index never had
        tree = formats.decode_tree(await repo.load_blob(snap.tree, BlobType.TREE, known=gone))
        assert tree.nodes
        with pytest.raises(IntegrityError, match="is not in the index"):
            await repo.load_blob(bytes(32), BlobType.TREE)


async def test_changed_content_is_backed_up_and_old_snapshot_still_restores(tmp_path: Path) -> None:
    setup = await make_setup(tmp_path)
    source = make_tree(tmp_path / "src")
    old = (source / "docs" / "a.txt").read_bytes()
    first = await _backup(setup.home, source)
    (source / "docs" / "a.txt").write_text("changed\n")
    await _backup(setup.home, source)
    async with operations.open_repository(setup.home) as repo:
        _, snap = snapshots.resolve(repo.index, first.hex()[:10])
        await Restorer(repo, tmp_path / "old").run(snap)
    assert (restored_path(tmp_path / "old", source) / "docs" / "a.txt").read_bytes() == old
    await _restore(setup.home, tmp_path / "new")
    assert (restored_path(tmp_path / "new", source) / "docs" / "a.txt").read_text() == "changed\n"


async def test_restore_into_non_empty_target_lists_conflicts(tmp_path: Path) -> None:
    setup = await make_setup(tmp_path)
    source = make_tree(tmp_path / "src")
    await _backup(setup.home, source)
    target = tmp_path / "out"
    restored = restored_path(target, source)
    (restored / "docs").mkdir(parents=True)
    (restored / "docs" / "a.txt").write_text("local edit, must survive\n")
    (restored / "docs" / "random.bin").write_bytes((source / "docs" / "random.bin").read_bytes())
    summary = await _restore(setup.home, target)
    assert [c.split("/src/")[1] for c in summary.conflicts] == ["docs/a.txt"]
    assert (restored / "docs" / "a.txt").read_text() == "local edit, must survive\n"
    assert summary.identical >= 1
    assert (restored / "docs" / "copy.bin").read_bytes() == (
        source / "docs" / "copy.bin"
    ).read_bytes()
    summary = await _restore(setup.home, target, overwrite=True)
    assert summary.ok, summary.lines()
    assert diff_trees(source, restored) == []


async def test_restore_one_path(tmp_path: Path) -> None:
    setup = await make_setup(tmp_path)
    source = make_tree(tmp_path / "src")
    await _backup(setup.home, source)
    only = os.fsencode(source / "docs" / "deep")
    summary = await _restore(setup.home, tmp_path / "out", only=only)
    assert summary.ok
    restored = restored_path(tmp_path / "out", source)
    assert (restored / "docs" / "deep" / "deeper" / "b.bin").read_bytes() == (
        source / "docs" / "deep" / "deeper" / "b.bin"
    ).read_bytes()
    assert not (restored / "docs" / "a.txt").exists()
    with pytest.raises(UsageError, match="not in this snapshot"):
        await _restore(setup.home, tmp_path / "out2", only=b"/no/such/path")


async def test_recover_with_home_deleted(tmp_path: Path) -> None:
    setup = await make_setup(tmp_path)
    source = make_tree(tmp_path / "src")
    await _backup(setup.home, source)
    (source / "new.txt").write_text("second snapshot\n")
    await _backup(setup.home, source)
    shutil.rmtree(setup.home.path)
    shutil.rmtree(setup.peers[5])  # and a peer is gone too
    home = Home(tmp_path / "new-home")
    summary = await operations.recover(home, setup.recovery_key, [setup.peers[2]])
    assert summary.snapshots == 2
    assert summary.peers_known == 6 and summary.peers_reached == 5
    assert summary.packs == summary.packs_restorable > 0
    assert oct(home.secret_path.stat().st_mode & 0o777) == "0o600"
    result = await _restore(home, tmp_path / "out")
    assert result.ok, result.lines()
    assert diff_trees(source, restored_path(tmp_path / "out", source)) == []


async def test_recover_counts_what_the_peers_hold_now(tmp_path: Path) -> None:
    setup = await make_setup(tmp_path)
    await _backup(setup.home, make_tree(tmp_path / "src"))
    index = Index(setup.home.index_path)
    try:
        # A pack of file contents only: losing the pack holding a snapshot
        # or tree makes recover refuse (without --partial) instead of count.
        records = [index.pack(pack_id) for pack_id in index.pack_ids(is_index=False)]
    finally:
        index.close()
    record = next(
        r for r in records if r is not None and all(b.type == BlobType.DATA for b in r.blobs)
    )
    lost = record.pack_id
    # One data pack loses n - k + 1 shards: one short of restorable.
    doomed = {
        formats.shard_id(lost, s.index).hex() for s in record.shards[: record.n - record.k + 1]
    }
    removed = [
        path
        for peer in setup.peers
        for path in shard_files(peer)
        if any(name in path.name for name in doomed)
    ]
    assert len(removed) == len(doomed)
    for path in removed:
        path.unlink()
    shutil.rmtree(setup.home.path)
    summary = await operations.recover(
        Home(tmp_path / "new-home"), setup.recovery_key, [setup.peers[0]]
    )
    assert summary.peers_reached == 6
    assert summary.packs_restorable == summary.packs - 1


async def test_recover_rejects_a_typo_and_names_the_group(tmp_path: Path) -> None:
    setup = await make_setup(tmp_path)
    groups = setup.recovery_key.split("-")
    wrong = groups[2][0]
    replacement = "A" if wrong != "A" else "B"
    groups[2] = replacement + groups[2][1:]
    with pytest.raises(RecoveryKeyError) as info:
        await operations.recover(Home(tmp_path / "h2"), "-".join(groups), setup.peers)
    assert info.value.group == 3
    assert not (tmp_path / "h2").exists()


async def test_recover_with_another_users_key_finds_nothing(tmp_path: Path) -> None:
    setup = await make_setup(tmp_path)
    await _backup(setup.home, make_tree(tmp_path / "src"))
    other = Home(tmp_path / "other")
    other_key = operations.init_home(other, operations.default_config())
    with pytest.raises(UsageError, match="no root record"):
        await operations.recover(Home(tmp_path / "h3"), other_key, setup.peers)
    assert not (tmp_path / "h3" / "HOME").exists()


async def test_forget_and_prune_free_space_and_keep_live_data(tmp_path: Path) -> None:
    setup = await make_setup(tmp_path)
    source = make_tree(tmp_path / "src")
    first = await _backup(setup.home, source)
    (source / "docs" / "deep" / "deeper" / "b.bin").write_bytes(os.urandom(400_000))
    await _backup(setup.home, source)
    before = sum(len(shard_files(p)) for p in setup.peers)
    async with operations.open_repository(setup.home) as repo:
        await snapshots.forget(repo, [first.hex()])
        summary = await prune(repo)
        assert summary.packs_deleted + summary.packs_repacked > 0
        result = await check(repo, read_data=True)
        assert result.ok, result.lines()
        assert result.orphan_shards == 0
    after = sum(len(shard_files(p)) for p in setup.peers)
    assert after < before
    restored = await _restore(setup.home, tmp_path / "out")
    assert restored.ok
    assert diff_trees(source, restored_path(tmp_path / "out", source)) == []
    # A new home recovered after the prune sees exactly the one live snapshot.
    shutil.rmtree(setup.home.path)
    home = Home(tmp_path / "h2")
    summary2 = await operations.recover(home, setup.recovery_key, [setup.peers[0]])
    assert summary2.snapshots == 1 and not summary2.problems


async def test_prune_gathers_the_small_packs_of_backups_that_changed_little(
    tmp_path: Path,
) -> None:
    setup = await make_setup(tmp_path)
    source = make_tree(tmp_path / "src")
    note = source / "note.txt"
    kept: list[bytes] = []
    for day in range(12):
        note.write_text(f"day {day}\n" * 50)
        kept.append(await _backup(setup.home, source))
    async with operations.open_repository(setup.home) as repo:
        before = list(repo.index.pack_ids(is_index=False))
        summary = await prune(repo)
        after = list(repo.index.pack_ids(is_index=False))
        # Nothing was forgotten: every pack was live, the small ones gathered.
        assert summary.packs_deleted == 0
        assert summary.packs_repacked >= MIN_SMALL_PACKS
        assert len(after) == len(before) - summary.packs_repacked + summary.packs_written
        assert len(after) < len(before) - MIN_SMALL_PACKS // 2
        result = await check(repo, read_data=True)
        assert result.ok, result.lines()
        assert result.orphan_shards == 0
        # A second prune finds too few small packs to gather again.
        assert (await prune(repo)).packs_repacked == 0
    for day, snapshot_id in enumerate(kept):
        target = tmp_path / f"out{day}"
        async with operations.open_repository(setup.home) as repo:
            _, snap = snapshots.resolve(repo.index, snapshot_id.hex())
            assert (await Restorer(repo, target).run(snap, None)).ok
        assert restored_path(target, note).read_text() == f"day {day}\n" * 50


async def test_check_finds_missing_and_corrupt_shards(tmp_path: Path) -> None:
    setup = await make_setup(tmp_path)
    await _backup(setup.home, make_tree(tmp_path / "src"))
    async with operations.open_repository(setup.home) as repo:
        clean = await check(repo, read_data=True)
        assert clean.ok and clean.healthy == clean.packs and clean.blobs_checked > 0
    victim = shard_files(setup.peers[0])[0]
    victim.unlink()
    corrupt = shard_files(setup.peers[1])[0]
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 1
    corrupt.write_bytes(bytes(data))
    async with operations.open_repository(setup.home) as repo:
        quick = await check(repo)
        assert quick.shards_missing == 1 and quick.shards_corrupt == 0
        full = await check(repo, read_data=True)
        assert full.shards_missing == 1 and full.shards_corrupt == 1
        # Still restorable, but lost redundancy is a problem to report.
        assert full.degraded >= 1 and full.unrecoverable == 0 and not full.ok


async def test_backup_refuses_too_few_peers_and_missing_paths(tmp_path: Path) -> None:
    setup = await make_setup(tmp_path, k=1, n=6, peers=2)
    with pytest.raises(UsageError, match=r"at least 3 peers.*2 usable.*add 1 more"):
        await _backup(setup.home, make_tree(tmp_path / "src"))
    with pytest.raises(UsageError, match="path does not exist"):
        await _backup(setup.home, tmp_path / "nope")


async def test_fewer_peers_than_n_adapt_the_code_and_say_so(tmp_path: Path) -> None:
    setup = await make_setup(tmp_path, k=3, n=6, peers=4)
    source = make_tree(tmp_path / "src")
    async with operations.open_repository(setup.home) as repo:
        summary = await Backup(repo).run([source])
        codes = {(repo.index.pack(p).k, repo.index.pack(p).n) for p in repo.index.pack_ids()}
    assert (summary.k, summary.n) == (2, 4)
    assert "2-of-4 shards; fewer peers than the configured 3-of-6" in "\n".join(summary.lines())
    assert codes == {(2, 4)}
    # Two of the four peers lost: every byte still comes back.
    for peer in setup.peers[:2]:
        shutil.rmtree(peer)
    result = await _restore(setup.home, tmp_path / "out")
    assert result.ok, result.lines()
    assert diff_trees(source, restored_path(tmp_path / "out", source)) == []


async def test_sockets_are_skipped_and_listed_and_fifos_kept(tmp_path: Path) -> None:
    setup = await make_setup(tmp_path)
    source = tmp_path / "src"
    source.mkdir()
    (source / "file").write_text("x")
    os.mkfifo(source / "pipe")
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(os.fspath(source / "sock"))
        async with operations.open_repository(setup.home) as repo:
            summary = await Backup(repo).run([source])
    assert [(os.path.basename(p), r) for p, r in summary.skipped] == [
        ("sock", "socket, not backed up")
    ]
    async with operations.open_repository(setup.home, access="read") as repo:
        _, snap = snapshots.resolve(repo.index, "latest")
        pipe = await snapshots.find_node(repo, snap, os.fsencode(source / "pipe"))
    assert pipe is not None and pipe.kind is NodeKind.FIFO


@pytest.mark.parametrize(
    "size",
    [200_000, 3 * 1024 * 1024],
    ids=["small file read whole", "large file read as a stream"],
)
async def test_file_changing_while_read_is_not_stored_inconsistently(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    from p2pbackup.core import blobs

    setup = await make_setup(tmp_path)
    source = tmp_path / "src"
    source.mkdir()
    (source / "stable").write_bytes(b"s" * 100_000)
    growing = source / "growing"
    growing.write_bytes(os.urandom(size))
    real = blobs.blob_id

    def appending(dedup_key, plaintext):  # type: ignore[no-untyped-def]
        # Every chunk hashed means the file grows while it is being read.
        with open(growing, "ab") as f:
            f.write(b"more")
        return real(dedup_key, plaintext)

    monkeypatch.setattr(blobs, "blob_id", appending)
    async with operations.open_repository(setup.home) as repo:
        summary = await Backup(repo).run([source])
        assert [os.path.basename(p) for p, _ in summary.skipped] == ["growing"]
        assert all("changed while it was read" in r for _, r in summary.skipped)
        monkeypatch.setattr(blobs, "blob_id", real)
        good = await Backup(repo).run([source])
        assert good.skipped == []
    result = await _restore(setup.home, tmp_path / "out")
    assert result.ok
    restored = restored_path(tmp_path / "out", source)
    assert (restored / "growing").read_bytes() == growing.read_bytes()


async def test_a_full_peer_is_routed_around(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from p2pbackup.errors import StoreFullError

    setup = await make_setup(tmp_path, peers=7)  # 3-of-6 with one spare
    full = setup.peers[0].resolve()
    real_put = FolderShardStore.put

    refusals: list[Path] = []

    async def put(
        self: FolderShardStore, shard_id: bytes, data: bytes, root: ShardRoot | None = None
    ) -> None:
        if Path(self.root).resolve() == full:
            refusals.append(full)
            raise StoreFullError(f"peer folder {full} is full")
        await real_put(self, shard_id, data, root)

    monkeypatch.setattr(FolderShardStore, "put", put)
    source = make_tree(tmp_path / "src", big=1_500_000)
    async with operations.open_repository(setup.home) as repo:
        summary = await Backup(repo).run([source])
    assert shard_files(setup.peers[0]) == []
    # Remembered as full: later packs do not ask it again (at most one
    # refusal per uploader already on its way).
    assert summary.packs_written >= 6
    assert 1 <= refusals.count(full) <= 2
    full_id = read_folder_peer_id(setup.peers[0])
    assert summary.passed_over == [(full_id, "full", f"peer folder {full} is full")]
    assert (
        f"warning: peer {full_id} is full, its shards went to other peers: "
        f"peer folder {full} is full"
    ) in summary.lines()
    async with operations.open_repository(setup.home) as repo:
        for pack_id in repo.index.pack_ids():
            record = repo.index.pack(pack_id)
            assert record is not None
            assert len({s.peer_id for s in record.shards}) == record.n == 6
        # It answered, if only to refuse: its uptime does not suffer.
        assert repo.index.probe_counts()[full_id] == ProbeCounts(asked=1, answered=1)
    restored = await _restore(setup.home, tmp_path / "out")
    assert restored.ok
    assert diff_trees(source, restored_path(tmp_path / "out", source)) == []


async def test_a_pack_stored_below_its_n_is_reported_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from p2pbackup.errors import StoreError

    setup = await make_setup(tmp_path, peers=6)  # 3-of-6, no spare
    failing = setup.peers[0].resolve()
    real_put = FolderShardStore.put

    async def put(
        self: FolderShardStore, shard_id: bytes, data: bytes, root: ShardRoot | None = None
    ) -> None:
        if Path(self.root).resolve() == failing:
            raise StoreError(f"peer folder {failing}: input/output error")
        await real_put(self, shard_id, data, root)

    monkeypatch.setattr(FolderShardStore, "put", put)
    async with operations.open_repository(setup.home) as repo:
        summary = await Backup(repo).run([make_tree(tmp_path / "src")])
        stored = {
            pack_id: (record.k, record.n, len(record.shards))
            for pack_id in repo.index.pack_ids()
            if (record := repo.index.pack(pack_id)) is not None
        }
    # The packs in flight when it refused got five shards of six; later ones
    # a code that fits the five peers left.
    short = {p.pack_id: (p.k, p.n, p.placed) for p in summary.below_n}
    assert short and set(short.values()) == {(3, 6, 5)}
    assert short == {p: code for p, code in stored.items() if code[2] < code[1]}
    assert {code for code in stored.values() if code[2] == code[1]} <= {(2, 5, 5)}
    assert (summary.k, summary.n, summary.placed_min, summary.spare_min) == (3, 6, 5, 2)
    failing_id = read_folder_peer_id(setup.peers[0])
    assert summary.passed_over == [
        (failing_id, "refused", f"peer folder {failing}: input/output error")
    ]
    lines = summary.lines()
    assert f"warning: peer {failing_id} refused our shards: peer folder {failing}: " in "\n".join(
        lines
    )
    assert lines[-1] == (
        f"warning: {len(short)} packs are stored below their n, on as few as 5 of 6 peers: "
        "the weakest survives 2 more peers lost, not 3"
    )
    assert summary.to_json()["below_n"] == [
        {"pack_id": p.hex(), "k": 3, "n": 6, "placed": 5} for p in short
    ]


async def test_a_peer_without_room_is_passed_over_without_being_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = await make_setup(tmp_path, peers=7)  # 3-of-6 with one spare
    small = setup.peers[0].resolve()
    real_space = FolderShardStore.space
    real_put = FolderShardStore.put
    puts: list[Path] = []

    async def space(self: FolderShardStore) -> Space:
        found = await real_space(self)
        # A friend whose quota leaves 1000 bytes: less than any shard here.
        return Space(found.used, found.used + 1000) if Path(self.root).resolve() == small else found

    async def put(
        self: FolderShardStore, shard_id: bytes, data: bytes, root: ShardRoot | None = None
    ) -> None:
        puts.append(Path(self.root).resolve())
        await real_put(self, shard_id, data, root)

    monkeypatch.setattr(FolderShardStore, "space", space)
    monkeypatch.setattr(FolderShardStore, "put", put)
    async with operations.open_repository(setup.home) as repo:
        summary = await Backup(repo).run([make_tree(tmp_path / "src")])
    assert small not in puts and shard_files(setup.peers[0]) == []
    assert len(set(puts)) == 6  # every other peer has a shard of every pack
    small_id = read_folder_peer_id(setup.peers[0])
    [(peer_id, what, reason)] = summary.passed_over
    assert (peer_id, what) == (small_id, "no room")
    assert reason.startswith("it offers us ") and "no room for a shard of" in reason


async def test_a_missing_peer_is_found_before_the_first_pack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = await make_setup(tmp_path, peers=7)
    gone_id = read_folder_peer_id(setup.peers[0])
    shutil.rmtree(setup.peers[0])
    real_put = FolderShardStore.put
    puts: list[Path] = []

    async def put(
        self: FolderShardStore, shard_id: bytes, data: bytes, root: ShardRoot | None = None
    ) -> None:
        puts.append(Path(self.root))
        await real_put(self, shard_id, data, root)

    monkeypatch.setattr(FolderShardStore, "put", put)
    async with operations.open_repository(setup.home) as repo:
        summary = await Backup(repo).run([make_tree(tmp_path / "src")])
        counts = repo.index.probe_counts()
    # The probe at the start found it gone: no pack waited for it.
    assert setup.peers[0] not in puts
    assert (summary.k, summary.n) == (3, 6)
    assert counts[gone_id] == ProbeCounts(asked=1, answered=0)
    assert all(counts[read_folder_peer_id(p)] == ProbeCounts(1, 1) for p in setup.peers[1:])


async def test_restore_never_writes_through_a_symlink_in_the_target(tmp_path: Path) -> None:
    setup = await make_setup(tmp_path)
    source = make_tree(tmp_path / "src")
    await _backup(setup.home, source)
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "out"
    restored = restored_path(target, source)
    restored.mkdir(parents=True)
    # Someone planted a symlink where the snapshot has a directory.
    (restored / "docs").symlink_to(outside)
    summary = await _restore(setup.home, target)
    assert any(c.endswith("/docs") for c in summary.conflicts)
    assert list(outside.iterdir()) == []
    assert (restored / "run.sh").read_bytes() == (source / "run.sh").read_bytes()


async def test_a_tree_of_small_directories_is_listed_ahead_in_few_thread_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from p2pbackup.core.exclude import ExcludeRules
    from p2pbackup.engine import lister, listing

    # The walk ahead of a backup whose lister process cannot start.
    monkeypatch.setattr(lister, "LISTER_COMMAND", ("/nonexistent/python3", "-m", "x"))
    setup = await make_setup(tmp_path)
    source = tmp_path / "src"
    expected_dirs = 1
    for a in range(4):
        for b in range(4):
            leaf = source / f"d{a}" / f"e{b}"
            leaf.mkdir(parents=True)
            (leaf / "f.txt").write_text(f"{a}/{b}")
            expected_dirs += 1 + (b == 0)
    (source / "d2" / "node_modules" / "deep").mkdir(parents=True)
    (source / "d2" / "node_modules" / "deep" / "x").write_text("left out")
    listed: list[bytes] = []
    calls = 0
    real_ahead, real_dir = listing.list_ahead, listing._list_dir

    def counting_ahead(walk, budget):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return real_ahead(walk, budget)

    def recording_dir(path):  # type: ignore[no-untyped-def]
        listed.append(path)
        return real_dir(path)

    # A small budget, so the walk runs past what was listed ahead and lists again.
    monkeypatch.setattr(listing, "LISTING_BUDGET", 6)
    monkeypatch.setattr(listing, "list_ahead", counting_ahead)
    monkeypatch.setattr(listing, "_list_dir", recording_dir)
    async with operations.open_repository(setup.home) as repo:
        rules = ExcludeRules.from_patterns(["node_modules"])
        summary = await Backup(repo, exclude=rules).run([source])
    assert summary.dirs == expected_dirs
    assert summary.excluded == 1
    # Every directory listed once, the excluded one never; far fewer thread calls.
    assert len(listed) == len(set(listed)) == expected_dirs
    assert not any(b"node_modules" in path for path in listed)
    assert 1 < calls < expected_dirs // 2
    # Without what was left out, the source is what the snapshot holds.
    before = os.stat(source / "d2")
    shutil.rmtree(source / "d2" / "node_modules")
    os.utime(source / "d2", ns=(before.st_atime_ns, before.st_mtime_ns))
    result = await _restore(setup.home, tmp_path / "out")
    assert result.ok
    assert diff_trees(source, restored_path(tmp_path / "out", source)) == []


@pytest.mark.parametrize("by_lister", [True, False], ids=["lister", "thread"])
async def test_a_directory_that_cannot_be_listed_is_skipped_and_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, by_lister: bool
) -> None:
    from p2pbackup.engine import lister, listing

    setup = await make_setup(tmp_path)
    source = tmp_path / "src"
    (source / "open").mkdir(parents=True)
    (source / "open" / "a.txt").write_text("a")
    (source / "locked" / "inner").mkdir(parents=True)
    (source / "locked" / "inner" / "b.txt").write_text("b")
    locked = os.fsencode(source / "locked")
    # Permission bits do not stop root, who may run the tests: the listing
    # of "locked" is refused, in the lister process or in this one.
    if by_lister:
        child = (
            "import errno\n"
            "from p2pbackup.engine import listing\n"
            "real = listing._list_dir\n"
            "def refusing(path):\n"
            f"    if path == {locked!r}:\n"
            "        raise PermissionError(errno.EACCES, 'Permission denied')\n"
            "    return real(path)\n"
            "listing._list_dir = refusing\n"
            "listing.main()\n"
        )
        monkeypatch.setattr(lister, "LISTER_COMMAND", (sys.executable, "-P", "-c", child))
    else:
        real = listing._list_dir

        def refusing(path):  # type: ignore[no-untyped-def]
            if path == locked:
                raise PermissionError(13, "Permission denied")
            return real(path)

        monkeypatch.setattr(lister, "LISTER_COMMAND", None)
        monkeypatch.setattr(listing, "_list_dir", refusing)
    async with operations.open_repository(setup.home) as repo:
        summary = await Backup(repo).run([source])
    assert summary.skipped == [(str(source / "locked"), "cannot list: Permission denied")]
    result = await _restore(setup.home, tmp_path / "out")
    assert result.ok
    restored = restored_path(tmp_path / "out", source)
    assert (restored / "open" / "a.txt").read_text() == "a"
    assert not (restored / "locked").exists()
