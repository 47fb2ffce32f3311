"""Throughput of the segmented, pipelined executor against the same model unsplit in one loop.

Workload: the shared sentences (`sentences_100.txt`) in fixed batches, all submitted at once (a
saturated worker). The baseline does the same work one batch after another on the calling thread
with the same intra-op thread count: tokenise, the whole model in one call (`model(...)` for
`embed`, `model.generate(...)` for `translate`), convert the results. `speedup` is pipelined over
baseline throughput, per segment count.

- embed: the packaged MiniLM; 1..4 segments.
- translate: a Marian with random weights (4+4 layers, width 256, a word-level vocabulary of the
  workload's words), greedy, a fixed number of new tokens; 1..4 encoder segments, then one or two
  decode segments (the decode steps split in halves).

- lone: one request at a time, all threads vs one vs the executor's choice, quiet and beside a busy
  core (`ectrans/bench/lone.py`).
- traced: the executor's traced encoder layers against its eager ones, per request and in batches of
  8 (`ectrans/bench/traced.py`). The executors above run traced layers, as a worker's do on a CPU;
  the baselines run the model as transformers does.

Runs alternate within each round (baseline, then each configuration), so a round's runs see about
the same background load. `speedup` is the median over rounds of the per-round ratio, with its
range over rounds; throughputs are each run's best round (other load only ever slows a run).
"""

from __future__ import annotations

import concurrent.futures
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ectrans.bench.harness import load_average, machine_info, minilm_path
from ectrans.bench.lone import bench_lone
from ectrans.bench.traced import bench_traced
from ectrans.bench.workload import load_sentences
from ectrans.common.registry import ModelSpec, build_spec
from ectrans.models.api import Request
from ectrans.models.encoder import EncoderTokenizer, embed_unsplit, read_pooling
from ectrans.models.loader import load_executor, load_model
from ectrans.models.pipeline import PipelinedExecutor
from ectrans.models.results import to_python

WORKLOAD = "sentences_100.txt"
SEGMENT_COUNTS = range(1, 5)


@dataclass(frozen=True)
class Size:
    embed_sentences: int
    translate_sentences: int
    batch_size: int
    repeats: int
    new_tokens: int


QUICK = Size(embed_sentences=100, translate_sentences=48, batch_size=8, repeats=3, new_tokens=8)
FULL = Size(embed_sentences=200, translate_sentences=100, batch_size=16, repeats=7, new_tokens=16)


def batches_of(texts: list[str], size: int) -> list[list[str]]:
    return [texts[i : i + size] for i in range(0, len(texts), size)]


