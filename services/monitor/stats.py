"""Aggregating what workers report into per-interval figures — pure logic, no Redis."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ClassWindow:
    """Everything seen for one (model, class) during one interval."""

    tasks: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    queue_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    def percentile(self, q: float, values: list[float] | None = None) -> float | None:
        data = self.latencies_ms if values is None else values
        return float(np.percentile(data, q)) if data else None

    @property
    def padding_waste(self) -> float | None:
        return 1 - self.tokens / self.padded_tokens if self.padded_tokens else None

    @property
    def mean_batch(self) -> float | None:
        return self.tasks / self.batches if self.batches else None


def _numbers(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _reasons(text: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    for part in text.split(","):
        name, _, count = part.partition(":")
        if name and count.isdigit():
            counts[name] += int(count)
    return counts


@dataclass
class Window:
    """All (model, class) windows of one interval."""

    classes: dict[tuple[str, str], ClassWindow] = field(default_factory=lambda: defaultdict(ClassWindow))

    def add(self, fields: dict[str, str]) -> None:
        """Fold in one entry of the metrics stream (written by a worker or the dispatcher)."""
        model = fields.get("model", "?")
        kind = fields.get("kind")
        window = self.classes[(model, fields.get("class", "error"))]
        if kind == "batch":
            latencies = _numbers(fields.get("latency_ms", ""))
            window.tasks += len(latencies)
            window.batches += 1
            window.tokens += int(fields.get("tokens", 0))
            window.padded_tokens += int(fields.get("padded_tokens", 0))
            window.latencies_ms += latencies
            window.queue_ms += _numbers(fields.get("queue_ms", ""))
        window.errors += _reasons(fields.get("reasons", ""))

    def by_class(self) -> dict[str, ClassWindow]:
        """Merge models: one window per class."""
        merged: dict[str, ClassWindow] = defaultdict(ClassWindow)
        for (_, task_class), w in self.classes.items():
            m = merged[task_class]
            m.tasks += w.tasks
            m.tokens += w.tokens
            m.padded_tokens += w.padded_tokens
            m.batches += w.batches
            m.latencies_ms += w.latencies_ms
            m.queue_ms += w.queue_ms
            m.errors += w.errors
        return dict(merged)
