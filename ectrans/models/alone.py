"""How a bulk batch alone in a CPU pipeline runs: on all the executor's threads, or on its stage's own.

All threads pay on a quiet host: one request gets every core (MiniLM per request on 2 cores: 12.7 ms
against 16.9 ms on one thread). But an OpenMP team meets at a barrier after each operation, so when
another process takes one of its cores, the team waits for it, operation after operation: on a 2-core
host with one other busy process, the same request took over 100 ms on 2 threads. A stage's own
thread (one, on 2 cores) only shares its core. So lone batches run one way, whose recent cost (the
first segment's time against the batch's padded tokens) is fitted, and once a second one batch runs
the other way, its first segment only: held against the fit at its own size, one thread wins when
it is clearly cheaper (1.3x), all threads when they are no dearer. Split tasks resuming past the
first layers say nothing of a whole segment's cost: they run the current way, unmeasured.

The probes also measure `speedup`, what all threads gain over one: a lone batch's time counts as its
time on one thread (the fitted batch cost, which paces bulk batches into the pipeline, is in those
terms), and intra-op parallelism scales far from perfectly (1.33x on 2 cores, not 2x).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from ectrans.common.cost import CostModel, OnlineCost

PROBE_AFTER_S = 1.0  # a batch runs the other way this often
WINDOW = 32  # recent batches the current way's cost is fitted over
# A probe wins when it costs less than this share of what the current way would take at its size.
# Leaving all threads needs them 1.3x dearer (quiet, they are 1.2-1.4x cheaper: no flapping on noise;
# held back by a busy core, several times dearer); going back to them needs them no dearer at all.
WINS_BELOW = {False: 1 / 1.3, True: 1.0}  # keyed by the probed way: all threads?
SPEEDUP_SMOOTHING = 0.5  # weight of the newest probe in `speedup`
LEAST_SPEEDUP = 0.1  # a busy core made all threads 3-4x dearer than one; a bound against absurd probes


class AloneThreads:
    """Chooses, batch by batch, whether a lone bulk batch takes all threads (see the module docstring).
    Called from one thread only (the first segment's stage)."""

    def __init__(
        self,
        probe_after_s: float = PROBE_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
        *,
        threads: int = 2,
        stage_threads: int = 1,
    ) -> None:
        self.probe_after_s = probe_after_s
        self.clock = clock
        self.current = True  # the way lone batches run: all threads?
        self.recent = OnlineCost(window=WINDOW)  # of the current way
        self.last_probe = clock()
        self.probing = False
        # Before the first probe: the square root of the thread ratio (1.41 for 2 on 1, near the 1.33
        # measured); never more than the ratio itself.
        self.most_speedup = threads / stage_threads
        self.speedup = self.most_speedup**0.5

    def all_threads(self) -> bool:
        """Whether the next lone batch runs on all threads (`probing` says if that is a probe)."""
        self.probing = False
        if self.clock() - self.last_probe >= self.probe_after_s and self._fit() is not None:
            self.probing, self.last_probe = True, self.clock()
            return not self.current
        return self.current

    def observe(self, all_threads: bool, ms: float, padded_tokens: int) -> None:
        """The first segment of a lone batch took `ms` the way chosen for it."""
        if all_threads == self.current:
            self.recent.observe(padded_tokens, ms)
            return
        if not self.probing:  # a batch chosen before the last switch
            return
        self.probing = False
        fit = self._fit()
        if fit is None:
            return
        predicted = max(fit.batch_ms(padded_tokens), 1e-6)
        one, every = (ms, predicted) if not all_threads else (predicted, ms)
        sample = min(max(one / max(every, 1e-6), LEAST_SPEEDUP), self.most_speedup)
        self.speedup += SPEEDUP_SMOOTHING * (sample - self.speedup)
        if ms < WINS_BELOW[all_threads] * predicted:
            self.current = all_threads
            self.recent = OnlineCost(window=WINDOW)
            self.recent.observe(padded_tokens, ms)

    def _fit(self) -> CostModel | None:
        """The current way's fitted cost; None before enough batches (or on data a fit cannot use:
        the stage calling this must never fail on it)."""
        try:
            return self.recent.model()
        except (ValueError, np.linalg.LinAlgError):
            return None
