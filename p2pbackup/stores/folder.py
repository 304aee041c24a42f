"""The folder store: a local directory acting as a peer.

A :class:`FolderShardStore` is one owner's namespace in a peer folder; the
interface and its nouns (shard id, owner, shard store, usage, offer, root
record) are :mod:`p2pbackup.stores.shardstore`'s. Nouns of its own:

* **peer folder** — a local directory acting as a peer (an external disk, a
  NAS mount). Its layout::

      <root>/p2pbackup-peer/PEER                                marker
      <root>/p2pbackup-peer/owners/<owner hex>/root             root record
      <root>/p2pbackup-peer/owners/<owner hex>/shards/<ab>/<abcd…>   shards

  where ``<ab>`` is the first two hex digits of the shard id.
* **marker** — the ``PEER`` file: JSON ``{"format": "p2pbackup-peer",
  "version": 1, "peer_id": "dir-<16 hex>"}``. The peer id names the folder
  wherever it is mounted; a folder without a marker is never written to, so an
  unmounted disk's empty mount point is not silently filled instead.
* **temp file** — ``.tmp-<random>`` beside its final name: written, synced,
  then moved into place, so a crash never leaves a partial file under a final
  name. Leftovers of a crash are garbage, skipped by listings and removed by
  :meth:`FolderShardStore.collect_garbage` (and, once stale, before a store
  first writes).

Like every store it verifies nothing it reads, and it meets misuse (a bad
shard id or range) with ``ValueError``.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
import trio

from p2pbackup.errors import ShardNotFoundError, StoreError
from p2pbackup.model import BytesLike
from p2pbackup.stores.durable import (
    fsync_dir,
    make_dirs,
    os_errors,
    unlink_quietly,
    write_temp_file,
)
from p2pbackup.stores.shardstore import (
    STALE_TEMP_SECONDS,
    ShardRoot,
    Space,
    answer_audit,
    check_range,
    check_shard_id,
    conflict,
)
from p2pbackup.wire.messages import AuditProof

PEER_DIR = "p2pbackup-peer"
MARKER_NAME = "PEER"
MARKER_FORMAT = "p2pbackup-peer"
MARKER_VERSION = 1
TEMP_PREFIX = ".tmp-"

_RENAME_LOCK = threading.Lock()
_PEER_ID_RE = re.compile(r"dir-[0-9a-f]{16}")
_SHARD_NAME_RE = re.compile(r"[0-9a-f]{64}")
_MAX_MARKER_SIZE = 4096
_MAX_OWNER_SIZE = 64
# link() failures that mean "this filesystem has no hard links" (FAT, exFAT,
# some network mounts) rather than a real problem.
_NO_LINK_ERRNOS = frozenset(
    code
    for code in (errno.EPERM, errno.EMLINK, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP)
    if code is not None
)


# --- low-level file operations (blocking; run in worker threads) -----------


def _write_temp(
    directory: Path, data: BytesLike, in_flight: set[str], *, direct: bool = False
) -> Path:
    """A new synced temp file in ``directory`` holding ``data``, its name in
    ``in_flight`` from before it exists until it is published or removed."""
    name = TEMP_PREFIX + secrets.token_hex(8)
    in_flight.add(name)
    temp = directory / name
    try:
        write_temp_file(temp, data, direct=direct)
    except BaseException:
        in_flight.discard(name)
        raise
    return temp


def _publish_new(temp: Path, final: Path, in_flight: set[str]) -> bool:
    """Move synced ``temp`` to ``final`` unless ``final`` exists (then False).

    link() refuses to replace an existing name, which makes write-once hold
    even between concurrent writers of the same id.
    """
    try:
        try:
            os.link(temp, final)
        except FileExistsError:
            return False
        except OSError as error:
            if error.errno not in _NO_LINK_ERRNOS:
                raise
            # No hard links here: a checked rename. The lock closes the gap
            # between check and rename within this process; two processes
            # writing one id at the same moment could still race.
            with _RENAME_LOCK:
                if final.exists():
                    return False
                os.rename(temp, final)
        fsync_dir(final.parent)
        return True
    finally:
        unlink_quietly(temp)
        in_flight.discard(temp.name)


def _replace(temp: Path, final: Path, in_flight: set[str]) -> None:
    try:
        os.replace(temp, final)
        fsync_dir(final.parent)
    finally:
        unlink_quietly(temp)
        in_flight.discard(temp.name)


def _same_content(path: Path, data: BytesLike) -> bool:
    if path.stat().st_size != len(data):
        return False
    return path.read_bytes() == data


# --- peer identity --------------------------------------------------------


def _marker_path(root: Path) -> Path:
    return root / PEER_DIR / MARKER_NAME


def _encode_marker(peer_id: str) -> bytes:
    fields = {"format": MARKER_FORMAT, "version": MARKER_VERSION, "peer_id": peer_id}
    return (json.dumps(fields, indent=2) + "\n").encode()


def _parse_marker(raw: bytes, path: Path) -> str:
    broken = f"{path} is not a valid p2pbackup peer marker"
    if len(raw) > _MAX_MARKER_SIZE:
        raise StoreError(f"{broken}: it is {len(raw)} bytes long")
    try:
        fields = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StoreError(f"{broken}: {error}") from error
    if not isinstance(fields, dict) or fields.get("format") != MARKER_FORMAT:
        raise StoreError(f"{broken}: it does not say format {MARKER_FORMAT!r}")
    version = fields.get("version")
    if version != MARKER_VERSION:
        raise StoreError(
            f"{path} has marker version {version!r}; this p2pbackup reads version "
            f"{MARKER_VERSION} (was the folder written by a newer release?)"
        )
    peer_id = fields.get("peer_id")
    if not isinstance(peer_id, str) or not _PEER_ID_RE.fullmatch(peer_id):
        raise StoreError(f"{broken}: bad peer_id {peer_id!r}")
    return peer_id


def read_folder_peer_id(root: Path) -> str:
    """The peer id of the peer folder at ``root`` (blocking).

    StoreError if ``root`` is missing, is not a peer folder, or its marker is
    malformed or of an unknown version.
    """
    marker = _marker_path(root)
    try:
        raw = marker.read_bytes()
    except (FileNotFoundError, NotADirectoryError) as error:
        if not root.is_dir():
            raise StoreError(f"peer folder {root} does not exist (is the disk mounted?)") from error
        raise StoreError(
            f"{root} is not a p2pbackup peer folder: it has no {PEER_DIR}/{MARKER_NAME} "
            "(is the disk mounted, or was the folder never set up as a peer?)"
        ) from error
    except OSError as error:
        raise StoreError(f"could not read {marker}: {error.strerror or error}") from error
    return _parse_marker(raw, marker)


def init_folder_peer(root: Path) -> str:
    """Make ``root`` a peer folder if it is not one yet; return its peer id
    (blocking). Idempotent: an existing marker's id is returned unchanged, and
    a malformed one raises StoreError rather than being overwritten.

    ``root`` itself is created if missing, but not its parents: a missing
    parent more likely means an unmounted disk than a wish for new folders.
    """
    peer_dir = root / PEER_DIR
    with os_errors("create peer folder", root):
        root.mkdir(exist_ok=True)
        if not peer_dir.is_dir():
            peer_dir.mkdir(exist_ok=True)
            fsync_dir(root)
    if _marker_path(root).exists():
        return read_folder_peer_id(root)
    peer_id = "dir-" + secrets.token_hex(8)
    with os_errors("write peer marker in", peer_dir):
        temp = _write_temp(peer_dir, _encode_marker(peer_id), set())
        published = _publish_new(temp, _marker_path(root), set())
    # Lost a race with another init: theirs is the folder's identity.
    return peer_id if published else read_folder_peer_id(root)


# --- the store ------------------------------------------------------------


def _check_owner(_instance: object, _attribute: object, owner: bytes) -> None:
    if not isinstance(owner, bytes) or not 0 < len(owner) <= _MAX_OWNER_SIZE:
        raise ValueError(f"an owner is 1 to {_MAX_OWNER_SIZE} bytes, got {owner!r}")


@attrs.define(eq=False)
class FolderShardStore:
    """``owner``'s namespace in the peer folder at ``root``.

    Construction does no I/O. The first operation checks the marker (a folder
    that is not a peer folder raises StoreError and is left untouched) and
    removes stale temp files; :meth:`open` does the same up front. All
    blocking I/O runs in worker threads.
    """

    root: Path
    owner: bytes = attrs.field(validator=_check_owner)
    _opened: bool = attrs.field(default=False, init=False)
    _swept: bool = attrs.field(default=False, init=False)
    # Names of temp files this store is writing now, spared by collect_garbage.
    _in_flight: set[str] = attrs.field(factory=set, init=False, repr=False)

    @classmethod
    async def open(cls, root: Path, owner: bytes) -> FolderShardStore:
        store = cls(root, owner)
        await store._ensure_open()
        return store

    # -- paths --

    @property
    def _peer_dir(self) -> Path:
        return self.root / PEER_DIR

    @property
    def _owner_dir(self) -> Path:
        return self._peer_dir / "owners" / self.owner.hex()

    @property
    def _shards_dir(self) -> Path:
        return self._owner_dir / "shards"

    @property
    def _root_path(self) -> Path:
        return self._owner_dir / "root"

    def _shard_path(self, shard_id: bytes) -> Path:
        name = shard_id.hex()
        return self._shards_dir / name[:2] / name

    # -- opening and absence --

    async def _ensure_open(self) -> None:
        if not self._opened:
            await trio.to_thread.run_sync(self._open_sync)

    async def _ensure_writable(self) -> None:
        # Stale temp files are swept before the first write, not on open: a
        # restore only reads, and sweeping 256 prefix folders on each of n
        # peers was a noticeable share of its time (docs/performance.md#restore).
        await self._ensure_open()
        if not self._swept:
            await trio.to_thread.run_sync(self._collect_garbage_sync, STALE_TEMP_SECONDS)
            self._swept = True

    def _open_sync(self) -> None:
        read_folder_peer_id(self.root)
        self._opened = True

    def _check_still_there(self) -> None:
        """Before reporting something absent, make sure the folder itself did
        not vanish (an unplugged disk leaves an empty mount point)."""
        if not _marker_path(self.root).is_file():
            raise StoreError(f"peer folder {self.root} has gone (was the disk unplugged?)")

    # -- shards --

    async def put(
        self, shard_id: bytes, data: BytesLike, root: ShardRoot | None = None
    ) -> int | None:
        check_shard_id(shard_id)
        await self._ensure_writable()
        await trio.to_thread.run_sync(self._put_sync, shard_id, data)
        return None  # a folder keeps shards until they are deleted

    def _put_sync(self, shard_id: bytes, data: BytesLike) -> None:
        final = self._shard_path(shard_id)
        with os_errors("store shard in", final.parent):
            stored = not final.exists() and self._write_new(final, data)
            if not stored and not _same_content(final, data):
                raise conflict(shard_id, f"in {self._owner_dir}")

    def _write_new(self, final: Path, data: BytesLike) -> bool:
        make_dirs(final.parent, self._peer_dir)
        temp = _write_temp(final.parent, data, self._in_flight, direct=True)
        return _publish_new(temp, final, self._in_flight)

    async def get(self, shard_id: bytes, offset: int = 0, length: int | None = None) -> bytes:
        check_shard_id(shard_id)
        check_range(offset, length)
        await self._ensure_open()
        return await trio.to_thread.run_sync(self._get_sync, shard_id, offset, length)

    def _get_sync(self, shard_id: bytes, offset: int, length: int | None) -> bytes:
        path = self._shard_path(shard_id)
        with os_errors("read shard", path):
            try:
                with path.open("rb") as file:
                    file.seek(offset)
                    return file.read() if length is None else file.read(length)
            except (FileNotFoundError, NotADirectoryError):
                raise self._missing(shard_id) from None

    def _missing(self, shard_id: bytes) -> ShardNotFoundError:
        """The error for a shard that is not here (once the folder is known to be)."""
        self._check_still_there()
        return ShardNotFoundError(f"shard {shard_id.hex()} is not stored in {self._owner_dir}")

    async def audit(
        self, shard_id: bytes, nonce: bytes, indices: Sequence[int], block_size: int
    ) -> AuditProof:
        """The audit answer from the shard's file as it is on the disk now."""
        check_shard_id(shard_id)
        await self._ensure_open()
        return await trio.to_thread.run_sync(
            self._audit_sync, shard_id, nonce, tuple(indices), block_size
        )

    def _audit_sync(
        self, shard_id: bytes, nonce: bytes, indices: tuple[int, ...], block_size: int
    ) -> AuditProof:
        path = self._shard_path(shard_id)
        with os_errors("audit shard", path):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except (FileNotFoundError, NotADirectoryError):
                raise self._missing(shard_id) from None
            try:
                size = os.fstat(fd).st_size
                return answer_audit(
                    lambda offset, length: os.pread(fd, length, offset),
                    size,
                    nonce,
                    indices,
                    block_size,
                )
            finally:
                os.close(fd)

    async def has(self, shard_id: bytes) -> bool:
        check_shard_id(shard_id)
        await self._ensure_open()
        return await trio.to_thread.run_sync(self._has_sync, shard_id)

    def _has_sync(self, shard_id: bytes) -> bool:
        path = self._shard_path(shard_id)
        with os_errors("check shard", path):
            try:
                path.stat()
            except (FileNotFoundError, NotADirectoryError):
                self._check_still_there()
                return False
            return True

    async def delete(self, shard_id: bytes) -> None:
        check_shard_id(shard_id)
        await self._ensure_open()
        await trio.to_thread.run_sync(self._delete_sync, shard_id)

    def _delete_sync(self, shard_id: bytes) -> None:
        path = self._shard_path(shard_id)
        # No directory sync: a delete undone by a crash only leaves a shard
        # that the owner's next prune or lease expiry deletes again.
        with os_errors("delete shard", path), contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    async def list(self) -> builtins.list[bytes]:
        await self._ensure_open()
        return await trio.to_thread.run_sync(self._list_sync)

    def _list_sync(self) -> builtins.list[bytes]:
        with os_errors("list shards in", self._shards_dir):
            ids = [bytes.fromhex(entry.name) for entry in self._shard_entries()]
        if not ids:
            self._check_still_there()
        return sorted(ids)

    def _shard_entries(self) -> Iterator[os.DirEntry[str]]:
        """The shard files (final names only) under this owner's shards dir."""
        try:
            prefixes = builtins.list(os.scandir(self._shards_dir))
        except FileNotFoundError:
            return
        for prefix in prefixes:
            if len(prefix.name) != 2 or not prefix.is_dir(follow_symlinks=False):
                continue
            with os.scandir(prefix.path) as entries:
                for entry in entries:
                    if _SHARD_NAME_RE.fullmatch(entry.name) and entry.name[:2] == prefix.name:
                        yield entry

    # -- root record --

    async def delete_all(self) -> tuple[int, bool]:
        """Delete every shard of the owner and its root record (the owner is
        leaving): how many shards there were, and whether there was a root
        record."""
        await self._ensure_open()
        return await trio.to_thread.run_sync(self._delete_all_sync)

    def _delete_all_sync(self) -> tuple[int, bool]:
        shards = self._list_sync()
        for shard_id in shards:
            self._delete_sync(shard_id)
        root = self._root_path
        had_root = root.exists()
        with os_errors("delete", root):
            root.unlink(missing_ok=True)
        # Its directories, now empty (a temp file of a writer that died stays).
        for directory in sorted(self._owner_dir.rglob("*"), reverse=True):
            with contextlib.suppress(OSError):
                directory.rmdir()
        with contextlib.suppress(OSError):
            self._owner_dir.rmdir()
        return len(shards), had_root

    async def put_root(self, data: bytes) -> None:
        await self._ensure_writable()
        await trio.to_thread.run_sync(self._put_root_sync, data)

    def _put_root_sync(self, data: bytes) -> None:
        with os_errors("write root record in", self._owner_dir):
            make_dirs(self._owner_dir, self._peer_dir)
            temp = _write_temp(self._owner_dir, data, self._in_flight)
            _replace(temp, self._root_path, self._in_flight)

    async def get_root(self) -> bytes | None:
        await self._ensure_open()
        return await trio.to_thread.run_sync(self._get_root_sync)

    def _get_root_sync(self) -> bytes | None:
        with os_errors("read root record", self._root_path):
            try:
                return self._root_path.read_bytes()
            except FileNotFoundError:
                self._check_still_there()
                return None

    # -- accounting and garbage --

    async def usage(self) -> int:
        await self._ensure_open()
        return await trio.to_thread.run_sync(self._usage_sync)

    async def space(self) -> Space:
        """The usage, and as room the free space of the folder's disk (a
        folder has no quota: every owner shares the disk)."""
        await self._ensure_open()
        return await trio.to_thread.run_sync(self._space_sync)

    def _space_sync(self) -> Space:
        used = self._usage_sync()
        with os_errors("read the free space of", self.root):
            disk = os.statvfs(self.root)
        return Space.with_room(used, disk.f_bavail * disk.f_frsize)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()  # files are opened per call

    def _usage_sync(self) -> int:
        with os_errors("measure", self._owner_dir):
            total = sum(
                entry.stat(follow_symlinks=False).st_size for entry in self._shard_entries()
            )
            with contextlib.suppress(FileNotFoundError):
                total += self._root_path.stat().st_size
        return total

    async def collect_garbage(self, older_than: float = STALE_TEMP_SECONDS) -> int:
        """Remove this owner's temp files last modified over ``older_than``
        seconds ago (other than those this store is writing); return how many.
        ``older_than=0`` removes every leftover, safe only when no other
        process writes to this owner's namespace."""
        await self._ensure_open()
        return await trio.to_thread.run_sync(self._collect_garbage_sync, older_than)

    def _collect_garbage_sync(self, older_than: float) -> int:
        cutoff = time.time() - older_than
        removed = 0
        with os_errors("clean up temp files in", self._owner_dir):
            for directory in self._temp_dirs():
                removed += self._remove_temps(directory, cutoff)
        return removed

    def _temp_dirs(self) -> Iterator[Path]:
        yield self._owner_dir
        with contextlib.suppress(FileNotFoundError), os.scandir(self._shards_dir) as prefixes:
            for prefix in prefixes:
                if prefix.is_dir(follow_symlinks=False):
                    yield Path(prefix.path)

    def _remove_temps(self, directory: Path, cutoff: float) -> int:
        removed = 0
        try:
            entries = builtins.list(os.scandir(directory))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if not entry.name.startswith(TEMP_PREFIX) or entry.name in self._in_flight:
                continue
            with contextlib.suppress(FileNotFoundError):
                if entry.stat(follow_symlinks=False).st_mtime <= cutoff:
                    os.unlink(entry.path)
                    removed += 1
        return removed
