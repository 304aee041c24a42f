"""Frames on the pipes between a backup and its child processes.

Sans-IO: the one encoding that the sealers' protocol (:mod:`.sealwire`) and
the lister's (:mod:`.listwire`) both speak.

Nouns:

* **frame** — a 4-byte big-endian body length, then a msgpack body: an
  array whose first item is the frame's **kind**.
* **pipe codec** — :class:`PipeCodec`: one protocol's largest frame and
  error class; it packs bodies into frames, cuts a stream into bodies
  (:meth:`PipeCodec.reader`) and unpacks them.
"""

from __future__ import annotations

import attrs
import msgpack

from p2pbackup.core.framing import FrameReader, length_prefix
from p2pbackup.errors import LocalProtocolError

_PREFIX_SIZE = 4


@attrs.frozen
class PipeCodec:
    """The frames of one pipe protocol (module docstring)."""

    #: Largest frame body, in bytes.
    max_frame: int
    #: What a frame that does not encode or decode raises.
    error: type[LocalProtocolError]

    def frame(self, body: list[object]) -> bytes:
        """``body`` (its kind first) as a frame."""
        packed = msgpack.packb(body, use_bin_type=True)
        assert isinstance(packed, bytes)
        if len(packed) > self.max_frame:
            raise self.error(
                f"a frame of {len(packed)} bytes exceeds the limit of {self.max_frame}"
            )
        return length_prefix(len(packed), _PREFIX_SIZE) + packed

    def reader(self) -> FrameReader:
        """A reader of this protocol's frames: bodies up to the limit, its error beyond."""
        return FrameReader(prefix_size=_PREFIX_SIZE, max_body_size=self.max_frame, error=self.error)

    def unpack(self, body: bytes, what: str, kind: int | None = None) -> tuple[object, ...]:
        """The array of a ``what`` frame's body, of ``kind`` (None: any kind)."""
        try:
            value = msgpack.unpackb(body, use_list=False, raw=False, strict_map_key=True)
        except Exception as exc:  # every way a body can fail to parse is one error here
            problem = f"{type(exc).__name__}: {exc}"
            raise self.error(f"a {what} frame does not parse ({problem})") from None
        if not (isinstance(value, tuple) and value and isinstance(value[0], int)):
            raise self.error(f"expected a {what} frame, got a {type(value).__name__}")
        if kind is not None and value[0] != kind:
            raise self.error(f"expected a {what} frame, got a frame of kind {value[0]}")
        return value
