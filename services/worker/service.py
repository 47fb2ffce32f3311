"""The worker service: model queues → batches on the device → results, acked atomically.

Why one module of this length: the worker's six jobs (lanes, loading, reading, scheduling,
completing, recovery) share its state; splitting it into modules is planned (docs/architecture.md).

Three loops share the event loop and never wait on torch: the reader pulls entries from Redis
(real-time streams listed first), one scheduler per model forms batches and submits them to the
model's executor (which runs them on its own threads), and completions write results through
the idempotent finish script. A fourth loop takes over entries of dead peers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ectrans.common.cost import CostModel, OnlineCost
from ectrans.common.heartbeat import METRICS_MAXLEN, Heartbeat, default_instance
from ectrans.common.keys import TASK_CLASSES, WORKER_GROUP, Keys
from ectrans.common.lifecycle import wait_or_timeout
from ectrans.common.recovery import Entry, Reclaimer, dead_letter, ensure_group, read_group
from ectrans.common.redis_conn import BLOCK_MS, RedisClient, connect, is_cluster
from ectrans.common.registry import ModelSpec
from ectrans.common.results import Fields, Finish, ResultWriter, error_record, now_ms, ok_record, task_error_record
from ectrans.common.schemas import TASK_ID_RE, Reason, Task, TaskError, reply_to_of
from ectrans.common.split import check_split
from ectrans.models.api import BatchStats, Executor, ItemResult, Request
from ectrans.services.worker.batcher import Batch, Batcher, BatchPolicy, Pending
from ectrans.services.worker.cancel import CANCELLED_MESSAGE, split_cancelled
from ectrans.services.worker.settings import WorkerSettings
from ectrans.services.worker.warmup import warm_up

logger = logging.getLogger(__name__)

REALTIME_INFLIGHT = 2
TOUCH_LIMIT = 10  # claim idle times after which a held task is left to peers (see `_touch_loop`)
CPU_MAX_PADDING = 0.25  # see `padding_bound`
# A paced lane forms its next bulk batch this long before the first segment is predicted free:
# the time to take it from the queues, submit it and tokenise it.
PACE_LEAD_S = 0.003


def _text_field(record: Fields, name: str) -> str:
    value = record.get(name, "0")
    return value.decode() if isinstance(value, bytes) else value


class ModelLane:
    """One served model: its executor, local queues and in-flight limit."""

    def __init__(self, spec: ModelSpec, executor: Executor, worker_settings: WorkerSettings) -> None:
        self.spec = spec
        self.executor = executor
        # The model entry's batching keys win over the worker-wide defaults.
        self.settings = settings = model_settings(worker_settings, spec)
        self.batcher = Batcher(
            realtime=BatchPolicy(settings.rt_max_batch, settings.rt_max_wait_ms / 1000, settings.token_budget),
            batch=BatchPolicy(
                settings.batch_max_batch,
                settings.batch_max_wait_ms / 1000,
                settings.token_budget,
                padding_bound(settings, spec),
            ),
            fifo=settings.fifo,
        )
        # Each class has its own in-flight limit, so bulk batches filling the executor never keep a
        # real-time batch from being submitted (it then cuts in at the next segment boundary).
        # An executor of several processes (shared weights) gets the in-flight limit for each.
        processes = executor.processes
        self.limits = {"realtime": REALTIME_INFLIGHT, "batch": settings.max_inflight_batches * processes}
        self.inflight = {"realtime": 0, "batch": 0}
        self.wakeup = asyncio.Event()
        self.cost = OnlineCost(segments=executor.segment_count)
        self.cost_published = 0.0
        self.fitted: CostModel | None = None  # the last fit of `cost`, refreshed once a second
        self.last_batch: tuple[int, float] | None = None  # padded tokens and ms of the latest batch (before a fit)
        # A paced executor gets its bulk batches just before it can start them (FIFO, the baseline, is not paced).
        self.paced = executor.pacing() if not settings.fifo else None
        # Bulk batches formed but not yet handed to the executor (their cancel marks being looked up):
        # to pacing they are already waiting for the first segment.
        self.bulk_forming = 0

    def free_classes(self) -> set[str]:
        return {c for c, n in self.inflight.items() if n < self.limits[c]}

    def slot_class(self, batch: Batch) -> str:
        return "realtime" if batch.task_class == "realtime" else "batch"

    def follow_progress(self) -> Callable[[], None]:
        """Wake the scheduler whenever a paced executor's first segment starts a bulk batch; returns the undo."""
        if self.paced is None:
            return lambda: None
        loop = asyncio.get_running_loop()

        def wake() -> None:
            loop.call_soon_threadsafe(self.wakeup.set)

        return self.paced.on_progress(wake)

    def bulk_due(self, free: set[str]) -> float | None:
        """When the next bulk batch should be formed (paced executors; None: by `max_wait_s`). While a
        bulk batch still waits for the first segment, none: tasks arriving meanwhile join the next one
        (the batch class leaves `free`). While the segment runs one, just before its predicted end."""
        if self.paced is None:
            return None
        if self.paced.bulk_waiting() > 0 or self.bulk_forming > 0:
            free.discard("batch")
            return None
        front = self.paced.front_segment()
        busy_ms = None if front is None else self.busy_ms(front.padded_tokens, front.share)
        if front is None or busy_ms is None:  # the segment is free, or its cost not yet known: at once
            return time.monotonic()
        return front.started + busy_ms / 1000.0 - PACE_LEAD_S

    def busy_ms(self, padded_tokens: int, share: float) -> float | None:
        """Predicted time `share` of a batch's cost takes: from the fitted cost, else in proportion to
        the latest batch; None before any."""
        if self.fitted is not None:
            return self.fitted.batch_ms(padded_tokens) * share
        if self.last_batch is not None:
            tokens, ms = self.last_batch
            return ms * padded_tokens / max(tokens, 1) * share
        return None


