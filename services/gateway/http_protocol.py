"""The gateway's HTTP protocol: uvicorn's httptools one with two changes. A request its parser refuses
(two Content-Lengths, a 100 KB URL, bytes that are not HTTP) is answered in OpenAI's error shape, as
every other error is, not in uvicorn's plain text (the request never reached a route, so its endpoint
and TEI's shape are unknown). A request whose headers are not complete within `headers_timeout_s`
loses its connection: uvicorn waits for them without end, so idle or trickling connections (slowloris)
could hold every file descriptor the gateway has. A request that asks to switch protocols
(`Connection: upgrade`: curl's `--http2` over http://, a WebSocket handshake) is served as HTTP/1.1
and its connection then closed, or refused where it has a body, which httptools leaves unread."""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ectrans.services.gateway.errors import GatewayError, render

logger = logging.getLogger(__name__)
INVALID = "Invalid HTTP request received."  # what uvicorn warns, once per refused request
UNSUPPORTED_UPGRADE = "Unsupported upgrade request."  # and once per `Connection: upgrade` it does not honour
NO_WEBSOCKETS = "No supported WebSocket library detected."  # the start of its second warning for one
NO_UPGRADE = (
    "the gateway does not switch protocols: send the request without 'Connection: upgrade' (with it,"
    " the body is not read as part of the request)"
)


class QuietParserWarnings(logging.Filter):
    """Drops uvicorn's warnings per request its parser refuses or per upgrade it ignores: a client
    sending garbage would write a log line per request. Each still gets its answer."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return message not in (INVALID, UNSUPPORTED_UPGRADE) and not message.startswith(NO_WEBSOCKETS)


def quiet_parser_warnings() -> None:
    logging.getLogger("uvicorn.error").addFilter(QuietParserWarnings())


class UpgradeRefused(Exception):
    """Raised in a parser callback: the parser stops, and uvicorn answers through `send_400_response`."""


class GatewayHttpProtocol(HttpToolsProtocol):
    headers_timeout_s = 30.0  # set by `http_protocol`
    _headers_due: asyncio.TimerHandle | None = None
    _refusal: str | None = None  # the message of the 400 a callback asked for

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._await_headers()

    def on_headers_complete(self) -> None:
        self._headers_arrived()
        if self.parser.should_upgrade() and _declares_body(self.headers):
            # httptools ends the request at its headers and leaves the body to the next protocol: the
            # app would read an empty body and answer a valid request "Invalid JSON".
            self._refusal = NO_UPGRADE
            raise UpgradeRefused
        super().on_headers_complete()
        if self.parser.should_upgrade():
            # Served as HTTP/1.1 (uvicorn runs with ws="none"), but the parser reads nothing more on this
            # connection: a request after it would wait for an answer that never comes.
            self.cycle.keep_alive = False

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
        msg, self._refusal = self._refusal or msg, None
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


def _declares_body(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(
        name == b"transfer-encoding" or (name == b"content-length" and int(value) > 0) for name, value in headers
    )


def http_protocol(headers_timeout_s: float) -> type[GatewayHttpProtocol]:
    """The protocol class for uvicorn's `http` setting (it takes a class, not an instance)."""
    return type("GatewayHttpProtocol", (GatewayHttpProtocol,), {"headers_timeout_s": headers_timeout_s})
