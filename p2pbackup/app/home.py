"""The home directory: where one node keeps its secret, its index and its lock.

Layout (format version 1)::

    HOME/
      HOME          "p2pbackup-home 1" and the node id — marks an initialised home
      secret        the master secret (mode 0600); everything derives from it
      index.sqlite  the local index (a cache of what the peers hold)
      lock          held (flock) by the process that writes this home
      readers.lock  held shared (flock) by each process reading it, and
                    exclusively by one removing data (forget, prune)
      hosted/       shards this node stores for its peers (see shardhost)
      serve.lock    held (flock) by the process serving this home to peers
      addresses     "p2pbackup-addresses 1", then the HOST:PORT lines the node
                    last published (written by serve, read by invite)
      dht-state.json  DHT neighbours remembered between runs (see dht)
      config.toml   the user's settings: scheduled backups (see schedule)
      serve.log     what serve did, one JSON object a line
      control.sock  where a running serve takes the CLI's commands (0600);
                    left behind by a serve that stopped unexpectedly

The home is chosen by ``--home``, else ``$P2PBACKUP_HOME``, else the platform's
user data directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from p2pbackup.core.keys import MASTER_SECRET_SIZE
from p2pbackup.errors import RepositoryLockedError, UsageError
from p2pbackup.stores.durable import write_private_file

HOME_FORMAT_VERSION = 1
_HOME_MAGIC = "p2pbackup-home"
_SECRET_MAGIC = "p2pbackup-secret"
_ADDRESSES_MAGIC = "p2pbackup-addresses 1"


def default_home() -> Path:
    """``$P2PBACKUP_HOME``, else the platform's user data directory."""
    env = os.environ.get("P2PBACKUP_HOME")
    if env:
        return Path(env)
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "p2pbackup"
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "p2pbackup"


