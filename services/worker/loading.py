"""Loading the served models' executors (slow: run from a thread)."""

from __future__ import annotations

from ectrans.common.registry import ModelSpec
from ectrans.models.api import Executor
from ectrans.services.worker.lanes import model_settings
from ectrans.services.worker.settings import WorkerSettings


def load_executors(specs: list[ModelSpec], settings: WorkerSettings) -> dict[str, Executor]:
    """Load every served model (slow: call from a thread). With shared weights, a model runs in
    `executors_per_device` processes attached to one weight holder, behind the same interface."""
    from ectrans.models.loader import load_executor

    threads = settings.torch_threads()
    executors: dict[str, Executor] = {}
    for spec in specs:
        device = settings.device or spec.device
        segments = model_settings(settings, spec).segments
        if settings.shares_weights() and spec.kind != "noop":
            from ectrans.sharing.process_pool import SharedExecutorPool

            processes = settings.executors_per_device
            executors[spec.name] = SharedExecutorPool(
                spec,
                processes,
                device=device,
                threads_per_process=max(1, threads // processes),
                segments=segments,
                trace=settings.trace_layers,
                log_format=settings.log_format,
            )
        else:
            executors[spec.name] = load_executor(
                spec, device=device, threads=threads, segments=segments, trace=settings.trace_layers
            )
    return executors
