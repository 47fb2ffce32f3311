"""Choosing how a lone bulk batch runs on a CPU: all threads or its stage's own (ectrans/models/alone.py)."""

from __future__ import annotations

from ectrans.models.alone import AloneThreads


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def run(choice: AloneThreads, ms_per_token: dict[bool, float], batches: int, clock: Clock) -> list[bool]:
    """`batches` lone batches of 10-80 padded tokens, 0.1 s apart, each costing 2 ms plus its tokens
    at the way's rate; the ways they ran."""
    ways = []
    for i in range(batches):
        tokens = 10 + 10 * (i % 8)
        way = choice.all_threads()
        choice.observe(way, 2.0 + ms_per_token[way] * tokens, tokens)
        ways.append(way)
        clock.now += 0.1
    return ways


def test_all_threads_run_while_they_pay_and_one_thread_is_tried_once_a_second() -> None:
    clock = Clock()
    choice = AloneThreads(probe_after_s=1.0, clock=clock)
    ways = run(choice, {True: 0.2, False: 0.3}, 50, clock)  # a quiet host: all threads 1.4x cheaper
    assert choice.current is True
    assert 3 <= ways.count(False) <= 5  # the probes, not more
    assert 1.2 < choice.speedup < 1.45  # what the probes measured: 2 ms + 0.3 vs 0.2 ms a token


def test_a_busy_core_moves_lone_batches_to_one_thread_and_a_quiet_host_back() -> None:
    clock = Clock()
    choice = AloneThreads(probe_after_s=1.0, clock=clock)
    run(choice, {True: 0.2, False: 0.3}, 20, clock)
    busy = run(choice, {True: 1.5, False: 0.3}, 30, clock)  # another process holds a core
    assert choice.current is False and busy[-10:].count(True) <= 1  # within a second and a fit
    quiet = run(choice, {True: 0.2, False: 0.3}, 30, clock)
    assert choice.current is True and quiet[-10:].count(False) <= 1


def test_noise_within_the_margin_does_not_leave_all_threads() -> None:
    clock = Clock()
    choice = AloneThreads(probe_after_s=1.0, clock=clock)
    run(choice, {True: 0.3, False: 0.26}, 100, clock)  # one thread a little cheaper: within the 1.3x margin
    assert choice.current is True
