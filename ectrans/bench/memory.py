"""Memory and throughput of K executor processes sharing one copy of the weights, against K
processes that each load their own (the prototype's "multitask" baseline).

For each model, serving dtype and K:

- `shared`: one weight holder, a preloaded zygote, K executor processes forked from it and
  attached to the holder's weights (`SharedExecutorPool`, as the worker runs it).
- `independent`: K fresh interpreters, each `from_pretrained` in the serving dtype (the baseline).
- `independent_forked` (full size only): K processes forked from the zygote, each loading its own
  copy: the same per-process runtime as `shared`, so the difference is the weights alone.

Memory on CPU is the sum of the group's PSS (`/proc/<pid>/smaps_rollup`: a page shared by n
processes counts 1/n in each, so the weights count once), measured after the throughput run; on
CUDA it is the device memory the group added (NVML), with NVML's per-process figures and each
executor's torch allocator view beside it. Every process's figures are broken down into its
runtime (private bytes before any weight: interpreter, torch, transformers; plus the CUDA context
on a GPU), its private weights (zero when shared) and what serving added (activations, caches).
`saving_vs_independent` is 1 - shared / independent. Throughput is inputs per second with every
batch submitted at once, K processes each with cores // K threads.

Models: the packaged MiniLM (embed), a Marian of the prototype's size (6+6 layers, d_model 512,
about 93M parameters, random weights) and, at full size, a T5-large shape (24+24 layers,
d_model 1024, about 737M parameters, random weights) when memory allows the baseline.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from ectrans.bench.harness import cores, load_average, machine_info, markdown_table, minilm_path, note, write_report
from ectrans.bench.workload import load_sentences
from ectrans.common.registry import ModelSpec, build_spec
from ectrans.models.api import Request
from ectrans.sharing.process_pool import SharedExecutorPool

MiB = 2**20
WORKLOAD = "sentences_100.txt"
HEADROOM = 0.6  # run a baseline only if it needs less than this share of the memory available
LARGE_BATCHES = 4  # the T5-large shape decodes slowly on a CPU: fewer batches


@dataclass(frozen=True)
class Size:
    models: tuple[str, ...]
    dtypes: tuple[str, ...]
    ks: tuple[int, ...]
    batches: int
    embed_batch: int
    translate_batch: int
    new_tokens: int
    repeats: int
    forked_baseline: bool


QUICK = Size(
    models=("minilm", "prototype-marian"),
    dtypes=("float32", "bfloat16"),
    ks=(1, 2),
    batches=6,
    embed_batch=8,
    translate_batch=4,
    new_tokens=4,
    repeats=1,
    forked_baseline=False,
)
FULL = Size(
    models=("minilm", "prototype-marian", "t5-large"),
    dtypes=("float32", "bfloat16"),
    ks=(1, 2, 4),
    batches=12,
    embed_batch=16,
    translate_batch=4,
    new_tokens=8,
    repeats=2,
    forked_baseline=True,
)
# ECTRANS_BENCH_SIZE=tiny: the smallest run that takes every code path (the GPU proof's dry run).
TINY = Size(
    models=("minilm",),
    dtypes=("float32",),
    ks=(1, 2),
    batches=2,
    embed_batch=4,
    translate_batch=2,
    new_tokens=2,
    repeats=1,
    forked_baseline=False,
)
# ECTRANS_BENCH_SIZE=gpu: the GPU proof's size (a few minutes on an H100): K = 1, 2, 4 on the
# prototype-sized Marian, whose weights in fp32 are about the size of one CUDA context.
GPU = Size(
    models=("prototype-marian",),
    dtypes=("float32",),
    ks=(1, 2, 4),
    batches=16,
    embed_batch=32,
    translate_batch=8,
    new_tokens=8,
    repeats=1,
    forked_baseline=False,
)
DESCRIPTIONS = {
    "minilm": "all-MiniLM-L6-v2 (packaged), 22.7M parameters, embed",
    "prototype-marian": "Marian 6+6 layers, d_model 512, vocabulary 95k, about 93M parameters, random weights",
    "t5-large": "T5-large shape, 24+24 layers, d_model 1024, about 737M parameters, random weights",
}


def model_path(name: str, root: Path) -> Path:
    if name == "minilm":
        return minilm_path()
    from ectrans.models.synthetic import make_prototype_marian, make_t5_large_shape

    note(f"building {DESCRIPTIONS[name]}")
    maker = make_prototype_marian if name == "prototype-marian" else make_t5_large_shape
    return maker(root / name)


# 1. Measuring -------------------------------------------------------------------------------------------


def gpu_used(pids: list[int]) -> dict[str, Any] | None:
    """Device memory used on every GPU (NVML) and per process of `pids`; None without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        device_used, device_free, per_process = 0, 0, {}
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            device_used += int(info.used)
            device_free += int(info.free)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid in pids and proc.usedGpuMemory:
                    per_process[str(proc.pid)] = int(proc.usedGpuMemory)
        return {"device_used": device_used, "device_free": device_free, "per_process": per_process}
    finally:
        pynvml.nvmlShutdown()


