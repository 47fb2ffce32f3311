"""What the metrics stream says, folded into per-interval windows and running totals — pure logic.

Entries come from three writers: a worker's `kind=batch` (one per executed batch) and
`kind=errors` (tasks it answered with an error), the dispatcher's `kind=errors` (tasks it
rejected), and the dead-letter stream (one entry per task given up on). Every terminal record a
client sees is counted exactly once across them, so totals match what was submitted.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from ectrans.common.keys import TASK_CLASSES

logger = logging.getLogger(__name__)

NONE = "none"  # label of a task rejected before its model or class was known
OTHER = "other"  # label of a model this node does not serve (keeps label values bounded)
DEADLINE = "deadline"  # the reason of tasks that expired before they ran


@dataclass(frozen=True)
class TaskEntry:
    """Terminal records of one (model, class), from one entry of the metrics or dead-letter stream."""

    model: str
    task_class: str
    tasks: int  # terminal records: results and errors
    errors: Counter[str] = field(default_factory=Counter)  # by reason
    batch_size: int = 0  # 0: not an executed batch
    tokens: int = 0
    padded_tokens: int = 0
    service_ms: float = 0.0  # the batch's run time, which each of its tasks waited for
    latencies_ms: tuple[float, ...] = ()
    queue_ms: tuple[float, ...] = ()
    late: int = 0  # tasks that finished after their deadline

    @property
    def ok(self) -> int:
        return self.tasks - sum(self.errors.values())

    @property
    def deadline_misses(self) -> int:
        return self.errors[DEADLINE] + self.late


@dataclass(frozen=True)
class Stopped:
    """A clean stop, announced by the heartbeat as it deletes its key."""

    service: str
    instance: str
    pid: int


def label_model(model: str, known: Iterable[str]) -> str:
    if not model:
        return NONE
    return model if model in known else OTHER


def label_class(task_class: str) -> str:
    return task_class if task_class in TASK_CLASSES else NONE


def _numbers(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def _reasons(text: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    for part in text.split(","):
        name, _, count = part.partition(":")
        if name and count.isdigit():
            counts[name] += int(count)
    return counts


def parse_metrics(fields: Mapping[str, str], known: Iterable[str]) -> TaskEntry | Stopped | None:
    """One entry of the metrics stream; None (and a debug line) for anything unreadable."""
    kind = fields.get("kind")
    try:
        if kind == "stopped":
            return Stopped(fields["service"], fields["instance"], int(fields.get("pid", 0)))
        model = label_model(fields.get("model", ""), known)
        task_class = label_class(fields.get("class", ""))
        errors = _reasons(fields.get("reasons", ""))
        if kind == "errors":
            return TaskEntry(model, task_class, tasks=sum(errors.values()), errors=errors)
        if kind == "batch":
            latencies = _numbers(fields.get("latency_ms", ""))
            size = int(fields.get("size", len(latencies)))
            return TaskEntry(
                model,
                task_class,
                tasks=size,
                errors=errors,
                batch_size=size,
                tokens=int(fields.get("tokens", 0)),
                padded_tokens=int(fields.get("padded_tokens", 0)),
                service_ms=float(fields.get("service_ms", 0)),
                latencies_ms=latencies,
                queue_ms=_numbers(fields.get("queue_ms", "")),
                late=int(fields.get("late", 0)),
            )
    except (KeyError, ValueError) as exc:
        logger.debug("unreadable metrics entry %r: %s", dict(fields), exc)
        return None
    logger.debug("metrics entry of unknown kind %r", kind)
    return None


def parse_dead_letter(fields: Mapping[str, str], known: Iterable[str]) -> TaskEntry:
    """One entry of the dead-letter stream: a task answered with a `dead_letter` error."""
    try:
        task = json.loads(fields.get("fields", "{}"))
    except ValueError:
        task = {}
    if not isinstance(task, dict):
        task = {}
    model = label_model(str(task.get("model", "")), known)
    return TaskEntry(model, label_class(str(task.get("class", ""))), tasks=1, errors=Counter(dead_letter=1))


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


@dataclass
class ClassWindow:
    """Everything seen for one (model, class) during one interval."""

    tasks: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    late: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    queue_ms: list[float] = field(default_factory=list)
    service_ms: list[float] = field(default_factory=list)  # one per executed task

    def add(self, entry: TaskEntry) -> None:
        self.tasks += entry.tasks
        self.errors += entry.errors
        self.late += entry.late
        self.tokens += entry.tokens
        self.padded_tokens += entry.padded_tokens
        if entry.batch_size:
            self.batches += 1
            self.batch_sizes.append(entry.batch_size)
            self.service_ms += [entry.service_ms] * entry.batch_size
        self.latencies_ms += entry.latencies_ms
        self.queue_ms += entry.queue_ms

    def merge(self, other: ClassWindow) -> None:
        self.tasks += other.tasks
        self.errors += other.errors
        self.late += other.late
        self.tokens += other.tokens
        self.padded_tokens += other.padded_tokens
        self.batches += other.batches
        self.batch_sizes += other.batch_sizes
        self.latencies_ms += other.latencies_ms
        self.queue_ms += other.queue_ms
        self.service_ms += other.service_ms

    @property
    def deadline_misses(self) -> int:
        return self.errors[DEADLINE] + self.late

    @property
    def padding_waste(self) -> float | None:
        """Share of the padded token slots that held padding."""
        return 1 - self.tokens / self.padded_tokens if self.padded_tokens else None

    @property
    def mean_batch(self) -> float | None:
        return sum(self.batch_sizes) / self.batches if self.batches else None


@dataclass
class Window:
    """All (model, class) windows of one interval."""

    classes: dict[tuple[str, str], ClassWindow] = field(default_factory=lambda: defaultdict(ClassWindow))

    def add(self, entry: TaskEntry) -> None:
        self.classes[(entry.model, entry.task_class)].add(entry)

    def by_class(self) -> dict[str, ClassWindow]:
        """Models merged: one window per class."""
        merged: dict[str, ClassWindow] = defaultdict(ClassWindow)
        for (_, task_class), w in self.classes.items():
            merged[task_class].merge(w)
        return dict(merged)


@dataclass
class ClassTotals:
    """Running totals of one (model, class) since the monitor started."""

    tasks: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    deadline_misses: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0


@dataclass
class Totals:
    classes: dict[tuple[str, str], ClassTotals] = field(default_factory=lambda: defaultdict(ClassTotals))

    def add(self, entry: TaskEntry) -> None:
        t = self.classes[(entry.model, entry.task_class)]
        t.tasks += entry.tasks
        t.ok += entry.ok
        t.errors += entry.errors
        t.deadline_misses += entry.deadline_misses
        t.tokens += entry.tokens
        t.padded_tokens += entry.padded_tokens
        t.batches += 1 if entry.batch_size else 0

    @property
    def tasks(self) -> int:
        return sum(t.tasks for t in self.classes.values())

    @property
    def errors(self) -> int:
        return sum(sum(t.errors.values()) for t in self.classes.values())

    def copy(self) -> Totals:
        return Totals(
            {
                key: ClassTotals(
                    t.tasks, t.ok, Counter(t.errors), t.deadline_misses, t.tokens, t.padded_tokens, t.batches
                )
                for key, t in self.classes.items()
            }
        )
