"""What a worker owes its peers: the entries it holds are kept from looking abandoned while they wait
or run (touch), and on a stop the tasks it has not started go back to the group at once."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from ectrans.common.keys import WORKER_GROUP
from ectrans.common.lifecycle import wait_or_timeout
from ectrans.common.outage import Outage
from ectrans.common.redis_conn import RedisClient
from ectrans.services.worker.lanes import ModelLane, WorkerState
from ectrans.services.worker.settings import WorkerSettings

logger = logging.getLogger(__name__)

TOUCH_LIMIT = 10  # claim idle times after which a held task is left to peers (see `touch_loop`)


@dataclass
class Peers:
    redis: RedisClient
    settings: WorkerSettings
    consumer: str
    state: WorkerState

    async def touch_loop(self, outage: Outage) -> None:
        """Peers take over entries idle for `claim_idle_ms`, so every half of that a live worker resets
        the idle time of what it holds, queued or running (XCLAIM JUSTID to itself: no delivery is
        counted) — also while it drains on a stop. Without this, a backlog that takes longer than the
        idle time is claimed by peers while it waits here, runs twice, and its delivery counts climb
        to the dead-letter limit. A task held for `TOUCH_LIMIT` idle times is no longer touched, so a
        stuck executor cannot keep it from peers forever."""
        period = self.settings.claim_idle_ms / 2000
        while await self._touch_due(period):
            await outage.attempt(self.touch)

    async def _touch_due(self, period: float) -> bool:
        """Wait until the next touch (False: stopped, and nothing left in flight)."""
        if not self.state.stopping.is_set():
            await wait_or_timeout(self.state.stopping, period)
        elif self.state.inflight:
            await asyncio.wait(set(self.state.inflight), timeout=period)
        else:
            return False
        return True

    async def touch(self) -> None:
        oldest = time.monotonic() - TOUCH_LIMIT * self.settings.claim_idle_ms / 1000
        by_stream: dict[str, list[Any]] = {}
        for (stream, entry_id), admitted in list(self.state.held.items()):
            if admitted >= oldest:
                by_stream.setdefault(stream, []).append(entry_id)
        for stream, ids in by_stream.items():
            await self.redis.xclaim(stream, WORKER_GROUP, self.consumer, 0, ids, justid=True)

    async def hand_back(self, lane: ModelLane) -> None:
        """On stop, tasks not yet started go back to the group at once, claimable by live peers."""
        items = lane.batcher.take_all()
        self.state.room.set()
        self.state.release(items)
        by_stream: dict[str, list[str]] = {}
        for p in items:
            by_stream.setdefault(p.stream, []).append(p.entry_id)
        for stream, ids in by_stream.items():
            await self.give_back(stream, ids)
        if items:
            logger.info("[shutdown] handed back %d queued tasks of %s", len(items), lane.spec.name)

    async def give_back(self, stream: str, ids: list[str]) -> None:
        """Mark entries long idle (XCLAIM JUSTID: no extra delivery counted) so that peers claim them now."""
        if not ids:
            return
        try:
            claim_ids: list[Any] = list(ids)
            idle = self.settings.claim_idle_ms * 10
            await self.redis.xclaim(stream, WORKER_GROUP, self.consumer, 0, claim_ids, idle=idle, justid=True)
        except Exception as exc:  # a cluster mid-failover raises more than RedisError; a stop must go on
            logger.warning("[shutdown] could not hand back %d tasks (%s); peers take them after idle", len(ids), exc)
