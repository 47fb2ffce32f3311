"""The msgpack codec: round trips, and hostile payloads that must end in a CodecError — quickly and
without allocating what a header claims."""

from __future__ import annotations

import contextlib
import struct
import time
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ectrans.common import codec
from ectrans.common.codec import CodecError


def ndarray_ext(header: Any, body: bytes = b"", code: int = 1) -> bytes:
    """A payload holding one array extension with a hand-made header."""
    packed: bytes = msgpack.packb(msgpack.ExtType(code, msgpack.packb(header) + body))
    return packed


@pytest.mark.parametrize(
    "value",
    [
        None,
        {"text": "héllo", "token_ids": [1, 2, 3], "nested": {"ok": True, "x": 1.5}},
        [b"\x00\xff", -(2**63), 2**64 - 1],
        np.arange(6, dtype=np.float32).reshape(2, 3),
        np.array(3.5, dtype=np.float64),  # 0-d
        np.zeros((0, 384), dtype=np.float16),
        np.array([True, False]),
        np.array(["ab", "c"]),
        {"vector": np.ones(384, dtype=np.float32), "chars": np.int64(7)},
    ],
)
def test_round_trip(value: Any) -> None:
    back = codec.unpackb(codec.packb(value))
    if isinstance(value, dict) and "vector" in value:
        assert np.array_equal(back["vector"], value["vector"]) and back["chars"] == 7
    elif isinstance(value, np.ndarray):
        assert back.dtype == value.dtype and back.shape == value.shape and np.array_equal(back, value)
    else:
        assert back == value


def test_objects_are_never_encoded() -> None:
    with pytest.raises(TypeError):
        codec.packb(np.array([object()]))
    with pytest.raises(TypeError):
        codec.packb({"f": lambda: 0})


VALID = codec.packb({"vector": np.arange(8, dtype=np.float32), "text": "abc", "ids": [1, 2, 3]})


@pytest.mark.parametrize("cut", range(len(VALID)))
def test_every_truncation_is_refused(cut: int) -> None:
    with pytest.raises(CodecError):
        codec.unpackb(VALID[:cut])


HOSTILE = {
    "trailing bytes": VALID + b"\x00",
    "array of 4G items": b"\xdd\xff\xff\xff\xff",
    "map of 4G pairs": b"\xdf\xff\xff\xff\xff",
    "str of 4 GiB": b"\xdb\xff\xff\xff\xff" + b"a" * 16,
    "bin of 4 GiB": b"\xc6\xff\xff\xff\xff" + b"a" * 16,
    "ext of 4 GiB": b"\xc9\xff\xff\xff\xff\x01" + b"a" * 16,
    "nested lists 100k deep": b"\x91" * 100_000 + b"\xc0",
    "nested maps 100k deep": b"\x81\xa1k" * 100_000 + b"\xc0",
    "int map key": msgpack.packb({1: 2}),
    "never-used type byte": b"\xc1",
    "unknown extension": msgpack.packb(msgpack.ExtType(42, b"x")),
    "array header not a pair": ndarray_ext(["<f4"]),
    "array header not a list": ndarray_ext("<f4"),
    "array dtype not text": ndarray_ext([4, [1]], b"\x00" * 4),
    "array dtype unknown": ndarray_ext(["<q9", [1]], b"\x00" * 4),
    "object array": ndarray_ext(["|O", [1]], b"\x00" * 8),
    "structured array with an object field": ndarray_ext([[["a", "|O"]], [1]], b"\x00" * 8),
    "void array": ndarray_ext(["|V8", [1]], b"\x00" * 8),
    "subarray dtype of 8 GB items": ndarray_ext(["(1000000000,)<f8", [1]]),
    "negative shape": ndarray_ext(["<f4", [-1]], b"\x00" * 4),
    "two unknown dims": ndarray_ext(["<f4", [-1, -4]], b"\x00" * 16),
    "shape of floats": ndarray_ext(["<f4", [1.0]], b"\x00" * 4),
    "shape of bools": ndarray_ext(["<f4", [True]], b"\x00" * 4),
    "shape product overflowing int64": ndarray_ext(["<f4", [2**32, 2**32]]),
    "shape of 33 dims": ndarray_ext(["<f4", [1] * 33], b"\x00" * 4),
    "body shorter than shape": ndarray_ext(["<f4", [4]], b"\x00" * 15),
    "body longer than shape": ndarray_ext(["<f4", [4]], b"\x00" * 17),
    "zero-size string dtype": ndarray_ext(["<U0", [10**9]]),
    "header with a 4G-item array": msgpack.packb(msgpack.ExtType(1, b"\xdd\xff\xff\xff\xff")),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_payloads_are_refused_cheaply(name: str) -> None:
    started = time.perf_counter()
    with pytest.raises(CodecError):
        codec.unpackb(HOSTILE[name])
    assert time.perf_counter() - started < 1.0, "refusing must not work through what a header claims"


def test_payload_size_limit() -> None:
    big = codec.packb(b"x" * 2048)
    assert codec.unpackb(big, max_bytes=4096) == b"x" * 2048
    with pytest.raises(CodecError, match="over the limit"):
        codec.unpackb(big, max_bytes=1024)


@pytest.mark.parametrize("wrong", ["a string", 12, None, ["a", "list"]])
def test_wrong_input_types(wrong: Any) -> None:
    with pytest.raises(CodecError):
        codec.unpackb(wrong)


def test_the_array_body_is_read_not_copied() -> None:
    body = struct.pack("<4f", 1, 2, 3, 4)
    array = codec.unpackb(ndarray_ext(["<f4", [2, 2]], body))
    assert array.tolist() == [[1.0, 2.0], [3.0, 4.0]] and not array.flags.writeable


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_decode_or_raise_codec_error(data: bytes) -> None:
    with contextlib.suppress(CodecError):
        codec.unpackb(data)


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(min_value=0, max_value=200))
def test_random_corruption_of_a_valid_payload(noise: bytes, at: int) -> None:
    at = min(at, len(VALID))
    with contextlib.suppress(CodecError):
        codec.unpackb(VALID[:at] + noise + VALID[at + len(noise) :])
