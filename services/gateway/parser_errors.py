"""A request uvicorn's HTTP parser refuses (two Content-Lengths, a 100 KB URL, bytes that are not
HTTP) is answered in OpenAI's error shape, as every other error is, not in uvicorn's plain text. The
request never reached a route, so its endpoint (and TEI's shape) is unknown."""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ectrans.services.gateway.errors import GatewayError, render


class JsonParserErrors(HttpToolsProtocol):
    def send_400_response(self, msg: str) -> None:
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
