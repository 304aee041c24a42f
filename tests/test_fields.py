"""The one set of checks of decoded msgpack fields, as every format uses it."""

from __future__ import annotations

import enum

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pbackup.core.fields import MAX_UINT, FieldChecks, msgpack_kind
from p2pbackup.errors import FormatError, RemoteProtocolError


class Color(enum.IntEnum):
    RED = 1


check = FieldChecks(FormatError)

#: Every type msgpack unpacks to (arrays as tuples), in small and odd forms.
unpacked = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 64), 1 << 64)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=10,
)


def test_each_check_returns_what_it_accepts() -> None:
    assert check.integer(5, "n") == 5
    assert check.integer(-3, "n", low=-3) == -3
    assert check.boolean(False, "b") is False
    assert check.member(Color, 1, "c") is Color.RED
    assert check.binary(b"ab", "b", min_length=2, max_length=2) == b"ab"
    assert check.binary(b"", "b") == b""
    assert check.text("héllo", "t", max_length=5) == "héllo"
    assert check.array((1, 2), "a", min_length=2) == (1, 2)
    assert check.fields((1, "x"), "f", 2) == (1, "x")
    assert check.items((1, 2), "i", lambda v, w: (v, w)) == ((1, "i 0"), (2, "i 1"))
    assert check.optional(None, "o", check.binary) is None
    assert check.optional(b"x", "o", check.binary) == b"x"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: check.integer(True, "n"), "n: expected an integer, got boolean"),
        (lambda: check.integer(1.0, "n"), "n: expected an integer, got float"),
        (lambda: check.integer(-1, "n"), "n: -1 is out of range [0, 9223372036854775807]"),
        (lambda: check.integer(MAX_UINT + 1, "n"), "n: 9223372036854775808 is out of range"),
        (lambda: check.boolean(1, "b"), "b: expected a boolean, got integer"),
        (lambda: check.member(Color, 2, "c"), "c: unknown Color 2"),
        (lambda: check.member(Color, "1", "c"), "c: expected an integer, got string"),
        (lambda: check.binary("x", "b"), "b: expected bytes, got string"),
        (
            lambda: check.binary(b"x", "b", min_length=2),
            "b: expected at least 2 bytes, got 1 bytes",
        ),
        (
            lambda: check.binary(b"xyz", "b", max_length=2),
            "b: expected at most 2 bytes, got 3 bytes",
        ),
        (lambda: check.binary(b"x", "b", min_length=2, max_length=2), "b: expected 2 bytes, got 1"),
        (
            lambda: check.binary(None, "b", min_length=1, max_length=9),
            "b: expected 1 to 9 bytes, got nil",
        ),
        (lambda: check.text(b"x", "t"), "t: expected a string, got bytes"),
        (
            lambda: check.text("", "t", min_length=1, max_length=4),
            "t: expected 1 to 4 characters, got 0 characters",
        ),
        (lambda: check.array([1], "a"), "a: expected an array, got array"),
        (lambda: check.array({}, "a"), "a: expected an array, got map"),
        (
            lambda: check.array((), "a", min_length=1, max_length=3),
            "a: expected 1 to 3 items, got 0 items",
        ),
        (lambda: check.fields((1,), "f", 2), "f: expected 2 fields, got 1"),
        (lambda: check.items((1, "x"), "i", check.integer), "i 1: expected an integer"),
        (lambda: check.optional(1, "o", check.binary), "o: expected bytes, got integer"),
    ],
)
def test_each_problem_is_one_line_naming_the_field(call: object, message: str) -> None:
    assert callable(call)
    with pytest.raises(FormatError) as caught:
        call()
    assert str(caught.value).startswith(message)


def test_the_error_is_the_one_the_format_chose() -> None:
    with pytest.raises(RemoteProtocolError, match=r"^x: expected an integer, got nil$"):
        FieldChecks(RemoteProtocolError).integer(None, "x")


@given(unpacked)
def test_any_unpacked_value_passes_or_raises_the_format_error(value: object) -> None:
    for run in (
        lambda: check.integer(value, "v", low=-(1 << 63)),
        lambda: check.boolean(value, "v"),
        lambda: check.member(Color, value, "v"),
        lambda: check.binary(value, "v", max_length=4),
        lambda: check.text(value, "v", max_length=4),
        lambda: check.fields(value, "v", 2),
        lambda: check.items(value, "v", check.binary, max_length=2),
    ):
        try:
            run()
        except FormatError as error:
            assert str(error).startswith("v")
    kinds = {"nil", "boolean", "integer", "float", "string", "bytes", "array", "map"}
    assert msgpack_kind(value) in kinds
