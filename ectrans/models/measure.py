"""Measure a model's per-unit latency over a (batch, tokens) grid on the current device."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ectrans.common.registry import ModelSpec
from ectrans.models.device import device_label
from ectrans.models.encoder import build_encoder_segments, encoder_parts
from ectrans.models.profile import GridPoint, Profile, evaluate_heldout
from ectrans.models.segments import Segment, SegmentState


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

StateFactory = Callable[[int, int], SegmentState]


def random_ids_state(vocab_size: int, device: torch.device, seed: int = 0) -> StateFactory:
    """Batches of random token ids, unpadded: the cost of a layer depends on shape, not content."""
    generator = torch.Generator().manual_seed(seed)

    def make(batch: int, tokens: int) -> SegmentState:
        ids = torch.randint(0, vocab_size, (batch, tokens), generator=generator)
        mask = torch.ones(batch, tokens, dtype=torch.long)
        return SegmentState(hidden=None, mask=mask.to(device), input_ids=ids.to(device))

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
    profile = Profile(
        model=spec.name,
        revision=spec.revision,
        device=device_label(device),
        dtype=spec.dtype,
        threads=torch.get_num_threads(),
        units=[unit.name for unit in units],
        grid=points,
    )
    profile.heldout_error = evaluate_heldout(points)
    return profile
