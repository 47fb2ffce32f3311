"""Batch forming: real-time first, HRRN anchor, length-aware packing under a token budget."""

from __future__ import annotations

from ectrans.common.cost import CostModel
from ectrans.common.schemas import Task
from ectrans.services.worker.batcher import PADDING_FREE_TASKS, Batch, Batcher, BatchPolicy, Pending, response_ratio


def pending(n: int, tokens: int, arrived: float, task_class: str = "batch", deadline_ms: int | None = None) -> Pending:
    task = Task(
        id=f"t{n}", model="m", op="embed", input="x", submitted_ms=1_000, deadline_ms=deadline_ms, task_class=task_class
    )
    return Pending(f"{n}-0", "stream", task, tokens, arrived)


def make(max_batch: int = 4, wait_s: float = 0.01, budget: int = 10_000, fifo: bool = False) -> Batcher:
    return Batcher(BatchPolicy(2, 0.001, budget), BatchPolicy(max_batch, wait_s, budget), fifo=fifo)


def test_realtime_goes_before_batch() -> None:
    b = make()
    for i in range(4):
        b.add(pending(i, 10, 0.0))
    b.add(pending(9, 10, 0.0, "realtime"))
    first = b.next_batch(now=1.0)
    assert first is not None and first.task_class == "realtime" and [p.task.id for p in first.items] == ["t9"]
    second = b.next_batch(now=1.0)
    assert second is not None and second.task_class == "batch"


def test_batch_waits_for_mates_until_max_wait() -> None:
    b = make(max_batch=4, wait_s=0.010)
    b.add(pending(0, 10, arrived=0.0))
    assert b.next_batch(now=0.005) is None
    assert b.wait_hint(now=0.005) == 0.005
    batch = b.next_batch(now=0.011)
    assert batch is not None and len(batch.items) == 1


def test_packing_groups_similar_lengths_to_cut_padding() -> None:
    b = make(max_batch=2)
    lengths = [10, 100, 12, 98]
    for i, tokens in enumerate(lengths):
        b.add(pending(i, tokens, arrived=0.0))
    first, second = b.next_batch(now=1.0), b.next_batch(now=1.0)
    assert first is not None and second is not None
    groups = sorted(sorted(p.tokens for p in batch.items) for batch in (first, second))
    assert groups == [[10, 12], [98, 100]]
    assert first.padded_tokens - first.tokens <= 2 and second.padded_tokens - second.tokens <= 2


def test_a_padding_bound_splits_a_queue_of_every_length_into_length_sorted_batches() -> None:
    lengths = [10 + (i * 7) % 50 for i in range(30)]  # 10 to 59 tokens, mixed: all fit one batch of 32
    unbounded = make(max_batch=32)
    bounded = Batcher(BatchPolicy(2, 0.001), BatchPolicy(32, 0.01, max_padding=0.25))
    drained: dict[str, list[Batch]] = {}
    for name, b in (("unbounded", unbounded), ("bounded", bounded)):
        for i, tokens in enumerate(lengths):
            b.add(pending(i, tokens, arrived=0.0))
        drained[name] = []
        while (batch := b.next_batch(now=1.0)) is not None:
            drained[name].append(batch)
    assert [len(batch.items) for batch in drained["unbounded"]] == [30]  # padded to the longest
    batches = drained["bounded"]
    assert sum(len(batch.items) for batch in batches) == len(lengths)
    assert any(len(batch.items) > PADDING_FREE_TASKS for batch in batches)  # grown within the bound
    assert all(b.padded_tokens <= 1.25 * b.tokens for b in batches if len(b.items) > PADDING_FREE_TASKS)
    padded = {name: sum(batch.padded_tokens for batch in found) for name, found in drained.items()}
    assert padded["bounded"] < 0.75 * padded["unbounded"]


def test_a_few_tasks_share_one_batch_whatever_their_padding() -> None:
    bounded = Batcher(BatchPolicy(2, 0.001), BatchPolicy(32, 0.01, max_padding=0.25))
    for i, tokens in enumerate([8, 60, 12, 40, 9, 58]):
        bounded.add(pending(i, tokens, arrived=0.0))
    batch = bounded.next_batch(now=1.0)
    assert batch is not None and len(batch.items) == 6


def test_fifo_mode_keeps_arrival_order_and_ignores_class() -> None:
    b = make(max_batch=2, fifo=True)
    for i, tokens in enumerate([10, 100, 12]):
        b.add(pending(i, tokens, arrived=float(i)))
    b.add(pending(3, 5, 3.0, "realtime"))
    batch = b.next_batch(now=10.0)
    assert batch is not None and batch.task_class == "fifo" and [p.task.id for p in batch.items] == ["t0", "t1"]


def test_token_budget_bounds_batch_times_padded_length() -> None:
    b = make(max_batch=8, budget=300)
    for i in range(8):
        b.add(pending(i, 100, arrived=0.0))
    batch = b.next_batch(now=1.0)
    assert batch is not None and len(batch.items) == 3 and batch.padded_tokens <= 300


