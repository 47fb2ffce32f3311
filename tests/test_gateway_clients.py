"""Real clients against the gateway: Hugging Face's `InferenceClient` (TEI), the official `openai`
SDK's edge cases, and hostile HTTP. One gateway process and one stack (a tiny BERT as the gateway's
default model, and the no-op model) serve the whole module."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import huggingface_hub.constants
import numpy as np
import openai
import pytest
from huggingface_hub import AsyncInferenceClient, InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from tokenizers import Tokenizer

from ectrans.client import Client
from ectrans.common.registry import ModelSpec, build_spec
from ectrans.models.loader import load_executor
from tests.gateway_process import gateway_process
from tests.stack import stack_in_thread
from tests.tiny_encoders import SENTENCES, make_tiny_bert

MAX_INPUTS = 16
LONG = SENTENCES[-1] * 4  # over the tiny model's token limit
PROMPTS = {"query": "query: ", "passage": "passage: "}  # the tiny model's sentence-transformers prompts


@pytest.fixture(scope="module")
def served(redis_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, ModelSpec]]:
    """(gateway URL, Redis URL, prefix) with a running stack behind the gateway."""
    path: Path = make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))
    (path / "config_sentence_transformers.json").write_text(json.dumps({"prompts": PROMPTS}))
    spec = build_spec("tiny", {"path": str(path)})
    noop = build_spec("noop", {"kind": "noop"})
    executors = {"tiny": load_executor(spec, device="cpu", threads=1), "noop": load_executor(noop)}
    prefix = f"t{uuid.uuid4().hex[:10]}:"
    models = json.dumps({"tiny": {"path": str(path)}, "noop": {"kind": "noop"}})
    settings = {"models_json": models, "gateway_default_model": "tiny", "gateway_max_inputs": str(MAX_INPUTS)}
    try:
        with (
            stack_in_thread(redis_server.url, prefix, {"tiny": spec, "noop": noop}, executors),
            gateway_process(redis_server.url, prefix, **settings) as base,
        ):
            yield base, prefix, spec
    finally:
        for executor in executors.values():
            executor.close()


@pytest.fixture(scope="module")
def expected(redis_server: Any, served: tuple[str, str, ModelSpec]) -> np.ndarray:
    """The tiny model's vectors of SENTENCES[:3], from the Python client."""
    with Client(redis_server.url, prefix=served[1]) as client:
        vectors: np.ndarray = client.embed(SENTENCES[:3], model="tiny", timeout=30)
    return vectors


@pytest.fixture(autouse=True)
def local_inference_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub refuses every request in offline mode (HF_HUB_OFFLINE=1, set by conftest), also
    one to a URL given explicitly: these reach only the local gateway, never a hub."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def unit(rows: np.ndarray) -> np.ndarray:
    normed: np.ndarray = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return normed


# huggingface_hub -------------------------------------------------------------------------------------


def test_inference_client_gets_teis_answers(served: tuple[str, str, ModelSpec], expected: np.ndarray) -> None:
    """`InferenceClient(base_url=...)` posts `{"inputs", ...parameters}` to the address itself: `POST /`."""
    base = served[0]
    by_base = InferenceClient(base_url=base)
    one = by_base.feature_extraction(SENTENCES[0])
    assert one.shape == (1, expected.shape[1]) and np.allclose(one, unit(expected[:1]), atol=1e-6)
    by_model = InferenceClient(model=base)
    raw = by_model.feature_extraction(SENTENCES[:3], normalize=False)
    assert np.array_equal(raw, expected)
    short = by_model.feature_extraction(SENTENCES[1], dimensions=8)  # TEI keeps the first 8, then normalises
    assert np.allclose(short, unit(expected[1:2, :8]), atol=1e-6)
    assert by_model.feature_extraction(LONG, truncate=True, truncation_direction="right").shape == one.shape
    assert InferenceClient(model=f"{base}/embed").feature_extraction(SENTENCES[2], normalize=False).shape == one.shape


