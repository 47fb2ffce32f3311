"""The pure ASGI layers in front of FastAPI (not `BaseHTTPMiddleware`: they run on every request's
hot path): `Guard` checks API keys and the body size and counts requests; `Shortcut` takes a task
request straight to its handler."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ectrans.common.schemas import Reason
from ectrans.services.gateway.errors import TEI_PATHS, GatewayError, render
from ectrans.services.gateway.metrics import GatewayMetrics

logger = logging.getLogger(__name__)
Endpoint = Callable[[Request], Awaitable[Response]]

# Probes, metrics and the API docs answer without a key: they reveal no data. So does `GET /`, TEI's
# health check (a `POST /` embeds, and needs one).
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"})
ENDPOINTS = frozenset(
    {"/v1/embeddings", "/embeddings", "/v1/translate", "/v1/models", "/info", *TEI_PATHS, *OPEN_PATHS}
)


class TooLarge(HTTPException):
    """The body grew past the limit while it was read (no or a false Content-Length). An HTTPException,
    so that the app's error handler answers it (FastAPI turns other errors raised while it reads a
    body into a vague 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over the limit of {limit} bytes")


class Guard:
    def __init__(self, app: ASGIApp, *, api_keys: list[str], max_body_bytes: int, metrics: GatewayMetrics) -> None:
        self.app = app
        self.keys = [key.encode() for key in api_keys]
        self.max_body = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        if scope["method"] == "HEAD":  # load balancers and `curl -I` probe with HEAD: a GET without its body
            scope = {**scope, "method": "GET"}
            send = _headers_only(send)
        started = time.perf_counter()
        status = 500
        self.metrics.inflight += 1

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            headers: dict[bytes, bytes] = dict(scope["headers"])
            refusal = self._refusal(scope["headers"], headers, path, scope["method"])
            if refusal is not None:
                await render(refusal, tei=path in TEI_PATHS)(scope, receive, send_status)
                return
            # The HTTP parser holds a body to its declared length: only a body without one is counted.
            declared = b"content-length" in headers
            try:
                await self.app(scope, receive if declared else self._limited(receive), send_status)
            except TooLarge:
                await render(self._too_large(), tei=path in TEI_PATHS)(scope, receive, send_status)
        finally:
            self.metrics.inflight -= 1
            self.metrics.answered(endpoint, status, time.perf_counter() - started)

    def _refusal(
        self, raw: list[tuple[bytes, bytes]], headers: dict[bytes, bytes], path: str, method: str
    ) -> GatewayError | None:
        """A request refused before it is read: a missing, wrong or ambiguous key, or a declared body over
        the limit."""
        open_path = path in OPEN_PATHS or (path == "/" and method == "GET")
        if self.keys and not open_path:
            # `headers` keeps the last of several: a proxy that checks the first would disagree with us
            # on which key was sent. Authorization is a single field (RFC 9110): two are a bad request.
            keys = [value for name, value in raw if name == b"authorization"]
            if len(keys) > 1:
                return GatewayError(400, "send one Authorization header, not several", "bad_request")
            if not keys or not self._authorised(keys[0]):
                return GatewayError(
                    401, "a valid API key is required: send 'Authorization: Bearer <key>'", "unauthorized"
                )
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return self._too_large()
        return None

    def _authorised(self, header: bytes) -> bool:
        scheme, _, key = header.partition(b" ")
        # compare_digest against every key: the time taken says nothing about which key was close.
        matches = [hmac.compare_digest(key.strip(), known) for known in self.keys]
        return scheme.lower() == b"bearer" and any(matches)

    def _too_large(self) -> GatewayError:
        return GatewayError(413, TooLarge(self.max_body).detail, "body_too_large")

    def _limited(self, receive: Receive) -> Receive:
        """`receive` that stops a body arriving in chunks once it passes the limit."""
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise TooLarge(self.max_body)
            return message

        return limited


def _headers_only(send: Send) -> Send:
    async def head(message: Message) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return head


class Shortcut:
    """POSTs to the task endpoints go straight to their handlers, past FastAPI's routing, dependency
    and exception layers: those cost more CPU per request than the handler, its Redis round trip
    included. The handlers take the bare `Request` and parse their bodies themselves, so the answer is
    the same either way; FastAPI keeps the routes for the OpenAPI schema, `405`s and `404`s."""

    def __init__(self, app: ASGIApp, *, endpoints: dict[str, Endpoint]) -> None:
        self.app = app
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.endpoints.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        try:
            response = await endpoint(Request(scope, receive))
        except GatewayError as exc:
            response = render(exc, tei=scope["path"] in TEI_PATHS)
        except TooLarge:
            raise  # answered by Guard
        except Exception:
            logger.exception("[gateway] unexpected error on %s", scope["path"])
            response = render(GatewayError(500, "internal error", Reason.INTERNAL), tei=scope["path"] in TEI_PATHS)
        await response(scope, receive, send)
