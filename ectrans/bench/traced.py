"""Traced against eager encoder layers in one executor (part `traced` of `ectrans bench pipeline`).

One MiniLM executor (2 segments, every core) with its layers traced (`ectrans/models/traced.py`);
rounds switch its segments between the traced calls and the eager layers, alternating which goes
first, so both see the same load. Per round: ms per request over a run of single-sentence requests
(a lone client), and ms for batches of 8 (arrival order). Figures are medians over rounds;
`traced_vs_eager` is the median of the per-round ratios (below 1: traced is faster).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

from ectrans.bench.harness import minilm_path
from ectrans.bench.lone import per_request_ms
from ectrans.common.registry import build_spec
from ectrans.models.api import Request
from ectrans.models.encoder import EncoderSegment
from ectrans.models.loader import load_executor
from ectrans.models.pipeline import PipelinedExecutor

BATCH = 8


def _batches_ms(executor: PipelinedExecutor, texts: list[str]) -> float:
    """ms per batch of BATCH over `texts`, one batch at a time."""
    batches = [texts[i : i + BATCH] for i in range(0, len(texts), BATCH)]
    started = time.perf_counter()
    for batch in batches:
        executor.submit(Request("embed", batch)).result()
    return (time.perf_counter() - started) * 1000 / len(batches)


def bench_traced(texts: list[str], repeats: int, threads: int) -> dict[str, Any]:
    spec = build_spec("minilm", {"path": str(minilm_path())})
    executor = load_executor(spec, device="cpu", threads=threads, segments=2, trace=True)
    assert isinstance(executor, PipelinedExecutor)
    segments = [s for s in executor.segments if isinstance(s, EncoderSegment)]
    traced = [s.parts for s in segments]
    if not traced or not traced[0].calls:
        executor.close()
        return {"skipped": "the layers' traces did not hold on this torch (they run eager)"}
    eager = [dataclasses.replace(parts, calls=()) for parts in traced]
    ways = {"traced": traced, "eager": eager}
    runs: dict[str, dict[str, list[float]]] = {way: {"request": [], "batch": []} for way in ways}
    try:
        per_request_ms(executor, texts[:20])  # warm-up
        for round_ in range(repeats):
            order = list(ways) if round_ % 2 == 0 else list(reversed(ways))
            for way in order:
                for segment, parts in zip(segments, ways[way], strict=True):
                    segment.parts = parts
                runs[way]["request"].append(per_request_ms(executor, texts))
                runs[way]["batch"].append(_batches_ms(executor, texts))
    finally:
        executor.close()
    out: dict[str, Any] = {"requests_per_run": len(texts), "rounds": repeats, "batch": BATCH}
    for kind in ("request", "batch"):
        ratios = [t / e for t, e in zip(runs["traced"][kind], runs["eager"][kind], strict=True)]
        out[f"ms_per_{kind}"] = {way: round(statistics.median(runs[way][kind]), 2) for way in ways}
        out[f"traced_vs_eager_per_{kind}"] = round(statistics.median(ratios), 3)
    return out
