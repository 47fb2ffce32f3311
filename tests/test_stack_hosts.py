"""Many worker hosts on one Redis (and on a cluster): shared load, a host killed mid-load, placement.

"Hosts" are process groups with their own `ECTRANS_HOST`: each runs real worker processes
(`python -m ectrans.services.worker`) on the weightless noop model, so the test measures the
serving path, not a model. Every scenario runs against a single Redis and a 3-master cluster.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import ResponseError

from ectrans.common.heartbeat import host_name
from ectrans.common.keys import TASK_CLASSES, WORKER_GROUP, Keys
from ectrans.common.presence import live
from ectrans.common.redis_conn import RedisClient, connect
from ectrans.common.registry import ModelSpec, build_spec
from ectrans.local.launch import ServiceProcess, stop_all
from ectrans.local.redis_server import RedisServer
from ectrans.local.redis_topology import LocalCluster
from ectrans.models.noop import NoopExecutor
from ectrans.services.dispatcher.service import Dispatcher
from ectrans.services.dispatcher.settings import DispatcherSettings
from ectrans.services.monitor.hosts import host_figures, hosts_live
from ectrans.services.monitor.instances import GONE, LIVE, InstanceState
from ectrans.services.monitor.service import Monitor
from ectrans.services.monitor.settings import MonitorSettings
from ectrans.services.worker.service import Worker
from ectrans.services.worker.settings import WorkerSettings

NOOP: ModelSpec = build_spec("noop", {"kind": "noop"})
OTHER: ModelSpec = build_spec("other", {"kind": "noop"})
# The hosts' no-op model takes 50 ms a batch, as a device would: work queues up on each host.
MODELS_JSON = json.dumps({"noop": {"kind": "noop", "delay_ms": 50}})


@pytest.fixture(params=["single", "cluster"])
def url(request: pytest.FixtureRequest) -> str:
    """Each scenario on one Redis and on a cluster: the URL is the only difference."""
    if request.param == "cluster":
        cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        return cluster.url
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str, every_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s}s")
        await asyncio.sleep(every_s)


# 1. Hosts as process groups ---------------------------------------------------------------------


class Host:
    """Worker processes sharing one `ECTRANS_HOST` and one process group (so one kill takes all)."""

    def __init__(self, name: str, workers: int, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.processes: list[ServiceProcess] = []
        for index in range(workers):
            instance = f"{name}-{index}"
            # The first process leads a new group; the others join it.
            group = 0 if index == 0 else self.processes[0].pid
            worker_env = {**env, "ECTRANS_HOST": name, "ECTRANS_INSTANCE": instance}
            worker = ServiceProcess(instance, "worker", worker_env, log=log_dir / f"{instance}.log", group=group)
            self.processes.append(worker.start())

    @property
    def consumers(self) -> list[str]:
        return [f"{self.name}-{i}" for i in range(len(self.processes))]

    def freeze(self) -> None:
        """SIGSTOP the whole group, so what it holds stays held while the test looks at it."""
        self.processes[0].signal_group(signal.SIGSTOP)

    def kill(self) -> None:
        """SIGKILL the whole group: no handler runs, nothing is handed back (a host losing power)."""
        self.processes[0].signal_group(signal.SIGKILL)
        for proc in self.processes:
            proc.wait(10)

    def stop(self) -> None:
        stop_all(self.processes, 30.0)


@contextmanager
def hosts(url: str, prefix: str, layout: dict[str, int], tmp_path: Path, **settings: str) -> Iterator[dict[str, Host]]:
    env = {
        **os.environ,
        "ECTRANS_REDIS_URL": url,
        "ECTRANS_PREFIX": prefix,
        "ECTRANS_MODELS_JSON": MODELS_JSON,
        "ECTRANS_SERVE_MODELS": "noop",
        "ECTRANS_LOG_LEVEL": "WARNING",
        "ECTRANS_THREADS": "1",
        **{f"ECTRANS_{k.upper()}": v for k, v in settings.items()},
    }
    started = {name: Host(name, count, env, tmp_path) for name, count in layout.items()}
    try:
        yield started
    finally:
        for host in started.values():
            host.stop()


@asynccontextmanager
async def dispatcher(
    url: str, prefix: str, registry: dict[str, ModelSpec], **settings: Any
) -> AsyncIterator[Dispatcher]:
    d = Dispatcher(
        DispatcherSettings(redis_url=url, prefix=prefix, instance="d0", heartbeat_s=0.5, **settings), registry
    )
    task = asyncio.create_task(d.run())
    try:
        yield d
    finally:
        d.stop()
        await asyncio.wait_for(task, 30)


async def pending_by_consumer(redis: RedisClient, stream: str) -> dict[str, list[str]]:
    rows = await redis.xpending_range(stream, WORKER_GROUP, min="-", max="+", count=100_000)
    found: dict[str, list[str]] = {}
    for row in rows:
        found.setdefault(text(row["consumer"]), []).append(text(row["message_id"]))
    return found


async def submit_all(redis: RedisClient, keys: Keys, total: int) -> None:
    """`total` batch tasks in one round trip, ids job-0.., answered to the reply stream `probe`."""
    pipe = redis.pipeline(transaction=False)
    for i in range(total):
        fields: dict[Any, Any] = {"model": "noop", "op": "noop", "input": f"text {i}", "id": f"job-{i}"}
        pipe.xadd(keys.tasks, {**fields, "reply_to": "probe", "priority": "batch"})
    await pipe.execute()


async def task_ids(redis: RedisClient, stream: str, entry_ids: list[str]) -> list[str]:
    """Task ids of the entries still in `stream` (finished ones are deleted)."""
    found = []
    for entry_id in entry_ids:
        entry: Any = await redis.xrange(stream, entry_id, entry_id)
        if entry:
            found.append(text(entry[0][1][b"id"]))
    return found


async def statuses(redis: RedisClient, keys: Keys, total: int) -> list[str]:
    pipe = redis.pipeline(transaction=False)
    for i in range(total):
        pipe.hget(keys.result(f"job-{i}"), "status")
    return [text(status) if status is not None else "" for status in await pipe.execute()]


def test_killed_host_work_finishes_on_the_other_none_lost_or_doubled(url: str, prefix: str, tmp_path: Path) -> None:
    """Host A (two worker processes) and host B (one) share the load; A is SIGKILLed while it holds
    tasks; B takes them over. Every task gets exactly one result and one reply."""
    total = 1500
    keys = Keys(prefix)
    queue = keys.queue("noop", "batch")

    async def scenario() -> dict[str, Any]:
        redis = connect(url)
        out: dict[str, Any] = {}
        async with dispatcher(url, prefix, {"noop": NOOP}), monitor(url, prefix):
            with hosts(
                url, prefix, {"host-a": 2, "host-b": 1}, tmp_path,
                heartbeat_s="0.5", claim_idle_ms="1000", batch_max_wait_ms="300", batch_max_batch="8", prefetch="64",
            ) as group:  # fmt: skip
                a = group["host-a"]

                async def all_up() -> bool:
                    return len(await live(redis, keys, "worker")) == 3

                async def a_holds_work() -> bool:
                    out["held"] = await pending_by_consumer(redis, queue)
                    return sum(len(out["held"].get(c, [])) for c in a.consumers) >= 20

                async def all_answered() -> bool:
                    return "" not in await statuses(redis, keys, total)

                async def only_b_live() -> bool:
                    return {w.host for w in await live(redis, keys, "worker")} == {"host-b"}

                async def monitor_sees_a_gone() -> bool:
                    out["site"] = {text(k): text(v) for k, v in (await redis.hgetall(keys.stats)).items()}
                    site = out["site"]
                    # Both in one snapshot: A gone, and host B plus this process's host live (under
                    # load this process's own heartbeat can lag an interval behind A's departure).
                    return site.get("hosts.host-a.workers_live") == "0" and int(site.get("hosts_live", 0)) >= 2

                await eventually(all_up, 120, "three workers heartbeating")
                await submit_all(redis, keys, total)
                await eventually(a_holds_work, 60, "host A holding tasks")
                a.freeze()  # else A may finish what it held between the snapshot and the kill
                await a_holds_work()  # the snapshot of what the frozen host holds
                a.kill()
                out["taken"] = await task_ids(redis, queue, [e for c in a.consumers for e in out["held"].get(c, [])])
                await eventually(all_answered, 90, "a result for every task", every_s=0.25)
                await eventually(only_b_live, 10, "host A gone from the live workers")
                await eventually(monitor_sees_a_gone, 10, "the monitor's per-host figures")
                replies: Any = await redis.xrange(keys.reply("probe"))
                out["replies"] = Counter(text(fields[b"id"]) for _, fields in replies)
                out["statuses"] = Counter(await statuses(redis, keys, total))
                out["left"] = await pending_by_consumer(redis, queue)
        await redis.aclose()
        return out

    out = asyncio.run(scenario())
    replies: Counter[str] = out["replies"]
    assert out["statuses"] == Counter({"ok": total})  # none lost: every task has its result
    assert len(replies) == total and set(replies.values()) == {1}  # one reply each: none doubled
    assert out["taken"] and all(replies[t] == 1 for t in out["taken"])  # what A held when killed, done by B
    assert out["left"] == {}  # nothing left pending in the group
    site = out["site"]  # the monitor's per-host view (HGETALL <prefix>stats)
    assert (site["hosts.host-a.workers_known"], site["hosts.host-b.workers_live"]) == ("2", "1")
    assert site["hosts.host-b.models"] == "noop" and int(site["hosts.host-b.tasks_total"]) > 0
    assert int(site["hosts_live"]) >= 2  # host-b and this process's host (dispatcher, monitor)


@asynccontextmanager
async def monitor(url: str, prefix: str) -> AsyncIterator[Monitor]:
    m = Monitor(
        MonitorSettings(redis_url=url, prefix=prefix, interval_s=0.5, heartbeat_s=0.5, metrics_port=0), ["noop"]
    )
    task = asyncio.create_task(m.run())
    try:
        yield m
    finally:
        m.stop()
        await asyncio.wait_for(task, 30)


def instance(host: str, name: str, pid: int, state: str = LIVE, **fields: str) -> InstanceState:
    return InstanceState("worker", name, host, pid, 0.0, 0.0, state, memory={"uss": 100}, fields=fields)


def test_host_figures_sum_workers_per_host_and_rate_only_the_same_processes() -> None:
    before = [instance("a", "a-0", 1, n_ok="100"), instance("a", "a-1", 2, n_ok="50"), instance("b", "b-0", 3)]
    now = [
        instance("a", "a-0", 1, n_ok="160", n_error="2", models="minilm"),
        instance("a", "a-1", 9, n_ok="10", models="minilm,opus"),  # restarted: counters start again
        instance("b", "b-0", 3, state=GONE, n_ok="7"),
    ]
    figures = host_figures(now, before, elapsed_s=2.0)
    assert figures["a"] == {
        "instances_live": 2, "workers_live": 2, "workers_known": 2, "models": "minilm,opus",
        "tasks_total": 172, "private_bytes": 200, "tasks_per_s": 31.0,
    }  # fmt: skip
    assert (figures["b"]["workers_live"], figures["b"]["workers_known"], figures["b"]["models"]) == (0, 1, "")
    assert host_figures(now, None, 2.0)["a"]["tasks_per_s"] is None  # no earlier interval: no rate yet
    assert hosts_live(now) == 1


# 2. Placement: a model nobody serves fails after a bounded wait ---------------------------------


@asynccontextmanager
async def worker(url: str, prefix: str, spec: ModelSpec, instance: str) -> AsyncIterator[Worker]:
    w = Worker(
        WorkerSettings(redis_url=url, prefix=prefix, serve_models=spec.name, instance=instance, heartbeat_s=0.5),
        {spec.name: spec},
        executors={spec.name: NoopExecutor(spec)},
    )
    task = asyncio.create_task(w.run())
    try:
        yield w
    finally:
        w.stop()
        await asyncio.wait_for(task, 30)


async def last_queued(redis: RedisClient, keys: Keys, model: str) -> list[str]:
    """The last id each of the model's queues generated: it moves only when a task is queued."""
    ids = []
    for task_class in TASK_CLASSES:
        try:
            info = await redis.xinfo_stream(keys.queue(model, task_class))
        except ResponseError:  # no such stream: nothing queued yet
            ids.append("")
        else:
            ids.append(text(info["last-generated-id"]))
    return ids


