"""The HTTP gateway end to end: a gateway process speaking real HTTP, the dispatcher and worker in
this process (tests/stack.py), a real Redis. The official `openai` package is one of the clients."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from ectrans.client import AsyncClient
from ectrans.common.registry import ModelSpec, build_spec
from ectrans.models.api import Executor
from ectrans.models.loader import load_executor
from tests.gateway_process import gateway_process
from tests.stack import running_stack, until
from tests.tiny_encoders import SENTENCES, make_tiny_bert

NOOP = build_spec("noop", {"kind": "noop"})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModelSpec, Executor]]:
    path: Path = make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))
    spec = build_spec("tiny", {"path": str(path)})
    executor = load_executor(spec, device="cpu", threads=1)
    yield spec, executor
    executor.close()


@pytest.fixture(scope="module")
def gateway_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}:"


@pytest.fixture(scope="module")
def gateway(redis_server: Any, gateway_prefix: str, tiny: tuple[ModelSpec, Executor]) -> Iterator[str]:
    """One gateway for the module; every test runs its own dispatcher and worker under its prefix."""
    models = {"tiny": {"path": str(tiny[0].path)}, **{name: {"kind": "noop"} for name in ("noop", "idle", "broken")}}
    with gateway_process(redis_server.url, gateway_prefix, models_json=json.dumps(models)) as base:
        yield base


def served(tiny: tuple[ModelSpec, Executor]) -> tuple[dict[str, ModelSpec], dict[str, Executor]]:
    spec, executor = tiny
    registry = {"tiny": spec, "noop": NOOP, "idle": build_spec("idle", {"kind": "noop"})}
    return registry, {"tiny": executor, "noop": load_executor(NOOP)}


def as_vector(embedding: list[float] | str) -> np.ndarray:
    if isinstance(embedding, str):  # base64 of little-endian float32
        return np.frombuffer(base64.b64decode(embedding), "<f4")
    return np.asarray(embedding, dtype=np.float32)


def test_openai_sdk_and_tei_give_the_python_clients_vectors(
    redis_server: Any, gateway_prefix: str, gateway: str, tiny: tuple[ModelSpec, Executor]
) -> None:
    registry, executors = served(tiny)
    texts = SENTENCES[:4]

    async def scenario() -> None:
        async with (
            running_stack(redis_server.url, gateway_prefix, registry, executors),
            AsyncClient(redis_server.url, prefix=gateway_prefix) as client,
        ):
            expected = await client.embed(texts, model="tiny", timeout=30)
            sdk = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)
            for encoding in ("float", "base64"):
                answer = await sdk.embeddings.create(model="tiny", input=texts, encoding_format=encoding)
                got = np.array([as_vector(e.embedding) for e in answer.data], dtype=np.float32)
                assert np.array_equal(got, expected), encoding
                assert [e.index for e in answer.data] == list(range(len(texts)))
                assert answer.usage.prompt_tokens == answer.usage.total_tokens > len(texts)
            single = await sdk.embeddings.create(model="tiny", input=texts[0])  # the SDK's default: base64
            # Alone, not padded beside the others: equal up to float rounding.
            assert np.allclose(np.asarray(single.data[0].embedding, dtype=np.float32), expected[0], atol=1e-5)
            await sdk.close()
            async with httpx.AsyncClient(base_url=gateway, timeout=30) as http:
                tei = await http.post("/embed", json={"inputs": texts, "model": "tiny", "normalize": False})
                assert tei.status_code == 200, tei.text
                assert np.array_equal(np.asarray(tei.json(), dtype=np.float32), expected)
                normed = await http.post("/embed", json={"inputs": texts[0], "model": "tiny"})
                assert np.allclose(np.linalg.norm(normed.json()[0]), 1.0, atol=1e-6)

    asyncio.run(scenario())


def test_models_probes_metrics_and_docs(
    redis_server: Any, gateway_prefix: str, gateway: str, tiny: tuple[ModelSpec, Executor]
) -> None:
    registry, executors = served(tiny)

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=gateway, timeout=30) as http:
            assert (await http.get("/health")).json() == {"status": "ok"}
            assert (await http.get("/ready")).status_code == 503  # no worker yet
            async with running_stack(redis_server.url, gateway_prefix, registry, executors):

                async def ready() -> bool:
                    return (await http.get("/ready")).status_code == 200

                await until(ready, what="the worker's first heartbeat")
                assert set((await http.get("/ready")).json()["models"]) == {"tiny", "noop"}
                cards = {card["id"]: card for card in (await http.get("/v1/models")).json()["data"]}
                assert cards["tiny"]["served"] and cards["noop"]["served"] and not cards["idle"]["served"]
                assert cards["tiny"]["kind"] == "encoder" and cards["tiny"]["ops"] == ["embed"]
                assert (await http.post("/embed", json={"inputs": "x", "model": "noop"})).json() == [[1.0]]
            metrics = (await http.get("/metrics")).text
            assert 'ectrans_gateway_requests_total{endpoint="/embed",status="200"}' in metrics
            assert 'ectrans_gateway_inputs_total{model="noop"} 1.0' in metrics
            schema = (await http.get("/openapi.json")).json()
            assert {"/v1/embeddings", "/embed", "/v1/translate", "/v1/models"} <= set(schema["paths"])
            assert (await http.get("/docs")).status_code == 200

    asyncio.run(scenario())


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    detail: dict[str, Any] = body["error"]
    return detail


def test_every_reason_maps_to_its_status(
    redis_server: Any, gateway_prefix: str, gateway: str, tiny: tuple[ModelSpec, Executor]
) -> None:
    registry, executors = served(tiny)
    closed = load_executor(build_spec("broken", {"kind": "noop"}))
    closed.close()  # a model whose device fails every batch: `internal`
    registry["broken"] = build_spec("broken", {"kind": "noop"})
    executors["broken"] = closed
    dispatcher = {"max_queue_len": 3, "unavailable_after_s": 0.2}

    async def scenario() -> None:
        async with (
            running_stack(redis_server.url, gateway_prefix, registry, executors, dispatcher=dispatcher) as stack,
            httpx.AsyncClient(base_url=gateway, timeout=30) as http,
        ):
            placement = stack.dispatcher.placement

            async def placed() -> bool:  # the dispatcher has seen the worker, and no worker for `idle`
                return bool(placement.hosts("noop")) and placement.unavailable("idle")

            await until(placed, what="the dispatcher's placement")

            async def post(path: str, **body: Any) -> httpx.Response:
                return await http.post(path, json=body)

            bad = await post("/v1/embeddings", model="noop", input=["fine", " "])
            assert bad.status_code == 400 and error_of(bad)["code"] == "bad_input", bad.text
            assert "input 1" in error_of(bad)["message"]
            tei_bad = await post("/embed", model="noop", inputs=" ")
            assert tei_bad.status_code == 422 and tei_bad.json()["error_type"] == "Validation", tei_bad.text
            unknown = await post("/v1/embeddings", model="nope", input="x")
            assert unknown.status_code == 404 and error_of(unknown)["code"] == "unknown_model"
            wrong_op = await post("/v1/translate", model="tiny", input="x")
            assert wrong_op.status_code == 400 and error_of(wrong_op)["code"] == "unknown_op"
            gone = await post("/v1/embeddings", model="idle", input="x")
            assert gone.status_code == 503 and error_of(gone)["code"] == "unavailable", gone.text
            assert gone.headers["retry-after"] == "5"
            broken = await post("/v1/embeddings", model="broken", input="x")
            assert broken.status_code == 500 and error_of(broken)["code"] == "internal"
            assert broken.headers["x-should-retry"] == "false" and "x-should-retry" not in gone.headers

            # The OpenAI SDK retries a 5xx twice by default: the header keeps it from resending an
            # input that fails the model (the gateway's own count of 500s says how many it received).
            def failed(metrics: str) -> float:
                line = 'ectrans_gateway_requests_total{endpoint="/v1/embeddings",status="500"} '
                return sum(float(row.removeprefix(line)) for row in metrics.splitlines() if row.startswith(line))

            before = failed((await http.get("/metrics")).text)
            sdk = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="unused")  # max_retries: the default, 2
            with pytest.raises(openai.InternalServerError):
                await sdk.embeddings.create(model="broken", input="x")
            await sdk.close()
            assert failed((await http.get("/metrics")).text) == before + 1
            full = await post("/v1/embeddings", model="noop", input=["x"] * 50)
            assert full.status_code == 429 and error_of(full)["code"] == "overloaded", full.text
            assert full.headers["retry-after"] == "1"
            long = await post("/v1/embeddings", model="tiny", input=SENTENCES[-1] * 4)
            assert long.status_code == 400 and "truncate" in error_of(long)["message"]
            assert (await post("/embed", model="tiny", inputs=SENTENCES[-1] * 4)).status_code == 413
            cut = await post("/v1/embeddings", model="tiny", input=SENTENCES[-1] * 4, truncate=True)
            assert cut.status_code == 200, cut.text

    asyncio.run(scenario())


def test_a_request_fails_at_its_first_failed_input_and_its_queued_inputs_are_cancelled(
    redis_server: Any, gateway_prefix: str, gateway: str
) -> None:
    """One input refused at once (a blank text) fails the request: it is answered then, not after
    its other inputs are computed for nothing (a 429 from a queue that sheds one input of 2,048 came
    after the rest had run, and an SDK retrying it ran them again), and those inputs never run."""
    slow = build_spec("idle", {"kind": "noop", "delay_ms": 1500})  # the gateway's `idle`, slow here
    executor = CountingNoop(slow)

    async def scenario() -> None:
        async with (
            running_stack(
                redis_server.url, gateway_prefix, {"idle": slow}, {"idle": executor}, worker={"max_inflight_batches": 1}
            ),
            AsyncClient(redis_server.url, prefix=gateway_prefix) as client,
            httpx.AsyncClient(base_url=gateway, timeout=30) as http,
        ):
            busy = asyncio.create_task(client.submit("idle", "noop", "hold the device", priority="batch"))
            await until(executor.running, what="the first task on the device")
            body = {"model": "idle", "input": ["queued", "queued too", " "], "priority": "batch"}
            refused = await http.post("/v1/embeddings", json=body)
            assert refused.status_code == 400 and "input 2: " in error_of(refused)["message"], refused.text
            assert not busy.done(), "the request waited for the device"
            await busy
            await asyncio.sleep(0.3)  # room for a queued task to start, were it not cancelled
        assert executor.ran == ["hold the device"], "the model ran inputs of a request already answered"

    asyncio.run(scenario())


def test_deadline_and_gateway_timeout_are_504(redis_url: str, prefix: str) -> None:
    slow = build_spec("slow", {"kind": "noop", "delay_ms": 1500})
    worker = {"max_inflight_batches": 1}

    executor = CountingNoop(slow)

    async def scenario(base: str) -> None:
        async with (
            running_stack(redis_url, prefix, {"slow": slow}, {"slow": executor}, worker=worker) as stack,
            AsyncClient(redis_url, prefix=prefix) as client,
            httpx.AsyncClient(base_url=base, timeout=30) as http,
        ):
            busy = asyncio.create_task(client.submit("slow", "noop", "hold the device", priority="batch"))
            await until(executor.running, what="the first task on the device")
            late = await http.post(
                "/v1/embeddings", json={"model": "slow", "input": "x", "deadline_ms": 50, "priority": "batch"}
            )
            assert late.status_code == 504 and error_of(late)["code"] == "deadline", late.text
            waited = await http.post(
                "/v1/embeddings", json={"model": "slow", "input": "y"}, headers={"X-ECTrans-Priority": "batch"}
            )
            assert waited.status_code == 504 and error_of(waited)["code"] == "timeout", waited.text
            assert "cancelled" in error_of(waited)["message"]
            await busy
            # The 504's task is cancelled, not run once the device is free (an SDK retrying the 504 sends
            # it again): its one terminal record says so.
            records: list[dict[Any, Any]] = []

            async def all_answered() -> bool:
                records.clear()
                async for key in stack.redis.scan_iter(match=f"{prefix}result:*"):
                    records.append(await stack.redis.hgetall(key))
                return len(records) >= 3

            await until(all_answered, what="a record for each of the three tasks")
            assert sorted(r.get(b"reason", b"") for r in records) == [b"", b"cancelled", b"deadline"], records
        assert executor.ran == ["hold the device"], "the model ran a task whose request was answered 504"

    models = json.dumps({"slow": {"kind": "noop", "delay_ms": 1500}})
    with gateway_process(redis_url, prefix, models_json=models, gateway_timeout_s="1") as base:
        asyncio.run(scenario(base))


class CountingNoop(Executor):
    """The no-op executor, recording every input it is asked to run."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.inner = load_executor(spec)
        self.ran: list[str] = []

    def count_tokens(self, texts: Any) -> list[int]:
        return self.inner.count_tokens(texts)

    def submit(self, request: Any) -> Any:
        self.ran.extend(request.inputs)
        return self.inner.submit(request)

    async def running(self) -> bool:
        return bool(self.ran)

    def close(self) -> None:
        self.inner.close()


