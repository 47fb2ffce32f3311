"""The dispatcher's real-time/batch policy."""

from __future__ import annotations

import pytest

from ectrans.common.schemas import Task
from ectrans.services.dispatcher.classify import ClassPolicy, classify

POLICY = ClassPolicy(realtime_deadline_ms=250, realtime_max_chars=20, default_class="batch")


def task(text: str = "a long enough input text here", priority: str | None = None, deadline: int | None = None) -> Task:
    return Task(id="t", model="m", op="embed", input=text, submitted_ms=0, priority=priority, deadline_ms=deadline)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (task(priority="batch", deadline=10), "batch"),  # explicit priority wins over a tight deadline
        (task(priority="realtime"), "realtime"),
        (task(deadline=250), "realtime"),  # at the threshold
        (task(deadline=251), "batch"),
        (task(text="short"), "realtime"),  # small input
        (task(), "batch"),  # default
    ],
)
def test_policy_order(given: Task, expected: str) -> None:
    assert classify(given, POLICY) == expected


def test_small_input_rule_can_be_turned_off() -> None:
    assert classify(task(text="short"), ClassPolicy(250, 0, "batch")) == "batch"
