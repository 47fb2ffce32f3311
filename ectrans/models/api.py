"""The contract between the worker service and the model layer.

The worker forms batches and submits them; the executor runs them off the event loop (threads,
CUDA streams) and completes a future per batch, one `ItemResult` per input, in input order.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ectrans.common.registry import ModelSpec

logger = logging.getLogger(__name__)


@dataclass
class Request:
    """One batch of inputs for one op of one model: texts, or for `segment` k > 0 the split payloads
    of clients that ran the model's first k units themselves (see `ectrans.common.split`)."""

    op: str
    inputs: Sequence[str | bytes]
    params: dict[str, Any] = field(default_factory=dict)
    realtime: bool = False
    segment: int = 0


@dataclass
class ItemResult:
    """The outcome for one input: `output` on success, else `error` (a human-readable reason).

    `embed` gives a float32 numpy vector; `translate`/`generate` give {"text": str, "token_ids": [int]};
    `noop` gives {"chars": int}.
    """

    output: Any = None
    error: str | None = None


@dataclass
class BatchStats:
    """What one batch cost, for the monitor."""

    batch_size: int
    tokens: int
    padded_tokens: int
    service_ms: float  # submitted to done, waits between stages included
    # The segments' own run time, as on their own stages' threads (on CUDA from events on their
    # streams): what one segment of a batch holds a real-time batch back.
    compute_ms: float = 0.0


class Executor(Protocol):
    """What the worker uses of a model. In-process executors subclass it for the defaults below
    (one process, one segment, not paced, no memory of their own to report); the executor of
    several processes (`ectrans.sharing.process_pool`) overrides them."""

    spec: ModelSpec
    # Processes that run batches side by side: the worker allows this many times its in-flight limit.
    processes: int = 1
    # Real-time batches run beside bulk work instead of cutting in between its segments (admission's
    # prediction, ectrans.common.cost).
    realtime_lane: bool = False

    @property
    def segment_count(self) -> int:
        """Segments a batch runs through one after another (the worker fits a cost per segment)."""
        return 1

    def pacing(self) -> Paced | None:
        """This executor if it tells the worker when it needs its next bulk batch (`Paced`), else None."""
        return None

    def memory(self) -> dict[str, Any]:
        """Memory figures of the processes this executor runs, for the worker's heartbeat
        (`ectrans.sharing.memory.heartbeat_fields`); empty for an in-process executor."""
        return {}

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Token counts as the model's tokenizer sees them (for packing and admission)."""
        ...

    def submit(self, request: Request) -> concurrent.futures.Future[tuple[list[ItemResult], BatchStats]]:
        """Queue a batch; the future completes with one result per input, in order."""
        ...

    def close(self) -> None:
        """Finish queued batches, then release threads and memory."""
        ...


@dataclass(frozen=True)
class FrontSegment:
    """The bulk batch a paced executor's first segment is running (what the next batch will follow)."""

    started: float  # time.monotonic() when the segment started it
    padded_tokens: int
    # The share of the batch's cost (`BatchStats.compute_ms`, as fitted) that keeps the segment busy:
    # 1/N of N segments; when it runs every segment there on all threads, 1 / their measured speedup.
    share: float = 1.0


@runtime_checkable
class Paced(Protocol):
    """An executor that tells the worker when it is about to need its next bulk batch.

    The worker then forms that batch as late as it can, from everything queued by then, instead of
    handing the executor small batches early that would only wait inside it."""

    def bulk_waiting(self) -> int:
        """Bulk batches submitted that the first segment has not started yet."""
        ...

    def front_segment(self) -> FrontSegment | None:
        """The bulk batch the first segment runs now; None while it runs none."""
        ...

    def on_progress(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` (from the executor's threads) whenever the first segment starts or leaves
        a bulk batch; returns the function that stops it."""
        ...

    def watch_backlog(self, queued: Callable[[], int]) -> None:
        """`queued()` (called from the executor's threads) counts the bulk work the worker holds
        back for this executor (queued tasks it has a batch slot for, batches being formed): work the
        executor cannot see yet, but will get as soon as its first segment is free (e.g. a CPU
        pipeline then runs a batch on its stage's threads, not alone)."""
        ...


class ProgressCallbacks:
    """The callbacks of `Paced.on_progress`, called from executor threads; one that fails is logged
    and never stops the thread that called it."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[[], None]] = []

    def add(self, callback: Callable[[], None]) -> Callable[[], None]:
        self._callbacks.append(callback)

        def remove() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return remove

    def __call__(self) -> None:
        for callback in list(self._callbacks):
            try:
                callback()
            except Exception:
                logger.exception("[models] progress callback failed")
