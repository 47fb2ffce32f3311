"""Passive estimate of the link's bandwidth and round trip from the client's own requests.

Each request gives one sample: the bytes that crossed the link (sent + received) and the network
time, i.e. the client's observed round trip minus the time the server reports it spent (queue +
service). The estimator fits `network_ms ≈ rtt_ms + 8000 · bytes / bandwidth_bps` by exponentially
weighted least squares, so old samples fade and the estimate follows a changing link.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ectrans.split.choose import BITS_PER_BYTE, MS_PER_BIT_SECOND, Link

MS_BITS_PER_BYTE = MS_PER_BIT_SECOND * BITS_PER_BYTE  # slope in ms/byte = this / bandwidth_bps
MIN_BANDWIDTH_BPS = 1e3
MAX_BANDWIDTH_BPS = 1e11
# The slope is trusted only when it stands this many standard errors above zero: with text-sized
# messages alone the bytes term drowns in jitter and a fitted bandwidth would be noise.
MIN_SLOPE_T = 3.0
MIN_EFFECTIVE_SAMPLES = 3.0  # two parameters, and one more to judge the residual
# A change of link: this many consecutive samples, all off the current fit the same way by more
# than the ratio (and the floor, so that jitter on a fast LAN does not count)...
CHANGE_STREAK = 5
SURPRISE_RATIO = 0.5
SURPRISE_FLOOR_MS = 2.0
# ...starts the fit afresh from those samples. Merely down-weighting the old ones is not enough:
# a few samples of the old regime, off by 100× on a changed link, swamp the new fit's residuals.


@dataclass(frozen=True)
class _Moments:
    """Weighted sufficient statistics of (bytes, ms) samples, in the numerically stable centred form."""

    weight: float = 0.0
    weight_sq: float = 0.0  # Σw², for the effective number of samples
    mean_x: float = 0.0
    mean_y: float = 0.0
    sxx: float = 0.0  # Σw(x - x̄)²
    sxy: float = 0.0
    syy: float = 0.0

    @classmethod
    def point(cls, x: float, y: float) -> _Moments:
        return cls(1.0, 1.0, x, y)

    def decayed(self, factor: float) -> _Moments:
        return _Moments(
            self.weight * factor,
            self.weight_sq * factor * factor,
            self.mean_x,
            self.mean_y,
            self.sxx * factor,
            self.sxy * factor,
            self.syy * factor,
        )

    def plus(self, other: _Moments) -> _Moments:
        """The statistics of both sample sets together (Chan et al.'s pairwise update)."""
        weight = self.weight + other.weight
        if weight == 0:
            return self
        dx, dy = other.mean_x - self.mean_x, other.mean_y - self.mean_y
        cross = self.weight * other.weight / weight
        return _Moments(
            weight,
            self.weight_sq + other.weight_sq,
            self.mean_x + dx * other.weight / weight,
            self.mean_y + dy * other.weight / weight,
            self.sxx + other.sxx + dx * dx * cross,
            self.sxy + other.sxy + dx * dy * cross,
            self.syy + other.syy + dy * dy * cross,
        )

    @property
    def effective_samples(self) -> float:
        return self.weight * self.weight / self.weight_sq if self.weight_sq > 0 else 0.0


def _identified_slope(moments: _Moments) -> float | None:
    """The fitted ms/byte, or None when the sizes seen do not pin it down."""
    n = moments.effective_samples
    if n < MIN_EFFECTIVE_SAMPLES or moments.sxx <= 0:
        return None
    slope = moments.sxy / moments.sxx
    if slope <= 0:
        return None
    residual = max(0.0, moments.syy - slope * moments.sxy)
    noise_var = residual / moments.weight * n / (n - 2)
    # Var(slope) = σ² Σw²(x - x̄)² / sxx², approximating Σw²(x - x̄)² by (Σw² / Σw) · sxx.
    slope_var = noise_var * (moments.weight_sq / moments.weight) / moments.sxx
    return slope if slope * slope >= MIN_SLOPE_T * MIN_SLOPE_T * slope_var else None


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


class LinkEstimator:
    """Running estimate of a client's link to the server from (bytes, network ms) samples."""

    def __init__(self, prior_bandwidth_bps: float = 10e6, prior_rtt_ms: float = 1.0, half_life: float = 20.0) -> None:
        if not MIN_BANDWIDTH_BPS <= prior_bandwidth_bps <= MAX_BANDWIDTH_BPS:
            raise ValueError(f"{prior_bandwidth_bps=} must be within [{MIN_BANDWIDTH_BPS}, {MAX_BANDWIDTH_BPS}]")
        if not (math.isfinite(prior_rtt_ms) and prior_rtt_ms >= 0):
            raise ValueError(f"{prior_rtt_ms=} must be finite and non-negative")
        if not (math.isfinite(half_life) and half_life > 0):
            raise ValueError(f"{half_life=} must be a positive number of observations")
        self.prior_bandwidth_bps = prior_bandwidth_bps
        self.prior_rtt_ms = prior_rtt_ms
        self.decay = 0.5 ** (1.0 / half_life)
        self.samples = 0
        self._settled = _Moments()  # samples the current fit explains
        self._streak = _Moments()  # consecutive samples it does not, all off the same way
        self._streak_sign = 0
        self._streak_len = 0

    def observe(self, sent_bytes: int, received_bytes: int, network_ms: float) -> None:
        """Add one request's sample; non-finite or negative ones are ignored."""
        if not (sent_bytes >= 0 and received_bytes >= 0 and math.isfinite(network_ms) and network_ms >= 0):
            return
        x, y = float(sent_bytes + received_bytes), float(network_ms)
        self.samples += 1
        sign = self._surprise(x, y)
        self._settled = self._settled.decayed(self.decay)
        self._streak = self._streak.decayed(self.decay)
        if sign != self._streak_sign:  # the streak is broken: its samples were ordinary after all
            self._settle_streak(restart=False)
        if sign == 0:
            self._settled = self._settled.plus(_Moments.point(x, y))
            return
        self._streak = self._streak.plus(_Moments.point(x, y))
        self._streak_sign, self._streak_len = sign, self._streak_len + 1
        if self._streak_len >= CHANGE_STREAK:
            self._settle_streak(restart=True)

    def link(self) -> Link:
        """The current estimate; the priors before any sample.

        A streak of surprising samples is a hypothesis until it is long enough to be a change (or
        breaks and joins the rest): mixing it in early would fit two links at once and report neither."""
        if self._settled.weight == 0:
            return Link(self.prior_bandwidth_bps, self.prior_rtt_ms)
        return self._fit(self._settled)

    def _fit(self, moments: _Moments) -> Link:
        slope = _identified_slope(moments)
        bandwidth = self.prior_bandwidth_bps if slope is None else MS_BITS_PER_BYTE / slope
        bandwidth = _clamp(bandwidth, MIN_BANDWIDTH_BPS, MAX_BANDWIDTH_BPS)
        # With the bandwidth fixed, the weighted least-squares round trip is the mean of what the bytes leave.
        rtt = moments.mean_y - moments.mean_x * MS_BITS_PER_BYTE / bandwidth
        return Link(bandwidth, max(0.0, rtt))

    def _surprise(self, x: float, y: float) -> int:
        """+1 / -1 when the sample is far slower / faster than the settled fit predicts, else 0.

        Only an identified fit can be surprised: with the bandwidth at its prior, large messages
        are expected to miss, and they are what identifies it."""
        if _identified_slope(self._settled) is None:
            return 0
        fit = self._fit(self._settled)
        predicted = fit.rtt_ms + fit.transfer_ms(x)
        miss = y - predicted
        if abs(miss) <= max(SURPRISE_RATIO * predicted, SURPRISE_FLOOR_MS):
            return 0
        return 1 if miss > 0 else -1

    def _settle_streak(self, restart: bool) -> None:
        self._settled = self._streak if restart else self._settled.plus(self._streak)
        self._streak = _Moments()
        self._streak_sign, self._streak_len = 0, 0
