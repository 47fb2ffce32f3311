"""`ectrans bench mixed`: real-time tasks under a saturating batch stream, in one run on one machine.

Three systems serve the same seeded schedules:

- ECTrans: the real stack as processes (private redis-server, dispatcher, worker; default settings);
- FIFO: the same stack with `ECTRANS_FIFO=1` (one FIFO queue for both classes, no cut-in);
- per request: one process serving one task at a time at batch 1 (`reference.py`'s model code), in
  arrival order from one FIFO queue, on all cores or one thread, whichever is faster just before
  its phases (on a shared host a batch-1 forward on two threads can be several times slower).

Phases, in this order (FIFO skips the first: idle, its queue is ECTrans's):

1. idle: Poisson arrivals of short sentences, priority realtime, and nothing else;
2. batch only: long inputs (4-8 sentences joined), `batch_in_flight` of them kept outstanding (one
   finishing is replaced at once), so the batch queue never runs dry and the stream stays bounded;
   the window lasts `batch_seconds`, and at least until results came at `MIN_BATCH_EVENTS` instants;
3. mixed: the same batch stream plus Poisson real-time arrivals; the window ends at the last arrival
   (later only while real-time tasks are still served and fewer than `MIN_BATCH_EVENTS` batch results
   came); the stream then stops topping up and drains.

Real-time tasks alternate: even ones carry the deadline, so admission control and queue expiry apply,
and the deadline-miss rate is over them (a `deadline` error or a result after the deadline is a miss);
odd ones carry none, so every one gets a result and the latency percentiles (client side: scheduled
arrival to result) are not censored by rejections. Batch throughput counts completions between the
first and the last in a phase's window (results come a batch at a time). After the drain every
submitted task id is looked up: `lost` counts ids without a terminal record.

One segment's time, for the real-time target, comes from the cost model the worker publishes
(`ectrans:cost:{model}`: batch_ms(max_batch_tokens) / segments, fitted on the segments' run time, with
max_batch_tokens capped so that one segment runs within `batch_segment_ms`) and, measured, as the
median interval between batch completions in the batch-only phase (with the pipeline full, every
segment stage runs one segment of one batch per interval); both verdicts are reported.

Each system's seconds (phases, drain and count) and the start-up's are in the result: `--quick` keeps
fewer batch tasks outstanding (`QUICK`), since FIFO and per request serve them ahead of a real-time
task and every system drains them before the count. The tables and plot are in `mixed_report.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import multiprocessing as mp
import os
import statistics
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any

from ectrans.bench.harness import (
    ServiceStack,
    cores,
    load_average,
    machine_info,
    minilm_path,
    note,
    run_async,
    size_for,
    stop_on_sigterm,
    write_report,
)
from ectrans.bench.mixed_report import draw, markdown, summary_line
from ectrans.bench.reference import ModelConfig
from ectrans.bench.workload import Workload, percentile, ratio, realtime, sample_texts
from ectrans.common.cost import CostModel
from ectrans.common.redis_conn import RedisClient, connect, disconnect
from ectrans.common.registry import build_spec
from ectrans.services.dispatcher.settings import DispatcherSettings
from ectrans.services.worker.settings import WorkerSettings

SEED = 2026
MODEL = "minilm"
RT, BATCH = "realtime", "batch"
RT_TARGET_FACTOR = 1.5  # real-time p99 under load within 1.5 × idle p99 plus one segment
BATCH_RATIO_TARGET = 0.9
BATCH_POOL = 512  # distinct long inputs the batch stream cycles through
MIN_BATCH_EVENTS = 3  # the batch-only window lasts until results came at this many instants at least
CALIBRATION_TASKS = 6  # long inputs timed per thread count when the per-request process picks its threads


@dataclass(frozen=True)
class Size:
    rt_rate_per_s: float
    idle_seconds: float
    batch_seconds: float
    mixed_seconds: float
    batch_in_flight: int  # 0: batch_max_batch × (max_inflight_batches + 1) of the worker settings
    deadline_ms: int
    drain_timeout_s: float


FULL = Size(
    rt_rate_per_s=4.0,
    idle_seconds=30.0,
    batch_seconds=40.0,
    mixed_seconds=90.0,
    batch_in_flight=0,
    deadline_ms=250,
    drain_timeout_s=600.0,
)
# About a minute on a 2-core CPU. The FIFO and per-request systems serve the outstanding batch tasks
# ahead of a real-time task, and every system drains them at the end, so their number sets most of
# the time beyond the phases. 64 still keep the worker's in-flight batches (3) and the next one full:
# FIFO then runs batches of 16 long inputs (32 with 128 outstanding), no slower on this 2-core CPU;
# ECTrans's bulk batches, capped by `batch_segment_ms`, hold 3-5 long inputs each.
QUICK = replace(FULL, idle_seconds=4.0, batch_seconds=3.0, mixed_seconds=6.0, batch_in_flight=64, drain_timeout_s=180.0)
# For the smoke test (ECTRANS_BENCH_SIZE=tiny): every phase, a few tasks each.
TINY = replace(FULL, idle_seconds=1.0, batch_seconds=2.0, mixed_seconds=2.0, batch_in_flight=8, drain_timeout_s=60.0)


def choose_size(quick: bool) -> Size:
    return size_for(quick, QUICK, FULL, TINY)


@dataclass(frozen=True)
class Plan:
    """The schedules every system serves: the same inputs and arrival times for all three."""

    size: Size
    batch_in_flight: int
    idle: Workload
    mixed: Workload
    batch_texts: list[str]


def make_plan(size: Size) -> Plan:
    worker = WorkerSettings()  # the settings the services will read from the same environment
    in_flight = size.batch_in_flight or worker.batch_max_batch * (worker.max_inflight_batches + 1)
    in_flight = min(in_flight, DispatcherSettings().max_queue_len // 2)  # never `overloaded`
    rate = size.rt_rate_per_s
    idle = realtime(max(2, round(rate * size.idle_seconds)), rate, seed=SEED)
    mixed = realtime(max(2, round(rate * size.mixed_seconds)), rate, seed=SEED + 10)
    return Plan(size, in_flight, idle, mixed, sample_texts(BATCH_POOL, seed=SEED + 20, mix="long"))


def carries_deadline(index: int) -> bool:
    """Even real-time tasks carry the deadline (miss rate), odd ones none (latency)."""
    return index % 2 == 0


# 1. Summaries shared by every system -------------------------------------------------------------------


def completion_rate(times: Sequence[float], start: float, end: float) -> float | None:
    """Tasks/s between the first and the last completion inside [start, end].

    The tasks finishing at the first instant are left out: the interval begins when they end. Results
    arrive a whole batch at a time, so a count over a fixed window would be off by up to a batch.
    """
    inside = sorted(t for t in times if start <= t <= end)
    if len(inside) < 2 or inside[-1] <= inside[0]:
        return None
    counted = sum(1 for t in inside if t > inside[0])
    return round(counted / (inside[-1] - inside[0]), 3)


def batch_interval_ms(times: Sequence[float], start: float, end: float) -> float | None:
    """Median gap between batch completions in [start, end]: with the pipeline full, each segment
    stage runs one segment of one batch per gap, so this is one segment's time of a bulk batch."""
    instants = sorted({t for t in times if start <= t <= end})
    gaps = [b - a for a, b in itertools.pairwise(instants)]
    return round(statistics.median(gaps) * 1000, 1) if gaps else None


