"""`ectrans bench baselines`: ECTrans against the baselines a user would pick, in one run.

Same machine, same model (the packaged all-MiniLM-L6-v2), same inputs (seeded samples of the shared
sentences), measured in interleaved rounds so that other load on a shared host slows every method
alike; each method's best round counts, and the per-round ratios are kept beside it.

- ECTrans: the real stack (private redis-server, dispatcher and worker processes), every input
  submitted at once through `AsyncClient.submit_many`, priority batch, default ECTRANS_* settings
  (any ECTRANS_* variable in the environment passes through to the services).
- per request: one process, one task at a time at batch 1 (the prototype's baseline), on all cores
  and on one thread; the better counts (batch 1 on a busy host often does better on one thread).
- multitask: K processes with a model copy each and cores/K torch threads, so they do not
  oversubscribe (K = cores on a CPU, 4 on a GPU; ECTRANS_BENCH_K overrides), sharing one work list.
- plain loop: `transformers` on pre-tokenised, padded batches, sorted by length (as
  sentence-transformers' `encode` does) at each batch size (all cores; and one thread at batch 32);
  the best is the practical upper bound. The same loop in arrival order at batch 32 is reported
  beside it, to show what padding costs.

Then: ECTrans throughput and latency from 1 to all tasks in flight; real-time latency and deadline
misses under Poisson load (ECTrans vs per request); memory (PSS, GPU memory); the Redis path.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from ectrans.bench import redis_path
from ectrans.bench.baselines_report import draw, markdown
from ectrans.bench.harness import (
    MiB,
    ServiceStack,
    best,
    burst,
    closed_loop,
    cores,
    load_average,
    machine_info,
    minilm_path,
    note,
    poisson_run,
    progress,
    run_async,
    size_for,
    stop_on_sigterm,
    write_report,
)
from ectrans.bench.reference import ModelConfig, ModelProcesses
from ectrans.bench.workload import bulk, percentile, realtime
from ectrans.client import AsyncClient
from ectrans.common.registry import ModelSpec, build_spec
from ectrans.models.device import resolve_device

SEED = 2024
MODEL = "minilm"
TARGETS = {"vs_per_request_cpu": 2.0, "vs_per_request_gpu": 5.0, "of_upper_bound": 0.9, "redis_tasks_per_s": 10_000}
REDIS_ADDED_MS_TARGET = 1.0


@dataclass(frozen=True)
class Size:
    tasks: int
    rounds: int
    batch_sizes: tuple[int, ...]
    in_flight: tuple[int, ...]
    realtime_loads: tuple[float, ...]  # arrival rate as a multiple of the per-request throughput
    realtime_seconds: float
    deadline_ms: int


QUICK = Size(
    tasks=128,
    rounds=2,
    batch_sizes=(16, 32, 64),
    in_flight=(1, 8, 64),
    realtime_loads=(0.5, 1.5),
    realtime_seconds=1.5,
    deadline_ms=250,
)
FULL = Size(
    tasks=1000,
    rounds=3,
    batch_sizes=(8, 16, 32, 64, 128),
    in_flight=(1, 4, 16, 64, 256),
    realtime_loads=(0.5, 0.9, 1.5),
    realtime_seconds=8.0,
    deadline_ms=250,
)
# For the smoke test (ECTRANS_BENCH_SIZE=tiny): every code path, a few tasks each.
TINY = Size(
    tasks=16,
    rounds=1,
    batch_sizes=(16,),
    in_flight=(1,),
    realtime_loads=(1.0,),
    realtime_seconds=0.5,
    deadline_ms=250,
)


def choose_size(quick: bool) -> Size:
    return size_for(quick, QUICK, FULL, TINY)


def _multitask_k(device_type: str) -> int:
    if env := os.environ.get("ECTRANS_BENCH_K"):
        return max(1, int(env))
    return cores() if device_type == "cpu" else 4


def _minilm() -> ModelSpec:
    return build_spec(MODEL, {"path": str(minilm_path())})


def _token_counts(spec: ModelSpec, texts: list[str]) -> list[int]:
    import transformers

    from ectrans.models.encoder import EncoderTokenizer

    tokenizer = transformers.AutoTokenizer.from_pretrained(spec.path, local_files_only=True)
    return EncoderTokenizer(tokenizer, spec.max_tokens).count_tokens(texts)


# 1. Throughput rounds ---------------------------------------------------------------------------------


@dataclass
class Rounds:
    """Tasks/s of every variant in every round. A method's figure is its best variant's best round:
    a baseline gets its best thread count and batch size, as a user tuning it would."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    padded_tokens: dict[str, int] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, method: str, variant: dict[str, Any], tasks_per_s: float) -> None:
        name = f"{method}:" + ",".join(f"{k}={v}" for k, v in variant.items())
        self.samples.setdefault(name, []).append(tasks_per_s)
        self.variants[name] = {"method": method, **variant}

    def of(self, method: str) -> dict[str, list[float]]:
        return {name: v for name, v in self.samples.items() if self.variants[name]["method"] == method}

    def best_variant(self, method: str) -> tuple[str, float]:
        variants = self.of(method)
        name = max(variants, key=lambda n: best(variants[n]))
        return name, best(variants[name])

    def in_round(self, method: str, index: int) -> float:
        return max(v[index] for v in self.of(method).values())

    def per_round_ratios(self) -> list[dict[str, float]]:
        ratios = []
        for i in range(len(self.samples["ectrans:"])):
            ect = self.in_round("ectrans", i)
            ratios.append(
                {
                    "vs_per_request": round(ect / self.in_round("per_request", i), 3),
                    "vs_multitask": round(ect / self.in_round("multitask", i), 3),
                    "of_upper_bound": round(ect / self.in_round("plain_sorted", i), 3),
                }
            )
        return ratios


