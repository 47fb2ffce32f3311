"""Batching that follows the device: a paced executor gets its next bulk batch just before its first
segment is free, formed from everything queued by then, not small batches handed over early."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from ectrans.client import AsyncClient
from ectrans.common.keys import Keys
from ectrans.common.redis_conn import connect
from ectrans.common.registry import build_spec
from ectrans.common.schemas import Task
from ectrans.models.api import Paced, Request
from ectrans.models.noop import NoopExecutor
from ectrans.services.worker.batcher import Pending
from ectrans.services.worker.lanes import ModelLane
from ectrans.services.worker.settings import WorkerSettings
from tests.stack import running_stack

DEVICE_MS = 400  # long enough for 24 arrivals 3 ms apart on a busy host


async def bulk_batch_sizes(redis_url: str, keys: Keys) -> list[int]:
    redis = connect(redis_url)
    try:
        entries: Any = await redis.xrange(keys.metrics)
    finally:
        await redis.aclose()
    return [int(f[b"size"]) for _, f in entries if f.get(b"kind") == b"batch" and f.get(b"class") == b"batch"]


def test_tasks_arriving_while_the_device_runs_form_one_batch(redis_url: str, prefix: str) -> None:
    """A device of fixed batch time: one task starts it at once (idle); 24 tasks arriving one by one
    while it runs all go in the next batch, formed as it is about to be free (with `max_wait_s`
    batching they would go in several small batches queued behind each other)."""
    spec = build_spec("slow", {"kind": "noop", "delay_ms": DEVICE_MS})
    executor = NoopExecutor(spec)
    texts = [f"w{i} x" for i in range(26)]  # the same token count each

    async def scenario() -> list[int]:
        async with (
            running_stack(redis_url, prefix, {"slow": spec}, {"slow": executor}) as stack,
            AsyncClient(redis_url, prefix=prefix) as client,
        ):
            (await client.submit("slow", "noop", texts[0], priority="batch")).raise_for_status()  # the cost
            first = asyncio.create_task(client.submit("slow", "noop", texts[1], priority="batch"))
            await asyncio.sleep(0.02)
            later = []
            for text in texts[2:]:
                later.append(asyncio.create_task(client.submit("slow", "noop", text, priority="batch")))
                await asyncio.sleep(0.003)
            results = await asyncio.gather(first, *later)
            assert all(r.ok for r in results)
            keys = stack.keys
        return await bulk_batch_sizes(redis_url, keys)

    try:
        sizes = asyncio.run(scenario())
    finally:
        executor.close()
    assert sizes == [1, 1, 24], sizes


def test_noop_device_reports_its_progress() -> None:
    """The paced view of a device: bulk batches waiting, the one running since when, a call back at each start."""
    executor = NoopExecutor(build_spec("slow", {"kind": "noop", "delay_ms": 200}))
    assert isinstance(executor, Paced)
    starts: list[int] = []
    started = threading.Event()

    def on_start() -> None:
        starts.append(executor.bulk_waiting())
        started.set()

    stop = executor.on_progress(on_start)
    try:
        futures = [executor.submit(Request("noop", ["a b", "c"])) for _ in range(3)]
        assert started.wait(5)
        front = executor.front_segment()
        assert front is not None and front.padded_tokens == 3
        for future in futures:
            future.result(5)
        assert len(starts) == 3 and starts[-1] == 0  # each start leaves one fewer waiting
        assert executor.front_segment() is None and executor.bulk_waiting() == 0
        stop()
        executor.submit(Request("noop", ["d"])).result(5)
        assert len(starts) == 3  # no calls once stopped
    finally:
        executor.close()


def test_a_free_first_segment_takes_the_next_bulk_batch_at_once() -> None:
    """With the first segment free and a batch further down the pipeline, the queued bulk task is due
    `now`: found due a moment after `now` at every look, the scheduler polled every 0.5 ms (a core's
    worth of CPU) and formed no batch until the pipeline had emptied."""
    spec = build_spec("slow", {"kind": "noop", "delay_ms": 50})
    executor = NoopExecutor(spec)
    try:
        lane = ModelLane(spec, executor, WorkerSettings())
        lane.inflight["batch"] = 1  # running in a later segment: the first one is free
        task = Task(id="t", model="slow", op="noop", input="x", submitted_ms=1, task_class="batch")
        now = time.monotonic() - 1.0  # the scheduler's reading, taken a moment before
        lane.batcher.add(Pending("1-0", "stream", task, 2, now))
        free = lane.free_classes()
        due = lane.bulk_due(free, now)
        assert due == now
        batch = lane.batcher.next_batch(now, free, bulk_due=due)
        assert batch is not None and [p.task.id for p in batch.items] == ["t"]
    finally:
        executor.close()
