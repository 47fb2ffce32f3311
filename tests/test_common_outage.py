"""The Redis-outage guard every service loop runs its steps through (common/outage.py), driven by
fake steps that fail as Redis does: no Redis, pauses of a millisecond."""

from __future__ import annotations

import asyncio
import logging

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ectrans.common.outage import Backoff, Outage


class FlakyStep:
    """A step that raises the given errors in turn, then succeeds."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)


class Recovery:
    def __init__(self) -> None:
        self.runs = 0

    async def __call__(self) -> None:
        self.runs += 1


def quick(what: str = "loop", recover: Recovery | None = None) -> Outage:
    return Outage(what, recover=recover, first_pause_s=0.001, max_pause_s=0.002, error_pause_s=0.001)


def redis_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("[redis]")]


def test_an_outage_is_one_line_when_lost_and_one_when_back(caplog: pytest.LogCaptureFixture) -> None:
    outage = quick("reader")
    step = FlakyStep(*(RedisConnectionError("refused") for _ in range(4)))

    async def scenario() -> list[bool]:
        return [await outage.attempt(step) for _ in range(6)]

    with caplog.at_level(logging.WARNING, logger="ectrans.common.outage"):
        assert asyncio.run(scenario()) == [False] * 4 + [True] * 2
    lines = redis_lines(caplog)
    assert len(lines) == 2, lines
    assert lines[0] == "[redis] reader lost the connection (refused); retrying with backoff"
    assert lines[1].startswith("[redis] reader connection back after ") and lines[1].endswith("s")
    assert outage.since is None and step.calls == 6


def test_a_second_outage_is_logged_again(caplog: pytest.LogCaptureFixture) -> None:
    outage = quick()
    step = FlakyStep(RedisConnectionError("a"))

    async def scenario() -> None:
        await outage.attempt(step)  # lost
        await outage.attempt(step)  # back
        step.errors = [RedisConnectionError("b")]
        await outage.attempt(step)  # lost again
        await outage.attempt(step)  # back again

    with caplog.at_level(logging.WARNING, logger="ectrans.common.outage"):
        asyncio.run(scenario())
    assert [line.split(" (")[0].split(" after")[0] for line in redis_lines(caplog)] == [
        "[redis] loop lost the connection",
        "[redis] loop connection back",
        "[redis] loop lost the connection",
        "[redis] loop connection back",
    ]


def test_recovery_runs_once_before_the_step_after_a_lost_connection_or_lost_groups() -> None:
    recovery = Recovery()
    outage = quick(recover=recovery)
    step = FlakyStep(
        RedisConnectionError("down"),
        RedisConnectionError("down"),
        ResponseError("NOGROUP No such key or consumer group"),
    )

    async def scenario() -> list[tuple[bool, int]]:
        seen = []
        for _ in range(5):
            ok = await outage.attempt(step)
            seen.append((ok, recovery.runs))
        return seen

    # Recovery runs at the start of each attempt that follows a failure, and not once it succeeded.
    assert asyncio.run(scenario()) == [(False, 0), (False, 1), (False, 2), (True, 3), (True, 3)]


def test_a_recovery_that_fails_is_tried_again_before_the_next_step() -> None:
    class FailingOnce(Recovery):
        async def __call__(self) -> None:
            self.runs += 1
            if self.runs == 1:
                raise RedisConnectionError("still down")

    recovery = FailingOnce()
    outage = quick(recover=recovery)
    step = FlakyStep(RedisConnectionError("down"))

    async def scenario() -> list[bool]:
        return [await outage.attempt(step) for _ in range(3)]

    assert asyncio.run(scenario()) == [False, False, True]
    assert recovery.runs == 2 and step.calls == 2  # the step did not run while recovery failed


def test_without_a_recovery_nogroup_is_a_refused_command(caplog: pytest.LogCaptureFixture) -> None:
    outage = quick("monitor")
    step = FlakyStep(ResponseError("NOGROUP gone"))
    with caplog.at_level(logging.ERROR, logger="ectrans.common.outage"):
        assert asyncio.run(outage.attempt(step)) is False
    assert [r.getMessage() for r in caplog.records] == ["[monitor] Redis refused a command"]


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (ResponseError("WRONGTYPE"), "[dispatcher] Redis refused a command"),
        (DataError("bad value"), "[dispatcher] Redis refused a command"),
        (KeyError("bug"), "[dispatcher] unexpected error; carrying on"),
    ],
)
def test_refused_commands_and_bugs_are_logged_and_never_raised(
    error: Exception, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    recovery = Recovery()
    outage = quick("dispatcher", recover=recovery)
    step = FlakyStep(error)

    async def scenario() -> list[bool]:
        return [await outage.attempt(step), await outage.attempt(step)]

    with caplog.at_level(logging.ERROR, logger="ectrans.common.outage"):
        assert asyncio.run(scenario()) == [False, True]
    assert [r.getMessage() for r in caplog.records] == [message]
    assert caplog.records[0].exc_info is not None  # with its traceback
    assert recovery.runs == 0  # Redis did not change under the loop: nothing to recover
    assert outage.since is None


def test_a_stop_is_not_swallowed() -> None:
    async def cancelled() -> None:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(quick().attempt(cancelled))


def test_backoff_pauses_are_jittered_double_up_to_the_cap_and_reset() -> None:
    backoff = Backoff(0.1, 1.0)
    delays = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    for delay in delays:
        pause = backoff.next_s()
        assert delay / 2 <= pause <= delay
    backoff.reset()
    assert 0.05 <= backoff.next_s() <= 0.1
    pauses = {round(Backoff(0.1, 1.0).next_s(), 6) for _ in range(20)}
    assert len(pauses) > 1  # jittered: clients that lost Redis together do not retry in step


def test_the_pause_after_a_lost_connection_grows_until_redis_is_back(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []

    async def record(seconds: float) -> None:
        slept.append(seconds)

    outage = Outage("loop", first_pause_s=0.1, max_pause_s=0.4)
    step = FlakyStep(*(RedisConnectionError("down") for _ in range(4)))

    async def scenario() -> None:
        monkeypatch.setattr(asyncio, "sleep", record)
        for _ in range(5):
            await outage.attempt(step)
        step.errors = [RedisConnectionError("down again")]
        await outage.attempt(step)

    asyncio.run(scenario())
    caps = [0.1, 0.2, 0.4, 0.4, 0.1]  # back in between: the next outage starts with a short pause
    assert len(slept) == len(caps)
    for pause, cap in zip(slept, caps, strict=True):
        assert cap / 2 <= pause <= cap


def test_a_timeout_counts_as_an_outage(caplog: pytest.LogCaptureFixture) -> None:
    recovery = Recovery()
    outage = quick("worker", recover=recovery)
    step = FlakyStep(RedisTimeoutError("Timeout reading from socket"))

    async def scenario() -> list[bool]:
        return [await outage.attempt(step), await outage.attempt(step)]

    with caplog.at_level(logging.WARNING, logger="ectrans.common.outage"):
        assert asyncio.run(scenario()) == [False, True]
    assert [line.split(" (")[0].split(" after")[0] for line in redis_lines(caplog)] == [
        "[redis] worker lost the connection",
        "[redis] worker connection back",
    ]
    assert recovery.runs == 1


def test_a_refused_command_that_repeats_is_logged_once_until_a_step_succeeds(caplog: pytest.LogCaptureFixture) -> None:
    outage = quick("heartbeat")
    readonly = [ResponseError("READONLY You can't write against a read only replica.") for _ in range(5)]
    step = FlakyStep(*readonly, DataError("bad value"))

    async def scenario() -> None:
        for _ in range(7):
            await outage.attempt(step)  # 5 READONLY, a DataError, then a success
        await outage.attempt(FlakyStep(ResponseError("READONLY You can't write against a read only replica.")))

    with caplog.at_level(logging.WARNING, logger="ectrans.common.outage"):
        asyncio.run(scenario())
    logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
    # READONLY once, the DataError once, READONLY again once after the success in between.
    assert [r.exc_info[1].__class__.__name__ for r in logged if r.exc_info] == [
        "ResponseError",
        "DataError",
        "ResponseError",
    ]


def test_a_nogroup_the_recovery_does_not_fix_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    recovery = Recovery()
    outage = quick("reader", recovery)
    step = FlakyStep(*(ResponseError("NOGROUP No such key or consumer group") for _ in range(6)))

    async def scenario() -> None:
        for _ in range(6):
            await outage.attempt(step)

    with caplog.at_level(logging.WARNING, logger="ectrans.common.outage"):
        asyncio.run(scenario())
    assert recovery.runs >= 3
    assert any("Redis refused a command" in r.getMessage() for r in caplog.records)
