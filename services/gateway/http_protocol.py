"""The gateway's HTTP protocol: uvicorn's httptools one with two changes. A request its parser refuses
(two Content-Lengths, a 100 KB URL, bytes that are not HTTP) is answered in OpenAI's error shape, as
every other error is, not in uvicorn's plain text (the request never reached a route, so its endpoint
and TEI's shape are unknown). A request whose headers are not complete within `headers_timeout_s`
loses its connection: uvicorn waits for them without end, so idle or trickling connections (slowloris)
could hold every file descriptor the gateway has."""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ectrans.services.gateway.errors import GatewayError, render

logger = logging.getLogger(__name__)
INVALID = "Invalid HTTP request received."  # what uvicorn warns, once per refused request


class QuietParserWarnings(logging.Filter):
    """Drops uvicorn's warning per request its parser refuses: a client sending garbage would write a
    log line per request. Each still gets its 400, and a DEBUG line here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != INVALID


def quiet_parser_warnings() -> None:
    logging.getLogger("uvicorn.error").addFilter(QuietParserWarnings())


class GatewayHttpProtocol(HttpToolsProtocol):
    headers_timeout_s = 30.0  # set by `http_protocol`
    _headers_due: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._await_headers()

    def on_headers_complete(self) -> None:
        self._headers_arrived()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._headers_arrived()
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        if self._headers_due is None:
            self._headers_due = self.loop.call_later(self.headers_timeout_s, self.transport.close)

    def _headers_arrived(self) -> None:
        if self._headers_due is not None:
            self._headers_due.cancel()
            self._headers_due = None

    def send_400_response(self, msg: str) -> None:
        logger.debug("[gateway] a request refused by the HTTP parser: %s", msg)
        body = render(GatewayError(400, msg, "bad_request")).body
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def http_protocol(headers_timeout_s: float) -> type[GatewayHttpProtocol]:
    """The protocol class for uvicorn's `http` setting (it takes a class, not an instance)."""
    return type("GatewayHttpProtocol", (GatewayHttpProtocol,), {"headers_timeout_s": headers_timeout_s})