def _ectrans_burst(stack: ServiceStack, texts: list[str]) -> float:
    async def go() -> float:
        async with AsyncClient(stack.url, prefix=stack.prefix) as client:
            return await burst(client, MODEL, "embed", texts)

    seconds: float = run_async(go)
    return len(texts) / seconds


def _one_round(rounds: Rounds, size: Size, texts: list[str], procs: dict[str, Any], advance: Any) -> None:
    """Every method once, one after another (the order is the same in every round)."""
    solo, multi, stack = procs["solo"], procs["multi"], procs["stack"]
    one_thread = multi.config.threads
    seconds, items = solo.per_request()
    rounds.add("per_request", {"threads": solo.config.threads}, items / seconds)
    advance()
    if one_thread != solo.config.threads:  # batch 1 on a busy host can do better on one thread
        seconds, items = multi.per_request(processes=1)
        rounds.add("per_request", {"threads": one_thread}, items / seconds)
        advance()
    seconds, items = multi.per_request()
    rounds.add("multitask", {"processes": len(multi.conns), "threads_each": one_thread}, items / seconds)
    advance()
    for batch_size in size.batch_sizes:
        timing = solo.batched(batch_size, sort=True)
        rounds.add("plain_sorted", {"batch": batch_size, "threads": solo.config.threads}, timing.items / timing.seconds)
        rounds.padded_tokens[f"sorted_batch_{batch_size}"] = timing.padded_tokens
        advance()
    if one_thread != solo.config.threads:
        timing = multi.batched(32, sort=True)
        rounds.add("plain_sorted", {"batch": 32, "threads": one_thread}, timing.items / timing.seconds)
        advance()
    timing = solo.batched(32, sort=False)
    rounds.add("plain_arrival", {"batch": 32, "threads": solo.config.threads}, timing.items / timing.seconds)
    rounds.padded_tokens["arrival_batch_32"] = timing.padded_tokens
    advance()
    rounds.add("ectrans", {}, _ectrans_burst(stack, texts))
    advance()


def _throughput_rounds(size: Size, texts: list[str], procs: dict[str, Any], bars: Any) -> Rounds:
    rounds = Rounds()
    step = bars.add_task("throughput rounds", total=size.rounds * (7 + len(size.batch_sizes)))
    _ectrans_burst(procs["stack"], texts[: min(64, len(texts))])  # warm-up of the served model
    for index in range(size.rounds):
        _one_round(rounds, size, texts, procs, lambda: bars.advance(step))
        note(
            f"round {index + 1}/{size.rounds}: ECTrans {rounds.in_round('ectrans', index):.1f}/s, per request "
            f"{rounds.in_round('per_request', index):.1f}/s, multitask {rounds.in_round('multitask', index):.1f}/s, "
            f"plain sorted best {rounds.in_round('plain_sorted', index):.1f}/s"
        )
    return rounds


# 2. In flight and real time -------------------------------------------------------------------------


