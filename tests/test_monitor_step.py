"""The monitor's logic stepped by hand (`Monitor.step`: read what the streams hold → the node's state →
the line and the figures, without the interval loop), over a worker stepped by hand too."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from ectrans.common.keys import Keys
from ectrans.common.redis_conn import RedisClient, connect
from ectrans.common.registry import build_spec
from ectrans.common.results import now_ms
from ectrans.common.schemas import Task
from ectrans.models.noop import NoopExecutor
from ectrans.services.monitor.service import Monitor
from ectrans.services.monitor.settings import MonitorSettings
from ectrans.services.worker.service import Worker
from ectrans.services.worker.settings import WorkerSettings

NOOP = build_spec("noop", {"kind": "noop"})


async def enqueue(redis: RedisClient, keys: Keys, task_class: str) -> None:
    """A task in the no-op model's queue, as the dispatcher forwards it."""
    task = Task(id=f"t-{uuid.uuid4().hex[:12]}", model="noop", op="noop", input="a few words", submitted_ms=now_ms())
    entry: dict[Any, Any] = task.classified(task_class).to_fields()
    await redis.xadd(keys.queue("noop", task_class), entry)


def test_each_step_counts_what_arrived_since_the_last_once(redis_url: str, prefix: str) -> None:
    async def scenario() -> list[tuple[int, dict[str, int]]]:
        keys = Keys(prefix)
        common: dict[str, Any] = {"redis_url": redis_url, "prefix": prefix}
        worker = Worker(
            WorkerSettings(**common, serve_models="noop"), {"noop": NOOP}, executors={"noop": NoopExecutor(NOOP)}
        )
        monitor = Monitor(MonitorSettings(**common, metrics_port=0), ["noop"])
        redis = connect(redis_url)
        seen: list[tuple[int, dict[str, int]]] = []

        async def step() -> None:
            snap = await monitor.step()
            seen.append((snap.totals.tasks, {c: w.tasks for c, w in snap.window.by_class().items()}))

        try:
            await worker.start()
            await step()  # places the cursors: nothing counted yet
            for task_class in ("realtime", "realtime", "realtime", "batch", "batch"):
                await enqueue(redis, keys, task_class)
            while await worker.step():  # until the worker has nothing left to run
                pass
            await step()
            await step()  # nothing new: the totals stay, the window is empty
        finally:
            await worker.redis.aclose()
            await monitor.redis.aclose()
            monitor.exporter.close()
            await redis.aclose()
        return seen

    seen = asyncio.run(scenario())
    assert seen == [(0, {}), (5, {"realtime": 3, "batch": 2}), (5, {})]


def test_two_monitors_on_one_prefix_leave_the_stats_hash_to_one(redis_url: str, prefix: str) -> None:
    """A monitor per host (or two `ectrans up` on one Redis): `ectrans:stats` keeps one monitor's
    figures instead of flipping between two sets of totals; the other takes over once they go stale."""

    async def scenario() -> list[str]:
        keys = Keys(prefix)
        common: dict[str, Any] = {"redis_url": redis_url, "prefix": prefix, "metrics_port": 0}
        first = Monitor(MonitorSettings(**common, instance="site-a"), ["noop"])
        second = Monitor(MonitorSettings(**common, instance="site-b"), ["noop"])
        redis = connect(redis_url)
        owners: list[str] = []

        async def owner() -> str:
            owner: Any = await redis.hget(keys.stats, "monitor")
            return owner.decode() if owner else ""

        try:
            for monitor in (first, second, first, second):
                await monitor.step()
                owners.append(await owner())
            await redis.hset(keys.stats, "ts", "1000.0")  # the writer stopped long ago
            await second.step()
            owners.append(await owner())
            await first.step()  # now the other's figures are fresh: it keeps out
            owners.append(await owner())
        finally:
            for monitor in (first, second):
                await monitor.redis.aclose()
                monitor.exporter.close()
            await redis.aclose()
        return owners

    assert asyncio.run(scenario()) == ["site-a"] * 4 + ["site-b"] * 2
