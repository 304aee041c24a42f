"""The listings of a backup's walk, made ahead of it by the lister process.

Nouns:

* **lister** — a child process (:mod:`.children`; ``python -m
  p2pbackup.engine.listing``) that walks down from the directories it is
  given, in the backup's order, and sends what it listed
  (:mod:`.listwire`); :class:`Lister` is its handle. It lists with a GIL of
  its own: a walk ahead in a thread of the backup makes two system calls an
  entry (lstat, listxattr), each a hand-off of the GIL between it, the event
  loop and the file workers, and took three times as long in a backup as
  alone (docs/performance.md, "The incremental's listings, in a process").
* **walk ahead** — where the listings come from: the lister; or, when one
  cannot start or fails, a walk in a worker thread
  (:func:`.listing.walk_listings`), a few thousand entries
  per thread call, for the rest of the backup.
* :class:`ListingAhead` keeps what the walk ahead listed until the backup's
  walk gets there. The lister sends while the walk works, as far ahead as
  its output pipe holds: memory stays bounded whatever the tree.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator, Mapping, Sequence

import trio

from p2pbackup.core.exclude import ExcludeRules
from p2pbackup.engine import listing
from p2pbackup.engine.children import PipedChild, child_command
from p2pbackup.engine.listwire import (
    Listed,
    ListerSetup,
    Listing,
    ListwireError,
    Xattrs,
    decode_frame,
    encode_setup,
    frame_reader,
)
from p2pbackup.errors import LocalProtocolError

log = logging.getLogger(__name__)

#: How the backup starts its lister; None: it lists in a thread.
LISTER_COMMAND: tuple[str, ...] | None = child_command("p2pbackup.engine.listing")
#: The lister's output pipe: how many bytes of listings it may send ahead of
#: the walk (about ten thousand entries).
_PIPE_SIZE = 1 << 20


class ListerError(LocalProtocolError):
    """A lister process failed to start, died, or broke the pipe protocol."""


class Lister(PipedChild):
    """A running lister process (module docstring)."""

    kind = "lister"
    error = ListerError

    @classmethod
    async def start(cls, setup: ListerSetup) -> Lister:
        command = LISTER_COMMAND
        if command is None:
            raise ListerError("no lister command")
        lister = await cls._spawn(command, frame_reader(), encode_setup(setup))
        stdout = lister._process.stdout
        if isinstance(stdout, trio.lowlevel.FdStream):
            with contextlib.suppress(OSError):  # a smaller pipe: the lister runs less far ahead
                fcntl.fcntl(stdout.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        return lister

    async def next_listings(self) -> list[Listed]:
        """The next directories listed, in the walk's order; none once all are."""
        try:
            listed = decode_frame(await self._receive_body())
        except ListwireError as exc:
            raise ListerError(f"lister process {self.pid} sent a bad frame: {exc}") from None
        return [] if listed is None else listed


class ListingAhead:
    """The listings of one backup's walk, listed ahead of it (module docstring)."""

    def __init__(self, exclude: ExcludeRules) -> None:
        self._exclude = exclude
        #: Directories listed ahead of the walk, until it gets there.
        self._listings: dict[bytes, tuple[Listing, Mapping[bytes, Xattrs]]] = {}
        self._lister: Lister | None = None
        self._thread_walk: Iterator[Listed] | None = None
        #: Whether a lister process is wanted (no more once one failed).
        self._by_lister = LISTER_COMMAND is not None

    async def listing(self, path: bytes) -> tuple[Listing, Mapping[bytes, Xattrs]]:
        """The entries of ``path`` and, by name, the extended attributes of
        those that have any, from the walk ahead (started there if the walk
        did not expect ``path``: the first directory of a target)."""
        listed = self._listings.pop(path, None)
        if listed is not None:
            return listed
        for attempt in range(2):
            if attempt or (self._lister is None and self._thread_walk is None):
                # The first directory of a target, or the walk ahead lost its way.
                await self._start((path,))
            listings = await self._next(path)
            if not listings:
                await self._stop()
            self._listings.update((where, (listing, xattrs)) for where, listing, xattrs in listings)
            listed = self._listings.pop(path, None)
            if listed is not None:
                return listed
        raise AssertionError(f"a walk from {path!r} did not list it first")

    async def start(self, roots: Sequence[bytes]) -> None:
        """Start walking ahead down from ``roots``, the directories the
        backup's walk will list first, in its order, before it asks: a
        lister takes a moment to start."""
        await self._start(tuple(roots))

    async def aclose(self) -> None:
        """Stop the walk ahead."""
        await self._stop()

    async def _start(self, roots: tuple[bytes, ...]) -> None:
        """A walk ahead from ``roots``: by a lister if one is wanted and starts."""
        await self._stop()
        if self._by_lister:
            try:
                self._lister = await Lister.start(ListerSetup(roots, self._exclude))
                return
            except ListerError as exc:
                self._lister_failed(exc)
        self._thread_walk = listing.walk_roots(roots, self._exclude)

    async def _next(self, path: bytes) -> list[Listed]:
        """The next listings of the walk ahead, which the walk wants from ``path`` on."""
        if self._lister is not None:
            try:
                return await self._lister.next_listings()
            except ListerError as exc:
                self._lister_failed(exc)
                await self._stop()
                self._thread_walk = listing.walk_roots((path,), self._exclude)
        assert self._thread_walk is not None
        # Looked up here, where a test can set them.
        return await trio.to_thread.run_sync(
            listing.list_ahead, self._thread_walk, listing.LISTING_BUDGET
        )

    def _lister_failed(self, error: ListerError) -> None:
        self._by_lister = False
        log.warning("%s; listing in a thread instead", error)

    async def _stop(self) -> None:
        self._listings.clear()
        self._thread_walk = None
        lister, self._lister = self._lister, None
        if lister is not None:
            await lister.aclose()
