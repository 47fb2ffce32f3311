"""Forming batches from a worker's local queues — pure logic, no Redis, no torch.

Real-time tasks go first, in small batches after a short wait. Batch-class tasks are packed for
throughput: the task with the highest response ratio, (wait + predicted service) / predicted
service, anchors the batch so that no long job starves; it is filled with the tasks closest to it
in length until the token budget (batch × padded length) or the batch size is reached, which
keeps padding waste low. Where padding costs compute in proportion (a CPU), `max_padding` also
bounds it past the first PADDING_FREE_TASKS tasks: a task that would pad a larger batch beyond
that share of its real tokens waits for a batch of its own length (the next one, formed as the
device frees up), so a queue that fits one batch (32 clients' sentences of every length) runs as
length-sorted batches, not one batch padded to the longest, while a few clients still share one
batch (more, smaller batches would cost more in per-batch work than their padding).

When the model's executor is paced, the worker passes `bulk_due`: the moment its first segment is
about to be free. A bulk batch is then formed at that moment from everything queued (or at once
when full), not after `max_wait_s`: formed earlier, it would only wait inside the executor while
tasks arriving meanwhile wait for the one after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ectrans.common.schemas import Task

ALL_CLASSES = frozenset({"realtime", "batch"})
# The time cap on bulk batches holds this long after the last real-time task arrived: it bounds what a
# real-time batch may wait behind, and only costs bulk throughput when there is none to protect. Long,
# so that a node serving real-time work at all keeps it between arrivals; the first real-time task
# after a longer bulk-only stretch may wait for one uncapped segment (admission sees that cost).
CAP_HOLD_S = 60.0
PADDING_FREE_TASKS = 8  # a bulk batch takes its closest tasks up to this many whatever their padding


@dataclass
class Pending:
    """A task read from a model queue, waiting in the worker for a batch."""

    entry_id: str
    stream: str
    task: Task
    tokens: int
    arrived: float  # monotonic seconds when read from Redis


@dataclass(frozen=True)
class BatchPolicy:
    max_batch: int
    max_wait_s: float
    token_budget: int = 8192
    max_padding: float | None = None  # padded tokens ≤ (1 + this) × real tokens in packed batches; None: any


@dataclass
class Batch:
    task_class: str
    items: list[Pending]

    @property
    def tokens(self) -> int:
        return sum(p.tokens for p in self.items)

    @property
    def padded_tokens(self) -> int:
        return len(self.items) * max((p.tokens for p in self.items), default=0)


def response_ratio(pending: Pending, now: float, seconds_per_token: float) -> float:
    """HRRN priority: grows with waiting time, starts higher for shorter jobs."""
    service = max(pending.tokens, 1) * seconds_per_token
    return (now - pending.arrived + service) / service


@dataclass
class Batcher:
    """Local queues of one model and the policy that turns them into batches."""

    realtime: BatchPolicy
    batch: BatchPolicy
    fifo: bool = False
    seconds_per_token: float = 1e-3  # refined from the model's latency profile when known
    # Packed batches stay under this many padded tokens (set from the model's fitted cost), so one
    # segment of bulk work - what a real-time batch may wait behind - stays short. None: no cap.
    # It applies while real-time work is about (see CAP_HOLD_S).
    batch_token_cap: int | None = None
    realtime_seen: float | None = None  # when the latest real-time task arrived
    queues: dict[str, list[Pending]] = field(default_factory=lambda: {"realtime": [], "batch": []})

    def add(self, pending: Pending) -> None:
        # FIFO mode keeps one queue in arrival order: the baseline the scheduler is compared against.
        self.queues["batch" if self.fifo else pending.task.task_class].append(pending)
        if pending.task.task_class == "realtime":
            self.realtime_seen = max(pending.arrived, self.realtime_seen or pending.arrived)

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def take_expired(self, now_ms: int) -> list[Pending]:
        """Remove and return tasks whose deadline has passed while queued."""
        expired: list[Pending] = []
        for name, queue in self.queues.items():
            keep: list[Pending] = []
            for p in queue:
                deadline = p.task.deadline_at_ms
                (expired if deadline is not None and now_ms >= deadline else keep).append(p)
            self.queues[name] = keep
        return expired

    def take_all(self) -> list[Pending]:
        items = [p for q in self.queues.values() for p in q]
        for q in self.queues.values():
            q.clear()
        return items

    @property
    def packed_budget(self) -> int:
        """Padded tokens a packed batch may hold: the token budget, lowered by the time cap."""
        cap = self.batch_token_cap
        return self.batch.token_budget if cap is None else max(1, min(self.batch.token_budget, cap))

    def cap_in_force(self, now: float) -> bool:
        """Whether the time cap applies at `now`: while real-time work is about."""
        recent = self.realtime_seen is not None and now - self.realtime_seen < CAP_HOLD_S
        return self.batch_token_cap is not None and (recent or bool(self.queues["realtime"]))

    def budget_at(self, now: float) -> int:
        """The packed budget at `now`: lowered by the time cap while it is in force."""
        return self.packed_budget if self.cap_in_force(now) else self.batch.token_budget

    def _ready(
        self, queue: list[Pending], policy: BatchPolicy, now: float, idle: bool = False, due: float | None = None
    ) -> bool:
        if not queue:
            return False
        timed_out = now - queue[0].arrived >= policy.max_wait_s if due is None else now >= due
        if idle or len(queue) >= policy.max_batch or timed_out:
            return True
        budget = self.budget_at(now) if policy is self.batch and not self.fifo else policy.token_budget
        return sum(p.tokens for p in queue) >= budget

    def wait_hint(
        self,
        now: float,
        free: set[str] | frozenset[str] = ALL_CLASSES,
        *,
        idle: bool = False,
        bulk_due: float | None = None,
    ) -> float | None:
        """Seconds until a queue of a class in `free` becomes ready by age (the batch class by
        `bulk_due` when given); None when there is none."""
        hints = [
            0.0 if idle else max(0.0, self._due(name, queue, policy, bulk_due) - now)
            for name, policy in (("realtime", self.realtime), ("batch", self.batch))
            if (queue := self.queues[name]) and name in free
        ]
        return min(hints) if hints else None

    @staticmethod
    def _due(name: str, queue: list[Pending], policy: BatchPolicy, bulk_due: float | None) -> float:
        return bulk_due if name == "batch" and bulk_due is not None else queue[0].arrived + policy.max_wait_s

    def next_batch(
        self,
        now: float,
        free: set[str] | frozenset[str] = ALL_CLASSES,
        *,
        idle: bool = False,
        bulk_due: float | None = None,
    ) -> Batch | None:
        """The next batch to run, among classes with a free in-flight slot (`free`).

        `idle` says the model has no batch in flight: then waiting for batch-mates only leaves the
        device unused, so whatever is queued goes at once (work-conserving batching: under load the
        device is busy and batches fill while it works; a lone task at low load does not wait).
        `bulk_due`: when the batch class is ready, instead of its `max_wait_s` (a paced executor).
        """
        rt = self.queues["realtime"]
        if "realtime" in free and self._ready(rt, self.realtime, now, idle):
            return Batch("realtime", self._take_fifo(rt, self.realtime))
        queue = self.queues["batch"]
        if "batch" not in free or not self._ready(queue, self.batch, now, idle, bulk_due):
            return None
        if self.fifo:
            return Batch("fifo", self._take_fifo(queue, self.batch))
        return Batch("batch", self._take_packed(queue, now))

    def _take_fifo(self, queue: list[Pending], policy: BatchPolicy) -> list[Pending]:
        taken: list[Pending] = []
        longest = 0
        while queue and len(taken) < policy.max_batch:
            longest = max(longest, queue[0].tokens)
            if taken and longest * (len(taken) + 1) > policy.token_budget:
                break
            taken.append(queue.pop(0))
        return taken

    def _take_packed(self, queue: list[Pending], now: float) -> list[Pending]:
        anchor = max(queue, key=lambda p: response_ratio(p, now, self.seconds_per_token))
        by_closeness = sorted(queue, key=lambda p: (abs(p.tokens - anchor.tokens), p.arrived))
        taken: list[Pending] = []
        longest = real = 0
        budget = self.budget_at(now)
        padding = self.batch.max_padding
        for candidate in by_closeness:
            if len(taken) >= self.batch.max_batch:
                break
            new_longest = max(longest, candidate.tokens)
            padded = new_longest * (len(taken) + 1)
            if taken and padded > budget:
                continue
            too_padded = padding is not None and padded > (1 + padding) * (real + candidate.tokens)
            if len(taken) >= PADDING_FREE_TASKS and too_padded:
                continue
            taken.append(candidate)
            longest = new_longest
            real += candidate.tokens
        chosen = {id(p) for p in taken}
        queue[:] = [p for p in queue if id(p) not in chosen]
        return taken
