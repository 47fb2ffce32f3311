"""The gateway's fast path. `Shortcut` takes task POSTs past FastAPI's layers: every request must get
the answer FastAPI's own route gives (same status, same body), and the schema must still describe
the task endpoints' bodies. Headers, bodies and metrics are read and counted without starlette's
and prometheus-client's per-call helpers: they must count and read the same."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import cast

import httpx
import numpy as np
import pytest
from starlette.requests import Request
from starlette.types import ASGIApp, Message

from ectrans.common.registry import build_spec
from ectrans.services.gateway.app import (
    Gateway,
    create_app,
    ectrans_headers,
    json_response,
    read_body,
    request_options,
)
from ectrans.services.gateway.errors import CLIENT_CLOSED, GatewayError
from ectrans.services.gateway.http_protocol import INVALID, QuietParserWarnings
from ectrans.services.gateway.metrics import GatewayMetrics
from ectrans.services.gateway.middleware import Guard, Shortcut
from ectrans.services.gateway.settings import GatewaySettings
from tests.test_gateway_http import CORPUS, MAX_BODY
from tests.tiny_encoders import make_tiny_bert

# Nothing listens there: no request of the corpus gets as far as Redis.
SETTINGS = GatewaySettings(
    redis_url="redis://127.0.0.1:1/0", gateway_max_body_bytes=MAX_BODY, gateway_max_inputs=8, _env_file=None
)


def both_ways() -> tuple[ASGIApp, ASGIApp]:
    """The gateway as served, and the same FastAPI app behind a Guard without the shortcut."""
    served = cast(Guard, create_app(SETTINGS, {}))
    fastapi_app = cast(Shortcut, served.app).app
    plain = Guard(fastapi_app, api_keys=[], max_body_bytes=MAX_BODY, metrics=GatewayMetrics())
    return served, plain


async def answer(app: ASGIApp, method: str, path: str, content: bytes, headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as http:
        return await http.request(method, path, content=content, headers=headers)


@pytest.mark.parametrize("name", [name for name, case in CORPUS.items() if case[0] == "POST"])
def test_the_shortcut_answers_as_fastapis_route(name: str) -> None:
    method, path, content, headers, status = CORPUS[name]
    served, plain = both_ways()
    fast = asyncio.run(answer(served, method, path, content, headers))
    slow = asyncio.run(answer(plain, method, path, content, headers))
    assert fast.status_code == slow.status_code == status, (fast.text, slow.text)
    assert fast.json() == slow.json()
    assert fast.headers["content-type"] == slow.headers["content-type"] == "application/json"


def test_the_schema_still_describes_the_task_bodies() -> None:
    served, _ = both_ways()
    schema = asyncio.run(answer(served, "GET", "/openapi.json", b"", {})).json()
    for path, field in (("/v1/embeddings", "input"), ("/embed", "inputs"), ("/v1/translate", "input")):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert field in body["properties"] and body["additionalProperties"] is False, path


def test_options_come_from_the_x_ectrans_headers_only() -> None:
    scope = {
        "type": "http",
        "headers": [(b"x-ectrans-priority", b"batch"), (b"x-ectrans-deadline-ms", b"50"), (b"x-other", b"1")],
    }
    assert ectrans_headers(Request(scope)) == {"x-ectrans-priority": "batch", "x-ectrans-deadline-ms": "50"}


@pytest.mark.parametrize("value", [b"\xb2", b"1" + b"0" * 5000, b"0", b"-5", b"12.5", b"86400001"])
def test_a_deadline_header_that_is_not_a_small_whole_number_is_a_400(value: bytes) -> None:
    """'\xb2' (a superscript two in Latin-1) passes `str.isdigit` and 5,000 digits pass it too; `int`
    refuses both, which must not become a 500."""
    request = Request({"type": "http", "headers": [(b"x-ectrans-deadline-ms", value)]})
    with pytest.raises(GatewayError) as error:
        request_options(request, None, None)
    assert error.value.status == 400
    assert request_options(
        Request({"type": "http", "headers": [(b"x-ectrans-deadline-ms", b" 250 ")]}), None, None
    ) == (
        None,
        250,
    )


def test_a_body_cut_off_by_a_disconnect_is_a_closed_request() -> None:
    messages: list[Message] = [
        {"type": "http.request", "body": b'{"model": ', "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> Message:
        return messages.pop(0)

    with pytest.raises(GatewayError) as error:
        asyncio.run(read_body(Request({"type": "http", "headers": []}, receive)))
    assert error.value.status == CLIENT_CLOSED


def test_metrics_count_through_their_cached_children() -> None:
    metrics = GatewayMetrics(["noop"])
    metrics.inflight += 2
    for status in (200, 200, 429):
        metrics.answered("/embed", status, 0.002)
    metrics.submitted("noop", 3)
    metrics.submitted("noop", 1)
    lines = set(metrics.exposition().decode().splitlines())
    assert 'ectrans_gateway_requests_total{endpoint="/embed",status="200"} 2.0' in lines
    assert 'ectrans_gateway_requests_total{endpoint="/embed",status="429"} 1.0' in lines
    assert 'ectrans_gateway_request_seconds_bucket{endpoint="/embed",le="0.0025"} 3.0' in lines
    assert 'ectrans_gateway_inputs_total{model="noop"} 4.0' in lines
    assert "ectrans_gateway_inflight_requests 2.0" in lines


def test_model_names_outside_the_registry_share_one_label_value() -> None:
    """A client picks the model names it sends: one label value each would grow without bound."""
    metrics = GatewayMetrics(["noop", "minilm"])
    for index in range(2000):
        metrics.submitted(f"no-such-model-{index}", 1)
    metrics.submitted("noop", 2)
    lines = [line for line in metrics.exposition().decode().splitlines() if line.startswith("ectrans_gateway_inputs_")]
    assert 'ectrans_gateway_inputs_total{model="unknown"} 2000.0' in lines
    assert 'ectrans_gateway_inputs_total{model="noop"} 2.0' in lines
    assert len(lines) == 4, lines  # `_total` and `_created` of the two values


def test_vectors_go_out_as_json_lists_that_read_back_to_the_same_float32() -> None:
    rows = np.random.default_rng(17).standard_normal((3, 384)).astype(np.float32)
    strided = rows[:, ::2]  # not C-contiguous: orjson hands it back to be listed
    body = json.loads(bytes(json_response({"rows": rows, "strided": strided, "one": rows[0]}).body))
    assert np.array_equal(np.asarray(body["rows"], dtype=np.float32), rows)
    assert np.array_equal(np.asarray(body["strided"], dtype=np.float32), strided)
    assert np.array_equal(np.asarray(body["one"], dtype=np.float32), rows[0])


def test_uvicorns_warning_per_refused_request_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    """A client sending garbage, or asking to switch protocols (each is answered), must not write a log
    line per request; uvicorn's other warnings stay."""
    uvicorn_log = logging.getLogger("uvicorn.error")
    quiet = QuietParserWarnings()
    uvicorn_log.addFilter(quiet)
    try:
        with caplog.at_level(logging.WARNING):
            for _ in range(3):
                uvicorn_log.warning(INVALID)
                uvicorn_log.warning("Unsupported upgrade request.")
                uvicorn_log.warning("No supported WebSocket library detected. Please use ...")
            uvicorn_log.warning("Exceeded concurrency limit.")
    finally:
        uvicorn_log.removeFilter(quiet)
    assert [record.getMessage() for record in caplog.records] == ["Exceeded concurrency limit."]


