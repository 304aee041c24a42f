"""Reading one file for a backup: its chunks, their ids, the sealed new ones.

The same code runs in the backup's worker threads and in its sealer processes
(:mod:`p2pbackup.engine.sealer`), so a file is read the same way in both.

Nouns:

* **content** — the ids of a file's chunks, in order: what its tree node holds.
* **claim** — the caller's decision that a chunk id still needs storing; only
  claimed chunks are sealed (compressed and encrypted).
* **file stat**, **read outcome** — see :mod:`p2pbackup.model`: the file is
  recorded as the ``fstat`` after reading it found it.
* **prefetch** — a batch of small files is asked of the kernel all at once
  (:func:`prefetch`) before its files are read one by one.

A file that changes while it is read (size, mtime or ctime differ between the
``fstat`` before and after, or the bytes read are not its size) is read again,
READ_ATTEMPTS times in all, and then left out — never stored as a mix of two
versions.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

from p2pbackup.core import blobs, chunker
from p2pbackup.model import BlobType, FileStat, ReadOutcome, SealingKeys

#: How many times a file that changes under us is read before giving up on it.
READ_ATTEMPTS = 3

#: Why a file that kept changing is left out.
CHANGED_WHILE_READ = "changed while it was read (left out; back it up again)"


#: Told of every chunk read: its id, plaintext length, and the sealed blob if
#: the chunk was claimed (None if it was already stored or claimed).
ChunkSink = Callable[[bytes, int, bytes | None], None]


class FileChanged(Exception):
    """The file changed while it was read."""


def prefetch(paths: Iterable[bytes]) -> None:
    """Have the kernel start reading every file of ``paths`` at once, before
    they are read one by one: a batch of small files read cold would wait
    for the disk once a file, while the disk serves many requests at once."""
    for path in paths:
        try:
            # Non-blocking: a regular file when listed may be a fifo by now.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue  # reading it says why
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # only a hint
        finally:
            os.close(fd)


def read_file(
    path: bytes,
    params: chunker.ChunkerParams,
    keys: SealingKeys,
    claim: Callable[[bytes], bool],
    sink: ChunkSink,
) -> ReadOutcome:
    """Read, chunk, identify and (where claimed) seal the file at ``path``.

    Every attempt tells ``sink`` of its chunks: a caller that counts them
    counts a re-read file twice, as bytes read twice. Never raises for the
    file itself: a file that cannot be opened or read, or keeps changing, is
    an outcome with an error, as the backup summary words it.
    """
    error = CHANGED_WHILE_READ
    for _attempt in range(READ_ATTEMPTS):
        try:
            content, stat = _read_once(path, params, keys, claim, sink)
        except FileChanged:
            continue
        except OSError as exc:
            error = f"cannot read: {exc.strerror}"
            break
        return ReadOutcome(content, stat)
    return ReadOutcome(error=error)


def _read_once(
    path: bytes,
    params: chunker.ChunkerParams,
    keys: SealingKeys,
    claim: Callable[[bytes], bool],
    sink: ChunkSink,
) -> tuple[tuple[bytes, ...], FileStat]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NOATIME", 0))
    try:
        before = os.fstat(fd)
        content: list[bytes] = []
        total = 0
        for chunk in _chunks_of(fd, before.st_size, params):
            ident = blobs.blob_id(keys.dedup_key, chunk)
            content.append(ident)
            total += len(chunk)
            sealed = None
            if claim(ident):
                sealed = blobs.seal_blob(keys.data_key, BlobType.DATA, ident, chunk)
            sink(ident, len(chunk), sealed)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if total != after.st_size or (before.st_size, before.st_mtime_ns, before.st_ctime_ns) != (
        after.st_size,
        after.st_mtime_ns,
        after.st_ctime_ns,
    ):
        raise FileChanged()
    return tuple(content), _file_stat(after)


def _file_stat(st: os.stat_result) -> FileStat:
    return FileStat(
        st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_uid, st.st_gid
    )


def _chunks_of(fd: int, size: int, params: chunker.ChunkerParams) -> Iterable[bytes | memoryview]:
    """The chunks of an open file that ``fstat`` says is ``size`` bytes."""
    if size < min(chunker.SMALL_INPUT, params.max_size):
        # Most files of a home directory: one read, no file object. The
        # cuts are those iter_chunks makes of the same bytes.
        return chunker.chunk_bytes(_read_whole(fd, size), params)
    return _streamed_chunks(fd, params)


def _streamed_chunks(fd: int, params: chunker.ChunkerParams) -> Iterator[bytes | memoryview]:
    # Views, not copies: _read_once is done with each chunk (hashed and
    # sealed) before it takes the next.
    with os.fdopen(fd, "rb", buffering=0, closefd=False) as stream:
        yield from chunker.iter_chunk_views(stream, params)


def _read_whole(fd: int, size: int) -> bytes:
    """The bytes of a small file that ``fstat`` says is ``size`` bytes long.

    One read asks for a byte more than that: if the file grew, the extra byte
    shows it, and the caller's second ``fstat`` reports the change either way.
    A short read (the file shrank) reads on to the end.
    """
    data = os.read(fd, size + 1)
    if len(data) >= size:
        return data
    parts = [data]
    got = len(data)
    while got <= size:
        piece = os.read(fd, size + 1 - got)
        if not piece:
            break
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)
