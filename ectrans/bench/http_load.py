"""A lean HTTP/1.1 load driver for `ectrans bench gateway`: one keep-alive connection per simulated
client, requests written as bytes, responses parsed by httptools (the parser uvicorn uses).

Why not aiohttp or httpx: the load shares the machine's cores with Redis and every service, and
aiohttp's client spent about 0.28 ms of CPU per request there (httpx more), most of what the gateway
itself spends; this driver spends about 0.05 ms, so the cores go to what is measured.
It is still real HTTP over TCP: each answer is parsed in full (status, headers, body) and the bench
checks its body.
"""

from __future__ import annotations

import asyncio
from typing import cast

import httptools


class ConnectionClosed(ConnectionError):
    """The server closed the connection before it answered."""


class HttpConnection(asyncio.Protocol):
    """One keep-alive connection, one request in flight at a time (a closed-loop client)."""

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._body: list[bytes] = []
        self._answer: asyncio.Future[tuple[int, bytes]] | None = None
        self.open = False

    @classmethod
    async def connect(cls, host: str, port: int) -> HttpConnection:
        _, connection = await asyncio.get_running_loop().create_connection(cls, host, port)
        return connection

    async def request(self, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
        """Send one request (`head`: request line and headers, without the blank line that ends
        them); its status and body."""
        if not self.open or self._transport is None:
            raise ConnectionClosed("the connection is closed")
        self._answer = asyncio.get_running_loop().create_future()
        self._transport.write(b"%s\r\ncontent-length: %d\r\n\r\n%s" % (head, len(body), body))
        return await self._answer

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # asyncio.Protocol -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses
        self.open = True

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self._fail(exc or ConnectionClosed("the server closed the connection"))

    # httptools callbacks ----------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._body = []

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if not self._parser.should_keep_alive():
            self.open = False
            self.close()
        if self._answer is not None and not self._answer.done():
            self._answer.set_result((self._parser.get_status_code(), b"".join(self._body)))

    def _fail(self, exc: BaseException) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(exc)


def request_head(method: str, path: str, host: str, content_type: str | None = "application/json") -> bytes:
    """The request line and headers, for `HttpConnection.request`."""
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}"]
    if content_type is not None:
        lines.append(f"content-type: {content_type}")
    return "\r\n".join(lines).encode()
