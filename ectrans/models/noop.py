"""The no-op executor: answers {"chars": len(text)} at once, so a benchmark measures the Redis path
(dispatcher, worker, results) without any model cost. With `delay_ms` in its registry entry each
batch takes that long instead, one batch after another as on a device: work then queues in the
worker, which is what recovery tests and benchmarks of scheduling need. Such a device is paced
(`ectrans.models.api.Paced`) as the model pipeline is: one segment, the whole delay."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Sequence

from ectrans.common.registry import ModelSpec
from ectrans.models.api import BatchStats, Executor, FrontSegment, ItemResult, Paced, ProgressCallbacks, Request
from ectrans.models.inputs import input_error, noop_output


class NoopExecutor(Executor):
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._closed = False
        self.delay_s = float(spec.options.get("delay_ms", 0.0)) / 1000.0
        self._device = concurrent.futures.ThreadPoolExecutor(1, "noop-device") if self.delay_s > 0 else None
        self._lock = threading.Lock()
        self._bulk_waiting = 0
        self._front: FrontSegment | None = None
        self._progress = ProgressCallbacks()

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(text.split()) for text in texts]

    def submit(self, request: Request) -> concurrent.futures.Future[tuple[list[ItemResult], BatchStats]]:
        future: concurrent.futures.Future[tuple[list[ItemResult], BatchStats]] = concurrent.futures.Future()
        if self._closed:
            future.set_exception(RuntimeError(f"executor for {self.spec.name!r} is closed"))
        elif not self.spec.supports(request.op):
            future.set_exception(ValueError(f"model {self.spec.name!r} does not serve op {request.op!r}"))
        else:
            # Empty text is fine here: the no-op measures the path, not the input.
            results = [
                ItemResult(output=noop_output(text)) if isinstance(text, str) else ItemResult(error=input_error(text))
                for text in request.inputs
            ]
            tokens = sum(self.count_tokens([text for text in request.inputs if isinstance(text, str)]))
            delay_ms = self.delay_s * 1000.0
            stats = BatchStats(len(request.inputs), tokens, tokens, delay_ms, delay_ms)
            if self._device is not None:
                if not request.realtime:
                    with self._lock:
                        self._bulk_waiting += 1
                return self._device.submit(self._run_delayed, results, stats, request.realtime)
            future.set_result((results, stats))
        return future

    def _run_delayed(
        self, results: list[ItemResult], stats: BatchStats, realtime: bool
    ) -> tuple[list[ItemResult], BatchStats]:
        if realtime:
            time.sleep(self.delay_s)
            return results, stats
        with self._lock:
            self._bulk_waiting -= 1
            self._front = FrontSegment(time.monotonic(), stats.padded_tokens)
        self._progress()
        time.sleep(self.delay_s)
        with self._lock:
            self._front = None
        return results, stats

    def pacing(self) -> Paced:
        return self

    def bulk_waiting(self) -> int:
        with self._lock:
            return self._bulk_waiting

    def front_segment(self) -> FrontSegment | None:
        with self._lock:
            return self._front

    def on_progress(self, callback: Callable[[], None]) -> Callable[[], None]:
        return self._progress.add(callback)

    def watch_backlog(self, queued: Callable[[], int]) -> None:
        """One device, no threads to share: the worker's backlog changes nothing."""

    def close(self) -> None:
        self._closed = True
        if self._device is not None:
            self._device.shutdown(wait=False, cancel_futures=True)
