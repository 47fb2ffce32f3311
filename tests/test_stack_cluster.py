"""ECTrans on a Redis Cluster (3 masters started here) and on Sentinel: one code path, chosen by the URL.

The end-to-end and recovery scenarios of `test_stack_embed.py` and `test_common_recovery.py` run here against
the cluster with their bodies unchanged (this module's `redis_url` names the cluster); the whole suite
runs that way with `ECTRANS_TEST_REDIS=cluster`. The tests below add what only a cluster has: steps
across slots cut short by a crash, keys spread over shards, and a failover under Sentinel.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from ectrans.client import AsyncClient
from ectrans.common.keys import DISPATCHER_GROUP, WORKER_GROUP, Keys
from ectrans.common.recovery import ensure_group, read_group
from ectrans.common.redis_conn import SentinelRedis, connect, connect_sync, parse
from ectrans.common.registry import ModelSpec, build_spec
from ectrans.common.results import Finish, ResultWriter, error_record
from ectrans.common.schemas import Task
from ectrans.local.redis_topology import LocalCluster, LocalSentinel
from ectrans.models.noop import NoopExecutor
from ectrans.services.dispatcher.forwarding import Forwarding
from ectrans.services.dispatcher.service import Dispatcher
from ectrans.services.dispatcher.settings import DispatcherSettings
from tests.stack import running_stack
from tests.test_common_recovery import (  # noqa: F401
    test_dead_letter_keeps_the_history_and_answers_the_client_once,
    test_dispatcher_dead_letters_an_ingress_entry_past_the_limit,
    test_poison_entries_are_dead_lettered_by_restart_and_by_takeover,
    test_restarted_worker_runs_its_own_pending_entries_once,
)

# The same scenarios, unchanged, against the cluster (pytest collects them here under this module's
# `redis_url`): MiniLM end to end once, then the recovery ("chaos") scenarios on the noop model.
from tests.test_stack_embed import test_client_embed_equals_reference  # noqa: F401

NOOP: ModelSpec = build_spec("noop", {"kind": "noop"})


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


async def eventually(read: Callable[[], Awaitable[Any]], wanted: Any, timeout_s: float = 20.0) -> None:
    """Poll `read()` until it returns `wanted`."""
    deadline = time.monotonic() + timeout_s
    while (got := await read()) != wanted:
        if time.monotonic() > deadline:
            raise TimeoutError(f"still {got!r}, not {wanted!r}, after {timeout_s}s")
        await asyncio.sleep(0.05)


@pytest.fixture
def redis_url(redis_cluster: LocalCluster) -> str:
    return redis_cluster.url


# 1. The URL decides ----------------------------------------------------------------------------


def test_url_schemes_pick_the_topology() -> None:
    assert parse("redis://127.0.0.1:6379/0").topology == "single"
    cluster = parse("rediss+cluster://user:p%40ss@10.0.0.1:7000,10.0.0.2:7001/?ssl_cert_reqs=none")
    assert (cluster.topology, cluster.tls, cluster.nodes) == ("cluster", True, [("10.0.0.1", 7000), ("10.0.0.2", 7001)])
    assert (cluster.username, cluster.password, cluster.options) == ("user", "p@ss", {"ssl_cert_reqs": "none"})
    sentinel = parse("redis+sentinel://:secret@s1:26379,s2/mymaster/2")
    assert (sentinel.topology, sentinel.service, sentinel.db, sentinel.password) == (
        "sentinel",
        "mymaster",
        2,
        "secret",
    )
    assert sentinel.nodes == [("s1", 26379), ("s2", 26379)]
    for bad, said in [
        ("http://x", "scheme"),
        ("redis+sentinel://s1:26379", "names the master"),
        ("redis+cluster://h:7000/3", "db 0"),
        ("redis+cluster://h:port", "not a number"),
    ]:
        with pytest.raises(ValueError, match=said):
            parse(bad)
    assert isinstance(connect("redis+cluster://127.0.0.1:7000"), RedisCluster)
    assert isinstance(connect("redis+sentinel://127.0.0.1:26379/m"), SentinelRedis)


def test_keys_touched_together_share_a_slot() -> None:
    keys = Keys("ectrans:")
    for model in ("minilm", "opus-en-zh"):
        slot = key_slot(keys.queue(model, "realtime").encode())
        together = [keys.queue(model, "batch"), keys.forwarded(model, "job-1"), keys.cost(model)]
        together.append(keys.claim_lock(keys.queue(model, "batch")))
        assert {key_slot(k.encode()) for k in together} == {slot}
    assert key_slot(keys.reply("c1").encode()) == key_slot(keys.replied("c1", "job-1").encode())
    assert key_slot(keys.queue("minilm", "batch").encode()) != key_slot(keys.queue("opus-en-zh", "batch").encode())


# 2. Exactly once across slots, with a crash between the steps -----------------------------------


def test_forward_cut_short_by_a_crash_is_not_repeated(redis_url: str, prefix: str) -> None:
    """The dispatcher appended to the queue (step 1) and died before acking the ingress entries;
    restarted under its name, it reads them again and forwards nothing twice."""

    async def scenario() -> tuple[int, int, int]:
        settings = DispatcherSettings(redis_url=redis_url, prefix=prefix, instance="d1", heartbeat_s=0.5)
        first = Dispatcher(settings, {"noop": NOOP})
        keys = first.keys
        redis = connect(redis_url)
        try:
            await ensure_group(redis, keys.tasks, DISPATCHER_GROUP)
            for i in range(20):
                await redis.xadd(keys.tasks, {"model": "noop", "op": "noop", "input": f"text {i}", "id": f"job-{i}"})
            got = await read_group(redis, DISPATCHER_GROUP, "d1", {keys.tasks: ">"}, count=100, block=None)
            forwards = []
            for entry_id, raw in got[0][1]:
                decided = first.decide(entry_id, raw)
                assert not isinstance(decided, Finish)
                task = decided.task
                forwards.append(Forwarding(decided.queue, task.model, task.id, entry_id, task.to_fields()))
            assert await first.forwarder.append(forwards) == 20  # ... and the process dies here
            await first.redis.aclose()

            again = Dispatcher(settings, {"noop": NOOP})
            running = asyncio.create_task(again.run())
            await eventually(lambda: redis.xlen(keys.tasks), 0)
            again.stop()
            await asyncio.wait_for(running, 20)
            queued = sum([await redis.xlen(keys.queue("noop", c)) for c in ("realtime", "batch")])
            pending = (await redis.xpending(keys.tasks, DISPATCHER_GROUP))["pending"]
            return queued, int(await redis.xlen(keys.tasks)), int(pending)
        finally:
            await redis.aclose()

    assert asyncio.run(scenario()) == (20, 0, 0)  # each task queued once; the ingress is acked and empty


def test_finish_cut_short_by_a_crash_answers_the_client_once(redis_url: str, prefix: str) -> None:
    """A worker stored results (step 1), another pushed replies too (step 2), both died before the
    ack; the entries are finished again, with other records. One result, one reply each, carrying the
    first record, and nothing left pending."""

    async def scenario() -> tuple[list[str], Counter[str], int]:
        keys = Keys(prefix)
        stream = keys.queue("noop", "batch")
        redis = connect(redis_url)
        try:
            await ensure_group(redis, stream, WORKER_GROUP)
            for i in range(10):
                task = Task(f"job-{i}", "noop", "noop", "x", int(time.time() * 1000), reply_to="client-a")
                await redis.xadd(stream, task.to_fields())  # type: ignore[arg-type]
            entries = (await read_group(redis, WORKER_GROUP, "w1", {stream: ">"}, count=100, block=None))[0][1]
            writer = ResultWriter(redis, keys, WORKER_GROUP, ttl_s=60)

            def finishes(reason: str) -> list[Finish]:
                return [
                    Finish(
                        f"job-{i}", error_record(f"job-{i}", reason, reason, submitted_ms=0), stream, eid, "client-a"
                    )
                    for i, (eid, _) in enumerate(entries)
                ]

            first = finishes("first")
            await writer.store(first[:5])  # worker 1 dies after step 1
            await writer.push(first[5:], await writer.store(first[5:]))  # worker 2 dies after step 2
            assert await writer.write(finishes("second")) == [False] * 10  # the takeover: nothing new
            replies: Any = await redis.xrange(keys.reply("client-a"))
            reasons = [text(await redis.hget(keys.result(f"job-{i}"), "reason")) for i in range(10)]
            pending = (await redis.xpending(stream, WORKER_GROUP))["pending"]
            return reasons, Counter(text(f[b"id"]) + "/" + text(f[b"reason"]) for _, f in replies), int(pending)
        finally:
            await redis.aclose()

    reasons, replies, pending = asyncio.run(scenario())
    assert reasons == ["first"] * 10
    assert replies == Counter({f"job-{i}/first": 1 for i in range(10)})
    assert pending == 0


# 3. The stack on shards ------------------------------------------------------------------------


def test_noop_load_spreads_over_shards_and_each_task_ends_once(redis_cluster: LocalCluster, prefix: str) -> None:
    async def scenario() -> tuple[Counter[str], int, list[int]]:
        url = redis_cluster.url
        async with (
            running_stack(url, prefix, {"noop": NOOP}, {"noop": NoopExecutor(NOOP)}) as stack,
            AsyncClient(url, prefix=prefix) as client,
        ):
            results = await client.submit_many("noop", "noop", [f"text {i}" for i in range(600)], timeout=120)
            results += await client.submit_many("noop", "noop", ["short"] * 50, priority="realtime", timeout=60)
            hashes = [k async for k in stack.redis.scan_iter(match=f"{prefix}result:*", count=1000)]
            per_node = []
            for port in redis_cluster.ports:
                node = connect(f"redis://127.0.0.1:{port}/0")
                per_node.append(len([k async for k in node.scan_iter(match=f"{prefix}result:*", count=1000)]))
                await node.aclose()
            return Counter(r.status for r in results), len(hashes), per_node

    statuses, hashes, per_node = asyncio.run(scenario())
    assert statuses == Counter({"ok": 650}) and hashes == 650
    with connect_sync(redis_cluster.url) as tool:  # what command-line tools use, on the same URL
        assert len(list(tool.scan_iter(match=f"{prefix}result:*", count=1000))) == 650
    assert sum(per_node) == 650 and all(n > 100 for n in per_node), per_node  # results live on every shard


# 4. Sentinel: the services follow a failover --------------------------------------------------


@pytest.fixture
def sentinel() -> Iterator[LocalSentinel]:
    with LocalSentinel() as ha:
        yield ha


def test_services_and_client_follow_a_sentinel_failover(sentinel: LocalSentinel, prefix: str) -> None:
    """Dispatcher, worker and client keep their connections' owner across SENTINEL FAILOVER: work
    done before and after it all completes, with no restart of anything."""

    async def scenario() -> tuple[Counter[str], Counter[str], int, int]:
        url = sentinel.url
        async with (
            running_stack(url, prefix, {"noop": NOOP}, {"noop": NoopExecutor(NOOP)}),
            AsyncClient(url, prefix=prefix) as client,
        ):
            before = await client.submit_many("noop", "noop", [f"before {i}" for i in range(200)], timeout=60)
            old = sentinel.master_port()
            new = await asyncio.to_thread(sentinel.failover)
            after = await client.submit_many("noop", "noop", [f"after {i}" for i in range(200)], timeout=60)
            return Counter(r.status for r in before), Counter(r.status for r in after), int(old or 0), new

    before, after, old, new = asyncio.run(scenario())
    assert old != new
    assert before == Counter({"ok": 200}) and after == Counter({"ok": 200})
