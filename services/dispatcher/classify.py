"""Real-time or batch: the dispatcher's classification policy."""

from __future__ import annotations

from dataclasses import dataclass

from ectrans.common.schemas import Task


@dataclass(frozen=True)
class ClassPolicy:
    realtime_deadline_ms: int = 250
    realtime_max_chars: int = 64
    default_class: str = "batch"


def classify(task: Task, policy: ClassPolicy) -> str:
    """Explicit priority wins; then a tight deadline; then a small input; then the default."""
    if task.priority is not None:
        return task.priority
    if task.deadline_ms is not None and task.deadline_ms <= policy.realtime_deadline_ms:
        return "realtime"
    if policy.realtime_max_chars and len(task.input) <= policy.realtime_max_chars:
        return "realtime"
    return policy.default_class
