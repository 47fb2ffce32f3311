"""Split deployment from the client's side: run the first k units here, the rest on the server.

    local = LocalModel("/models/all-MiniLM-L6-v2", name="minilm")
    async with AsyncClient(url) as client:
        split = SplitClient(client, local)              # split="auto" by default
        vectors = await split.embed(["a", "b"])

With `split="auto"` every call picks the k of least predicted latency from: this client's unit
profile (measured on first use, cached), the link's bandwidth and round trip (estimated passively
from this client's own split traffic and its state reads), and the server's published batch cost
and queue lengths (refreshed in the background every `state_every_s`). Each of these is checked
against what the client's own calls then measure (`Drift`): its local compute against the profile,
the server's batches against the published cost, and the server's time per task beyond its batches
(stream hops, which neither the cost nor the link holds). Conditions change, so does k; but only for a
point predicted clearly faster (`choose.SWITCH_MARGIN`): the points not taken are predicted from
older measurements, and flipping on a near tie pays the slower path for nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ectrans.client import AsyncClient, TaskResult
from ectrans.common.cost import CostModel
from ectrans.common.split import EMBED
from ectrans.models.profile import LatencyModel
from ectrans.split.choose import Link, SplitCosts, choose_split, predict_ms, queue_wait_ms, server_unit_ms
from ectrans.split.link import LinkEstimator
from ectrans.split.local import LocalModel

logger = logging.getLogger(__name__)

TASK_OVERHEAD_BYTES = 160  # stream fields besides the input: ids, names, the reply stream
RESULT_OVERHEAD_BYTES = 200
STATE_REQUEST_BYTES, STATE_REPLY_BYTES = 120, 300  # the server-state read: HGETALL cost + XLEN per class
# Weight of the newest call in the drift estimates below, once a few calls are in: follows a change
# within a handful of calls without taking one noisy call for the truth.
DRIFT_WEIGHT = 0.25
RATIO_LIMITS = (0.2, 5.0)  # one call's measured/predicted ratio, clipped: a stall says little about speed
MIN_PREDICTED_MS = 0.05  # below this a ratio is noise


class Drift:
    """A running average of how far one part of the prediction was off: a ratio (log-averaged, as
    ratios compose) or an offset in ms. The prior counts as one call; after a few calls the average
    is exponentially weighted, so a device or server that speeds up or slows down is followed."""

    def __init__(self, *, ratio: bool) -> None:
        self.ratio = ratio
        self.calls = 0
        self._mean = 0.0  # log(ratio), or ms

    @property
    def value(self) -> float:
        return math.exp(self._mean) if self.ratio else self._mean

    def observe(self, measured: float, predicted: float = 0.0) -> None:
        if self.ratio:
            if predicted < MIN_PREDICTED_MS or not measured > 0:
                return
            sample = math.log(min(max(measured / predicted, RATIO_LIMITS[0]), RATIO_LIMITS[1]))
        else:
            sample = measured - predicted
        if not math.isfinite(sample):
            return
        self.calls += 1
        self._mean += max(1.0 / (self.calls + 1), DRIFT_WEIGHT) * (sample - self._mean)


@dataclass(frozen=True)
class Decision:
    """One call's choice and the predictions behind it (for logs, tests and the benchmark)."""

    k: int
    predicted_ms: tuple[float, ...]
    link: Link
    queue_wait_ms: float
    server_overhead_ms: float = 0.0
    """The server's time per task beyond its batches (dispatch, pick-up, result write), as measured."""


