"""Worker settings (`ECTRANS_*`)."""

from __future__ import annotations

import os

from pydantic import Field, model_validator

from ectrans.common.settings import CommonSettings


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class WorkerSettings(CommonSettings):
    instance: str | None = Field(None, description="Consumer name, stable per host and slot; default `<host>-0`.")
    serve_models: str = Field("minilm", description="Comma-separated models this worker serves, or `*` for all.")
    device: str | None = Field(None, description="auto, cpu, cuda, cuda:N; default: each model's own setting.")
    threads: int = Field(0, ge=0, description="torch threads; 0 = this worker's share of the cores.")
    segments: int | None = Field(
        None, ge=1, description="Pipeline segments per model (default 2; a stored profile balances where they split)."
    )
    rt_max_batch: int = Field(8, ge=1, description="Largest real-time batch.")
    rt_max_wait_ms: float = Field(2.0, ge=0, description="Longest a real-time task waits for batch-mates.")
    batch_max_batch: int = Field(32, ge=1, description="Largest batch-class batch.")
    batch_max_wait_ms: float = Field(20.0, ge=0, description="Longest a batch task waits for batch-mates.")
    token_budget: int = Field(8192, ge=64, description="Batch × padded length limit of one batch.")
    batch_max_padding: float | None = Field(
        None,
        ge=0,
        description=(
            "Padding a bulk batch may carry, as a share of its real tokens: a task that would pad it more"
            " waits for a batch nearer its own length. Default: 0.25 on a CPU (padding costs compute"
            " there in proportion), no bound on a GPU."
        ),
    )
    batch_segment_ms: float = Field(
        200.0,
        ge=0,
        description=(
            "Target run time of one segment of a bulk batch: what a real-time batch cutting in may wait"
            " behind (on a GPU; on a CPU real-time batches run beside the pipeline). Bulk"
            " batches are sized from the model's fitted cost to stay under it while real-time work is about"
            " (until 60 s after the last real-time task; 0: only `token_budget`)."
        ),
    )
    trace_layers: bool = Field(
        True,
        description="On a CPU, encoder layers run as TorchScript traces, each checked against its eager"
        " layer at load (within 1e-5, equal in the tests; less Python per request; see ectrans/models/traced.py).",
    )
    fifo: bool = Field(False, description="One FIFO queue for both classes (the baseline to compare against).")
    prefetch: int = Field(256, ge=1, description="Most tasks read from Redis ahead of the device.")
    max_inflight_batches: int = Field(3, ge=1, description="Batches submitted to the executor at once.")
    claim_idle_ms: int = Field(30_000, ge=100, description="Idle time after which a dead peer's tasks are taken.")
    grace_s: float = Field(20.0, ge=0, description="On SIGTERM, how long in-flight batches may finish.")
    heartbeat_s: float = Field(2.0, gt=0)
    executors_per_device: int = Field(
        1,
        ge=1,
        description="Executor processes per served model; above 1 they share one copy of the weights "
        "(a weight-holder process per model and device) and split the threads between them.",
    )
    share_weights: bool = Field(
        False, description="Executors as processes attached to a weight holder even with one per device."
    )

    @model_validator(mode="after")
    def _check(self) -> WorkerSettings:
        if self.prefetch < self.batch_max_batch:
            raise ValueError(f"{self.prefetch=} must be >= {self.batch_max_batch=}")
        return self

    def model_names(self, registry_names: list[str]) -> list[str]:
        if self.serve_models.strip() == "*":
            return sorted(registry_names)
        names = [m.strip() for m in self.serve_models.split(",") if m.strip()]
        missing = sorted(set(names) - set(registry_names))
        if missing:
            raise ValueError(f"ECTRANS_SERVE_MODELS names models the registry does not know: {', '.join(missing)}")
        return names

    def torch_threads(self) -> int:
        return self.threads or available_cores()

    def shares_weights(self) -> bool:
        """Models run in executor processes over one shared copy of their weights."""
        return self.share_weights or self.executors_per_device > 1
