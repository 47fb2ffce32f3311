"""The worker's logic stepped by hand (`Worker.step`: read → admit → batch → complete, without the
background loops) against a real Redis: tasks are written to the model queues as the dispatcher
writes them, and each step's answers, counts and metrics are read back."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ParamSpec

import pytest

from ectrans.common.keys import WORKER_GROUP, Keys
from ectrans.common.redis_conn import RedisClient, connect
from ectrans.common.registry import ModelSpec, build_spec
from ectrans.common.results import now_ms
from ectrans.common.schemas import Task
from ectrans.models.api import Executor
from ectrans.models.noop import NoopExecutor
from ectrans.services.worker.namesake import NameTaken
from ectrans.services.worker.service import Worker
from ectrans.services.worker.settings import WorkerSettings
from tests.tiny_encoders import make_tiny_bert

NOOP: ModelSpec = build_spec("noop", {"kind": "noop"})
P = ParamSpec("P")


def on_a_loop(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """Run an async test on an event loop of its own (pytest sees the test's own fixtures)."""

    @functools.wraps(test)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


@asynccontextmanager
async def started_worker(
    redis_url: str, prefix: str, spec: ModelSpec, executor: Executor, **settings: Any
) -> AsyncIterator[tuple[Worker, RedisClient, Keys]]:
    """A worker that has loaded its lane and joined its groups, and a connection to look around with."""
    worker_settings = WorkerSettings(redis_url=redis_url, prefix=prefix, serve_models=spec.name, **settings)
    worker = Worker(worker_settings, {spec.name: spec}, executors={spec.name: executor})
    redis = connect(redis_url)
    try:
        await worker.start()
        yield worker, redis, Keys(prefix)
    finally:
        await worker.redis.aclose()
        await redis.aclose()


async def enqueue(redis: RedisClient, keys: Keys, task_class: str = "realtime", **fields: Any) -> str:
    """A task in its model's queue, as the dispatcher forwards it; returns its id."""
    values: dict[str, Any] = {"model": "noop", "op": "noop", "input": "a few words", "submitted_ms": now_ms()}
    task = Task(id=f"t-{uuid.uuid4().hex[:12]}", **{**values, **fields}).classified(task_class)
    entry: dict[Any, Any] = task.to_fields()
    await redis.xadd(keys.queue(task.model, task_class), entry)
    return task.id


async def record(redis: RedisClient, keys: Keys, task_id: str) -> dict[str, str]:
    raw: Any = await redis.hgetall(keys.result(task_id))
    return {k.decode(): v.decode() for k, v in raw.items()}


async def batch_sizes(redis: RedisClient, keys: Keys) -> list[tuple[str, int]]:
    entries: Any = await redis.xrange(keys.metrics)
    return [(f[b"class"].decode(), int(f[b"size"])) for _, f in entries if f[b"kind"] == b"batch"]


async def backlog(redis: RedisClient, keys: Keys, model: str = "noop") -> tuple[int, int]:
    """(entries in the model's queues, of which pending), summed over both classes."""
    length = pending = 0
    for task_class in ("realtime", "batch"):
        stream = keys.queue(model, task_class)
        length += await redis.xlen(stream)
        pending += (await redis.xpending(stream, WORKER_GROUP))["pending"]
    return length, pending


@on_a_loop
async def test_a_step_answers_what_the_queues_hold_one_batch_per_class(redis_url: str, prefix: str) -> None:
    executor = NoopExecutor(NOOP)
    async with started_worker(redis_url, prefix, NOOP, executor) as (worker, redis, keys):
        realtime = [await enqueue(redis, keys, input=f"word {i}") for i in range(3)]
        bulk = [await enqueue(redis, keys, "batch", input=f"bulk {i}") for i in range(2)]
        assert await worker.step() == 2
        records = [await record(redis, keys, task_id) for task_id in realtime + bulk]
        assert [r["status"] for r in records] == ["ok"] * 5
        assert [r["class"] for r in records] == ["realtime"] * 3 + ["batch"] * 2
        assert sorted(await batch_sizes(redis, keys)) == [("batch", 2), ("realtime", 3)]
        assert worker.counts["ok"] == 5
        assert await backlog(redis, keys) == (0, 0)  # acknowledged and deleted
        assert await worker.step() == 0  # nothing left: no batch, and the step does not block


@on_a_loop
async def test_a_step_keeps_to_the_largest_real_time_batch(redis_url: str, prefix: str) -> None:
    executor = NoopExecutor(NOOP)
    async with started_worker(redis_url, prefix, NOOP, executor, rt_max_batch=2) as (worker, redis, keys):
        ids = [await enqueue(redis, keys) for _ in range(5)]
        assert await worker.step() == 3
        assert await batch_sizes(redis, keys) == [("realtime", 2), ("realtime", 2), ("realtime", 1)]
        assert [(await record(redis, keys, i))["status"] for i in ids] == ["ok"] * 5


@on_a_loop
async def test_a_step_reads_no_more_than_the_prefetch(redis_url: str, prefix: str) -> None:
    executor = NoopExecutor(NOOP)
    async with started_worker(redis_url, prefix, NOOP, executor, prefetch=2, batch_max_batch=2) as (
        worker,
        redis,
        keys,
    ):
        ids = [await enqueue(redis, keys) for _ in range(5)]
        assert await worker.step() == 1
        assert await backlog(redis, keys) == (3, 0)  # three still unread
        assert await worker.step() == 1
        assert await worker.step() == 1
        assert await backlog(redis, keys) == (0, 0)
        assert worker.counts["ok"] == 5
        assert [(await record(redis, keys, i))["status"] for i in ids] == ["ok"] * 5


@on_a_loop
async def test_tasks_past_their_deadline_or_cancelled_are_answered_not_run(redis_url: str, prefix: str) -> None:
    executor = NoopExecutor(NOOP)
    async with started_worker(redis_url, prefix, NOOP, executor) as (worker, redis, keys):
        second_ago = now_ms() - 1000
        late = await enqueue(redis, keys, deadline_ms=500, submitted_ms=second_ago)
        cancelled = await enqueue(redis, keys, submitted_ms=second_ago)
        await redis.set(keys.cancelled(cancelled), "1", px=60_000)
        kept = await enqueue(redis, keys, submitted_ms=second_ago)
        assert await worker.step() == 1  # the batch ran the one task left in it
        assert (await record(redis, keys, late))["reason"] == "deadline"
        assert (await record(redis, keys, cancelled))["reason"] == "cancelled"
        assert (await record(redis, keys, kept))["status"] == "ok"
        assert (worker.counts["deadline"], worker.counts["cancelled"], worker.counts["ok"]) == (1, 1, 1)
        assert await batch_sizes(redis, keys) == [("realtime", 1)]
        assert await backlog(redis, keys) == (0, 0)


@on_a_loop
async def test_an_entry_that_is_no_task_is_answered_under_the_id_it_names(redis_url: str, prefix: str) -> None:
    executor = NoopExecutor(NOOP)
    async with started_worker(redis_url, prefix, NOOP, executor) as (worker, redis, keys):
        await redis.xadd(keys.queue("noop", "realtime"), {"id": "hand-written", "input": "no model, no op"})
        assert await worker.step() == 0
        answer = await record(redis, keys, "hand-written")
        assert (answer["status"], answer["reason"]) == ("error", "internal")
        assert answer["error"].startswith("malformed queue entry")
        assert await backlog(redis, keys) == (0, 0)


@on_a_loop
async def test_own_pending_entries_of_an_earlier_run_are_answered_first(redis_url: str, prefix: str) -> None:
    """A worker that read entries and died before answering them: restarted under the same name,
    its first step answers them (read from its own history), then new ones."""
    executor = NoopExecutor(NOOP)
    async with started_worker(redis_url, prefix, NOOP, executor, instance="w-restart") as (worker, redis, keys):
        stream = keys.queue("noop", "realtime")
        orphans = [await enqueue(redis, keys) for _ in range(2)]
        await redis.xreadgroup(WORKER_GROUP, "w-restart", {stream: ">"})  # the earlier run's read
        fresh = await enqueue(redis, keys)
        assert await worker.step() == 1
        assert [(await record(redis, keys, i))["status"] for i in orphans] == ["ok", "ok"]
        assert await record(redis, keys, fresh) == {}  # history first: new entries on the next read
        assert await worker.step() == 1
        assert (await record(redis, keys, fresh))["status"] == "ok"
        assert await backlog(redis, keys) == (0, 0)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    path: Path = make_tiny_bert(tmp_path_factory.mktemp("step") / "bert")
    return build_spec("tiny-bert", {"path": str(path)})


@on_a_loop
async def test_an_input_over_the_token_limit_is_refused_and_its_batch_mates_run(
    redis_url: str, prefix: str, tiny_bert: ModelSpec
) -> None:
    from ectrans.models.loader import load_executor

    executor = load_executor(tiny_bert, device="cpu", threads=1, segments=1)
    try:
        async with started_worker(redis_url, prefix, tiny_bert, executor) as (worker, redis, keys):
            fields = {"model": tiny_bert.name, "op": "embed"}
            long = await enqueue(redis, keys, **fields, input=" ".join(["word"] * (tiny_bert.max_tokens + 10)))
            short = await enqueue(redis, keys, **fields, input="a short sentence")
            assert await worker.step() == 1
            refused = await record(redis, keys, long)
            assert (refused["status"], refused["reason"]) == ("error", "bad_input")
            assert f"longer than the {tiny_bert.max_tokens} tokens" in refused["error"]
            answered = await record(redis, keys, short)
            assert answered["status"] == "ok" and answered["output"]
            assert await batch_sizes(redis, keys) == [("realtime", 1)]
            assert await backlog(redis, keys, tiny_bert.name) == (0, 0)
    finally:
        executor.close()


def test_a_worker_whose_redis_is_not_there_yet_waits_for_it_instead_of_failing(prefix: str) -> None:
    """Joining the queues' groups right after loading the models raised ConnectionError: the process
    exited with a traceback, and its restart loaded the models again. It now waits, as its loops do,
    and a stop meanwhile ends the wait."""

    async def scenario() -> tuple[bool, int]:
        settings = WorkerSettings(redis_url="redis://127.0.0.1:1/0", prefix=prefix, serve_models="noop")
        worker = Worker(settings, {"noop": NOOP}, executors={"noop": NoopExecutor(NOOP)})
        try:
            starting = asyncio.create_task(worker.start())
            await asyncio.sleep(0.5)
            waited = not starting.done()
            worker.stop()
            await asyncio.wait_for(starting, 1)
        finally:
            await worker.redis.aclose()
        return waited, len(worker.streams)

    assert asyncio.run(scenario()) == (True, 2)


def test_a_second_worker_under_a_live_workers_name_on_this_host_refuses_to_start(redis_url: str, prefix: str) -> None:
    """It shared the first one's pending list and heartbeat (the monitor logged a restart every 5 s)."""
    import subprocess
    import sys

    from ectrans.common.heartbeat import host_name

    sleeper = [
        sys.executable,
        "-c",
        "import time; time.sleep(30)",
        "ectrans.services.worker",
    ]  # a live worker's cmdline

    async def scenario(first_pid: int) -> None:
        keys = Keys(prefix)
        redis = connect(redis_url)
        beat = {"host": host_name(), "pid": str(first_pid), "service": "worker", "instance": "edge-0"}
        await redis.hset(keys.heartbeat("worker", "edge-0"), mapping=beat)  # type: ignore[arg-type]
        await redis.aclose()
        settings = WorkerSettings(redis_url=redis_url, prefix=prefix, serve_models="noop", instance="edge-0")
        worker = Worker(settings, {"noop": NOOP}, executors={"noop": NoopExecutor(NOOP)})
        with pytest.raises(NameTaken, match=f"edge-0 already runs on this host \\(pid {first_pid}\\)"):
            await asyncio.wait_for(worker.run(), 5)

    with subprocess.Popen(sleeper) as first:
        try:
            asyncio.run(scenario(first.pid))
        finally:
            first.kill()
