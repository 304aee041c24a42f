"""Tests for p2pbackup.core.erasure: the code is reedsolo's, and any k shards decode."""

from __future__ import annotations

import itertools
import random
import sys

import numpy as np
import pytest
import reedsolo
from hypothesis import given
from hypothesis import strategies as st

from p2pbackup.core import erasure
from p2pbackup.errors import ErasureError, NotEnoughShardsError
from p2pbackup.model import BytesLike


@st.composite
def code_and_data(draw: st.DrawFn, max_n: int = 64, max_size: int = 300) -> tuple[int, int, bytes]:
    n = draw(st.integers(2, max_n))
    k = draw(st.integers(1, n - 1))
    # Sizes near multiples of k (and 0 and 1) are where padding goes wrong.
    size = draw(
        st.one_of(
            st.sampled_from([0, 1]),
            st.tuples(st.integers(0, 6), st.integers(0, 4)).map(lambda t: k * t[0] + t[1]),
            st.integers(0, max_size),
        )
    )
    return k, n, draw(st.binary(min_size=size, max_size=size))


def columns(shards: list[bytes]) -> list[bytes]:
    return [bytes(shard[j] for shard in shards) for j in range(len(shards[0]))]


def assert_reedsolo_codewords(shards: list[bytes], k: int, n: int) -> None:
    codec = reedsolo.RSCodec(n - k)
    for j, column in enumerate(columns(shards)):
        assert bytes(codec.encode(column[:k])) == column, f"column {j}"


# --- the code is reedsolo's -----------------------------------------------------


@given(code_and_data())
def test_every_column_is_a_reedsolo_codeword(case: tuple[int, int, bytes]) -> None:
    k, n, data = case
    shards = erasure.encode(data, k, n)
    length = erasure.shard_length(len(data), k)
    assert len(shards) == n
    assert all(len(shard) == length for shard in shards)
    # Systematic: the data shards are the zero-padded data cut in k slices.
    assert b"".join(shards[:k]) == data + bytes(k * length - len(data))
    assert_reedsolo_codewords(shards, k, n)


@given(code_and_data(), st.randoms(use_true_random=False))
def test_reedsolo_erasure_decoding_agrees(case: tuple[int, int, bytes], rnd: random.Random) -> None:
    k, n, data = case
    if not data:
        return
    shards = erasure.encode(data, k, n)
    erased = sorted(rnd.sample(range(n), rnd.randint(1, n - k)))
    kept = {i: s for i, s in enumerate(shards) if i not in erased}
    j = rnd.randrange(len(shards[0]))
    column = bytearray(columns(shards)[j])
    for i in erased:
        column[i] = 0
    message, _, _ = reedsolo.RSCodec(n - k).decode(column, erase_pos=erased, only_erasures=True)
    ours = erasure.reconstruct(kept, k, n, range(k))
    assert bytes(message) == bytes(ours[i][j] for i in range(k))


def test_field_tables_match_reedsolo() -> None:
    reedsolo.RSCodec(1)  # installs reedsolo's default field tables
    for a, b in itertools.product(range(256), repeat=2):
        assert erasure._MUL[a, b] == reedsolo.gf_mul(a, b)
    for a in range(1, 256):
        assert erasure._INV[a] == reedsolo.gf_inverse(a)


@pytest.mark.parametrize("coefficient", [2, 3, 0x8E, 0xFF])
def test_pair_table_multiplies_both_bytes(coefficient: int) -> None:
    table = erasure._pair_table(coefficient)
    for a, b in [(0, 0), (1, 0), (0, 1), (0x53, 0xCA), (0xFF, 0x80)]:
        word = int.from_bytes(bytes([a, b]), "little" if _little_endian() else "big")
        product = int(table[word]).to_bytes(2, "little" if _little_endian() else "big")
        assert product == bytes([erasure._MUL[coefficient, a], erasure._MUL[coefficient, b]])


def _little_endian() -> bool:
    return sys.byteorder == "little"


def test_block_boundaries_and_odd_lengths(monkeypatch: pytest.MonkeyPatch) -> None:
    # A tiny block makes every size below cross several blocks, with a partial last one.
    monkeypatch.setattr(erasure, "_BLOCK_WORDS", 3)
    rnd = random.Random(7)
    for k, n in [(2, 5), (4, 10), (5, 7)]:
        for size in (k * 13, k * 13 - 1, k * 6 + 1):
            data = rnd.randbytes(size)
            shards = erasure.encode(data, k, n)
            assert_reedsolo_codewords(shards, k, n)
            parity_only = dict(enumerate(shards))
            for i in range(min(k, n - k)):
                del parity_only[i]
            assert erasure.decode(parity_only, k, n, size) == data


def test_large_buffer_default_blocks() -> None:
    k, n = 4, 6
    data = random.Random(3).randbytes(k * (2 * erasure._BLOCK_WORDS * 2 + 3) - 1)
    shards = erasure.encode(data, k, n)
    codec = reedsolo.RSCodec(n - k)
    length = len(shards[0])
    for j in (0, 2 * erasure._BLOCK_WORDS - 1, 2 * erasure._BLOCK_WORDS, length - 1):
        column = bytes(shard[j] for shard in shards)
        assert bytes(codec.encode(column[:k])) == column
    assert erasure.decode({i: shards[i] for i in (1, 3, 4, 5)}, k, n, len(data)) == data


