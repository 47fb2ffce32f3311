"""Stage 0 of a split task: the payloads of clients that ran a model's first units become one batch.

Each payload holds one sequence, unpadded (see `ectrans.common.split`); the batch pads them on the
right to the longest, with the padding masked, so every real token's result equals the unsplit run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ectrans.common.registry import ModelSpec
from ectrans.common.split import EMBED, Activation, SplitError, check_point, unpack_activation
from ectrans.models.segments import SegmentState


@dataclass(frozen=True)
class Resume:
    """What the model needs to resume split tasks."""

    spec: ModelSpec
    dtype: torch.dtype  # the model's: float16 payloads of a float32 model are widened, and back
    pad_token_id: int
    max_tokens: int
    check_params: Callable[[dict[str, Any]], object] | None = None  # a decoder rejects bad params up front

    def decode(self, payload: str | bytes, segment: int) -> Activation:
        """One payload, checked against the model (SplitError says what is wrong)."""
        if not isinstance(payload, bytes):
            raise TypeError(f"a split input must be bytes, not {type(payload).__name__}")
        check_point(segment, self.spec.num_layers, self.spec.name)
        activation = unpack_activation(payload)
        if activation.segment != segment:
            raise SplitError(f"the payload holds the state at split point {activation.segment}, not {segment}")
        activation.check(segment, self.spec, self.max_tokens)
        return activation

    def __call__(self, activations: Sequence[Activation], params: dict[str, Any], segment: int) -> SegmentState:
        if self.check_params is not None:
            self.check_params(params)
        tokens = max(a.tokens for a in activations)
        batch = len(activations)
        mask = torch.zeros(batch, tokens, dtype=torch.long)
        ids = torch.full((batch, tokens), self.pad_token_id, dtype=torch.long)
        types = torch.zeros(batch, tokens, dtype=torch.long) if any(a.types is not None for a in activations) else None
        hidden = torch.zeros(batch, tokens, self.spec.hidden_size, dtype=self.dtype) if segment > EMBED else None
        for row, activation in enumerate(activations):
            length = activation.tokens
            mask[row, :length] = 1
            if activation.ids is not None:
                ids[row, :length] = torch.from_numpy(activation.ids.astype(np.int64))
            if types is not None and activation.types is not None:
                types[row, :length] = torch.from_numpy(activation.types.astype(np.int64))
            if hidden is not None and activation.hidden is not None:
                hidden[row, :length] = torch.from_numpy(np.array(activation.hidden)).to(self.dtype)
        extras = {"token_type_ids": types} if types is not None and self.spec.kind == "encoder" else {}
        return SegmentState(hidden=hidden, mask=mask, input_ids=ids, params=dict(params), extras=extras, start=segment)
