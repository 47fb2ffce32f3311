"""Real-time work cuts in between segments while a large batch job runs."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest

from ectrans.client import AsyncClient
from ectrans.common.registry import ModelSpec
from ectrans.models.api import Executor
from tests.stack import running_stack
from tests.test_stack_embed import sentences


@pytest.fixture(scope="module")
def segmented_minilm(registry: dict[str, ModelSpec]) -> Iterator[Executor]:
    from ectrans.models.loader import load_executor

    executor = load_executor(registry["minilm"], device="cpu", threads=2, segments=3)
    yield executor
    executor.close()


def test_realtime_task_finishes_before_the_batch_job(
    redis_url: str, prefix: str, registry: dict[str, ModelSpec], segmented_minilm: Executor
) -> None:
    bulk = [" ".join(sentences(3, seed=i)) for i in range(384)]  # long inputs: several seconds of work
    probe = "Is the edge server still answering quickly?"

    async def scenario() -> tuple[int, np.ndarray, np.ndarray]:
        async with (
            running_stack(redis_url, prefix, registry, {"minilm": segmented_minilm}),
            AsyncClient(redis_url, prefix=prefix) as client,
        ):
            idle = await client.embed([probe], priority="realtime", timeout=30)
            job = await client.submit_tasks("minilm", "embed", bulk, priority="batch")
            # The job is on the device once its first result is back.
            await asyncio.wait([h.future for h in job], timeout=120, return_when=asyncio.FIRST_COMPLETED)
            loaded = await client.embed([probe], priority="realtime", timeout=60)
            unanswered = sum(not h.done() for h in job)  # replies arrive in the order tasks finish
            await client.cancel([h.id for h in job if not h.done()])  # the rest is not this test's
            results, waiting = await client.wait(job, timeout=120)
            assert not waiting and all(r.ok or r.reason == "cancelled" for r in results)
            return unanswered, idle, loaded

    unanswered, idle, loaded = asyncio.run(scenario())
    print(f"real-time answered with {unanswered} of {len(bulk)} batch tasks still unanswered")
    # It waited for the segment on the device, not for the job: most of the job came after it.
    assert unanswered > len(bulk) // 2, unanswered
    assert np.abs(idle - loaded).max() <= 1e-5