# --- any k shards decode -------------------------------------------------------


@given(code_and_data(), st.randoms(use_true_random=False))
def test_any_k_shards_decode(case: tuple[int, int, bytes], rnd: random.Random) -> None:
    k, n, data = case
    shards = erasure.encode(data, k, n)
    chosen = rnd.sample(range(n), k)
    assert erasure.decode({i: shards[i] for i in chosen}, k, n, len(data)) == data


@given(code_and_data(max_n=24), st.randoms(use_true_random=False))
def test_reconstruct_rebuilds_exact_shards(
    case: tuple[int, int, bytes], rnd: random.Random
) -> None:
    k, n, data = case
    shards = erasure.encode(data, k, n)
    chosen = rnd.sample(range(n), k)
    wanted = [i for i in range(n) if i not in chosen] + [chosen[0]]
    rnd.shuffle(wanted)
    rebuilt = erasure.reconstruct({i: shards[i] for i in chosen}, k, n, wanted)
    assert rebuilt == {i: shards[i] for i in wanted}


def test_every_erasure_pattern_small_codes() -> None:
    rnd = random.Random(1)
    for n in range(2, 7):
        for k in range(1, n):
            data = rnd.randbytes(3 * k + 1)
            shards = erasure.encode(data, k, n)
            for chosen in itertools.combinations(range(n), k):
                given_shards = {i: shards[i] for i in chosen}
                assert erasure.decode(given_shards, k, n, len(data)) == data
                assert erasure.reconstruct(given_shards, k, n, range(n)) == dict(enumerate(shards))


def test_every_erasure_pattern_4_of_10() -> None:
    data = random.Random(2).randbytes(1001)
    shards = erasure.encode(data, 4, 10)
    for chosen in itertools.combinations(range(10), 4):
        assert erasure.decode({i: shards[i] for i in chosen}, 4, 10, len(data)) == data


def test_more_than_k_shards_prefers_data_shards() -> None:
    data = random.Random(4).randbytes(100)
    shards = erasure.encode(data, 3, 6)
    given_shards = dict(enumerate(shards))
    # Corrupt parity is never read when every data shard is present...
    given_shards[4] = bytes(len(shards[4]))
    assert erasure.decode(given_shards, 3, 6, len(data)) == data
    # ...and with one data shard missing, the lowest parity shard is used.
    del given_shards[1]
    assert erasure.decode(given_shards, 3, 6, len(data)) == data


def test_empty_input_round_trips() -> None:
    shards = erasure.encode(b"", 3, 5)
    assert shards == [b""] * 5
    assert erasure.decode({3: b"", 4: b"", 0: b""}, 3, 5, 0) == b""
    assert erasure.reconstruct({2: b"", 3: b"", 4: b""}, 3, 5, [0, 1]) == {0: b"", 1: b""}


def test_accepts_bytearray_and_memoryview() -> None:
    data = bytearray(random.Random(5).randbytes(50))
    shards = erasure.encode(memoryview(data), 2, 4)
    assert shards == erasure.encode(data, 2, 4) == erasure.encode(bytes(data), 2, 4)
    given_shards: dict[int, BytesLike] = {
        2: bytearray(shards[2]),
        3: memoryview(shards[3]),
    }
    assert erasure.decode(given_shards, 2, 4, len(data)) == data


def test_numpy_integer_indices() -> None:
    shards = erasure.encode(b"abcdefg", 2, 3)
    given_shards = {np.int64(1): shards[1], np.uint8(2): shards[2]}
    assert erasure.decode(given_shards, 2, 3, 7) == b"abcdefg"  # type: ignore[arg-type]
    assert erasure.reconstruct(given_shards, 2, 3, [np.int64(0)]) == {0: shards[0]}  # type: ignore[arg-type, list-item]


def test_decode_truncates_to_size() -> None:
    shards = erasure.encode(b"abcdefg", 2, 3)
    assert erasure.decode({1: shards[1], 2: shards[2]}, 2, 3, 5) == b"abcde"


@pytest.mark.parametrize(
    ("size", "k", "expected"), [(0, 1, 0), (0, 4, 0), (1, 4, 1), (8, 4, 2), (9, 4, 3)]
)
def test_shard_length(size: int, k: int, expected: int) -> None:
    assert erasure.shard_length(size, k) == expected


# --- misuse is refused ----------------------------------------------------------


def test_fewer_than_k_shards() -> None:
    shards = erasure.encode(b"x" * 40, 4, 6)
    given_shards = {0: shards[0], 4: shards[4], 5: shards[5]}
    with pytest.raises(NotEnoughShardsError, match=r"needs 4 shards; 3 were given"):
        erasure.decode(given_shards, 4, 6, 40)
    with pytest.raises(NotEnoughShardsError):
        erasure.reconstruct(given_shards, 4, 6, [1])


