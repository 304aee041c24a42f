"""Helpers for whole-system tests: run the real ``p2pbackup`` command as a process.

Every run goes through :func:`run_cli`, which checks what must hold for any
command, whatever its outcome: no Python traceback on stderr, and no terminal
escape codes or carriage returns (stderr is a pipe here, never a terminal).
:func:`cli_ok` and :func:`cli_error` add the contract of success (exit 0,
nothing on stderr) and of failure (exit != 0, exactly one
``p2pbackup: error: …`` line on stderr).

The children run with ``PYTHONIOENCODING=utf-8`` (strict), as Python does on a
typical UTF-8 desktop locale, so a command that prints a file name that is not
UTF-8 without care fails here as it would for a user.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import attrs

from p2pbackup.app import operations
from p2pbackup.app.home import Home
from p2pbackup.cli import main as cli
from p2pbackup.stores.durable import write_private_file

CLI = [sys.executable, "-m", "p2pbackup.cli"]
KEY_RE = re.compile(r"\b(?:[0-9A-Z]{5}-){13}[0-9A-Z]{5}\b")
SNAPSHOT_ID_RE = re.compile(r"[0-9a-f]{64}")
SHARD_NAME_RE = re.compile(r"[0-9a-f]{64}")
ODD_NAME = b"caf\xe9-\xff.txt"  # Latin-1, not UTF-8


def interruptible() -> None:
    """A child's SIGINT as at a terminal (``preexec_fn``): a suite run in
    the background inherits SIGINT ignored, and Python then never turns it
    into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PBACKUP")}
    env["PYTHONIOENCODING"] = "utf-8"
    env.update(extra)
    return env


@attrs.frozen
class Result:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()

    def __str__(self) -> str:
        return (
            f"p2pbackup {' '.join(self.args)} -> exit {self.returncode}\n"
            f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"
        )


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="surrogateescape")


def run_cli(
    *args: str | os.PathLike[str],
    home: Path | None = None,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    timeout: float = 120,
    cwd: Path | None = None,
) -> Result:
    argv = [os.fspath(a) for a in args]
    if home is not None:
        argv = ["--home", os.fspath(home), *argv]
    proc = subprocess.run(
        [*CLI, *argv],
        input=input,
        stdin=subprocess.DEVNULL if input is None else None,
        capture_output=True,
        env=dict(env) if env is not None else base_env(),
        timeout=timeout,
        cwd=cwd,
    )
    result = Result(tuple(argv), proc.returncode, _decode(proc.stdout), _decode(proc.stderr))
    assert "Traceback" not in result.stderr, str(result)
    assert "\x1b" not in result.stderr and "\r" not in result.stderr, str(result)
    return result


def cli_ok(
    *args: str | os.PathLike[str],
    home: Path | None = None,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    timeout: float = 120,
) -> Result:
    """Run a command that must succeed: exit 0 and nothing at all on stderr."""
    result = run_cli(*args, home=home, env=env, input=input, timeout=timeout)
    assert result.returncode == 0, str(result)
    assert result.stderr == "", str(result)
    return result


def cli_error(
    *args: str | os.PathLike[str],
    home: Path | None = None,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
) -> str:
    """Run a command that must fail; return its one error message (after the prefix)."""
    result = run_cli(*args, home=home, env=env, input=input)
    assert result.returncode != 0, str(result)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, str(result)
    assert lines[0].startswith("p2pbackup: error: "), str(result)
    message = lines[0].removeprefix("p2pbackup: error: ")
    assert message.strip(), str(result)
    return message


def cli_inprocess(*args: str | os.PathLike[str]) -> int:
    """Run the CLI in this process (for setting up cheaply); returns its exit code."""
    return cli.main([os.fspath(a) for a in args])


# -- a home with folder peers ------------------------------------------------------


@attrs.define
class World:
    root: Path
    home: Path
    peers: list[Path]
    key: str
    key_file: Path

    def ok(self, *args: str | os.PathLike[str], input: bytes | None = None) -> Result:
        return cli_ok(*args, home=self.home, input=input)

    def error(self, *args: str | os.PathLike[str], input: bytes | None = None) -> str:
        return cli_error(*args, home=self.home, input=input)

    def run(self, *args: str | os.PathLike[str], input: bytes | None = None) -> Result:
        return run_cli(*args, home=self.home, input=input)

    def backup(self, *paths: Path, tags: Sequence[str] = ()) -> str:
        args: list[str | os.PathLike[str]] = ["backup", *paths]
        for tag in tags:
            args += ["--tag", tag]
        result = self.ok(*args)
        snapshot_id = result.lines[-1]
        assert SNAPSHOT_ID_RE.fullmatch(snapshot_id), str(result)
        return snapshot_id


