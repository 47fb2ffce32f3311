"""The two records the pool's routing and supervision share: a batch, and an executor process
position (a slot) with the batches it is running. Both are read and changed under the pool's lock."""

from __future__ import annotations

import concurrent.futures
import queue
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ectrans.models.api import BatchStats, ItemResult, Request
from ectrans.sharing.zygote import ChildProcess

BatchFuture = concurrent.futures.Future[tuple[list[ItemResult], BatchStats]]


@dataclass(eq=False)
class Batch:
    id: int
    request: Request
    future: BatchFuture
    attempts: int = 0  # deaths of an executor process while it ran this batch

    def frame(self) -> dict[str, Any]:
        request = self.request
        raw = {
            "op": request.op,
            "inputs": list(request.inputs),
            "params": request.params,
            "realtime": request.realtime,
            "segment": request.segment,
        }
        return {"op": "run", "id": self.id, "request": raw}


@dataclass(eq=False)
class Slot:
    """One executor process position; its process is replaced when it dies."""

    index: int
    state: str = "down"  # down → starting → ready ⇄ attaching; closing → closed
    generation: int = 0
    child: ChildProcess | None = None
    inflight: dict[int, Batch] = field(default_factory=dict)
    outbox: queue.SimpleQueue[dict[str, Any] | None] = field(default_factory=queue.SimpleQueue)
    info: dict[str, Any] = field(default_factory=dict)
    holder_generation: int = -1  # the holder it is attached to
    pending_generation: int = -1  # the holder it was last told to attach to
    deaths: deque[float] = field(default_factory=deque)
    restart_at: float = 0.0
    spawned_at: float = 0.0
    served: int = 0  # batches this position has completed, over all its processes
    holder_kill: bool = False  # killed by the pool because its holder died (CUDA)
    error: str | None = None

    def batch_load(self) -> int:
        return sum(1 for batch in self.inflight.values() if not batch.request.realtime)
