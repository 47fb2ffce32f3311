"""The single-Redis scripts that answer many entries per call, against a real Redis: the dispatcher's
commit (forwards, error results, metrics and acks of one read) and the worker's FINISH_MANY."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from ectrans.common.keys import DISPATCHER_GROUP, WORKER_GROUP, Keys
from ectrans.common.recovery import ensure_group, read_group
from ectrans.common.redis_conn import connect, is_cluster
from ectrans.common.results import Finish, ResultWriter, error_record
from ectrans.common.schemas import Task
from ectrans.services.dispatcher import forwarding as forwarding_module
from ectrans.services.dispatcher.forwarding import Forwarder, Forwarding, Held

TTL_S = 60


@asynccontextmanager
async def single_redis(url: str) -> AsyncIterator[Any]:
    redis = connect(url)
    try:
        if is_cluster(redis):
            pytest.skip("single-Redis scripts (a cluster forwards and finishes per slot)")
        yield redis
    finally:
        await redis.aclose()


def dispatcher_side(redis: Any, keys: Keys) -> tuple[Forwarder, ResultWriter]:
    """The dispatcher's forwarder and error-result writer for the ingress stream."""
    forwarder = Forwarder(redis, keys, keys.tasks, DISPATCHER_GROUP, TTL_S)
    return forwarder, ResultWriter(redis, keys, DISPATCHER_GROUP, TTL_S)


async def ingress(redis: Any, keys: Keys, n: int) -> list[tuple[str, dict[bytes, bytes]]]:
    """`n` tasks in the ingress stream, read once in the dispatcher group."""
    await ensure_group(redis, keys.tasks, DISPATCHER_GROUP)
    for i in range(n):
        await redis.xadd(keys.tasks, {"model": "noop", "op": "noop", "input": f"text {i}", "id": f"t{i}"})
    got = await read_group(redis, DISPATCHER_GROUP, "d0", {keys.tasks: ">"}, count=100, block=None)
    return got[0][1]


def forwarding(keys: Keys, entry_id: str, task_id: str, payload: bytes | None = None) -> Forwarding:
    task = Task(id=task_id, model="noop", op="noop", input="x", submitted_ms=int(time.time() * 1000))
    fields = task.to_fields()
    if payload is not None:  # a split task's binary payload travels byte for byte
        fields.update(input=payload, segment="1", revision="r1")
    return Forwarding(keys.queue("noop", "batch"), "noop", task_id, entry_id, fields)


def test_commit_forwards_answers_and_acks_once(redis_url: str, prefix: str) -> None:
    async def scenario() -> None:
        async with single_redis(redis_url) as redis:
            keys = Keys(prefix)
            entries = await ingress(redis, keys, 3)
            forwarder, writer = dispatcher_side(redis, keys)
            payload = bytes(range(256))
            items = [forwarding(keys, entries[0][0], "t0"), forwarding(keys, entries[1][0], "t1", payload)]
            record = error_record("t2", "bad_input", "no", submitted_ms=0, model="noop", task_class="batch")
            answers = [_finish(keys, "t2", record, entries[2][0])]
            metrics = [{"kind": "errors", "model": "noop", "class": "batch", "reasons": "bad_input:1"}]
            for _ in range(2):  # the second call is a retry after a lost reply: it must change nothing
                assert await forwarder.commit(items, answers, writer, metrics, limit=10) == Held()
            queue = await redis.xrange(keys.queue("noop", "batch"))
            assert [fields[b"id"] for _, fields in queue] == [b"t0", b"t1"]
            assert queue[1][1][b"input"] == payload
            assert await redis.xlen(keys.tasks) == 0
            assert (await redis.xpending(keys.tasks, DISPATCHER_GROUP))["pending"] == 0
            assert (await redis.hgetall(keys.result("t2")))[b"reason"] == b"bad_input"
            assert await redis.xlen(keys.reply("c1")) == 1
            assert await redis.xlen(keys.metrics) == 1

    asyncio.run(scenario())


