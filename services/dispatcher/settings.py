"""Dispatcher settings (`ECTRANS_*`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ectrans.common.schemas import Limits
from ectrans.common.settings import CommonSettings


class DispatcherSettings(CommonSettings):
    instance: str | None = Field(None, description="Consumer name; default `<host>-0`.")
    realtime_deadline_ms: int = Field(
        250, ge=0, description="A task with a deadline at or under this is real-time (when no priority)."
    )
    realtime_max_chars: int = Field(
        64, ge=0, description="A task whose input is at most this many characters is real-time (0: off)."
    )
    default_class: Literal["realtime", "batch"] = "batch"
    max_input_chars: int = Field(10_000, ge=1, description="Longest accepted `input`, in characters.")
    max_task_bytes: int = Field(64 * 1024, ge=256, description="Largest accepted task, all fields together.")
    reject_unknown_fields: bool = Field(False, description="Error on fields ECTrans does not know.")
    max_split_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest accepted split task (activations from a client's first units)."
    )
    max_queue_len: int = Field(
        10_000, ge=1, description="A model queue this long makes new tasks fail at once with `overloaded`."
    )
    realtime_max_queue_s: float = Field(
        30.0,
        ge=0,
        description="A real-time queue holding this many seconds of its workers' work (from their fitted cost)"
        " makes new real-time tasks fail at once with `overloaded` (0: entries only).",
    )
    batch_max_queue_s: float = Field(
        30.0,
        ge=0,
        description="The same for batch-class queues: how long a newly queued bulk task may wait (0: entries only).",
    )
    read_count: int = Field(256, ge=1, le=10_000, description="Entries read per XREADGROUP.")
    claim_idle_ms: int = Field(30_000, ge=100, description="Idle time after which a dead peer's entries are taken.")
    heartbeat_s: float = Field(2.0, gt=0)
    unavailable_after_s: float = Field(
        60.0,
        gt=0,
        description="A model with no live worker this long gets `unavailable` errors, for new and queued tasks.",
    )

    @model_validator(mode="after")
    def _check(self) -> DispatcherSettings:
        if self.realtime_max_chars > self.max_input_chars:
            raise ValueError(f"{self.realtime_max_chars=} must be <= {self.max_input_chars=}")
        return self

    @property
    def limits(self) -> Limits:
        return Limits(self.max_input_chars, self.max_task_bytes, self.reject_unknown_fields, self.max_split_bytes)
