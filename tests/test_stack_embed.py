"""The trio end to end on the real default model (MiniLM), through a real Redis."""

from __future__ import annotations

import asyncio
import json
import random

import numpy as np
import pytest

from ectrans import client as client_module
from ectrans.bench.workload import load_sentences
from ectrans.client import AsyncClient, TaskFailed, TaskTimeout
from ectrans.common.registry import ModelSpec
from ectrans.local.redis_server import RedisServer
from ectrans.models.api import Executor
from tests.stack import reference_embeddings, running_stack, stack_in_thread


def sentences(n: int, seed: int = 0) -> list[str]:
    pool = load_sentences("sentences_100.txt")
    rng = random.Random(seed)
    return [rng.choice(pool) for _ in range(n)]


@pytest.mark.parametrize("count", [1, 64])
def test_raw_xadd_gives_reference_embeddings(
    redis_url: str, prefix: str, registry: dict[str, ModelSpec], minilm_executor: Executor, count: int
) -> None:
    texts = sentences(count, seed=count)

    async def scenario() -> list[dict[str, str]]:
        async with running_stack(redis_url, prefix, registry, {"minilm": minilm_executor}) as stack:
            # Exactly what `redis-cli XADD ectrans:tasks * model minilm op embed input "..."` sends.
            ids = [await stack.xadd(model="minilm", op="embed", input=t) for t in texts]
            by_id = await stack.results(ids)
            return [by_id[i] for i in ids]

    results = asyncio.run(scenario())
    expected = reference_embeddings(str(registry["minilm"].path), texts)
    for i, record in enumerate(results):
        assert record["status"] == "ok", record
        assert record["class"] in ("realtime", "batch")
        assert float(record["latency_ms"]) >= 0
        got = np.asarray(json.loads(record["output"]), dtype=np.float32)
        assert np.abs(got - expected[i]).max() <= 1e-5


@pytest.mark.parametrize("count", [1, 64])
def test_client_embed_equals_reference(
    redis_url: str, prefix: str, registry: dict[str, ModelSpec], minilm_executor: Executor, count: int
) -> None:
    texts = sentences(count, seed=100 + count)

    async def scenario() -> np.ndarray:
        async with (
            running_stack(redis_url, prefix, registry, {"minilm": minilm_executor}),
            AsyncClient(redis_url, prefix=prefix) as client,
        ):
            return await client.embed(texts, priority="realtime" if count == 1 else "batch", timeout=60)

    vectors = asyncio.run(scenario())
    assert vectors.shape == (count, 384) and vectors.dtype == np.float32
    assert np.abs(vectors - reference_embeddings(str(registry["minilm"].path), texts)).max() <= 1e-5


BAD_TASKS: dict[str, tuple[dict[str, str | bytes], str, str]] = {
    "unknown model": ({"model": "nope", "op": "embed", "input": "x"}, "unknown_model", "nope"),
    "unknown op": ({"model": "minilm", "op": "fly", "input": "x"}, "unknown_op", "fly"),
    "missing input": ({"model": "minilm", "op": "embed"}, "bad_input", "input"),
    "empty input": ({"model": "minilm", "op": "embed", "input": "   "}, "bad_input", "empty"),
    "input over the limit": ({"model": "minilm", "op": "embed", "input": "a " * 6000}, "bad_input", "limit"),
    "non-numeric deadline": (
        {"model": "minilm", "op": "embed", "input": "x", "deadline_ms": "soon"},
        "bad_input",
        "deadline_ms",
    ),
    "invalid priority": (
        {"model": "minilm", "op": "embed", "input": "x", "priority": "urgent"},
        "bad_input",
        "priority",
    ),
    "binary junk": ({"model": "minilm", "op": "embed", "input": b"\xff\xfe\x00junk"}, "bad_input", "UTF-8"),
    "bad id": ({"model": "minilm", "op": "embed", "input": "x", "id": "no spaces allowed"}, "bad_input", "id"),
}


def test_bad_input_gets_error_results_and_service_continues(
    redis_url: str, prefix: str, registry: dict[str, ModelSpec], minilm_executor: Executor
) -> None:
    async def scenario() -> tuple[dict[str, dict[str, str]], dict[str, str]]:
        async with running_stack(
            redis_url, prefix, registry, {"minilm": minilm_executor}, dispatcher={"max_input_chars": 10_000}
        ) as stack:
            ids = {name: await stack.xadd(**fields) for name, (fields, _, _) in BAD_TASKS.items()}
            by_id = await stack.results(list(ids.values()))
            good = await stack.result(await stack.xadd(model="minilm", op="embed", input="still serving"))
            return {name: by_id[i] for name, i in ids.items()}, good

    bad, good = asyncio.run(scenario())
    for name, (_, reason, mentioned) in BAD_TASKS.items():
        assert bad[name]["status"] == "error", name
        assert bad[name]["reason"] == reason, (name, bad[name])
        assert mentioned in bad[name]["error"], (name, bad[name]["error"])
    assert good["status"] == "ok"


