"""Running the dispatcher and worker (and monitor) in-process against a real Redis, for tests."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from ectrans.common.keys import Keys
from ectrans.common.redis_conn import RedisClient, connect
from ectrans.common.registry import ModelSpec
from ectrans.models.api import Executor
from ectrans.services.dispatcher.service import Dispatcher
from ectrans.services.dispatcher.settings import DispatcherSettings
from ectrans.services.monitor.service import Monitor
from ectrans.services.monitor.settings import MonitorSettings
from ectrans.services.worker.service import Worker
from ectrans.services.worker.settings import WorkerSettings


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float = 20.0, what: str = "condition") -> None:
    """Wait for a state instead of a fixed time: poll `check` until it holds."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s}s")
        await asyncio.sleep(0.02)


@dataclass
class Stack:
    redis: RedisClient
    keys: Keys
    dispatcher: Dispatcher
    worker: Worker
    monitor: Monitor | None

    async def xadd(self, **fields: Any) -> str:
        entry: dict[Any, Any] = fields
        entry_id = await self.redis.xadd(self.keys.tasks, entry)
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def result(self, task_id: str, timeout: float = 30.0) -> dict[str, str]:
        return (await self.results([task_id], timeout))[task_id]

    async def results(self, task_ids: list[str], timeout: float = 60.0) -> dict[str, dict[str, str]]:
        """Poll the result hashes (a test helper; clients use their reply stream instead)."""
        found: dict[str, dict[str, str]] = {}
        deadline = time.monotonic() + timeout
        while len(found) < len(task_ids):
            missing = [t for t in task_ids if t not in found]
            pipe = self.redis.pipeline(transaction=False)
            for task_id in missing:
                pipe.hgetall(self.keys.result(task_id))
            # A key of another type (planted by a hostile client: tests/test_stack_hostile.py) is not
            # a record, as for the services: its task is not finished yet.
            for task_id, raw in zip(missing, await pipe.execute(raise_on_error=False), strict=True):
                if raw and not isinstance(raw, Exception):
                    found[task_id] = {k.decode(): v.decode("utf-8", "replace") for k, v in raw.items()}
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(task_ids) - len(found)} of {len(task_ids)} results missing")
            if len(found) < len(task_ids):
                await asyncio.sleep(0.02)
        return found


@contextmanager
def stack_in_thread(
    url: str, prefix: str, registry: dict[str, ModelSpec], executors: dict[str, Executor], **overrides: Any
) -> Iterator[None]:
    """`running_stack` on an event loop of its own thread, for tests of blocking (sync) clients."""
    ready, stop = threading.Event(), threading.Event()

    def serve() -> None:
        async def main() -> None:
            async with running_stack(url, prefix, registry, executors, **overrides):
                ready.set()
                await asyncio.to_thread(stop.wait)

        asyncio.run(main())

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        assert ready.wait(60)
        yield
    finally:
        stop.set()
        thread.join(60)


@asynccontextmanager
async def running_stack(
    url: str,
    prefix: str,
    registry: dict[str, ModelSpec],
    executors: dict[str, Executor],
    *,
    dispatcher: dict[str, Any] | None = None,
    worker: dict[str, Any] | None = None,
    monitor: dict[str, Any] | None = None,
) -> AsyncIterator[Stack]:
    common: dict[str, Any] = {"redis_url": url, "prefix": prefix, "heartbeat_s": 0.5}
    d = Dispatcher(DispatcherSettings(**{**common, **(dispatcher or {})}), registry)
    w_settings = WorkerSettings(**{**common, "serve_models": ",".join(executors), **(worker or {})})
    w = Worker(w_settings, registry, executors=executors)
    m = Monitor(MonitorSettings(**{**common, **monitor}), sorted(registry)) if monitor is not None else None
    services: list[Dispatcher | Worker | Monitor] = [d, w]
    if m is not None:
        services.append(m)
    tasks = [asyncio.create_task(s.run()) for s in services]
    redis = connect(url)
    try:
        while len(w.lanes) < len(executors):  # the worker has joined its groups
            await asyncio.sleep(0.01)
            for t in tasks:
                if t.done():
                    t.result()
        yield Stack(redis, Keys(prefix), d, w, m)
    finally:
        for s in services:
            s.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        await redis.aclose()


def reference_embeddings(model_dir: str, texts: list[str], max_tokens: int = 256) -> np.ndarray:
    """A direct transformers forward with mean pooling and L2 normalisation."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()
