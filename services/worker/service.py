"""The worker service: model queues → batches on the device → results, acked atomically.

Three loops share the event loop and never wait on torch: the reader pulls entries from Redis
(real-time streams listed first), one scheduler per model forms batches and submits them to the
model's executor (which runs them on its own threads), and completions write results through
the idempotent finish script. A fourth loop takes over entries of dead peers.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from ectrans.common.heartbeat import Heartbeat, default_instance
from ectrans.common.keys import TASK_CLASSES, WORKER_GROUP, Keys
from ectrans.common.lifecycle import wait_or_timeout
from ectrans.common.recovery import Entry, Reclaimer, dead_letter, ensure_group, read_group
from ectrans.common.redis_conn import BLOCK_MS, connect
from ectrans.common.registry import ModelSpec
from ectrans.common.results import Fields, Finish, ResultWriter, error_record, now_ms, ok_record
from ectrans.common.schemas import Reason, Task, TaskError
from ectrans.models.api import BatchStats, Executor, ItemResult, Request
from ectrans.services.worker.batcher import Batch, Batcher, BatchPolicy, Pending
from ectrans.services.worker.settings import WorkerSettings

logger = logging.getLogger(__name__)

METRICS_MAXLEN = 10_000


def _text_field(record: Fields, name: str) -> str:
    value = record.get(name, "0")
    return value.decode() if isinstance(value, bytes) else value


class ModelLane:
    """One served model: its executor, local queues and in-flight limit."""

    def __init__(self, spec: ModelSpec, executor: Executor, settings: WorkerSettings) -> None:
        self.spec = spec
        self.executor = executor
        self.batcher = Batcher(
            realtime=BatchPolicy(settings.rt_max_batch, settings.rt_max_wait_ms / 1000, settings.token_budget),
            batch=BatchPolicy(settings.batch_max_batch, settings.batch_max_wait_ms / 1000, settings.token_budget),
            fifo=settings.fifo,
        )
        self.slots = asyncio.Semaphore(settings.max_inflight_batches)
        self.wakeup = asyncio.Event()


def load_executors(specs: list[ModelSpec], settings: WorkerSettings) -> dict[str, Executor]:
    """Load every served model (slow: call from a thread)."""
    from ectrans.models.loader import load_executor

    threads = settings.torch_threads()
    return {
        spec.name: load_executor(
            spec, device=settings.device or spec.device, threads=threads, segments=settings.segments
        )
        for spec in specs
    }


class Worker:
    name = "worker"

    def __init__(
        self,
        settings: WorkerSettings,
        registry: dict[str, ModelSpec],
        redis: aioredis.Redis | None = None,
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
        self.lanes: dict[str, ModelLane] = {}
        self.streams: dict[str, str] = {}  # stream → model
        self._stopping = asyncio.Event()
        self.heartbeat = Heartbeat(
            self.redis,
            self.keys,
            self.name,
            self.consumer,
            interval_s=settings.heartbeat_s,
            extra=self._counters,
        )
        self.counts: Counter[str] = Counter()
        self._inflight: set[asyncio.Task[None]] = set()

    def stop(self) -> None:
        self._stopping.set()
        for lane in self.lanes.values():
            lane.wakeup.set()

    def _counters(self) -> dict[str, object]:
        return {
            "models": ",".join(spec.name for spec in self.specs),
            "queued": sum(len(lane.batcher) for lane in self.lanes.values()),
            **{f"n_{k}": v for k, v in self.counts.items()},
        }

    async def start(self) -> None:
        """Load models and join the consumer groups."""
        started = time.monotonic()
        executors = self._executors
        if executors is None:
            executors = await asyncio.to_thread(load_executors, self.specs, self.settings)
        for spec in self.specs:
            self.lanes[spec.name] = ModelLane(spec, executors[spec.name], self.settings)
            for task_class in TASK_CLASSES:
                stream = self.keys.queue(spec.name, task_class)
                self.streams[stream] = spec.name
                await ensure_group(self.redis, stream, WORKER_GROUP)
        logger.info(
            "[start] worker %s ready in %.1fs serving %s",
            self.consumer,
            time.monotonic() - started,
            ", ".join(self.lanes),
        )

    async def run(self) -> None:
        try:
            await self.start()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.heartbeat.run(self._stopping))
                tg.create_task(self._guard(self._read_loop, "reader"))
                tg.create_task(self._guard(self._claim_loop, "claimer"))
                tg.create_task(self._grace_watchdog())
                for lane in self.lanes.values():
                    tg.create_task(self._guard(lambda lane=lane: self._schedule_loop(lane, tg), "scheduler"))
        finally:
            if self._executors is None:  # executors handed in belong to the caller
                for lane in self.lanes.values():
                    lane.executor.close()
            if self._own_redis:
                await self.redis.aclose()
        logger.info("[shutdown] worker %s stopped", self.consumer)

    async def _guard(self, loop_fn: object, what: str) -> None:
        """Keep a loop alive across Redis outages and bugs; only a stop ends it."""
        assert callable(loop_fn)
        outage_since: float | None = None
        while True:
            try:
                await loop_fn()
                return
            except RedisConnectionError as exc:
                if outage_since is None:
                    outage_since = time.monotonic()
                    logger.warning("[redis] %s lost the connection (%s); retrying with backoff", what, exc)
                await asyncio.sleep(random.uniform(0.1, 1.0))
            except ResponseError as exc:
                if "NOGROUP" in str(exc):  # Redis restarted without persistence: rejoin
                    for stream in self.streams:
                        await ensure_group(self.redis, stream, WORKER_GROUP)
                else:
                    logger.exception("[%s] Redis refused a command", what)
                    await asyncio.sleep(0.5)
            except Exception:
                logger.exception("[%s] unexpected error; carrying on", what)
                await asyncio.sleep(0.5)
            if self._stopping.is_set():
                return

    # 1. Reading ---------------------------------------------------------------------------------

    def _local_backlog(self) -> int:
        return sum(len(lane.batcher) for lane in self.lanes.values())

    async def _read_loop(self) -> None:
        start_id = "0"  # first our own pending entries (after a restart), then new ones
        while not self._stopping.is_set():
            room = self.settings.prefetch - self._local_backlog()
            if room <= 0:
                await asyncio.sleep(0.002)
                continue
            streams = {stream: start_id for stream in self.streams}
            got = 0
            block = None if start_id == "0" else BLOCK_MS
            for stream, entries in await read_group(
                self.redis, WORKER_GROUP, self.consumer, streams, count=room, block=block
            ):
                got += len(entries)
                if start_id == "0":
                    await self._admit_recovered(stream, entries)
                else:
                    await self._admit(stream, entries)
            if start_id == "0" and got == 0:
                start_id = ">"

    async def _admit_recovered(self, stream: str, entries: list[Entry]) -> None:
        """Own pending entries after a restart: past the delivery limit they are dead-lettered."""
        reclaimer = self._reclaimer(stream)
        claimed = await reclaimer.split_by_deliveries(entries)
        await dead_letter(self.redis, self.keys, self.writer, stream, claimed.dead, consumer=self.consumer)
        await self._admit(stream, claimed.live)

    async def _admit(self, stream: str, entries: list[Entry]) -> None:
        lane = self.lanes[self.streams[stream]]
        tasks: list[tuple[str, Task]] = []
        broken: list[Finish] = []
        for entry_id, raw in entries:
            if not raw:  # deleted while pending: nothing to answer, just clear it
                broken.append(Finish(entry_id, {}, stream, entry_id))
                continue
            try:
                tasks.append((entry_id, Task.from_fields(raw)))
            except TaskError as err:
                record = error_record(entry_id, err.reason, err.message, submitted_ms=int(entry_id.split("-")[0]))
                broken.append(Finish(entry_id, record, stream, entry_id))
        if broken:
            await self.writer.write([b for b in broken if b.record])
            for b in broken:
                if not b.record:
                    await self.redis.xack(stream, WORKER_GROUP, b.entry_id)
        if not tasks:
            return
        token_counts = lane.executor.count_tokens([t.input for _, t in tasks])
        arrived = time.monotonic()
        for (entry_id, task), tokens in zip(tasks, token_counts, strict=True):
            lane.batcher.add(Pending(entry_id, stream, task, tokens, arrived))
        lane.wakeup.set()

    # 2. Scheduling ------------------------------------------------------------------------------

    async def _schedule_loop(self, lane: ModelLane, tg: asyncio.TaskGroup) -> None:
        while not self._stopping.is_set():
            await self._expire(lane)
            await lane.slots.acquire()  # wait for device capacity; meanwhile tasks accumulate
            batch = await self._next_batch(lane)
            if batch is None:
                lane.slots.release()
                continue
            task = tg.create_task(self._run_batch(lane, batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
        await self._hand_back(lane)

    async def _next_batch(self, lane: ModelLane) -> Batch | None:
        while not self._stopping.is_set():
            now = time.monotonic()
            batch = lane.batcher.next_batch(now)
            if batch is not None:
                return batch
            lane.wakeup.clear()
            hint = lane.batcher.wait_hint(now)
            await wait_or_timeout(lane.wakeup, 0.25 if hint is None else max(hint, 0.0005))
            await self._expire(lane)
        return None

    async def _expire(self, lane: ModelLane) -> None:
        expired = lane.batcher.take_expired(now_ms())
        if expired:
            self.counts["deadline"] += len(expired)
            await self._finish_errors(expired, Reason.DEADLINE, "deadline passed while the task was queued")

    async def _run_batch(self, lane: ModelLane, batch: Batch) -> None:
        try:
            started = now_ms()
            # Tasks with different op params (e.g. num_beams) cannot share one request.
            for group in self._split_by_params(batch):
                await self._run_group(lane, Batch(batch.task_class, group), started)
        finally:
            lane.slots.release()

    async def _run_group(self, lane: ModelLane, batch: Batch, started: int) -> None:
        first = batch.items[0].task
        request = Request(first.op, [p.task.input for p in batch.items], first.params, batch.task_class == "realtime")
        try:
            results, stats = await asyncio.wrap_future(lane.executor.submit(request))
        except Exception as exc:  # the whole batch failed on the device
            logger.exception("[batch] %s batch of %d failed", lane.spec.name, len(batch.items))
            await self._finish_errors(batch.items, Reason.INTERNAL, f"model failed: {exc}")
            return
        await self._finish_batch(lane, batch, results, stats, started)

    @staticmethod
    def _split_by_params(batch: Batch) -> list[list[Pending]]:
        groups: dict[tuple[str, tuple[tuple[str, int], ...]], list[Pending]] = {}
        for p in batch.items:
            groups.setdefault((p.task.op, tuple(sorted(p.task.params.items()))), []).append(p)
        return list(groups.values())

    # 3. Completing ------------------------------------------------------------------------------

    async def _finish_batch(
        self, lane: ModelLane, batch: Batch, results: list[ItemResult], stats: BatchStats, started: int
    ) -> None:
        finishes: list[Finish] = []
        reasons: Counter[str] = Counter()
        for pending, result in zip(batch.items, results, strict=True):
            task = pending.task
            if result.error is None:
                record = ok_record(task, result.output, service_ms=stats.service_ms, started_ms=started)
            else:
                reasons[Reason.BAD_INPUT] += 1
                record = error_record(
                    task.id, Reason.BAD_INPUT, result.error, submitted_ms=task.submitted_ms,
                    task_class=task.task_class, model=task.model, op=task.op,
                )  # fmt: skip
            finishes.append(Finish(task.id, record, pending.stream, pending.entry_id, task.reply_to))
        # Shielded: a shutdown must not cut a result write in half (the script is atomic anyway).
        await asyncio.shield(self.writer.write(finishes))
        self.counts["ok"] += len(finishes) - sum(reasons.values())
        self.counts["error"] += sum(reasons.values())
        await self._publish_metrics(lane, batch, stats, finishes, reasons)

    async def _finish_errors(self, items: list[Pending], reason: str, message: str) -> None:
        finishes = [
            Finish(
                p.task.id,
                error_record(
                    p.task.id,
                    reason,
                    message,
                    submitted_ms=p.task.submitted_ms,
                    task_class=p.task.task_class,
                    model=p.task.model,
                    op=p.task.op,
                ),
                p.stream,
                p.entry_id,
                p.task.reply_to,
            )
            for p in items
        ]
        await asyncio.shield(self.writer.write(finishes))
        self.counts["error"] += len(finishes)
        if items:
            model = items[0].task.model
            await self._xadd_metrics(
                {
                    "kind": "errors",
                    "model": model,
                    "worker": self.consumer,
                    "reasons": f"{reason}:{len(items)}",
                }
            )

    async def _publish_metrics(
        self, lane: ModelLane, batch: Batch, stats: BatchStats, finishes: list[Finish], reasons: Counter[str]
    ) -> None:
        latencies = ",".join(_text_field(f.record, "latency_ms") for f in finishes)
        queues = ",".join(_text_field(f.record, "queue_ms") for f in finishes)
        await self._xadd_metrics(
            {
                "kind": "batch",
                "model": lane.spec.name,
                "class": batch.task_class,
                "worker": self.consumer,
                "size": str(stats.batch_size),
                "tokens": str(stats.tokens),
                "padded_tokens": str(stats.padded_tokens),
                "service_ms": f"{stats.service_ms:.2f}",
                "latency_ms": latencies,
                "queue_ms": queues,
                "reasons": ",".join(f"{k}:{v}" for k, v in reasons.items()),
            }
        )

    async def _xadd_metrics(self, fields: dict[str, str]) -> None:
        try:
            entry: dict[Any, Any] = fields
            await self.redis.xadd(self.keys.metrics, entry, maxlen=METRICS_MAXLEN, approximate=True)
        except RedisError as exc:  # metrics are best effort; results are not
            logger.debug("metrics not published: %s", exc)

    # 4. Recovery and shutdown -------------------------------------------------------------------

    def _reclaimer(self, stream: str) -> Reclaimer:
        return Reclaimer(
            self.redis,
            self.keys,
            stream,
            WORKER_GROUP,
            self.consumer,
            min_idle_ms=self.settings.claim_idle_ms,
            max_deliveries=self.settings.max_deliveries,
        )

    async def _claim_loop(self) -> None:
        reclaimers = {stream: self._reclaimer(stream) for stream in self.streams}
        period = max(self.settings.claim_idle_ms / 2000, 0.05)
        while not await wait_or_timeout(self._stopping, period):
            for stream, reclaimer in reclaimers.items():
                room = self.settings.prefetch - self._local_backlog()
                if room <= 0:
                    break
                claimed = await reclaimer.claim(room)
                await dead_letter(self.redis, self.keys, self.writer, stream, claimed.dead, consumer=self.consumer)
                await self._admit(stream, claimed.live)

    async def _grace_watchdog(self) -> None:
        """After a stop, in-flight batches get `grace_s` to finish; then they are cancelled and
        their tasks stay pending in Redis for a peer (or this worker's restart) to take over."""
        await self._stopping.wait()
        if self._inflight:
            logger.info("[shutdown] draining %d in-flight batches", len(self._inflight))
            _, late = await asyncio.wait(set(self._inflight), timeout=self.settings.grace_s)
            if late:
                logger.warning("[shutdown] %d batches missed the %.0fs grace period", len(late), self.settings.grace_s)
                for task in late:
                    task.cancel()

    async def _hand_back(self, lane: ModelLane) -> None:
        """On stop, tasks not yet started go back to the group at once, claimable by live peers."""
        items = lane.batcher.take_all()
        by_stream: dict[str, list[str]] = {}
        for p in items:
            by_stream.setdefault(p.stream, []).append(p.entry_id)
        for stream, ids in by_stream.items():
            idle = self.settings.claim_idle_ms * 10
            try:
                claim_ids: list[Any] = list(ids)
                await self.redis.xclaim(stream, WORKER_GROUP, self.consumer, 0, claim_ids, idle=idle, justid=True)
            except RedisError as exc:
                logger.warning(
                    "[shutdown] could not hand back %d tasks (%s); peers take them after idle", len(ids), exc
                )
        if items:
            logger.info("[shutdown] handed back %d queued tasks of %s", len(items), lane.spec.name)
