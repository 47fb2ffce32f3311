"""Which live workers serve which model, and a bounded wait for models nobody serves.

Workers list their models in their heartbeats (`ECTRANS_SERVE_MODELS` picks them per worker, so a
model can live on a subset of hosts). The dispatcher keeps this picture fresh; once a model has had
no live worker for `grace_s`:

- new tasks for it get an `unavailable` error at once instead of an eternal queue, and
- tasks already in its queues (forwarded before the last worker died, or held by dead workers)
  are read under the dispatcher's own consumer name in the workers' group and answered with the
  same error — so every task's wait is bounded by about `grace_s`.

A worker that comes back ends the drain at the next refresh.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from ectrans.common.heartbeat import METRICS_MAXLEN
from ectrans.common.keys import TASK_CLASSES, WORKER_GROUP, Keys
from ectrans.common.lifecycle import wait_or_timeout
from ectrans.common.outage import Outage
from ectrans.common.presence import live
from ectrans.common.recovery import Entry, Reclaimer, ensure_group, read_group
from ectrans.common.redis_conn import RedisClient
from ectrans.common.results import Finish, ResultWriter, error_record, task_error_record
from ectrans.common.schemas import Reason, Task, TaskError, entry_ms

logger = logging.getLogger(__name__)

DRAIN_BATCH = 256


@dataclass
class ModelState:
    instances: set[str] = field(default_factory=set)  # live workers serving it
    hosts: set[str] = field(default_factory=set)
    unserved_since: float | None = None  # monotonic time it was first seen without a worker


class Placement:
    """The dispatcher's view of model placement; `run` keeps it fresh and drains orphaned queues."""

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        models: list[str],
        *,
        consumer: str,
        grace_s: float,
        result_ttl_s: int,
        refresh_s: float = 1.0,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.consumer = consumer  # our name in the workers' group while draining
        self.grace_s = grace_s
        self.refresh_s = refresh_s
        self.writer = ResultWriter(redis, keys, WORKER_GROUP, result_ttl_s)
        started = time.monotonic()  # workers still loading get the grace period from our start
        self.models = {model: ModelState(unserved_since=started) for model in models}
        self._grouped: set[str] = set()
        self._reclaimers: dict[str, Reclaimer] = {}
        self.drained: Counter[str] = Counter()

    # Questions the dispatcher asks for every task (no I/O) ------------------------------------------

    def unavailable(self, model: str) -> bool:
        """True once `model` has had no live worker for longer than the grace period."""
        state = self.models.get(model)
        if state is None or state.unserved_since is None:
            return False
        return time.monotonic() - state.unserved_since >= self.grace_s

    def message(self, model: str) -> str:
        state = self.models.get(model)
        since = state.unserved_since if state else None
        gone = f" for {time.monotonic() - since:.0f}s" if since is not None else ""
        return f"no live worker serves model {model!r}{gone}; start one with it in ECTRANS_SERVE_MODELS"

    def hosts(self, model: str) -> set[str]:
        state = self.models.get(model)
        return set(state.hosts) if state else set()

    # Keeping the picture fresh ----------------------------------------------------------------------

    async def refresh(self) -> None:
        workers = await live(self.redis, self.keys, "worker")
        now = time.monotonic()
        for model, state in self.models.items():
            serving = [w for w in workers if model in w.models]
            state.instances = {w.instance for w in serving}
            state.hosts = {w.host for w in serving}
            if serving:
                if state.unserved_since is not None and self.unavailable(model):
                    logger.info("[placement] model %s is served again (by %s)", model, ", ".join(sorted(state.hosts)))
                state.unserved_since = None
            elif state.unserved_since is None:
                state.unserved_since = now
                logger.warning("[placement] no live worker serves %s; tasks wait %gs, then fail", model, self.grace_s)

    async def run(self, stop: asyncio.Event) -> None:
        # A background loop must never take the dispatcher down with it (the client library can
        # raise more than RedisError mid-reconnect, seen on a cluster node failover); the
        # dispatcher's own loop reports an outage.
        outage = Outage("placement", error_pause_s=0.0, report=False)

        async def step() -> None:
            await self.refresh()
            for model in self.models:
                if self.unavailable(model) and not stop.is_set():
                    await self.drain(model)

        while not stop.is_set():
            await outage.attempt(step)
            await wait_or_timeout(stop, self.refresh_s)

    # Answering what waits for a model nobody serves -------------------------------------------------

    async def drain(self, model: str) -> int:
        """Answer every task queued for `model` (new, or held by dead workers) with `unavailable`."""
        answered = 0
        for task_class in TASK_CLASSES:
            stream = self.keys.queue(model, task_class)
            if stream not in self._grouped:
                await ensure_group(self.redis, stream, WORKER_GROUP)
                self._grouped.add(stream)
            while True:
                got = await read_group(
                    self.redis, WORKER_GROUP, self.consumer, {stream: ">"}, count=DRAIN_BATCH, block=None
                )
                entries = got[0][1] if got else []
                claimed = await self._reclaimer(stream).claim(DRAIN_BATCH)
                entries += claimed.live + [entry for entry, _ in claimed.dead]
                if not entries:
                    break
                await self.writer.write([self._answer(model, stream, entry) for entry in entries])
                answered += len(entries)
        if answered:
            self.drained[model] += answered
            logger.warning("[placement] answered %d queued tasks of %s: no live worker", answered, model)
            await self._publish(model, answered)
        return answered

    def _reclaimer(self, stream: str) -> Reclaimer:
        if stream not in self._reclaimers:
            self._reclaimers[stream] = Reclaimer(
                self.redis,
                self.keys,
                stream,
                WORKER_GROUP,
                self.consumer,
                min_idle_ms=max(100, int(self.grace_s * 1000)),  # every worker is gone at least this long
                max_deliveries=1_000_000,  # answered here whatever their history
            )
        return self._reclaimers[stream]

    def _answer(self, model: str, stream: str, entry: Entry) -> Finish:
        entry_id, raw = entry
        if not raw:  # deleted while pending: nothing to answer, only to acknowledge
            return Finish(entry_id, {}, stream, entry_id)
        try:
            task = Task.from_fields(raw)
        except TaskError:
            record = error_record(entry_id, Reason.UNAVAILABLE, self.message(model), submitted_ms=entry_ms(entry_id))
            return Finish(entry_id, record, stream, entry_id)
        record = task_error_record(task, Reason.UNAVAILABLE, self.message(model))
        return Finish(task.id, record, stream, entry_id, task.reply_to)

    async def _publish(self, model: str, count: int) -> None:
        fields: dict[str | bytes, str | bytes] = {
            "kind": "errors",
            "model": model,
            "dispatcher": self.consumer,
            "reasons": f"{Reason.UNAVAILABLE}:{count}",
        }
        try:
            await self.redis.xadd(self.keys.metrics, fields, maxlen=METRICS_MAXLEN, approximate=True)  # type: ignore[arg-type]
        except RedisError as exc:  # metrics are best effort; results are not
            logger.debug("metrics not published: %s", exc)
