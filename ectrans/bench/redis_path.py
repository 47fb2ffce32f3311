"""What the Redis path itself costs: dispatcher + worker + result with the no-op model.

- sustained tasks/s with many tasks in flight (and how it grows from 1 in flight);
- one task's latency at low load, against a bare XADD → XREADGROUP → XADD round trip measured in
  the same run (an echo process that answers at once), so the difference is ECTrans's own cost;
- CPU per task of each process at each in-flight level (dispatcher, worker, redis-server, and this
  process, which drives the load through the client library): what bounds the rate on a small host.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from typing import Any

import psutil
import redis
import redis.asyncio as aioredis

from ectrans.bench.harness import (
    ServiceStack,
    closed_loop,
    command_line,
    cores,
    cpu_model,
    git_revision,
    load_average,
    note,
    run_async,
    single_latencies,
)
from ectrans.bench.workload import percentile, sample_texts
from ectrans.client import AsyncClient

NOOP_MODELS_JSON = '{"noop": {"kind": "noop"}}'
ECHO_STREAM = "bench:echo:in"
ECHO_REPLY = "bench:echo:out"
ECHO_GROUP = "echo"


@dataclass(frozen=True)
class RedisPathSize:
    in_flight: tuple[int, ...]
    tasks_at_most: int
    latency_probes: int
    seconds_per_level: float  # aim; the task count per level follows from the rate at 1 in flight


QUICK = RedisPathSize(in_flight=(1, 16, 256, 2048), tasks_at_most=20_000, latency_probes=300, seconds_per_level=2.0)
FULL = RedisPathSize(
    in_flight=(1, 4, 16, 64, 256, 1024, 4096), tasks_at_most=100_000, latency_probes=2000, seconds_per_level=5.0
)
TINY = RedisPathSize(in_flight=(1, 64), tasks_at_most=500, latency_probes=30, seconds_per_level=0.2)


def choose_size(quick: bool) -> RedisPathSize:
    if os.environ.get("ECTRANS_BENCH_SIZE") == "tiny":
        return TINY
    return QUICK if quick else FULL


# The stack for the Redis path: the no-op model, and no batching wait for a lone real-time task
# (a wait for batch-mates is scheduling policy, not the cost of the path; see the report).
STACK_SETTINGS = {"MODELS_JSON": NOOP_MODELS_JSON, "RT_MAX_WAIT_MS": "0", "MAX_QUEUE_LEN": "1000000"}


class CpuMeter:
    """CPU seconds used so far by each process of the path: the services, this process (the client)
    and redis-server (from its own INFO, so no pid is needed)."""

    def __init__(self, stack: ServiceStack) -> None:
        self.processes = {name: psutil.Process(proc.pid) for name, proc in stack.processes.items()}
        self.processes["client"] = psutil.Process()
        self.redis = redis.Redis.from_url(stack.url)

    def read(self) -> dict[str, float]:
        used = {name: sum(process.cpu_times()[:2]) for name, process in self.processes.items()}
        info: Any = self.redis.info("cpu")
        used["redis"] = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        return used

    def close(self) -> None:
        self.redis.close()


def per_task_us(before: dict[str, float], after: dict[str, float], tasks: int) -> dict[str, float]:
    return {name: round((after[name] - before[name]) / tasks * 1e6, 1) for name in after}


def _echo_main(url: str, ready: Event, stop: Event) -> None:
    """The bare round trip's far side: read each entry in a group and XADD it to the reply stream."""
    client = redis.Redis.from_url(url)
    with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: made by an earlier run
        client.xgroup_create(ECHO_STREAM, ECHO_GROUP, id="0", mkstream=True)
    ready.set()
    while not stop.is_set():
        reply: Any = client.xreadgroup(ECHO_GROUP, "echo", {ECHO_STREAM: ">"}, count=100, block=100)
        for _, entries in reply or []:
            for _, fields in entries:
                client.xadd(ECHO_REPLY, fields)
    client.close()


async def _bare_round_trips(url: str, n: int) -> list[float]:
    """Client side: XADD a task-sized entry, then a blocking XREAD for the echo; ms each."""
    writer, reader = aioredis.Redis.from_url(url), aioredis.Redis.from_url(url)
    fields: dict[Any, Any] = {"model": "noop", "op": "noop", "input": "a short sentence", "id": "x" * 32}
    last = "0-0"
    latencies = []
    try:
        for _ in range(n + 20):  # the first 20 warm up connections and the echo process
            started = time.perf_counter()
            await writer.xadd(ECHO_STREAM, fields)
            reply: Any = await reader.xread({ECHO_REPLY: last}, count=1, block=5000)
            latencies.append((time.perf_counter() - started) * 1000)
            last = reply[0][1][-1][0]
    finally:
        await writer.aclose()
        await reader.aclose()
    return latencies[20:]


