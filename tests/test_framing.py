"""The one frame reader: whole frames whatever pieces the bytes come in, and a
length over the limit refused before any of its body arrives."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pbackup.core.framing import FrameReader, length_prefix
from p2pbackup.errors import RemoteProtocolError

prefix_sizes = st.sampled_from([2, 4])


def frame(body: bytes, prefix_size: int) -> bytes:
    return length_prefix(len(body), prefix_size) + body


def drain(reader: FrameReader) -> list[bytes]:
    bodies = []
    while (body := reader.next_body()) is not None:
        bodies.append(body)
    return bodies


@given(
    prefix_size=prefix_sizes,
    bodies=st.lists(st.binary(max_size=300), max_size=8),
    data=st.data(),
)
def test_random_splits_yield_the_same_bodies(
    prefix_size: int, bodies: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(frame(body, prefix_size) for body in bodies)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    reader = FrameReader(prefix_size=prefix_size, max_body_size=300)
    got: list[bytes] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        piece = stream[start:end]
        reader.feed(memoryview(piece) if start % 2 else piece)
        got.extend(drain(reader))
        assert reader.buffered == end - sum(prefix_size + len(body) for body in got)
    assert got == bodies
    assert reader.buffered == 0


@given(prefix_size=prefix_sizes, body=st.binary(max_size=100))
def test_a_frame_fed_a_byte_at_a_time_appears_only_when_whole(
    prefix_size: int, body: bytes
) -> None:
    data = frame(body, prefix_size)
    reader = FrameReader(prefix_size=prefix_size)
    for i in range(len(data)):
        assert reader.next_frame() is None
        reader.feed(data[i : i + 1])
    assert reader.next_body() == body
    assert reader.next_body() is None


@given(
    prefix_size=prefix_sizes,
    limit=st.integers(0, 1000),
    excess=st.integers(1, 1000),
    split=st.integers(0, 4),
)
def test_an_oversized_length_is_refused_before_its_body_arrives(
    prefix_size: int, limit: int, excess: int, split: int
) -> None:
    prefix = length_prefix(limit + excess, prefix_size)
    split = min(split, prefix_size - 1)
    reader = FrameReader(prefix_size=prefix_size, max_body_size=limit, error=RemoteProtocolError)
    reader.feed(prefix[:split])
    assert reader.next_frame() is None  # not a whole prefix yet: nothing to judge
    reader.feed(prefix[split:])
    # Not one byte of the body was fed: the prefix alone is refused.
    with pytest.raises(RemoteProtocolError, match=f"frame of {limit + excess} bytes exceeds"):
        reader.next_frame()
    # Broken for good: it takes no more bytes and refuses again.
    reader.feed(frame(b"", prefix_size))
    assert reader.buffered == 0
    with pytest.raises(RemoteProtocolError):
        reader.next_body()


@given(prefix_size=prefix_sizes, limit=st.integers(1, 1000))
def test_the_largest_allowed_length_waits_for_its_body(prefix_size: int, limit: int) -> None:
    reader = FrameReader(prefix_size=prefix_size, max_body_size=limit)
    reader.feed(length_prefix(limit, prefix_size) + bytes(limit // 2))
    assert reader.next_frame() is None
    reader.feed(bytes(limit - limit // 2))
    assert reader.next_body() == bytes(limit)


def test_frames_are_read_in_place_until_consumed() -> None:
    reader = FrameReader(prefix_size=2)
    reader.feed(frame(b"one", 2) + frame(b"", 2) + frame(b"three", 2) + b"\x00")
    spans = []
    position = 0
    while (span := reader.frame_at(position)) is not None:
        spans.append(span)
        position = span[1]
    assert [bytes(reader.buffer[start:end]) for start, end in spans] == [b"one", b"", b"three"]
    reader.consume(position)
    assert reader.buffered == 1 and reader.next_frame() is None


def test_the_error_is_the_callers() -> None:
    class PipeError(Exception):
        pass

    reader = FrameReader(prefix_size=4, max_body_size=3, error=PipeError)
    reader.feed(length_prefix(4, 4))
    with pytest.raises(PipeError, match="frame of 4 bytes exceeds the limit of 3"):
        reader.next_frame()
    with pytest.raises(ValueError, match="2 or 4 bytes"):
        FrameReader(prefix_size=3)
