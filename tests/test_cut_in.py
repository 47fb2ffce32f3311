"""Real-time work cuts in between segments while a large batch job runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import numpy as np
import pytest

from ectrans.client import AsyncClient
from ectrans.common.registry import ModelSpec
from ectrans.models.api import Executor
from tests.stack import running_stack
from tests.test_e2e_embed import sentences


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

    async def scenario() -> tuple[float, float, np.ndarray, np.ndarray]:
        async with (
            running_stack(redis_url, prefix, registry, {"minilm": segmented_minilm}),
            AsyncClient(redis_url, prefix=prefix) as client,
        ):
            idle = await client.embed([probe], priority="realtime", timeout=30)
            started = time.monotonic()
            job = asyncio.create_task(client.embed(bulk, priority="batch", timeout=300))
            await asyncio.sleep(0.5)  # the job is on the device now
            loaded = await client.embed([probe], priority="realtime", timeout=60)
            realtime_done = time.monotonic() - started
            await job
            return realtime_done, time.monotonic() - started, idle, loaded

    realtime_done, job_done, idle, loaded = asyncio.run(scenario())
    print(f"real-time answered after {realtime_done:.2f}s; batch job done after {job_done:.2f}s")
    assert realtime_done < job_done / 2, (realtime_done, job_done)
    assert np.abs(idle - loaded).max() <= 1e-5
