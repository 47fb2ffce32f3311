"""`ectrans bench serve`: online traffic against the bare loops on the same machine, in one run.

Online traffic is many clients, each sending its next request when the previous one is answered
(closed loops), or requests arriving at random at a set rate (open, Poisson loops). Every task is
one `AsyncClient.submit` of one sentence on one client object, as a web application serving many
users would call it, with the default classification (no priority given).

- closed loops at 1, 8, 32 and 256 clients for a fixed time each: tasks/s, client-side latency
  percentiles, errors by reason, and the batch sizes the worker ran (its metrics stream);
- open loops at multiples of the best closed-loop throughput (up to 3x): the share of that peak
  still answered, latencies of answered tasks, and errors (the excess should be `overloaded` at once:
  the stack runs with a queue bound of `ONLINE_QUEUE_S` seconds of work, an online node's setting);
- bare loops in a separate process with all cores, same sentences, measured in the same run: one
  `encode` per request; arrival-order batches of 8; length-sorted batches of 32 (what
  sentence-transformers' `encode` does). Each closed level's loop runs just before the level and
  again just after it (the stack idle meanwhile), and its ratio is against the mean of the two: on a
  shared host the same loop moved by 40% within one run, and a figure taken minutes away from the
  level held the stack to another machine's speed.

Ratios: 1 client against per request, 8 clients against arrival-order batches of 8, 32 and 256
clients against length-sorted batches of 32; the open loop's kept share against the closed peak.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from redis.exceptions import RedisError

from ectrans.bench.harness import (
    RESULT_TIMEOUT_S,
    ServiceStack,
    cores,
    load_average,
    machine_info,
    note,
    run_async,
    size_for,
    stop_on_sigterm,
)
from ectrans.bench.reference import ModelConfig, ModelProcesses
from ectrans.bench.workload import percentile, poisson_arrivals, sample_texts
from ectrans.client import AsyncClient, ECTransError
from ectrans.common.keys import Keys
from ectrans.common.redis_conn import connect
from ectrans.common.registry import build_spec, packaged_minilm_path
from ectrans.models.device import resolve_device

SEED = 16
MODEL = "minilm"
# The bare loop each closed-loop level is held against, and the share of it to reach.
CLOSED_TARGETS = {1: ("per_request", 0.85), 8: ("arrival_batch_8", 0.9), 32: ("sorted_batch_32", 0.8)}
LARGE_TARGET = ("sorted_batch_32", 0.9)  # 256 clients and any level above 32
OPEN_KEPT_TARGET = 0.9  # of the closed-loop peak, at the highest open load
# What a user waiting for an answer may queue behind (ECTRANS_BATCH_MAX_QUEUE_S; the default, 30 s,
# suits bulk jobs): above the work 256 closed-loop clients keep in flight here, well under a minute.
ONLINE_QUEUE_S = 5.0
REFUSED_AT_ONCE_MS = 1000.0  # an `overloaded` answer later than this is not "at once"


@dataclass(frozen=True)
class Size:
    clients: tuple[int, ...]
    closed_seconds: float  # per closed-loop level
    open_loads: tuple[float, ...]  # arrival rates, as multiples of the closed-loop peak
    open_seconds: float  # arrivals span this long per open-loop level
    baseline_tasks: int  # sentences each bare loop encodes


QUICK = Size((1, 8, 32, 256), 5.0, (0.5, 1.0, 3.0), 4.0, 100)
FULL = Size((1, 8, 32, 256), 20.0, (0.5, 1.0, 2.0, 3.0), 15.0, 400)
TINY = Size((1, 8), 1.0, (1.0,), 1.0, 16)  # the smoke test: every code path, a few tasks each


def choose_size(quick: bool) -> Size:
    return size_for(quick, QUICK, FULL, TINY)


# 1. The bare loops ---------------------------------------------------------------------------------


class BareLoops:
    """The bare loops' model processes (all cores, and one thread), loaded before the stack starts and
    kept until it stops: measuring one loop beside a closed level costs that loop only (they sit idle
    while the stack runs)."""

    def __init__(self, texts: list[str], device: str) -> None:
        spec = build_spec(MODEL, {"path": str(packaged_minilm_path())})
        self._opened = contextlib.ExitStack()
        self._procs: dict[int, ModelProcesses] = {}
        try:
            for threads in sorted({cores(), 1}, reverse=True):
                config = ModelConfig(str(spec.path), spec.max_tokens, device, threads)
                procs = self._opened.enter_context(ModelProcesses(1, config))
                procs.set_texts(texts)
                self._procs[threads] = procs
        except BaseException:
            self._opened.close()
            raise

    def __enter__(self) -> BareLoops:
        return self

    def __exit__(self, *exc: object) -> None:
        self._opened.close()

    def measure(self, loop: str) -> float:
        """Tasks/s of one loop, on all cores; per request the better of all cores and one thread (batch
        1 on a busy host often does better on one thread)."""
        if loop == "per_request":
            return max(self._per_request(procs) for procs in self._procs.values())
        batch, sort = BATCHED[loop]
        timing = self._procs[cores()].batched(batch, sort=sort)
        return round(timing.items / timing.seconds, 2)

    @staticmethod
    def _per_request(procs: ModelProcesses) -> float:
        seconds, items = procs.per_request()
        return round(items / seconds, 2)


BATCHED = {"arrival_batch_8": (8, False), "sorted_batch_32": (32, True)}  # batch size, sorted by length


def target_for(clients: int) -> tuple[str, float]:
    """The bare loop a closed level of `clients` is held against, and the ratio it must reach."""
    return CLOSED_TARGETS.get(clients, LARGE_TARGET)


# 2. Driving the stack --------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one level's tasks got: client-side latencies of ok results, errors by reason."""

    latencies: list[float]
    errors: Counter[str]
    seconds: float
    refused: list[float] = field(default_factory=list)  # latencies of the `overloaded` answers

    def summary(self) -> dict[str, Any]:
        ok = len(self.latencies)
        return {
            "tasks_per_s": round(ok / self.seconds, 2) if self.seconds > 0 else 0.0,
            "answered": ok,
            "errors": sum(self.errors.values()),
            "errors_by_reason": dict(self.errors),
            **{f"p{q}_ms": round(percentile(self.latencies, q), 2) if ok else None for q in (50, 90, 99)},
            "overloaded_p99_ms": round(percentile(self.refused, 99), 2) if self.refused else None,
        }


