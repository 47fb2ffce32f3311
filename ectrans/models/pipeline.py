"""Run a model's segments as a pipeline of stages, with real-time work cutting in between segments.

Stages, one thread each, in order: tokenise → segment 1 → ... → segment N → results. Bounded
inboxes connect them (`queue_depth` batches), so while segment k runs batch i, segment k-1 can
run batch i+1 and tokenisation and result encoding overlap compute. torch releases the GIL inside
its kernels; on a GPU each segment stage has its own CUDA stream, ordered by events.

Real-time cut-in: while a real-time batch is in flight, a segment stage that is about to start a
batch-priority batch parks it at that boundary (its activations stay in its `SegmentState`) and
runs real-time work first; the parked batch resumes where it stopped once no real-time work is left.
So a real-time batch waits for at most the segment each stage is already running. Parked memory
is counted (`parked_bytes`) and bounded (`park_limit_bytes`): a batch that would push the total
over the limit runs instead of parking.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from ectrans.common.registry import ModelSpec
from ectrans.models.api import BatchStats, ItemResult, Request
from ectrans.models.device import set_cpu_threads
from ectrans.models.results import input_error, noop_output, to_python
from ectrans.models.segments import Segment, SegmentState

logger = logging.getLogger(__name__)

DEFAULT_PARK_LIMIT_BYTES = 512 * 2**20
BatchFuture = concurrent.futures.Future[tuple[list[ItemResult], BatchStats]]


class Tokenize(Protocol):
    """Stage 0: texts to the first `SegmentState`, and token counts for the worker's packing."""

    def __call__(self, texts: list[str], params: dict[str, Any]) -> SegmentState: ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]: ...


@dataclass(frozen=True)
class BoundaryEvent:
    """What a segment stage decided at a segment boundary (for tracing and tests)."""

    stage: int  # index of the segment about to run (or parked in front of)
    segment: str
    job: int  # submission number, from 0
    realtime: bool
    action: Literal["run", "park", "resume"]


BoundaryHook = Callable[[BoundaryEvent], None]


@dataclass(eq=False)
class _Job:
    id: int
    request: Request
    future: BatchFuture
    results: list[ItemResult | None] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # inputs that run through the segments
    state: SegmentState | None = None
    started: float = 0.0
    tokens: int = 0
    padded_tokens: int = 0
    nbytes: int = 0  # activation bytes while parked
    ready: Any = None  # torch.cuda.Event after the last segment that ran it

    @property
    def realtime(self) -> bool:
        return self.request.realtime


@dataclass(eq=False)
class _Stage:
    name: str
    rt: deque[_Job] = field(default_factory=deque)
    batch: deque[_Job] = field(default_factory=deque)
    pending: _Job | None = None  # done here, waiting for room downstream
    parked: _Job | None = None  # held back at this boundary for real-time work
    done: bool = False