def test_hrrn_lets_a_long_waiting_long_task_anchor_the_batch() -> None:
    b = make(max_batch=1)
    b.seconds_per_token = 0.001
    b.add(pending(0, 200, arrived=0.0))  # long job, waiting 10 s: ratio (10 + 0.2) / 0.2 = 51
    b.add(pending(1, 10, arrived=9.9))  # short job, waiting 0.1 s: ratio (0.1 + 0.01) / 0.01 = 11
    assert response_ratio(b.queues["batch"][0], 10.0, 0.001) > response_ratio(b.queues["batch"][1], 10.0, 0.001)
    batch = b.next_batch(now=10.0)
    assert batch is not None and batch.items[0].task.id == "t0"


def test_short_jobs_go_first_when_waits_are_equal() -> None:
    b = make(max_batch=1)
    b.add(pending(0, 200, arrived=0.0))
    b.add(pending(1, 10, arrived=0.0))
    batch = b.next_batch(now=0.5)
    assert batch is not None and batch.items[0].task.id == "t1"


def test_expired_tasks_are_taken_out() -> None:
    b = make()
    b.add(pending(0, 10, 0.0, deadline_ms=50))  # submitted at 1000 ms, due at 1050 ms
    b.add(pending(1, 10, 0.0))
    expired = b.take_expired(now_ms=1_051)
    assert [p.task.id for p in expired] == ["t0"] and len(b) == 1


def test_a_class_without_a_free_slot_is_skipped() -> None:
    b = make()
    b.add(pending(0, 10, 0.0))
    b.add(pending(1, 10, 0.0, "realtime"))
    assert b.next_batch(now=1.0, free={"batch"}) is not None  # real-time is full: bulk may still go
    assert b.next_batch(now=1.0, free=set()) is None
    assert b.wait_hint(now=1.0, free=set()) is None  # nothing to wake up for until a slot frees


def test_idle_device_takes_a_lone_task_at_once() -> None:
    b = make(max_batch=4, wait_s=0.010)
    b.add(pending(0, 10, arrived=0.0))
    assert b.next_batch(now=0.001) is None  # busy device: wait for batch-mates
    assert b.wait_hint(now=0.001, idle=True) == 0.0
    batch = b.next_batch(now=0.001, idle=True)  # idle device: waiting would only waste it
    assert batch is not None and [p.task.id for p in batch.items] == ["t0"]


def test_time_cap_keeps_packed_batches_small_but_never_empty() -> None:
    b = make(max_batch=32, budget=10_000)
    for i in range(8):
        b.add(pending(i, 100, arrived=0.0))
    b.batch_token_cap = CostModel(overhead_ms=20.0, ms_per_token=1.0).tokens_within(320.0)  # 300 tokens
    b.realtime_seen = 0.5  # real-time work about: the cap holds
    assert b.batch_token_cap == 300 and b.packed_budget == 300
    batch = b.next_batch(now=1.0)
    assert batch is not None and batch.padded_tokens == 300  # 3 of 100 tokens, not all 8
    b.batch_token_cap = 10  # below one task: the task still runs, alone
    batch = b.next_batch(now=1.0)
    assert batch is not None and len(batch.items) == 1


def test_time_cap_leaves_fifo_mode_alone() -> None:
    b = make(max_batch=32, fifo=True)
    for i in range(8):
        b.add(pending(i, 100, arrived=0.0))
    b.batch_token_cap = 300
    batch = b.next_batch(now=1.0)
    assert batch is not None and len(batch.items) == 8
    assert CostModel(overhead_ms=5.0, ms_per_token=0.0).tokens_within(100.0) is None


def test_bulk_due_replaces_max_wait_for_the_batch_class() -> None:
    """A paced lane forms its bulk batch at `bulk_due` (its device about to be free), however long
    that is past `max_wait_s`, or earlier once the batch is full."""
    b = make(max_batch=3, wait_s=0.010)
    b.add(pending(0, 10, arrived=0.0))
    assert b.next_batch(now=0.050, bulk_due=0.100) is None
    assert b.wait_hint(now=0.050, bulk_due=0.100) == 0.050
    b.add(pending(1, 10, arrived=0.060))
    batch = b.next_batch(now=0.100, bulk_due=0.100)
    assert batch is not None and [p.task.id for p in batch.items] == ["t0", "t1"]
    for i in range(3):
        b.add(pending(2 + i, 10, arrived=0.2))
    full = b.next_batch(now=0.2, bulk_due=0.5)
    assert full is not None and len(full.items) == 3


def test_time_cap_holds_only_while_real_time_work_is_about() -> None:
    """With no real-time task for CAP_HOLD_S, bulk batches fill the whole token budget; a real-time
    arrival brings the cap back at once."""
    from ectrans.services.worker.batcher import CAP_HOLD_S

    b = make(max_batch=32, budget=10_000)
    b.batch_token_cap = 300
    for i in range(8):
        b.add(pending(i, 100, arrived=0.0))
    batch = b.next_batch(now=1.0)
    assert batch is not None and len(batch.items) == 8  # nothing real-time seen: uncapped
    b.add(pending(20, 10, arrived=2.0, task_class="realtime"))
    for i in range(8):
        b.add(pending(30 + i, 100, arrived=2.0))
    first = b.next_batch(now=2.01)
    assert first is not None and first.task_class == "realtime"
    capped = b.next_batch(now=2.01)
    assert capped is not None and len(capped.items) == 3
    rest = b.next_batch(now=2.0 + CAP_HOLD_S)
    assert rest is not None and len(rest.items) == 5  # the hold is over
