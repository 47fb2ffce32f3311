"""Run a model's segments as a pipeline of stages, with real-time work cutting in between segments.

Why one module of this length: the stages, their inboxes and the cut-in of real-time work share
one lock and one ordering rule; split apart, each half would need the other's internals.

Stages, one thread each, in order: tokenise → segment 1 → ... → segment N → results. Bounded
inboxes connect them (`queue_depth` batches), so while segment k runs batch i, segment k-1 can
run batch i+1 and tokenisation and result encoding overlap compute. torch releases the GIL inside
its kernels; on a GPU each segment stage has its own CUDA stream, ordered by events.

Real-time cut-in (the GPU's way): while a real-time batch is in flight, a segment stage that is
about to start a batch-priority batch parks it at that boundary (its activations stay in its
`SegmentState`) and runs real-time work first; the parked batch resumes where it stopped once no
real-time work is left. So a real-time batch waits for at most the segment each stage is already
running. Parked memory is counted (`parked_bytes`) and bounded (`park_limit_bytes`): a batch that
would push the total over the limit runs instead of parking.

The real-time lane (the CPU's way): on a CPU, cut-in costs bulk work a core for every real-time
batch: the stage that reaches the boundary first parks its next batch and idles until the real-time
batch, waiting behind the other stage's segment, has passed it (half a segment on average, for a
few milliseconds of real-time work). So on a CPU real-time batches do not wait for a boundary at
all: they run all their segments on a thread of their own, beside the bulk pipeline, and the
operating system shares the cores (a real-time batch is short; one-thread stages share a core
without the barrier stalls of a larger OpenMP team). Bulk stages never park for them; a bulk batch
stops running alone on all threads while one is in flight.

Alone on the CPU: segment stages on separate threads give up intra-op parallelism (one request
runs on one stage's share of the cores). So on a CPU a bulk batch that finds the pipeline otherwise
empty runs its segments one after another in the first segment's thread on all the executor's
threads (real-time batches, short by nature, keep their stages' threads: on a busy host a small
batch on several threads can stall behind other processes). Work arriving meanwhile ends that at
the next segment boundary, where the batch goes on down the pipeline as usual (so real-time
cut-in still happens at segment boundaries). Work the worker holds back for its next batch
(`Paced.watch_backlog`: pacing hands it over once the first segment is free) counts as arriving:
without it, under many clients every batch ran alone, one after another, and the pipeline never
filled. One client gets the whole machine; many clients get a full pipeline. Where other
processes take cores, all threads can cost more than one (`alone.py`): both ways are measured, and
the cheaper one runs.

Pacing (`ectrans.models.api.Paced`): the executor says how many bulk batches wait for the first
segment and which one it runs since when, and calls back when it starts one, so the worker can
form the next batch just before that segment is free (or at once, when a batch leaves its lone run
early and frees the segment before its predicted end).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ectrans.common.registry import ModelSpec
from ectrans.models.alone import AloneThreads
from ectrans.models.api import Executor, FrontSegment, ItemResult, Paced, ProgressCallbacks, Request
from ectrans.models.batch import BatchFuture, Job, Tokenize, UnservableError, to_device, use_on_stream
from ectrans.models.device import set_cpu_threads
from ectrans.models.resume import Resume
from ectrans.models.segments import Segment

logger = logging.getLogger(__name__)

DEFAULT_PARK_LIMIT_BYTES = 512 * 2**20  # the loader repeats it, to stay free of torch imports
Step = tuple[Literal["run", "park", "resume"], Job]


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
class _Stage:
    name: str
    rt: deque[Job] = field(default_factory=deque)
    batch: deque[Job] = field(default_factory=deque)
    pending: Job | None = None  # done here, waiting for room downstream
    parked: Job | None = None  # held back at this boundary for real-time work
    done: bool = False
    busy: bool = False  # running a job now

    @property
    def idle(self) -> bool:
        return not (self.busy or self.rt or self.batch) and self.pending is None and self.parked is None


class PipelinedExecutor(Executor):
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
        resume: Resume | None = None,
        run_alone: bool | None = None,
        realtime_lane: bool | None = None,
    ) -> None:
        if not segments:
            raise ValueError("a pipeline needs at least one segment")
        if queue_depth < 1:
            raise ValueError(f"{queue_depth=} must be at least 1")
        self.spec = spec
        self.segments = list(segments)
        self.tokenize = tokenize
        self.resume = resume  # stage 0 for split tasks; None: the model takes none
        self.device = device or torch.device("cpu")
        self.queue_depth = queue_depth
        self.park_limit_bytes = park_limit_bytes
        self._hook = between_segments
        self.total_threads = threads or torch.get_num_threads()
        # torch keeps one OpenMP team per calling thread: share the cores between segment stages.
        self.stage_threads = max(1, self.total_threads // len(self.segments))
        # A batch alone in the pipeline runs on all threads (CPU only: a GPU's parallelism is not threads).
        if run_alone is None:
            run_alone = self.device.type == "cpu"
        self.run_alone = run_alone and len(self.segments) > 1 and self.total_threads > self.stage_threads
        self.alone_threads = AloneThreads(threads=self.total_threads, stage_threads=self.stage_threads)
        # Real-time batches on a thread of their own (CPU), or cutting in between segments (GPU).
        self.realtime_lane = self.device.type == "cpu" if realtime_lane is None else realtime_lane
        self._lane: deque[Job] = deque()
        self._streams: list[Any] = [None] * len(self.segments)
        if self.device.type == "cuda":
            self._streams = [torch.cuda.Stream(device=self.device) for _ in self.segments]  # type: ignore[no-untyped-call]
        names = ["tokenize", *(segment.name for segment in self.segments), "results"]
        self._stages = [_Stage(name) for name in names]
        self._cond = threading.Condition()
        self._next_id = 0
        self._realtime_in_flight = 0
        self._parked_bytes = 0
        self._closing = False
        self._bulk_ahead: set[int] = set()  # bulk jobs the first segment has not started
        self._front: FrontSegment | None = None
        self._progress = ProgressCallbacks()
        self._backlog: Callable[[], int] = lambda: 0  # bulk tasks the worker holds back (watch_backlog)
        self._threads = [
            threading.Thread(target=self._stage_loop, args=(k,), name=f"ectrans-{spec.name}-{name}", daemon=True)
            for k, name in enumerate(names)
        ]
        if self.realtime_lane:
            name = f"ectrans-{spec.name}-realtime"
            self._threads.append(threading.Thread(target=self._lane_loop, name=name, daemon=True))
        for thread in self._threads:
            thread.start()

    # -- the Executor contract -------------------------------------------------------------

    @property
    def segment_count(self) -> int:
        return len(self.segments)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self.tokenize.count_tokens(texts)

    def submit(self, request: Request) -> BatchFuture:
        """Queue a batch; never blocks (stage 0's inbox is unbounded: the worker bounds what it submits)."""
        future: BatchFuture = concurrent.futures.Future()
        with self._cond:
            if self._closing:
                future.set_exception(RuntimeError(f"executor for {self.spec.name!r} is closed"))
                return future
            job = Job(self._next_id, request, future)
            self._next_id += 1
            if request.realtime:
                self._realtime_in_flight += 1
                (self._lane if self.realtime_lane else self._stages[0].rt).append(job)
            else:
                self._bulk_ahead.add(job.id)
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

    # -- pacing (see the module docstring) ----------------------------------------------------

    def pacing(self) -> Paced:
        return self

    def bulk_waiting(self) -> int:
        with self._cond:
            return len(self._bulk_ahead)

    def front_segment(self) -> FrontSegment | None:
        with self._cond:
            return self._front

    def on_progress(self, callback: Callable[[], None]) -> Callable[[], None]:
        return self._progress.add(callback)

    def watch_backlog(self, queued: Callable[[], int]) -> None:
        self._backlog = queued

    def _front_started(self, job: Job, alone: bool) -> None:
        with self._cond:
            self._bulk_ahead.discard(job.id)
            share = 1 / self.alone_threads.speedup if alone else 1 / len(self.segments)
            self._front = FrontSegment(time.monotonic(), job.padded_tokens, share)
        self._progress()

    def _front_finished(self) -> None:
        with self._cond:
            self._front = None
        self._progress()  # a batch that left its lone run early frees the segment before its predicted end

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
                paced = k == 1 and not job.realtime  # the first segment starts a bulk batch
                lone = paced and self.run_alone and self._alone(job)
                measured = lone and not job.request.segment  # a split task skips layers: no measure
                alone = self.alone_threads.all_threads() if measured else lone and self.alone_threads.current
                if paced:
                    self._front_started(job, alone)
                self._set_busy(k, True)
                last = k  # the stage whose segment ran last
                try:
                    if alone:
                        last = self._run_alone(job, measured)
                        forward = last > 0
                        if last == len(self.segments) and self._results_idle():
                            self._finish(job)  # no hand-over to an idle results stage: a lone client's latency
                            forward = False
                    else:
                        before = job.compute_ms
                        forward = self._work(k, job)
                        if measured and forward:  # the measure of one thread (alone.py)
                            self.alone_threads.observe(False, job.compute_ms - before, job.padded_tokens)
                except Exception as exc:  # a bug here must not stop the stage for every later batch
                    self._fail(job, RuntimeError(f"stage {self._stages[k].name!r} failed: {exc!r}"), exc)
                    forward = False
                if paced:
                    self._front_finished()
                if forward:
                    self._hand_on(last, job)
                self._set_busy(k, False)

    def _next_step(self, k: int) -> Step | None:
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

    def _pick(self, k: int, stage: _Stage) -> Step | None:
        """Real-time first; batch work only when our output slot is free and no real-time work waits."""
        if stage.rt:
            return "run", stage.rt.popleft()
        if stage.pending is not None:
            return None
        if stage.parked is not None:
            if self._cutting_in():
                return None
            job, stage.parked = stage.parked, None
            self._parked_bytes -= job.nbytes
            return "resume", job
        if not stage.batch:
            return None
        job = stage.batch.popleft()
        self._cond.notify_all()  # room in this inbox: wake an upstream stage holding a finished batch
        parks_here = 0 < k <= len(self.segments)
        if parks_here and self._cutting_in() and job.state is not None:
            job.nbytes = job.state.nbytes()
            if self._parked_bytes + job.nbytes <= self.park_limit_bytes:
                stage.parked = job
                self._parked_bytes += job.nbytes
                return "park", job
        return "run", job

    def _cutting_in(self) -> bool:
        """Real-time work is on its way through the stages: bulk batches park at their boundaries."""
        return self._realtime_in_flight > 0 and not self.realtime_lane

    def _drained(self, k: int, stage: _Stage) -> bool:
        upstream_done = self._closing if k == 0 else self._stages[k - 1].done
        idle = not stage.rt and not stage.batch and stage.pending is None and stage.parked is None
        return upstream_done and idle

    def _deliver(self, k: int, job: Job) -> bool:
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

    def _hand_on(self, k: int, job: Job) -> None:
        with self._cond:
            if not self._deliver(k + 1, job):
                self._stages[k].pending = job
                self._cond.notify_all()  # stage k's own thread delivers it (it may be another's job)

    def _set_busy(self, k: int, busy: bool) -> None:
        with self._cond:
            self._stages[k].busy = busy

    # -- the real-time lane (see the module docstring) ----------------------------------------

    def _lane_loop(self) -> None:
        set_cpu_threads(self.stage_threads)
        with torch.inference_mode():
            while (job := self._next_lane_job()) is not None:
                try:
                    self._run_through(job)
                except Exception as exc:  # a bug here must not stop the lane for every later batch
                    self._fail(job, RuntimeError(f"the real-time lane failed: {exc!r}"), exc)

    def _next_lane_job(self) -> Job | None:
        with self._cond:
            while not self._lane:
                if self._closing:
                    return None
                self._cond.wait()
            return self._lane.popleft()

    def _run_through(self, job: Job) -> None:
        """Tokenise, run every segment, encode the results: one batch, start to end, on this thread."""
        if not self._start(job):
            return
        for index, segment in enumerate(self.segments):
            if self._hook is not None:
                self._call_hook(BoundaryEvent(index, segment.name, job.id, job.realtime, "run"))
            if not self._work_segment(index, job):
                return
        self._finish(job)

    # -- alone on the CPU (see the module docstring) ------------------------------------------

    def _alone(self, job: Job) -> bool:
        """Nothing but bulk `job` in the segment stages, and no other work on its way to the first one
        (nor held back by the worker, which hands it over once the first segment is free)."""
        try:
            if self._backlog() > 0:
                return False
        except Exception:  # the worker's count must never stop a stage
            logger.exception("[pipeline] counting the worker's backlog failed")
        with self._cond:
            if self._realtime_in_flight:
                return False
            first = self._stages[1]
            if first.rt or first.batch or first.parked is not None:
                return False
            return all(stage.idle for stage in self._stages[2:-1])

    def _results_idle(self) -> bool:
        """The results stage has nothing to do, and no real-time batch waits for this thread."""
        with self._cond:
            return self._stages[-1].idle and not self._cutting_in()

    def _run_alone(self, job: Job, measured: bool) -> int:
        """Run `job`'s segments from the first on, on all threads, while it stays alone (a probe of all
        threads: its first segment only); the stage of the last segment run (0 when one failed).

        Its compute time counts as on the stages' own threads (times the measured speedup of all
        threads): the fitted cost then says how long a segment holds real-time work back once the
        batch runs down the pipeline, which is when real-time work is about, and when the first
        segment will be free for the next batch (pacing)."""
        set_cpu_threads(self.total_threads)
        scale = self.alone_threads.speedup
        try:
            index = 0
            while True:
                before = job.compute_ms
                if not self._work_segment(index, job):
                    return 0
                probe = False
                if index == 0 and measured:
                    probe = self.alone_threads.probing  # on a busy host, the rest runs the cheaper way
                    self.alone_threads.observe(True, job.compute_ms - before, job.padded_tokens)
                job.compute_ms += (job.compute_ms - before) * (scale - 1)
                index += 1
                if index == len(self.segments) or probe or not self._alone(job):
                    return index
                if self._hook is not None:
                    name = self.segments[index].name
                    self._call_hook(BoundaryEvent(index, name, job.id, job.realtime, "run"))
        finally:
            set_cpu_threads(self.stage_threads)

    def _call_hook(self, event: BoundaryEvent) -> None:
        assert self._hook is not None
        try:
            self._hook(event)
        except Exception:
            logger.exception("[pipeline] between_segments hook failed on %s", event)

    # -- the work of each stage ------------------------------------------------------------

    def _work(self, k: int, job: Job) -> bool:
        """Run stage k on `job`; True when the job goes on to stage k+1."""
        if k == 0:
            return self._start(job)
        if k == len(self._stages) - 1:
            self._finish(job)
            return False
        return self._work_segment(k - 1, job)

    def _work_segment(self, index: int, job: Job) -> bool:
        try:
            self._run_segment(index, job)
        except Exception as exc:
            name = self.segments[index].name
            self._fail(job, RuntimeError(f"segment {name!r} of model {self.spec.name!r} failed: {exc!r}"), exc)
            return False
        return True

    def _start(self, job: Job) -> bool:
        if not job.future.set_running_or_notify_cancel():
            self._settle(job)
            return False
        try:
            done = job.prepare(self.spec, self.tokenize, self.resume)
        except UnservableError as exc:
            self._fail(job, exc, None)
            return False
        except Exception as exc:
            self._fail(job, RuntimeError(f"preparing a batch for model {self.spec.name!r} failed: {exc!r}"), exc)
            return False
        if done is not None:
            self._complete(job, done)
            return False
        return True

    def _run_segment(self, index: int, job: Job) -> None:
        assert job.state is not None
        segment, stream = self.segments[index], self._streams[index]
        if stream is None:
            started = time.perf_counter()
            job.state = segment(to_device(job.state, self.device) if index == 0 else job.state)
            job.compute_ms += (time.perf_counter() - started) * 1000.0
            return
        with torch.cuda.stream(stream):
            if job.ready is not None:
                stream.wait_event(job.ready)
            # Timed on the stream, after the wait: the fitted batch cost must not include the time
            # the batch spent queued behind other stages (the CPU clock would see only the launch).
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start.record(stream)
            state = to_device(job.state, self.device) if index == 0 else job.state
            use_on_stream(state, stream)
            job.state = segment(state)
            job.ready = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            job.ready.record(stream)
            job.spans.append((start, job.ready))

    def _finish(self, job: Job) -> None:
        try:
            results = job.collect()
        except Exception as exc:
            self._fail(job, RuntimeError(f"encoding results of model {self.spec.name!r} failed: {exc!r}"), exc)
            return
        self._complete(job, results)

    def _complete(self, job: Job, results: list[ItemResult]) -> None:
        stats = job.stats()
        job.state = None
        job.future.set_result((results, stats))
        self._settle(job)

    def _fail(self, job: Job, error: Exception, cause: BaseException | None) -> None:
        if cause is not None:
            error.__cause__ = cause
            logger.warning("[pipeline] batch %d failed: %s", job.id, error)
        job.state = None
        if not job.future.done():
            job.future.set_exception(error)
            self._settle(job)

    def _settle(self, job: Job) -> None:
        """A job left the pipeline: parked batches may resume once no real-time work is left."""
        with self._cond:
            self._bulk_ahead.discard(job.id)  # e.g. answered without model work, or failed early
            if job.realtime:
                self._realtime_in_flight -= 1
                self._cond.notify_all()