def test_inference_client_errors_are_teis(served: tuple[str, str, ModelSpec]) -> None:
    client = InferenceClient(base_url=served[0])
    cases: list[tuple[dict[str, Any], int, str, str]] = [
        ({"text": LONG}, 413, "Validation", "truncate"),
        ({"text": LONG, "truncate": True, "truncation_direction": "left"}, 422, "Validation", "right truncation"),
        ({"text": "x", "dimensions": 4096}, 422, "Validation", "dimensions"),
        ({"text": "x", "prompt_name": "nope"}, 422, "Validation", "its prompts: 'passage', 'query'"),
        ({"text": []}, 400, "Empty", "empty list"),
        ({"text": ["x"] * (MAX_INPUTS + 1)}, 422, "Validation", f"limit of {MAX_INPUTS}"),
    ]
    for arguments, status, error_type, words in cases:
        with pytest.raises(HfHubHTTPError) as caught:
            client.feature_extraction(**arguments)
        response = caught.value.response
        assert response.status_code == status, (arguments, response.text)
        assert response.json()["error_type"] == error_type and words in response.json()["error"]
        assert words in str(caught.value), str(caught.value)  # the client shows the server's message


def test_async_inference_client_and_info(served: tuple[str, str, ModelSpec], expected: np.ndarray) -> None:
    base, _, spec = served

    async def scenario() -> None:
        async with AsyncInferenceClient(base_url=base) as client:
            vectors = await client.feature_extraction(SENTENCES[:2], normalize=False)
        assert np.array_equal(vectors, expected[:2])
        async with httpx.AsyncClient(base_url=base) as http:
            info = (await http.get("/info")).json()
            root = await http.get("/")  # TEI's health check
        assert info["model_id"] == "tiny" and info["max_input_length"] == spec.max_tokens
        assert info["max_client_batch_size"] == MAX_INPUTS and info["model_type"] == {"embedding": {"pooling": "mean"}}
        assert root.status_code == 200

    asyncio.run(scenario())


def test_prompt_name_puts_the_models_prompt_before_each_text(
    redis_server: Any, served: tuple[str, str, ModelSpec]
) -> None:
    """TEI's `prompt_name`: the vector of `prompts[name] + text`, the prompt's tokens counted against the limit."""
    base, prefix, spec = served
    with Client(redis_server.url, prefix=prefix) as client:
        prompted = client.embed([PROMPTS["query"] + SENTENCES[0], PROMPTS["passage"] + SENTENCES[1]], model="tiny")
    client_tei = InferenceClient(base_url=base)
    query = client_tei.feature_extraction(SENTENCES[0], prompt_name="query", normalize=False)
    assert np.allclose(query, prompted[:1], atol=1e-6)
    passages = httpx.post(f"{base}/embed", json={"inputs": SENTENCES[1:2], "prompt_name": "passage"}, timeout=30)
    assert np.allclose(passages.json(), unit(prompted[1:2]), atol=1e-6), passages.text
    tokenizer = Tokenizer.from_file(str(spec.path / "tokenizer.json"))
    fits = next(  # a text within the limit alone, over it with the prompt
        text
        for words in range(1, 200)
        if len(tokenizer.encode(text := " ".join(["fox"] * words)).ids)
        <= spec.max_tokens
        < len(tokenizer.encode(PROMPTS["query"] + text).ids)
    )
    assert httpx.post(f"{base}/embed", json={"inputs": fits}, timeout=30).status_code == 200
    assert httpx.post(f"{base}/embed", json={"inputs": fits, "prompt_name": "query"}, timeout=30).status_code == 413
    for inputs, words in (([1, 2], "token ids"), ("", "empty string")):
        refused = httpx.post(f"{base}/embed", json={"inputs": inputs, "prompt_name": "query"}, timeout=30)
        assert words in refused.json()["error"], refused.text


