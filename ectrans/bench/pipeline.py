"""Throughput of the segmented, pipelined executor against the same model unsplit in one loop.

Workload: the shared 100 sentences in fixed batches, submitted all at once (a saturated worker).
The baseline tokenises, runs the whole model and converts results one batch after another on the
calling thread, with the same intra-op thread count. `speedup` = pipelined / baseline throughput.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ectrans.common.registry import ModelSpec, build_spec, packaged_minilm_path
from ectrans.models.api import Request
from ectrans.models.device import device_label, resolve_device
from ectrans.models.encoder import EncoderTokenizer, embed_unsplit, read_pooling
from ectrans.models.loader import load_executor, load_model
from ectrans.models.pipeline import PipelinedExecutor
from ectrans.models.results import to_python

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKLOAD = "sentences_100.txt"


def data_dir() -> Path:
    """`$ECTRANS_DATA_DIR`, else `../shared/data` beside the repository, else `shared/data` in it."""
    if env := os.environ.get("ECTRANS_DATA_DIR"):
        return Path(env)
    beside = REPO_ROOT.parent / "shared" / "data"
    return beside if beside.is_dir() else REPO_ROOT / "shared" / "data"


def load_sentences() -> list[str]:
    path = data_dir() / WORKLOAD
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def batches_of(texts: list[str], size: int) -> list[list[str]]:
    return [texts[i : i + size] for i in range(0, len(texts), size)]


def _interleaved_best(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Best wall time (s) of each run over `repeats` rounds, after a warm-up round.

    Runs alternate within each round and the best time counts, because a shared host's other load
    comes and goes: it then slows every configuration alike instead of whichever ran during it.
    """
    for run_once in runs.values():
        run_once()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run_once in runs.items():
            started = time.perf_counter()
            run_once()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def _pipelined(executor: PipelinedExecutor, op: str, batches: list[list[str]], params: dict[str, Any]) -> None:
    futures = [executor.submit(Request(op, batch, params=params)) for batch in batches]
    for future in futures:
        future.result()


def bench_embed(batches: list[list[str]], segment_counts: range, repeats: int, threads: int) -> dict[str, Any]:
    spec = build_spec("minilm", {"path": str(packaged_minilm_path())})
    device = resolve_device("auto")
    model = load_model(spec, device)
    tokenizer = _tokenizer(spec)
    tokenize = EncoderTokenizer(tokenizer, spec.max_tokens)
    pooling = read_pooling(spec.path)
    items = sum(len(batch) for batch in batches)

    def unsplit() -> None:
        with torch.inference_mode():
            for batch in batches:
                state = tokenize(batch, {})
                state.mask, state.input_ids = state.mask.to(device), state.input_ids.to(device)
                state.extras = {key: value.to(device) for key, value in state.extras.items()}
                to_python(list(embed_unsplit(model, state, pooling)))

    return _compare(spec, model, "embed", batches, {}, unsplit, items, segment_counts, repeats, threads)


def _compare(
    spec: ModelSpec,
    model: torch.nn.Module,
    op: str,
    batches: list[list[str]],
    params: dict[str, Any],
    unsplit: Callable[[], None],
    items: int,
    segment_counts: range,
    repeats: int,
    threads: int,
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    executors = {
        str(n): load_executor(spec, device="auto", threads=threads, segments=n, model=model) for n in segment_counts
    }
    runs: dict[str, Callable[[], None]] = {"unsplit": unsplit}
    for n, executor in executors.items():
        assert isinstance(executor, PipelinedExecutor)
        runs[n] = lambda ex=executor: _pipelined(ex, op, batches, params)  # type: ignore[misc]
    try:
        best = _interleaved_best(runs, repeats)
    finally:
        for executor in executors.values():
            executor.close()
    baseline = items / best.pop("unsplit")
    pipelined = {n: items / seconds for n, seconds in best.items()}
    return {
        "unsplit_per_s": round(baseline, 2),
        "pipelined_per_s": {n: round(v, 2) for n, v in pipelined.items()},
        "speedup": {n: round(v / baseline, 3) for n, v in pipelined.items()},
        "batches": len(batches),
        "batch_size": len(batches[0]),
    }


def _tokenizer(spec: ModelSpec) -> Any:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(spec.path, local_files_only=True)


def run(quick: bool) -> dict[str, Any]:
    device = resolve_device("auto")
    threads = torch.get_num_threads()
    sentences = load_sentences()
    repeats = 2 if quick else 5
    batch_size = 8 if quick else 16
    rounds = 1 if quick else 3
    batches = batches_of(sentences * rounds, batch_size)
    result: dict[str, Any] = {
        "device": device_label(device),
        "threads": threads,
        "workload": f"{WORKLOAD} x{rounds}, batches of {batch_size}",
        "embed": bench_embed(batches, range(1, 5), repeats, threads),
    }
    result["translate"] = {"measured": False, "reason": "seq2seq segments are not available yet"}
    return result