def bare_round_trip(url: str, n: int) -> list[float]:
    context = mp.get_context("spawn")
    ready, stop = context.Event(), context.Event()
    echo = context.Process(target=_echo_main, args=(url, ready, stop), daemon=True)
    echo.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("the echo process did not start")
        return run_async(lambda: _bare_round_trips(url, n))
    finally:
        stop.set()
        echo.join(10)
        if echo.is_alive():
            echo.kill()


def _summary(latencies: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(latencies, 50), 3),
        "p99_ms": round(percentile(latencies, 99), 3),
        "mean_ms": round(sum(latencies) / max(len(latencies), 1), 3),
    }


async def _stack_figures(stack: ServiceStack, size: RedisPathSize) -> dict[str, Any]:
    meter = CpuMeter(stack)
    try:
        return await _figures(stack, size, meter)
    finally:
        meter.close()


async def _figures(stack: ServiceStack, size: RedisPathSize, meter: CpuMeter) -> dict[str, Any]:
    texts = sample_texts(size.tasks_at_most, seed=11, mix="short")
    async with AsyncClient(stack.url, prefix=stack.prefix) as client:
        await closed_loop(client, "noop", "noop", texts[: min(2000, len(texts))], 256)  # warm-up
        single = await single_latencies(client, "noop", "noop", texts[: size.latency_probes], priority="realtime")
        single_batch = await single_latencies(client, "noop", "noop", texts[:50], priority="batch")
        levels = []
        rate_at_one = len(single) / (sum(single) / 1000)
        for in_flight in size.in_flight:
            # Enough tasks for about `seconds_per_level` at a rate that grows with in-flight tasks.
            n = int(min(size.tasks_at_most, max(200, rate_at_one * min(in_flight, 64) * size.seconds_per_level)))
            cpu_before = meter.read()
            seconds, latencies = await closed_loop(client, "noop", "noop", texts[:n], in_flight)
            levels.append(
                {
                    "in_flight": in_flight,
                    "tasks": n,
                    "tasks_per_s": round(n / seconds, 1),
                    "server_p50_ms": percentile(latencies, 50),
                    "server_p99_ms": percentile(latencies, 99),
                    "cpu_us_per_task": per_task_us(cpu_before, meter.read(), n),
                }
            )
            note(f"redis path: {in_flight} in flight → {n / seconds:,.0f} tasks/s")
    return {"single_realtime": single, "single_batch": single_batch, "levels": levels}


def measure(size: RedisPathSize) -> dict[str, Any]:
    """The Redis path's figures (one private Redis, dispatcher and worker processes, no-op model)."""
    with ServiceStack(serve_models="noop", settings=STACK_SETTINGS) as stack:
        figures = run_async(lambda: _stack_figures(stack, size))
        bare = bare_round_trip(stack.url, size.latency_probes)
    levels = figures["levels"]
    best = max(levels, key=lambda level: level["tasks_per_s"])
    sustained = best["tasks_per_s"]
    single = _summary(figures["single_realtime"])
    bare_summary = _summary(bare)
    return {
        "tasks_per_s": sustained,
        "single_task": single,
        "single_task_batch_class": _summary(figures["single_batch"]),
        "bare_round_trip": bare_summary,
        "added_latency_p50_ms": round(single["p50_ms"] - bare_summary["p50_ms"], 3),
        "in_flight": levels,
        "cpu_us_per_task_at_best": best["cpu_us_per_task"],
        "settings": {k: v for k, v in STACK_SETTINGS.items() if k != "MODELS_JSON"},
        "how": (
            "no-op model through a private redis-server, dispatcher and worker processes, driven by one "
            "AsyncClient; tasks/s = best sustained rate over the in-flight levels; single-task latency = "
            "client-side submit→result, one at a time, priority realtime; bare = XADD, echo process "
            "XREADGROUP+XADD, blocking XREAD, on the same Redis; cpu_us_per_task = CPU seconds of each process "
            "over a level (psutil; redis-server from INFO cpu), per task"
        ),
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m ectrans.bench.redis_path [--quick]`: the Redis path alone (what `bench baselines`
    reports under `redis_path`, without the model baselines), as JSON on stdout."""
    parser = argparse.ArgumentParser(prog="python -m ectrans.bench.redis_path", description=main.__doc__)
    parser.add_argument("--quick", action="store_true", help="the quick size (about half a minute)")
    args = parser.parse_args(argv)
    machine = {
        "cpu": cpu_model(),
        "cores": cores(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command_line(),
        "git": git_revision(),
        "load_average_at_start": load_average(),
    }
    result = measure(choose_size(args.quick))
    result["machine"] = {**machine, "load_average_at_end": load_average()}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":  # the bare round trip's echo process is spawned: import-safe only under this guard
    sys.exit(main())
