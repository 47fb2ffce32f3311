"""Scheduling: one loop per lane forms batches (batcher.py) as its in-flight slots free up and hands
them to the model's executor, which runs them on its own threads; the event loop never waits on
torch. Tasks their clients cancelled or whose deadline passed are answered instead of run."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass

from redis.exceptions import RedisError

from ectrans.common.keys import Keys
from ectrans.common.lifecycle import wait_or_timeout
from ectrans.common.outage import Outage
from ectrans.common.redis_conn import RedisClient
from ectrans.common.results import now_ms
from ectrans.common.schemas import Reason
from ectrans.models.api import Request
from ectrans.services.worker.batcher import Batch, Pending
from ectrans.services.worker.cancel import CANCELLED_MESSAGE, split_cancelled
from ectrans.services.worker.completion import Completer
from ectrans.services.worker.lanes import ModelLane, WorkerState
from ectrans.services.worker.peers import Peers

logger = logging.getLogger(__name__)


@dataclass
class Scheduler:
    redis: RedisClient
    keys: Keys
    state: WorkerState
    completer: Completer
    peers: Peers

    @property
    def counts(self) -> Counter[str]:
        return self.state.counts

    async def schedule_loop(self, lane: ModelLane, tg: asyncio.TaskGroup, outage: Outage) -> None:
        unfollow = lane.follow_progress()
        try:
            while not self.state.stopping.is_set():
                await outage.attempt(lambda: self._schedule_next(lane, tg))
        finally:
            unfollow()
        await self.peers.hand_back(lane)

    async def _schedule_next(self, lane: ModelLane, tg: asyncio.TaskGroup) -> None:
        await self.expire(lane)
        batch = await self._next_batch(lane)  # waits for a ready batch of a class with a free slot
        if batch is None:
            return
        self.take_slot(lane, batch)
        task = tg.create_task(self.run_batch(lane, batch))
        self.state.inflight.add(task)
        task.add_done_callback(self.state.inflight.discard)

    async def _next_batch(self, lane: ModelLane) -> Batch | None:
        while not self.state.stopping.is_set():
            now = time.monotonic()
            batch, hint = self.ready_batch(lane, now)
            if batch is not None:
                return batch
            lane.wakeup.clear()
            # A finished batch, a new task or (paced) the first segment starting a batch sets `wakeup`.
            await wait_or_timeout(lane.wakeup, 0.25 if hint is None else max(hint, 0.0005))
            await self.expire(lane)
        return None

    def ready_batch(self, lane: ModelLane, now: float) -> tuple[Batch | None, float | None]:
        """The batch to run now, if one is ready for a class with a free slot; else how long until one
        may be (None: not known)."""
        free = lane.free_classes()
        idle = not any(lane.inflight.values())  # nothing running: waiting for batch-mates only idles the device
        due = lane.bulk_due(free, now)
        batch = lane.batcher.next_batch(now, free, idle=idle, bulk_due=due)
        if batch is not None:
            self.state.room.set()
            return batch, None
        return None, lane.batcher.wait_hint(now, free, idle=idle, bulk_due=due)

    @staticmethod
    def take_slot(lane: ModelLane, batch: Batch) -> None:
        """Count `batch` in flight (until `run_batch` ends)."""
        lane.inflight[lane.slot_class(batch)] += 1

    async def expire(self, lane: ModelLane) -> None:
        expired = lane.batcher.take_expired(now_ms())
        if expired:
            self.state.room.set()
            self.counts["deadline"] += len(expired)
            try:
                await self.completer.finish_errors(
                    expired, Reason.DEADLINE, "deadline passed while the task was queued"
                )
            finally:  # not written: left pending for a claim, not held as ours
                self.state.release(expired)

    async def run_batch(self, lane: ModelLane, batch: Batch) -> None:
        try:
            started = now_ms()
            bulk = lane.slot_class(batch) == "batch"
            lane.bulk_forming += bulk
            try:
                wanted = await self._without_cancelled(batch, started)
            finally:
                lane.bulk_forming -= bulk
            # Tasks with different op params (e.g. num_beams) cannot share one request.
            for group in self._split_by_params(wanted):
                await self._run_group(lane, Batch(batch.task_class, group), started)
        except RedisError as exc:  # not written: the tasks stay pending, and are taken over after the idle time
            logger.warning("[batch] results of %d %s tasks not written: %s", len(batch.items), lane.spec.name, exc)
        finally:
            self.state.release(batch.items)
            lane.inflight[lane.slot_class(batch)] -= 1
            lane.wakeup.set()

    async def _without_cancelled(self, batch: Batch, now: int) -> Batch:
        """The batch less the tasks their clients cancelled, which are answered `cancelled` (cancel.py)."""
        run, cancelled = await split_cancelled(self.redis, self.keys, batch.items, now)
        if cancelled:
            self.counts["cancelled"] += len(cancelled)
            await self.completer.finish_errors(cancelled, Reason.CANCELLED, CANCELLED_MESSAGE)
        return Batch(batch.task_class, run)

    async def _run_group(self, lane: ModelLane, batch: Batch, started: int) -> None:
        first = batch.items[0].task
        inputs = [p.task.payload if first.is_split else p.task.input for p in batch.items]
        request = Request(first.op, inputs, first.params, batch.task_class == "realtime", first.segment)
        try:
            future = lane.executor.submit(request)
            # An answer at hand (a batch refused up front, the no-op model) skips wrap_future's loop
            # round trip through the thread-safe wake-up.
            results, stats = future.result() if future.done() else await asyncio.wrap_future(future)
        except Exception as exc:  # the whole batch failed on the device
            if len(batch.items) > 1:
                # One bad input must not cost its batch-mates their results: the halves run on their
                # own, down to the guilty task (log N bisections for one such task, no more).
                logger.debug("[batch] %s batch of %d failed (%s); bisecting", lane.spec.name, len(batch.items), exc)
                half = len(batch.items) // 2
                for part in (batch.items[:half], batch.items[half:]):
                    await self._run_group(lane, Batch(batch.task_class, part), started)
                return
            logger.warning("[batch] %s task %s failed on its own: %r", lane.spec.name, first.id, exc)
            await self.completer.finish_errors(batch.items, Reason.INTERNAL, f"model failed: {exc}")
            return
        await self.completer.finish_batch(lane, batch, results, stats, started)

    @staticmethod
    def _split_by_params(batch: Batch) -> list[list[Pending]]:
        groups: dict[tuple[str, int, tuple[tuple[str, int], ...]], list[Pending]] = {}
        for p in batch.items:  # split tasks resume together only from the same point
            groups.setdefault((p.task.op, p.task.segment, tuple(sorted(p.task.params.items()))), []).append(p)
        return list(groups.values())