async def one_task(client: AsyncClient, text: str, outcome: Outcome) -> None:
    started = time.perf_counter()
    try:
        result = await client.submit(MODEL, "embed", text, timeout=RESULT_TIMEOUT_S)
    except (ECTransError, RedisError) as exc:  # a timeout, or the client refusing load: counted
        outcome.errors[type(exc).__name__] += 1
        return
    elapsed_ms = (time.perf_counter() - started) * 1000
    if result.ok:
        outcome.latencies.append(elapsed_ms)
    else:
        outcome.errors[str(result.reason)] += 1
        if result.reason == "overloaded":
            outcome.refused.append(elapsed_ms)


async def closed_loop(client: AsyncClient, texts: list[str], clients: int, seconds: float) -> Outcome:
    """`clients` users, each sending its next sentence when the last is answered, for `seconds`."""
    outcome = Outcome([], Counter(), 0.0)
    started = time.perf_counter()
    stop_at = started + seconds

    async def user(index: int) -> None:
        n = index
        while time.perf_counter() < stop_at:
            await one_task(client, texts[n % len(texts)], outcome)
            n += clients

    async with asyncio.TaskGroup() as tg:
        for index in range(clients):
            tg.create_task(user(index))
    outcome.seconds = time.perf_counter() - started
    return outcome


async def open_loop(client: AsyncClient, texts: list[str], rate: float, seconds: float, seed: int) -> Outcome:
    """Poisson arrivals at `rate` for `seconds`; throughput counts until the last answer."""
    n = max(1, int(rate * seconds))
    arrivals = poisson_arrivals(n, rate, seed=seed)
    outcome = Outcome([], Counter(), 0.0)
    started = time.perf_counter()

    async def arrive(text: str, at: float) -> None:
        await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
        await one_task(client, text, outcome)

    async with asyncio.TaskGroup() as tg:
        for i, at in enumerate(arrivals):
            tg.create_task(arrive(texts[i % len(texts)], at))
    outcome.seconds = time.perf_counter() - started
    return outcome


class BatchSizes:
    """The sizes of the batches the worker ran, read from its metrics stream between two marks."""

    def __init__(self, url: str, keys: Keys) -> None:
        self.redis = connect(url)
        self.stream = keys.metrics
        self.mark = "0-0"

    async def start(self) -> None:
        last: Any = await self.redis.xrevrange(self.stream, count=1)
        self.mark = last[0][0].decode() if last else "0-0"

    async def since_start(self) -> dict[str, Any]:
        await asyncio.sleep(0.3)  # the worker publishes its metrics off the batches' path
        entries: Any = await self.redis.xrange(self.stream, min=f"({self.mark}")
        sizes = [int(f[b"size"]) for _, f in entries if f.get(b"kind") == b"batch"]
        if not sizes:
            return {"batches": 0}
        return {
            "batches": len(sizes),
            "mean": round(sum(sizes) / len(sizes), 2),
            "p50": percentile(sizes, 50),
            "max": max(sizes),
        }

    async def close(self) -> None:
        await self.redis.aclose()


