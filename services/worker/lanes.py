"""A worker's lanes, one per served model (its executor, local queues, in-flight slots, cost), and
the state the worker's jobs share: which stream feeds which lane, the entries held, the batches in
flight, the counts, and the events that wake the loops."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

from ectrans.common.cost import CostModel, OnlineCost
from ectrans.common.registry import ModelSpec
from ectrans.models.api import Executor
from ectrans.services.worker.batcher import Batch, Batcher, BatchPolicy, Pending
from ectrans.services.worker.settings import WorkerSettings

REALTIME_INFLIGHT = 2
CPU_MAX_PADDING = 0.25  # see `padding_bound`
# A paced lane forms its next bulk batch this long before the first segment is predicted free:
# the time to take it from the queues, submit it and tokenise it.
PACE_LEAD_S = 0.003


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
        self.cost = OnlineCost(
            segments=executor.segment_count, processes=executor.processes, realtime_lane=executor.realtime_lane
        )
        self.cost_published = 0.0
        self.fitted: CostModel | None = None  # the last fit of `cost`, refreshed once a second
        self.last_batch: tuple[int, float] | None = None  # padded tokens and ms of the latest batch (before a fit)
        # A paced executor gets its bulk batches just before it can start them (FIFO, the baseline, is not paced).
        self.paced = executor.pacing() if not settings.fifo else None
        if self.paced is not None:  # bulk tasks held back for the next batch are work on its way
            self.paced.watch_backlog(self.bulk_held_back)
        # Bulk batches formed but not yet handed to the executor (their cancel marks being looked up):
        # to pacing they are already waiting for the first segment.
        self.bulk_forming = 0

    def bulk_held_back(self) -> int:
        """Bulk tasks (and batches being formed) the executor gets as soon as its first segment is free;
        called from the executor's threads. Queued tasks count only while a batch slot is free: else
        they wait for a batch to end, not for the segment, and a lone batch may keep all threads."""
        queued = len(self.batcher.queues["batch"]) if self.slot_free("batch") else 0
        return queued + self.bulk_forming

    def slot_free(self, task_class: str) -> bool:
        return self.inflight[task_class] < self.limits[task_class]

    def free_classes(self) -> set[str]:
        return {c for c in self.inflight if self.slot_free(c)}

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

    def bulk_due(self, free: set[str], now: float) -> float | None:
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
            return now  # (not a later clock reading: due after `now`, the batch would never be ready)
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
    from ectrans.models.loader import choose_device  # as the executor was placed

    return CPU_MAX_PADDING if choose_device(settings.device or spec.device, spec).type == "cpu" else None


def model_settings(settings: WorkerSettings, spec: ModelSpec) -> WorkerSettings:
    """The worker's settings with the batching keys of `spec`'s registry entry in place."""
    return settings.model_copy(update=spec.batching) if spec.batching else settings


class WorkerState:
    """What the reader, the schedulers, completions and the peers' loops share."""

    def __init__(self) -> None:
        self.lanes: dict[str, ModelLane] = {}  # model → lane
        self.streams: dict[str, str] = {}  # stream → model
        # (stream, entry id) → monotonic time admitted, of every task this process holds (queued or
        # running): never admitted twice, and kept from looking abandoned (see `Peers.touch_loop`).
        self.held: dict[tuple[str, str], float] = {}
        self.inflight: set[asyncio.Task[None]] = set()  # batches running
        self.counts: Counter[str] = Counter()
        self.stopping = asyncio.Event()
        # Set when tasks leave the local queues: a reader whose prefetch is full waits on it.
        self.room = asyncio.Event()

    def local_backlog(self) -> int:
        return sum(len(lane.batcher) for lane in self.lanes.values())

    def lane_of(self, stream: str) -> ModelLane:
        return self.lanes[self.streams[stream]]

    def release(self, items: list[Pending]) -> None:
        for p in items:
            self.held.pop((p.stream, p.entry_id), None)