def _in_flight_sweep(size: Size, texts: list[str], stack: ServiceStack) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        rows = []
        async with AsyncClient(stack.url, prefix=stack.prefix) as client:
            for in_flight in (*size.in_flight, len(texts)):
                n = min(len(texts), max(16, in_flight * 4))
                seconds, latencies = await closed_loop(client, MODEL, "embed", texts[:n], in_flight)
                rows.append(
                    {
                        "in_flight": in_flight,
                        "tasks": n,
                        "tasks_per_s": round(n / seconds, 2),
                        "server_p50_ms": percentile(latencies, 50),
                        "server_p99_ms": percentile(latencies, 99),
                    }
                )
        return rows

    return run_async(go)


def _latency_summary(latencies: list[float], missed: Counter[str], tasks: int) -> dict[str, Any]:
    """Percentiles over the tasks that got a result (None when none did); misses over all tasks."""
    return {
        "p50_ms": round(percentile(latencies, 50), 2) if latencies else None,
        "p99_ms": round(percentile(latencies, 99), 2) if latencies else None,
        "miss_rate": round(sum(missed.values()) / max(tasks, 1), 4),
        "misses": dict(missed),
    }


def _realtime_runs(
    size: Size, per_request_rate: float, stack: ServiceStack, baseline: ModelProcesses
) -> list[dict[str, Any]]:
    """Poisson arrivals at multiples of the per-request throughput: ECTrans (priority realtime, with a
    deadline) against the per-request process serving the same arrivals in order."""
    rows = []
    for load in size.realtime_loads:
        rate = load * per_request_rate
        n = int(min(2000, max(20, rate * size.realtime_seconds)))
        work = realtime(n, rate, seed=SEED + int(load * 100))
        assert work.arrivals is not None
        arrivals = work.arrivals

        async def go(
            texts: list[str] = work.texts, at: list[float] = arrivals, send: bool = True
        ) -> tuple[list[float], Counter[str]]:
            async with AsyncClient(stack.url, prefix=stack.prefix) as client:
                return await poisson_run(
                    client, MODEL, "embed", texts, at, deadline_ms=size.deadline_ms, send_deadline=send
                )

        ect_latencies, ect_missed = run_async(go)
        free_latencies, free_missed = run_async(lambda: go(send=False))
        base_latencies = baseline.realtime(work.texts, arrivals)
        base_missed = Counter(late=sum(latency > size.deadline_ms for latency in base_latencies))
        rows.append(
            {
                "load_x_per_request": load,
                "rate_per_s": round(rate, 2),
                "tasks": n,
                "deadline_ms": size.deadline_ms,
                "workload": work.describe(),
                "ectrans": _latency_summary(ect_latencies, ect_missed, n),
                "ectrans_no_deadline_sent": _latency_summary(free_latencies, free_missed, n),
                "per_request": _latency_summary(base_latencies, base_missed, n),
            }
        )
        note(f"real time at {rate:.1f}/s: ECTrans {rows[-1]['ectrans']}, per request {rows[-1]['per_request']}")
    return rows


# 3. The run ---------------------------------------------------------------------------------------------


def _figures(rounds: Rounds, tokens_per_task: float) -> dict[str, Any]:
    def entry(method: str) -> dict[str, Any]:
        name, value = rounds.best_variant(method)
        variant = {k: v for k, v in rounds.variants[name].items() if k != "method"}
        return {
            "tasks_per_s": round(value, 2),
            "tokens_per_s": round(value * tokens_per_task, 1),
            **variant,
            "samples": [round(x, 2) for x in rounds.samples[name]],
            "variants": {n.split(":", 1)[1]: [round(x, 2) for x in v] for n, v in rounds.of(method).items()},
        }

    figures = {method: entry(method) for method in ("ectrans", "per_request", "multitask", "plain_sorted")}
    figures["plain_arrival"] = entry("plain_arrival")
    figures["padded_tokens"] = rounds.padded_tokens
    return figures


def _memory(stack: ServiceStack, solo: ModelProcesses, multi: ModelProcesses) -> dict[str, Any]:
    """PSS (and on a GPU, torch's reserved memory) of each side, all processes alive at once."""
    out: dict[str, Any] = {"ectrans_pss_mib": stack.memory()}
    for name, procs in (("per_request", solo), ("multitask", multi)):
        answers = procs.memory()
        out[f"{name}_pss_mib"] = round(sum(int(a["pss"]) for a in answers) / MiB, 1)
        if any("gpu_reserved" in a for a in answers):
            out[f"{name}_gpu_reserved_mib"] = round(sum(int(a.get("gpu_reserved", 0)) for a in answers) / MiB, 1)
    return out


