"""A client's life as scripts use it: one AsyncClient across `asyncio.run` calls, a sync Client
closed twice or used after closing, and a sync call interrupted while it waits (the no-op model)."""

from __future__ import annotations

import asyncio
import signal
import threading
from typing import Any

import pytest

from ectrans.client import AsyncClient, Client, ECTransError
from ectrans.common.keys import Keys
from ectrans.common.redis_conn import connect
from ectrans.common.registry import ModelSpec, build_spec
from ectrans.models.noop import NoopExecutor
from ectrans.sender import SenderClosed
from tests.stack import stack_in_thread

NOOP: ModelSpec = build_spec("noop", {"kind": "noop"})


def test_one_async_client_across_event_loops(redis_url: str, prefix: str) -> None:
    """A script that calls `asyncio.run` per request with one module-level client: each run gets its
    answers (the client starts afresh once its loop has ended); a second loop while the first is still
    open gets a clear error, never a call that waits forever."""
    client = AsyncClient(redis_url, prefix=prefix)

    async def ask(text: str) -> int:
        result = await asyncio.wait_for(client.submit("noop", "noop", text, timeout=10), 15)
        return int(result.output["chars"])

    with stack_in_thread(redis_url, prefix, {"noop": NOOP}, {"noop": NoopExecutor(NOOP)}):
        assert asyncio.run(ask("one")) == 3
        assert asyncio.run(ask("three")) == 5  # a new loop: the old one's writer and reader are gone

        first = asyncio.new_event_loop()
        try:
            assert first.run_until_complete(ask("first")) == 5
            with pytest.raises(ECTransError, match="another event loop"):
                asyncio.run(ask("other"))
            assert first.run_until_complete(ask("again")) == 5  # the refused call changed nothing
            first.run_until_complete(client.close())
        finally:
            first.close()
        assert asyncio.run(ask("closed")) == 6  # closed on its loop: usable anew, as after any close
        asyncio.run(client.close())


def test_sync_client_closed_twice_then_used(redis_url: str, prefix: str) -> None:
    with stack_in_thread(redis_url, prefix, {"noop": NOOP}, {"noop": NoopExecutor(NOOP)}):
        with Client(redis_url, prefix=prefix) as client:
            handle = client.submit_tasks("noop", "noop", ["abc"])[0]
            assert client.submit("noop", "noop", "hello").output["chars"] == 5
            assert handle.result(10).output["chars"] == 3
        client.close()  # a second close is harmless
        with pytest.raises(SenderClosed, match="closed"):
            client.submit("noop", "noop", "late")
        with pytest.raises(SenderClosed, match="closed"):
            handle.result(1)


class Interrupted(Exception):
    """Raised by the test's signal handler in the main thread, as Ctrl-C raises KeyboardInterrupt."""


def test_an_interrupted_sync_call_cancels_its_tasks(redis_url: str, prefix: str) -> None:
    """Ctrl-C while a sync call waits: its unanswered tasks get cancel marks (workers then drop them),
    as for a cancelled AsyncClient call, instead of running on in the client's loop thread."""
    assert threading.current_thread() is threading.main_thread()  # signal handlers run there only
    keys = Keys(prefix)

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGUSR1, interrupt)
    timer = threading.Timer(0.5, signal.pthread_kill, (threading.main_thread().ident, signal.SIGUSR1))
    try:
        with Client(redis_url, prefix=prefix) as client:  # no services run: the tasks stay queued
            timer.start()
            with pytest.raises(Interrupted):
                client.submit_many("noop", "noop", ["a", "b", "c"], timeout=30)
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)

    async def marks() -> list[int]:
        redis = connect(redis_url)
        try:
            entries: Any = await redis.xrange(keys.tasks)
            ids = [fields[b"id"].decode() for _, fields in entries]
            assert len(ids) == 3
            return [await redis.exists(keys.cancelled(task_id)) for task_id in ids]
        finally:
            await redis.aclose()

    assert asyncio.run(marks()) == [1, 1, 1]


def test_closing_a_client_with_calls_in_flight(redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    """Calls still waiting when their client closes get a clear error (not a CancelledError they never
    asked for), and their tasks get cancel marks: no one is left to read their records."""
    keys = Keys(prefix)

    async def scenario() -> None:
        client = AsyncClient(redis_url, prefix=prefix)  # no services run: the tasks stay queued
        await client.connect()
        calls = [asyncio.create_task(client.submit("noop", "noop", f"text {i}", timeout=30)) for i in range(3)]
        handles = await client.submit_tasks("noop", "noop", ["never awaited"])
        redis = connect(redis_url)
        try:
            await until_queued(redis, keys, 4)
            await client.close()
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            assert [type(outcome) for outcome in outcomes] == [SenderClosed] * 3, outcomes
            with pytest.raises(SenderClosed, match="closed before"):
                await handles[0]
            entries: Any = await redis.xrange(keys.tasks)
            ids = [fields[b"id"].decode() for _, fields in entries]
            assert [await redis.exists(keys.cancelled(task_id)) for task_id in ids] == [1] * 4
        finally:
            await redis.aclose()

    asyncio.run(scenario())
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")], caplog.text


async def until_queued(redis: Any, keys: Keys, count: int) -> None:
    for _ in range(500):
        if await redis.xlen(keys.tasks) >= count:
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"{count} tasks not in {keys.tasks}")
