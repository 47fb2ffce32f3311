"""Routing of a pool's batches to its executor processes.

A batch waits in the pool until the ready executor process with the fewest outstanding batches
takes it: real-time batches first and never held back; at most `queue_depth` batch-class batches
per process, so the rest stay in the pool, free to go to whichever process frees up first. A batch
whose process died goes back to the front of its queue. Every method here runs under the pool's
lock; completing a future (`complete`, `fail`) runs outside it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from ectrans.models.api import BatchStats, ItemResult, Request
from ectrans.sharing.slots import Batch, BatchFuture, Slot


class Router:
    """The batches waiting for an executor process, and the policy that hands them out."""

    def __init__(self, queue_depth: int) -> None:
        self.queue_depth = queue_depth
        self._realtime: deque[Batch] = deque()
        self._batch: deque[Batch] = deque()
        self._next_id = 0

    def add(self, request: Request, future: BatchFuture) -> None:
        batch = Batch(self._next_id, request, future)
        self._next_id += 1
        (self._realtime if request.realtime else self._batch).append(batch)

    def dispatch(self, slots: Sequence[Slot]) -> None:
        """Send waiting batches to ready slots, as the module docstring says."""
        ready = [s for s in slots if s.state == "ready"]
        while ready and (self._realtime or self._batch):
            realtime = bool(self._realtime)
            candidates = ready if realtime else [s for s in ready if s.batch_load() < self.queue_depth]
            if not candidates:
                return
            slot = min(candidates, key=lambda s: (len(s.inflight), s.index))
            batch = (self._realtime if realtime else self._batch).popleft()
            slot.inflight[batch.id] = batch
            slot.outbox.put(batch.frame())

    def requeue(self, batches: Sequence[Batch]) -> None:
        """Put batches back at the front of their queues, in the order they were submitted."""
        for batch in sorted(batches, key=lambda b: b.id, reverse=True):
            (self._realtime if batch.request.realtime else self._batch).appendleft(batch)

    def take_waiting(self) -> list[Batch]:
        """Every batch not yet sent to a process (to fail them)."""
        batches = [*self._realtime, *self._batch]
        self._realtime.clear()
        self._batch.clear()
        return batches

    def take_all(self, slots: Sequence[Slot]) -> list[Batch]:
        """Every batch waiting or running (to fail them)."""
        batches = self.take_waiting()
        for slot in slots:
            batches.extend(slot.inflight.values())
            slot.inflight.clear()
        return batches

    def pending(self, slots: Sequence[Slot]) -> bool:
        """Whether any batch is waiting or running."""
        return bool(self._realtime or self._batch or any(s.inflight for s in slots))


def complete(batch: Batch, message: dict[str, Any]) -> None:
    """Complete a batch's future from its executor process's `result` or `failed` report."""
    if batch.future.done():
        return
    if message.get("ev") == "failed":
        batch.future.set_exception(RuntimeError(str(message.get("error"))))
        return
    results = [ItemResult(output=_writable(output), error=error) for output, error in message["results"]]
    size, tokens, padded, service_ms, compute_ms = message["stats"]
    stats = BatchStats(int(size), int(tokens), int(padded), float(service_ms), float(compute_ms))
    batch.future.set_result((results, stats))


def fail(batch: Batch, error: Exception) -> None:
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        batch.future.set_exception(error)


def _writable(value: Any) -> Any:
    """Arrays decoded from a frame are read-only views of it; give callers what an in-process
    executor gives."""
    return value.copy() if isinstance(value, np.ndarray) else value
