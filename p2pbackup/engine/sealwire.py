"""The pipe protocol between a backup and its sealer processes: frames and their codecs.

Sans-IO: bytes in, values out. :mod:`p2pbackup.engine.sealer` moves the bytes.

Nouns:

* **frame** — as on every pipe to a child (:mod:`.pipeframes`): a 4-byte
  big-endian body length, then a msgpack array whose first item is the
  frame kind (:func:`frame_reader` cuts the stream).
* **setup** — the first frame to a sealer: the protocol version, the keys and
  the chunker params. The keys cross a pipe between two processes of the same
  user, never a command line or an environment.
* **batch** — paths of files for a sealer to read (with ``reading.read_file``).
* **results** — one read outcome per path of a batch, in its order: the file
  stat and the chunks (id, plaintext length, sealed blob or nil when the
  sealer already sealed that id in this run), or why the file was left out.

A sealer is a child of the backup that started it, running the same code, so
a frame that does not decode is a bug or a broken pipe, never an attack; the
decoders still check every field, and say which one is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from p2pbackup.core.chunker import ChunkerParams
from p2pbackup.core.crypto import KEY_SIZE
from p2pbackup.core.fields import FieldChecks
from p2pbackup.engine.pipeframes import PipeCodec
from p2pbackup.errors import LocalProtocolError, UsageError
from p2pbackup.model import ID_SIZE, FileStat, ReadOutcome, SealingKeys

#: The version a setup frame carries; a sealer refuses any other.
PROTOCOL_VERSION = 1
#: Largest frame body: a batch's results are at most a batch of small files
#: (8 MiB), sealed.
MAX_FRAME = 64 << 20

KIND_SETUP = 1
KIND_BATCH = 2
KIND_RESULTS = 3


class SealwireError(LocalProtocolError):
    """A frame between a backup and its sealer that does not decode."""


#: This pipe's frames (:mod:`.pipeframes`).
_CODEC = PipeCodec(MAX_FRAME, SealwireError)
_frame = _CODEC.frame
frame_reader = _CODEC.reader

#: The checks of decoded fields, raising SealwireError.
_check = FieldChecks(SealwireError)


@attrs.frozen
class Setup:
    keys: SealingKeys
    params: ChunkerParams


@attrs.frozen
class SealedChunk:
    """A chunk of a file a sealer read: ``sealed`` is None if it sealed the id before."""

    ident: bytes
    length: int
    sealed: bytes | None = attrs.field(repr=False)


@attrs.frozen
class SealedFile:
    """A sealer's read outcome for one path, with the chunks it read."""

    outcome: ReadOutcome
    chunks: tuple[SealedChunk, ...] = ()


# -- encoding ---------------------------------------------------------------------------


def encode_setup(setup: Setup) -> bytes:
    params = setup.params
    return _frame(
        [
            KIND_SETUP,
            PROTOCOL_VERSION,
            setup.keys.dedup_key,
            setup.keys.data_key,
            [params.min_size, params.avg_size, params.max_size, params.seed],
        ]
    )


def encode_batch(paths: Sequence[bytes]) -> bytes:
    return _frame([KIND_BATCH, list(paths)])


def encode_results(files: Sequence[SealedFile]) -> bytes:
    body: list[object] = []
    for file in files:
        stat = file.outcome.stat
        body.append(
            [
                file.outcome.error,
                None
                if stat is None
                else [
                    stat.st_mode,
                    stat.st_size,
                    stat.st_mtime_ns,
                    stat.st_ctime_ns,
                    stat.st_ino,
                    stat.st_uid,
                    stat.st_gid,
                ],
                [[c.ident, c.length, c.sealed] for c in file.chunks],
            ]
        )
    return _frame([KIND_RESULTS, body])


# -- decoding ---------------------------------------------------------------------------


def decode_setup(body: bytes) -> Setup:
    fields = _CODEC.unpack(body, "setup", KIND_SETUP)
    if len(fields) != 5:
        raise SealwireError(f"setup frame: expected 5 fields, got {len(fields)}")
    version = _check.integer(fields[1], "setup version")
    if version != PROTOCOL_VERSION:
        raise SealwireError(
            f"setup frame of protocol version {version}; this sealer speaks {PROTOCOL_VERSION}"
        )
    dedup_key = _key(fields[2], "dedup key")
    data_key = _key(fields[3], "data key")
    sizes = _check.fields(fields[4], "chunker params", 4)
    try:
        params = ChunkerParams(*(_check.integer(v, "chunker param") for v in sizes))
    except UsageError as exc:
        raise SealwireError(f"chunker params: {exc}") from None
    return Setup(SealingKeys(dedup_key, data_key), params)


def decode_batch(body: bytes) -> tuple[bytes, ...]:
    fields = _CODEC.unpack(body, "batch", KIND_BATCH)
    paths = _check.array(fields[1] if len(fields) == 2 else None, "batch paths")
    return tuple(_check.binary(path, f"batch path {i}") for i, path in enumerate(paths))


def decode_results(body: bytes) -> tuple[SealedFile, ...]:
    fields = _CODEC.unpack(body, "results", KIND_RESULTS)
    files = _check.array(fields[1] if len(fields) == 2 else None, "results")
    return tuple(_sealed_file(item, f"result {i}") for i, item in enumerate(files))


def _key(value: object, what: str) -> bytes:
    return _check.binary(value, what, min_length=KEY_SIZE, max_length=KEY_SIZE)


def _sealed_file(item: object, what: str) -> SealedFile:
    error, stat_fields, chunk_items = _check.fields(item, what, 3)
    if error is not None:
        return SealedFile(ReadOutcome(error=_check.text(error, f"{what} error")))
    stat_values = _check.fields(stat_fields, f"{what} stat", 7)
    stat = FileStat(*(_check.integer(v, f"{what} stat") for v in stat_values))
    chunks = []
    for j, chunk_item in enumerate(_check.array(chunk_items, f"{what} chunks")):
        chunk = f"{what} chunk {j}"
        ident, length, sealed = _check.fields(chunk_item, chunk, 3)
        chunks.append(
            SealedChunk(
                _check.binary(ident, f"{chunk} id", min_length=ID_SIZE, max_length=ID_SIZE),
                _check.integer(length, f"{chunk} length"),
                _check.optional(sealed, f"{chunk} blob", _check.binary),
            )
        )
    content = tuple(c.ident for c in chunks)
    return SealedFile(ReadOutcome(content, stat), tuple(chunks))