def test_a_large_read_is_committed_in_several_calls(redis_url: str, prefix: str, monkeypatch: Any) -> None:
    monkeypatch.setattr(forwarding_module, "COMMIT_MAX_BYTES", 300)  # one 256-byte payload per call

    async def scenario() -> None:
        async with single_redis(redis_url) as redis:
            keys = Keys(prefix)
            entries = await ingress(redis, keys, 4)
            forwarder, writer = dispatcher_side(redis, keys)
            items = [forwarding(keys, entry_id, f"t{i}", bytes(256)) for i, (entry_id, _) in enumerate(entries[:3])]
            record = error_record("t3", "bad_input", "no", submitted_ms=0)
            held = await forwarder.commit(items, [_finish(keys, "t3", record, entries[3][0])], writer, limit=2)
            assert held == Held(refused=[entries[2][0]])
            assert await redis.xlen(keys.queue("noop", "batch")) == 2
            assert await redis.exists(keys.result("t3"))
            pending = await redis.xpending_range(keys.tasks, DISPATCHER_GROUP, min="-", max="+", count=10)
            assert [row["message_id"].decode() for row in pending] == [entries[2][0]]

    asyncio.run(scenario())


def test_commit_refuses_forwards_to_a_full_queue_and_leaves_them_pending(redis_url: str, prefix: str) -> None:
    async def scenario() -> None:
        async with single_redis(redis_url) as redis:
            keys = Keys(prefix)
            entries = await ingress(redis, keys, 3)
            forwarder, writer = dispatcher_side(redis, keys)
            items = [forwarding(keys, entry_id, f"t{i}") for i, (entry_id, _) in enumerate(entries)]
            held = await forwarder.commit(items, [], writer, limit=2)
            assert held == Held(refused=[entries[2][0]])
            assert await redis.xlen(keys.queue("noop", "batch")) == 2
            pending = await redis.xpending_range(keys.tasks, DISPATCHER_GROUP, min="-", max="+", count=10)
            assert [row["message_id"].decode() for row in pending] == [entries[2][0]]

    asyncio.run(scenario())


def test_commit_leaves_an_entry_that_is_not_pending_alone(redis_url: str, prefix: str) -> None:
    """After a Redis roll-back (AOF everysec) an entry read before the crash can be undelivered again:
    the commit neither forwards nor deletes it, so it is delivered, and forwarded, once more."""

    async def scenario() -> None:
        async with single_redis(redis_url) as redis:
            keys = Keys(prefix)
            await ensure_group(redis, keys.tasks, DISPATCHER_GROUP)
            entry_id = (await redis.xadd(keys.tasks, {"model": "noop", "op": "noop", "input": "x"})).decode()
            forwarder, writer = dispatcher_side(redis, keys)
            assert await forwarder.commit([forwarding(keys, entry_id, "t0")], [], writer, limit=10) == Held()
            assert await redis.xlen(keys.queue("noop", "batch")) == 0
            assert await redis.xlen(keys.tasks) == 1

    asyncio.run(scenario())


