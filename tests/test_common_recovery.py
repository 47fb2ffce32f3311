"""Taking over a dead consumer's work and giving up on poison entries, against a real Redis.

The first test pins down the server behaviour the design rests on: reading one's own pending
history (XREADGROUP with id 0) counts as a delivery, so a worker that crashes and restarts under the
same consumer name raises an entry's delivery count exactly as a takeover by a peer does.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from ectrans.common.keys import DISPATCHER_GROUP, WORKER_GROUP, Keys
from ectrans.common.recovery import Reclaimer, dead_letter, ensure_group, read_group
from ectrans.common.redis_conn import connect
from ectrans.common.registry import ModelSpec, build_spec
from ectrans.common.results import ResultWriter
from ectrans.common.schemas import Task
from ectrans.models.noop import NoopExecutor
from ectrans.services.dispatcher.service import Dispatcher
from ectrans.services.dispatcher.settings import DispatcherSettings
from ectrans.services.worker.service import Worker
from ectrans.services.worker.settings import WorkerSettings

GROUP = "g"
NOOP: ModelSpec = build_spec("noop", {"kind": "noop"})


@asynccontextmanager
async def client(url: str) -> AsyncIterator[Any]:
    """A client typed `Any`: redis-py types replies as unions of what each protocol may return."""
    redis = connect(url)
    try:
        yield redis
    finally:
        await redis.aclose()


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.02)


async def deliveries(redis: Any, stream: str, group: str = GROUP) -> dict[str, tuple[str, int]]:
    """entry id → (consumer, times delivered) for every pending entry."""
    rows = await redis.xpending_range(stream, group, min="-", max="+", count=1000)
    return {r["message_id"].decode(): (r["consumer"].decode(), int(r["times_delivered"])) for r in rows}


def queued(task_id: str, text: str = "some text", reply_to: str | None = None) -> dict[Any, Any]:
    """Fields of a forwarded task, as the dispatcher writes them into a model queue."""
    task = Task(id=task_id, model="noop", op="noop", input=text, submitted_ms=int(time.time() * 1000))
    return {**task.to_fields(), **({"reply_to": reply_to} if reply_to else {})}


def test_history_read_counts_as_a_delivery(redis_url: str, prefix: str) -> None:
    async def scenario() -> list[int]:
        async with client(redis_url) as redis:
            stream = f"{prefix}s"
            await ensure_group(redis, stream, GROUP)
            entry = (await redis.xadd(stream, {"a": "1"})).decode()
            await read_group(redis, GROUP, "c1", {stream: ">"}, count=10, block=None)
            counts = [(await deliveries(redis, stream))[entry][1]]
            for _ in range(2):  # a consumer restarting under the same name reads its history
                got = await read_group(redis, GROUP, "c1", {stream: "0"}, count=10, block=None)
                assert [eid for eid, _ in got[0][1]] == [entry]
                counts.append((await deliveries(redis, stream))[entry][1])
            return counts

    assert asyncio.run(scenario()) == [1, 2, 3]


def test_claim_lock_expires_and_is_not_held_after_the_claim(redis_url: str, prefix: str) -> None:
    async def scenario() -> None:
        async with client(redis_url) as redis:
            keys = Keys(prefix)
            stream = keys.tasks
            await ensure_group(redis, stream, GROUP)
            await redis.xadd(stream, {"a": "1"})
            await read_group(redis, GROUP, "dead", {stream: ">"}, count=10, block=None)
            reclaimer = Reclaimer(redis, keys, stream, GROUP, "live", min_idle_ms=0, max_deliveries=5)
            lock = keys.claim_lock(stream)
            # A claimer that crashed while holding the lock: others skip until its TTL runs out.
            await redis.set(lock, "crashed", px=300)
            assert (await reclaimer.claim()).live == []
            assert 0 < await redis.pttl(lock) <= 300
            claimed = await _claim_until_some(reclaimer)
            assert len(claimed) == 1
            assert not await redis.exists(lock), "the lock must not be held while the claimed work runs"

    asyncio.run(scenario())


async def _claim_until_some(reclaimer: Reclaimer, timeout_s: float = 5.0) -> list[tuple[str, dict[bytes, bytes]]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        claimed = await reclaimer.claim()
        if claimed.live:
            return claimed.live
        await asyncio.sleep(0.02)
    raise TimeoutError("nothing claimed")


def test_claims_carry_the_cursor_across_calls(redis_url: str, prefix: str) -> None:
    async def scenario() -> tuple[list[list[str]], list[str], list[str]]:
        async with client(redis_url) as redis:
            keys = Keys(prefix)
            stream = keys.tasks
            await ensure_group(redis, stream, GROUP)
            ids = [(await redis.xadd(stream, {"n": str(i)})).decode() for i in range(5)]
            await read_group(redis, GROUP, "dead", {stream: ">"}, count=10, block=None)
            reclaimer = Reclaimer(redis, keys, stream, GROUP, "live", min_idle_ms=0, max_deliveries=5)
            rounds, cursors = [], []
            for _ in range(3):
                rounds.append([eid for eid, _ in (await reclaimer.claim(count=2)).live])
                cursors.append(reclaimer.cursor)
            return rounds, cursors, ids

    rounds, cursors, ids = asyncio.run(scenario())
    assert rounds == [ids[0:2], ids[2:4], ids[4:5]]
    assert cursors == [ids[2], ids[4], "0-0"]  # the last call wraps around for the next sweep


def test_entries_past_the_limit_are_split_out_whatever_their_ids(redis_url: str, prefix: str) -> None:
    """Sequence numbers past 9 in one millisecond (`5-9`, `5-10`) sort wrongly as strings."""

    async def scenario() -> tuple[list[str], list[tuple[str, int]]]:
        async with client(redis_url) as redis:
            keys = Keys(prefix)
            stream = keys.tasks
            await ensure_group(redis, stream, GROUP)
            ids = [(await redis.xadd(stream, {"n": str(i)}, id=f"5-{i}")).decode() for i in range(8, 12)]
            await read_group(redis, GROUP, "c", {stream: ">"}, count=10, block=None)
            await read_group(redis, GROUP, "c", {stream: "0"}, count=10, block=None)  # 2 deliveries each
            await read_group(redis, GROUP, "c", {stream: "0"}, count=1, block=None)  # 3 for `5-8` only
            reclaimer = Reclaimer(redis, keys, stream, GROUP, "c", min_idle_ms=0, max_deliveries=2)
            entries: list[tuple[str, dict[bytes, bytes]]] = [(eid, {}) for eid in ids]
            split = await reclaimer.split_by_deliveries(entries)
            return [eid for eid, _ in split.live], [(eid, n) for (eid, _), n in split.dead]

    live, dead = asyncio.run(scenario())
    assert live == ["5-9", "5-10", "5-11"]
    assert dead == [("5-8", 3)]


def test_dead_letter_keeps_the_history_and_answers_the_client_once(redis_url: str, prefix: str) -> None:
    async def scenario() -> None:
        async with client(redis_url) as redis:
            keys = Keys(prefix)
            stream = keys.queue("noop", "batch")
            await ensure_group(redis, stream, WORKER_GROUP)
            entry = (await redis.xadd(stream, queued("job-1", reply_to="client-a"))).decode()
            got = await read_group(redis, WORKER_GROUP, "w", {stream: ">"}, count=10, block=None)
            writer = ResultWriter(redis, keys, WORKER_GROUP, ttl_s=60)
            for _ in range(2):  # a second attempt (a retry after a lost reply) must change nothing
                await dead_letter(redis, keys, writer, stream, [(got[0][1][0], 4)], consumer="w")

            result = {k.decode(): v.decode() for k, v in (await redis.hgetall(keys.result("job-1"))).items()}
            assert result["status"] == "error" and result["reason"] == "dead_letter"
            assert "4 times" in result["error"] and result["model"] == "noop"
            replies = await redis.xrange(keys.reply("client-a"))
            assert [fields[b"id"] for _, fields in replies] == [b"job-1"]
            assert await redis.xlen(stream) == 0 and await deliveries(redis, stream, WORKER_GROUP) == {}
            dead = await redis.xrange(keys.dead_letters)
            assert len(dead) == 2  # the dead-letter stream is a log: each attempt is recorded
            fields = dead[0][1]
            history = json.loads(fields[b"history"])
            assert fields[b"task_id"] == b"job-1"
            assert history["stream"] == stream and history["entry_id"] == entry and history["deliveries"] == 4
            assert json.loads(fields[b"fields"])["input"] == "some text"

    asyncio.run(scenario())


def test_entries_deleted_while_pending_do_not_stall_claims(redis_url: str, prefix: str) -> None:
    async def scenario() -> None:
        async with client(redis_url) as redis:
            keys = Keys(prefix)
            stream = keys.tasks
            await ensure_group(redis, stream, GROUP)
            ids = [(await redis.xadd(stream, {"n": str(i)})).decode() for i in range(3)]
            await read_group(redis, GROUP, "dead", {stream: ">"}, count=10, block=None)
            await redis.xdel(stream, ids[1])  # an operator's XDEL (or XTRIM) of a pending entry
            reclaimer = Reclaimer(redis, keys, stream, GROUP, "live", min_idle_ms=0, max_deliveries=5)
            claimed = await reclaimer.claim()
            assert [eid for eid, _ in claimed.live] == [ids[0], ids[2]]
            assert set(await deliveries(redis, stream)) == {ids[0], ids[2]}  # the gone entry is acknowledged

    asyncio.run(scenario())


@asynccontextmanager
async def worker(
    url: str, prefix: str, instance: str, executor: NoopExecutor | None = None, **settings: Any
) -> AsyncIterator[Worker]:
    w = Worker(
        WorkerSettings(redis_url=url, prefix=prefix, serve_models="noop", instance=instance, **settings),
        {"noop": NOOP},
        executors={"noop": executor or NoopExecutor(NOOP)},
    )
    task = asyncio.create_task(w.run())
    try:
        yield w
    finally:
        w.stop()
        await asyncio.wait_for(task, 30)


async def statuses(redis: Any, keys: Keys, ids: list[str]) -> dict[str, str]:
    out = {}
    for task_id in ids:
        raw = await redis.hgetall(keys.result(task_id))
        if raw:
            out[task_id] = (raw.get(b"reason") or raw[b"status"]).decode()
    return out


def test_restarted_worker_runs_its_own_pending_entries_once(redis_url: str, prefix: str) -> None:
    """A worker restarting under its old name takes back what it held, once per entry, even with a
    small prefetch that makes it read its history in several rounds."""

    async def scenario() -> tuple[dict[str, str], int, int]:
        async with client(redis_url) as redis:
            keys = Keys(prefix)
            stream = keys.queue("noop", "batch")
            await ensure_group(redis, stream, WORKER_GROUP)
            ids = [f"t{i}" for i in range(50)]
            for task_id in ids:
                await redis.xadd(stream, queued(task_id))
            await read_group(redis, WORKER_GROUP, "w1", {stream: ">"}, count=100, block=None)  # then it died
            async with worker(redis_url, prefix, "w1", prefetch=8, batch_max_batch=4, max_deliveries=2) as w:

                async def all_done() -> bool:
                    return len(await statuses(redis, keys, ids)) == len(ids)

                await eventually(all_done)
                return await statuses(redis, keys, ids), w.counts["ok"], await redis.xlen(keys.dead_letters)

    results, runs, dead = asyncio.run(scenario())
    assert set(results.values()) == {"ok"}
    assert runs == 50, "each pending entry runs once"
    assert dead == 0


def test_poison_entries_are_dead_lettered_by_restart_and_by_takeover(redis_url: str, prefix: str) -> None:
    """Two entries that already cost `max_deliveries` deliveries (their consumers died holding them):
    one pending with the restarting worker's own name, one with a consumer that never came back."""

    async def scenario() -> None:
        async with client(redis_url) as redis:
            keys = Keys(prefix)
            stream = keys.queue("noop", "batch")
            await ensure_group(redis, stream, WORKER_GROUP)
            for task_id, owner in (("own", "w1"), ("ghost", "gone")):
                await redis.xadd(stream, queued(task_id, reply_to="client-b"))
                await read_group(redis, WORKER_GROUP, owner, {stream: ">"}, count=1, block=None)
                await read_group(redis, WORKER_GROUP, owner, {stream: "0"}, count=1, block=None)
            await redis.xadd(stream, queued("healthy", reply_to="client-b"))
            async with worker(redis_url, prefix, "w1", claim_idle_ms=100, max_deliveries=2):

                async def answered() -> bool:
                    return len(await statuses(redis, keys, ["own", "ghost", "healthy"])) == 3

                await eventually(answered)
            assert await statuses(redis, keys, ["own", "ghost", "healthy"]) == {
                "own": "dead_letter",
                "ghost": "dead_letter",
                "healthy": "ok",
            }
            replies = [fields for _, fields in await redis.xrange(keys.reply("client-b"))]
            assert sorted(f[b"id"] for f in replies) == [b"ghost", b"healthy", b"own"]
            dead = {f[b"task_id"]: json.loads(f[b"history"]) for _, f in await redis.xrange(keys.dead_letters)}
            assert dead[b"own"]["deliveries"] == 3 and dead[b"ghost"]["deliveries"] == 3
            assert await deliveries(redis, stream, WORKER_GROUP) == {}

    asyncio.run(scenario())