def test_tei_options_sent_as_null_are_their_defaults(served: tuple[str, str, ModelSpec], expected: np.ndarray) -> None:
    """Clients that write every field of TEI's request, set or not, send the unset ones as null."""
    nulls = {"truncate": None, "truncation_direction": None, "prompt_name": None, "dimensions": None}
    answer = httpx.post(f"{served[0]}/embed", json={"inputs": SENTENCES[0], **nulls}, timeout=30)
    assert answer.status_code == 200 and np.allclose(answer.json(), unit(expected[:1]), atol=1e-6), answer.text


# openai -----------------------------------------------------------------------------------------------


def test_openai_sdk_edge_cases(served: tuple[str, str, ModelSpec], expected: np.ndarray) -> None:
    base = served[0]
    sdk = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    default = sdk.embeddings.create(model="tiny", input=SENTENCES[:3])  # the SDK asks for base64 and decodes it
    assert np.array_equal(np.asarray([e.embedding for e in default.data], dtype=np.float32), expected)
    extra = sdk.embeddings.create(
        model="tiny", input=SENTENCES[0], dimensions=expected.shape[1], user="u-1", extra_body={"priority": "batch"}
    )
    # Alone, not padded beside the others: equal up to float rounding.
    assert np.allclose(np.asarray(extra.data[0].embedding, dtype=np.float32), expected[0], atol=1e-5)
    raw = sdk.embeddings.with_raw_response.create(model="noop", input="four", encoding_format="float")
    assert raw.headers["content-type"] == "application/json" and raw.parse().data[0].embedding == [4.0]
    no_v1 = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)  # TEI serves `/embeddings` too
    assert no_v1.embeddings.create(model="noop", input="four").data[0].embedding == [4.0]
    assert {"tiny", "noop"} <= {model.id for model in sdk.models.list()}
    assert sdk.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.models.retrieve("no-such-model")
    assert missing.value.code == "unknown_model"

    errors: list[tuple[dict[str, Any], type[openai.APIStatusError], str, str]] = [
        ({"input": ["x"] * (MAX_INPUTS + 1)}, openai.BadRequestError, "bad_input", f"limit of {MAX_INPUTS}"),
        ({"input": [[1, 2, 3], [10**6]]}, openai.BadRequestError, "bad_input", "input[1] holds token id 1000000"),
        ({"input": ""}, openai.BadRequestError, "bad_input", "empty string"),
        ({"input": "x", "dimensions": 3}, openai.BadRequestError, "bad_input", "'dimensions' must match"),
        ({"input": "x", "model": "no-such-model"}, openai.NotFoundError, "unknown_model", "no-such-model"),
    ]
    for arguments, error, code, words in errors:
        with pytest.raises(error) as caught:
            sdk.embeddings.create(**{"model": "tiny", **arguments})
        assert caught.value.code == code and words in caught.value.message, caught.value.message
    sdk.close()
    no_v1.close()


