"""Completing tasks: terminal records through the idempotent finish script, the per-batch metrics
(published off the batches' path, many entries per round trip) and the model's fitted cost."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ectrans.common.heartbeat import METRICS_MAXLEN
from ectrans.common.keys import Keys
from ectrans.common.lifecycle import wait_or_timeout
from ectrans.common.outage import Backoff, Outage
from ectrans.common.redis_conn import RedisClient
from ectrans.common.results import Fields, Finish, ResultWriter, ok_record, task_error_record
from ectrans.common.schemas import Reason
from ectrans.models.api import BatchStats, ItemResult
from ectrans.services.worker.batcher import Batch, Pending
from ectrans.services.worker.lanes import ModelLane, WorkerState

logger = logging.getLogger(__name__)


def _text_field(record: Fields, name: str) -> str:
    value = record.get(name, "0")
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class Completer:
    """Answers tasks (a batch's results, or errors found before or instead of running them) and
    publishes what they cost."""

    redis: RedisClient
    keys: Keys
    writer: ResultWriter
    consumer: str
    state: WorkerState
    # Metrics entries waiting for `metrics_loop`: published off the batches' path, many per round trip.
    _metrics: list[dict[str, str]] = field(default_factory=list)
    metrics_ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def counts(self) -> Counter[str]:
        return self.state.counts

    async def finish_batch(
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
        fresh = await self.write(finishes)
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

    async def finish_errors(self, items: list[Pending], reason: str, message: str) -> None:
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
        fresh = await self.write(finishes)
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

    async def write(self, finishes: list[Finish]) -> list[bool]:
        """Write terminal records, riding out a Redis restart with jittered backoff: the finish
        script is idempotent, so a retry after an unanswered attempt writes nothing twice. Shielded:
        a shutdown must not cut a write in half (the script is atomic anyway)."""
        backoff = Backoff(0.1, 2.0)
        while True:
            try:
                return await asyncio.shield(self.writer.write(finishes))
            except (RedisConnectionError, RedisTimeoutError) as exc:
                logger.warning("[redis] %d results wait for Redis (%s)", len(finishes), exc)
                await backoff.pause()

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
                "compute_ms": f"{stats.compute_ms:.2f}",  # of service_ms, on the device
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
        """Queue a metrics entry for `metrics_loop`: a batch's slot is free once its results are written."""
        self._metrics.append(fields)
        self.metrics_ready.set()

    async def metrics_loop(self, outage: Outage) -> None:
        """Publish queued metrics entries, all that piled up in one round trip (one per batch before),
        until a stop once no batch is in flight."""
        while not (self.state.stopping.is_set() and not self.state.inflight):
            await outage.attempt(self._publish_queued)

    async def _publish_queued(self) -> None:
        self.metrics_ready.clear()
        if self._metrics:
            await self.flush_metrics()
        else:
            await wait_or_timeout(self.metrics_ready, 0.25)

    async def flush_metrics(self) -> None:
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
