"""The worker service: model queues → batches on the device → results, acked atomically.

The worker composes its jobs, one module each: `lanes` (a lane per served model, and the state the
jobs share), `loading` (the executors), `reader` (reading and admitting entries, claiming dead
peers' ones), `scheduler` (forming batches and running them), `completion` (results, metrics and
the fitted cost) and `peers` (keeping held entries from peers, handing them back on a stop).

Loops share the event loop and never wait on torch: a reader pulls entries from Redis (real-time
streams listed first), one scheduler per model forms batches and submits them to the model's
executor (which runs them on its own threads), completions write results through the idempotent
finish script, and a claimer takes over entries of dead peers. Each loop runs its steps through
an `Outage` guard, so only a stop ends it. `step()` runs one cycle without the loops, for tests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

from ectrans.common.heartbeat import Heartbeat, default_instance
from ectrans.common.keys import TASK_CLASSES, WORKER_GROUP, Keys
from ectrans.common.outage import Outage
from ectrans.common.recovery import ensure_group
from ectrans.common.redis_conn import RedisClient, connect
from ectrans.common.registry import ModelSpec
from ectrans.common.results import ResultWriter
from ectrans.models.api import Executor
from ectrans.services.worker.completion import Completer
from ectrans.services.worker.lanes import ModelLane, WorkerState
from ectrans.services.worker.loading import load_executors
from ectrans.services.worker.namesake import NameTaken, live_namesake
from ectrans.services.worker.peers import Peers
from ectrans.services.worker.reader import Reader
from ectrans.services.worker.scheduler import Scheduler
from ectrans.services.worker.settings import WorkerSettings
from ectrans.services.worker.warmup import warm_up

__all__ = ["ModelLane", "Worker", "load_executors"]  # where tests and tools have found them

logger = logging.getLogger(__name__)


class Worker:
    name = "worker"

    def __init__(
        self,
        settings: WorkerSettings,
        registry: dict[str, ModelSpec],
        redis: RedisClient | None = None,
        executors: dict[str, Executor] | None = None,
    ) -> None:
        self.settings = settings
        self.keys: Keys = settings.keys
        self.specs = [registry[name] for name in settings.model_names(list(registry))]
        self.consumer = settings.instance or default_instance()
        self._own_redis = redis is None
        self.redis = redis or connect(settings.redis_url, client_name=f"ectrans-worker-{self.consumer}")
        self.writer = ResultWriter(self.redis, self.keys, WORKER_GROUP, settings.result_ttl_s)
        self._executors = executors
        self.state = WorkerState()
        self.completer = Completer(self.redis, self.keys, self.writer, self.consumer, self.state)
        self.peers = Peers(self.redis, settings, self.consumer, self.state)
        self.reader = Reader(self.redis, self.keys, settings, self.consumer, self.state, self.completer, self.peers)
        self.scheduler = Scheduler(self.redis, self.keys, self.state, self.completer, self.peers)
        self.heartbeat = Heartbeat(
            self.redis,
            self.keys,
            self.name,
            self.consumer,
            interval_s=settings.heartbeat_s,
            extra=self._counters,
        )

    @property
    def lanes(self) -> dict[str, ModelLane]:
        return self.state.lanes

    @property
    def streams(self) -> dict[str, str]:
        """Stream → model."""
        return self.state.streams

    @property
    def counts(self) -> Counter[str]:
        return self.state.counts

    def stop(self) -> None:
        self.state.stopping.set()
        self.state.room.set()
        self.completer.metrics_ready.set()
        for lane in self.lanes.values():
            lane.wakeup.set()

    def _counters(self) -> dict[str, object]:
        return {
            "models": ",".join(spec.name for spec in self.specs),
            "queued": sum(len(lane.batcher) for lane in self.lanes.values()),
            **{f"n_{k}": v for k, v in self.counts.items()},
            **self._weight_fields(),
        }

    def _weight_fields(self) -> dict[str, object]:
        """Shared weights and executor processes' memory, for the monitor (with shared weights only)."""
        if not self.settings.shares_weights():
            return {}
        from ectrans.sharing.memory import heartbeat_fields

        return heartbeat_fields([lane.executor for lane in self.lanes.values()])

    async def start(self) -> None:
        """Load models and join the consumer groups."""
        started = time.monotonic()
        executors = self._executors
        if executors is None:
            executors = await asyncio.to_thread(load_executors, self.specs, self.settings)
        for spec in self.specs:
            self.lanes[spec.name] = ModelLane(spec, executors[spec.name], self.settings)
            if self._executors is None:  # executors handed in are the caller's (and warm already)
                lane = self.lanes[spec.name]
                policies = (lane.batcher.realtime, lane.batcher.batch)
                warm_s = await asyncio.to_thread(warm_up, lane.executor, *policies)
                logger.debug("[start] %s warmed in %.2fs", spec.name, warm_s)
            for task_class in TASK_CLASSES:
                stream = self.keys.queue(spec.name, task_class)
                self.streams[stream] = spec.name
                self.reader.resume(stream)
        await self._join_groups()
        if self.state.stopping.is_set():  # stopped while Redis was away: never ready
            return
        logger.info(
            "[start] worker %s ready in %.1fs serving %s",
            self.consumer,
            time.monotonic() - started,
            ", ".join(self.lanes),
        )

    async def run(self) -> None:
        if (other := await live_namesake(self.redis, self.keys, self.consumer)) is not None:
            if self._own_redis:
                await self.redis.aclose()
            why = f"worker {self.consumer} already runs on this host (pid {other})"
            raise NameTaken(f"{why}: give this one its own ECTRANS_INSTANCE")
        try:
            await self.start()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.heartbeat.run(self.state.stopping))
                for streams in self.reader.read_sets():
                    tg.create_task(self.reader.read_loop(streams, self._outage("reader")))
                tg.create_task(self.reader.claim_loop(self._outage("claimer")))
                tg.create_task(self.peers.touch_loop(self._outage("toucher")))
                tg.create_task(self._grace_watchdog())
                tg.create_task(self.completer.metrics_loop(self._outage("metrics")))
                for lane in self.lanes.values():
                    tg.create_task(self.scheduler.schedule_loop(lane, tg, self._outage("scheduler")))
        finally:
            await self.completer.flush_metrics()  # what the last batches published
            if self._executors is None:  # executors handed in belong to the caller
                for lane in self.lanes.values():
                    lane.executor.close()
            if self._own_redis:
                await self.redis.aclose()
        logger.info("[shutdown] worker %s stopped", self.consumer)

    async def step(self) -> int:
        """One read → admit → batch → complete cycle without the background loops (after `start()`,
        instead of `run()`): read what the queues hold now without blocking, run every batch that is
        ready, each to its end, and publish the metrics. Returns the number of batches run."""
        for streams in self.reader.read_sets():
            await self.reader.read_once(streams, block_ms=None)
        ran = 0
        for lane in self.lanes.values():
            await self.scheduler.expire(lane)
            while (batch := self.scheduler.ready_batch(lane, time.monotonic())[0]) is not None:
                self.scheduler.take_slot(lane, batch)
                await self.scheduler.run_batch(lane, batch)
                ran += 1
        await self.completer.flush_metrics()
        return ran

    async def _join_groups(self) -> None:
        """Join the queues' consumer groups, waiting out a Redis that is not there yet (or restarts
        meanwhile), as every loop does later: failing here would lose the models just loaded, and
        the restart that follows would load them again."""
        joining = Outage("worker")

        async def until_joined() -> None:
            while not await joining.attempt(self._rejoin):
                pass

        join = asyncio.ensure_future(until_joined())
        stop = asyncio.ensure_future(self.state.stopping.wait())
        try:  # a stop ends the wait at once, not after a try's own retries (seconds)
            await asyncio.wait({join, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in (join, stop):
                waiting.cancel()

    def _outage(self, what: str) -> Outage:
        return Outage(what, recover=self._rejoin)

    async def _rejoin(self) -> None:
        """After an outage: a Redis restarted without persistence has lost our consumer groups."""
        for stream in self.streams:
            await ensure_group(self.redis, stream, WORKER_GROUP)

    async def _grace_watchdog(self) -> None:
        """After a stop, in-flight batches get `grace_s` to finish; then they are cancelled and
        their tasks stay pending in Redis for a peer (or this worker's restart) to take over."""
        await self.state.stopping.wait()
        if self.state.inflight:
            logger.info("[shutdown] draining %d in-flight batches", len(self.state.inflight))
            _, late = await asyncio.wait(set(self.state.inflight), timeout=self.settings.grace_s)
            if late:
                logger.warning("[shutdown] %d batches missed the %.0fs grace period", len(late), self.settings.grace_s)
                for task in late:
                    task.cancel()
