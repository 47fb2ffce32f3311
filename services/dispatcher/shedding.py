"""Queue limits in seconds of work: an overloaded model answers `overloaded` at once, not late.

A limit in entries means different waits for different models and devices (10,000 MiniLM tasks are
minutes of a CPU's work and seconds of a GPU's). The dispatcher instead bounds each model queue by
the work it holds: queued tasks × the device time of one task, from the batch cost the model's
workers publish (`ectrans:cost:{model}`) and the mean size of the tasks lately sent to that queue,
divided among the model's live workers. That bound becomes an entry count per queue, which the
commit script checks at the moment it appends (so concurrent dispatchers cannot overshoot it).

Until a model's cost is known (a fresh worker has served fewer than a handful of batches), and
while no live worker is seen (right after a Redis restart, before the heartbeats are back), only
the entry limit applies: a node accepts work rather than guess. A model has one published cost
(the last worker's fit), so the bound assumes its workers are alike; where they are not (a GPU
and a CPU serving one model), it is the last publisher's.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from ectrans.common.cost import CostModel
from ectrans.common.keys import Keys
from ectrans.common.lifecycle import wait_or_timeout
from ectrans.common.outage import Outage
from ectrans.common.redis_conn import RedisClient

logger = logging.getLogger(__name__)

TOKENS_SMOOTHING = 0.05  # weight of each new task in a queue's mean task size


@dataclass(frozen=True)
class QueueLimit:
    """What a queue may hold right now, and why (for the `overloaded` message)."""

    entries: int
    seconds: float | None  # the work limit it came from; None when only the entry limit applies
    task_ms: float | None  # the device time one queued task is counted for

    def message(self, queue: str) -> str:
        if self.seconds is None or self.task_ms is None:
            return f"queue {queue} is full ({self.entries} tasks); retry later"
        return (
            f"queue {queue} holds about {self.seconds:g} s of work ({self.entries} tasks at "
            f"{self.task_ms:.1f} ms each), its limit; retry later"
        )


class WorkLimits:
    """Each model queue's limit in entries, from its limit in seconds of work and the live cost."""

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        models: list[str],
        *,
        max_entries: int,
        max_seconds: dict[str, float],  # per task class; 0: no work limit for that class
        workers: Callable[[str], int],  # live workers serving a model
        refresh_s: float = 1.0,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.models = models
        self.max_entries = max_entries
        self.max_seconds = max_seconds
        self.workers = workers
        self.refresh_s = refresh_s
        self.costs: dict[str, CostModel] = {}
        self.task_tokens: dict[str, float] = {}  # per queue: the mean size of tasks sent there

    def observe(self, queue: str, tokens: int) -> None:
        mean = self.task_tokens.get(queue)
        self.task_tokens[queue] = float(tokens) if mean is None else mean + TOKENS_SMOOTHING * (tokens - mean)

    def limit(self, model: str, task_class: str, queue: str) -> QueueLimit:
        seconds = self.max_seconds.get(task_class, 0.0)
        cost = self.costs.get(model)
        tokens = self.task_tokens.get(queue)
        workers = self.workers(model)
        if seconds <= 0 or cost is None or tokens is None or workers <= 0:
            return QueueLimit(self.max_entries, None, None)
        task_ms = cost.task_ms(tokens)
        if task_ms <= 0:
            return QueueLimit(self.max_entries, None, None)
        entries = math.floor(seconds * 1000.0 * workers / task_ms)
        if entries >= self.max_entries:  # the entry limit binds first: the message names it
            return QueueLimit(self.max_entries, None, None)
        return QueueLimit(max(1, entries), seconds, task_ms)

    async def refresh(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for model in self.models:
            pipe.hgetall(self.keys.cost(model))
        replies = await pipe.execute()
        for model, raw in zip(self.models, replies, strict=True):
            cost = CostModel.from_fields({k.decode(): v.decode() for k, v in raw.items()})
            if cost is None:
                self.costs.pop(model, None)
            else:
                self.costs[model] = cost

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the costs fresh (one round trip a second; the commit path reads no cost). An outage
        keeps the last costs; the dispatcher's own loop reports it."""
        if not any(seconds > 0 for seconds in self.max_seconds.values()):
            return
        outage = Outage("shedding", error_pause_s=self.refresh_s, report=False)
        while not stop.is_set():
            await outage.attempt(self.refresh)
            await wait_or_timeout(stop, self.refresh_s)