def _targets(result: dict[str, Any], device_type: str) -> dict[str, Any]:
    vs_target = TARGETS["vs_per_request_gpu" if device_type == "cuda" else "vs_per_request_cpu"]
    checks = {
        "throughput_vs_per_request": (result["throughput_ratio_vs_per_request"], vs_target, "ge"),
        "ratio_of_upper_bound": (result["ratio_of_upper_bound"], TARGETS["of_upper_bound"], "ge"),
        "redis_path_tasks_per_s": (result["redis_path_tasks_per_s"], TARGETS["redis_tasks_per_s"], "ge"),
        "redis_path_added_latency_ms": (result["redis_path_added_latency_ms"], REDIS_ADDED_MS_TARGET, "le"),
    }
    return {
        name: {"measured": value, "target": target, "met": value >= target if how == "ge" else value <= target}
        for name, (value, target, how) in checks.items()
    }


def run(quick: bool) -> dict[str, Any]:
    with stop_on_sigterm():
        return _run(choose_size(quick), quick)


def _run(size: Size, quick: bool) -> dict[str, Any]:
    started = time.monotonic()
    info = machine_info()
    spec = _minilm()
    device = resolve_device("auto")
    k = _multitask_k(device.type)
    threads_each = max(1, cores() // k)
    work = bulk(size.tasks, seed=SEED)
    tokens = _token_counts(spec, work.texts)
    tokens_per_task = sum(tokens) / len(tokens)
    note(f"baselines: {work.describe()}; {tokens_per_task:.1f} tokens per task; multitask K={k}")
    solo_config = ModelConfig(str(spec.path), spec.max_tokens, str(device), threads=cores())
    multi_config = ModelConfig(str(spec.path), spec.max_tokens, str(device), threads=threads_each)
    with contextlib.ExitStack() as stack_of, progress() as bars:
        stack = stack_of.enter_context(ServiceStack(serve_models=MODEL).launch())
        solo = stack_of.enter_context(ModelProcesses(1, solo_config))
        multi = stack_of.enter_context(ModelProcesses(k, multi_config))
        stack.wait_ready()
        solo.set_texts(work.texts)
        multi.set_texts(work.texts)
        note(f"started in {time.monotonic() - started:.1f}s")
        loaded = _memory(stack, solo, multi)
        rounds = _throughput_rounds(size, work.texts, {"stack": stack, "solo": solo, "multi": multi}, bars)
        memory = {
            "after_load": loaded,
            "after_runs": _memory(stack, solo, multi),
            "note": "PSS of every process, all alive at once (shared library pages split among them); the "
            "per-request process also ran the plain loops, so after the runs it holds their largest batch",
        }
        in_flight = _in_flight_sweep(size, work.texts, stack)
        per_request, per_request_rate = rounds.best_variant("per_request")
        baseline = solo if rounds.variants[per_request]["threads"] == solo.config.threads else multi
        rt = _realtime_runs(size, per_request_rate, stack, baseline)
        settings = stack.service_settings()
    note("redis path (no-op model)")
    redis = redis_path.measure(redis_path.choose_size(quick))
    figures = _figures(rounds, tokens_per_task)
    ectrans = figures["ectrans"]["tasks_per_s"]
    ratios = rounds.per_round_ratios()
    result: dict[str, Any] = {
        "scenario": "baselines",
        "quick": quick,
        "device": info["device"],
        "throughput_ratio_vs_per_request": round(ectrans / figures["per_request"]["tasks_per_s"], 3),
        "throughput_ratio_vs_multitask": round(ectrans / figures["multitask"]["tasks_per_s"], 3),
        "ratio_of_upper_bound": round(ectrans / figures["plain_sorted"]["tasks_per_s"], 3),
        "redis_path_tasks_per_s": redis["tasks_per_s"],
        "redis_path_added_latency_ms": redis["added_latency_p50_ms"],
        "median_round_ratios": {name: round(statistics.median(r[name] for r in ratios), 3) for name in ratios[0]},
        "machine": {**info, "load_average_at_end": load_average()},
        "workload": {"throughput": work.describe(), "tokens_per_task": round(tokens_per_task, 1), "seed": SEED},
        "size": asdict(size),
        "throughput": figures,
        "ratios_per_round": ratios,
        "in_flight": in_flight,
        "realtime": rt,
        "memory": memory,
        "redis_path": redis,
        "ectrans_settings": settings,
    }
    result["targets"] = _targets(result, device.type)
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    result["report"] = write_report("baselines", result, markdown(result), lambda fig: draw(fig, result))
    return result