def snapshot(pool: SharedExecutorPool, gpu_baseline: int | None) -> dict[str, Any]:
    memory = pool.measure_memory()
    infos = pool.executor_info()
    processes = []
    for info, figures in zip(infos, memory["executors"], strict=False):
        processes.append(
            {
                "pid": info.get("pid"),
                "pss": figures["pss"],
                "pss_anon": figures["pss_anon"],
                "pss_file": figures["pss_file"],
                "pss_shmem": figures["pss_shmem"],
                "uss": figures["uss"],
                "weights_pss": figures["weights_pss"],
                "private": figures["private"],
                "runtime": info.get("runtime_bytes"),
                "private_at_ready": info.get("private_bytes"),
                "attach_s": info.get("attach_s"),
                "startup_s": info.get("startup_s"),
                "cuda_allocated": info.get("cuda_allocated"),
                "cuda_reserved": info.get("cuda_reserved"),
            }
        )
    group = [m for m in (*memory["executors"], memory["holder"], memory["zygote"]) if m]
    result: dict[str, Any] = {
        "pss_sum": memory["pss_sum"],
        # without file-backed pages (libraries shared with every torch process on the host,
        # checkpoints memory-mapped by from_pretrained): what the group holds in anonymous and
        # shared memory, which the kernel cannot drop under pressure
        "pss_anon_shmem_sum": sum(m["pss_anon"] + m["pss_shmem"] for m in group),
        "holder_pss": (memory["holder"] or {}).get("pss"),
        "zygote_pss": (memory["zygote"] or {}).get("pss"),
        "processes": processes,
    }
    if gpu_baseline is not None:
        pids = [p for p in [*memory["executor_pids"], memory["holder_pid"]] if p]
        gpu = gpu_used(pids)
        if gpu is not None:
            result["device_used_added"] = gpu["device_used"] - gpu_baseline
            result["nvml_per_process"] = gpu["per_process"]
            result["device_split"] = device_split(pool, result["device_used_added"], infos)
    return result


def device_split(pool: SharedExecutorPool, added: int, infos: list[dict[str, Any]]) -> dict[str, int]:
    """The device memory the group added, split by what holds it: the holder's allocator (the
    shared weights), the executors' allocators (activations and caches, plus their own weights
    when not shared) and the rest, the CUDA contexts (one per process: the holder and each
    executor), which no allocator sees."""
    holder = int(pool.holder_info.get("cuda_reserved", 0)) if pool.share else 0
    executors = sum(int(info.get("cuda_reserved") or 0) for info in infos)
    processes = len(infos) + (1 if pool.share else 0)
    contexts = added - holder - executors
    return {
        "weights_shared": holder,
        "executors_allocators": executors,
        "contexts": contexts,
        "processes": processes,
        "per_context": contexts // max(1, processes),
    }


def drive(pool: SharedExecutorPool, op: str, batches: list[list[str]], params: dict[str, Any]) -> tuple[float, str]:
    """Inputs per second with every batch submitted at once, and a digest of the outputs."""
    started = time.perf_counter()
    futures = [pool.submit(Request(op, batch, params)) for batch in batches]
    outputs = [future.result(timeout=1800)[0] for future in futures]
    elapsed = time.perf_counter() - started
    digest = hashlib.sha256()
    for results in outputs:
        for item in results:
            digest.update(repr(item.error).encode())
            output = item.output
            digest.update(output.tobytes() if hasattr(output, "tobytes") else repr(output).encode())
    return sum(len(b) for b in batches) / elapsed, digest.hexdigest()[:16]


# 2. One configuration -------------------------------------------------------------------------------------


@dataclass
class Workload:
    op: str
    batches: list[list[str]]
    params: dict[str, Any]


