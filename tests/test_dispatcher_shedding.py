"""Queue limits in seconds of work (services/dispatcher/shedding.py): the excess is refused at once."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ectrans.client import AsyncClient
from ectrans.common.cost import CostModel
from ectrans.common.keys import Keys
from ectrans.common.registry import build_spec
from ectrans.models.loader import load_executor
from ectrans.services.dispatcher.shedding import QueueLimit, WorkLimits
from tests.stack import running_stack, until

SLOW = build_spec("slow", {"kind": "noop", "delay_ms": 40})  # every batch takes 40 ms, as on a device


def _limits(workers: int = 1, **seconds: float) -> WorkLimits:
    return WorkLimits(
        None,  # type: ignore[arg-type]  # no I/O in these checks
        Keys("t:"),
        ["m"],
        max_entries=10_000,
        max_seconds={"realtime": 0.0, "batch": 0.0, **seconds},
        workers=lambda model: workers,
    )


def test_the_entry_limit_holds_until_a_cost_is_known() -> None:
    limits = _limits(batch=2.0)
    limits.observe("q", 20)
    assert limits.limit("m", "batch", "q").entries == 10_000  # no cost published yet
    limits.costs["m"] = CostModel(overhead_ms=10.0, ms_per_token=0.5, max_batch_tokens=640)
    assert limits.limit("m", "realtime", "q").entries == 10_000  # no work limit for that class


def test_seconds_of_work_become_entries_from_the_cost_and_the_task_size() -> None:
    limits = _limits(batch=2.0)
    limits.costs["m"] = CostModel(overhead_ms=10.0, ms_per_token=0.5, max_batch_tokens=640)
    limits.observe("q", 20)
    limit = limits.limit("m", "batch", "q")
    # One task: 20 tokens × 0.5 ms + its share (1/32) of the 10 ms batch overhead = 10.3125 ms.
    assert limit.task_ms == 10.3125
    assert limit.entries == int(2000 / 10.3125)
    assert "2 s of work" in limit.message("q")
    assert _limits(workers=3, batch=2.0).limit("m", "batch", "q").entries == 10_000  # no size seen yet
    two = _limits(workers=2, batch=2.0)
    two.costs, two.task_tokens = limits.costs, limits.task_tokens
    assert two.limit("m", "batch", "q").entries == int(4000 / 10.3125)  # two workers drain it twice as fast


def test_segments_and_executor_processes_of_a_worker_share_the_work() -> None:
    one = CostModel(overhead_ms=10.0, ms_per_token=0.5, max_batch_tokens=640)
    assert CostModel(10.0, 0.5, segments=2, max_batch_tokens=640).task_ms(20) == one.task_ms(20) / 2
    assert CostModel(10.0, 0.5, segments=2, max_batch_tokens=640, processes=3).task_ms(20) == one.task_ms(20) / 6
    assert CostModel.from_fields(CostModel(10.0, 0.5, 2, 9, 640, 3).to_fields()) == CostModel(10.0, 0.5, 2, 9, 640, 3)


def test_the_message_names_the_limit_that_binds() -> None:
    limits = _limits(batch=2.0)
    limits.costs["m"] = CostModel(overhead_ms=10.0, ms_per_token=0.5, max_batch_tokens=640)
    limits.observe("q", 20)
    assert "s of work" in limits.limit("m", "batch", "q").message("q")
    limits.max_entries = 100  # under the 193 tasks that 2 s of work would allow
    assert limits.limit("m", "batch", "q") == QueueLimit(100, None, None)
    assert limits.limit("m", "batch", "q").message("q") == "queue q is full (100 tasks); retry later"


def test_no_live_worker_seen_means_the_entry_limit_only() -> None:
    """Right after a Redis restart no heartbeat is back yet: that is no capacity to divide by."""
    limits = _limits(workers=0, batch=2.0)
    limits.costs["m"] = CostModel(overhead_ms=10.0, ms_per_token=0.5, max_batch_tokens=640)
    limits.observe("q", 20)
    assert limits.limit("m", "batch", "q").entries == 10_000


def test_a_queue_of_larger_tasks_holds_fewer() -> None:
    limits = _limits(batch=2.0)
    limits.costs["m"] = CostModel(overhead_ms=10.0, ms_per_token=0.5, max_batch_tokens=640)
    limits.observe("small", 10)
    limits.observe("large", 100)
    assert limits.limit("m", "batch", "large").entries < limits.limit("m", "batch", "small").entries / 5


def test_a_burst_beyond_the_work_limit_is_refused_at_once_and_the_rest_served(redis_url: str, prefix: str) -> None:
    """A paced device (40 ms a batch): once the worker has published its cost, a burst of far more
    than 0.5 s of work gets `overloaded` for the excess, answered before the accepted tasks finish."""

    async def scenario() -> tuple[list[Any], list[float], list[float]]:
        overrides: dict[str, Any] = {
            "dispatcher": {"batch_max_queue_s": 0.5},
            "worker": {"batch_max_batch": 8, "prefetch": 8},
        }
        running = running_stack(redis_url, prefix, {"slow": SLOW}, {"slow": load_executor(SLOW)}, **overrides)
        async with running as stack, AsyncClient(redis_url, prefix=prefix) as client:
            while not await stack.redis.exists(Keys(prefix).cost("slow")):  # the worker's first fit
                await client.submit_many("slow", "noop", ["w"] * 8, priority="batch", timeout=30)

            async def cost_seen() -> bool:
                return "slow" in stack.dispatcher.work_limits.costs

            await until(cost_seen, what="the dispatcher's cost refresh")
            started = time.perf_counter()
            done: list[tuple[Any, float]] = []

            async def one(text: str) -> None:
                result = await client.submit("slow", "noop", text, priority="batch", timeout=60)
                done.append((result, time.perf_counter() - started))

            async with asyncio.TaskGroup() as tg:
                for i in range(400):
                    tg.create_task(one(f"t{i}"))
        results = [r for r, _ in done]
        refused_at = [at for r, at in done if r.reason == "overloaded"]
        served_at = [at for r, at in done if r.ok]
        return results, refused_at, served_at

    results, refused_at, served_at = asyncio.run(scenario())
    assert len(results) == 400
    assert {r.reason for r in results if not r.ok} == {"overloaded"}
    refused = [r for r in results if r.reason == "overloaded"]
    assert refused and served_at, (len(refused), len(served_at))
    assert "s of work" in str(refused[0].error)
    assert max(refused_at) < sorted(served_at)[len(served_at) // 2]  # refused before most accepted ones end