def test_dispatcher_dead_letters_an_ingress_entry_past_the_limit(redis_url: str, prefix: str) -> None:
    async def scenario() -> None:
        async with client(redis_url) as redis:
            keys = Keys(prefix)
            await ensure_group(redis, keys.tasks, DISPATCHER_GROUP)
            fields = {"model": "noop", "op": "noop", "input": "x", "id": "poison", "reply_to": "client-c"}
            await redis.xadd(keys.tasks, fields)
            for start in (">", "0", "0"):  # three dispatcher runs died holding it
                await read_group(redis, DISPATCHER_GROUP, "d1", {keys.tasks: start}, count=1, block=None)
            settings = DispatcherSettings(redis_url=redis_url, prefix=prefix, instance="d1", max_deliveries=3)
            dispatcher = Dispatcher(settings, {"noop": NOOP})
            task = asyncio.create_task(dispatcher.run())
            try:

                async def answered() -> bool:
                    return bool(await redis.exists(keys.result("poison")))

                await eventually(answered)
            finally:
                dispatcher.stop()
                await asyncio.wait_for(task, 30)
            assert (await redis.hget(keys.result("poison"), "reason")) == b"dead_letter"
            assert await redis.xlen(keys.reply("client-c")) == 1
            assert await redis.xlen(keys.queue("noop", "batch")) == 0, "a dead letter is not forwarded"
            assert await deliveries(redis, keys.tasks, DISPATCHER_GROUP) == {}

    asyncio.run(scenario())


