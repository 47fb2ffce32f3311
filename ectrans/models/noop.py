"""The no-op executor: answers {"chars": len(text)} at once, so a benchmark measures the Redis path
(dispatcher, worker, results) without any model cost."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence

from ectrans.common.registry import ModelSpec
from ectrans.models.api import BatchStats, ItemResult, Request
from ectrans.models.inputs import input_error, noop_output


class NoopExecutor:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._closed = False

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
            future.set_result((results, BatchStats(len(request.inputs), tokens, tokens, 0.0)))
        return future

    def close(self) -> None:
        self._closed = True
