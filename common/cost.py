"""A model's batch cost, learned online from the batches workers actually serve.

Workers fit `service_ms ≈ overhead_ms + ms_per_token × padded_tokens` over their recent batches
and publish it; the dispatcher uses it to predict whether a real-time task can meet its deadline.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

MIN_SAMPLES = 8
ESTIMATED_CHARS_PER_TOKEN = 4.0


@dataclass(frozen=True)
class CostModel:
    overhead_ms: float
    ms_per_token: float
    segments: int = 1
    samples: int = 0
    max_batch_tokens: int = 0  # the largest batch seen: what a real-time task may find running
    processes: int = 1  # executor processes of one worker running batches side by side (shared weights)

    def batch_ms(self, padded_tokens: float) -> float:
        return self.overhead_ms + self.ms_per_token * padded_tokens

    def task_ms(self, tokens: float) -> float:
        """Device time one task of `tokens` takes in a busy pipeline: its own tokens plus its share of
        the batch overhead (the batch as large as the largest seen), over the segments that run at
        once (on a CPU each has its own threads; on a GPU they share the device, so this is a lower
        bound there), and over the worker's executor processes, which run batches side by side."""
        tokens = max(tokens, 1.0)
        batch = max(1.0, self.max_batch_tokens / tokens)
        return (self.ms_per_token * tokens + self.overhead_ms / batch) / max(self.segments * self.processes, 1)

    def tokens_within(self, ms: float) -> int | None:
        """Padded tokens of the largest batch predicted to run in `ms` (None: no per-token cost seen)."""
        if self.ms_per_token <= 0:
            return None
        return max(1, int((ms - self.overhead_ms) / self.ms_per_token))

    def to_fields(self) -> dict[str, str]:
        return {
            "overhead_ms": f"{self.overhead_ms:.4f}",
            "ms_per_token": f"{self.ms_per_token:.6f}",
            "segments": str(self.segments),
            "samples": str(self.samples),
            "max_batch_tokens": str(self.max_batch_tokens),
            "processes": str(self.processes),
        }

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> CostModel | None:
        try:
            return cls(
                float(fields["overhead_ms"]),
                float(fields["ms_per_token"]),
                int(fields.get("segments", 1)),
                int(fields.get("samples", 0)),
                int(fields.get("max_batch_tokens", 0)),
                int(fields.get("processes", 1)),
            )
        except (KeyError, ValueError):
            return None


class OnlineCost:
    """Least-squares fit over a sliding window of (padded tokens, service ms) observations."""

    def __init__(self, window: int = 128, segments: int = 1, processes: int = 1) -> None:
        self.observations: deque[tuple[float, float]] = deque(maxlen=window)
        self.segments = segments
        self.processes = processes

    def observe(self, padded_tokens: int, service_ms: float) -> None:
        if padded_tokens > 0 and service_ms > 0:
            self.observations.append((float(padded_tokens), service_ms))

    def model(self) -> CostModel | None:
        if len(self.observations) < MIN_SAMPLES:
            return None
        x, y = np.array(self.observations).T
        largest = int(x.max())
        if np.ptp(x) < 1e-9:  # one batch size only: no slope to fit, cost is proportional
            return CostModel(0.0, float(y.mean() / x.mean()), self.segments, len(x), largest, self.processes)
        slope, intercept = np.polyfit(x, y, 1)
        if slope <= 0:
            return CostModel(float(y.mean()), 0.0, self.segments, len(x), largest, self.processes)
        return CostModel(max(0.0, float(intercept)), float(slope), self.segments, len(x), largest, self.processes)


def estimate_tokens(text: str) -> int:
    """Rough token count from characters (the dispatcher loads no tokenizer)."""
    return math.ceil(len(text) / ESTIMATED_CHARS_PER_TOKEN) + 2


def predict_realtime_ms(cost: CostModel, task_tokens: int, queued_realtime: int, bulk_busy: bool = True) -> float:
    """Latency a real-time task should expect: the rest of the bulk segment running when it arrives
    (it cuts in at the next boundary; on average half a segment is left, none when no bulk work is
    queued or in flight), the real-time work queued ahead of it, then its own batch. The expectation,
    not the worst case: admission refuses tasks that should miss, not every task that might."""
    segment = cost.batch_ms(cost.max_batch_tokens) / max(cost.segments, 1)
    segment_in_progress = segment / 2 if bulk_busy else 0.0
    ahead = cost.ms_per_token * queued_realtime * task_tokens
    return segment_in_progress + ahead + cost.batch_ms(task_tokens)