@dataclass(frozen=True)
class Outcome:
    """One real-time task: its index in the schedule, status, reason and latency (ms; None: no result)."""

    index: int
    status: str
    reason: str
    latency_ms: float | None


def rt_summary(outcomes: Sequence[Outcome], deadline_ms: int) -> dict[str, Any]:
    """Latency percentiles over the tasks without a deadline that got a result; misses over the
    tasks with one: error results by reason, results after the deadline as `late`."""
    latencies = [
        o.latency_ms
        for o in outcomes
        if not carries_deadline(o.index) and o.status == "ok" and o.latency_ms is not None
    ]
    with_deadline = [o for o in outcomes if carries_deadline(o.index)]
    misses: Counter[str] = Counter()
    for o in with_deadline:
        if o.status != "ok":
            misses[o.reason or o.status] += 1
        elif o.latency_ms is None or o.latency_ms > deadline_ms:
            misses["late"] += 1
    return {
        "tasks": len(outcomes),
        "latency_tasks": len(latencies),
        "p50_ms": _round(percentile(latencies, 50)) if latencies else None,
        "p99_ms": _round(percentile(latencies, 99)) if latencies else None,
        "deadline_tasks": len(with_deadline),
        "deadline_miss_rate": round(sum(misses.values()) / len(with_deadline), 4) if with_deadline else None,
        "misses": dict(misses),
        "errors_without_deadline": sum(1 for o in outcomes if not carries_deadline(o.index) and o.status != "ok"),
        "latencies_ms": sorted(_round(x) for x in latencies),
    }


