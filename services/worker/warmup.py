"""Run each served model once per task class before the worker reports ready.

The first batch through a model pays for lazy work (allocator growth, kernel selection, oneDNN
primitive caches, CUDA context and cuBLAS handles): without a warm-up the first real task took
84 ms where the next took 18 ms. One batch of each class's largest size does that work up front.
"""

from __future__ import annotations

import logging
import time

from ectrans.common.registry import SEQ2SEQ_OPS
from ectrans.models.api import Executor, Request
from ectrans.services.worker.batcher import BatchPolicy

logger = logging.getLogger(__name__)

WARM_TEXT = "Warming up the model before the first task."
WARM_TIMEOUT_S = 300.0
# Generation ops: a couple of decoding steps suffice to build the decoder's kernels and caches.
WARM_GENERATION = {"max_new_tokens": 2, "num_beams": 1}


def warm_request(executor: Executor, size: int, *, realtime: bool) -> Request | None:
    """A batch of `size` short texts for the model's first op; None for models with nothing to warm."""
    ops = sorted(executor.spec.ops - {"noop"})
    if executor.spec.kind == "noop" or not ops:
        return None
    op = ops[0]
    params = dict(WARM_GENERATION) if op in SEQ2SEQ_OPS else {}
    return Request(op=op, inputs=[WARM_TEXT] * size, params=params, realtime=realtime)


def warm_up(executor: Executor, realtime: BatchPolicy, batch: BatchPolicy) -> float:
    """Run one batch of each class's largest size (blocking: call from a thread). Seconds taken.

    A failure is logged, not raised: the worker still serves, and each task gets its own error.
    """
    started = time.monotonic()
    for policy, is_realtime in ((realtime, True), (batch, False)):
        request = warm_request(executor, policy.max_batch, realtime=is_realtime)
        if request is None:
            return 0.0
        try:
            results, _ = executor.submit(request).result(timeout=WARM_TIMEOUT_S)
        except Exception:
            logger.exception("[start] warming %s failed", executor.spec.name)
            break
        if errors := [r.error for r in results if r.error]:
            logger.warning("[start] warming %s: %s", executor.spec.name, errors[0])
            break
    return time.monotonic() - started
