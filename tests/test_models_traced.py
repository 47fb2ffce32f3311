"""Traced encoder layers: the eager layer's outputs, its parameters (no copy), and eager whenever a
trace does not hold."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from torch import nn

from ectrans.common.registry import build_spec
from ectrans.models import traced
from ectrans.models.api import Request
from ectrans.models.encoder import EncoderSegment, encoder_parts
from ectrans.models.loader import load_executor, load_model
from ectrans.models.pipeline import PipelinedExecutor
from ectrans.models.traced import TracedLayer, trace_layers
from tests.tiny_encoders import SENTENCES, make_tiny_bert, one_torch_thread

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("traced") / "bert")


def _parts(path: Path) -> Any:
    return encoder_parts(load_model(build_spec("tiny", {"path": str(path)}), CPU))


def test_traces_share_the_layers_parameters(bert: Path) -> None:
    parts = _parts(bert)
    calls = trace_layers(parts.config, list(parts.layers))
    assert calls is not None and all(isinstance(call, TracedLayer) for call in calls)
    for layer, call in zip(parts.layers, calls, strict=True):
        assert isinstance(call, TracedLayer)
        mine = {p.data_ptr() for p in layer.parameters()}
        for trace in (call.masked, call.unmasked):
            assert {p.data_ptr() for p in trace.parameters()} == mine


class ShapeDependent(nn.Module):
    """Takes a branch on the batch's length: a trace records one branch and holds for one length."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor]:
        out = self.linear(hidden)
        return (out * 2 if hidden.shape[1] > 8 else out,)


def test_a_trace_that_does_not_hold_leaves_every_layer_eager(bert: Path) -> None:
    parts = _parts(bert)
    layers = [*parts.layers[:-1], ShapeDependent(parts.config.hidden_size)]
    assert trace_layers(parts.config, layers) is None
    assert trace_layers(parts.config, list(parts.layers)) is not None  # the model's own layers hold


def test_a_failing_trace_leaves_layers_eager(bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = _parts(bert)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no tracing here")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    assert trace_layers(parts.config, list(parts.layers)) is None


def test_executor_outputs_are_the_same_traced_or_eager(bert: Path) -> None:
    spec = build_spec("tiny", {"path": str(bert)})
    outputs = {}
    for trace in (True, False):
        executor = load_executor(spec, device="cpu", threads=1, trace=trace)
        assert isinstance(executor, PipelinedExecutor)
        try:
            assert bool(cast(EncoderSegment, executor.segments[0]).parts.calls) == trace
            # Padded batches, a batch of one (no mask), and one past the traced examples' sizes.
            batches = [SENTENCES, SENTENCES[:1], SENTENCES * 3]
            outputs[trace] = [
                [r.output for r in executor.submit(Request("embed", batch, {}, False, 0)).result()[0]]
                for batch in batches
            ]
        finally:
            executor.close()
    for got, expected in zip(outputs[True], outputs[False], strict=True):
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            assert torch.allclose(torch.as_tensor(a), torch.as_tensor(b), atol=1e-6)


def test_check_shapes_differ_from_the_traced_one() -> None:
    """The checks must see other sizes than the trace, or a baked shape would pass them."""
    assert all(shape != traced.TRACE_SHAPE for shape in traced.CHECK_SHAPES)
    assert len({tokens for _, tokens in traced.CHECK_SHAPES}) == len(traced.CHECK_SHAPES)