def _round(value: float) -> float:
    return round(value, 2)


# 2. Driving the stack: tasks with known ids, their replies, and the count by id ------------------------------


@dataclass
class Sent:
    kind: str
    phase: str
    index: int
    at: float  # perf_counter: scheduled arrival (real time) or submission (batch)
    deadline: bool
    done: float | None = None
    status: str = ""
    reason: str = ""


class Driver:
    """Submits tasks with known ids (raw XADDs with `reply_to`, as the client library does) and reads
    their replies from its own reply stream; the batch stream keeps `in_flight` batch tasks outstanding."""

    def __init__(self, stack: ServiceStack, plan: Plan) -> None:
        self.url, self.keys, self.plan = stack.url, stack.keys, plan
        self.client_id = f"mixed-{uuid.uuid4().hex[:8]}"
        self.sent: dict[str, Sent] = {}
        self.replies: Counter[str] = Counter()
        self.batch_done: list[float] = []
        self.batch_outstanding = 0
        self.streaming = False
        self.wake = asyncio.Event()  # a batch task finished, or the stream stops
        self.replied = asyncio.Event()  # replies were read
        self._texts = itertools.cycle(plan.batch_texts)
        self._batch_ids = itertools.count()
        self._closing = False
        self._redis: RedisClient | None = None
        self._reader_redis: RedisClient | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Driver:
        self._redis = connect(self.url, client_name=self.client_id)
        self._reader_redis = connect(self.url)  # the blocking reader never delays a submission
        self._tasks.append(asyncio.create_task(self._read()))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closing = True
        self.streaming = False
        self.wake.set()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks)
        for client in (self._redis, self._reader_redis):
            if client is not None:
                await disconnect(client)

    @property
    def redis(self) -> RedisClient:
        assert self._redis is not None
        return self._redis

    async def submit(self, items: Sequence[tuple[str, str, Sent]]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for task_id, text, sent in items:
            fields: dict[Any, Any] = {
                "model": MODEL,
                "op": "embed",
                "input": text,
                "id": task_id,
                "reply_to": self.client_id,
                "encoding": "msgpack",
                "priority": sent.kind,
            }
            if sent.deadline:
                fields["deadline_ms"] = str(self.plan.size.deadline_ms)
            self.sent[task_id] = sent  # before the XADD: a reply may come before execute() returns
            pipe.xadd(self.keys.tasks, fields)
        await pipe.execute()

    async def _read(self) -> None:
        assert self._reader_redis is not None
        stream, last = self.keys.reply(self.client_id), "0-0"
        while not self._closing:
            reply: Any = await self._reader_redis.xread({stream: last}, count=1000, block=100)
            now = time.perf_counter()
            for _, entries in reply or []:
                for entry_id, raw in entries:
                    last = entry_id.decode()
                    self._record(raw, now)
            if reply:
                self.replied.set()

    def _record(self, raw: dict[bytes, bytes], now: float) -> None:
        task_id = raw[b"id"].decode()
        self.replies[task_id] += 1
        sent = self.sent.get(task_id)
        if sent is None or sent.done is not None:  # a duplicate is counted, never timed twice
            return
        sent.done, sent.status = now, raw.get(b"status", b"").decode()
        sent.reason = raw.get(b"reason", b"").decode()
        if sent.kind == BATCH:
            self.batch_done.append(now)
            self.batch_outstanding -= 1
            self.wake.set()

    # The batch stream ------------------------------------------------------------------------------

    def start_batch_stream(self, phase: str) -> None:
        self.streaming = True
        self._tasks.append(asyncio.create_task(self._batch_stream(phase)))

    def stop_batch_stream(self) -> None:
        """No more top-ups: what is outstanding drains."""
        self.streaming = False
        self.wake.set()

    async def _batch_stream(self, phase: str) -> None:
        while self.streaming:
            self.wake.clear()
            need = self.plan.batch_in_flight - self.batch_outstanding
            if need > 0:
                self.batch_outstanding += need
                now = time.perf_counter()
                items = [(f"{phase}-b-{n:06d}", next(self._texts), Sent(BATCH, phase, n, now, False)) for n in
                         itertools.islice(self._batch_ids, need)]  # fmt: skip
                await self.submit(items)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), 0.25)

    async def batch_events(self, since: float, count: int, timeout_s: float, until_answered: str = "") -> None:
        """Wait until batch results have come at `count` distinct instants after `since` (or, with
        `until_answered`, until every task of that kind is answered, whichever is first)."""

        def done() -> bool:
            if until_answered and self.answered(until_answered):
                return True
            return len({t for t in self.batch_done if t > since}) >= count

        await self._until(done, timeout_s)

    # Real time -----------------------------------------------------------------------------------------

    async def realtime(self, phase: str, work: Workload) -> float:
        """Each input at its arrival time (seconds from now); returns the start (perf_counter)."""
        assert work.arrivals is not None
        start = time.perf_counter()
        for index, (text, at) in enumerate(zip(work.texts, work.arrivals, strict=True)):
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            sent = Sent(RT, phase, index, start + at, carries_deadline(index))
            await self.submit([(f"{phase}-rt-{index:05d}", text, sent)])
        return start

    def outcomes(self, phase: str) -> list[Outcome]:
        return [
            Outcome(s.index, s.status or "no_result", s.reason, None if s.done is None else (s.done - s.at) * 1000)
            for s in self.sent.values()
            if s.kind == RT and s.phase == phase
        ]

    def answered(self, kind: str = "") -> bool:
        return all(s.done is not None for s in self.sent.values() if not kind or s.kind == kind)

    async def all_answered(self, timeout_s: float, kind: str = "") -> None:
        await self._until(lambda: self.answered(kind), timeout_s)

    async def _until(self, condition: Callable[[], bool], timeout_s: float) -> None:
        """Wait for `condition` (checked after every read of replies), at most `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.replied.clear()  # before the check, so a reply in between is not missed
            remaining = deadline - time.monotonic()
            if condition() or remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.replied.wait(), min(remaining, 0.5))

    # Counting -------------------------------------------------------------------------------------------

    async def audit(self) -> dict[str, Any]:
        """Every submitted id looked up in Redis: its result hash is its terminal record."""
        ids = list(self.sent)
        status: dict[str, tuple[str, str]] = {}
        for first in range(0, len(ids), 1000):
            chunk = ids[first : first + 1000]
            pipe = self.redis.pipeline(transaction=False)
            for task_id in chunk:
                pipe.hmget(self.keys.result(task_id), ["status", "reason"])
            for task_id, (state, reason) in zip(chunk, await pipe.execute(), strict=True):
                if state is not None:
                    status[task_id] = (state.decode(), (reason or b"").decode())
        reasons = Counter(reason for state, reason in status.values() if state != "ok")
        return {
            "submitted": len(ids),
            "submitted_realtime": sum(1 for s in self.sent.values() if s.kind == RT),
            "ok": sum(1 for state, _ in status.values() if state == "ok"),
            "error": sum(1 for state, _ in status.values() if state != "ok"),
            "error_reasons": dict(reasons),
            "lost": len(ids) - len(status),
            "duplicates": sum(n - 1 for n in self.replies.values() if n > 1),
            "records_without_reply": sum(1 for task_id in status if self.replies[task_id] == 0),
        }

    async def cost_model(self) -> CostModel | None:
        raw: Any = await self.redis.hgetall(self.keys.cost(MODEL))
        return CostModel.from_fields({k.decode(): v.decode() for k, v in raw.items()})


async def _serve_stack(stack: ServiceStack, plan: Plan, with_idle: bool) -> dict[str, Any]:
    """The phases on one stack: [idle,] batch only, mixed, drain; then the count by id."""
    size, out = plan.size, dict[str, Any]()
    async with Driver(stack, plan) as driver:
        if with_idle:
            await driver.realtime("idle", plan.idle)
            await driver.all_answered(size.drain_timeout_s, RT)
            out["idle"] = rt_summary(driver.outcomes("idle"), size.deadline_ms)
        driver.start_batch_stream("stream")
        await driver.batch_events(0.0, 1, size.drain_timeout_s)  # the pipeline is full from here on
        started = time.perf_counter()
        await asyncio.sleep(size.batch_seconds)
        await driver.batch_events(started, MIN_BATCH_EVENTS, size.drain_timeout_s)  # a rate needs a few
        ended = time.perf_counter()
        out["batch_only"] = {
            "window_s": round(ended - started, 2),
            "tasks_per_s": completion_rate(driver.batch_done, started, ended),
            "batch_interval_ms": batch_interval_ms(driver.batch_done, started, ended),
        }
        mixed_start = await driver.realtime("mixed", plan.mixed)
        # The window ends at the last arrival, or later while real-time tasks are still being served
        # and batch results came at fewer than MIN_BATCH_EVENTS instants (slow batches, e.g. FIFO).
        await driver.batch_events(mixed_start, MIN_BATCH_EVENTS, size.drain_timeout_s, until_answered=RT)
        mixed_end = time.perf_counter()
        driver.stop_batch_stream()
        await driver.all_answered(size.drain_timeout_s)
        out["mixed"] = rt_summary(driver.outcomes("mixed"), size.deadline_ms)
        out["mixed"] |= {
            "window_s": round(mixed_end - mixed_start, 2),
            "batch_tasks_per_s": completion_rate(driver.batch_done, mixed_start, mixed_end),
        }
        out["tasks"] = await driver.audit()
        cost = await driver.cost_model()
        out["cost_model"] = None if cost is None else asdict(cost)
    return out


# 3. The per-request baseline: one process, one task at a time, arrival order ---------------------------------


def serve_in_order(encode: Callable[[str], object], plan: Plan) -> dict[str, Any]:
    """The three phases at batch 1 (times in seconds from each phase's start)."""
    clock = time.monotonic
    idle_start = clock()
    idle: list[tuple[int, float]] = []
    assert plan.idle.arrivals is not None
    for index, (text, at) in enumerate(zip(plan.idle.texts, plan.idle.arrivals, strict=True)):
        time.sleep(max(0.0, idle_start + at - clock()))
        encode(text)
        idle.append((index, clock() - idle_start - at))
    texts = itertools.cycle(plan.batch_texts)
    batch_start, batch_done = clock(), []
    while clock() - batch_start < plan.size.batch_seconds:
        encode(next(texts))
        batch_done.append(clock() - batch_start)
    return {"idle": idle, "batch_only": batch_done, "mixed": _mixed_in_order(encode, plan, texts)}


def _mixed_in_order(encode: Callable[[str], object], plan: Plan, texts: Iterator[str]) -> dict[str, Any]:
    """One FIFO queue: `batch_in_flight` batch tasks queued from the start, one more each time one
    finishes (the stream the stacks get), real-time tasks joining at their arrival times."""
    assert plan.mixed.arrivals is not None
    arrivals = plan.mixed.arrivals
    start = time.monotonic()
    queue: deque[tuple[float, int]] = deque((0.0, -1) for _ in range(plan.batch_in_flight))  # (arrival, rt index)
    next_rt = 0
    latencies: list[tuple[int, float]] = []
    batch_done: list[float] = []
    while len(latencies) < len(arrivals):
        now = time.monotonic() - start
        while next_rt < len(arrivals) and arrivals[next_rt] <= now:
            queue.append((arrivals[next_rt], next_rt))
            next_rt += 1
        arrived, index = queue.popleft()
        encode(plan.mixed.texts[index] if index >= 0 else next(texts))
        done = time.monotonic() - start
        if index >= 0:
            latencies.append((index, done - arrived))
        else:
            batch_done.append(done)
            queue.append((done, -1))  # the stream replaces a finished batch task at once
    return {"rt": latencies, "batch_done": batch_done, "window_s": arrivals[-1]}


def _per_request_main(conn: Connection, config: ModelConfig, plan: Plan) -> None:
    """Child process: load the model, report ready, serve the phases on `go`, send the result."""
    from ectrans.bench.reference import _Model

    model = _Model(config)
    conn.send(("ready", os.getpid()))
    conn.recv()  # go: the stacks are done, so the calibration runs on the machine as the phases do
    with model.torch.inference_mode():
        threads = _pick_threads(model, plan.batch_texts[:CALIBRATION_TASKS], config.threads)
        result = serve_in_order(lambda text: model.encode(model.tokenize([text])), plan)
    conn.send(("ok", result | {"threads": threads}))


def _pick_threads(model: Any, texts: list[str], most: int) -> dict[str, Any]:
    """All cores or one thread, whichever serves batch 1 faster now (as `baselines` keeps the better):
    on a shared host, a batch-1 forward on two threads can be several times slower than on one."""
    seconds: dict[int, float] = {}
    for threads in sorted({most, 1}, reverse=True):
        model.torch.set_num_threads(threads)
        started = time.monotonic()
        for text in texts:
            model.encode(model.tokenize([text]))
        seconds[threads] = time.monotonic() - started
    chosen = min(seconds, key=lambda t: seconds[t])
    model.torch.set_num_threads(chosen)
    return {
        "chosen": chosen,
        "calibration_ms_per_task": {t: round(s / len(texts) * 1000, 1) for t, s in seconds.items()},
    }


class PerRequest:
    """The per-request baseline in a spawned process, loading its model while the stacks load theirs."""

    def __init__(self, config: ModelConfig, plan: Plan) -> None:
        context = mp.get_context("spawn")
        self.conn, child = context.Pipe()
        self.proc = context.Process(target=_per_request_main, args=(child, config, plan), daemon=True)
        self.proc.start()

    def _recv(self, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while not self.conn.poll(0.5):
            if not self.proc.is_alive():
                raise RuntimeError(f"the per-request process exited with code {self.proc.exitcode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the per-request process did not answer within {timeout_s:.0f}s")
        return self.conn.recv()[1]

    def wait_ready(self) -> None:
        self._recv(900)

    def serve(self, timeout_s: float) -> dict[str, Any]:
        self.conn.send("go")
        result: dict[str, Any] = self._recv(timeout_s)
        return result

    def close(self) -> None:
        self.proc.kill()
        self.proc.join()
        self.conn.close()


def per_request_figures(raw: dict[str, Any], plan: Plan) -> dict[str, Any]:
    def outcomes(pairs: list[tuple[int, float]]) -> list[Outcome]:
        return [Outcome(index, "ok", "", seconds * 1000) for index, seconds in pairs]

    mixed = raw["mixed"]
    deadline = plan.size.deadline_ms
    return {
        "idle": rt_summary(outcomes(raw["idle"]), deadline),
        "batch_only": {
            "window_s": plan.size.batch_seconds,
            "tasks_per_s": completion_rate(raw["batch_only"], 0.0, plan.size.batch_seconds),
        },
        "mixed": rt_summary(outcomes(mixed["rt"]), deadline)
        | {"window_s": round(mixed["window_s"], 2), "batch_tasks_per_s": completion_rate(mixed["batch_done"], 0.0,
                                                                                         mixed["window_s"])},
        "threads": raw["threads"],
    }  # fmt: skip


# 4. The run ---------------------------------------------------------------------------------------------------


def run(quick: bool) -> dict[str, Any]:
    with stop_on_sigterm():
        return _run(choose_size(quick), quick)


def _run(size: Size, quick: bool) -> dict[str, Any]:
    started = time.monotonic()
    plan = make_plan(size)
    systems: dict[str, Any] = {}
    with contextlib.ExitStack() as resources:
        # The three model copies load at once; the stacks first, so that they load while this process
        # imports torch for the per-request config and the run's metadata.
        # The bulk jobs join 4-8 sentences, past MiniLM's 256 tokens: cut them, as the per-request baseline does.
        cut = {"MODELS_JSON": json.dumps({MODEL: {"path": str(minilm_path()), "truncate": True}})}
        ectrans = resources.enter_context(ServiceStack(serve_models=MODEL, settings=cut).launch())
        fifo = resources.enter_context(ServiceStack(serve_models=MODEL, settings={**cut, "FIFO": "1"}).launch())
        from ectrans.models.device import resolve_device

        spec = build_spec(MODEL, {"path": str(minilm_path())})
        config = ModelConfig(str(spec.path), spec.max_tokens, str(resolve_device("auto")), threads=cores())
        baseline = PerRequest(config, plan)
        resources.callback(baseline.close)
        info = machine_info()
        note(f"mixed: {plan.batch_in_flight} batch tasks in flight, real time at {size.rt_rate_per_s:g}/s")
        for ready in (ectrans.wait_ready, fifo.wait_ready, baseline.wait_ready):
            ready()
        start_s = round(time.monotonic() - started, 1)
        note(f"started in {start_s}s")
        settings = ectrans.service_settings()
        systems["ectrans"] = _timed(lambda: run_async(lambda: _serve_stack(ectrans, plan, with_idle=True)))
        # Its idle processes would only take CPU from the next system. They exit while FIFO's pipeline
        # fills (its first batch takes longer than their shutdown), before FIFO's windows begin.
        ectrans.terminate()
        note(f"ECTrans: {summary_line(systems['ectrans'])}")
        systems["fifo"] = _timed(lambda: run_async(lambda: _serve_stack(fifo, plan, with_idle=False)))
        fifo.stop()  # gone before the per-request process times its thread counts
        ectrans.stop()
        note(f"FIFO: {summary_line(systems['fifo'])}")
        timeout_s = size.drain_timeout_s + size.idle_seconds + size.batch_seconds + size.mixed_seconds
        systems["per_request"] = _timed(lambda: per_request_figures(baseline.serve(timeout_s), plan))
        note(f"per request: {summary_line(systems['per_request'])}")
    result = summarize(systems, plan, info, quick)
    result["ectrans_settings"] = settings
    result["start_s"] = start_s
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    result["report"] = write_report("mixed", result, markdown(result), lambda fig: draw(fig, result))
    return result


def _timed(serve: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One system's figures, with the seconds it took (its phases, drain and count)."""
    started = time.monotonic()
    figures = serve()
    return figures | {"elapsed_s": round(time.monotonic() - started, 1)}


def one_segment_ms(cost: dict[str, Any] | None) -> float | None:
    """One segment of the largest batch, from the cost model the worker published."""
    if not cost or not cost.get("max_batch_tokens"):
        return None
    model = CostModel(**cost)
    return round(model.batch_ms(model.max_batch_tokens) / max(model.segments, 1), 1)


def rt_target(idle_p99_ms: float | None, segment_ms: float | None) -> float | None:
    if idle_p99_ms is None or segment_ms is None:
        return None
    return round(RT_TARGET_FACTOR * idle_p99_ms + segment_ms, 1)


def _within(value: float | None, limit: float | None) -> bool | None:
    return None if value is None or limit is None else value <= limit


def summarize(systems: dict[str, Any], plan: Plan, info: dict[str, Any], quick: bool) -> dict[str, Any]:
    ect, fifo, solo = systems["ectrans"], systems["fifo"], systems["per_request"]
    segment, interval = one_segment_ms(ect["cost_model"]), ect["batch_only"]["batch_interval_ms"]
    idle_p99, loaded_p99 = ect["idle"]["p99_ms"], ect["mixed"]["p99_ms"]
    target, target_measured = rt_target(idle_p99, segment), rt_target(idle_p99, interval)
    batch_ratio = ratio(ect["mixed"]["batch_tasks_per_s"], ect["batch_only"]["tasks_per_s"])
    lost = ect["tasks"]["lost"] + fifo["tasks"]["lost"]
    result: dict[str, Any] = {
        "scenario": "mixed",
        "quick": quick,
        "device": info["device"],
        "rt_p50_ms_idle": ect["idle"]["p50_ms"],
        "rt_p99_ms_idle": idle_p99,
        "rt_p50_ms_loaded": ect["mixed"]["p50_ms"],
        "rt_p99_ms_loaded": loaded_p99,
        "rt_p50_ms_loaded_fifo": fifo["mixed"]["p50_ms"],
        "rt_p99_ms_loaded_fifo": fifo["mixed"]["p99_ms"],
        "rt_p50_ms_loaded_per_request": solo["mixed"]["p50_ms"],
        "rt_p99_ms_loaded_per_request": solo["mixed"]["p99_ms"],
        "deadline_miss_rate": ect["mixed"]["deadline_miss_rate"],
        "deadline_miss_rate_fifo": fifo["mixed"]["deadline_miss_rate"],
        "deadline_miss_rate_per_request": solo["mixed"]["deadline_miss_rate"],
        "batch_tasks_per_s_batch_only": ect["batch_only"]["tasks_per_s"],
        "batch_tasks_per_s_mixed": ect["mixed"]["batch_tasks_per_s"],
        "batch_throughput_ratio": batch_ratio,
        "batch_throughput_ratio_fifo": ratio(fifo["mixed"]["batch_tasks_per_s"], fifo["batch_only"]["tasks_per_s"]),
        "batch_tasks_per_s_mixed_per_request": solo["mixed"]["batch_tasks_per_s"],
        "one_segment_ms": segment,
        "batch_interval_ms": interval,
        "rt_p99_target_ms": target,
        "meets_rt_target": _within(loaded_p99, target),
        # The same target with the segment time measured: the cost model is a linear fit of the segments'
        # own run time over many batch sizes (real-time ones included), at the largest batch the
        # `batch_segment_ms` cap allows; the interval is what bulk batches took in this run.
        "rt_p99_target_ms_measured_segment": target_measured,
        "meets_rt_target_measured_segment": _within(loaded_p99, target_measured),
        "batch_throughput_ratio_target": BATCH_RATIO_TARGET,
        "meets_batch_target": None if batch_ratio is None else batch_ratio >= BATCH_RATIO_TARGET,
        "lost": lost,
        "duplicates": ect["tasks"]["duplicates"] + fifo["tasks"]["duplicates"],
        "machine": {**info, "load_average_at_end": load_average()},
        "config": _config(plan),
        "systems": systems,
    }
    return result


def _config(plan: Plan) -> dict[str, Any]:
    size = plan.size
    return {
        "size": asdict(size),
        "batch_in_flight": plan.batch_in_flight,
        "rt_rate_per_s": size.rt_rate_per_s,
        "deadline_ms": size.deadline_ms,
        "seed": SEED,
        "workload": {
            "realtime_idle": plan.idle.describe(),
            "realtime_mixed": plan.mixed.describe(),
            "batch": f"{BATCH_POOL} inputs, mix 'long', seed {SEED + 20}, cycled; {plan.batch_in_flight} kept "
            "outstanding",
        },
        "rt_target": f"rt_p99_ms_loaded <= {RT_TARGET_FACTOR} × rt_p99_ms_idle + one_segment_ms",
        "batch_target": f"batch_throughput_ratio >= {BATCH_RATIO_TARGET}",
        "deadline_rule": "even real-time tasks carry the deadline (miss rate over them); odd ones none "
        "(latency percentiles over them)",
    }
