"""Cancelled tasks: a client that gave up marks its tasks (`AsyncClient.cancel`, a key per task with
a TTL); the worker looks the marks up for a batch's tasks just before it runs them, in one round
trip, and answers the marked ones with a `cancelled` error record instead of computing them. A task
already running is not interrupted: a batch is the unit of work on the device."""

from __future__ import annotations

import logging
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from ectrans.common.keys import Keys
from ectrans.common.redis_conn import RedisClient
from ectrans.services.worker.batcher import Pending

logger = logging.getLogger(__name__)

CANCELLED_MESSAGE = "cancelled by its client before a worker started it"


# Tasks submitted less than this long ago are run without a look at their marks: a client rarely
# gives up within it, and the look-up would add a round trip to every batch of an idle worker
# (the path a lone client's latency is made of). Running such a task costs at most its batch.
CHECK_AFTER_MS = 25


async def split_cancelled(
    redis: RedisClient, keys: Keys, items: list[Pending], now_ms: int
) -> tuple[list[Pending], list[Pending]]:
    """(tasks to run, tasks their clients cancelled). If Redis cannot answer, all of them run: a
    cancellation is a saving, never a condition for a result."""
    if all(now_ms - p.task.submitted_ms < CHECK_AFTER_MS for p in items):
        return items, []
    names = [keys.cancelled(p.task.id) for p in items]
    try:
        marks: list[Any]
        if isinstance(redis, RedisCluster):  # the marks live in many slots: one MGET per slot
            marks = await redis.mget_nonatomic(names)
        else:
            marks = await redis.mget(names)
    except RedisError as exc:
        logger.debug("cancel marks not read (%s); running all %d tasks", exc, len(items))
        return items, []
    run = [p for p, mark in zip(items, marks, strict=True) if mark is None]
    cancelled = [p for p, mark in zip(items, marks, strict=True) if mark is not None]
    return run, cancelled
