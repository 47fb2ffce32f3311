"""The dispatcher's logic one read at a time (`Dispatcher.step`), against a real Redis and without
`run()`: no heartbeat, no placement loop, no worker, no polling."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from ectrans.common.keys import DISPATCHER_GROUP, Keys
from ectrans.common.recovery import ensure_group, read_group
from ectrans.common.redis_conn import RedisClient, connect
from ectrans.common.registry import ModelSpec, build_spec
from ectrans.services.dispatcher.service import Dispatcher
from ectrans.services.dispatcher.settings import DispatcherSettings

NOOP: ModelSpec = build_spec("noop", {"kind": "noop"})


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def stepped(
    redis_url: str, prefix: str, body: Callable[[Dispatcher, RedisClient, Keys], Awaitable[None]], **settings: Any
) -> None:
    """Run `body` with a dispatcher that is only ever stepped, and a Redis connection of its own."""

    async def scenario() -> None:
        dispatcher = Dispatcher(DispatcherSettings(redis_url=redis_url, prefix=prefix, **settings), {"noop": NOOP})
        redis = connect(redis_url)
        try:
            await body(dispatcher, redis, dispatcher.keys)
        finally:
            await redis.aclose()
            await dispatcher.redis.aclose()

    asyncio.run(scenario())


async def submit(redis: RedisClient, keys: Keys, task_id: str, **fields: str) -> str:
    task = {"model": "noop", "op": "noop", "input": "x", "id": task_id, **fields}
    return text(await redis.xadd(keys.tasks, task))  # type: ignore[arg-type]


async def result(redis: RedisClient, keys: Keys, task_id: str) -> dict[str, str]:
    return {text(k): text(v) for k, v in (await redis.hgetall(keys.result(task_id))).items()}


async def queued_ids(redis: RedisClient, keys: Keys, task_class: str) -> list[str]:
    entries: Any = await redis.xrange(keys.queue("noop", task_class))
    return [text(fields[b"id"]) for _, fields in entries]


async def ingress_left(redis: RedisClient, keys: Keys) -> tuple[int, int]:
    """Entries still in the ingress stream, and those still pending in the dispatchers' group."""
    pending: Any = await redis.xpending(keys.tasks, DISPATCHER_GROUP)
    return int(await redis.xlen(keys.tasks)), int(pending["pending"])


def test_a_step_forwards_each_task_to_its_class_queue_and_clears_the_ingress(redis_url: str, prefix: str) -> None:
    async def body(d: Dispatcher, redis: RedisClient, keys: Keys) -> None:
        assert not await d.step()  # nothing submitted: nothing to do, and no wait
        await submit(redis, keys, "rt", priority="realtime")
        await submit(redis, keys, "bulk", priority="batch")
        assert await d.step()
        assert await queued_ids(redis, keys, "realtime") == ["rt"]
        assert await queued_ids(redis, keys, "batch") == ["bulk"]
        assert await ingress_left(redis, keys) == (0, 0)  # acknowledged and deleted in the same commit
        assert (d.forwarded, d.rejected) == (2, 0)
        assert not await d.step()

    stepped(redis_url, prefix, body)


def test_a_step_answers_bad_entries_and_forwards_the_good_ones_of_the_same_read(redis_url: str, prefix: str) -> None:
    async def body(d: Dispatcher, redis: RedisClient, keys: Keys) -> None:
        await submit(redis, keys, "good")
        await submit(redis, keys, "model", model="nosuchmodel")
        await submit(redis, keys, "op", op="nosuchop")
        await submit(redis, keys, "late", deadline_ms="1", priority="batch")  # a 1 ms deadline, long gone
        await redis.xadd(keys.tasks, {"id": "fieldless"})  # no model, no op, no input
        await asyncio.sleep(0.01)  # the 1 ms deadline has passed for sure
        assert await d.step()
        assert (await result(redis, keys, "model"))["reason"] == "unknown_model"
        assert (await result(redis, keys, "op"))["reason"] == "unknown_op"
        assert (await result(redis, keys, "late"))["reason"] == "deadline"
        assert (await result(redis, keys, "fieldless"))["reason"] == "bad_input"
        assert await result(redis, keys, "good") == {}  # forwarded, not answered: a worker answers it
        queued = await queued_ids(redis, keys, "realtime") + await queued_ids(redis, keys, "batch")
        assert queued == ["good"]
        assert await ingress_left(redis, keys) == (0, 0)
        assert (d.forwarded, d.rejected) == (1, 4)

    stepped(redis_url, prefix, body)


def test_a_step_answers_tasks_past_the_queue_limit_overloaded(redis_url: str, prefix: str) -> None:
    async def body(d: Dispatcher, redis: RedisClient, keys: Keys) -> None:
        for i in range(3):
            await submit(redis, keys, f"t{i}", priority="batch")
        assert await d.step()
        assert await queued_ids(redis, keys, "batch") == ["t0", "t1"]
        assert (await result(redis, keys, "t2"))["reason"] == "overloaded"
        assert await ingress_left(redis, keys) == (0, 0)

    stepped(redis_url, prefix, body, max_queue_len=2)


def test_a_second_task_naming_a_taken_id_is_answered_under_its_entry_id(redis_url: str, prefix: str) -> None:
    async def body(d: Dispatcher, redis: RedisClient, keys: Keys) -> None:
        await submit(redis, keys, "mine", priority="batch")
        assert await d.step()
        entry_id = await submit(redis, keys, "mine", priority="batch")
        assert await d.step()
        assert await queued_ids(redis, keys, "batch") == ["mine"]  # the owner only
        duplicate = await result(redis, keys, entry_id)
        assert (duplicate["reason"], duplicate["requested_id"]) == ("duplicate_id", "mine")

    stepped(redis_url, prefix, body)


def test_entries_read_before_a_crash_are_handled_first_and_once(redis_url: str, prefix: str) -> None:
    """Entries this consumer read but never committed (it died in between) stay pending under its
    name; the next step handles them before anything new, and each is forwarded once."""

    async def body(d: Dispatcher, redis: RedisClient, keys: Keys) -> None:
        await submit(redis, keys, "read-before", priority="batch")
        await ensure_group(redis, keys.tasks, DISPATCHER_GROUP)
        got = await read_group(redis, DISPATCHER_GROUP, d.consumer, {keys.tasks: ">"}, count=10, block=None)
        assert [text(fields[b"id"]) for _, fields in got[0][1]] == ["read-before"]  # read, then the crash
        await submit(redis, keys, "new", priority="batch")
        assert await d.step()  # the backlog alone
        assert await queued_ids(redis, keys, "batch") == ["read-before"]
        assert await d.step()  # then what is new
        assert await queued_ids(redis, keys, "batch") == ["read-before", "new"]
        assert not await d.step()
        assert await ingress_left(redis, keys) == (0, 0)

    stepped(redis_url, prefix, body)