class SplitClient:
    """Submits tasks for `local`'s model with its first k units run locally; k fixed or `auto`."""

    def __init__(
        self,
        client: AsyncClient,
        local: LocalModel,
        *,
        model: str | None = None,
        split: int | Literal["auto"] = "auto",
        half: bool = False,
        link: LinkEstimator | None = None,
        state_every_s: float = 1.0,
        profile: Sequence[LatencyModel] | None = None,
    ) -> None:
        if split != "auto" and not 0 <= split <= local.all_local:
            raise ValueError(f"split point {split} must be 'auto' or between 0 and {local.all_local}")
        self.client = client
        self.local = local
        self.model = model or local.spec.name
        self.split = split
        self.half = half
        self.link = link or LinkEstimator()
        self.state_every_s = state_every_s
        self.decisions: Counter[int] = Counter()
        self.last: Decision | None = None
        # A profile measured elsewhere (e.g. into another cache directory); else measured on first use.
        self._profile: list[LatencyModel] | None = list(profile) if profile is not None else None
        self._state: tuple[CostModel | None, dict[str, int]] = (None, {})
        self._state_at = -float("inf")
        self._refresh: asyncio.Task[None] | None = None
        # What this client's own calls measured against the prediction: its compute against the
        # profile, the server's batches against its published cost, and the server's time per task
        # beyond its batches (which neither the cost nor the link estimate holds).
        self.client_speed = Drift(ratio=True)
        self.server_speed = Drift(ratio=True)
        self.server_overhead = Drift(ratio=False)
        self._costs: SplitCosts | None = None  # the last `choose`'s unit costs, raw (before the drifts)

    async def run(
        self, op: str, texts: Sequence[str], params: dict[str, int] | None = None, **options: Any
    ) -> list[TaskResult]:
        """One task per text, split at the chosen k; results as `AsyncClient.submit_many` gives them."""
        params = dict(params or {})
        chosen = self.split == "auto"
        encoded = None
        if self.split == "auto":
            # Tokenised once: the length decides k, and a local run goes on from these very ids.
            encoded = self.local.encode(texts, params)
            k = await self.choose(texts, op, options.get("priority"), tokens=int(encoded.mask.sum(dim=-1).max()))
        else:
            k = self.split
        self.decisions[k] += 1
        if k == self.local.all_local:
            started = time.perf_counter()
            outputs = await asyncio.to_thread(self.local.run_all, texts, params, encoded=encoded)
            self._observe_client(chosen, k, started)
            return [TaskResult(id="", status="ok", output=output, task_class="local") for output in outputs]
        inputs: Sequence[str | bytes] = texts
        split_fields: dict[str, Any] = {}
        if k > 0:
            started = time.perf_counter()
            inputs = await asyncio.to_thread(self.local.payloads, texts, k, params, half=self.half, encoded=encoded)
            self._observe_client(chosen, k, started)
            split_fields = {"segment": k, "revision": self.local.revision}
        started = time.perf_counter()
        results = await self.client.submit_many(self.model, op, inputs, params=params, **split_fields, **options)
        self._observe(sum(len(i.encode() if isinstance(i, str) else i) for i in inputs), results, started)
        if chosen:
            self._observe_server(k, results)
        return results

    async def embed(self, texts: Sequence[str], **options: Any) -> np.ndarray:
        results = await self.run("embed", texts, **options)
        return np.stack([np.asarray(r.raise_for_status().output, dtype=np.float32) for r in results])

    async def translate(self, texts: Sequence[str], params: dict[str, int] | None = None, **options: Any) -> list[str]:
        results = await self.run("translate", texts, params, **options)
        return [str(r.raise_for_status().output["text"]) for r in results]

    # Choosing --------------------------------------------------------------------------------

    async def choose(
        self, texts: Sequence[str], op: str, priority: str | None = None, tokens: int | None = None
    ) -> int:
        """The split point of least predicted latency for this call, from what is known now;
        `tokens`, the longest text's token count, where the caller has it."""
        if self._profile is None:
            self._profile = await asyncio.to_thread(self.local.profile)
        cost, lengths = await self._server_state()
        if tokens is None:
            tokens = max(self.local.tokenize.count_tokens(list(texts)))
        batch = len(texts)
        client_ms = tuple(model.predict(batch, tokens) for model in self._profile)
        server_total = cost.batch_ms(batch * tokens) if cost is not None else sum(client_ms)
        self._costs = SplitCosts(
            client_ms=client_ms,
            server_ms=server_unit_ms(client_ms, server_total),
            transfer_bytes=self._transfer_bytes(texts, tokens),
            result_bytes=batch * self._result_bytes(op),
        )
        task_class = "realtime" if priority == "realtime" else "batch"
        wait = queue_wait_ms(cost, lengths.get(task_class, 0), batch * tokens, lengths.get("batch", 0) > 0)
        overhead = max(0.0, self.server_overhead.value)
        costs, link = self._corrected(self._costs), self.link.link()
        k = choose_split(costs, link, wait + overhead, current=self.last.k if self.last is not None else None)
        self.last = Decision(k, tuple(predict_ms(costs, link, wait + overhead)), link, wait, overhead)
        return k

    def _corrected(self, costs: SplitCosts) -> SplitCosts:
        """The unit costs scaled by how fast this client and the server have been lately."""
        client, server = self.client_speed.value, self.server_speed.value
        return SplitCosts(
            client_ms=tuple(ms * client for ms in costs.client_ms),
            server_ms=tuple(ms * server for ms in costs.server_ms),
            transfer_bytes=costs.transfer_bytes,
            result_bytes=costs.result_bytes,
        )

    def _transfer_bytes(self, texts: Sequence[str], tokens: int) -> tuple[int, ...]:
        """Bytes sent at each split point k < K for this call (payloads as `LocalModel` packs them)."""
        spec, batch = self.local.spec, len(texts)
        text_bytes = sum(len(t.encode()) for t in texts) + batch * TASK_OVERHEAD_BYTES
        ids_bytes = 4 * tokens if spec.kind == "seq2seq" else 0
        hidden_bytes = tokens * spec.hidden_size * (2 if self.half else 4) + ids_bytes
        per_task = [4 * tokens, *([hidden_bytes] * (self.local.all_local - EMBED - 1))]
        return (text_bytes, *(batch * (b + TASK_OVERHEAD_BYTES) for b in per_task))

    def _result_bytes(self, op: str) -> int:
        return RESULT_OVERHEAD_BYTES + (4 * self.local.spec.hidden_size if op == "embed" else 64)

    async def _server_state(self) -> tuple[CostModel | None, dict[str, int]]:
        """The server's cost and queues as last read. Reading costs a round trip, which on a slow link
        is a good part of a local run: only the first call waits for it; later calls take the copy
        at hand and, once it is `state_every_s` old, refresh it in the background for the next one."""
        if self._state_at == -float("inf"):
            await self._read_state()
        elif time.monotonic() - self._state_at >= self.state_every_s and self._refresh is None:
            self._refresh = asyncio.create_task(self._refresh_state())
        return self._state

    async def _read_state(self) -> None:
        started = time.perf_counter()
        self._state = await self.client.model_state(self.model)
        self._state_at = time.monotonic()
        # One small round trip over the same link: the round trip is learned even while every call
        # runs locally (and sends nothing), instead of staying at the estimator's prior.
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        self.link.observe(STATE_REQUEST_BYTES, STATE_REPLY_BYTES, elapsed_ms)

    async def _refresh_state(self) -> None:
        try:
            await self._read_state()
        except Exception as exc:  # best effort: the copy at hand serves until the next try
            logger.debug("server state not refreshed: %s", exc)
            self._state_at = time.monotonic()  # not again at once, on every call
        finally:
            self._refresh = None

    def _observe_client(self, chosen: bool, k: int, started: float) -> None:
        """This client's units[0:k] took so long: against the profile's prediction for the call."""
        if chosen and self._costs is not None:
            measured_ms = (time.perf_counter() - started) * 1000.0
            self.client_speed.observe(measured_ms, sum(self._costs.client_ms[:k]))

    def _observe_server(self, k: int, results: list[TaskResult]) -> None:
        """The server's batches against its published cost, and its time per task beyond them (the
        hops from the ingress stream to a worker and back, which `latency_ms` holds)."""
        if self._costs is None or self.last is None or not results or not all(r.ok for r in results):
            return
        try:
            service_ms = max(float(r.fields["service_ms"]) for r in results)
        except (KeyError, ValueError):
            return
        self.server_speed.observe(service_ms, sum(self._costs.server_ms[k:]))
        latency_ms = max(r.latency_ms for r in results)
        self.server_overhead.observe(max(0.0, latency_ms - service_ms - self.last.queue_wait_ms))

    def _observe(self, sent_bytes: int, results: list[TaskResult], started: float) -> None:
        """Feed the link estimate: the round trip minus what the server says it spent."""
        if not results or not all(r.ok for r in results):
            return
        round_trip_ms = (time.perf_counter() - started) * 1000.0
        server_ms = max(r.latency_ms for r in results)
        received = len(results) * self._result_bytes("embed" if self.local.spec.kind == "encoder" else "translate")
        self.link.observe(sent_bytes + len(results) * TASK_OVERHEAD_BYTES, received, round_trip_ms - server_ms)
