"""One batch on its way through the pipeline: preparing it (stage 0), collecting its results (last
stage), and the bookkeeping its `SegmentState` needs between stages (device, streams, bytes)."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch

from ectrans.common.registry import ModelSpec
from ectrans.common.split import SplitError
from ectrans.models.api import BatchStats, ItemResult, Request
from ectrans.models.inputs import input_error, noop_output
from ectrans.models.results import to_python
from ectrans.models.resume import Resume
from ectrans.models.segments import SegmentState

BatchFuture = concurrent.futures.Future[tuple[list[ItemResult], BatchStats]]


class Tokenize(Protocol):
    """Stage 0: texts to the first `SegmentState`, and token counts for the worker's packing."""

    def __call__(self, texts: list[str], params: dict[str, Any]) -> SegmentState: ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]: ...


class UnservableError(ValueError):
    """The whole batch asks for something the model does not do (an op it does not serve)."""


@dataclass(eq=False)
class Job:
    """A submitted batch. `results` holds per-input errors from the start and outputs at the end;
    `positions` are the inputs that run through the segments, in the order of the state's rows."""

    id: int
    request: Request
    future: BatchFuture
    results: list[ItemResult | None] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    state: SegmentState | None = None
    started: float = 0.0
    tokens: int = 0
    padded_tokens: int = 0
    nbytes: int = 0  # activation bytes, measured when parked
    compute_ms: float = 0.0  # run time of its segments so far
    ready: Any = None  # torch.cuda.Event recorded after the last segment that ran it
    # (start, end) timing events of each segment run on a CUDA stream: compute time without the
    # waits between stages, read once the last event has completed
    spans: list[tuple[Any, Any]] = field(default_factory=list)

    @property
    def realtime(self) -> bool:
        return self.request.realtime

    def prepare(self, spec: ModelSpec, tokenize: Tokenize, resume: Resume | None = None) -> list[ItemResult] | None:
        """Stage 0. The final results when no model work is needed (the no-op op, no valid input),
        else None with `state` set. Raises `UnservableError` for an op the model does not serve."""
        self.started = time.perf_counter()
        request = self.request
        if not spec.supports(request.op):
            raise UnservableError(f"model {spec.name!r} does not serve op {request.op!r}")
        if request.op == "noop":
            return [ItemResult(output=noop_output(text)) for text in request.inputs]
        self.results = [None] * len(request.inputs)
        if request.segment:
            self.state = self._resume(spec, resume)
        else:
            for index, text in enumerate(request.inputs):
                problem = input_error(text)
                if problem is None:
                    self.positions.append(index)
                else:
                    self.results[index] = ItemResult(error=problem)
            self.state = self._tokenize_isolating_errors(tokenize) if self.positions else None
        if self.state is None:
            return self.final_results()
        self.tokens = int(self.state.mask.sum())
        self.padded_tokens = self.state.mask.numel()
        return None

    def _resume(self, spec: ModelSpec, resume: Resume | None) -> SegmentState | None:
        """A batch of split tasks: their payloads as the state after the client's units."""
        if resume is None:
            raise UnservableError(f"model {spec.name!r} does not take split tasks")
        segment, activations = self.request.segment, []
        for index, payload in enumerate(self.request.inputs):
            try:
                activations.append(resume.decode(payload, segment))
                self.positions.append(index)
            except (SplitError, TypeError) as exc:
                self.results[index] = ItemResult(error=str(exc))
        return resume(activations, self.request.params, segment) if activations else None

    def _tokenize_isolating_errors(self, tokenize: Tokenize) -> SegmentState | None:
        """Tokenise the batch; if that fails, find the inputs at fault one by one and drop only them."""
        inputs, params = cast("list[str]", self.request.inputs), self.request.params
        try:
            return tokenize([inputs[i] for i in self.positions], params)
        except Exception:
            kept = []
            for index in self.positions:
                try:
                    tokenize([inputs[index]], params)
                    kept.append(index)
                except Exception as exc:
                    self.results[index] = ItemResult(error=f"cannot prepare input: {exc}")
            if len(kept) == len(self.positions):
                raise  # not an input's fault
            self.positions = kept
            return tokenize([inputs[i] for i in kept], params) if kept else None

    def collect(self) -> list[ItemResult]:
        """Last stage: the segments' outputs as Python/numpy values, in input order."""
        if self.ready is not None:
            self.ready.synchronize()
            self.compute_ms += sum(start.elapsed_time(end) for start, end in self.spans)
            self.spans.clear()
        assert self.state is not None
        outputs = self.state.outputs
        if outputs is None or len(outputs) != len(self.positions):
            got = "none" if outputs is None else str(len(outputs))
            raise RuntimeError(f"the last segment gave {got} outputs for {len(self.positions)} inputs")
        for index, output in zip(self.positions, to_python(outputs), strict=True):
            self.results[index] = ItemResult(output=output)
        return self.final_results()

    def final_results(self) -> list[ItemResult]:
        return [result or ItemResult(error="no result") for result in self.results]

    def stats(self) -> BatchStats:
        service_ms = (time.perf_counter() - self.started) * 1000.0
        return BatchStats(len(self.request.inputs), self.tokens, self.padded_tokens, service_ms, self.compute_ms)


def to_device(state: SegmentState, device: torch.device) -> SegmentState:
    if state.mask.device == device:
        return state
    state.mask = state.mask.to(device, non_blocking=True)
    state.input_ids = state.input_ids.to(device, non_blocking=True)
    if state.hidden is not None:
        state.hidden = state.hidden.to(device, non_blocking=True)
    for key, value in state.extras.items():
        if isinstance(value, torch.Tensor):
            state.extras[key] = value.to(device, non_blocking=True)
    return state


def held_tensors(state: SegmentState) -> list[torch.Tensor]:
    """Every tensor a state holds, including those inside carried objects that list theirs
    (`tensors()`, e.g. a decoder search with its KV cache)."""
    found = [t for t in (state.hidden, state.mask, state.input_ids) if t is not None]
    for value in state.extras.values():
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif callable(getattr(value, "tensors", None)):
            found.extend(t for t in value.tensors() if isinstance(t, torch.Tensor))
    return found


def use_on_stream(state: SegmentState, stream: Any) -> None:
    """Tell the caching allocator these tensors (made on another stage's stream) are used on
    `stream`, so their memory is not reused before that stream is done with them."""
    for tensor in held_tensors(state):
        if tensor.is_cuda:
            tensor.record_stream(stream)
