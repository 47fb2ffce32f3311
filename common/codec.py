"""The wire codec: msgpack with numpy arrays as typed binary. Nothing is ever pickled."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

_NDARRAY_EXT = 1
# Hostile payloads: bound what one decode may allocate.
_MAX_BIN = 64 * 1024 * 1024
_MAX_ITEMS = 100_000


class CodecError(ValueError):
    """A payload that is not valid ECTrans msgpack."""


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError("object arrays cannot be encoded")
        arr = np.ascontiguousarray(obj)
        header = msgpack.packb((arr.dtype.str, list(arr.shape)))
        return msgpack.ExtType(_NDARRAY_EXT, header + arr.tobytes())
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != _NDARRAY_EXT:
        raise CodecError(f"unknown msgpack extension type {code}")
    unpacker = msgpack.Unpacker(max_buffer_size=len(data))
    unpacker.feed(data)
    dtype_str, shape = unpacker.unpack()
    body = data[unpacker.tell() :]
    dtype = np.dtype(dtype_str)
    if dtype.hasobject:
        raise CodecError("object arrays are refused")
    count = int(np.prod(shape)) if shape else 1
    if count * dtype.itemsize != len(body):
        raise CodecError("array payload does not match its shape")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def packb(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj, default=_default, use_bin_type=True)
    return packed


def unpackb(data: bytes) -> Any:
    """Decode untrusted bytes; any malformation becomes a CodecError."""
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
        raise CodecError(f"invalid msgpack payload: {exc}") from exc