def test_unequal_lengths() -> None:
    with pytest.raises(ErasureError, match="unequal lengths"):
        erasure.decode({0: b"ab", 1: b"abc"}, 2, 3, 4)
    with pytest.raises(ErasureError, match="unequal lengths"):
        erasure.reconstruct({0: b"ab", 1: b"ab", 2: b"a"}, 2, 3, [0])


@pytest.mark.parametrize("index", [-1, 5, 255])
def test_index_out_of_range(index: int) -> None:
    with pytest.raises(ErasureError, match="out of range"):
        erasure.decode({index: b"ab", 1: b"ab", 2: b"ab"}, 3, 5, 6)
    with pytest.raises(ErasureError, match="out of range"):
        erasure.reconstruct({0: b"ab", 1: b"ab", 2: b"ab"}, 3, 5, [index])


def test_repeated_wanted_index() -> None:
    with pytest.raises(ErasureError, match="repeat"):
        erasure.reconstruct({0: b"a", 1: b"b"}, 2, 3, [2, 2])


@pytest.mark.parametrize(
    ("k", "n"), [(0, 1), (0, 3), (3, 3), (4, 2), (1, 256), (200, 300), (-1, 2), (True, 3)]
)
def test_bad_code_parameters(k: int, n: int) -> None:
    with pytest.raises(ErasureError, match="bad erasure code parameters"):
        erasure.encode(b"abc", k, n)
    with pytest.raises(ErasureError, match="bad erasure code parameters"):
        erasure.decode({0: b"a"}, k, n, 1)
    with pytest.raises(ErasureError, match="bad erasure code parameters"):
        erasure.reconstruct({0: b"a"}, k, n, [0])


@pytest.mark.parametrize("size", [-1, 7])
def test_bad_size(size: int) -> None:
    shards = erasure.encode(b"abcdef", 3, 4)
    with pytest.raises(ErasureError, match="cannot decode"):
        erasure.decode(dict(enumerate(shards)), 3, 4, size)


def test_widest_code() -> None:
    data = random.Random(6).randbytes(600)
    for k in (1, 128, 254):
        shards = erasure.encode(data, k, 255)
        chosen = random.Random(k).sample(range(255), k)
        assert erasure.decode({i: shards[i] for i in chosen}, k, 255, len(data)) == data


@given(code_and_data(), st.integers(0, 9))
def test_encode_into_writes_what_encode_returns(case: tuple[int, int, bytes], offset: int) -> None:
    """Into views behind a header of ``offset`` bytes, odd shard lengths included."""
    k, n, data = case
    length = erasure.shard_length(len(data), k)
    buffers = [bytearray(b"\xaa" * (offset + length)) for _ in range(n)]
    erasure.encode_into(data, k, n, [memoryview(b)[offset:] for b in buffers])
    assert [bytes(b[offset:]) for b in buffers] == erasure.encode(data, k, n)
    assert all(b[:offset] == b"\xaa" * offset for b in buffers)  # the header space untouched


@given(code_and_data(), st.lists(st.integers(0, 300), max_size=6))
def test_encode_parts_into_codes_the_concatenation(
    case: tuple[int, int, bytes], cuts: list[int]
) -> None:
    """A pack is coded from its parts: any split of the data, empty parts and
    odd shard lengths included, gives the shards of the whole."""
    k, n, data = case
    bounds = sorted(min(c, len(data)) for c in cuts)
    parts = [data[a:b] for a, b in zip([0, *bounds], [*bounds, len(data)], strict=True)]
    length = erasure.shard_length(len(data), k)
    buffers = [bytearray(b"\xaa" * length) for _ in range(n)]
    erasure.encode_parts_into(parts, k, n, [memoryview(b) for b in buffers])
    assert [bytes(b) for b in buffers] == erasure.encode(data, k, n)


@given(code_and_data())
def test_unfilled_buffers_take_a_whole_encoding(case: tuple[int, int, bytes]) -> None:
    k, n, data = case
    length = erasure.shard_length(len(data), k)
    buffers = erasure.unfilled_buffers(n, 3 + length)
    assert [(len(b), b.readonly) for b in buffers] == [(3 + length, False)] * n
    for buffer in buffers:
        buffer[:3] = b"hdr"
    erasure.encode_into(data, k, n, [b[3:] for b in buffers])
    assert [bytes(b) for b in buffers] == [b"hdr" + s for s in erasure.encode(data, k, n)]


def test_unfilled_buffers_refuse_negative_sizes() -> None:
    with pytest.raises(ErasureError, match="cannot make"):
        erasure.unfilled_buffers(2, -1)
    assert erasure.unfilled_buffers(0, 10) == []


def test_encode_into_checks_its_buffers() -> None:
    with pytest.raises(ErasureError, match="3 output buffers"):
        erasure.encode_into(b"abcdef", 2, 3, [memoryview(bytearray(3))] * 2)
    with pytest.raises(ErasureError, match="3 bytes"):
        erasure.encode_into(b"abcdef", 2, 3, [memoryview(bytearray(4)) for _ in range(3)])
