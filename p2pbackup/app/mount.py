"""Snapshots as a read-only file system: ``p2pbackup mount DIR`` (FUSE, through pyfuse3).

Nouns:

* **mount** — what ``DIR`` shows while the command runs, as restic's mount
  does::

      DIR/ids/1a2b3c4d5e6f/home/me/...            each snapshot by its id
      DIR/snapshots/2026-12-06T20:01:33/home/...   each by its time (local)
      DIR/snapshots/latest -> 2026-12-06T20:01:33  the newest

  Below a snapshot, its tree: the paths as they were backed up, with their
  modes, owners, times, sizes, symlinks, devices and extended attributes.
  Nothing can be written. This module is the only one that imports pyfuse3
  (an optional extra: ``pip install 'p2pbackup[mount]'``, which builds
  against Debian's libfuse3-dev).
* **inode** — a number for each entry the kernel has looked up: the
  synthetic directories, and the nodes of snapshot trees, each made once
  and kept for the life of the mount (:class:`InodeTable`). Trees are read
  from the peers when a directory is first listed or looked into.
* **read** — a file's bytes at an offset: only the chunks that hold them
  (:func:`p2pbackup.engine.browse.chunk_spans`), each read from the peers,
  verified and decrypted, and the last few kept (:data:`CHUNK_CACHE`) so a
  program reading a file through in small pieces fetches each chunk once.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import attrs
import pyfuse3
import trio

from p2pbackup.engine import snapshots as snapshot_list
from p2pbackup.engine.browse import chunk_spans
from p2pbackup.engine.progress import plural
from p2pbackup.engine.repository import Repository
from p2pbackup.errors import P2PBackupError, UsageError
from p2pbackup.model import BlobType, NodeKind, Snapshot, TreeNode

log = logging.getLogger(__name__)

#: Decrypted chunks kept, most recently read last.
CHUNK_CACHE: Final = 16
_TYPE_BITS: Final = {
    NodeKind.FILE: stat.S_IFREG,
    NodeKind.DIR: stat.S_IFDIR,
    NodeKind.SYMLINK: stat.S_IFLNK,
    NodeKind.FIFO: stat.S_IFIFO,
    NodeKind.CHARDEV: stat.S_IFCHR,
    NodeKind.BLOCKDEV: stat.S_IFBLK,
}


@attrs.define(eq=False)
class Entry:
    """One inode: a synthetic directory (``node`` None), or a node of a
    snapshot's tree."""

    inode: int
    node: TreeNode | None
    #: A directory's tree id (a snapshot's root, a subtree); None otherwise.
    tree: bytes | None = None
    #: A synthetic symlink's target (``latest``).
    target: bytes | None = None
    #: Name → inode, once listed (synthetic directories: from the start).
    children: dict[bytes, int] | None = None
    #: The mtime a synthetic directory shows (a snapshot's time).
    mtime_ns: int = 0

    @property
    def is_dir(self) -> bool:
        if self.node is None:
            return self.target is None
        return self.node.kind is NodeKind.DIR


class InodeTable:
    """Every inode of the mount (module docstring)."""

    def __init__(self) -> None:
        self._entries: dict[int, Entry] = {}
        self._next = pyfuse3.ROOT_INODE

    def add(self, **fields: object) -> Entry:
        entry = Entry(self._next, **fields)  # type: ignore[arg-type]
        self._entries[entry.inode] = entry
        self._next += 1
        return entry

    def __getitem__(self, inode: int) -> Entry:
        try:
            return self._entries[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None


def snapshot_names(found: list[tuple[bytes, Snapshot]]) -> list[tuple[str, str, bytes]]:
    """(time name, id name, snapshot id) for each snapshot, oldest first; a
    second snapshot of the same second gets ``-2``, and so on."""
    names = []
    taken: collections.Counter[str] = collections.Counter()
    for sid, snap in sorted(found, key=lambda item: item[1].time_ns):
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(snap.time_ns / 1e9))
        taken[when] += 1
        name = when if taken[when] == 1 else f"{when}-{taken[when]}"
        names.append((name, sid.hex()[:12], sid))
    return names


