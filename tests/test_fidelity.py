"""What a restore keeps beyond bytes: extended attributes, POSIX ACLs, fifos,
devices and holes, through the engine and through the command line."""

from __future__ import annotations

import errno
import os
import stat
import struct
import threading
from pathlib import Path

import pytest

from p2pbackup.app import operations
from p2pbackup.app.home import Home
from p2pbackup.engine import lister, snapshots
from p2pbackup.engine.backup import Backup
from p2pbackup.engine.restore import Restorer, RestoreSummary
from p2pbackup.engine.treediff import diff_trees
from p2pbackup.model import NodeKind

from .cli_helpers import make_world
from .engine_helpers import SMALL, make_setup, restored_path

ROOT = os.geteuid() == 0
#: /dev/null's device number: a character device every Linux has.
NULL_DEVICE = os.makedev(1, 3)
SPARSE_SIZE = 64 << 20
#: Where the sparse file holds data; everything else is a hole.
SPARSE_ISLANDS = (
    (0, b"head" * 1024),
    (SPARSE_SIZE // 2, b"middle" * 4096),
    (SPARSE_SIZE - 5, b"tail!"),
)


def posix_acl(*, user: int, perms: int) -> bytes:
    """A ``system.posix_acl_access`` value (the kernel's xattr layout, version 2):
    the owner rw-, one named user with ``perms``, the group r--, mask r--, others ---."""
    undefined = 0xFFFFFFFF
    entries = [(0x01, 6, undefined), (0x02, perms, user), (0x04, 4, undefined)]
    entries += [(0x10, 4, undefined), (0x20, 0, undefined)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def make_fidelity_tree(root: Path) -> Path:
    """Entries whose metadata a plain copy loses."""
    root.mkdir(parents=True)
    tagged = root / "tagged.txt"
    tagged.write_text("keep my attributes\n")
    os.setxattr(tagged, "user.colour", b"red")
    os.setxattr(tagged, "user.binary", bytes(range(256)))
    os.setxattr(tagged, "user.empty", b"")
    shared = root / "shared.txt"
    shared.write_text("one named user may read this\n")
    os.setxattr(shared, "system.posix_acl_access", posix_acl(user=1234, perms=4))
    folder = root / "folder"
    folder.mkdir()
    os.setxattr(folder, "user.project", b"p2pbackup")
    os.setxattr(folder, "system.posix_acl_default", posix_acl(user=1234, perms=5))
    readonly = folder / "readonly.txt"
    readonly.write_text("read only, with an attribute\n")
    os.setxattr(readonly, "user.note", b"set before the mode")
    readonly.chmod(0o444)
    # (Linux allows user.* attributes on files and directories only.)
    os.mkfifo(root / "pipe")
    os.chmod(root / "pipe", 0o620)
    if ROOT:
        os.mknod(root / "null", stat.S_IFCHR | 0o666, NULL_DEVICE)
    sparse = root / "sparse.img"
    with open(sparse, "wb") as f:
        f.truncate(SPARSE_SIZE)
        for offset, data in SPARSE_ISLANDS:
            f.seek(offset)
            f.write(data)
    (root / "zeros.bin").write_bytes(bytes(10_000))  # one chunk, all zeros
    os.symlink("tagged.txt", root / "link")
    return root


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def check_restored(source: Path, restored: Path, *, chunk_max: int) -> None:
    assert diff_trees(source, restored) == []
    assert os.getxattr(restored / "tagged.txt", "user.binary") == bytes(range(256))
    assert "system.posix_acl_access" in os.listxattr(restored / "shared.txt")
    assert stat.S_ISFIFO(os.lstat(restored / "pipe").st_mode)
    if ROOT:
        assert os.lstat(restored / "null").st_rdev == NULL_DEVICE
    sparse = restored / "sparse.img"
    with open(sparse, "rb") as f:
        for offset, data in SPARSE_ISLANDS:
            f.seek(offset)
            assert f.read(len(data)) == data
    # The holes stay holes: what is allocated is at most the chunks holding
    # the islands, not 64 MiB.
    assert os.path.getsize(sparse) == SPARSE_SIZE
    assert len(SPARSE_ISLANDS) * chunk_max <= SPARSE_SIZE // 4
    assert allocated(sparse) <= len(SPARSE_ISLANDS) * chunk_max, allocated(sparse)
    assert allocated(restored / "zeros.bin") == 0


async def _backup_and_restore(tmp_path: Path, source: Path) -> tuple[Home, RestoreSummary]:
    setup = await make_setup(tmp_path)
    async with operations.open_repository(setup.home) as repo:
        await Backup(repo).run([source])
    async with operations.open_repository(setup.home, access="read") as repo:
        _, snap = snapshots.resolve(repo.index, "latest")
        summary = await Restorer(repo, tmp_path / "out").run(snap)
    return setup.home, summary


async def test_attributes_acls_fifos_devices_and_holes_come_back(tmp_path: Path) -> None:
    source = make_fidelity_tree(tmp_path / "src")
    home, summary = await _backup_and_restore(tmp_path, source)
    assert summary.ok, summary.lines()
    assert summary.incomplete_metadata == []
    assert summary.specials == (2 if ROOT else 1)
    check_restored(source, restored_path(tmp_path / "out", source), chunk_max=SMALL.chunk_max)
    async with operations.open_repository(home, access="read") as repo:
        _, snap = snapshots.resolve(repo.index, "latest")
        pipe = await snapshots.find_node(repo, snap, os.fsencode(source / "pipe"))
        tagged = await snapshots.find_node(repo, snap, os.fsencode(source / "tagged.txt"))
    assert pipe is not None and pipe.kind is NodeKind.FIFO
    assert tagged is not None and dict(tagged.xattrs)[b"user.colour"] == b"red"


@pytest.mark.parametrize("by_lister", [True, False], ids=["lister", "thread"])
async def test_the_walk_reads_attributes_with_the_listings_off_its_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, by_lister: bool
) -> None:
    source = make_fidelity_tree(tmp_path / "src")
    read_on: dict[bytes, bool] = {}
    real = os.listxattr

    def listxattr(path: bytes, *, follow_symlinks: bool = True) -> list[str]:
        read_on[os.fsencode(path)] = threading.current_thread() is threading.main_thread()
        return real(path, follow_symlinks=follow_symlinks)

    setup = await make_setup(tmp_path)
    if not by_lister:
        monkeypatch.setattr(lister, "LISTER_COMMAND", None)
    with monkeypatch.context() as patched:
        patched.setattr(os, "listxattr", listxattr)
        async with operations.open_repository(setup.home) as repo:
            await Backup(repo).run([source])
    top = os.fsencode(source)
    # The target and the directories above it are not listed: the walk
    # reads theirs itself. Every entry below is read once, beside its
    # listing: by the lister process, or else by the walk ahead's thread.
    assert {path for path, main in read_on.items() if main} == {
        top,
        *(os.fsencode(p) for p in source.parents if p != Path("/")),
    }
    below = {path for path in read_on if path.startswith(top + b"/")}
    if by_lister:
        assert below == set()
    else:
        assert os.fsencode(source / "folder" / "readonly.txt") in below
        assert len(below) == sum(len(dirs) + len(files) for _, dirs, files in os.walk(source))
    async with operations.open_repository(setup.home, access="read") as repo:
        _, snap = snapshots.resolve(repo.index, "latest")
        summary = await Restorer(repo, tmp_path / "out").run(snap)
    assert summary.ok, summary.lines()
    check_restored(source, restored_path(tmp_path / "out", source), chunk_max=SMALL.chunk_max)


async def test_an_attribute_the_target_refuses_is_named_and_the_rest_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = make_fidelity_tree(tmp_path / "src")
    real_setxattr = os.setxattr

    def refusing(target: object, name: str | bytes, *args: object, **kwargs: object) -> None:
        if os.fsencode(name) == b"user.colour":
            raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
        real_setxattr(target, name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "setxattr", refusing)
    _, summary = await _backup_and_restore(tmp_path, source)
    restored = restored_path(tmp_path / "out", source)
    assert summary.ok, summary.lines()
    [(path, reason)] = summary.incomplete_metadata
    assert path.endswith("/tagged.txt") and reason == "user.colour (Operation not supported)"
    assert any("restored without some extended attributes" in line for line in summary.lines())
    assert os.getxattr(restored / "tagged.txt", "user.binary") == bytes(range(256))
    assert (restored / "tagged.txt").read_text() == "keep my attributes\n"


def test_the_command_line_round_trip_keeps_them(tmp_path: Path) -> None:
    world = make_world(tmp_path / "world", k=2, n=4)
    source = make_fidelity_tree(tmp_path / "src")
    world.backup(source)
    listing = world.ok("ls", "latest", source).lines
    assert any(line.startswith("prw--w----") and line.endswith("/pipe") for line in listing)
    target = tmp_path / "out"
    out = world.ok("restore", "latest", "--target", target).lines
    assert any(s.startswith("restored ") and "fifos and devices" in s for s in out), out
    chunk_max = operations.default_config(2, 4).chunk_max
    check_restored(source, target / str(source).lstrip("/"), chunk_max=chunk_max)