class Home:
    """One node's home directory."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def marker_path(self) -> Path:
        return self.path / "HOME"

    @property
    def secret_path(self) -> Path:
        return self.path / "secret"

    @property
    def index_path(self) -> Path:
        return self.path / "index.sqlite"

    @property
    def lock_path(self) -> Path:
        return self.path / "lock"

    @property
    def hosted_path(self) -> Path:
        """Where this node keeps the shards it stores for its peers."""
        return self.path / "hosted"

    @property
    def readers_lock_path(self) -> Path:
        return self.path / "readers.lock"

    @property
    def serve_lock_path(self) -> Path:
        return self.path / "serve.lock"

    @property
    def control_path(self) -> Path:
        """The Unix socket a running ``serve`` answers the CLI on (see control)."""
        return self.path / "control.sock"

    @property
    def config_path(self) -> Path:
        """The user's settings (scheduled backups: see schedule)."""
        return self.path / "config.toml"

    @property
    def log_path(self) -> Path:
        """Where ``serve`` logs, one JSON object a line."""
        return self.path / "serve.log"

    @property
    def addresses_path(self) -> Path:
        return self.path / "addresses"

    @property
    def dht_state_path(self) -> Path:
        return self.path / "dht-state.json"

    def write_addresses(self, addresses: Sequence[str]) -> None:
        """Record the ``HOST:PORT`` addresses the node publishes (for ``invite``)."""
        lines = [_ADDRESSES_MAGIC, *addresses]
        write_private_file(self.addresses_path, ("\n".join(lines) + "\n").encode())

    def read_addresses(self) -> list[str]:
        """The addresses the node last published; empty if it never served."""
        try:
            text = self.addresses_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        lines = text.splitlines()
        if not lines or lines[0] != _ADDRESSES_MAGIC:
            raise UsageError(f"{self.addresses_path} is not an address file this version reads")
        return [line for line in lines[1:] if line]

    def exists(self) -> bool:
        return self.marker_path.exists()

    def create(self, master_secret: bytes, node_id: bytes) -> None:
        """Make a new home holding ``master_secret``; refuse to replace an existing one."""
        if self.exists():
            raise UsageError(f"{self.path} is already a p2pbackup home; refusing to overwrite it")
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the home {self.path}: {exc.strerror}") from exc
        if any(p.name not in {"lock"} for p in self.path.iterdir()):
            raise UsageError(f"{self.path} is not empty; choose an empty or new directory")
        # An empty directory the user made keeps the mode it was made with;
        # the index it will hold names their files, so it becomes private too.
        try:
            os.chmod(self.path, 0o700)
        except OSError as exc:
            raise UsageError(f"cannot make the home {self.path} private: {exc.strerror}") from exc
        write_private_file(
            self.secret_path,
            f"{_SECRET_MAGIC} {HOME_FORMAT_VERSION}\n{master_secret.hex()}\n".encode(),
        )
        # The marker is written last: a home without it is not initialised.
        write_private_file(
            self.marker_path, f"{_HOME_MAGIC} {HOME_FORMAT_VERSION}\n{node_id.hex()}\n".encode()
        )

    def require(self) -> None:
        if not self.exists():
            raise UsageError(
                f"{self.path} is not an initialised p2pbackup home "
                "(run `p2pbackup init`, or `p2pbackup recover` with your recovery key)"
            )
        text = self.marker_path.read_text(errors="replace").split()
        if len(text) < 2 or text[0] != _HOME_MAGIC:
            raise UsageError(f"{self.marker_path} is not a p2pbackup home marker")
        if text[1] != str(HOME_FORMAT_VERSION):
            raise UsageError(
                f"{self.path} is a home of format version {text[1]}; this p2pbackup "
                f"reads version {HOME_FORMAT_VERSION} (a newer p2pbackup made it: upgrade)"
            )

    def node_id(self) -> bytes:
        """The node id written in the home marker (no secret needed)."""
        self.require()
        text = self.marker_path.read_text(errors="replace").split()
        try:
            return bytes.fromhex(text[2])
        except (IndexError, ValueError):
            raise UsageError(f"{self.marker_path} does not name a node id") from None

    def load_secret(self) -> bytes:
        self.require()
        mode = self.secret_path.stat().st_mode & 0o777
        if mode & 0o077:
            raise UsageError(
                f"{self.secret_path} is readable by others (mode {mode:o}); "
                f"run `chmod 600 {self.secret_path}`"
            )
        # Bytes, decoded leniently: a damaged file is a message, not a traceback.
        lines = self.secret_path.read_bytes().decode("ascii", errors="replace").split("\n")
        header = lines[0].split()
        if len(header) != 2 or header[0] != _SECRET_MAGIC or len(lines) < 2:
            raise UsageError(f"{self.secret_path} is not a p2pbackup secret file")
        if header[1] != str(HOME_FORMAT_VERSION):
            raise UsageError(
                f"{self.secret_path} has format version {header[1]}; this p2pbackup "
                f"reads version {HOME_FORMAT_VERSION} (a newer p2pbackup made it: upgrade)"
            )
        try:
            secret = bytes.fromhex(lines[1].strip())
        except ValueError:
            secret = b""
        if len(secret) != MASTER_SECRET_SIZE:
            raise UsageError(
                f"{self.secret_path} is damaged (it should hold {MASTER_SECRET_SIZE} bytes "
                "in hex): put back a copy, or `p2pbackup recover` into a new home with the "
                "recovery key"
            )
        return secret

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the home's lock; a second writer gets a clear error naming the holder."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._held(
            exclusive_lock(self.lock_path, f"{self.path} is in use by another p2pbackup process"),
            "writing to",
        ):
            yield

    @contextlib.contextmanager
    def _held(self, lock: contextlib.AbstractContextManager[None], doing: str) -> Iterator[None]:
        """Hold ``lock``; when the home's own ``serve`` is what holds it (a
        scheduled backup, a repair, a command it runs), say so: it is not
        "another process" to be got rid of, but work to wait for."""
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(lock)
            except RepositoryLockedError as error:
                if error.holder is None or error.holder != self.serving_pid():
                    raise
                raise RepositoryLockedError(
                    f"this home's `serve` (pid {error.holder}) is {doing} {self.path} — a "
                    "scheduled backup, a repair or a command it runs; wait for it to finish "
                    "(`p2pbackup status` says what it is doing)",
                    holder=error.holder,
                ) from None
            yield

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Hold the home for reading (``status``, ``restore``, ``snapshots``…):
        beside other readers and beside a writer that only adds (a backup),
        never beside one that removes data (:meth:`removing`)."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._held(
            shared_lock(
                self.readers_lock_path,
                f"{self.path} is being pruned by another p2pbackup process; "
                "try again once it is done",
            ),
            "pruning",
        ):
            yield

    @contextlib.contextmanager
    def removing(self) -> Iterator[None]:
        """Hold the home to remove data (``forget``, ``prune``): the writer's
        lock, and no reader at the same time."""
        with (
            self.locked(),
            self._held(
                exclusive_lock(
                    self.readers_lock_path,
                    f"{self.path} is being read by another p2pbackup process "
                    "(a restore, status or check); try again once it is done",
                ),
                "reading",
            ),
        ):
            yield

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Hold the storage server's lock: one ``serve`` per home at a time.

        Apart from :meth:`locked`, so that backups run while the home serves.
        Patient for a moment: the CLI tries the lock when it finds no daemon
        (:meth:`serving_pid`), and must not make a starting ``serve`` fail.
        """
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        with exclusive_lock(
            self.serve_lock_path, f"{self.path} is already serving", patience=_SERVE_LOCK_PATIENCE
        ):
            yield

    def serving_pid(self) -> str | None:
        """The pid of the ``serve`` that holds this home (as it wrote it), or
        None when none does. Creates nothing."""
        try:
            fd = os.open(self.serve_lock_path, os.O_RDONLY)
        except OSError:
            return None  # never served, or not a home at all
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _holder(fd)
            return None
        finally:
            os.close(fd)  # and with it the lock, if this took it


#: Seconds ``serve`` waits for its lock in case a process is only looking at it.
_SERVE_LOCK_PATIENCE = 0.5


@contextlib.contextmanager
def exclusive_lock(path: Path, busy: str, *, patience: float = 0.0) -> Iterator[None]:
    """Hold an flock on ``path``; if another process holds it (still, after
    ``patience`` seconds), fail with ``busy`` and the holder's pid (which the
    holder writes into the file)."""
    with _flock(path, fcntl.LOCK_EX, busy, patience=patience):
        yield


@contextlib.contextmanager
def shared_lock(path: Path, busy: str) -> Iterator[None]:
    """Hold a shared flock on ``path`` (other shared holders welcome); if a
    process holds it exclusively, fail with ``busy`` and that one's pid."""
    with _flock(path, fcntl.LOCK_SH, busy):
        yield


@contextlib.contextmanager
def _flock(path: Path, operation: int, busy: str, *, patience: float = 0.0) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + patience
        while True:
            try:
                fcntl.flock(fd, operation | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _holder(fd)
                    raise RepositoryLockedError(f"{busy} (pid {holder})", holder=holder) from None
                time.sleep(0.01)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    """The pid a lock's holder wrote into its file."""
    return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