def workload(spec: ModelSpec, size: Size) -> Workload:
    sentences = load_sentences(WORKLOAD)
    if spec.kind == "encoder":
        per = size.embed_batch
        params: dict[str, Any] = {}
        op = "embed"
    else:
        per = size.translate_batch
        params = {"max_new_tokens": size.new_tokens, "num_beams": 1}
        op = "translate"
    count = min(size.batches, LARGE_BATCHES) if spec.name == "t5-large" else size.batches
    texts = (sentences * (count * per // len(sentences) + 1))[: count * per]
    return Workload(op, [texts[i : i + per] for i in range(0, len(texts), per)], params)


def fits(k: int, weights_bytes: int, device: str) -> bool:
    """Whether K private copies (plus about 0.5 GiB per process) fit in the memory available now."""
    if device.startswith("cuda"):  # NVML, so that this process opens no CUDA context of its own
        gpu = gpu_used([])
        return gpu is None or k * weights_bytes < HEADROOM * int(gpu["device_free"])
    need = k * (weights_bytes + 512 * MiB)
    return need < HEADROOM * int(psutil.virtual_memory().available)


@contextlib.contextmanager
def opened(pool_factory: Callable[[], SharedExecutorPool]) -> Iterator[SharedExecutorPool]:
    pool = pool_factory()
    try:
        yield pool
    finally:
        pool.close()


def sweep(
    spec: ModelSpec, size: Size, mode: str, weights_bytes: int, *, device: str, gpu_baseline: int | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every K in one pool (resized between them): per K its memory and throughput, and the
    pool's holder report (shared mode)."""
    work = workload(spec, size)
    ks = [k for k in size.ks if mode == "shared" or fits(k, weights_bytes, device)]
    skipped = sorted(set(size.ks) - set(ks))
    rows: dict[str, Any] = {}
    holder: dict[str, Any] = {}
    if not ks:
        return {str(k): {"skipped": "not enough free memory for the baseline"} for k in skipped}, holder
    factory = {
        "shared": lambda: SharedExecutorPool(spec, ks[0], device=device, threads_per_process=_threads(ks[0])),
        "independent": lambda: SharedExecutorPool(
            spec, ks[0], device=device, threads_per_process=_threads(ks[0]), share=False, fork_server=False
        ),
        "independent_forked": lambda: SharedExecutorPool(
            spec, ks[0], device=device, threads_per_process=_threads(ks[0]), share=False
        ),
    }[mode]
    note(f"{spec.name} {spec.dtype} {mode}: K = {ks}")
    with opened(factory) as pool:
        holder = dict(pool.holder_info)
        for k in ks:
            if pool.processes != k:
                pool.resize(k, threads_per_process=_threads(k))
            ready = snapshot(pool, gpu_baseline)
            best, digest = 0.0, ""
            for _ in range(size.repeats):
                per_s, digest = drive(pool, work.op, work.batches, work.params)
                best = max(best, per_s)
            served = snapshot(pool, gpu_baseline)
            rows[str(k)] = {
                "threads_per_process": _threads(k),
                "ready": ready,
                "served": served,
                "items_per_s": round(best, 2),
                "outputs_digest": digest,
            }
        if mode == "shared":
            holder["restart"] = restart_timing(pool)
    for k in skipped:
        rows[str(k)] = {"skipped": "not enough free memory for the baseline"}
    return rows, holder


def restart_timing(pool: SharedExecutorPool) -> dict[str, Any]:
    """SIGKILL one executor process and time its replacement (fork, attach, warm-up)."""
    victim = pool.executor_pids()[0]
    os.kill(victim, signal.SIGKILL)
    started = time.perf_counter()
    if not pool.wait_settled(300, replaced=victim):
        return {"error": "the replacement was not ready in 300s"}
    info = pool.executor_info()[0]
    return {
        "replacement_ready_s": info.get("startup_s"),
        "replacement_attach_s": info.get("attach_s"),
        "seen_after_kill_s": round(time.perf_counter() - started, 3),
    }


def _threads(k: int) -> int:
    return max(1, cores() // k)


def compare(spec: ModelSpec, size: Size, gpu: bool) -> dict[str, Any]:
    device = "cuda" if gpu else "cpu"
    before = gpu_used([]) if gpu else None  # without NVML, memory is the host's PSS even on a GPU
    baseline = before["device_used"] if before is not None else None
    shared, holder = sweep(spec, size, "shared", 0, device=device, gpu_baseline=baseline)
    weights = int(holder.get("weights_bytes", 0))
    independent, _ = sweep(spec, size, "independent", weights, device=device, gpu_baseline=baseline)
    modes = {"shared": shared, "independent": independent}
    if size.forked_baseline:
        forked, _ = sweep(spec, size, "independent_forked", weights, device=device, gpu_baseline=baseline)
        modes["independent_forked"] = forked
    memory_key = "device_used_added" if baseline is not None else "pss_sum"
    per_k: dict[str, Any] = {}
    for k in map(str, size.ks):
        row: dict[str, Any] = {mode: rows.get(k) for mode, rows in modes.items()}
        mine, theirs = shared.get(k, {}), modes["independent"].get(k, {})
        if "served" in mine and "served" in theirs:
            row["saving_vs_independent"] = round(1 - mine["served"][memory_key] / theirs["served"][memory_key], 4)
            row["throughput_vs_independent"] = round(mine["items_per_s"] / theirs["items_per_s"], 3)
            row["outputs_identical"] = mine["outputs_digest"] == theirs["outputs_digest"]
            if "pss_anon_shmem_sum" in mine["served"] and "pss_anon_shmem_sum" in theirs["served"]:
                row["saving_vs_independent_anon_shmem"] = round(
                    1 - mine["served"]["pss_anon_shmem_sum"] / theirs["served"]["pss_anon_shmem_sum"], 4
                )
        forked = modes.get("independent_forked", {}).get(k, {})
        if "served" in mine and "served" in forked:
            row["saving_vs_independent_forked"] = round(
                1 - mine["served"][memory_key] / forked["served"][memory_key], 4
            )
        per_k[k] = row
    first = modes["independent"].get(str(size.ks[0]), {})
    fresh = [p.get("startup_s") for p in first.get("ready", {}).get("processes", [])]
    return {
        "weights_bytes": weights,
        "memory_measure": memory_key,
        "holder": {key: holder.get(key) for key in ("load_s", "export_s", "startup_s", "storages", "tensors")},
        "restart": holder.get("restart"),
        "fresh_load_s": max((f for f in fresh if f is not None), default=None),
        "k": per_k,
    }


# 3. The scenario --------------------------------------------------------------------------------------------


def run(quick: bool) -> dict[str, Any]:
    import torch

    size = {"tiny": TINY, "gpu": GPU}.get(os.environ.get("ECTRANS_BENCH_SIZE", ""), QUICK if quick else FULL)
    gpu = torch.cuda.is_available()
    result: dict[str, Any] = machine_info()
    result |= {
        "scenario": "memory",
        "quick": quick,
        "workload": WORKLOAD,
        "ks": list(size.ks),
        "dtypes": list(size.dtypes),
        "models": {},
        "saving_vs_independent": {},
    }
    with tempfile.TemporaryDirectory(prefix="ectrans-memory-models-") as tmp:
        for name in size.models:
            path = model_path(name, Path(tmp))
            result["models"][name] = {"description": DESCRIPTIONS[name]}
            for dtype in size.dtypes:
                spec = build_spec(name, {"path": str(path), "dtype": dtype})
                figures = compare(spec, size, gpu)
                result["models"][name][dtype] = figures
                saving = {k: row.get("saving_vs_independent") for k, row in figures["k"].items()}
                result["saving_vs_independent"].setdefault(name, {})[dtype] = saving
                note(f"{name} {dtype}: saving vs independent by K {saving}")
    result["load_average_at_end"] = load_average()
    result["report"] = write_report("memory", result, markdown(result), None)
    return result


def markdown(result: dict[str, Any]) -> str:
    rows = []
    for name, model in result["models"].items():
        for dtype in result["dtypes"]:
            figures = model.get(dtype, {})
            for k, row in figures.get("k", {}).items():
                shared, independent = row.get("shared") or {}, row.get("independent") or {}
                key = figures["memory_measure"]
                rows.append(
                    [
                        name,
                        dtype,
                        int(k),
                        figures["weights_bytes"] / MiB,
                        _mib(shared.get("served", {}).get(key)),
                        _mib(independent.get("served", {}).get(key)),
                        row.get("saving_vs_independent"),
                        shared.get("items_per_s"),
                        independent.get("items_per_s"),
                    ]
                )
    table = markdown_table(
        ["model", "dtype", "K", "weights MiB", "shared MiB", "independent MiB", "saving", "shared/s", "independent/s"],
        rows,
    )
    return (
        f"# Memory: shared weights vs independent copies\n\n"
        f"`{result['command']}` on {result['device']} ({result['cpu']}, {result['cores']} cores), {result['date']}, "
        f"git {result['git']}.\n\nMemory is the group's summed PSS on CPU, the device memory added on CUDA.\n\n"
        f"{table}\n"
    )


def _mib(value: Any) -> float | None:
    return None if value is None else round(value / MiB, 1)
