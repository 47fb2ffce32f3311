"""Per-layer latency profiles: balanced split points and a (batch, tokens) → milliseconds model.

Pure data and arithmetic (measuring lives in `measure.py`), so the worker's scheduler can use a
stored profile without loading a model. A profile holds, for each segment unit (one layer, with
the embeddings folded into the first and the pooling into the last), its measured latency over a
grid of (batch size, sequence length) points on one device.

An encoder-decoder (seq2seq) profile has one unit per encoder layer (embeddings in the first, the
final norm in the last) followed by `decode_units` decode units (a whole greedy generation of
`decode_new_tokens` tokens); split points divide the encoder units only.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

PROFILE_VERSION = 1


def balance_splits(costs: Sequence[float], n: int) -> list[int]:
    """Split points for `n` contiguous segments over units of the given costs, minimising the cost
    of the most expensive segment. Returns the start index of segments 2..n (as `numpy.split`
    takes them); exact dynamic programme, O(n·len²), fine for layer counts."""
    units = len(costs)
    if not 1 <= n <= units:
        raise ValueError(f"{n=} segments must be between 1 and the {units} units")
    if any(cost < 0 for cost in costs):
        raise ValueError("costs must be non-negative")
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + float(cost))
    inf = float("inf")
    # best[j][i]: the smallest possible maximum when the first i units form j segments.
    best = [[inf] * (units + 1) for _ in range(n + 1)]
    start = [[0] * (units + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for j in range(1, n + 1):
        for i in range(j, units - (n - j) + 1):
            for p in range(j - 1, i):
                worst = max(best[j - 1][p], prefix[i] - prefix[p])
                if worst < best[j][i]:
                    best[j][i], start[j][i] = worst, p
    points, i = [], units
    for j in range(n, 1, -1):
        i = start[j][i]
        points.append(i)
    return sorted(points)


def segment_costs(costs: Sequence[float], points: Sequence[int]) -> list[float]:
    bounds = [0, *points, len(costs)]
    return [float(sum(costs[a:b])) for a, b in itertools.pairwise(bounds)]


def _features(batch: float, tokens: float) -> list[float]:
    work = batch * tokens
    return [work, work * tokens, 1.0]


@dataclass(frozen=True)
class LatencyModel:
    """ms ≈ a·batch·tokens + b·batch·tokens² + c, all coefficients ≥ 0.

    The linear term is the projections and feed-forward, the quadratic one attention, the constant
    the per-call overhead. Fitted to relative error (rows weighted by 1/measured) so small batches,
    which real-time admission cares about, count as much as large ones.
    """

    a: float
    b: float
    c: float

    @classmethod
    def fit(cls, points: Sequence[tuple[int, int]], ms: Sequence[float]) -> LatencyModel:
        if len(points) != len(ms) or not points:
            raise ValueError("need as many measurements as points, at least one")
        x = np.array([_features(b, t) for b, t in points], dtype=np.float64)
        y = np.array(ms, dtype=np.float64)
        weights = 1.0 / np.maximum(y, 1e-6)
        active = [0, 1, 2]
        coef = np.zeros(3)
        # Least squares, dropping any term that comes out negative (a small active-set NNLS).
        while active:
            solution, *_ = np.linalg.lstsq(x[:, active] * weights[:, None], y * weights, rcond=None)
            if (solution >= 0).all():
                coef[:] = 0.0
                coef[active] = solution
                break
            active.pop(int(np.argmin(solution)))
        return cls(float(coef[0]), float(coef[1]), float(coef[2]))

    def predict(self, batch: int, tokens: int) -> float:
        work = float(batch) * float(tokens)
        return self.a * work + self.b * work * tokens + self.c


@dataclass(frozen=True)
class GridPoint:
    batch: int
    tokens: int
    unit_ms: list[float]  # median latency of each unit


@dataclass
class Profile:
    """Measured unit latencies for one model revision on one device, and what follows from them."""

    model: str
    revision: str
    device: str
    dtype: str
    threads: int
    units: list[str]
    grid: list[GridPoint]
    heldout_error: dict[str, float] = field(default_factory=dict)  # filled by `evaluate`
    # Trailing units that decode (seq2seq; 0 for encoders), and the fixed number of new tokens each
    # measured decode ran (greedy, no early stop), so its ms are per `decode_new_tokens` tokens.
    decode_units: int = 0
    decode_new_tokens: int = 0

    def __post_init__(self) -> None:
        if self.decode_units < 0 or (self.decode_units and self.decode_units >= len(self.units)):
            raise ValueError(f"decode_units={self.decode_units} must leave at least one of the {len(self.units)} units")

    @property
    def encoder_units(self) -> int:
        """The leading units that are layers (all of them for an encoder): what split points divide."""
        return len(self.units) - self.decode_units

    @cached_property
    def unit_models(self) -> list[LatencyModel]:
        """One latency model per unit, fitted to the whole grid (computed once)."""
        points = [(p.batch, p.tokens) for p in self.grid]
        return [LatencyModel.fit(points, [p.unit_ms[u] for p in self.grid]) for u in range(len(self.units))]

    def unit_costs(self) -> list[float]:
        """Each unit's mean latency over the grid: the weights for balancing split points."""
        return [float(np.mean([p.unit_ms[u] for p in self.grid])) for u in range(len(self.units))]

    def splits(self, n_segments: int) -> list[int]:
        """Balanced split points over the encoder units (decode units are segments of their own)."""
        return balance_splits(self.unit_costs()[: self.encoder_units], n_segments)

    def predict_segments(self, batch: int, tokens: int, points: Sequence[int]) -> list[float]:
        """Predicted ms of each (encoder) segment for a batch of `batch` sequences padded to `tokens`."""
        per_unit = [model.predict(batch, tokens) for model in self.unit_models[: self.encoder_units]]
        return segment_costs(per_unit, points)

    def predict_decode_ms(self, batch: int, tokens: int) -> float:
        """Predicted ms of the decode units (0 for an encoder): `decode_new_tokens` greedy tokens."""
        return sum(model.predict(batch, tokens) for model in self.unit_models[self.encoder_units :])

    def predict_ms(self, batch: int, tokens: int) -> float:
        return sum(model.predict(batch, tokens) for model in self.unit_models)

    def to_json(self) -> str:
        data: dict[str, Any] = {"version": PROFILE_VERSION, **asdict(self)}
        data["splits"] = {str(n): self.splits(n) for n in range(1, self.encoder_units + 1)}
        data["latency_models"] = [asdict(model) for model in self.unit_models]
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Profile:
        data = json.loads(text)
        if data.get("version") != PROFILE_VERSION:
            raise ValueError(f"profile version {data.get('version')!r} is not {PROFILE_VERSION}")
        return cls(
            model=data["model"],
            revision=data["revision"],
            device=data["device"],
            dtype=data["dtype"],
            threads=int(data["threads"]),
            units=list(data["units"]),
            grid=[GridPoint(int(p["batch"]), int(p["tokens"]), [float(v) for v in p["unit_ms"]]) for p in data["grid"]],
            heldout_error={k: float(v) for k, v in data.get("heldout_error", {}).items()},
            decode_units=int(data.get("decode_units", 0)),  # absent from encoder profiles stored before
            decode_new_tokens=int(data.get("decode_new_tokens", 0)),
        )


