"""The contract between the worker service and the model layer.

The worker forms batches and submits them; the executor runs them off the event loop (threads,
CUDA streams) and completes a future per batch, one `ItemResult` per input, in input order.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ectrans.common.registry import ModelSpec


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
    compute_ms: float = 0.0  # the segments' own run time (on CUDA from events on their streams)


class Executor(Protocol):
    spec: ModelSpec

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Token counts as the model's tokenizer sees them (for packing and admission)."""
        ...

    def submit(self, request: Request) -> concurrent.futures.Future[tuple[list[ItemResult], BatchStats]]:
        """Queue a batch; the future completes with one result per input, in order."""
        ...

    def close(self) -> None:
        """Finish queued batches, then release threads and memory."""
        ...