async def drive(stack: ServiceStack, loops: BareLoops, texts: list[str], size: Size) -> dict[str, Any]:
    async with AsyncClient(stack.url, prefix=stack.prefix) as client:
        sizes = BatchSizes(stack.url, stack.keys)
        try:
            await closed_loop(client, texts, 8, 2.0)  # warm-up: shapes, and the worker's fitted cost
            closed = []
            for clients in size.clients:
                loop, _ = target_for(clients)
                before = await asyncio.to_thread(loops.measure, loop)  # the stack idle meanwhile
                await sizes.start()
                outcome = await closed_loop(client, texts, clients, size.closed_seconds)
                batches = await sizes.since_start()
                after = await asyncio.to_thread(loops.measure, loop)
                bare = {"loop": loop, "before": before, "after": after, "mean": round((before + after) / 2, 2)}
                closed.append({"clients": clients, **outcome.summary(), "server_batches": batches, "bare": bare})
                note(f"closed loop, {clients} clients: {closed[-1]}")
            peak = max(row["tasks_per_s"] for row in closed)
            opened = []
            for index, load in enumerate(size.open_loads):
                await sizes.start()
                outcome = await open_loop(client, texts, load * peak, size.open_seconds, SEED + index)
                row = {"load_x_peak": load, "rate_per_s": round(load * peak, 2), **outcome.summary()}
                row["kept_of_peak"] = round(row["tasks_per_s"] / peak, 3) if peak else None
                opened.append({**row, "server_batches": await sizes.since_start()})
                note(f"open loop at {load}x peak: {opened[-1]}")
        finally:
            await sizes.close()
    return {"closed": closed, "open": opened, "closed_peak_tasks_per_s": peak}


# 3. The run ------------------------------------------------------------------------------------------


def ratios(closed: list[dict[str, Any]]) -> dict[str, Any]:
    """Each closed level against the mean of its bare loop's runs just before and just after it."""
    out = {}
    for row in closed:
        loop, target = target_for(row["clients"])
        bare = row["bare"]["mean"]
        measured = round(row["tasks_per_s"] / bare, 3) if bare else None
        met = measured is not None and measured >= target and row["errors"] == 0
        out[f"clients_{row['clients']}"] = {"against": loop, "ratio": measured, "target": target, "met": met}
    return out


def bare_means(closed: list[dict[str, Any]]) -> dict[str, float]:
    """Each bare loop's mean over all its runs (the ratios use each level's own two)."""
    runs: dict[str, list[float]] = {}
    for row in closed:
        runs.setdefault(row["bare"]["loop"], []).extend((row["bare"]["before"], row["bare"]["after"]))
    return {loop: round(sum(rates) / len(rates), 2) for loop, rates in runs.items()}


def shedding(top: dict[str, Any]) -> dict[str, Any]:
    """At the highest open load the excess is answered `overloaded`, quickly, and nothing else fails."""
    errors = top.get("errors_by_reason", {})
    refused = errors.get("overloaded", 0)
    p99 = top.get("overloaded_p99_ms")
    met = refused > 0 and set(errors) == {"overloaded"} and p99 is not None and p99 <= REFUSED_AT_ONCE_MS
    return {"refused": refused, "refused_p99_ms": p99, "target_ms": REFUSED_AT_ONCE_MS, "met": met}


def run(quick: bool) -> dict[str, Any]:
    with stop_on_sigterm():
        return _run(choose_size(quick), quick)


def _run(size: Size, quick: bool) -> dict[str, Any]:
    started = time.monotonic()
    info = machine_info()
    texts = sample_texts(max(size.baseline_tasks, 100), seed=SEED)
    online = {"BATCH_MAX_QUEUE_S": str(ONLINE_QUEUE_S)}
    with (
        BareLoops(texts[: size.baseline_tasks], str(resolve_device("auto"))) as loops,
        ServiceStack(serve_models=MODEL, settings=online) as stack,
    ):
        served = run_async(lambda: drive(stack, loops, texts, size))
        settings = stack.service_settings()
    closed_ratios = ratios(served["closed"])
    top = served["open"][-1] if served["open"] else {}
    open_met = top.get("kept_of_peak") is not None and top["kept_of_peak"] >= OPEN_KEPT_TARGET
    shed = shedding(top)
    return {
        "scenario": "serve",
        "quick": quick,
        "device": info["device"],
        "ratios": {name: entry["ratio"] for name, entry in closed_ratios.items()},
        "open_kept_at_top_load": top.get("kept_of_peak"),
        "bare_loops_tasks_per_s": bare_means(served["closed"]),  # each level's own runs: in `closed`
        "closed": served["closed"],
        "open": served["open"],
        "closed_peak_tasks_per_s": served["closed_peak_tasks_per_s"],
        "targets": {
            **closed_ratios,
            "open_kept": {"measured": top.get("kept_of_peak"), "target": OPEN_KEPT_TARGET, "met": open_met},
            "open_excess_refused_at_once": shed,
        },
        "size": asdict(size),
        "machine": {**info, "load_average_at_end": load_average()},
        "ectrans_settings": settings,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