class PipelinedExecutor:
    """An `Executor` over a list of segments; see the module docstring."""

    def __init__(
        self,
        spec: ModelSpec,
        segments: Sequence[Segment],
        tokenize: Tokenize,
        *,
        device: torch.device | None = None,
        threads: int | None = None,
        queue_depth: int = 2,
        park_limit_bytes: int = DEFAULT_PARK_LIMIT_BYTES,
        between_segments: BoundaryHook | None = None,
    ) -> None:
        if not segments:
            raise ValueError("a pipeline needs at least one segment")
        if queue_depth < 1:
            raise ValueError(f"{queue_depth=} must be at least 1")
        self.spec = spec
        self.segments = list(segments)
        self.tokenize = tokenize
        self.device = device or torch.device("cpu")
        self.queue_depth = queue_depth
        self.park_limit_bytes = park_limit_bytes
        self._hook = between_segments
        total_threads = threads or torch.get_num_threads()
        # torch keeps one OpenMP team per calling thread: share the cores between segment stages.
        self.stage_threads = max(1, total_threads // len(self.segments))
        self._streams: list[Any] = [None] * len(self.segments)
        if self.device.type == "cuda":
            self._streams = [torch.cuda.Stream(device=self.device) for _ in self.segments]
        names = ["tokenize", *(segment.name for segment in self.segments), "results"]
        self._stages = [_Stage(name) for name in names]
        self._cond = threading.Condition()
        self._next_id = 0
        self._realtime_in_flight = 0
        self._parked_bytes = 0
        self._closing = False
        self._threads = [
            threading.Thread(target=self._stage_loop, args=(k,), name=f"ectrans-{spec.name}-{name}", daemon=True)
            for k, name in enumerate(names)
        ]
        for thread in self._threads:
            thread.start()

    # -- the Executor contract -------------------------------------------------------------

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self.tokenize.count_tokens(texts)

    def submit(self, request: Request) -> BatchFuture:
        """Queue a batch; never blocks (stage 0's inbox is unbounded: the worker bounds what it submits)."""
        future: BatchFuture = concurrent.futures.Future()
        with self._cond:
            if self._closing:
                future.set_exception(RuntimeError(f"executor for {self.spec.name!r} is closed"))
                return future
            job = _Job(self._next_id, request, future)
            self._next_id += 1
            if request.realtime:
                self._realtime_in_flight += 1
                self._stages[0].rt.append(job)
            else:
                self._stages[0].batch.append(job)
            self._cond.notify_all()
        return future

    def close(self) -> None:
        """Finish every submitted batch, then stop and join the stage threads."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()

    @property
    def parked_bytes(self) -> int:
        """Activation memory of batches parked at segment boundaries right now."""
        with self._cond:
            return self._parked_bytes

    @property
    def realtime_in_flight(self) -> int:
        with self._cond:
            return self._realtime_in_flight

    # -- stage threads ---------------------------------------------------------------------

    def _stage_loop(self, k: int) -> None:
        is_segment = 0 < k <= len(self.segments)
        set_cpu_threads(self.stage_threads if is_segment else 1)
        with torch.inference_mode():
            while True:
                step = self._next_step(k)
                if step is None:
                    return
                action, job = step
                if is_segment and self._hook is not None:
                    self._call_hook(BoundaryEvent(k - 1, self._stages[k].name, job.id, job.realtime, action))
                if action == "park":
                    continue
                try:
                    forward = self._work(k, job)
                except Exception as exc:  # a bug here must not stop the stage for every later batch
                    self._fail(job, RuntimeError(f"stage {self._stages[k].name!r} failed: {exc!r}"), exc)
                    forward = False
                if forward:
                    self._hand_on(k, job)

    def _next_step(self, k: int) -> tuple[Literal["run", "park", "resume"], _Job] | None:
        """Block until stage k has something to do; None once it is closed and drained."""
        stage = self._stages[k]
        with self._cond:
            while True:
                if stage.pending is not None and self._deliver(k + 1, stage.pending):
                    stage.pending = None
                step = self._pick(k, stage)
                if step is not None:
                    return step
                if self._drained(k, stage):
                    stage.done = True
                    self._cond.notify_all()
                    return None
                self._cond.wait()

    def _pick(self, k: int, stage: _Stage) -> tuple[Literal["run", "park", "resume"], _Job] | None:
        """Real-time first; batch work only when our output slot is free and no real-time work waits."""
        if stage.rt:
            return "run", stage.rt.popleft()
        if stage.pending is not None:
            return None
        if stage.parked is not None:
            if self._realtime_in_flight:
                return None
            job, stage.parked = stage.parked, None
            self._parked_bytes -= job.nbytes
            return "resume", job
        if not stage.batch:
            return None
        job = stage.batch.popleft()
        self._cond.notify_all()  # room in this inbox: wake an upstream stage holding a finished batch
        parks_here = 0 < k <= len(self.segments)
        if parks_here and self._realtime_in_flight and job.state is not None:
            job.nbytes = state_bytes(job.state)
            if self._parked_bytes + job.nbytes <= self.park_limit_bytes:
                stage.parked = job
                self._parked_bytes += job.nbytes
                return "park", job
        return "run", job

    def _drained(self, k: int, stage: _Stage) -> bool:
        upstream_done = self._closing if k == 0 else self._stages[k - 1].done
        idle = not stage.rt and not stage.batch and stage.pending is None and stage.parked is None
        return upstream_done and idle

    def _deliver(self, k: int, job: _Job) -> bool:
        """Put `job` in stage k's inbox; batch work only while there is room (real-time always)."""
        stage = self._stages[k]
        if job.realtime:
            stage.rt.append(job)
        elif len(stage.batch) < self.queue_depth:
            stage.batch.append(job)
        else:
            return False
        self._cond.notify_all()
        return True

    def _hand_on(self, k: int, job: _Job) -> None:
        with self._cond:
            if not self._deliver(k + 1, job):
                self._stages[k].pending = job

    def _call_hook(self, event: BoundaryEvent) -> None:
        assert self._hook is not None
        try:
            self._hook(event)
        except Exception:
            logger.exception("[pipeline] between_segments hook failed on %s", event)

    # -- the work of each stage ------------------------------------------------------------

    def _work(self, k: int, job: _Job) -> bool:
        """Run stage k on `job`; True when the job goes on to stage k+1."""
        if k == 0:
            return self._start(job)
        if k == len(self._stages) - 1:
            self._finish(job)
            return False
        try:
            self._run_segment(k - 1, job)
        except Exception as exc:
            name = self.segments[k - 1].name
            self._fail(job, RuntimeError(f"segment {name!r} of model {self.spec.name!r} failed: {exc!r}"), exc)
            return False
        return True

    def _start(self, job: _Job) -> bool:
        if not job.future.set_running_or_notify_cancel():
            self._settle(job)
            return False
        job.started = time.perf_counter()
        request = job.request
        if not self.spec.supports(request.op):
            error = ValueError(f"model {self.spec.name!r} does not serve op {request.op!r}")
            self._fail(job, error, None)
            return False
        if request.op == "noop":
            self._complete(job, [ItemResult(output=noop_output(text)) for text in request.inputs])
            return False
        job.results = [None] * len(request.inputs)
        for index, text in enumerate(request.inputs):
            problem = input_error(text)
            if problem is None:
                job.positions.append(index)
            else:
                job.results[index] = ItemResult(error=problem)
        if not job.positions:
            self._complete(job, [result or ItemResult(error="no result") for result in job.results])
            return False
        try:
            job.state = self._tokenize_isolating_errors(job)
        except Exception as exc:
            self._fail(job, RuntimeError(f"tokenising for model {self.spec.name!r} failed: {exc!r}"), exc)
            return False
        if job.state is None:  # every input failed to tokenise
            self._complete(job, [result or ItemResult(error="no result") for result in job.results])
            return False
        job.tokens = int(job.state.mask.sum())
        job.padded_tokens = job.state.mask.numel()
        return True

    def _tokenize_isolating_errors(self, job: _Job) -> SegmentState | None:
        """Tokenise the batch; if that fails, find the inputs at fault one by one and drop only them."""
        texts = [job.request.inputs[i] for i in job.positions]
        try:
            return self.tokenize(texts, job.request.params)
        except Exception:
            kept = []
            for index in job.positions:
                try:
                    self.tokenize([job.request.inputs[index]], job.request.params)
                    kept.append(index)
                except Exception as exc:
                    job.results[index] = ItemResult(error=f"cannot tokenise input: {exc}")
            if len(kept) == len(job.positions):
                raise  # not an input's fault
            job.positions = kept
            if not kept:
                return None
            return self.tokenize([job.request.inputs[i] for i in kept], job.request.params)

    def _run_segment(self, index: int, job: _Job) -> None:
        assert job.state is not None
        segment, stream = self.segments[index], self._streams[index]
        if stream is None:
            job.state = segment(_to_device(job.state, self.device) if index == 0 else job.state)
            return
        with torch.cuda.stream(stream):
            if job.ready is not None:
                stream.wait_event(job.ready)
            state = _to_device(job.state, self.device) if index == 0 else job.state
            _use_on_stream(state, stream)
            job.state = segment(state)
            job.ready = torch.cuda.Event()
            job.ready.record(stream)

    def _finish(self, job: _Job) -> None:
        try:
            if job.ready is not None:
                job.ready.synchronize()
            assert job.state is not None
            outputs = job.state.outputs
            if outputs is None or len(outputs) != len(job.positions):
                got = "none" if outputs is None else str(len(outputs))
                raise RuntimeError(f"the last segment gave {got} outputs for {len(job.positions)} inputs")
            for index, output in zip(job.positions, to_python(outputs), strict=True):
                job.results[index] = ItemResult(output=output)
        except Exception as exc:
            self._fail(job, RuntimeError(f"encoding results of model {self.spec.name!r} failed: {exc!r}"), exc)
            return
        self._complete(job, [result or ItemResult(error="no result") for result in job.results])

    def _complete(self, job: _Job, results: list[ItemResult]) -> None:
        service_ms = (time.perf_counter() - job.started) * 1000.0
        stats = BatchStats(len(job.request.inputs), job.tokens, job.padded_tokens, service_ms)
        job.state = None
        job.future.set_result((results, stats))
        self._settle(job)

    def _fail(self, job: _Job, error: Exception, cause: BaseException | None) -> None:
        if cause is not None:
            error.__cause__ = cause
            logger.warning("[pipeline] batch %d failed: %s", job.id, error)
        job.state = None
        if not job.future.done():
            job.future.set_exception(error)
            self._settle(job)

    def _settle(self, job: _Job) -> None:
        """A job left the pipeline: parked batches may resume once no real-time work is left."""
        if job.realtime:
            with self._cond:
                self._realtime_in_flight -= 1
                self._cond.notify_all()


def _to_device(state: SegmentState, device: torch.device) -> SegmentState:
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


def _held_tensors(state: SegmentState) -> list[torch.Tensor]:
    """Every tensor a state holds, including those inside carried objects that list theirs
    (`tensors()`, e.g. a decoder search with its KV cache)."""
    found = [t for t in (state.hidden, state.mask, state.input_ids) if t is not None]
    for value in state.extras.values():
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif callable(getattr(value, "tensors", None)):
            found.extend(t for t in value.tensors() if isinstance(t, torch.Tensor))
    return found


def state_bytes(state: SegmentState) -> int:
    """Activation memory a parked state holds (distinct storages counted once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _held_tensors(state)}
    return sum(storages.values())


def _use_on_stream(state: SegmentState, stream: Any) -> None:
    """Tell the caching allocator these tensors (made on another stage's stream) are used here,
    so their memory is not reused before this stream is done with them."""
    for tensor in _held_tensors(state):
        if tensor.is_cuda:
            tensor.record_stream(stream)
