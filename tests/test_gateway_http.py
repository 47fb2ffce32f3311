"""The gateway's HTTP surface without a stack behind it: every malformed request gets a 4xx in the
endpoint's error shape (never a 500 or a stack trace), API keys, the body size limit."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ectrans.bench.http_load import ConnectionClosed, HttpConnection, request_head
from ectrans.client import TaskResult
from ectrans.common.schemas import Reason
from ectrans.services.gateway.errors import REASON_STATUS, RETRY_AFTER_S, GatewayError
from tests.gateway_process import gateway_process

MAX_BODY = 4096
KEY = "k-" + "7" * 30

# (method, path, body, extra headers, expected status)
Case = tuple[str, str, bytes, dict[str, str], int]
EMB, TEI, TR = "/v1/embeddings", "/embed", "/v1/translate"
JSON = {"content-type": "application/json"}


def body(value: Any) -> bytes:
    return json.dumps(value).encode()


CORPUS: dict[str, Case] = {
    "empty body": ("POST", EMB, b"", JSON, 400),
    "not JSON": ("POST", EMB, b"{model: minilm", JSON, 400),
    "truncated JSON": ("POST", EMB, b'{"model": "minilm", "input": "x"', JSON, 400),
    "JSON array": ("POST", EMB, body(["x"]), JSON, 400),
    "JSON string": ("POST", EMB, body("x"), JSON, 400),
    "JSON null": ("POST", EMB, b"null", JSON, 400),
    "not UTF-8": ("POST", EMB, b'{"model": "minilm", "input": "\xff\xfe"}', JSON, 400),
    "missing input": ("POST", EMB, body({"model": "minilm"}), JSON, 400),
    "missing model": ("POST", EMB, body({"input": "x"}), JSON, 400),
    "input a number": ("POST", EMB, body({"model": "minilm", "input": 5}), JSON, 400),
    "input a dict": ("POST", EMB, body({"model": "minilm", "input": {"a": 1}}), JSON, 400),
    "input mixed list": ("POST", EMB, body({"model": "minilm", "input": ["a", 1]}), JSON, 400),
    "input empty list": ("POST", EMB, body({"model": "minilm", "input": []}), JSON, 400),
    "token id of 4000 digits": ("POST", EMB, b'{"model": "minilm", "input": [1, ' + b"9" * 4000 + b"]}", JSON, 400),
    "negative token id": ("POST", EMB, body({"model": "minilm", "input": [[1, 2], [-3]]}), JSON, 400),
    "TEI: token id over 32 bits": ("POST", TEI, body({"inputs": [[1], [2**31]]}), JSON, 422),
    "empty token id list": ("POST", EMB, body({"model": "minilm", "input": [[1, 2], []]}), JSON, 400),
    "token ids and text": ("POST", EMB, body({"model": "minilm", "input": [[1, 2], "x"]}), JSON, 400),
    "token id a boolean": ("POST", EMB, body({"model": "minilm", "input": [1, True]}), JSON, 400),
    "too many token id lists": ("POST", EMB, body({"model": "minilm", "input": [[1]] * 9}), JSON, 400),
    "lone surrogate": ("POST", EMB, b'{"model": "minilm", "input": "a\\ud800b"}', JSON, 400),
    "too many inputs": ("POST", EMB, body({"model": "minilm", "input": ["x"] * 9}), JSON, 400),
    "model a list": ("POST", EMB, body({"model": ["minilm"], "input": "x"}), JSON, 400),
    "bad encoding_format": ("POST", EMB, body({"model": "minilm", "input": "x", "encoding_format": "hex"}), JSON, 400),
    "unknown field": ("POST", EMB, body({"model": "minilm", "input": "x", "temprature": 1}), JSON, 400),
    "bad priority": ("POST", EMB, body({"model": "minilm", "input": "x", "priority": "urgent"}), JSON, 400),
    "negative deadline": ("POST", EMB, body({"model": "minilm", "input": "x", "deadline_ms": -5}), JSON, 400),
    "huge deadline": ("POST", EMB, body({"model": "minilm", "input": "x", "deadline_ms": 10**30}), JSON, 400),
    "NaN deadline": ("POST", EMB, b'{"model": "minilm", "input": "x", "deadline_ms": NaN}', JSON, 400),
    "float deadline": ("POST", EMB, body({"model": "minilm", "input": "x", "deadline_ms": 1.5}), JSON, 400),
    "boolean deadline": ("POST", EMB, body({"model": "minilm", "input": "x", "deadline_ms": True}), JSON, 400),
    "deadline a string": ("POST", EMB, body({"model": "minilm", "input": "x", "deadline_ms": "100"}), JSON, 400),
    "dimensions a string": ("POST", EMB, body({"model": "minilm", "input": "x", "dimensions": "384"}), JSON, 400),
    "truncate a string": ("POST", EMB, body({"model": "minilm", "input": "x", "truncate": "yes"}), JSON, 400),
    "zero dimensions": ("POST", EMB, body({"model": "minilm", "input": "x", "dimensions": 0}), JSON, 400),
    "bad priority header": (
        "POST",
        EMB,
        body({"model": "minilm", "input": "x"}),
        {**JSON, "x-ectrans-priority": "now"},
        400,
    ),
    "bad deadline header": (
        "POST",
        EMB,
        body({"model": "minilm", "input": "x"}),
        {**JSON, "x-ectrans-deadline-ms": "soon"},
        400,
    ),
    "deadline header of 5000 digits": (
        "POST",
        EMB,
        body({"model": "minilm", "input": "x"}),
        {**JSON, "x-ectrans-deadline-ms": "1" + "0" * 5000},
        400,
    ),
    "deep nesting": ("POST", EMB, b"[" * 1500 + b"]" * 1500, JSON, 400),
    "text/plain body": ("POST", EMB, b"hello", {"content-type": "text/plain"}, 400),
    "body over the limit": ("POST", EMB, body({"model": "minilm", "input": "x" * MAX_BODY}), JSON, 413),
    "TEI: not JSON": ("POST", TEI, b"{", JSON, 422),
    "TEI: missing inputs": ("POST", TEI, body({"normalize": True}), JSON, 422),
    "TEI: normalize a string": ("POST", TEI, body({"inputs": "x", "normalize": "yes please"}), JSON, 422),
    "TEI: left truncation": (
        "POST",
        TEI,
        body({"inputs": "x", "truncate": True, "truncation_direction": "Left"}),
        JSON,
        422,
    ),
    "TEI: normalize 0": ("POST", TEI, body({"inputs": "x", "normalize": 0}), JSON, 422),
    "TEI: normalize a string false": ("POST", TEI, body({"inputs": "x", "normalize": "false"}), JSON, 422),
    "translate: beams true": ("POST", TR, body({"model": "m", "input": "x", "num_beams": True}), JSON, 400),
    "TEI: a prompt": ("POST", TEI, body({"inputs": "x", "prompt_name": "query"}), JSON, 422),
    "TEI: over the limit": ("POST", TEI, body({"inputs": "x" * MAX_BODY}), JSON, 413),
    "translate: beams 0": ("POST", TR, body({"model": "m", "input": "x", "num_beams": 0}), JSON, 400),
    "translate: tokens 9999": ("POST", TR, body({"model": "m", "input": "x", "max_new_tokens": 9999}), JSON, 400),
    "unknown path": ("POST", "/v1/chat/completions", body({}), JSON, 404),
    "wrong method": ("GET", EMB, b"", {}, 405),
}


@pytest.fixture(scope="module")
def gateway(redis_server: Any) -> Iterator[str]:
    settings = {"gateway_max_body_bytes": str(MAX_BODY), "gateway_max_inputs": "8"}
    with gateway_process(redis_server.url, "tmalformed:", **settings) as base:
        yield base


@pytest.mark.parametrize("name", CORPUS)
def test_a_malformed_request_gets_a_clear_4xx(gateway: str, name: str) -> None:
    method, path, content, headers, status = CORPUS[name]
    response = httpx.request(method, gateway + path, content=content, headers=headers, timeout=10)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    if path == TEI:
        assert isinstance(error, str) and response.json()["error_type"] == "Validation"
    else:
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        message = error["message"]
        assert message and "Traceback" not in message and len(message) < 500, message


def test_a_body_streamed_past_the_limit_is_refused(gateway: str) -> None:
    """No Content-Length (chunked): the limit is counted as the body arrives."""

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "minilm", "input": "'
        for _ in range(MAX_BODY // 100 + 1):
            yield b"x" * 100
        yield b'"}'

    response = httpx.post(gateway + EMB, content=chunks(), headers=JSON, timeout=10)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "body_too_large"


def test_the_bench_load_driver_speaks_http(gateway: str) -> None:
    """`ectrans bench gateway`'s driver: keep-alive, whole answers, a server's `connection: close`."""
    port = int(gateway.rsplit(":", 1)[1])
    host = f"127.0.0.1:{port}"
    health = request_head("GET", "/health", host, content_type=None)

    async def talk() -> None:
        connection = await HttpConnection.connect("127.0.0.1", port)
        status, answer = await connection.request(health)
        assert (status, json.loads(answer)) == (200, {"status": "ok"})
        status, answer = await connection.request(request_head("POST", EMB, host), body({"model": "minilm"}))
        assert status == 400 and json.loads(answer)["error"]["param"] == "input"  # on the same connection
        status, _ = await connection.request(health + b"\r\nconnection: close")
        assert status == 200 and not connection.open
        with pytest.raises(ConnectionClosed):
            await connection.request(health)

    asyncio.run(talk())


def test_api_keys(redis_server: Any) -> None:
    with gateway_process(redis_server.url, "tkeys:", gateway_api_keys=f"other,{KEY}") as base:
        request = {"model": "minilm", "input": []}  # refused after the key check: no stack needed
        missing = httpx.post(base + EMB, json=request)
        assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = httpx.post(base + EMB, json=request, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert httpx.post(base + TEI, json={"inputs": []}).status_code == 401
        right = httpx.post(base + EMB, json=request, headers={"authorization": f"Bearer {KEY}"})
        assert right.status_code == 400  # past the key check: the empty list is refused
        assert httpx.get(base + "/health").status_code == 200  # probes need no key
        assert httpx.get(base + "/").status_code == 200 and httpx.head(base + "/").status_code == 200  # TEI's
        assert httpx.post(base + "/", json={"inputs": "x"}).status_code == 401  # TEI's embed at the root


def test_every_reason_has_a_status() -> None:
    reasons = {v for k, v in vars(Reason).items() if k.isupper()}
    assert reasons == set(REASON_STATUS)
    assert set(RETRY_AFTER_S) == {Reason.OVERLOADED, Reason.UNAVAILABLE}
    dead = GatewayError.from_result(TaskResult("t", "error", error="gone", reason=Reason.DEAD_LETTER), 0, 1)
    assert (dead.status, dead.code) == (500, "dead_letter")
    mismatch = GatewayError.from_result(TaskResult("t", "error", reason=Reason.VERSION_MISMATCH), 2, 3)
    assert mismatch.status == 400 and mismatch.message.startswith("input 2: ")


def test_settings_refuse_a_public_address_without_keys() -> None:
    from pydantic import ValidationError

    from ectrans.services.gateway.settings import GatewaySettings

    with pytest.raises(ValidationError, match="ECTRANS_GATEWAY_API_KEYS"):
        GatewaySettings(gateway_host="0.0.0.0")
    assert GatewaySettings(gateway_host="0.0.0.0", gateway_api_keys="a, b").gateway_api_keys == ["a", "b"]
    assert GatewaySettings(gateway_host="::1").gateway_api_keys == []
    # An empty key would admit a bare `Authorization: Bearer`: dropped, so these are no keys at all.
    for empty in ('[""]', '["  "]', " , "):
        with pytest.raises(ValidationError, match="ECTRANS_GATEWAY_API_KEYS"):
            GatewaySettings(gateway_host="0.0.0.0", gateway_api_keys=empty)
    assert GatewaySettings(gateway_host="0.0.0.0", gateway_api_keys='[" k ", ""]').gateway_api_keys == ["k"]


def test_tei_left_truncation_is_refused_wherever_truncation_happens() -> None:
    """`truncate: null` means the model entry's setting: on a model that truncates, a left direction
    must be refused too, not cut on the right without a word."""
    from ectrans.services.gateway.app import tei_truncate
    from ectrans.services.gateway.errors import GatewayError
    from ectrans.services.gateway.protocol import EmbedRequest

    left: dict[str, Any] = {"inputs": "x", "truncation_direction": "left"}
    assert tei_truncate(EmbedRequest(**left), model_truncates=False) is False
    with pytest.raises(GatewayError, match="right truncation"):
        tei_truncate(EmbedRequest(**left), model_truncates=True)
    with pytest.raises(GatewayError, match="right truncation"):
        tei_truncate(EmbedRequest(**left, truncate=True), model_truncates=False)
    assert tei_truncate(EmbedRequest(**left, truncate=False), model_truncates=True) is False


def test_requests_past_the_concurrency_limit_get_429_at_once(redis_server: Any) -> None:
    """With no stack behind it a request waits for its timeout; meanwhile one more request than the
    limit is answered `overloaded` at once, and room comes back when the first ends. /info says the limit."""
    settings = {"gateway_max_concurrent_requests": "1", "gateway_timeout_s": "2"}
    with gateway_process(redis_server.url, "tlimit:", **settings) as base:
        assert httpx.get(base + "/info").json()["max_concurrent_requests"] == 1

        async def race() -> None:
            async with httpx.AsyncClient(base_url=base, timeout=10) as client:
                first = asyncio.create_task(client.post(EMB, json={"model": "minilm", "input": "waits"}))
                await asyncio.sleep(0.5)
                refused = await client.post(EMB, json={"model": "minilm", "input": "one too many"})
                assert refused.status_code == 429, refused.text
                assert refused.headers["retry-after"] == str(RETRY_AFTER_S[Reason.OVERLOADED])
                assert refused.json()["error"]["code"] == Reason.OVERLOADED
                unread = await client.post(EMB, content=b"{not even JSON", headers=JSON)
                assert unread.status_code == 429  # refused before its body is read or parsed
                tei = await client.post(TEI, json={"inputs": "one too many"})
                assert tei.status_code == 429 and tei.json()["error_type"] == "Overloaded", tei.text
                assert (await first).status_code == 504  # it waited its time out: the limit held it
                again = await client.post(EMB, json={"model": "minilm", "input": "room again"})
                assert again.status_code == 504

        asyncio.run(race())


def test_a_body_that_stalls_is_refused_and_frees_its_place(redis_server: Any) -> None:
    """A client that sends part of a body and waits would hold its place under the request bound for
    as long as it likes: past the body timeout it gets a 408, and the next request is served."""
    settings = {"gateway_max_concurrent_requests": "1", "gateway_body_timeout_s": "1"}
    with gateway_process(redis_server.url, "tstall:", **settings) as base:
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as stalled:
            stalled.sendall(b"POST /v1/embeddings HTTP/1.1\r\nhost: g\r\ncontent-length: 100\r\n\r\n" + b'{"model": ')
            answer = read_to_close(stalled)  # head and body are two writes: one recv may see the head only
        head, _, content = answer.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == b"408", answer
        assert b"connection: close" in head.lower(), head  # the rest of that body is not awaited on it
        assert json.loads(content)["error"]["code"] == "body_timeout"
        after = httpx.post(base + EMB, json={"model": "minilm", "input": []}, timeout=10)
        assert after.status_code == 400, after.text  # its place was given back: not a 429
        # Headers that never end, or nothing at all: the connection is closed (uvicorn alone waits forever).
        for sent in (b"POST /v1/embeddings HTTP/1.1\r\nhost: g\r\n", b""):
            with socket.create_connection((host, int(port)), timeout=10) as idle:
                idle.sendall(sent)
                started = time.monotonic()
                assert idle.recv(65536) == b"" and time.monotonic() - started < 5


def test_without_redis_the_gateway_serves_503s_not_a_start_up_failure() -> None:
    """Redis not up yet (or gone): the process stays up for its liveness probe, and everything that
    needs Redis answers 503 `unavailable` in its endpoint's shape, never a 500 or a restart loop."""
    from ectrans.local.redis_server import free_port

    with gateway_process(f"redis://127.0.0.1:{free_port()}/0", "tnoredis:") as base:
        assert httpx.get(base + "/health", timeout=10).status_code == 200
        assert httpx.get(base + "/ready", timeout=10).status_code == 503
        for method, path, content in (
            ("GET", "/v1/models", b""),
            ("POST", EMB, body({"model": "minilm", "input": "x"})),
            ("POST", TEI, body({"inputs": "x"})),
        ):
            response = httpx.request(method, base + path, content=content, headers=JSON, timeout=30)
            assert response.status_code == 503, (path, response.text)
            assert response.headers["retry-after"] == "1"
            error = response.json()
            assert (error["error_type"] == "Unhealthy") if path == TEI else (error["error"]["code"] == "unavailable")


