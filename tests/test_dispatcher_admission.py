"""Admission: the cost model, deadline rejections, downgrades and overload errors at the client."""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager

import pytest

from ectrans.client import AsyncClient
from ectrans.common.cost import CostModel, OnlineCost, predict_realtime_ms
from ectrans.common.keys import Keys
from ectrans.common.registry import build_spec
from ectrans.models.loader import load_executor
from ectrans.services.dispatcher.service import Dispatcher
from ectrans.services.dispatcher.settings import DispatcherSettings
from tests.stack import Stack, running_stack

NOOP = build_spec("noop", {"kind": "noop"})


def test_online_cost_recovers_a_linear_cost() -> None:
    cost = OnlineCost(segments=2)
    for tokens in range(100, 2000, 100):
        cost.observe(tokens, 5.0 + 0.01 * tokens)
    model = cost.model()
    assert model is not None
    assert model.overhead_ms == pytest.approx(5.0, abs=1e-6)
    assert model.ms_per_token == pytest.approx(0.01, abs=1e-9)
    assert model.max_batch_tokens == 1900 and model.segments == 2


def test_online_cost_needs_enough_samples() -> None:
    cost = OnlineCost()
    cost.observe(100, 10.0)
    assert cost.model() is None


def test_prediction_adds_running_segment_queue_and_own_batch() -> None:
    cost = CostModel(overhead_ms=2.0, ms_per_token=0.5, segments=4, max_batch_tokens=400)
    # half the running segment (2 + 200) / 4 / 2 = 25.25; queue ahead 3 × 10 tokens × 0.5 = 15; own batch 2 + 5 = 7
    assert predict_realtime_ms(cost, task_tokens=10, queued_realtime=3) == pytest.approx(47.25)
    # With no bulk work queued or in flight, nothing runs ahead of the cut-in.
    assert predict_realtime_ms(cost, task_tokens=10, queued_realtime=3, bulk_busy=False) == pytest.approx(22.0)


def test_a_realtime_lane_waits_for_no_segment_but_shares_a_core() -> None:
    """On a CPU real-time batches run beside bulk work: no half segment ahead, however long bulk
    segments are, but about half a core while bulk work runs."""
    cost = CostModel(overhead_ms=2.0, ms_per_token=0.5, segments=2, max_batch_tokens=8192, realtime_lane=True)
    assert predict_realtime_ms(cost, task_tokens=10, queued_realtime=3) == pytest.approx(2 * 22.0)
    assert predict_realtime_ms(cost, task_tokens=10, queued_realtime=3, bulk_busy=False) == pytest.approx(22.0)
    assert CostModel.from_fields(cost.to_fields()) == cost  # published by workers, read by the dispatcher
    assert CostModel.from_fields({"overhead_ms": "1", "ms_per_token": "1"}) == CostModel(1.0, 1.0)  # older workers
    online = OnlineCost(segments=2, realtime_lane=True)
    for tokens in range(10, 100, 10):
        online.observe(tokens, 1.0 + tokens)
    model = online.model()
    assert model is not None and model.realtime_lane


def noop_stack(url: str, prefix: str) -> AbstractAsyncContextManager[Stack]:
    return running_stack(url, prefix, {"noop": NOOP}, {"noop": load_executor(NOOP)})


def test_deadline_rejection_and_downgrade_reach_the_client(redis_url: str, prefix: str) -> None:
    async def scenario() -> tuple[list[str | None], list[str], list[str]]:
        async with noop_stack(redis_url, prefix) as stack:
            # A fixed, slow cost model: no real-time task can make a 100 ms deadline.
            slow = CostModel(overhead_ms=1000.0, ms_per_token=1.0, segments=1, samples=50, max_batch_tokens=100)
            await stack.redis.hset(Keys(prefix).cost("noop"), mapping=dict(slow.to_fields()))  # type: ignore[arg-type]
            async with AsyncClient(redis_url, prefix=prefix) as client:
                rejected = await client.submit_many("noop", "noop", ["a", "b"], deadline_ms=100, timeout=10)
                downgraded = await client.submit_many(
                    "noop", "noop", ["c"], deadline_ms=100, on_miss="batch", timeout=10
                )
                relaxed = await client.submit_many("noop", "noop", ["d"], deadline_ms=10_000, timeout=10)
        return (
            [r.reason for r in rejected],
            [downgraded[0].status, downgraded[0].task_class, downgraded[0].fields.get("downgraded", "")],
            [relaxed[0].status, relaxed[0].task_class],
        )

    rejected, downgraded, relaxed = asyncio.run(scenario())
    assert rejected == ["deadline", "deadline"]
    assert downgraded == ["ok", "batch", "1"]
    assert relaxed == ["ok", "realtime"]  # real-time (short input), but its deadline is beyond the prediction


def test_full_queue_answers_overloaded_at_once(redis_url: str, prefix: str) -> None:
    async def scenario() -> list[str]:
        settings = DispatcherSettings(redis_url=redis_url, prefix=prefix, max_queue_len=2, heartbeat_s=0.5)
        dispatcher = Dispatcher(settings, {"noop": NOOP})
        served = asyncio.create_task(dispatcher.run())  # no worker: the queue only fills
        try:
            async with AsyncClient(redis_url, prefix=prefix) as client:
                submitted = [client.submit("noop", "noop", f"t{i}", priority="batch", timeout=10) for i in range(5)]
                done, _ = await asyncio.wait([asyncio.ensure_future(s) for s in submitted], timeout=5)
                return sorted(str(t.result().reason) for t in done)
        finally:
            dispatcher.stop()
            await served

    reasons = asyncio.run(scenario())
    assert reasons == ["overloaded"] * 3  # two fit in the queue and wait for a worker; three are refused
