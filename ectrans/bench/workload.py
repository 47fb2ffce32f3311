"""Seeded workloads built from the shared sentences: sizes, length mixes, arrival processes.

The sentences (`sentences_100.txt`, `sentences_extra.txt`, shipped in `ectrans/data/`;
`ECTRANS_DATA_DIR` points elsewhere) are the prototype's news sentences, 8-54 words each. Longer
inputs are made by joining sampled sentences; every choice comes from one `random.Random(seed)`,
so a workload is the same in every run and on every machine.

    texts = sample_texts(500, seed=0, mix="shared")   # sentences as they are
    texts = sample_texts(500, seed=0, mix="mixed")    # 70% single, 20% pairs, 10% of 4-6 joined
    arrivals = poisson_arrivals(500, rate_per_s=50, seed=0)  # seconds from the start
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from ectrans.data import data_dir

SHARED_FILES = ("sentences_100.txt", "sentences_extra.txt")

# How many sentences one input joins, with weights: (low, high) inclusive → weight.
MIXES: dict[str, dict[tuple[int, int], float]] = {
    "shared": {(1, 1): 1.0},
    "short": {(1, 1): 1.0},  # the shorter half of the sentences, one each
    "long": {(4, 8): 1.0},
    "mixed": {(1, 1): 0.7, (2, 3): 0.2, (4, 6): 0.1},
}


def load_sentences(name: str = "sentences_100.txt") -> list[str]:
    """Non-empty, stripped lines of one data file."""
    path = data_dir() / name
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


@cache
def shared_pool() -> tuple[str, ...]:
    """Every shared sentence (the 100 plus the 19 extra), in file order."""
    pool: list[str] = []
    for name in SHARED_FILES:
        if (data_dir() / name).exists():
            pool += load_sentences(name)
    if not pool:
        raise FileNotFoundError(f"no shared sentences under {data_dir()}; set ECTRANS_DATA_DIR")
    return tuple(pool)


def sample_texts(n: int, *, seed: int = 0, mix: str = "shared", pool: Sequence[str] | None = None) -> list[str]:
    """`n` inputs drawn with replacement from `pool` (default: all shared sentences).

    `mix` picks how many sentences each input joins (see `MIXES`); `short` draws from the shorter
    half of the pool only.
    """
    if mix not in MIXES:
        raise ValueError(f"{mix=} must be one of {sorted(MIXES)}")
    if n < 0:
        raise ValueError(f"{n=} must be >= 0")
    sentences = list(pool if pool is not None else shared_pool())
    if mix == "short":
        sentences = sorted(sentences, key=len)[: max(1, len(sentences) // 2)]
    rng = random.Random(seed)
    spans = list(MIXES[mix])
    weights = list(MIXES[mix].values())
    texts = []
    for _ in range(n):
        low, high = rng.choices(spans, weights)[0]
        texts.append(" ".join(rng.choice(sentences) for _ in range(rng.randint(low, high))))
    return texts


def poisson_arrivals(n: int, rate_per_s: float, *, seed: int = 0) -> list[float]:
    """Arrival times (seconds from the start) of a Poisson process: exponential gaps of mean 1/rate."""
    if rate_per_s <= 0:
        raise ValueError(f"{rate_per_s=} must be > 0")
    rng = random.Random(seed)
    now, times = 0.0, []
    for _ in range(n):
        now += rng.expovariate(rate_per_s)
        times.append(now)
    return times


@dataclass(frozen=True)
class Workload:
    """Inputs and, for real-time runs, their arrival times; `describe()` states how it was made."""

    texts: list[str]
    seed: int
    mix: str
    arrivals: list[float] | None = None
    rate_per_s: float | None = None

    def describe(self) -> str:
        how = f"{len(self.texts)} inputs, mix {self.mix!r}, seed {self.seed}, from {', '.join(SHARED_FILES)}"
        if self.rate_per_s is not None:
            how += f", Poisson arrivals at {self.rate_per_s:g}/s"
        else:
            how += ", submitted all at once"
        return how


def bulk(n: int, *, seed: int = 0, mix: str = "shared") -> Workload:
    """A batch job: every input submitted at once."""
    return Workload(sample_texts(n, seed=seed, mix=mix), seed, mix)


def realtime(n: int, rate_per_s: float, *, seed: int = 0, mix: str = "short") -> Workload:
    """A real-time stream: inputs arriving as a Poisson process of rate `rate_per_s`."""
    return Workload(
        sample_texts(n, seed=seed, mix=mix),
        seed,
        mix,
        arrivals=poisson_arrivals(n, rate_per_s, seed=seed + 1),
        rate_per_s=rate_per_s,
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0-100), nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """`numerator / denominator` to 3 places; None where either is missing or the denominator is 0."""
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)
