"""The benchmark's shaped link: bandwidth is paced, delay is added once per direction, and the link
is shared by the connections through it. Timing bands are loose: the box is shared and noisy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from ectrans.bench.shaper import Shaper

KB = 1000
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()


async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads a 4-byte length, then that many bytes, then answers one byte."""
    size = int.from_bytes(await reader.readexactly(4), "big")
    await reader.readexactly(size)
    writer.write(b"k")
    await writer.drain()
    writer.close()


async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads a 4-byte length, then sends that many bytes."""
    size = int.from_bytes(await reader.readexactly(4), "big")
    writer.write(bytes(size))
    await writer.drain()
    writer.close()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1024):
        writer.write(data)
        await writer.drain()
    writer.close()


async def upload_s(port: int, size: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.perf_counter()
    writer.write(size.to_bytes(4, "big") + bytes(size))
    assert await reader.readexactly(1) == b"k"
    writer.close()
    return time.perf_counter() - started


async def download_s(port: int, size: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.perf_counter()
    writer.write(size.to_bytes(4, "big"))
    assert len(await reader.readexactly(size)) == size
    writer.close()
    return time.perf_counter() - started


async def round_trips_ms(port: int, n: int = 5) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    times = []
    for _ in range(n):
        started = time.perf_counter()
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        times.append((time.perf_counter() - started) * 1000)
    writer.close()
    return times


def test_100_kb_at_8_mbit_takes_100_ms_each_way() -> None:
    async def scenario() -> tuple[float, float]:
        async with serving(sink) as up_port, serving(source) as down_port:
            async with Shaper("127.0.0.1", up_port, rate_bps=8e6, delay_ms=0) as link:
                up = await upload_s(link.port, 100 * KB)
            async with Shaper("127.0.0.1", down_port, rate_bps=8e6, delay_ms=0) as link:
                down = await download_s(link.port, 100 * KB)
            return up, down

    up, down = asyncio.run(scenario())
    assert up == pytest.approx(0.100, rel=0.4)
    assert down == pytest.approx(0.100, rel=0.4)


def test_delay_is_added_once_each_way_to_a_round_trip() -> None:
    async def scenario() -> tuple[float, float]:
        async with serving(echo) as port:
            bare = min(await round_trips_ms(port))
            async with Shaper("127.0.0.1", port, rate_bps=1e9, delay_ms=20) as link:
                shaped = min(await round_trips_ms(link.port))
            return bare, shaped

    bare, shaped = asyncio.run(scenario())
    assert shaped - bare == pytest.approx(40, rel=0.4)


def test_connections_share_the_link_and_the_rate_can_change() -> None:
    async def scenario() -> tuple[float, float]:
        async with serving(sink) as port, Shaper("127.0.0.1", port, rate_bps=8e6, delay_ms=0) as link:
            started = time.perf_counter()
            await asyncio.gather(upload_s(link.port, 50 * KB), upload_s(link.port, 50 * KB))
            shared = time.perf_counter() - started
            link.rate_bps = 80e6
            faster = await upload_s(link.port, 100 * KB)
            return shared, faster

    shared, faster = asyncio.run(scenario())
    assert shared == pytest.approx(0.100, rel=0.4)  # 2 x 50 kB on one 8 Mbit/s link
    assert faster < 0.05  # 10 ms of wire time, plus the box's noise


def test_the_proxy_passes_bytes_unchanged_and_stops_cleanly() -> None:
    payload = bytes(range(256)) * 400  # 100 kB, several chunks

    async def scenario() -> bytes:
        async with serving(echo) as port, Shaper("127.0.0.1", port, rate_bps=1e9, delay_ms=0.5) as link:
            reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
            writer.write(payload)
            writer.write_eof()
            got = await reader.read()  # until the echo server closes, through the proxy
            writer.close()
            return got
        # Leaving the block cancelled nothing still running: asyncio.run would warn of pending tasks.

    assert asyncio.run(scenario()) == payload
    with pytest.raises(ValueError, match="rate_bps"):
        Shaper("127.0.0.1", 1, rate_bps=0)