def test_commit_claims_each_id_and_leaves_duplicates_pending_until_answered(redis_url: str, prefix: str) -> None:
    """The commit claims every forward's client id before its queue's limit: in one read the first
    entry naming an id owns it; a later one is held back as a duplicate (never refused as
    `overloaded`, which would answer under the owner's id), left pending and returned until answered."""

    async def scenario() -> None:
        async with single_redis(redis_url) as redis:
            keys = Keys(prefix)
            entries = await ingress(redis, keys, 4)
            forwarder, writer = dispatcher_side(redis, keys)
            ids = ["job", "job", "other", entries[3][0]]  # the last one is keyed by its own entry ID
            items = [forwarding(keys, entry_id, task_id) for (entry_id, _), task_id in zip(entries, ids, strict=True)]
            owner, duplicate, full, unnamed = (entry_id for entry_id, _ in entries)
            expected = Held(refused=[full, unnamed], duplicates=[duplicate])
            for _ in range(2):  # a retry while they are still pending returns them again
                assert await forwarder.commit(items, [], writer, limit=1) == expected
            assert [fields[b"id"] for _, fields in await redis.xrange(keys.queue("noop", "batch"))] == [b"job"]
            assert await redis.get(keys.owner("job")) == owner.encode()
            assert await redis.get(keys.owner("other")) == full.encode()  # claimed, then refused by the limit
            pending = await redis.xpending_range(keys.tasks, DISPATCHER_GROUP, min="-", max="+", count=10)
            assert sorted(row["message_id"].decode() for row in pending) == sorted([duplicate, full, unnamed])

            answers = [
                _finish(keys, entry_id, error_record(entry_id, reason, "no", submitted_ms=0), entry_id)
                for entry_id, reason in [(duplicate, "duplicate_id"), (full, "overloaded"), (unnamed, "overloaded")]
            ]
            assert await forwarder.commit([], answers, writer) == Held()
            # A retry of the first call after its answers were written returns nothing twice.
            assert await forwarder.commit(items, [], writer, limit=1) == Held()
            assert await redis.xlen(keys.queue("noop", "batch")) == 1
            assert await redis.xlen(keys.tasks) == 0
            assert not await redis.exists(keys.result("job"))  # the owner's record is a worker's to write
            assert (await redis.hgetall(keys.result(duplicate)))[b"reason"] == b"duplicate_id"

    asyncio.run(scenario())


def test_commit_finds_an_id_whose_result_exists_taken(redis_url: str, prefix: str) -> None:
    """A result written before any owner mark (an error answered under the id) owns the id too."""

    async def scenario() -> None:
        async with single_redis(redis_url) as redis:
            keys = Keys(prefix)
            entries = await ingress(redis, keys, 1)
            forwarder, writer = dispatcher_side(redis, keys)
            await redis.hset(keys.result("done"), mapping={"id": "done", "status": "ok"})
            held = await forwarder.commit([forwarding(keys, entries[0][0], "done")], [], writer, limit=10)
            assert held == Held(duplicates=[entries[0][0]])
            assert await redis.xlen(keys.queue("noop", "batch")) == 0
            assert not await redis.exists(keys.owner("done"))

    asyncio.run(scenario())


def test_finish_many_acks_per_stream_and_writes_each_result_once(redis_url: str, prefix: str) -> None:
    async def scenario() -> None:
        async with single_redis(redis_url) as redis:
            keys = Keys(prefix)
            streams = [keys.queue("noop", "realtime"), keys.queue("noop", "batch")]
            finishes = []
            for stream in streams:
                await ensure_group(redis, stream, WORKER_GROUP)
                for i in range(3):
                    await redis.xadd(stream, {"n": str(i)})
                got = await read_group(redis, WORKER_GROUP, "w0", {stream: ">"}, count=10, block=None)
                for entry_id, _ in got[0][1]:
                    task_id = f"{stream[-2:]}-{entry_id}"
                    finishes.append(_finish(keys, task_id, {"id": task_id, "status": "ok"}, entry_id, stream))
            finishes.append(dataclasses.replace(finishes[0]))  # the same task twice in one call: answered once
            writer = ResultWriter(redis, keys, WORKER_GROUP, TTL_S)
            assert await writer.write(finishes) == [True] * 6 + [False]
            assert await writer.write(finishes[:2]) == [False, False]
            for stream in streams:
                assert await redis.xlen(stream) == 0
                assert (await redis.xpending(stream, WORKER_GROUP))["pending"] == 0
            assert await redis.xlen(keys.reply("c1")) == 6
            assert 0 < await redis.ttl(keys.reply("c1")) <= TTL_S

    asyncio.run(scenario())


def _finish(keys: Keys, task_id: str, record: dict[str, Any], entry_id: str, stream: str | None = None) -> Finish:
    return Finish(task_id, record, stream or keys.tasks, entry_id, "c1")