class SnapshotFs(pyfuse3.Operations):
    """The file system ``mount`` serves (module docstring)."""

    def __init__(self, repo: Repository, found: list[tuple[bytes, Snapshot]]) -> None:
        super().__init__()
        self.repo = repo
        self.table = InodeTable()
        self._chunks: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        root = self.table.add(node=None, children={})
        by_id = self.table.add(node=None, children={})
        by_time = self.table.add(node=None, children={})
        assert root.children is not None and by_id.children is not None
        assert by_time.children is not None
        root.children.update({b"ids": by_id.inode, b"snapshots": by_time.inode})
        snaps = dict(found)
        names = snapshot_names(found)
        for when, short, sid in names:
            snap = snaps[sid]
            for parent, name in ((by_id, short), (by_time, when)):
                entry = self.table.add(node=None, tree=snap.tree, mtime_ns=snap.time_ns)
                assert parent.children is not None
                parent.children[os.fsencode(name)] = entry.inode
        if names:
            latest = self.table.add(node=None, target=os.fsencode(names[-1][0]))
            by_time.children[b"latest"] = latest.inode

    # -- looking ------------------------------------------------------------------------

    async def _children(self, entry: Entry) -> dict[bytes, int]:
        if entry.children is None:
            if entry.tree is None:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            try:
                tree = await snapshot_list.load_tree(self.repo, entry.tree)
            except P2PBackupError as error:
                log.warning("cannot read a directory of the snapshot: %s", error)
                raise pyfuse3.FUSEError(errno.EIO) from None
            children = {}
            for node in tree.nodes:
                child = self.table.add(node=node, tree=node.subtree)
                children[node.name] = child.inode
            entry.children = children
        return entry.children

    def _attributes(self, entry: Entry) -> pyfuse3.EntryAttributes:
        attributes = pyfuse3.EntryAttributes()
        attributes.st_ino = entry.inode
        attributes.generation = 0
        attributes.entry_timeout = attributes.attr_timeout = 3600
        node = entry.node
        if node is None:
            if entry.target is not None:
                attributes.st_mode = stat.S_IFLNK | 0o777
                attributes.st_size = len(entry.target)
            else:
                attributes.st_mode = stat.S_IFDIR | 0o555
            attributes.st_nlink = 1
            attributes.st_uid, attributes.st_gid = os.getuid(), os.getgid()
            attributes.st_mtime_ns = attributes.st_ctime_ns = attributes.st_atime_ns = (
                entry.mtime_ns
            )
            return attributes
        attributes.st_mode = _TYPE_BITS[node.kind] | stat.S_IMODE(node.mode)
        attributes.st_nlink = 1
        attributes.st_uid, attributes.st_gid = node.uid, node.gid
        attributes.st_rdev = node.rdev
        if node.kind is NodeKind.SYMLINK:
            attributes.st_size = len(node.link_target or b"")
        else:
            attributes.st_size = node.size
        attributes.st_blksize = 128 * 1024
        attributes.st_blocks = -(-attributes.st_size // 512)
        attributes.st_mtime_ns = attributes.st_ctime_ns = attributes.st_atime_ns = node.mtime_ns
        return attributes

    async def getattr(self, inode: int, ctx: object = None) -> pyfuse3.EntryAttributes:
        return self._attributes(self.table[inode])

    async def lookup(self, parent: int, name: bytes, ctx: object = None) -> pyfuse3.EntryAttributes:
        children = await self._children(self.table[parent])
        if name == b".":
            return self._attributes(self.table[parent])
        inode = children.get(name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(self.table[inode])

    async def readlink(self, inode: int, ctx: object) -> bytes:
        entry = self.table[inode]
        if entry.target is not None:
            return entry.target
        if entry.node is None or entry.node.kind is not NodeKind.SYMLINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return entry.node.link_target or b""

    async def opendir(self, inode: int, ctx: object) -> int:
        await self._children(self.table[inode])
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        children = sorted((await self._children(self.table[fh])).items())
        for number, (name, inode) in enumerate(children[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, name, self._attributes(self.table[inode]), number):
                return

    async def listxattr(self, inode: int, ctx: object) -> list[bytes]:
        node = self.table[inode].node
        return [name for name, _ in node.xattrs] if node is not None else []

    async def getxattr(self, inode: int, name: bytes, ctx: object) -> bytes:
        node = self.table[inode].node
        for key, value in node.xattrs if node is not None else ():
            if key == name:
                return value
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def statfs(self, ctx: object) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_namemax = 255
        return data

    # -- reading ------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: object) -> pyfuse3.FileInfo:
        entry = self.table[inode]
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC | os.O_CREAT):
            raise pyfuse3.FUSEError(errno.EROFS)
        if entry.node is None or entry.node.kind is not NodeKind.FILE:
            raise pyfuse3.FUSEError(errno.EISDIR if entry.is_dir else errno.EINVAL)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self.table[fh].node
        assert node is not None
        sizes = [self._chunk_size(blob_id) for blob_id in node.content]
        pieces = []
        for span in chunk_spans(sizes, off, size):
            data = await self._chunk(node.content[span.chunk])
            pieces.append(data[span.start : span.end])
        return b"".join(pieces)

    def _chunk_size(self, blob_id: bytes) -> int:
        locations = self.repo.index.blob_locations(blob_id)
        if not locations:
            raise pyfuse3.FUSEError(errno.EIO)
        return locations[0].entry.raw_length

    async def _chunk(self, blob_id: bytes) -> bytes:
        cached = self._chunks.get(blob_id)
        if cached is not None:
            self._chunks.move_to_end(blob_id)
            return cached
        try:
            data = await self.repo.load_blob(blob_id, BlobType.DATA)
        except P2PBackupError as error:
            log.warning("cannot read a file of the snapshot: %s", error)
            raise pyfuse3.FUSEError(errno.EIO) from None
        self._chunks[blob_id] = data
        while len(self._chunks) > CHUNK_CACHE:
            self._chunks.popitem(last=False)
        return data


def _check_mountpoint(where: Path) -> None:
    if not where.is_dir():
        raise UsageError(f"cannot mount on {where}: it is not a directory")
    if os.path.ismount(where):
        raise UsageError(f"{where} is a mount point already (`fusermount3 -u {where}` ends it)")
    if any(_entries(where)):
        raise UsageError(f"cannot mount on {where}: it is not empty")


def _entries(where: Path) -> Iterator[str]:
    with os.scandir(where) as listing:
        for item in listing:
            yield item.name


async def serve_mount(
    repo: Repository, where: Path, *, ready: trio.Event | None = None, say: object = print
) -> int:
    """Mount the repository's snapshots at ``where`` until a signal (or an
    unmount from outside); how many snapshots were shown."""
    _check_mountpoint(where)
    found = repo.index.snapshots()
    fs = SnapshotFs(repo, found)
    options = set(pyfuse3.default_options)
    options |= {"fsname=p2pbackup", "ro", "default_permissions"}
    try:
        pyfuse3.init(fs, os.fspath(where), options)
    except RuntimeError as error:
        raise UsageError(f"cannot mount on {where}: {error}") from None
    try:
        async with trio.open_nursery() as nursery:

            async def until_signal() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        pyfuse3.terminate()  # main() returns, and with it the mount
                        return

            async def until_unmounted() -> None:
                await pyfuse3.main()
                nursery.cancel_scope.cancel()

            nursery.start_soon(until_signal)
            nursery.start_soon(until_unmounted)
            say(  # type: ignore[operator]
                f"mounted {plural(len(found), 'snapshot')} at {where} (read-only): ids/, "
                "snapshots/; "
                f"Ctrl-C or `fusermount3 -u {where}` unmounts"
            )
            if ready is not None:
                ready.set()
    finally:
        pyfuse3.close(unmount=True)
    return len(found)