def padding_bound(settings: WorkerSettings, spec: ModelSpec) -> float | None:
    """`batch_max_padding`, or its default for the model's device: CPU_MAX_PADDING on a CPU (where a
    padded token costs what a real one does), none on a GPU (where a wider batch is nearly free)."""
    if settings.batch_max_padding is not None:
        return settings.batch_max_padding
    if spec.kind == "noop":
        return None
    from ectrans.models.device import resolve_device

    return CPU_MAX_PADDING if resolve_device(settings.device or spec.device).type == "cpu" else None


def model_settings(settings: WorkerSettings, spec: ModelSpec) -> WorkerSettings:
    """The worker's settings with the batching keys of `spec`'s registry entry in place."""
    return settings.model_copy(update=spec.batching) if spec.batching else settings


def load_executors(specs: list[ModelSpec], settings: WorkerSettings) -> dict[str, Executor]:
    """Load every served model (slow: call from a thread). With shared weights, a model runs in
    `executors_per_device` processes attached to one weight holder, behind the same interface."""
    from ectrans.models.loader import load_executor

    threads = settings.torch_threads()
    executors: dict[str, Executor] = {}
    for spec in specs:
        device = settings.device or spec.device
        segments = model_settings(settings, spec).segments
        if settings.shares_weights() and spec.kind != "noop":
            from ectrans.sharing.process_pool import SharedExecutorPool

            processes = settings.executors_per_device
            executors[spec.name] = SharedExecutorPool(
                spec,
                processes,
                device=device,
                threads_per_process=max(1, threads // processes),
                segments=segments,
                log_format=settings.log_format,
            )
        else:
            executors[spec.name] = load_executor(spec, device=device, threads=threads, segments=segments)
    return executors


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
        self.lanes: dict[str, ModelLane] = {}
        self.streams: dict[str, str] = {}  # stream → model
        self._stopping = asyncio.Event()
        # Set when tasks leave the local queues: a reader whose prefetch is full waits on it.
        self._room = asyncio.Event()
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
        # Cursors over our own pending entries left by an earlier run under this name, per stream,
        # until read through: each history read counts as a delivery, so every entry is read once.
        self._history: dict[str, str] = {}
        # (stream, entry id) → monotonic time admitted, of every task this process holds (queued or
        # running): never admitted twice, and kept from looking abandoned (see `_touch_loop`).
        self._held: dict[tuple[str, str], float] = {}
        # Metrics entries waiting for `_metrics_loop`: published off the batches' path, many per round trip.
        self._metrics: list[dict[str, str]] = []
        self._metrics_ready = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()
        self._room.set()
        self._metrics_ready.set()
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
                self._history[stream] = "0"
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
                for streams in self._read_sets():
                    tg.create_task(self._guard(lambda streams=streams: self._read_loop(streams), "reader"))
                tg.create_task(self._guard(self._claim_loop, "claimer"))
                tg.create_task(self._guard(self._touch_loop, "toucher"))
                tg.create_task(self._grace_watchdog())
                tg.create_task(self._guard(self._metrics_loop, "metrics"))
                for lane in self.lanes.values():
                    tg.create_task(self._guard(lambda lane=lane: self._schedule_loop(lane, tg), "scheduler"))
        finally:
            await self._flush_metrics()  # what the last batches published
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

    def _read_sets(self) -> list[list[str]]:
        """Streams read by one XREADGROUP each, real-time first: all at once on a single Redis; one
        model's pair per reader on a cluster, where one call cannot span slots (a model's streams
        share its hash tag)."""
        if not is_cluster(self.redis):
            return [list(self.streams)]
        by_model: dict[str, list[str]] = {}
        for stream, model in self.streams.items():
            by_model.setdefault(model, []).append(stream)
        return list(by_model.values())

    async def _read_loop(self, streams: list[str]) -> None:
        while not self._stopping.is_set():
            room = self.settings.prefetch - self._local_backlog()
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            history = {s: cursor for s, cursor in self._history.items() if s in streams}
            if history:  # first our own pending entries (after a restart), then new ones
                await self._read_history(room, history)
                continue
            for stream, entries in await read_group(
                self.redis, WORKER_GROUP, self.consumer, {s: ">" for s in streams}, count=room, block=BLOCK_MS
            ):
                await self._admit(stream, entries)

    async def _read_history(self, room: int, streams: dict[str, str]) -> None:
        got = dict(await read_group(self.redis, WORKER_GROUP, self.consumer, streams, count=room, block=None))
        for stream in streams:
            entries = got.get(stream, [])
            if entries:
                self._history[stream] = entries[-1][0]
                await self._admit_recovered(stream, entries)
            else:
                self._history.pop(stream, None)

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
        split_tokens: dict[str, int] = {}  # entry id → token count of a split task's payload
        if self._stopping.is_set():  # read while stopping: straight back to the group
            await self._give_back(stream, [entry_id for entry_id, _ in entries])
            return
        for entry_id, raw in entries:
            if (stream, entry_id) in self._held:  # e.g. claimed back from ourselves after the idle time
                continue
            if not raw:  # deleted while pending: nothing to answer, just clear it
                broken.append(Finish(entry_id, {}, stream, entry_id))
                continue
            try:
                task = Task.from_fields(raw)
            except TaskError as err:
                broken.append(self._unreadable(stream, entry_id, raw, err))
                continue
            try:
                split_tokens[entry_id] = check_split(task, lane.spec).tokens if task.is_split else 0
            except TaskError as err:  # this worker's copy of the model differs from the dispatcher's
                record = task_error_record(task, err.reason, err.message)
                broken.append(Finish(task.id, record, stream, entry_id, task.reply_to))
                continue
            tasks.append((entry_id, task))
            self._held[(stream, entry_id)] = time.monotonic()
        queued: set[str] = set()
        too_long: list[Finish] = []
        try:
            if broken:  # answered, or only acknowledged where the entry is gone (empty record): one call
                await self._write(broken)
            texts = [t.input for _, t in tasks if not t.is_split]
            counted = iter(lane.executor.count_tokens(texts) if texts else [])
            arrived = time.monotonic()
            for entry_id, task in tasks:
                tokens = split_tokens[entry_id] if task.is_split else next(counted)
                if not task.is_split and self._refuses_length(lane.spec, task, tokens):
                    record = self._too_long_record(lane.spec, task)
                    too_long.append(Finish(task.id, record, stream, entry_id, task.reply_to))
                    continue
                lane.batcher.add(Pending(entry_id, stream, task, min(tokens, lane.spec.max_tokens), arrived))
                queued.add(entry_id)
            if queued:
                lane.wakeup.set()
            if too_long:
                await self._write(too_long)
        finally:
            # Whatever did not reach the local queues is not held: left pending, it is claimed again
            # (by a peer or by this worker after the idle time) instead of being skipped as ours.
            for entry_id, _ in tasks:
                if entry_id not in queued:
                    self._held.pop((stream, entry_id), None)

    def _unreadable(self, stream: str, entry_id: str, raw: dict[bytes, bytes], err: TaskError) -> Finish:
        """A queue entry that is no task (written by hand, or corrupted): answered under the task id
        it names, never under the queue's entry ID (which could be another task's result key), or
        only acknowledged, with a warning, when it names none."""
        task_id = raw.get(b"id", b"").decode("utf-8", "replace")
        if not TASK_ID_RE.match(task_id):
            logger.warning("[worker] unreadable entry %s of %s acknowledged: %s", entry_id, stream, err.message)
            return Finish(entry_id, {}, stream, entry_id)
        record = error_record(task_id, err.reason, err.message, submitted_ms=now_ms())
        return Finish(task_id, record, stream, entry_id, reply_to_of(raw))

    @staticmethod
    def _refuses_length(spec: ModelSpec, task: Task, tokens: int) -> bool:
        """Over the model's token limit, and neither the task nor the model entry allows cutting it."""
        return spec.kind != "noop" and tokens > spec.max_tokens and not (task.truncate or spec.truncate)

    @staticmethod
    def _too_long_record(spec: ModelSpec, task: Task) -> Fields:
        message = (
            f"input is longer than the {spec.max_tokens} tokens model {spec.name!r} takes; "
            "send truncate=1 with the task (or set truncate = true in the model entry) to cut it instead"
        )
        return task_error_record(task, Reason.BAD_INPUT, message)

    # 2. Scheduling ------------------------------------------------------------------------------

    async def _schedule_loop(self, lane: ModelLane, tg: asyncio.TaskGroup) -> None:
        unfollow = lane.follow_progress()
        try:
            while not self._stopping.is_set():
                await self._expire(lane)
                batch = await self._next_batch(lane)  # waits for a ready batch of a class with a free slot
                if batch is None:
                    continue
                lane.inflight[lane.slot_class(batch)] += 1
                task = tg.create_task(self._run_batch(lane, batch))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
        finally:
            unfollow()
        await self._hand_back(lane)

    async def _next_batch(self, lane: ModelLane) -> Batch | None:
        while not self._stopping.is_set():
            now = time.monotonic()
            free = lane.free_classes()
            idle = not any(lane.inflight.values())  # nothing running: waiting for batch-mates only idles the device
            due = lane.bulk_due(free)
            batch = lane.batcher.next_batch(now, free, idle=idle, bulk_due=due)
            if batch is not None:
                self._room.set()
                return batch
            lane.wakeup.clear()
            # A finished batch, a new task or (paced) the first segment starting a batch sets `wakeup`.
            hint = lane.batcher.wait_hint(now, free, idle=idle, bulk_due=due)
            await wait_or_timeout(lane.wakeup, 0.25 if hint is None else max(hint, 0.0005))
            await self._expire(lane)
        return None

    async def _expire(self, lane: ModelLane) -> None:
        expired = lane.batcher.take_expired(now_ms())
        if expired:
            self._room.set()
            self.counts["deadline"] += len(expired)
            try:
                await self._finish_errors(expired, Reason.DEADLINE, "deadline passed while the task was queued")
            finally:  # not written: left pending for a claim, not held as ours
                self._release(expired)

    async def _run_batch(self, lane: ModelLane, batch: Batch) -> None:
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
            self._release(batch.items)
            lane.inflight[lane.slot_class(batch)] -= 1
            lane.wakeup.set()

    async def _without_cancelled(self, batch: Batch, now: int) -> Batch:
        """The batch less the tasks their clients cancelled, which are answered `cancelled` (cancel.py)."""
        run, cancelled = await split_cancelled(self.redis, self.keys, batch.items, now)
        if cancelled:
            self.counts["cancelled"] += len(cancelled)
            await self._finish_errors(cancelled, Reason.CANCELLED, CANCELLED_MESSAGE)
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
            await self._finish_errors(batch.items, Reason.INTERNAL, f"model failed: {exc}")
            return
        await self._finish_batch(lane, batch, results, stats, started)

    @staticmethod
    def _split_by_params(batch: Batch) -> list[list[Pending]]:
        groups: dict[tuple[str, int, tuple[tuple[str, int], ...]], list[Pending]] = {}
        for p in batch.items:  # split tasks resume together only from the same point
            groups.setdefault((p.task.op, p.task.segment, tuple(sorted(p.task.params.items()))), []).append(p)
        return list(groups.values())

    # 3. Completing ------------------------------------------------------------------------------

    async def _finish_batch(
        self, lane: ModelLane, batch: Batch, results: list[ItemResult], stats: BatchStats, started: int
    ) -> None:
        finishes: list[Finish] = []
        for pending, result in zip(batch.items, results, strict=True):
            task = pending.task
            if result.error is None:
                record = ok_record(task, result.output, service_ms=stats.service_ms, started_ms=started)
            else:
                record = task_error_record(task, Reason.BAD_INPUT, result.error)
            finishes.append(Finish(task.id, record, pending.stream, pending.entry_id, task.reply_to))
        fresh = await self._write(finishes)
        # A task run again after a takeover is answered once and must be counted once: metrics
        # cover only the results this write created (the device work is still real cost).
        counted = [i for i, created in enumerate(fresh) if created]
        reasons = Counter(Reason.BAD_INPUT for i in counted if _text_field(finishes[i].record, "status") == "error")
        self.counts["ok"] += len(counted) - sum(reasons.values())
        self.counts["error"] += sum(reasons.values())
        shown = Batch(batch.task_class, [batch.items[i] for i in counted])
        await self._publish_metrics(lane, shown, stats, [finishes[i] for i in counted], reasons)
        # Split tasks run only the units after their split point: their time says nothing of a whole batch's.
        await self._publish_cost(lane, stats, observe=not any(p.task.is_split for p in batch.items))

    async def _finish_errors(self, items: list[Pending], reason: str, message: str) -> None:
        finishes = [
            Finish(
                p.task.id,
                task_error_record(p.task, reason, message),
                p.stream,
                p.entry_id,
                p.task.reply_to,
            )
            for p in items
        ]
        fresh = await self._write(finishes)
        self.counts["error"] += sum(fresh)
        by_class = Counter(
            (p.task.model, p.task.task_class) for p, created in zip(items, fresh, strict=True) if created
        )
        for (model, task_class), count in by_class.items():
            await self._xadd_metrics(
                {
                    "kind": "errors",
                    "model": model,
                    "class": task_class,
                    "worker": self.consumer,
                    "reasons": f"{reason}:{count}",
                }
            )

    async def _write(self, finishes: list[Finish]) -> list[bool]:
        """Write terminal records, riding out a Redis restart with jittered backoff: the finish
        script is idempotent, so a retry after an unanswered attempt writes nothing twice. Shielded:
        a shutdown must not cut a write in half (the script is atomic anyway)."""
        delay = 0.1
        while True:
            try:
                return await asyncio.shield(self.writer.write(finishes))
            except (RedisConnectionError, RedisTimeoutError) as exc:
                logger.warning("[redis] %d results wait for Redis (%s)", len(finishes), exc)
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, 2.0)

    def _release(self, items: list[Pending]) -> None:
        for p in items:
            self._held.pop((p.stream, p.entry_id), None)

    async def _publish_metrics(
        self, lane: ModelLane, batch: Batch, stats: BatchStats, finishes: list[Finish], reasons: Counter[str]
    ) -> None:
        latencies = ",".join(_text_field(f.record, "latency_ms") for f in finishes)
        queues = ",".join(_text_field(f.record, "queue_ms") for f in finishes)
        late = sum(
            1
            for p, f in zip(batch.items, finishes, strict=True)
            if p.task.deadline_at_ms is not None and int(_text_field(f.record, "finished_ms")) > p.task.deadline_at_ms
        )
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
                "late": str(late),  # finished after their deadline
            }
        )

    async def _publish_cost(self, lane: ModelLane, stats: BatchStats, *, observe: bool = True) -> None:
        """Refresh the model's fitted batch cost (at most once a second): for the dispatcher's admission, and to
        size bulk batches so one of their segments runs within `batch_segment_ms`."""
        if observe:
            lane.cost.observe(stats.padded_tokens, stats.compute_ms or stats.service_ms)
            lane.last_batch = (stats.padded_tokens, stats.compute_ms or stats.service_ms)
        if time.monotonic() - lane.cost_published < 1.0:  # before the fit: a least-squares per batch is waste
            return
        model = lane.cost.model()
        if model is None:
            return
        lane.fitted = model
        if lane.settings.batch_segment_ms > 0 and not lane.settings.fifo:  # FIFO (the baseline) runs uncapped
            cap = model.tokens_within(lane.settings.batch_segment_ms * model.segments)
            lane.batcher.batch_token_cap = cap
            if cap is not None and lane.batcher.cap_in_force(time.monotonic()):
                # Batches larger than the cap came before it: not what runs from now on.
                model = dataclasses.replace(model, max_batch_tokens=min(model.max_batch_tokens, cap))
        lane.cost_published = time.monotonic()
        try:
            await self.redis.hset(self.keys.cost(lane.spec.name), mapping=model.to_fields())  # type: ignore[arg-type]
        except RedisError as exc:
            logger.debug("cost not published: %s", exc)

    async def _xadd_metrics(self, fields: dict[str, str]) -> None:
        """Queue a metrics entry for `_metrics_loop`: a batch's slot is free once its results are written."""
        self._metrics.append(fields)
        self._metrics_ready.set()

    async def _metrics_loop(self) -> None:
        """Publish queued metrics entries, all that piled up in one round trip (one per batch before)."""
        while not (self._stopping.is_set() and not self._inflight):
            self._metrics_ready.clear()
            if self._metrics:
                await self._flush_metrics()
            else:
                await wait_or_timeout(self._metrics_ready, 0.25)

    async def _flush_metrics(self) -> None:
        entries, self._metrics = self._metrics, []
        if not entries:
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            for fields in entries:
                entry: dict[Any, Any] = fields
                pipe.xadd(self.keys.metrics, entry, maxlen=METRICS_MAXLEN, approximate=True)
            await pipe.execute()
        except (RedisError, OSError) as exc:  # metrics are best effort; results are not
            logger.debug("%d metrics entries not published: %s", len(entries), exc)

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

    async def _touch_loop(self) -> None:
        """Peers take over entries idle for `claim_idle_ms`, so every half of that a live worker resets
        the idle time of what it holds, queued or running (XCLAIM JUSTID to itself: no delivery is
        counted) — also while it drains on a stop. Without this, a backlog that takes longer than the
        idle time is claimed by peers while it waits here, runs twice, and its delivery counts climb
        to the dead-letter limit. A task held for `TOUCH_LIMIT` idle times is no longer touched, so a
        stuck executor cannot keep it from peers forever."""
        period = self.settings.claim_idle_ms / 2000
        while True:
            if not self._stopping.is_set():
                await wait_or_timeout(self._stopping, period)
            elif self._inflight:
                await asyncio.wait(set(self._inflight), timeout=period)
            else:
                return
            await self._touch()

    async def _touch(self) -> None:
        oldest = time.monotonic() - TOUCH_LIMIT * self.settings.claim_idle_ms / 1000
        by_stream: dict[str, list[Any]] = {}
        for (stream, entry_id), admitted in list(self._held.items()):
            if admitted >= oldest:
                by_stream.setdefault(stream, []).append(entry_id)
        for stream, ids in by_stream.items():
            await self.redis.xclaim(stream, WORKER_GROUP, self.consumer, 0, ids, justid=True)

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
        self._room.set()
        self._release(items)
        by_stream: dict[str, list[str]] = {}
        for p in items:
            by_stream.setdefault(p.stream, []).append(p.entry_id)
        for stream, ids in by_stream.items():
            await self._give_back(stream, ids)
        if items:
            logger.info("[shutdown] handed back %d queued tasks of %s", len(items), lane.spec.name)

    async def _give_back(self, stream: str, ids: list[str]) -> None:
        """Mark entries long idle (XCLAIM JUSTID: no extra delivery counted) so that peers claim them now."""
        if not ids:
            return
        try:
            claim_ids: list[Any] = list(ids)
            idle = self.settings.claim_idle_ms * 10
            await self.redis.xclaim(stream, WORKER_GROUP, self.consumer, 0, claim_ids, idle=idle, justid=True)
        except RedisError as exc:
            logger.warning("[shutdown] could not hand back %d tasks (%s); peers take them after idle", len(ids), exc)