def test_a_live_worker_keeps_the_tasks_it_holds_from_peers(redis_url: str, prefix: str) -> None:
    """Tasks wait in the worker longer than the claim idle time (a long local backlog, a slow batch):
    a peer looking for abandoned work must not find them, or they would run twice and climb to the
    dead-letter limit."""

    async def scenario() -> tuple[list[str], dict[str, str]]:
        async with client(redis_url) as redis:
            keys = Keys(prefix)
            stream = keys.queue("noop", "batch")
            await ensure_group(redis, stream, WORKER_GROUP)
            ids = [f"held{i}" for i in range(5)]
            # One task per batch, one batch at a time, 0.7 s each: the last tasks wait ~2.8 s in the worker.
            hold = {"claim_idle_ms": 1000, "batch_max_batch": 1, "max_inflight_batches": 1, "max_deliveries": 1}
            slow = NoopExecutor(build_spec("noop", {"kind": "noop", "delay_ms": 700}))
            async with worker(redis_url, prefix, "w1", slow, **hold):
                for task_id in ids:
                    await redis.xadd(stream, queued(task_id))

                async def all_held() -> bool:
                    return len(await deliveries(redis, stream, WORKER_GROUP)) == len(ids)

                await eventually(all_held)
                peer = Reclaimer(redis, keys, stream, WORKER_GROUP, "peer", min_idle_ms=1000, max_deliveries=1)
                stolen: list[str] = []
                until = time.monotonic() + 2.5  # well past the idle time, before the batch runs
                while time.monotonic() < until:
                    claimed = await peer.claim()
                    stolen += [eid for eid, _ in claimed.live] + [eid for (eid, _), _ in claimed.dead]
                    await asyncio.sleep(0.05)

                async def done() -> bool:
                    return len(await statuses(redis, keys, ids)) == len(ids)

                await eventually(done)
                return stolen, await statuses(redis, keys, ids)

    stolen, results = asyncio.run(scenario())
    assert stolen == []
    assert set(results.values()) == {"ok"}