def workload(count: int) -> list[str]:
    sentences = load_sentences(WORKLOAD)
    return (sentences * (count // len(sentences) + 1))[:count]


@dataclass
class Timings:
    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)  # this process's CPU time, all threads


def interleaved_rounds(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, Timings]:
    """Wall and CPU times of each run in each of `repeats` rounds, after one warm-up round."""
    for run_once in runs.values():
        run_once()
    timings = {name: Timings() for name in runs}
    for _ in range(repeats):
        for name, run_once in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run_once()
            timings[name].wall_s.append(time.perf_counter() - wall)
            timings[name].cpu_s.append(time.process_time() - cpu)
    return timings


def drain(executor: PipelinedExecutor, op: str, batches: list[list[str]], params: dict[str, Any]) -> None:
    futures = [executor.submit(Request(op, batch, params=params)) for batch in batches]
    for future in futures:
        future.result()


def compare(
    *,
    model: torch.nn.Module,
    op: str,
    batches: list[list[str]],
    params: dict[str, Any],
    unsplit: Callable[[], None],
    configurations: dict[str, tuple[ModelSpec, int]],
    repeats: int,
    threads: int,
) -> dict[str, Any]:
    """Throughput of `unsplit` and of an executor per configuration (a registry entry and a
    segment count), all sharing one model."""
    torch.set_num_threads(threads)
    executors = {
        name: load_executor(spec, device="auto", threads=threads, segments=segments, model=model)
        for name, (spec, segments) in configurations.items()
    }
    # The baseline runs on a thread of its own, as each pipeline stage does: OpenMP teams behave
    # differently on the main thread of a busy host, which would bias the comparison.
    own_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ectrans-bench-unsplit")
    runs: dict[str, Callable[[], None]] = {
        "unsplit": lambda: own_thread.submit(_with_threads, unsplit, threads).result()
    }
    for name, executor in executors.items():
        assert isinstance(executor, PipelinedExecutor)
        runs[name] = lambda ex=executor: drain(ex, op, batches, params)  # type: ignore[misc]
    try:
        timings = interleaved_rounds(runs, repeats)
    finally:
        own_thread.shutdown()
        for executor in executors.values():
            executor.close()
    items = sum(len(batch) for batch in batches)
    baseline = timings["unsplit"].wall_s
    pipelined = {name: t for name, t in timings.items() if name != "unsplit"}
    ratios = {name: [b / w for b, w in zip(baseline, t.wall_s, strict=True)] for name, t in pipelined.items()}
    return {
        "unsplit_per_s": round(items / min(baseline), 2),
        "pipelined_per_s": {name: round(items / min(t.wall_s), 2) for name, t in pipelined.items()},
        "speedup": {name: round(statistics.median(r), 3) for name, r in ratios.items()},
        "speedup_range": {name: [round(min(r), 3), round(max(r), 3)] for name, r in ratios.items()},
        # CPU time per input: what a configuration costs regardless of the share of a busy host it
        # got (more threads can win a larger share of a contended CPU, which wall time rewards).
        "cpu_ms_per_input": {name: round(1000 * statistics.median(t.cpu_s) / items, 2) for name, t in timings.items()},
        "rounds": repeats,
        "inputs": items,
        "batch_size": len(batches[0]),
    }


def _with_threads(work: Callable[[], None], threads: int) -> None:
    torch.set_num_threads(threads)
    work()


def bench_embed(size: Size, threads: int) -> dict[str, Any]:
    spec = build_spec("minilm", {"path": str(minilm_path())})
    model = load_model(spec, torch.device("cpu") if not torch.cuda.is_available() else torch.device("cuda"))
    device = next(model.parameters()).device
    tokenize = EncoderTokenizer(_tokenizer(spec.path), spec.max_tokens)
    pooling = read_pooling(spec.path)
    batches = batches_of(workload(size.embed_sentences), size.batch_size)

    def unsplit() -> None:
        with torch.inference_mode():
            for batch in batches:
                state = tokenize(batch, {})
                state.mask, state.input_ids = state.mask.to(device), state.input_ids.to(device)
                state.extras = {key: value.to(device) for key, value in state.extras.items()}
                to_python(list(embed_unsplit(model, state, pooling)))

    configurations = {str(n): (spec, n) for n in SEGMENT_COUNTS}
    return compare(
        model=model,
        op="embed",
        batches=batches,
        params={},
        unsplit=unsplit,
        configurations=configurations,
        repeats=size.repeats,
        threads=threads,
    )


def build_bench_marian(path: Path, texts: list[str], *, seed: int = 0) -> Path:
    """A Marian of width 256 with 4+4 layers and random weights, its vocabulary the words of `texts`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import GenerationConfig, MarianConfig, MarianMTModel, PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={"</s>": 0, "<unk>": 1, "<pad>": 2}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    words = sorted({w for text in texts for w, _ in backend.pre_tokenizer.pre_tokenize_str(text.lower())})
    vocab = {"</s>": 0, "<unk>": 1, "<pad>": 2} | {w: i + 3 for i, w in enumerate(words)}
    backend.model = models.WordLevel(vocab=vocab, unk_token="<unk>")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 0)])
    backend.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend, model_max_length=256, eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    config = MarianConfig(
        vocab_size=len(vocab),
        d_model=256,
        encoder_layers=4,
        decoder_layers=4,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=1024,
        decoder_ffn_dim=1024,
        max_position_embeddings=256,
        pad_token_id=2,
        eos_token_id=0,
        decoder_start_token_id=2,
        scale_embedding=True,
    )
    torch.manual_seed(seed)
    model = MarianMTModel(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:  # std 1/sqrt(fan-in): outputs depend on the input
                parameter.normal_(0.0, parameter.shape[-1] ** -0.5)
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        decoder_start_token_id=2, eos_token_id=0, pad_token_id=2
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def bench_translate(size: Size, threads: int) -> dict[str, Any]:
    texts = workload(size.translate_sentences)
    with tempfile.TemporaryDirectory(prefix="ectrans-bench-marian-") as tmp:
        path = build_bench_marian(Path(tmp) / "marian", load_sentences(WORKLOAD))
        # Every output the same length (no early end of sequence), so each run does the same work.
        spec = build_spec("bench-marian", {"path": str(path)})
        model: Any = load_model(spec, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        model.generation_config.min_new_tokens = size.new_tokens
        tokenizer = _tokenizer(spec.path)
        batches = batches_of(texts, size.batch_size)
        params = {"max_new_tokens": size.new_tokens, "num_beams": 1}
        device = next(model.parameters()).device

        def unsplit() -> None:
            with torch.inference_mode():
                for batch in batches:
                    encoded = tokenizer(batch, padding=True, truncation=True, return_tensors="pt").to(device)
                    out = model.generate(**encoded, do_sample=False, **params)
                    tokenizer.batch_decode(out, skip_special_tokens=True)

        decode_counts = (1,) if size is QUICK else (1, 2)
        configurations = {
            f"{n}+{d}": (build_spec(spec.name, {"path": str(path), "decode_segments": d}), n)
            for n in SEGMENT_COUNTS
            for d in decode_counts
        }
        result = compare(
            model=model,
            op="translate",
            batches=batches,
            params=params,
            unsplit=unsplit,
            configurations=configurations,
            repeats=size.repeats,
            threads=threads,
        )
    result["model"] = "Marian 4+4 layers, d_model 256, random weights"
    result["new_tokens"] = size.new_tokens
    result["segments_key"] = "encoder segments + decode segments"
    return result


def _tokenizer(path: Path) -> Any:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def run(quick: bool) -> dict[str, Any]:
    size = QUICK if quick else FULL
    threads = torch.get_num_threads()
    result: dict[str, Any] = machine_info()
    result |= {"scenario": "pipeline", "quick": quick, "threads": threads, "workload": WORKLOAD}
    result["embed"] = bench_embed(size, threads)
    result["translate"] = bench_translate(size, threads)
    result["lone"] = bench_lone(workload(size.embed_sentences), size.repeats, threads)
    # Shorter runs, twice the rounds: the paired ratio needs rounds more than long runs.
    result["traced"] = bench_traced(workload(size.embed_sentences)[:50], 2 * size.repeats, threads)
    result["load_average_at_end"] = load_average()
    return result
