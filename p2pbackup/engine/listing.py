"""Listing directories for a backup's walk, ahead of it; the lister process.

* **listing** — a directory's entries as (name, lstat), sorted by name; or
  the :class:`OSError` that stands in for a directory that cannot be listed.
* **extended attributes** — each entry's own (a symlink's, not its
  target's), read with its listing (:func:`read_xattrs`): the walk ahead
  makes the system calls, one or more a file, that the backup's walk would
  otherwise make on its own thread.
* **walk ahead** — a walk of the same order as the backup's (depth first,
  entries by name, excluded directories not entered; :func:`walk_listings`),
  whose listings wait until the backup's walk gets there
  (:class:`~p2pbackup.engine.lister.ListingAhead`). It runs in the **lister**,
  a child process (``python -m p2pbackup.engine.listing``: :func:`serve`)
  that sends its listings in frames (:mod:`.listwire`); or, when that
  cannot be, in a worker thread of the backup, a few thousand entries per
  call (:func:`list_ahead`): one thread call per directory made the walk
  wait for a thread, then for the GIL, at every directory
  (docs/performance.md#backup).
* **scan** — :func:`scan`: the regular files the walk will meet and their
  bytes, counted ahead of it in a thread of its own (restic's scan), so
  that progress can say how far along a backup is and when it will end.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import signal
import stat
import sys
import threading
from collections.abc import Iterable, Iterator

import attrs

from p2pbackup.core.exclude import ExcludeRules
from p2pbackup.core.framing import PIPE_READ_SIZE
from p2pbackup.engine.listwire import (
    ENTRIES_PER_FRAME,
    Listed,
    Listing,
    Xattrs,
    decode_setup,
    encode_end,
    encode_listings,
    entries_of,
    frame_reader,
)
from p2pbackup.stores.durable import write_all

log = logging.getLogger(__name__)

#: listxattr's answers for "this filesystem keeps no extended attributes",
#: and getxattr's for "that one went away meanwhile": nothing to keep.
_NO_XATTRS = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOENT, errno.ENODATA})

#: Directory entries listed ahead of the walk in one thread call.
LISTING_BUDGET = 4096


def walk_listings(
    root: bytes, exclude: ExcludeRules, device: int | None, *, xattrs: bool = False
) -> Iterator[Listed]:
    """Every directory from ``root`` (on ``device``; None: not known yet)
    down with its listing, in the walk's own order: depth first, entries by
    name, directories the walk leaves out (:meth:`ExcludeRules.leaves_out`,
    :meth:`ExcludeRules.marked`) not entered, an error standing in for a
    directory that cannot be listed; with ``xattrs``, the extended
    attributes of the entries the walk keeps that have any, by name."""
    try:
        entries: Listing = _list_dir(root)
        if device is None and exclude.one_file_system:
            device = os.lstat(root).st_dev
    except OSError as exc:
        entries = exc
    if isinstance(entries, OSError) or exclude.marked(name for name, _st in entries):
        yield root, entries, {}
        return
    prefix = root.rstrip(b"/")
    attributes: dict[bytes, Xattrs] = {}
    if xattrs:
        for name, st in entries:
            below = prefix + b"/" + name
            if not exclude.leaves_out(below, st.st_dev, device):
                pairs = read_xattrs(below)
                if pairs:
                    attributes[name] = pairs
    yield root, entries, attributes
    for name, st in entries:
        below = prefix + b"/" + name
        if stat.S_ISDIR(st.st_mode) and not exclude.leaves_out(below, st.st_dev, device):
            yield from walk_listings(below, exclude, st.st_dev, xattrs=xattrs)


def walk_roots(roots: Iterable[bytes], exclude: ExcludeRules) -> Iterator[Listed]:
    """The walk ahead of a backup: down from each of ``roots`` in turn, with
    the extended attributes."""
    return itertools.chain.from_iterable(
        walk_listings(root, exclude, None, xattrs=True) for root in roots
    )


def list_ahead(walk: Iterator[Listed], budget: int) -> list[Listed]:
    """The next directories of ``walk``, until about ``budget`` entries are listed."""
    listings = []
    listed = 0
    for path, listing, xattrs in walk:
        listings.append((path, listing, xattrs))
        listed += entries_of(listing)
        if listed >= budget:
            break
    return listings


def _list_dir(path: bytes) -> list[tuple[bytes, os.stat_result]]:
    entries = []
    with os.scandir(path) as it:
        for entry in it:
            entries.append((os.fsencode(entry.name), entry.stat(follow_symlinks=False)))
    entries.sort(key=lambda e: e[0])
    return entries


def read_xattrs(path: bytes) -> Xattrs:
    """The extended attributes of ``path`` itself (a symlink's own, not its
    target's), sorted by name; () where the filesystem keeps none. One that
    cannot be read is left out with a warning: the entry is kept without it."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in _NO_XATTRS:
            log.warning("%s: extended attributes not read: %s", os.fsdecode(path), exc.strerror)
        return ()
    pairs = []
    for name in names:
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in _NO_XATTRS:
                log.warning(
                    "%s: extended attribute %s not read: %s",
                    os.fsdecode(path),
                    name,
                    exc.strerror,
                )
            continue
        pairs.append((os.fsencode(name), value))
    pairs.sort()
    return tuple(pairs)


@attrs.frozen
class ScanTotals:
    """What a backup will go through: regular files, and their bytes."""

    files: int
    bytes: int


def scan(targets: list[bytes], exclude: ExcludeRules, stop: threading.Event) -> ScanTotals | None:
    """The regular files under ``targets`` that ``exclude`` keeps, and their
    bytes, walked as the backup walks (module docstring); None once ``stop``
    is set."""
    files = size = 0
    for target in targets:
        try:
            st = os.lstat(target)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            files, size = files + 1, size + st.st_size
            continue
        for path, listing, _xattrs in walk_listings(target, exclude, None):
            if stop.is_set():
                return None
            if isinstance(listing, OSError):
                continue
            prefix = path.rstrip(b"/")
            for name, entry in listing:
                if stat.S_ISREG(entry.st_mode) and not exclude.excludes(prefix + b"/" + name):
                    files, size = files + 1, size + entry.st_size
    return ScanTotals(files, size)


# -- the lister process (python -m p2pbackup.engine.listing) -----------------------------


def serve(stdin: int, stdout: int) -> None:
    """Walk as the setup frame on ``stdin`` says; write the listings on ``stdout``."""
    reader = frame_reader()
    while (body := reader.next_body()) is None:
        data = os.read(stdin, PIPE_READ_SIZE)
        if not data:
            return  # closed before its setup: nothing was asked
        reader.feed(data)
    setup = decode_setup(body)
    walk = walk_roots(setup.roots, setup.rules)
    while listings := list_ahead(walk, ENTRIES_PER_FRAME):
        write_all(stdout, encode_listings(listings))
    write_all(stdout, encode_end())


def main() -> None:
    # The backup stops its lister; a Ctrl-C at a terminal reaches the whole
    # process group, and must not print a traceback from here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A broken pipe: the backup closed its end, it wants no more listings.
    with contextlib.suppress(BrokenPipeError):
        serve(sys.stdin.fileno(), sys.stdout.fileno())


if __name__ == "__main__":
    main()
