"""Checks of values that came out of msgpack: one field at a time (pure).

Every format this package decodes from msgpack — the persisted formats
(:mod:`p2pbackup.core.formats`), the storage protocol's messages
(:mod:`p2pbackup.wire.messages`) and the sealer pipe
(:mod:`p2pbackup.engine.sealwire`) — checks each decoded field with these.

Nouns:

* **field** — one value in a decoded msgpack structure, named by ``what``:
  where it sits, for a human ("tree: node 3: mode"). Every problem is raised
  as ``what: problem``.
* **kind** — what msgpack calls a value's type ("integer", "bytes",
  "array", "map", "nil", ...), as :func:`msgpack_kind` names it. msgpack
  arrays unpack as tuples here (``use_list=False``); ``true`` is a boolean,
  never the integer 1.
* **field checks** — :class:`FieldChecks`: the checks, bound to the error
  class the format raises (FormatError, a protocol error, ...), so that each
  format reports its problems as its own.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import NoReturn, TypeVar

import attrs

#: The largest integer any of these formats carries: SQLite's integers, where
#: most of them end up, are signed 64-bit.
MAX_UINT = (1 << 63) - 1

_T = TypeVar("_T")
_E = TypeVar("_E", bound=enum.IntEnum)
_S = TypeVar("_S", bytes, str, tuple[object, ...])

# What msgpack calls the Python types the unpacker produces.
_MSGPACK_KINDS: dict[type, str] = {
    bytes: "bytes",
    str: "string",
    tuple: "array",
    list: "array",
    dict: "map",
    bool: "boolean",
    int: "integer",
    float: "float",
    type(None): "nil",
}


def msgpack_kind(value: object) -> str:
    """What msgpack calls the type of an unpacked ``value`` ("integer", "array"…),
    for error messages about structures that came off a disk or the wire."""
    return _MSGPACK_KINDS.get(type(value), type(value).__name__)


def _span(min_length: int, max_length: int | None, unit: str) -> str:
    """How many ``unit`` are expected: "32 bytes", "1 to 64 items", "at most 5 items"."""
    if max_length is None:
        return unit if min_length == 0 else f"at least {min_length} {unit}"
    if min_length == max_length:
        return f"{min_length} {unit}"
    if min_length == 0:
        return f"at most {max_length} {unit}"
    return f"{min_length} to {max_length} {unit}"


@attrs.frozen
class FieldChecks:
    """The checks, each returning the value it accepts, or raising
    ``error(f"{what}: {problem}")``."""

    error: Callable[[str], Exception]

    def fail(self, what: str, problem: str) -> NoReturn:
        raise self.error(f"{what}: {problem}")

    def integer(self, value: object, what: str, *, low: int = 0, high: int = MAX_UINT) -> int:
        # bool is an int subclass in Python but a distinct msgpack type.
        if type(value) is not int:
            self.fail(what, f"expected an integer, got {msgpack_kind(value)}")
        if not low <= value <= high:
            self.fail(what, f"{value} is out of range [{low}, {high}]")
        return value

    def boolean(self, value: object, what: str) -> bool:
        if type(value) is not bool:
            self.fail(what, f"expected a boolean, got {msgpack_kind(value)}")
        return value

    def member(self, enum_type: type[_E], value: object, what: str) -> _E:
        """The member of ``enum_type`` whose value ``value`` is."""
        number = self.integer(value, what, low=-MAX_UINT - 1)
        try:
            return enum_type(number)
        except ValueError:
            self.fail(what, f"unknown {enum_type.__name__} {number}")

    def binary(
        self, value: object, what: str, *, min_length: int = 0, max_length: int | None = None
    ) -> bytes:
        """Bytes of ``min_length`` to ``max_length`` (None: any) bytes."""
        if type(value) is not bytes:
            expected = _span(min_length, max_length, "bytes")
            self.fail(what, f"expected {expected}, got {msgpack_kind(value)}")
        return self._sized(bytes, "bytes", value, what, min_length, max_length, "bytes")

    def text(
        self, value: object, what: str, *, min_length: int = 0, max_length: int | None = None
    ) -> str:
        """A string of ``min_length`` to ``max_length`` (None: any) characters."""
        return self._sized(str, "a string", value, what, min_length, max_length, "characters")

    def array(
        self, value: object, what: str, *, min_length: int = 0, max_length: int | None = None
    ) -> tuple[object, ...]:
        """An array of ``min_length`` to ``max_length`` (None: any) items."""
        return self._sized(tuple, "an array", value, what, min_length, max_length, "items")

    def _sized(
        self,
        kind: type[_S],
        kind_name: str,
        value: object,
        what: str,
        min_length: int,
        max_length: int | None,
        unit: str,
    ) -> _S:
        # The exact type: bool is no integer here, and a list no array.
        if type(value) is not kind:
            self.fail(what, f"expected {kind_name}, got {msgpack_kind(value)}")
        length = len(value)
        if length < min_length or (max_length is not None and length > max_length):
            expected = _span(min_length, max_length, unit)
            self.fail(what, f"expected {expected}, got {length} {unit}")
        return value

    def fields(self, value: object, what: str, count: int) -> tuple[object, ...]:
        """An array of exactly ``count`` items: a structure's fields."""
        if type(value) is not tuple:
            self.fail(what, f"expected an array, got {msgpack_kind(value)}")
        if len(value) != count:
            self.fail(what, f"expected {count} fields, got {len(value)}")
        return value

    def items(
        self,
        value: object,
        what: str,
        build: Callable[[object, str], _T],
        *,
        max_length: int | None = None,
    ) -> tuple[_T, ...]:
        """An array, each item built by ``build`` and named ``what i``."""
        array = self.array(value, what, max_length=max_length)
        return tuple(build(item, f"{what} {i}") for i, item in enumerate(array))

    def optional(self, value: object, what: str, build: Callable[[object, str], _T]) -> _T | None:
        """None for nil, else ``build``'s value."""
        return None if value is None else build(value, what)