def test_token_ids_are_the_models_own_and_give_the_texts_vectors(
    served: tuple[str, str, ModelSpec], expected: np.ndarray
) -> None:
    """OpenAI's `input` and TEI's `inputs` as token ids (one list, or a list of lists): ids of the model's
    vocabulary, special tokens included, as the model's tokenizer makes them from the same texts."""
    base, _, spec = served
    tokenizer = Tokenizer.from_file(str(spec.path / "tokenizer.json"))
    ids = [encoding.ids for encoding in tokenizer.encode_batch(SENTENCES[:3])]
    sdk = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    formats: list[dict[str, Any]] = [{}, {"encoding_format": "float"}]  # none: the SDK asks for base64, decodes it
    for encoding_format in formats:
        batch = sdk.embeddings.create(model="tiny", input=ids, **encoding_format)
        assert np.allclose([e.embedding for e in batch.data], expected, atol=1e-6), encoding_format
        assert batch.usage.prompt_tokens == sum(len(row) for row in ids)
    one = sdk.embeddings.create(model="tiny", input=ids[1])  # a list of ints is one input
    assert len(one.data) == 1 and np.allclose(one.data[0].embedding, expected[1], atol=1e-6)
    cut = sdk.embeddings.create(model="tiny", input=ids[0] * 30, extra_body={"truncate": True})
    assert cut.usage.prompt_tokens == spec.max_tokens
    tei = httpx.post(f"{base}/embed", json={"inputs": ids, "normalize": False}, timeout=30)
    assert tei.status_code == 200 and np.allclose(tei.json(), expected, atol=1e-6), tei.text

    refusals: list[tuple[dict[str, Any], type[openai.APIStatusError], str]] = [
        ({"input": [ids[0], [spec.vocab_size]]}, openai.BadRequestError, f"input[1] holds token id {spec.vocab_size}"),
        ({"input": [[-1]]}, openai.BadRequestError, "input[0] holds token id -1, in no vocabulary"),
        ({"input": [ids[0], []]}, openai.BadRequestError, "input[1] is an empty list of token ids"),
        ({"input": ids[0] * 30}, openai.BadRequestError, f"over the limit of {spec.max_tokens}"),
        ({"input": [ids[0]] * (MAX_INPUTS + 1)}, openai.BadRequestError, f"limit of {MAX_INPUTS}"),
        ({"input": ids[0], "model": "noop"}, openai.BadRequestError, "takes text, not token ids"),
        ({"input": ids[0], "model": "no-such-model"}, openai.NotFoundError, "no-such-model"),
    ]
    for arguments, error, words in refusals:
        with pytest.raises(error) as caught:
            sdk.embeddings.create(**{"model": "tiny", **arguments})
        assert words in caught.value.message, caught.value.message
    sdk.close()
    for inputs, status, error_type in (
        ([[]], 400, "Empty"),
        (ids[0] * 30, 413, "Validation"),
        ([-1], 422, "Validation"),
    ):
        refused = httpx.post(f"{base}/embed", json={"inputs": inputs}, timeout=30)
        assert refused.status_code == status and refused.json()["error_type"] == error_type, refused.text


# hostile HTTP -----------------------------------------------------------------------------------------

