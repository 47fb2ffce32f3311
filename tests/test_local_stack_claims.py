"""Two `ectrans up` of one name started at the same moment: exactly one claims the name."""

from __future__ import annotations

import multiprocessing
import time
from multiprocessing.synchronize import Barrier

import pytest

from ectrans.local import stacks

ROUNDS = 20


def claim(barrier: Barrier, outcomes: multiprocessing.Queue[str]) -> None:
    barrier.wait()
    try:
        stacks.record("race", "redis://127.0.0.1:1/0", "ectrans:")
        outcomes.put("claimed")
    except stacks.StackRunning:
        outcomes.put("refused")
    time.sleep(0.3)  # alive while the other one looks at the record


def test_two_ups_at_once_never_both_claim_a_name() -> None:
    """The record used to be checked, then written: both processes could pass the check, and two
    stacks ran under one name (the client and `top` found only the last one)."""
    context = multiprocessing.get_context("fork")
    for _ in range(ROUNDS):
        barrier, outcomes = context.Barrier(2), context.Queue()
        processes = [context.Process(target=claim, args=(barrier, outcomes)) for _ in range(2)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(30)
        assert sorted([outcomes.get(timeout=10), outcomes.get(timeout=10)]) == ["claimed", "refused"]
        stacks.stack_file("race").unlink()


def test_a_record_that_is_no_record_does_not_hold_the_name() -> None:
    path = stacks.stack_file("garbled")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    stack = stacks.record("garbled", "redis://127.0.0.1:1/0", "ectrans:")
    assert stacks.find("garbled") == stack
    stacks.remove(stack)
    with pytest.raises(FileNotFoundError):
        path.read_text()
