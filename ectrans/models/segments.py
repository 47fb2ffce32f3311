"""The segment contract: a model is a chain of segments, each taking and returning a `SegmentState`.

Stage 0 (tokenisation) builds the first state from texts; each segment transforms `hidden` and
carries the 2-D `mask`; the last segment fills `outputs` (one entry per input). Segments never
keep per-batch state outside the `SegmentState`, so a batch can be parked between segments and
resumed later (real-time cut-in).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class SegmentState:
    """A batch between two segments."""

    hidden: torch.Tensor | None  # [batch, tokens, hidden]; None before the embeddings
    mask: torch.Tensor  # [batch, tokens], 1 for real tokens, 0 for padding (the 2-D mask)
    input_ids: torch.Tensor  # [batch, tokens]
    params: dict[str, Any] = field(default_factory=dict)  # op options (num_beams, max_new_tokens, ...)
    extras: dict[str, Any] = field(default_factory=dict)  # model-specific carry-over
    outputs: list[Any] | None = None  # set by the last segment
    # Units of the model's split chain already run (by a client, for a split task): segments skip them.
    start: int = 0

    def nbytes(self) -> int:
        """Activation memory held by this state (for bounding parked batches), including what
        extras hold inside objects that list their tensors (a generation search's KV cache)."""
        tensors: list[object] = [self.hidden, self.mask, self.input_ids]
        for value in self.extras.values():
            holds = getattr(value, "tensors", None)
            tensors.extend(holds() if callable(holds) else [value])
        return sum(t.element_size() * t.nelement() for t in tensors if isinstance(t, torch.Tensor))


class Segment(Protocol):
    """One contiguous piece of a model."""

    name: str
    # Indices of the model's layers this segment runs (empty for embeddings/heads).
    layers: tuple[int, ...]

    def __call__(self, state: SegmentState) -> SegmentState: ...