def test_a_client_that_disconnects_gets_its_queued_tasks_cancelled(redis_url: str, prefix: str) -> None:
    slow = build_spec("slow", {"kind": "noop", "delay_ms": 1500})
    executor = CountingNoop(slow)
    worker = {"max_inflight_batches": 1}

    async def scenario(base: str) -> list[dict[str, str]]:
        async with (
            running_stack(redis_url, prefix, {"slow": slow}, {"slow": executor}, worker=worker) as stack,
            AsyncClient(redis_url, prefix=prefix) as client,
        ):
            busy = asyncio.create_task(client.submit("slow", "noop", "hold the device", priority="batch"))
            await until(executor.running, what="the first task on the device")  # the next batch waits its turn
            async with httpx.AsyncClient(base_url=base) as http:
                with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
                    await http.post(
                        "/embed", json={"model": "slow", "inputs": ["victim", "too"], "priority": "batch"}, timeout=0.5
                    )
                assert (await busy).ok
                records: list[dict[str, str]] = []

                async def all_answered() -> bool:  # the cancelled tasks, once the device is free
                    records.clear()
                    async for key in stack.redis.scan_iter(match=f"{prefix}result:*"):
                        raw: dict[Any, Any] = await stack.redis.hgetall(key)
                        records.append({k.decode(): v.decode(errors="replace") for k, v in raw.items()})
                    return len(records) >= 3

                await until(all_answered, what="a record for each of the three tasks")
                metrics = (await http.get("/metrics")).text
            assert "ectrans_gateway_cancelled_total 2.0" in metrics
            return records

    models = json.dumps({"slow": {"kind": "noop", "delay_ms": 1500}})
    with gateway_process(redis_url, prefix, models_json=models) as base:
        records = asyncio.run(scenario(base))
    assert executor.ran == ["hold the device"], "the model ran a cancelled task"
    cancelled = [r for r in records if r.get("reason") == "cancelled"]
    assert len(cancelled) == 2 and all(r["status"] == "error" for r in cancelled), records
    assert len(records) == 3  # one terminal record per task: the held one's result and two cancellations
