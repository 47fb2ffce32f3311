"""The gateway's HTTP protocol: uvicorn's httptools one with two changes. A request its parser refuses
(two Content-Lengths, a 100 KB URL, bytes that are not HTTP) is answered in OpenAI's error shape, as
every other error is, not in uvicorn's plain text (the request never reached a route, so its endpoint
and TEI's shape are unknown). A request whose headers are not complete within `headers_timeout_s`
loses its connection: uvicorn waits for them without end, so idle or trickling connections (slowloris)
could hold every file descriptor the gateway has. Headers over `MAX_HEAD_BYTES` are answered 431: the
parser buffers them without a bound, so a few connections sending endless headers could use gigabytes
within the headers' deadline. A request that asks to switch protocols
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
# A request line and headers (hyper, TEI's server, allows about 400 KB; nginx 32 KB by default).
MAX_HEAD_BYTES = 256 * 1024
HEAD_TOO_LARGE = f"the request line and headers are over {MAX_HEAD_BYTES} bytes"
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
    _messages_begun = 0
    _head_bytes = 0  # bytes of the request's headers read so far, but for its first read

    def data_received(self, data: bytes) -> None:
        waiting, begun = self._headers_due is not None, self._messages_begun
        super().data_received(data)
        if not (waiting and self._headers_due is not None and self._messages_begun == begun):
            # A read holding a request's start (or a body's end) is not counted, but only headers were
            # read where no request began and they are still incomplete: at most one read short.
            self._head_bytes = 0
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self._answer_and_close(431, b"Request Header Fields Too Large", HEAD_TOO_LARGE, "headers_too_large")

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._messages_begun += 1
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
        self._answer_and_close(400, b"Bad Request", msg, "bad_request")

    def _answer_and_close(self, status: int, phrase: bytes, msg: str, code: str) -> None:
        logger.debug("[gateway] a request refused by the HTTP parser: %s", msg)
        body = render(GatewayError(status, msg, code)).body
        head = [b"HTTP/1.1 %d %s\r\n" % (status, phrase)]
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