def make_world(
    root: Path, *, k: int, n: int, peers: int | None = None, pack_size: int | None = None
) -> World:
    """A home with ``peers`` folder peers, set up through the CLI in this process
    (the whole-system tests of ``init`` and ``peer add-dir`` run it as a process).

    ``pack_size`` (which the CLI does not offer) makes packs smaller than the
    default, so a few MB of data span several of them.
    """
    root.mkdir(parents=True, exist_ok=True)
    home = root / "home"
    key_file = root / "recovery-key.txt"
    if pack_size is None:
        assert cli_inprocess("--home", home, "init", "--shards", f"{k}/{n}",
                             "--recovery-key-file", key_file) == 0  # fmt: skip
    else:
        config = attrs.evolve(operations.default_config(k, n), pack_size=pack_size)
        operations.init_home(
            Home(home),
            config,
            deliver_key=lambda key: write_private_file(key_file, (key + "\n").encode()),
        )
    key = key_file.read_text().strip()
    assert KEY_RE.fullmatch(key), key
    peer_dirs = []
    for i in range(n if peers is None else peers):
        peer = root / "peers" / f"peer{i}"
        peer.mkdir(parents=True)
        assert cli_inprocess("--home", home, "peer", "add-dir", peer) == 0
        peer_dirs.append(peer)
    return World(root, home, peer_dirs, key, key_file)


def shard_files(peer: Path) -> list[Path]:
    """Shard files under their final names: PEER/p2pbackup-peer/owners/*/shards/xx/<64 hex>."""
    owners = peer / "p2pbackup-peer" / "owners"
    found = []
    for path in owners.glob("*/shards/*/*"):
        if SHARD_NAME_RE.fullmatch(path.name) and path.name[:2] == path.parent.name:
            found.append(path)
    return sorted(found)


def all_shards(peers: Sequence[Path]) -> set[Path]:
    return {shard for peer in peers for shard in shard_files(peer)}


# -- sample trees and comparing them ------------------------------------------------


def make_source(root: Path, *, seed: int = 1, big: int = 1_500_000) -> Path:
    """A few MB: text, random data, a 0-byte file, an odd name, modes, old mtimes."""
    rng = random.Random(seed)
    (root / "docs" / "deep").mkdir(parents=True)
    (root / "photos").mkdir()
    (root / "empty-dir").mkdir()
    words = [f"word{i}" for i in range(500)]
    for i in range(8):
        text = " ".join(rng.choice(words) for _ in range(rng.randrange(100, 3000)))
        (root / "docs" / f"note{i}.txt").write_text(text)
    (root / "docs" / "deep" / "data.bin").write_bytes(rng.randbytes(300_000))
    (root / "photos" / "big.jpg").write_bytes(rng.randbytes(big))
    (root / "photos" / "small.jpg").write_bytes(rng.randbytes(40_000))
    (root / "empty.txt").write_bytes(b"")
    with open(os.path.join(os.fsencode(root), ODD_NAME), "wb") as f:
        f.write(b"a name that is not UTF-8\n")
    script = root / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o750)
    (root / "docs" / "private.txt").write_text("mine\n")
    (root / "docs" / "private.txt").chmod(0o600)
    (root / "link").symlink_to("docs/note0.txt")
    os.utime(root / "docs" / "note3.txt", ns=(1_000_000_000, 1_234_567_891_234_567_891))
    os.utime(root / "docs" / "deep", ns=(1_000_000_000, 1_300_000_000_123_456_789))
    return root


def tree_state(root: Path) -> dict[bytes, tuple[object, ...]]:
    """Every entry below ``root`` (names as bytes) → its type, mode, mtime and content."""
    base = os.fsencode(root)
    state: dict[bytes, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, base)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                state[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                state[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            else:
                with open(full, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                state[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_size, digest)
    return state


def restored(target: Path, source: Path) -> Path:
    """Where a restore into ``target`` puts ``source`` (the absolute path is kept)."""
    return target / str(source.absolute()).lstrip("/")


def files_under(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            yield path


@contextlib.contextmanager
def holding_lock(home: Path, name: str = "lock", *, shared: bool = False) -> Iterator[None]:
    """Hold HOME/``name`` as another p2pbackup process would (flock, our pid inside)."""
    import fcntl

    fd = os.open(home / name, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
