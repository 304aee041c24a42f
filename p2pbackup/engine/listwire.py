"""The pipe protocol between a backup and its lister process: frames and their codecs.

Sans-IO: bytes in, values out. :mod:`p2pbackup.engine.lister` moves the bytes.

Nouns:

* **frame** — as on every pipe to a child (:mod:`.pipeframes`): a 4-byte
  big-endian body length, then a msgpack array whose first item is the
  frame kind (:func:`frame_reader` cuts the stream).
* **setup** — the one frame to a lister: the protocol version, the
  directories to walk from (in the order the backup's walk meets them) and
  the rules that leave entries out (:class:`ListerSetup`).
* **listings** — directories listed, in the walk's order: each its path and
  either its entries (name and lstat fields, by name) with the extended
  attributes of those that have any, or the error (errno and message) that
  stands in for a directory that cannot be listed.
* **end** — the last frame: the walk is done.

A lister is a child of the backup that started it, running the same code,
so a frame that does not decode is a bug or a broken pipe, never an attack;
the decoders still check every field, and say which one is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import attrs

from p2pbackup.core.exclude import ExcludeRules
from p2pbackup.core.fields import FieldChecks
from p2pbackup.engine.pipeframes import PipeCodec
from p2pbackup.errors import LocalProtocolError, UsageError

#: The version a setup frame carries; a lister refuses any other.
PROTOCOL_VERSION = 1
#: Largest frame body: a frame holds about ENTRIES_PER_FRAME entries, or one
#: directory of many more (a million entries is some 80 MB).
MAX_FRAME = 256 << 20
#: Entries a lister puts in one frame (more when one directory holds more).
ENTRIES_PER_FRAME = 512

KIND_SETUP = 1
KIND_LISTINGS = 2
KIND_END = 3

#: The lstat fields an entry carries, in this order after its name.
_STAT_FIELDS = 13

#: A directory's entries (name, lstat) sorted by name, or why it could not be listed.
Listing = list[tuple[bytes, os.stat_result]] | OSError
#: An entry's extended attributes: (name, value) sorted by name.
Xattrs = tuple[tuple[bytes, bytes], ...]
#: One directory listed: its path, its listing, and the extended attributes
#: of its entries that have any, by name.
Listed = tuple[bytes, Listing, Mapping[bytes, Xattrs]]


class ListwireError(LocalProtocolError):
    """A frame between a backup and its lister that does not decode."""


#: This pipe's frames (:mod:`.pipeframes`).
_CODEC = PipeCodec(MAX_FRAME, ListwireError)
_frame = _CODEC.frame
frame_reader = _CODEC.reader

#: The checks of decoded fields, raising ListwireError.
_check = FieldChecks(ListwireError)


@attrs.frozen
class ListerSetup:
    """What a lister walks: ``roots`` in order, each down, as ``rules`` say."""

    roots: tuple[bytes, ...]
    rules: ExcludeRules


# -- encoding ---------------------------------------------------------------------------


def encode_setup(setup: ListerSetup) -> bytes:
    rules = setup.rules
    return _frame(
        [
            KIND_SETUP,
            PROTOCOL_VERSION,
            list(setup.roots),
            list(rules.patterns),
            sorted(rules.markers),
            rules.one_file_system,
        ]
    )


def stat_fields(st: os.stat_result) -> list[int]:
    """The lstat fields an entry carries (Linux's ``struct stat``)."""
    return [
        st.st_mode,
        st.st_ino,
        st.st_dev,
        st.st_nlink,
        st.st_uid,
        st.st_gid,
        st.st_size,
        st.st_atime_ns,
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_blksize,
        st.st_blocks,
        st.st_rdev,
    ]


def encode_listings(listed: Iterable[Listed]) -> bytes:
    body: list[object] = []
    for path, listing, xattrs in listed:
        if isinstance(listing, OSError):
            message = listing.strerror if listing.strerror is not None else str(listing)
            body.append([path, [listing.errno or 0, message], [], {}])
        else:
            entries = [[name, *stat_fields(st)] for name, st in listing]
            body.append(
                [path, None, entries, {name: list(pairs) for name, pairs in xattrs.items()}]
            )
    return _frame([KIND_LISTINGS, body])


def encode_end() -> bytes:
    return _frame([KIND_END])


# -- decoding ---------------------------------------------------------------------------


def decode_setup(body: bytes) -> ListerSetup:
    fields = _CODEC.unpack(body, "setup", KIND_SETUP)
    if len(fields) != 6:
        raise ListwireError(f"setup frame: expected 6 fields, got {len(fields)}")
    version = _check.integer(fields[1], "setup version")
    if version != PROTOCOL_VERSION:
        raise ListwireError(
            f"setup frame of protocol version {version}; this lister speaks {PROTOCOL_VERSION}"
        )
    roots = tuple(
        _check.binary(root, f"root {i}") for i, root in enumerate(_check.array(fields[2], "roots"))
    )
    patterns = [_check.text(p, "exclude pattern") for p in _check.array(fields[3], "patterns")]
    markers = [
        os.fsdecode(_check.binary(m, "exclude marker")) for m in _check.array(fields[4], "markers")
    ]
    if not isinstance(fields[5], bool):
        raise ListwireError(f"one file system: expected a boolean, got {type(fields[5]).__name__}")
    try:
        rules = ExcludeRules.from_patterns(patterns, if_present=markers, one_file_system=fields[5])
    except UsageError as exc:
        raise ListwireError(f"exclude rules: {exc}") from None
    return ListerSetup(roots, rules)


def decode_frame(body: bytes) -> list[Listed] | None:
    """The directories a listings frame holds; None for the end frame."""
    fields = _CODEC.unpack(body, "listings")
    if fields[0] == KIND_END and len(fields) == 1:
        return None
    if fields[0] != KIND_LISTINGS or len(fields) != 2:
        raise ListwireError(f"expected a listings frame, got a frame of kind {fields[0]}")
    return [_listed(item, i) for i, item in enumerate(_check.array(fields[1], "listings"))]


def _listed(item: object, index: int) -> Listed:
    what = f"listing {index}"
    path, error, entries, xattrs = _check.fields(item, what, 4)
    path = _check.binary(path, f"{what} path")
    if error is not None:
        number, message = _check.fields(error, f"{what} error", 2)
        number = _check.integer(number, f"{what} errno")
        return path, OSError(number, _check.text(message, f"{what} error message")), {}
    listing = [_entry(entry, what) for entry in _check.array(entries, f"{what} entries")]
    return path, listing, _xattrs(xattrs, what)


def _entry(entry: object, what: str) -> tuple[bytes, os.stat_result]:
    # The one check per entry that a walk of many files pays for: a name and
    # integers (a sum of integers is one; of anything else, a float or an error).
    try:
        if (
            type(entry) is not tuple
            or len(entry) != 1 + _STAT_FIELDS
            or type(entry[0]) is not bytes
            or type(sum(entry[1:])) is not int
        ):
            raise TypeError
    except TypeError:
        raise ListwireError(f"{what}: an entry is not a name and {_STAT_FIELDS} integers") from None
    name, mode, ino, dev, nlink, uid, gid, size, atime, mtime, ctime, blksize, blocks, rdev = entry
    return name, os.stat_result(
        (mode, ino, dev, nlink, uid, gid, size,
         atime // 1_000_000_000, mtime // 1_000_000_000, ctime // 1_000_000_000,
         atime / 1e9, mtime / 1e9, ctime / 1e9, atime, mtime, ctime, blksize, blocks, rdev)
    )  # fmt: skip


def _xattrs(value: object, what: str) -> dict[bytes, Xattrs]:
    if not isinstance(value, dict):
        raise ListwireError(f"{what} extended attributes: expected a map")
    found: dict[bytes, Xattrs] = {}
    for name, pairs in value.items():
        name = _check.binary(name, f"{what} extended attributes' entry")
        found[name] = tuple(
            (_check.binary(key, f"{what} attribute name"), _check.binary(v, f"{what} value"))
            for key, v in (
                _check.fields(pair, f"{what} attribute", 2)
                for pair in _check.array(pairs, f"{what} attributes")
            )
        )
    return found


def entries_of(listing: Listing) -> int:
    """How many entries ``listing`` holds (a directory not listed counts one)."""
    return len(listing) if isinstance(listing, list) else 1
