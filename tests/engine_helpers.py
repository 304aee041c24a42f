"""Helpers for engine tests: small repositories on folder peers, sample trees."""

from __future__ import annotations

import os
import random
from pathlib import Path

import attrs

from p2pbackup.app import operations
from p2pbackup.app.home import Home
from p2pbackup.model import RepositoryConfig

#: Small chunks and packs, so a few MB of data spans many packs.
SMALL = RepositoryConfig(
    k=3,
    n=6,
    pack_size=256 * 1024,
    chunk_min=16 * 1024,
    chunk_avg=32 * 1024,
    chunk_max=128 * 1024,
    block_size=4096,
)


@attrs.define
class Setup:
    home: Home
    peers: list[Path]
    recovery_key: str


async def make_setup(tmp_path: Path, *, k: int = 3, n: int = 6, peers: int | None = None) -> Setup:
    home = Home(tmp_path / "home")
    config = attrs.evolve(SMALL, k=k, n=n)
    key = operations.init_home(home, config)
    peer_dirs = []
    async with operations.open_repository(home) as repo:
        for i in range(peers if peers is not None else n):
            path = tmp_path / "peers" / f"p{i}"
            path.mkdir(parents=True)
            await operations.add_folder_peer(repo, path)
            peer_dirs.append(path)
    return Setup(home, peer_dirs, key)


def make_tree(root: Path, *, seed: int = 1, big: int = 600_000) -> Path:
    """Files of many kinds, including the awkward ones."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    (root / "docs").mkdir()
    (root / "docs" / "deep" / "deeper").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "docs" / "a.txt").write_text("hello\n" * 1000)
    (root / "docs" / "deep" / "deeper" / "b.bin").write_bytes(rng.randbytes(big))
    (root / "docs" / "random.bin").write_bytes(rng.randbytes(150_000))
    (root / "docs" / "copy.bin").write_bytes((root / "docs" / "random.bin").read_bytes())
    (root / "empty.txt").write_bytes(b"")
    (root / "link").symlink_to("docs/a.txt")
    (root / "dangling").symlink_to("/nonexistent/target")
    os.link(root / "docs" / "a.txt", root / "hard.txt")
    with open(os.path.join(os.fsencode(root), b"\xff\xfename-not-utf8"), "wb") as f:
        f.write(b"odd name\n")
    script = root / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o750)
    os.utime(root / "docs" / "a.txt", ns=(1_000_000_000, 1_234_567_891_234_567_890))
    return root


def shard_files(peer: Path) -> list[Path]:
    return sorted(p for p in peer.rglob("*") if p.is_file() and p.parent.parent.name == "shards")


def restored_path(target: Path, source: Path) -> Path:
    return target / str(source.absolute()).lstrip("/")
