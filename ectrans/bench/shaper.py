"""A shaped link in user space: a TCP proxy that limits bandwidth and adds delay, both directions.

    async with Shaper("127.0.0.1", 6379, rate_bps=10e6, delay_ms=2.0) as link:
        client = AsyncClient(link.url)     # every byte to and from Redis crosses the shaped link
        link.rate_bps = 1e6                # a slower link from now on

Each direction is one serial link shared by every connection through the proxy, as a client's
uplink is: a chunk read from one side is released to the other at
`max(now, link_free_at) + 8·len/rate` (its serialisation, after what is already on the wire)
plus the one-way delay. Reading and writing are separate tasks joined by a queue, so the delay
of one chunk overlaps the next one's (a pipe, not a stop-and-wait). The proxy buffers without
limit: the benchmark's sender never waits on a full router queue, only on the link.

`tc` in a network namespace would shape the kernel's packets instead, but needs privileges a
developer's machine or CI container often lacks; this needs none.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from types import TracebackType

CHUNK_BYTES = 16 * 1024
BITS_PER_BYTE = 8
DEFAULT_DELAY_MS = 2.0  # one way: an edge client's ~4 ms round trip


class Direction:
    """One direction of the link: a rate, a delay, and when its wire is next free (loop time, s)."""

    def __init__(self, shaper: Shaper) -> None:
        self._shaper = shaper
        self._free_at = 0.0

    def release_at(self, n_bytes: int, now: float) -> float:
        """When a chunk of `n_bytes` read at `now` is due at the far side; books the wire for it."""
        start = max(now, self._free_at)
        self._free_at = start + BITS_PER_BYTE * n_bytes / self._shaper.rate_bps
        return self._free_at + self._shaper.delay_ms / 1000.0


class Shaper:
    """A shaped TCP proxy on a free loopback port in front of `target_host:target_port`."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        rate_bps: float,
        delay_ms: float = DEFAULT_DELAY_MS,
        *,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.rate_bps = rate_bps
        self.delay_ms = delay_ms
        self.chunk_bytes = chunk_bytes
        self.up = Direction(self)  # client → target
        self.down = Direction(self)  # target → client
        self.port = 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def rate_bps(self) -> float:
        return self._rate_bps

    @rate_bps.setter
    def rate_bps(self, value: float) -> None:
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"rate_bps={value} must be finite and positive")
        self._rate_bps = value

    @property
    def delay_ms(self) -> float:
        return self._delay_ms

    @delay_ms.setter
    def delay_ms(self, value: float) -> None:
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"delay_ms={value} must be finite and non-negative")
        self._delay_ms = value

    @property
    def url(self) -> str:
        """A Redis URL for clients that should reach the target through the shaped link."""
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> Shaper:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()  # no new connections
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        self._connections.clear()
        if self._server is not None:
            # Closed after the connections: wait_closed waits for the handlers of the ones accepted.
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Shaper:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        # The connection runs in a task of its own, not asyncio's handler task: stopping cancels it,
        # and a cancelled handler task makes asyncio 3.11 log a spurious error.
        task = asyncio.create_task(self._serve(client_r, client_w))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            target_r, target_w = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            await _close(client_w)
            return
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pipe(client_r, target_w, self.up))
                tg.create_task(self._pipe(target_r, client_w, self.down))
        except* (ConnectionError, OSError):
            pass  # one side went away: the connection is over either way
        finally:
            await _close(client_w)
            await _close(target_w)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: Direction) -> None:
        """Forward one direction: a reader that timestamps chunks, a writer that releases them on time."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def read() -> None:
            while data := await reader.read(self.chunk_bytes):
                queue.put_nowait((direction.release_at(len(data), loop.time()), data))
            queue.put_nowait((0.0, b""))  # end of stream, after what is still on the wire

        async def write() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()  # a half-close passes through, as TCP's FIN would
                    return
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        async with asyncio.TaskGroup() as tg:
            tg.create_task(read())
            tg.create_task(write())


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()
