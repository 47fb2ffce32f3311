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
# A real-time lane's thread shares a core with a bulk stage's (ectrans.models.pipeline): about half
# of one while bulk work runs.
SHARED_CORE_SLOWDOWN = 2.0


@dataclass(frozen=True)
class CostModel:
    overhead_ms: float
    ms_per_token: float
    segments: int = 1
    samples: int = 0
    max_batch_tokens: int = 0  # the largest batch seen: what a real-time task may find running
    processes: int = 1  # executor processes of one worker running batches side by side (shared weights)
    realtime_lane: bool = False  # real-time batches run beside bulk work instead of cutting in (a CPU)

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
            "realtime_lane": "1" if self.realtime_lane else "0",
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
                fields.get("realtime_lane") == "1",
            )
        except (KeyError, ValueError):
            return None


class OnlineCost:
    """Least-squares fit over a sliding window of (padded tokens, service ms) observations."""

    def __init__(self, window: int = 128, segments: int = 1, processes: int = 1, realtime_lane: bool = False) -> None:
        self.observations: deque[tuple[float, float]] = deque(maxlen=window)
        self.segments = segments
        self.processes = processes
        self.realtime_lane = realtime_lane

    def observe(self, padded_tokens: int, service_ms: float) -> None:
        if padded_tokens > 0 and service_ms > 0:
            self.observations.append((float(padded_tokens), service_ms))

    def model(self) -> CostModel | None:
        if len(self.observations) < MIN_SAMPLES:
            return None
        x, y = np.array(self.observations).T

        def fitted(overhead_ms: float, ms_per_token: float) -> CostModel:
            largest = int(x.max())
            return CostModel(
                overhead_ms, ms_per_token, self.segments, len(x), largest, self.processes, self.realtime_lane
            )

        if np.ptp(x) < 1e-9:  # one batch size only: no slope to fit, cost is proportional
            return fitted(0.0, float(y.mean() / x.mean()))
        slope, intercept = np.polyfit(x, y, 1)
        if slope <= 0:
            return fitted(float(y.mean()), 0.0)
        return fitted(max(0.0, float(intercept)), float(slope))


def estimate_tokens(text: str) -> int:
    """Rough token count from characters (the dispatcher loads no tokenizer)."""
    return math.ceil(len(text) / ESTIMATED_CHARS_PER_TOKEN) + 2


def predict_realtime_ms(cost: CostModel, task_tokens: int, queued_realtime: int, bulk_busy: bool = True) -> float:
    """Latency a real-time task should expect: the real-time work queued ahead of it and its own
    batch, after the rest of the bulk segment running when it arrives where it cuts in at the next
    boundary (on average half a segment is left; none when no bulk work is queued or in flight), or
    on a shared core where it runs in a lane beside bulk work (a CPU). The expectation, not the worst
    case: admission refuses tasks that should miss, not every task that might."""
    own = cost.ms_per_token * queued_realtime * task_tokens + cost.batch_ms(task_tokens)
    if not bulk_busy:
        return own
    if cost.realtime_lane:
        return own * SHARED_CORE_SLOWDOWN
    segment = cost.batch_ms(cost.max_batch_tokens) / max(cost.segments, 1)
    return segment / 2 + own
