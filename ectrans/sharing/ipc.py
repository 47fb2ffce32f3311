"""Length-prefixed frames between the worker and its model processes (pipes and Unix sockets).

A frame is a 4-byte big-endian length and that many bytes of msgpack (`ectrans.common.codec`);
nothing is pickled. Over a Unix socket a frame may carry file descriptors (SCM_RIGHTS), which is
how a weight holder hands its sealed shared-memory file to an executor. This module imports
neither numpy nor torch: the CPU weight holder's server runs with nothing else loaded.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from typing import Any

HEADER = struct.Struct(">I")
MAX_FRAME = 1 << 30
MAX_FDS = 8


class ChannelClosed(EOFError):
    """The other end went away in the middle of a frame."""


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def read_exact(fd: int, size: int) -> bytes | None:
    """`size` bytes, or None on end of file before the first byte."""
    chunks: list[bytes] = []
    missing = size
    while missing:
        chunk = os.read(fd, missing)
        if not chunk:
            if missing == size:
                return None
            raise ChannelClosed(f"end of file after {size - missing} of {size} bytes")
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


def write_frame(fd: int, payload: bytes) -> None:
    if len(payload) > MAX_FRAME:
        raise ValueError(f"frame of {len(payload)} bytes is over the {MAX_FRAME} byte limit")
    write_all(fd, HEADER.pack(len(payload)) + payload)


def read_frame(fd: int) -> bytes | None:
    """The next frame's payload; None when the writer closed its end between frames."""
    header = read_exact(fd, HEADER.size)
    if header is None:
        return None
    (size,) = HEADER.unpack(header)
    if size > MAX_FRAME:
        raise ChannelClosed(f"frame header announces {size} bytes, over the {MAX_FRAME} byte limit")
    payload = read_exact(fd, size)
    if payload is None and size:
        raise ChannelClosed("end of file after a frame header")
    return payload or b""


def send_frame(sock: socket.socket, payload: bytes, fds: list[int] | None = None) -> None:
    """One frame over a Unix stream socket; `fds` travel with its header."""
    header = HEADER.pack(len(payload))
    if fds:
        sent = socket.send_fds(sock, [header], fds)
        if sent != len(header):  # a 4-byte message is never split in practice; be exact anyway
            sock.sendall(header[sent:])
    else:
        sock.sendall(header)
    sock.sendall(payload)


def recv_frame(sock: socket.socket, max_fds: int = MAX_FDS) -> tuple[bytes, list[int]] | None:
    """The next frame and the descriptors that came with it; None on a clean end of stream."""
    header, fds, _flags, _addr = socket.recv_fds(sock, HEADER.size, max_fds)
    if not header:
        return None
    while len(header) < HEADER.size:
        more = sock.recv(HEADER.size - len(header))
        if not more:
            raise ChannelClosed("end of stream inside a frame header")
        header += more
    (size,) = HEADER.unpack(header)
    if size > MAX_FRAME:
        raise ChannelClosed(f"frame header announces {size} bytes, over the {MAX_FRAME} byte limit")
    chunks: list[bytes] = []
    missing = size
    while missing:
        chunk = sock.recv(min(missing, 1 << 20))
        if not chunk:
            raise ChannelClosed(f"end of stream after {size - missing} of {size} bytes")
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks), list(fds)


class FrameWriter:
    """Frames of msgpack objects onto one file descriptor, from any thread."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        from ectrans.common.codec import packb

        payload = packb(message)
        with self._lock:
            write_frame(self.fd, payload)


def decode(payload: bytes) -> dict[str, Any]:
    """A frame's msgpack payload as a dict (what every ECTrans frame is)."""
    from ectrans.common.codec import CodecError, unpackb

    message = unpackb(payload)
    if not isinstance(message, dict):
        raise CodecError(f"a frame must hold a map, not {type(message).__name__}")
    return message


def private_stdout() -> int:
    """Move this process's stdout to a private descriptor for frames and point fd 1 at stderr, so
    that a stray print from any library cannot corrupt the frame stream."""
    frames = os.dup(1)
    os.dup2(2, 1)
    return frames
