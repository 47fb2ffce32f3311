"""Where to split a model between client and server: predicted latency of every split point.

A model is a chain of K units; split k runs units[0:k] on the client and units[k:] on the server.
Split k < K pays the client's prefix, one round trip, the transfer of what crosses at k (plus the
result coming back), the server's queue and the server's suffix; split K runs everything locally.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from ectrans.common.cost import CostModel, predict_realtime_ms

MS_PER_BIT_SECOND = 1000.0
BITS_PER_BYTE = 8
# Predictions that differ by less than this are ties (summation order can differ in the last bits).
TIE_TOLERANCE_MS = 1e-9
# A client leaves its current split point only for one predicted faster by this fraction and at
# least this many ms: the point it does not take is predicted from older measurements, so a near
# tie is noise, and flipping on noise costs a trip on the slower path each time.
SWITCH_MARGIN = 0.05
SWITCH_MIN_MS = 0.5


def _is_non_negative(value: float) -> bool:
    return math.isfinite(value) and value >= 0


def _check_costs(name: str, values: Sequence[float], units: int) -> None:
    if len(values) != units:
        raise ValueError(f"{name} has {len(values)} values, expected one per unit ({units})")
    if not all(_is_non_negative(value) for value in values):
        raise ValueError(f"{name} must be finite and non-negative, got {tuple(values)}")


@dataclass(frozen=True)
class SplitCosts:
    """Per-unit costs of one request on each side, and what crosses the link at each split."""

    client_ms: tuple[float, ...]
    """Latency of each unit on the client (len K)."""
    server_ms: tuple[float, ...]
    """Latency of each unit on the server (len K), without queueing."""
    transfer_bytes: tuple[int, ...]
    """Bytes sent at split k, for k in 0..K-1: the text, then token ids, then hidden states."""
    result_bytes: int = 0
    """Bytes of the result the server sends back (the same at every split k < K)."""

    def __post_init__(self) -> None:
        # Store tuples even when given lists, so the costs stay immutable and hashable.
        for name in ("client_ms", "server_ms", "transfer_bytes"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        units = len(self.client_ms)
        if units == 0:
            raise ValueError("a model needs at least one unit")
        _check_costs("client_ms", self.client_ms, units)
        _check_costs("server_ms", self.server_ms, units)
        _check_costs("transfer_bytes", self.transfer_bytes, units)
        if not _is_non_negative(self.result_bytes):
            raise ValueError(f"{self.result_bytes=} must be non-negative")

    @property
    def units(self) -> int:
        """K, the number of units; split points run from 0 to K."""
        return len(self.client_ms)


@dataclass(frozen=True)
class Link:
    """The network between client and server, as the latency model sees it."""

    bandwidth_bps: float
    """Bits per second, both directions alike."""
    rtt_ms: float
    """Round trip of an empty message."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bandwidth_bps) and self.bandwidth_bps > 0):
            raise ValueError(f"{self.bandwidth_bps=} must be finite and positive")
        if not _is_non_negative(self.rtt_ms):
            raise ValueError(f"{self.rtt_ms=} must be finite and non-negative")

    def transfer_ms(self, n_bytes: float) -> float:
        return MS_PER_BIT_SECOND * BITS_PER_BYTE * n_bytes / self.bandwidth_bps


def predict_ms(costs: SplitCosts, link: Link, queue_wait_ms: float = 0.0) -> list[float]:
    """Predicted end-to-end latency of each split point k = 0..K (K + 1 values)."""
    if not _is_non_negative(queue_wait_ms):
        raise ValueError(f"{queue_wait_ms=} must be finite and non-negative")
    units = costs.units
    predictions = []
    for k in range(units):
        network_ms = link.rtt_ms + link.transfer_ms(costs.transfer_bytes[k] + costs.result_bytes)
        predictions.append(sum(costs.client_ms[:k]) + network_ms + queue_wait_ms + sum(costs.server_ms[k:]))
    predictions.append(sum(costs.client_ms))  # k = K: all local, nothing sent
    return predictions


def _candidates(units: int, allowed: Collection[int] | None) -> list[int]:
    if allowed is None:
        return list(range(units + 1))
    outside = sorted(k for k in allowed if not 0 <= k <= units)
    if outside:
        raise ValueError(f"split points {outside} are outside 0..{units}")
    if not allowed:
        raise ValueError("no split point is allowed")
    return sorted(set(allowed))


def choose_split(
    costs: SplitCosts,
    link: Link,
    queue_wait_ms: float = 0.0,
    allowed: Collection[int] | None = None,
    current: int | None = None,
) -> int:
    """The split point with the lowest predicted latency; ties go to the smaller k (less client work).

    `allowed` restricts the candidates, e.g. a client that holds only the first units' weights.
    `current`, the point the client runs now, is kept unless the best is predicted faster by more
    than `SWITCH_MARGIN` and `SWITCH_MIN_MS`.
    """
    predictions = predict_ms(costs, link, queue_wait_ms)
    candidates = _candidates(costs.units, allowed)
    fastest = min(predictions[k] for k in candidates)
    best = next(k for k in candidates if predictions[k] <= fastest + TIE_TOLERANCE_MS)
    if current is not None and current in candidates:
        gain = predictions[current] - fastest
        if gain <= max(SWITCH_MARGIN * fastest, SWITCH_MIN_MS):
            return current
    return best


def server_unit_ms(client_unit_ms: Sequence[float], server_total_ms: float) -> tuple[float, ...]:
    """The server's per-unit costs when it publishes only a whole-model cost.

    Relative unit costs are a property of the model, not the device, so the client's own profile is
    scaled to the server's total. A profile that sums to zero says nothing: spread the total evenly.
    """
    if not client_unit_ms:
        raise ValueError("a model needs at least one unit")
    if not all(_is_non_negative(ms) for ms in client_unit_ms):
        raise ValueError(f"client_unit_ms must be finite and non-negative, got {tuple(client_unit_ms)}")
    if not _is_non_negative(server_total_ms):
        raise ValueError(f"{server_total_ms=} must be finite and non-negative")
    client_total = sum(client_unit_ms)
    if client_total == 0:
        return tuple(server_total_ms / len(client_unit_ms) for _ in client_unit_ms)
    return tuple(server_total_ms * ms / client_total for ms in client_unit_ms)


def queue_wait_ms(cost: CostModel | None, queued_tasks: int, task_tokens: int, bulk_busy: bool) -> float:
    """How long a real-time task waits at the server before its own batch starts: the bulk segment
    it may find running plus the real-time work queued ahead. 0 when the server's cost is unknown."""
    if cost is None:
        return 0.0
    # The dispatcher's prediction minus the task's own batch, which `SplitCosts.server_ms` already counts.
    total_ms = predict_realtime_ms(cost, task_tokens, queued_tasks, bulk_busy)
    return max(0.0, total_ms - cost.batch_ms(task_tokens))