JSON = {"content-type": "application/json"}
HOSTILE: dict[str, tuple[str, str, bytes, dict[str, str], int]] = {
    "duplicate keys": ("POST", "/v1/embeddings", b'{"model": "noop", "input": "a", "input": "b"}', JSON, 400),
    "TEI duplicate keys": ("POST", "/", b'{"inputs": "a", "inputs": ["b", "c"]}', JSON, 422),
    "input null": ("POST", "/v1/embeddings", b'{"model": "noop", "input": null}', JSON, 400),
    "Infinity": ("POST", "/v1/embeddings", b'{"model": "noop", "input": "x", "deadline_ms": Infinity}', JSON, 400),
    "huge number": ("POST", "/v1/embeddings", b'{"model": "noop", "input": "x", "dimensions": 1e999}', JSON, 400),
    "4000-digit dimensions": ("POST", "/embed", b'{"inputs": "x", "dimensions": ' + b"9" * 4000 + b"}", JSON, 422),
    "BOM": ("POST", "/v1/embeddings", b'\xef\xbb\xbf{"model": "noop", "input": "x"}', JSON, 400),
    "nested object": ("POST", "/embed", b'{"inputs": ' + b'{"a": ' * 200 + b"1" + b"}" * 201, JSON, 422),
    "form body": (
        "POST",
        "/v1/embeddings",
        b"model=noop&input=x",
        {"content-type": "application/x-www-form-urlencoded"},
        400,
    ),
    "query string": ("POST", "/v1/embeddings?model=noop&input=x", b"", {}, 400),
    "OPTIONS": ("OPTIONS", "/v1/embeddings", b"", {}, 405),
    "DELETE": ("DELETE", "/v1/models", b"", {}, 405),
    "GET on TEI": ("GET", "/embed", b"", {}, 405),
    "unknown path": ("GET", "/v2/whatever?x=1", b"", {}, 404),
    "TEI-only path": ("POST", "/embed_sparse", b'{"inputs": "x"}', JSON, 404),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_http_gets_a_json_4xx_and_the_gateway_serves_on(served: tuple[str, str, ModelSpec], name: str) -> None:
    method, path, content, headers, status = HOSTILE[name]
    base = served[0]
    response = httpx.request(method, base + path, content=content, headers=headers, timeout=10)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    message = error if isinstance(error, str) else error["message"]
    assert message and "Traceback" not in message and len(message) < 500, message
    if status == 405:
        assert response.headers["allow"], "a 405 names the methods the path takes"
    healthy = httpx.post(base + "/v1/embeddings", json={"model": "noop", "input": "still here"}, timeout=10)
    assert healthy.json()["data"][0]["embedding"] == [10.0]


def test_probes_answer_head(served: tuple[str, str, ModelSpec]) -> None:
    base = served[0]
    for path in ("/health", "/ready", "/v1/models", "/info", "/"):
        response = httpx.head(base + path, timeout=10)
        assert response.status_code == 200 and response.content == b"", path


def test_a_lying_chunked_body_over_the_limit_and_invalid_utf8(served: tuple[str, str, ModelSpec]) -> None:
    """Raw sockets, as a hostile client writes them: the gateway answers each with a 4xx and serves on."""
    host, port = served[0].removeprefix("http://").split(":")
    chunk = b"x" * 65536
    head = b"host: g\r\ncontent-type: application/json\r\n"
    requests = [
        # chunked, no Content-Length, 2 MiB and more: refused as it streams in
        b"POST /v1/embeddings HTTP/1.1\r\n"
        + head
        + b"transfer-encoding: chunked\r\n\r\n"
        + b'1e\r\n{"model": "noop", "input": "xx\r\n'
        + (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 40
        + b'2\r\n"}\r\n0\r\n\r\n',
        b"POST /embed HTTP/1.1\r\n" + head + b'content-length: 16\r\n\r\n{"inputs": "\xc3("}',
    ]
    for raw, status in zip(requests, (b"413", b"422"), strict=True):
        with socket.create_connection((host, int(port)), timeout=10) as connection:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # answered before the whole body
                connection.sendall(raw)
            answer = connection.recv(65536)
        assert answer.split(b" ")[1] == status, answer[:300]
        assert b"application/json" in answer and b"Traceback" not in answer
    assert httpx.get(served[0] + "/health", timeout=10).status_code == 200


def test_base64_is_little_endian_float32(served: tuple[str, str, ModelSpec]) -> None:
    """What an SDK in another language decodes: base64 of `<f4` bytes, one vector per input."""
    body = {"model": "noop", "input": ["a", "bcd"], "encoding_format": "base64"}
    data = httpx.post(served[0] + "/v1/embeddings", json=body, timeout=10).json()["data"]
    assert [np.frombuffer(base64.b64decode(e["embedding"]), "<f4").tolist() for e in data] == [[1.0], [3.0]]


def test_unknown_model_names_by_the_hundred_add_no_metric_labels(served: tuple[str, str, ModelSpec]) -> None:
    """Each gets `unknown_model` (404); /metrics counts them all under one `unknown` label value."""

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=served[0], timeout=30) as http:
            names = [f"nope-{uuid.uuid4().hex}" for _ in range(200)]
            return list(
                await asyncio.gather(
                    *(http.post("/v1/embeddings", json={"model": name, "input": "x"}) for name in names)
                )
            )

    responses = asyncio.run(flood())
    assert {response.status_code for response in responses} == {404}
    assert {response.json()["error"]["code"] for response in responses} == {"unknown_model"}
    metrics = httpx.get(served[0] + "/metrics", timeout=10).text
    labels = {line.split("}")[0] for line in metrics.splitlines() if line.startswith("ectrans_gateway_inputs_total{")}
    assert 'ectrans_gateway_inputs_total{model="unknown"' in labels and "nope-" not in metrics
    assert labels <= {f'ectrans_gateway_inputs_total{{model="{name}"' for name in ("tiny", "noop", "unknown")}
