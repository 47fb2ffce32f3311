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