@pytest.mark.parametrize(
    "raw",
    [
        b"POST /v1/embeddings HTTP/1.1\r\nhost: g\r\ncontent-length: 5\r\ncontent-length: 50\r\n\r\n{}",
        b"POST /v1/embeddings HTTP/1.1\r\nhost: g\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n{}",
        b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nhost: g\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
    ids=["two lengths", "length and chunked", "100 KB URL", "not HTTP"],
)
def test_what_the_http_parser_refuses_is_a_json_400(gateway: str, raw: bytes) -> None:
    host, port = gateway.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(raw)
        answer = read_to_close(connection)
    head, _, content = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json" in head, answer[:300]
    error = json.loads(content)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "bad_request" and error["message"]
    assert httpx.get(gateway + "/health", timeout=10).status_code == 200


UPGRADE = (
    b"connection: upgrade\r\nupgrade: %s\r\n"
    b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n"
)


@pytest.mark.parametrize("protocol", [b"h2c", b"websocket"])
def test_a_request_asking_to_switch_protocols_gets_a_json_answer_and_a_closed_connection(
    gateway: str, protocol: bytes
) -> None:
    """curl's `--http2` over http:// and WebSocket handshakes ask to switch protocols. httptools then
    ends the request at its headers: a POST's body went unread (answered "Invalid JSON" on a valid
    body) and the connection hung; a WebSocket GET got a text/plain 403. Now a request with a body is
    refused in JSON, one without is served as HTTP/1.1, and the connection closes after either."""
    host, port = gateway.removeprefix("http://").split(":")
    request = body({"model": "minilm", "input": "x"})
    post = b"POST /v1/embeddings HTTP/1.1\r\nhost: g\r\ncontent-length: %d\r\n" % len(request)
    get = b"GET /health HTTP/1.1\r\nhost: g\r\n"
    for head, content, status in ((post, request, b"400"), (get, b"", b"200")):
        with socket.create_connection((host, int(port)), timeout=10) as connection:
            connection.sendall(head + UPGRADE % protocol + b"\r\n" + content + get + b"\r\n")  # and one more
            answer = read_to_close(connection)
        head_lines, _, answered = answer.partition(b"\r\n\r\n")
        assert head_lines.startswith(b"HTTP/1.1 " + status) and b"content-type: application/json" in head_lines, answer
        if status == b"400":
            assert "switch protocols" in json.loads(answered)["error"]["message"]
        else:
            assert json.loads(answered) == {"status": "ok"}


def test_headers_that_never_end_are_refused_and_large_ones_served(gateway: str) -> None:
    """httptools buffers headers without a bound: four connections sending 50 MB of one header each
    grew the gateway by 200 MB before the headers' deadline. Past 256 KiB the answer is a JSON 431;
    a 200 KB header, pipelined after a body on one connection, is still served."""
    host, port = gateway.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(b"GET /health HTTP/1.1\r\nhost: g\r\nx-endless: ")
        with contextlib.suppress(ConnectionError):  # the gateway stops reading once it has answered
            for _ in range(64):
                connection.sendall(b"a" * 65536)
                time.sleep(0.005)
        answer = read_to_close(connection)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "headers_too_large"
    request = body({"model": "minilm", "input": []})
    post = b"POST /v1/embeddings HTTP/1.1\r\nhost: g\r\ncontent-length: %d\r\n\r\n" % len(request) + request
    large = b"GET /health HTTP/1.1\r\nhost: g\r\nx-large: " + b"b" * 200_000 + b"\r\nconnection: close\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(post + large)
        answer = read_to_close(connection)
    assert answer.startswith(b"HTTP/1.1 400 ") and answer.count(b"HTTP/1.1 200 OK") == 1, answer[:400]


def read_to_close(connection: socket.socket) -> bytes:
    """All the server sends until it closes the connection."""
    answer = b""
    while chunk := connection.recv(65536):
        answer += chunk
    return answer


@pytest.mark.parametrize("redis_stops_too", [False, True], ids=["Redis answers", "Redis stops too"])
def test_a_stop_says_goodbye_where_redis_answers_and_takes_a_second_where_it_does_not(redis_stops_too: bool) -> None:
    """Stopped with its Redis (one SIGTERM to a whole stack), the gateway took ~10 s: its stop event,
    heartbeat removal and reply-stream delete each waited out the connection's retries."""
    from ectrans.common.redis_conn import connect
    from ectrans.local.redis_server import RedisServer
    from ectrans.services.gateway.app import Gateway
    from ectrans.services.gateway.metrics import GatewayMetrics
    from ectrans.services.gateway.settings import GatewaySettings

    async def stop_with(server: RedisServer) -> tuple[float, list[Any], int]:
        settings = GatewaySettings(redis_url=server.url, prefix="tstop:", heartbeat_s=0.2, _env_file=None)
        gateway = Gateway(settings, {}, GatewayMetrics({}), "g-stop")
        await gateway.start()
        await gateway.client.connect()
        await asyncio.sleep(0.3)  # a beat written
        if redis_stops_too:
            assert server.process is not None
            server.process.terminate()
            server.process.wait()
        started = time.monotonic()
        await gateway.stop()
        took = time.monotonic() - started
        if redis_stops_too:
            return took, [], 0
        redis = connect(server.url)
        try:
            events: list[Any] = list(await redis.xrange(gateway.keys.metrics) or [])
            return took, events, await redis.exists(gateway.heartbeat.key)
        finally:
            await redis.aclose()

    with RedisServer() as server:
        took, events, beating = asyncio.run(stop_with(server))
    assert took < 2.0, f"the stop took {took:.1f}s"
    if not redis_stops_too:
        assert [fields[b"kind"] for _, fields in events] == [b"stopped"] and not beating
