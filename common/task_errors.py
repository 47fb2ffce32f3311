"""The error record of a task that was read and validated, spelled once for every service: its id,
class, model and op, and its latency counted from its ingress entry."""

from __future__ import annotations

from ectrans.common.results import Fields, error_record
from ectrans.common.schemas import Task


def task_error_record(task: Task, reason: str, message: str) -> Fields:
    return error_record(
        task.id,
        reason,
        message,
        submitted_ms=task.submitted_ms,
        task_class=task.task_class,
        model=task.model,
        op=task.op,
    )
