"""The wire codec: msgpack with numpy arrays as typed binary. Nothing is ever pickled.

Decoding takes untrusted bytes (anyone who can write to Redis can write a payload), so it is bounded:
the payload's size, every declared length (a header claiming 4 G items fails before any allocation),
the nesting depth (msgpack's own stack of 1024), and arrays must be plain numeric, boolean or string
dtypes whose shape matches their bytes exactly. Any malformation is a `CodecError`, never another
exception. What a decode can allocate is linear in the payload: at most a few dozen bytes of Python
objects per payload byte (an empty list is one byte on the wire).
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

_NDARRAY_EXT = 1
# Hostile payloads: bound what one decode may allocate.
_MAX_BIN = 64 * 1024 * 1024
_MAX_ITEMS = 100_000
MAX_PAYLOAD_BYTES = _MAX_BIN
_ARRAY_KINDS = "biufcSU"  # bool, integers, floats, complex, bytes and str: nothing with pointers or fields
_MAX_DIMS = 32


class CodecError(ValueError):
    """A payload that is not valid ECTrans msgpack."""


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError("object arrays cannot be encoded")
        header = msgpack.packb((obj.dtype.str, list(obj.shape)))  # ascontiguousarray makes 0-d arrays 1-d
        return msgpack.ExtType(_NDARRAY_EXT, header + np.ascontiguousarray(obj).tobytes())
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != _NDARRAY_EXT:
        raise CodecError(f"unknown msgpack extension type {code}")
    unpacker = msgpack.Unpacker(
        max_buffer_size=max(len(data), 1), max_str_len=64, max_bin_len=0, max_array_len=_MAX_DIMS, max_map_len=0,
        max_ext_len=0,
    )  # fmt: skip
    unpacker.feed(data)
    header = unpacker.unpack()
    if not isinstance(header, list | tuple) or len(header) != 2:
        raise CodecError("array header must be [dtype, shape]")
    dtype_str, shape = header
    if not isinstance(dtype_str, str) or not isinstance(shape, list | tuple):
        raise CodecError("array header must be [dtype, shape]")
    if not all(type(n) is int and n >= 0 for n in shape):
        raise CodecError("array shape must be non-negative integers")
    try:
        dtype = np.dtype(dtype_str)
    except TypeError as exc:
        raise CodecError(f"bad array dtype {dtype_str!r}") from exc
    if dtype.kind not in _ARRAY_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise CodecError(f"array dtype {dtype_str!r} is refused: plain numbers, booleans and strings only")
    body = data[unpacker.tell() :]
    if math.prod(shape) * dtype.itemsize != len(body):
        raise CodecError("array payload does not match its shape")
    return np.frombuffer(body, dtype=dtype).reshape(tuple(shape))  # a list `[]` would not give 0-d


def packb(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj, default=_default, use_bin_type=True)
    return packed


def unpackb(data: bytes, *, max_bytes: int = MAX_PAYLOAD_BYTES) -> Any:
    """Decode untrusted bytes; any malformation becomes a CodecError."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError(f"payload must be bytes, not {type(data).__name__}")
    if len(data) > max_bytes:
        raise CodecError(f"payload of {len(data)} bytes is over the limit of {max_bytes}")
    try:
        return msgpack.unpackb(
            data,
            ext_hook=_ext_hook,
            raw=False,
            strict_map_key=True,
            max_bin_len=_MAX_BIN,
            max_str_len=_MAX_BIN,
            max_array_len=_MAX_ITEMS,
            max_map_len=_MAX_ITEMS,
            max_ext_len=_MAX_BIN,
        )
    except CodecError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise CodecError(f"invalid msgpack payload: {type(exc).__name__}: {exc}") from exc