def evaluate_heldout(grid: Sequence[GridPoint]) -> dict[str, float]:
    """Fit on a checkerboard half of the (batch, tokens) grid, report the relative error of the
    predicted whole-model latency on the other half (mean and max over held-out points)."""
    batches = sorted({p.batch for p in grid})
    lengths = sorted({p.tokens for p in grid})
    held = [p for p in grid if (batches.index(p.batch) + lengths.index(p.tokens)) % 2 == 1]
    train = [p for p in grid if p not in held]
    if len(train) < 3 or not held:
        return {}
    units = len(grid[0].unit_ms)
    models = [
        LatencyModel.fit([(p.batch, p.tokens) for p in train], [p.unit_ms[u] for p in train]) for u in range(units)
    ]
    errors = []
    for p in held:
        predicted = sum(model.predict(p.batch, p.tokens) for model in models)
        measured = sum(p.unit_ms)
        errors.append(abs(predicted - measured) / measured)
    return {"mean": float(np.mean(errors)), "max": float(np.max(errors)), "points": float(len(errors))}


def profile_dir(cache_dir: str | Path | None = None) -> Path:
    """`<cache>/profiles`, where the cache is `cache_dir`, else `$ECTRANS_CACHE_DIR`, else ~/.cache/ectrans."""
    root = cache_dir or os.environ.get("ECTRANS_CACHE_DIR") or Path.home() / ".cache" / "ectrans"
    return Path(root).expanduser() / "profiles"


def profile_path(model: str, revision: str, device: str, cache_dir: str | Path | None = None) -> Path:
    return profile_dir(cache_dir) / f"{model}--{revision or 'norev'}--{device}.json"


def save_profile(profile: Profile, cache_dir: str | Path | None = None) -> Path:
    path = profile_path(profile.model, profile.revision, profile.device, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(profile.to_json())
    tmp.replace(path)  # readers never see half a file
    return path


def load_profile(model: str, revision: str, device: str, cache_dir: str | Path | None = None) -> Profile | None:
    """The stored profile, or None when there is none (or it cannot be read)."""
    path = profile_path(model, revision, device, cache_dir)
    try:
        return Profile.from_json(path.read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
