"""Measure a model's per-unit latency over a (batch, tokens) grid on the current device."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from torch import nn

from ectrans.common.registry import ModelSpec
from ectrans.models.device import device_label
from ectrans.models.encoder import build_encoder_segments, encoder_parts
from ectrans.models.generation_params import GenerationLimits
from ectrans.models.profile import GridPoint, Profile, evaluate_heldout
from ectrans.models.segments import Segment, SegmentState
from ectrans.models.seq2seq import DecodeSegment, build_seq2seq_segments, encoder_stack


@dataclass(frozen=True)
class Grid:
    batches: tuple[int, ...]
    lengths: tuple[int, ...]
    repeats: int

    def capped(self, max_tokens: int) -> Grid:
        lengths = tuple(sorted({min(t, max_tokens) for t in self.lengths}))
        return Grid(self.batches, lengths, self.repeats)


FULL_GRID = Grid(batches=(1, 4, 16, 32), lengths=(16, 32, 64, 128, 256), repeats=3)
QUICK_GRID = Grid(batches=(1, 8, 32), lengths=(16, 64, 128), repeats=2)

# New tokens each measured seq2seq decode generates, always (greedy, end-of-sequence held off until
# then): a fixed amount of work, so decode times compare across grid points and devices.
DECODE_NEW_TOKENS = 16

StateFactory = Callable[[int, int], SegmentState]


def random_ids_state(
    vocab_size: int, device: torch.device, seed: int = 0, params: dict[str, Any] | None = None
) -> StateFactory:
    """Batches of random token ids, unpadded: the cost of a layer depends on shape, not content.
    `params` (a copy per batch) are the op's options, e.g. generation params for a decode segment."""
    generator = torch.Generator().manual_seed(seed)

    def make(batch: int, tokens: int) -> SegmentState:
        ids = torch.randint(0, vocab_size, (batch, tokens), generator=generator)
        mask = torch.ones(batch, tokens, dtype=torch.long)
        return SegmentState(hidden=None, mask=mask.to(device), input_ids=ids.to(device), params=dict(params or {}))

    return make


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_units(
    segments: Sequence[Segment], make_state: StateFactory, grid: Grid, device: torch.device
) -> list[GridPoint]:
    """Median latency of each segment (one unit each) at every grid point.

    Each repeat sweeps the whole grid, so background load that comes and goes on a shared host
    touches every point alike instead of skewing the points measured while it lasted.
    """
    points = [(batch, tokens) for batch in grid.batches for tokens in grid.lengths]
    samples: dict[tuple[int, int], list[list[float]]] = {point: [[] for _ in segments] for point in points}
    with torch.inference_mode():
        _run_units(segments, make_state(*points[0]), device, None)  # warm-up: kernels, allocator
        for _ in range(grid.repeats):
            for point in points:
                _run_units(segments, make_state(*point), device, samples[point])
    return [GridPoint(b, t, [statistics.median(unit) for unit in samples[(b, t)]]) for b, t in points]


def _run_units(
    segments: Sequence[Segment], state: SegmentState, device: torch.device, record: list[list[float]] | None
) -> None:
    for unit, segment in enumerate(segments):
        _sync(device)
        started = time.perf_counter()
        state = segment(state)
        _sync(device)
        if record is not None:
            record[unit].append((time.perf_counter() - started) * 1000.0)


def profile_encoder(spec: ModelSpec, model: nn.Module, device: torch.device, grid: Grid) -> Profile:
    """One unit per layer: the single-layer segments the pipeline would run."""
    units = build_encoder_segments(model, encoder_parts(model).num_layers)
    make_state = random_ids_state(int(cast(Any, model).config.vocab_size), device)
    points = measure_units(units, make_state, grid.capped(spec.max_tokens), device)
    return _profile(spec, device, [unit.name for unit in units], points)


def profile_seq2seq(
    spec: ModelSpec,
    model: nn.Module,
    tokenizer: Any,
    device: torch.device,
    grid: Grid,
    *,
    new_tokens: int = DECODE_NEW_TOKENS,
) -> Profile:
    """One unit per encoder layer (the embeddings in the first, the final norm in the last), the
    single-layer encoder segments the pipeline would run, then one `decode` unit: a whole greedy
    generation of exactly `new_tokens` tokens (fewer only where the decoder's position table ends),
    detokenisation included. The grid's tokens are the source length."""
    layers = len(encoder_stack(model).layers)
    limits = GenerationLimits(
        default_num_beams=1, max_num_beams=1, default_max_new_tokens=new_tokens, max_new_tokens=new_tokens
    )
    units, stage0 = build_seq2seq_segments(
        model, tokenizer, list(range(1, layers)), device, spec, decode_segments=1, limits=limits
    )
    new_tokens = stage0.limits.max_new_tokens  # as fitted to the decoder's positions
    decode = cast(DecodeSegment, units[-1])
    # End-of-sequence is held off until the last token (as a model's `min_new_tokens` would), so
    # every row of every batch decodes `new_tokens` steps whatever the random weights prefer.
    config = copy.deepcopy(decode.settings.config)
    config.min_new_tokens = new_tokens
    decode.settings = replace(decode.settings, config=config)
    params = {"num_beams": 1, "max_new_tokens": new_tokens}
    make_state = random_ids_state(int(cast(Any, model).config.vocab_size), device, params=params)
    points = measure_units(units, make_state, grid.capped(spec.max_tokens), device)
    return _profile(spec, device, [unit.name for unit in units], points, decode_units=1, decode_new_tokens=new_tokens)


def _profile(
    spec: ModelSpec,
    device: torch.device,
    units: list[str],
    points: list[GridPoint],
    *,
    decode_units: int = 0,
    decode_new_tokens: int = 0,
) -> Profile:
    profile = Profile(
        model=spec.name,
        revision=spec.revision,
        device=device_label(device),
        dtype=spec.dtype,
        threads=torch.get_num_threads(),
        units=units,
        grid=points,
        decode_units=decode_units,
        decode_new_tokens=decode_new_tokens,
    )
    profile.heldout_error = evaluate_heldout(points)
    return profile
