"""Hostile HTTP clients at the gateway, in process (no stack: every request here is answered before
it would reach Redis): ambiguous credentials, and what a refused request must still look like."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from ectrans.services.gateway.app import create_app
from ectrans.services.gateway.settings import GatewaySettings

KEY = "k-" + "7" * 30
# Nothing listens there: no request here gets as far as Redis.
KEYED = GatewaySettings(redis_url="redis://127.0.0.1:1/0", gateway_api_keys=["other", KEY], _env_file=None)
EMPTY_INPUT = b'{"model": "minilm", "input": []}'  # refused after the key check


def post(settings: GatewaySettings, path: str, content: bytes, headers: list[tuple[str, str]]) -> httpx.Response:
    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(settings, {}))
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            return await http.post(path, content=content, headers=headers)

    return asyncio.run(send())


@pytest.mark.parametrize("first_right", [True, False], ids=["right key first", "wrong key first"])
def test_two_authorization_headers_are_refused_whichever_comes_first(first_right: bool) -> None:
    """The gateway read the last of several Authorization headers, so a wrong key then the right one
    passed and the reverse did not: a proxy checking the first would disagree on who sent the request."""
    keys = [f"Bearer {KEY}", "Bearer nope"] if first_right else ["Bearer nope", f"Bearer {KEY}"]
    headers = [("content-type", "application/json"), *(("authorization", key) for key in keys)]
    for path in ("/v1/embeddings", "/embed"):
        response = post(KEYED, path, EMPTY_INPUT, headers)
        assert response.status_code in (400, 422), response.text  # TEI answers 422 where OpenAI says 400
        error = response.json()["error"]
        assert "several" in (error if path == "/embed" else error["message"])
    one = post(KEYED, "/v1/embeddings", EMPTY_INPUT, [("authorization", f"Bearer {KEY}")])
    assert one.status_code == 400 and one.json()["error"]["param"] == "input"  # past the key check


def test_without_keys_several_authorization_headers_are_ignored() -> None:
    """No keys configured: the header means nothing to the gateway, however many there are."""
    unkeyed = GatewaySettings(redis_url="redis://127.0.0.1:1/0", _env_file=None)
    response = post(unkeyed, "/v1/embeddings", EMPTY_INPUT, [("authorization", "Bearer a"), ("authorization", "b")])
    assert response.status_code == 400 and response.json()["error"]["param"] == "input"


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/translate"])
def test_an_inputs_field_beside_input_is_named_as_unknown_not_as_a_wrong_shape(path: str) -> None:
    """`"inputs": "y"` (TEI's name) beside `input` was answered "'inputs' must be a string or a list
    of strings": it is a string; the problem is the field itself."""
    unkeyed = GatewaySettings(redis_url="redis://127.0.0.1:1/0", _env_file=None)
    content = b'{"model": "m", "input": "x", "inputs": "y"}'
    response = post(unkeyed, path, content, [("content-type", "application/json")])
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "inputs", response.text
    assert "must be" not in error["message"] and "Extra inputs" in error["message"]


UNKEYED = GatewaySettings(redis_url="redis://127.0.0.1:1/0", _env_file=None)


@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/embeddings/"), ("POST", "/embed/"), ("GET", "/health/")])
def test_a_trailing_slash_is_a_404_in_the_apis_shape_not_a_redirect(method: str, path: str) -> None:
    """FastAPI answered `/v1/embeddings/` with a bodiless 307 to `http://<Host>/v1/embeddings`, an
    origin made from whatever Host the client sent; OpenAI and TEI answer such a path 404."""

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(UNKEYED, {}))
        async with httpx.AsyncClient(transport=transport, base_url="http://evil.example") as http:
            return await http.request(method, path, content=b'{"model": "m", "input": "x"}')

    response = asyncio.run(send())
    assert response.status_code == 404 and "location" not in response.headers, response.headers
    error = response.json()["error"]
    assert error["code"] == "not_found" and path in error["message"], error


def test_a_non_ascii_header_value_is_quoted_as_sent() -> None:
    """`X-ECTrans-Priority: réaltime` in UTF-8 was echoed as 'rÃ©altime' (its bytes read as Latin-1)."""
    content = b'{"model": "minilm", "input": "x"}'
    response = post(UNKEYED, "/v1/embeddings", content, [("x-ectrans-priority", "réaltime".encode())])  # type: ignore[list-item]
    assert response.status_code == 400 and "'réaltime'" in response.json()["error"]["message"], response.text


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/translate"])
def test_a_model_name_no_registry_can_hold_is_unknown_and_named_as_the_model(path: str) -> None:
    """A 100 KB model name went on to the dispatcher, which refused a task too large under
    `param: "input"`: the input was one letter. No registry holds such a name: 404 on `model`."""
    content = b'{"model": "' + b"m" * 100_000 + b'", "input": "x"}'
    response = post(UNKEYED, path, content, [])
    error = response.json()["error"]
    assert response.status_code == 404 and error["param"] == "model" and error["code"] == "unknown_model", error
    assert len(error["message"]) < 300
