"""Lone batches on a CPU: all threads, one thread, or the executor's own choice, on a quiet host and
beside a busy core (part of `ectrans bench pipeline`).

One request at a time (a lone client) through one MiniLM executor (2 segments, every core): its own
choice (`ectrans/models/alone.py`, kept from run to run as a long-lived worker keeps it) against each
way forced, first with the machine to itself, then beside one process spinning on a core (what any
other busy process does to a host). Rounds alternate the three, so each round's runs see about the
same load; figures are ms per request, the median over rounds. `chosen_vs_best` is the choice over
the better forced way. One executor, not three: a second and third executor in the process (their
stage threads idle) made the first one's all-thread requests 1.5x slower here.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from ectrans.bench.harness import minilm_path
from ectrans.common.registry import build_spec
from ectrans.models.alone import AloneThreads
from ectrans.models.api import Executor, Request
from ectrans.models.loader import load_executor
from ectrans.models.pipeline import PipelinedExecutor

WAYS = ("chosen", "all_threads", "one_thread")
LOADS = ("quiet", "busy_core")


def per_request_ms(executor: Executor, texts: list[str]) -> float:
    started = time.perf_counter()
    for text in texts:
        executor.submit(Request("embed", [text])).result()
    return (time.perf_counter() - started) * 1000 / len(texts)


def _forced(all_threads: bool) -> AloneThreads:
    choice = AloneThreads(probe_after_s=float("inf"))
    choice.current = all_threads
    return choice


def _spinner() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def bench_lone(texts: list[str], repeats: int, threads: int) -> dict[str, Any]:
    if threads < 2 or torch.cuda.is_available():
        return {"skipped": "needs a CPU run on 2 or more threads"}
    spec = build_spec("minilm", {"path": str(minilm_path())})
    executor = load_executor(spec, device="cpu", threads=threads, segments=2)
    assert isinstance(executor, PipelinedExecutor)
    choices = {"chosen": executor.alone_threads, "all_threads": _forced(True), "one_thread": _forced(False)}
    try:
        per_request_ms(executor, texts[:20])  # warm-up; the choice fits its first way meanwhile
        out: dict[str, Any] = {"requests_per_run": len(texts), "rounds": repeats}
        for load in LOADS:
            spinner = _spinner() if load == "busy_core" else None
            try:
                runs: dict[str, list[float]] = {way: [] for way in WAYS}
                for _ in range(repeats):
                    for way, choice in choices.items():
                        executor.alone_threads = choice
                        runs[way].append(per_request_ms(executor, texts))
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
            ms = {way: round(statistics.median(values), 2) for way, values in runs.items()}
            best = min(ms["all_threads"], ms["one_thread"])
            out[load] = {"ms_per_request": ms, "chosen_vs_best": round(ms["chosen"] / best, 3)}
        return out
    finally:
        executor.close()
