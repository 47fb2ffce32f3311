"""Encoder layers as TorchScript traces on the CPU: the same kernels, without the Python between them.

A small encoder's request on a CPU spends a good part of its time in the Python of each layer's
forward (module calls, the attention dispatch, reshapes), not in kernels: all-MiniLM-L6-v2, one
sentence at a time, traced layers take 0.85-0.89 of the eager layers' time (`ectrans bench
pipeline --quick`, part `traced`, measures it on the machine at hand). A trace records the aten
operations one call made and replays them from C++.

A trace is only as general as the call it recorded, so each layer is traced twice, with a 4-D mask
(a padded batch) and without one (no padding: the unsplit model passes None, and attention without
a mask is another kernel), and kept only if, after CHECK_CALLS calls at each check shape (the
profiling executor's optimised graph included), it matches the eager layer within RTOL/ATOL on
shapes other than the traced ones; otherwise every layer stays eager (logged at debug). Traces
share the layer's parameters (no copy: weights shared between processes stay shared).

`torch.jit.trace` is deprecated in favour of `torch.compile` and `torch.export`; compile needs a C++
toolchain and tens of seconds per shape family at start, an exported program runs as a Python
graph again. Where a torch has no `torch.jit.trace`, or a trace fails, layers run eager.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

logger = logging.getLogger(__name__)

LayerCall = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]

# (batch, tokens) of the traced examples, then of the checks: other sizes, other paddings.
TRACE_SHAPE = (2, 8)
CHECK_SHAPES = ((1, 5), (3, 13))
CHECK_CALLS = 3  # TorchScript's profiling executor optimises a graph after its first calls
RTOL, ATOL = 1e-4, 1e-5


class _Masked(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return layer_output(self.layer(hidden, mask))


class _Unmasked(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return layer_output(self.layer(hidden, None))


def layer_output(out: Any) -> torch.Tensor:
    """The hidden state a layer returns (some families return a tuple with it first)."""
    return out[0] if isinstance(out, tuple) else out  # type: ignore[no-any-return]


def eager_call(layer: nn.Module) -> LayerCall:
    return lambda hidden, mask: layer_output(layer(hidden, mask))


class TracedLayer:
    """One layer's two traces, picked by whether the batch has a mask."""

    def __init__(self, masked: Any, unmasked: Any) -> None:
        self.masked = masked
        self.unmasked = unmasked

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.unmasked(hidden) if mask is None else self.masked(hidden, mask)  # type: ignore[no-any-return]


def _quiet_trace_warnings() -> None:
    """The trace warns of values it records as constants (shape checks in the attention dispatch) and
    of its own deprecation; the checks below decide whether it holds. Filters for those messages only
    (adding one again moves it, nothing more): `catch_warnings` would swap the process's filters and
    mute other threads' warnings meanwhile."""
    tracer_warning = getattr(torch.jit, "TracerWarning", None)
    if tracer_warning is not None:
        warnings.filterwarnings("ignore", category=tracer_warning)
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.trace", category=DeprecationWarning)


def trace_layers(config: Any, layers: Sequence[nn.Module]) -> list[LayerCall] | None:
    """Traced calls for `layers` (see the module docstring), or None to run them eager."""
    trace = getattr(getattr(torch, "jit", None), "trace", None)
    if trace is None or not layers:
        return None
    first = next(layers[0].parameters())
    threads = torch.get_num_threads()
    # On one thread: a thread that has run a parallel operation keeps its OpenMP team, and a team
    # beyond the cores makes every other team's threads sleep between operations (slower requests).
    torch.set_num_threads(1)
    _quiet_trace_warnings()
    try:
        with torch.inference_mode():
            traced = [_trace_one(trace, config, layer, first.dtype, first.device) for layer in layers]
            for layer, call in zip(layers, traced, strict=True):
                problem = _mismatch(config, layer, call, first.dtype, first.device)
                if problem:
                    logger.debug("[models] layers stay eager: a trace differs from its layer (%s)", problem)
                    return None
    except Exception as exc:  # any failure only costs the speed-up
        logger.debug("[models] layers stay eager: tracing failed (%r)", exc)
        return None
    finally:
        torch.set_num_threads(threads)
    return list(traced)


def _example(
    config: Any, batch: int, tokens: int, dtype: torch.dtype, device: torch.device, *, padded: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A hidden state and its 4-D mask as the encoder builds it (None without padding)."""
    generator = torch.Generator().manual_seed(batch * 1000 + tokens)
    hidden = torch.randn(batch, tokens, config.hidden_size, generator=generator).to(dtype=dtype, device=device)
    mask_2d = torch.ones(batch, tokens, dtype=torch.long, device=device)
    if padded:
        mask_2d[-1, tokens // 2 :] = 0  # the last row padded: rows of different lengths
    mask = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=mask_2d)
    return hidden, mask


def _trace_one(trace: Any, config: Any, layer: nn.Module, dtype: torch.dtype, device: torch.device) -> TracedLayer:
    hidden, mask = _example(config, *TRACE_SHAPE, dtype, device, padded=True)
    if mask is None:
        raise ValueError("the model's attention takes no 4-D mask for a padded batch")
    masked = trace(_Masked(layer), (hidden, mask), check_trace=False)
    unmasked = trace(_Unmasked(layer), (hidden,), check_trace=False)
    return TracedLayer(masked, unmasked)


def _mismatch(config: Any, layer: nn.Module, call: LayerCall, dtype: torch.dtype, device: torch.device) -> str:
    """'' when `call` matches the eager layer on the check shapes, padded and not; else what differs."""
    eager = eager_call(layer)
    for batch, tokens in CHECK_SHAPES:
        for padded in (False, True):
            hidden, mask = _example(config, batch, tokens, dtype, device, padded=padded)
            expected = eager(hidden, mask)
            for _ in range(CHECK_CALLS):
                got = call(hidden, mask)
            if got.shape != expected.shape or not torch.allclose(got.float(), expected.float(), rtol=RTOL, atol=ATOL):
                return f"batch {batch}, {tokens} tokens, padded={padded}"
    return ""