def test_task_id_field_keys_the_result(
    redis_url: str, prefix: str, registry: dict[str, ModelSpec], minilm_executor: Executor
) -> None:
    async def scenario() -> dict[str, str]:
        async with running_stack(redis_url, prefix, registry, {"minilm": minilm_executor}) as stack:
            await stack.xadd(model="minilm", op="embed", input="hello", id="job-42", priority="realtime")
            return await stack.result("job-42")

    record = asyncio.run(scenario())
    assert record["status"] == "ok" and record["class"] == "realtime" and record["id"] == "job-42"


def test_500_tasks_in_flight_each_get_exactly_one_result(
    redis_url: str, prefix: str, registry: dict[str, ModelSpec], minilm_executor: Executor
) -> None:
    texts = sentences(500, seed=7)

    async def scenario() -> list[str]:
        async with (
            running_stack(redis_url, prefix, registry, {"minilm": minilm_executor}) as stack,
            AsyncClient(redis_url, prefix=prefix) as client,
        ):
            results = await client.submit_many("minilm", "embed", texts, timeout=240)
            # The client saw one record per task; Redis holds exactly one result hash per task.
            keys = [k async for k in stack.redis.scan_iter(match=f"{prefix}result:*", count=1000)]
            assert len(keys) == len(texts)
            return [r.status for r in results]

    statuses = asyncio.run(scenario())
    assert statuses == ["ok"] * 500


def test_client_raises_task_failed_with_reason(
    redis_url: str, prefix: str, registry: dict[str, ModelSpec], minilm_executor: Executor
) -> None:
    async def scenario() -> None:
        async with (
            running_stack(redis_url, prefix, registry, {"minilm": minilm_executor}),
            AsyncClient(redis_url, prefix=prefix) as client,
        ):
            with pytest.raises(TaskFailed) as failure:
                await client.embed(["ok", ""], timeout=30)
            assert failure.value.reason == "bad_input"

    asyncio.run(scenario())


def test_the_reply_stream_is_trimmed_as_replies_are_read(redis_url: str, prefix: str) -> None:
    """The client trims what it has read from its reply stream (every `TRIM_EVERY` entries, or at a
    read a second after the last trim), not after every read: a long-lived client's stream stays short."""
    from ectrans.common.redis_conn import connect
    from ectrans.common.registry import build_spec
    from ectrans.models.noop import NoopExecutor

    noop = build_spec("noop", {"kind": "noop"})

    async def length_after_a_while(client: AsyncClient) -> int:
        redis = connect(redis_url)
        try:
            for _ in range(50):  # the trim follows the read that answered the caller
                if (length := await redis.xlen(client.reply_stream)) == 0:
                    return 0
                await asyncio.sleep(0.05)
            return int(length)
        finally:
            await redis.aclose()

    async def scenario() -> None:
        async with (
            running_stack(redis_url, prefix, {"noop": noop}, {"noop": NoopExecutor(noop)}),
            AsyncClient(redis_url, prefix=prefix) as client,
        ):
            results = await client.submit_many("noop", "noop", [f"t{i}" for i in range(client_module.TRIM_EVERY)])
            assert all(r.ok for r in results)
            assert await length_after_a_while(client) == 0  # TRIM_EVERY entries read: trimmed at once
            await client.submit("noop", "noop", "one more")
            await asyncio.sleep(0.1)
            redis = connect(redis_url)
            assert await redis.xlen(client.reply_stream) == 1  # one read entry: left for the next trim
            await redis.aclose()
            await asyncio.sleep(client_module.TRIM_AFTER_S)
            await client.submit("noop", "noop", "and the read after the pause trims both")
            assert await length_after_a_while(client) == 0

    asyncio.run(scenario())


def test_client_timeout_names_the_unanswered_tasks(redis_url: str, prefix: str) -> None:
    """No service runs: the wait ends after `timeout` with a TaskTimeout that counts what is missing."""

    async def scenario() -> None:
        async with AsyncClient(redis_url, prefix=prefix) as client:
            with pytest.raises(TaskTimeout, match=r"2 of 2 tasks unanswered after 0\.2s"):
                await client.submit_many("minilm", "embed", ["a", "b"], timeout=0.2)

    asyncio.run(scenario())


def test_sync_client(
    redis_server: RedisServer, prefix: str, registry: dict[str, ModelSpec], minilm_executor: Executor
) -> None:
    from ectrans.client import Client

    with stack_in_thread(redis_server.url, prefix, registry, {"minilm": minilm_executor}):
        with Client(redis_server.url, prefix=prefix) as client:
            vectors = client.embed(["a", "b"], priority="realtime", timeout=30)
        assert vectors.shape == (2, 384)