def test_an_explicit_truncate_false_refuses_a_long_input_where_the_model_entry_cuts(tmp_path: Path) -> None:
    """TEI's `truncate: false` wins over the server's `--auto-truncate`; here over the entry's `truncate`."""
    spec = build_spec("cuts", {"path": str(make_tiny_bert(tmp_path / "bert")), "max_tokens": 8, "truncate": True})
    registry = {"cuts": spec}
    gateway = Gateway(GatewaySettings(), registry, GatewayMetrics(registry), "test")
    long = [" ".join(["word"] * 20)]

    async def check(**options: bool) -> int:
        return await gateway.check_lengths("cuts", long, status=413, **options)

    assert asyncio.run(check(truncate=False)) > 8  # left to the entry, which cuts
    with pytest.raises(GatewayError, match="over the limit of 8") as refused:
        asyncio.run(check(truncate=False, entry_may_cut=False))
    assert refused.value.status == 413
    assert asyncio.run(check(truncate=True, entry_may_cut=False)) > 8


def test_redis_failures_are_503_when_retrying_helps_500_otherwise_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import NoPermissionError, ResponseError

    from ectrans.services.gateway.store import StoreHealth

    store = StoreHealth()
    with caplog.at_level(logging.WARNING, logger="ectrans.services.gateway.store"):
        for _ in range(3):  # an outage: every request answered 503, one log line
            error = store.failed(RedisConnectionError("Connection refused"))
            assert (error.status, error.code, error.retry_after_s) == (503, "unavailable", 1)
        assert store.failed(ResponseError("OOM command not allowed")).status == 503
        store.answered()  # and one line when it is back
        for _ in range(2):  # a configuration error: retrying cannot help, no Retry-After
            refused = store.failed(NoPermissionError("NOPERM this user has no permissions"))
            assert (refused.status, refused.code, refused.retry_after_s) == (500, "internal", None)
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 3 and "unreachable" in lines[0] and "again" in lines[1] and "NOPERM" in lines[2], lines


def test_while_redis_is_unreachable_one_request_a_second_tries_it_the_rest_get_503_at_once() -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    from ectrans.services.gateway.store import PROBE_EVERY_S, StoreHealth

    store = StoreHealth()
    assert store.refusal() is None  # Redis up: every request goes to it
    store.failed(RedisConnectionError("Connection refused"))
    refusal = store.refusal()
    assert refusal is not None and (refusal.status, refusal.retry_after_s) == (503, 1)
    store._tried_at -= PROBE_EVERY_S  # a second later
    assert store.refusal() is None  # this request tries Redis...
    assert store.refusal() is not None  # ...and the others do not wait for it
    store.answered()  # it was back
    assert store.refusal() is None