def test_a_model_without_live_workers_gets_unavailable_after_the_grace_period(url: str, prefix: str) -> None:
    """`other` loses its only worker: a task queued meanwhile and one sent after the grace period
    both end with `unavailable` (bounded wait, not an eternal queue); `noop` is served throughout;
    a worker for `other` coming back brings it back."""
    grace_s = 1.5
    keys = Keys(prefix)

    async def result(redis: RedisClient, task_id: str, timeout_s: float) -> dict[str, str]:
        found: dict[str, str] = {}

        async def answered() -> bool:
            nonlocal found
            found = {text(k): text(v) for k, v in (await redis.hgetall(keys.result(task_id))).items()}
            return bool(found)

        await eventually(answered, timeout_s, f"a result for {task_id}")
        return found

    async def submit(redis: RedisClient, model: str, task_id: str) -> None:
        await redis.xadd(keys.tasks, {"model": model, "op": "noop", "input": "x", "id": task_id})

    async def scenario() -> dict[str, Any]:
        redis = connect(url)
        registry = {"noop": NOOP, "other": OTHER}
        out: dict[str, Any] = {}
        async with (
            dispatcher(url, prefix, registry, unavailable_after_s=grace_s) as d,
            worker(url, prefix, NOOP, "w-noop"),
        ):
            async with worker(url, prefix, OTHER, "w-other"):
                await submit(redis, "other", "served")
                out["served"] = await result(redis, "served", 20)

                async def placed() -> bool:
                    return bool(d.placement.hosts("other"))

                await eventually(placed, 10, "the dispatcher seeing the worker of `other`")
                out["hosts"] = d.placement.hosts("other")
            before = await last_queued(redis, keys, "other")
            out["queued_in_grace"] = not d.placement.unavailable("other")
            await submit(redis, "other", "queued")  # its last worker just stopped: it waits in its queue
            out["queued"] = await result(redis, "queued", 20)
            out["queued_was_queued"] = await last_queued(redis, keys, "other") != before
            out["unavailable_after"] = d.placement.unavailable("other")
            before = await last_queued(redis, keys, "other")
            await submit(redis, "other", "late")  # past the grace period: answered at admission
            out["late"] = await result(redis, "late", 10)
            out["late_was_queued"] = await last_queued(redis, keys, "other") != before
            await submit(redis, "noop", "noop")
            out["noop"] = await result(redis, "noop", 10)
            async with worker(url, prefix, OTHER, "w-other"):

                async def served_again() -> bool:
                    return not d.placement.unavailable("other")

                await eventually(served_again, 10, "a worker for `other` seen again")
                await submit(redis, "other", "back")
                out["back"] = await result(redis, "back", 20)
        await redis.aclose()
        return out

    out = asyncio.run(scenario())
    assert out["served"]["status"] == "ok" and out["noop"]["status"] == "ok" and out["back"]["status"] == "ok"
    assert out["hosts"] == {host_name()}  # in-process workers: this process's host
    for name in ("queued", "late"):
        assert (out[name]["status"], out[name]["reason"]) == ("error", "unavailable"), out[name]
        assert "other" in out[name]["error"]
    # Sent within the grace period, it waited in the queue until the drain answered it (the wait is
    # bounded by `result`'s timeout); sent after it, it was refused at admission and never queued.
    assert out["queued_in_grace"] and out["queued_was_queued"] and out["unavailable_after"]
    assert not out["late_was_queued"]
