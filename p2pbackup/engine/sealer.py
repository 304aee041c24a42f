"""Sealer processes: small files read, chunked, identified and sealed outside the GIL.

A backup of many small files is not limited by a core but by the GIL: each
file is ten short calls that release it (open, fstat, read, hash, zstd,
seal, close), and with the event loop and two worker threads wanting it,
every release is a hand-off between threads. A **sealer** is a child
process (``python -m p2pbackup.engine.sealer``) that does that work for batches of
small files with a GIL of its own; the backup keeps the deduplication, the
packing and the uploads.

Nouns:

* **sealer** — the child process, and :class:`Sealer`, its handle in the
  backup. It reads a setup frame, then answers each batch frame with a
  results frame (:mod:`p2pbackup.engine.sealwire`), until its stdin closes.
* **sent ids** — the ids whose sealed blob a sealer has already sent in this
  run. It seals every other chunk it reads, since it does not know the
  backup's index: the backup claims each id as usual and drops the blobs of
  ids it already has.

The keys reach the sealer through its stdin (a pipe), never its command line
or environment. A sealer that cannot start, dies, or sends a frame that does
not decode is a :class:`SealerError`; the backup then reads that batch, and
the rest, in threads.
"""

from __future__ import annotations

import os
import signal
import sys

from p2pbackup.core.framing import PIPE_READ_SIZE
from p2pbackup.engine import runtime
from p2pbackup.engine.children import PipedChild, child_command
from p2pbackup.engine.reading import prefetch, read_file
from p2pbackup.engine.sealwire import (
    SealedChunk,
    SealedFile,
    SealwireError,
    Setup,
    decode_batch,
    decode_results,
    decode_setup,
    encode_batch,
    encode_results,
    encode_setup,
    frame_reader,
)
from p2pbackup.errors import LocalProtocolError
from p2pbackup.stores.durable import write_all

#: How the backup starts a sealer (:func:`~p2pbackup.engine.children.child_command`).
SEALER_COMMAND = child_command("p2pbackup.engine.sealer")


class SealerError(LocalProtocolError):
    """A sealer process failed to start, died, or broke the pipe protocol."""


# -- the child --------------------------------------------------------------------------


def serve(stdin: int, stdout: int) -> None:
    """Answer batches from ``stdin`` on ``stdout`` until ``stdin`` closes."""
    reader = frame_reader()

    def next_body() -> bytes | None:
        while (body := reader.next_body()) is None:
            data = os.read(stdin, PIPE_READ_SIZE)
            if not data:
                if reader.buffered:
                    raise SealwireError(f"stdin closed inside a frame ({reader.buffered} bytes)")
                return None
            reader.feed(data)
        return body

    first = next_body()
    if first is None:
        return
    setup = decode_setup(first)
    sent: set[bytes] = set()
    while (body := next_body()) is not None:
        paths = decode_batch(body)
        prefetch(paths)
        files = [_seal_file(path, setup, sent) for path in paths]
        write_all(stdout, encode_results(files))


def _seal_file(path: bytes, setup: Setup, sent: set[bytes]) -> SealedFile:
    sealed_here: dict[bytes, bytes] = {}
    lengths: dict[bytes, int] = {}

    def claim(ident: bytes) -> bool:
        return ident not in sent and ident not in sealed_here

    def sink(ident: bytes, length: int, sealed: bytes | None) -> None:
        lengths[ident] = length
        if sealed is not None:
            sealed_here[ident] = sealed

    outcome = read_file(path, setup.params, setup.keys, claim, sink)
    chunks = []
    # Blobs sealed in an attempt that the file changed under are not sent:
    # only the content of the attempt that read it whole.
    for ident in outcome.content:
        sealed = None if ident in sent else sealed_here.get(ident)
        if sealed is not None:
            sent.add(ident)
        chunks.append(SealedChunk(ident, lengths[ident], sealed))
    return SealedFile(outcome, tuple(chunks))


def main() -> None:
    # The backup stops its sealers; a Ctrl-C at a terminal reaches the whole
    # process group, and must not print a traceback from here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with runtime.rare_collections():
        serve(sys.stdin.fileno(), sys.stdout.fileno())


# -- the backup's side ------------------------------------------------------------------


class Sealer(PipedChild):
    """A running sealer process; use as ``async with await Sealer.start(setup)``."""

    kind = "sealer"
    error = SealerError

    @classmethod
    async def start(cls, setup: Setup) -> Sealer:
        return await cls._spawn(SEALER_COMMAND, frame_reader(), encode_setup(setup))

    async def seal(self, paths: list[bytes]) -> tuple[SealedFile, ...]:
        """The outcome of reading each of ``paths``, in order."""
        await self._send(encode_batch(paths))
        try:
            files = decode_results(await self._receive_body())
        except SealwireError as exc:
            # Not a file's fault: the batch goes to the threads like any failure.
            raise SealerError(f"sealer process {self.pid} sent a bad frame: {exc}") from None
        if len(files) != len(paths):
            raise SealerError(f"a sealer answered {len(files)} files for a batch of {len(paths)}")
        return files


if __name__ == "__main__":
    main()
