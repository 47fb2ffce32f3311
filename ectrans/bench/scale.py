"""`ectrans bench scale`: throughput with 1, 2 and 4 hosts against one Redis and a 3-shard cluster.

A "host" is a dispatcher and a worker process with their own `ECTRANS_HOST`, on the weightless noop
model, so every task costs only the serving path: ingress XADD, dispatch (validate, forward + ack),
worker read, batch, finish (result + reply + ack), client read. For each Redis (a private server, a
private 3-master cluster) hosts are added one step at a time and a closed loop of tasks is driven
through the client library. Each step reports tasks/s, tasks/s per shard, and what every Redis node
did meanwhile (commands/s and CPU seconds per second, from INFO), which shows whether Redis or the
processes around it set the pace. On a 2-core machine, processes beyond two share the cores.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.crc import key_slot

from ectrans.bench.harness import cores, load_average, machine_info, note, run_async
from ectrans.client import AsyncClient
from ectrans.common.keys import Keys
from ectrans.common.presence import live
from ectrans.common.redis_conn import connect
from ectrans.local.launch import ServiceProcess, stop_all, wait_ready_async
from ectrans.local.redis_server import RedisServer
from ectrans.local.redis_topology import LocalCluster

MODELS_JSON = json.dumps({"noop": {"kind": "noop"}})
HOST_STEPS = (1, 2, 4)
READY_TIMEOUT_S = 180.0
SATURATED = 0.8  # CPU-seconds per second at which a Redis node (one thread for commands) is the limit


class Hosts:
    """Dispatcher + worker process pairs, each pair under its own `ECTRANS_HOST`, added step by step."""

    def __init__(self, url: str, prefix: str, log_dir: Path) -> None:
        self.url = url
        self.prefix = prefix
        self.log_dir = log_dir
        self.processes: list[ServiceProcess] = []
        self.count = 0

    def add(self, count: int) -> None:
        for _ in range(count):
            host = f"bench-host-{self.count}"
            for kind in ("dispatcher", "worker"):
                env = {
                    **os.environ,
                    "ECTRANS_REDIS_URL": self.url,
                    "ECTRANS_PREFIX": self.prefix,
                    "ECTRANS_MODELS_JSON": MODELS_JSON,
                    "ECTRANS_SERVE_MODELS": "noop",
                    "ECTRANS_HOST": host,
                    "ECTRANS_THREADS": "1",
                    "ECTRANS_LOG_LEVEL": os.environ.get("ECTRANS_LOG_LEVEL", "WARNING"),
                    "ECTRANS_HEARTBEAT_S": "0.5",
                }
                log = self.log_dir / f"{host}-{kind}.log"
                self.processes.append(ServiceProcess(f"{host}-{kind}", kind, env, log=log).start())
            self.count += 1

    async def wait_ready(self) -> None:
        """Every dispatcher and worker heartbeats (a worker does once its model is loaded)."""
        client = connect(self.url)
        keys = Keys(self.prefix)

        async def all_live() -> bool:
            return len(await live(client, keys)) >= 2 * self.count

        try:
            await wait_ready_async(self.processes, all_live, READY_TIMEOUT_S, "the hosts")
        finally:
            await client.aclose()

    def stop(self) -> None:
        stop_all(self.processes, 30.0)
        self.processes = []


@contextmanager
def topology(kind: str) -> Iterator[tuple[str, list[int]]]:
    """(URL, node ports) of a private single Redis or 3-master cluster."""
    if kind == "cluster":
        with LocalCluster(3) as cluster:
            yield cluster.url, cluster.ports
    else:
        with RedisServer() as server:
            yield server.url, [server.port]


def node_counters(ports: list[int]) -> dict[int, tuple[int, float]]:
    """Per node: (commands processed, CPU seconds used) so far."""
    found = {}
    for port in ports:
        with redis.Redis(port=port) as node:
            info: Any = node.info()
        found[port] = (
            int(info["total_commands_processed"]),
            float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
        )
    return found


def hot_keys(ports: list[int], keys: Keys) -> dict[str, int]:
    """Which node (port) holds the ingress stream and the noop queues: every task passes both."""
    names = {"ingress": keys.tasks, "noop queues": keys.queue("noop", "batch")}
    if len(ports) == 1:
        return dict.fromkeys(names, ports[0])
    with redis.Redis(port=ports[0]) as node:
        ranges: Any = node.execute_command("CLUSTER", "SLOTS")
    owners = {}
    for what, name in names.items():
        slot = key_slot(name.encode())
        owners[what] = next(int(r[2][1]) for r in ranges if int(r[0]) <= slot <= int(r[1]))
    return owners


@dataclass
class Sample:
    tasks_per_s: float
    nodes: dict[str, dict[str, float]]


async def drive(url: str, prefix: str, tasks: int, ports: list[int], *, lanes: int = 4, chunk: int = 250) -> Sample:
    """Keep `lanes × chunk` tasks in flight until `tasks` are answered; what it took, and what every
    Redis node did meanwhile."""
    remaining = tasks

    async def lane(client: AsyncClient) -> None:
        nonlocal remaining
        while remaining > 0:
            take = min(chunk, remaining)
            remaining -= take
            results = await client.submit_many("noop", "noop", ["some text"] * take, priority="batch", timeout=300)
            failed = [r for r in results if not r.ok]
            if failed:
                raise RuntimeError(f"{len(failed)} tasks failed, e.g. {failed[0].reason}: {failed[0].error}")

    async with AsyncClient(url, prefix=prefix) as client:
        await client.submit_many("noop", "noop", ["warm up"] * 200, priority="batch", timeout=120)
        before = await asyncio.to_thread(node_counters, ports)
        started = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for _ in range(lanes):
                tg.create_task(lane(client))
        seconds = time.perf_counter() - started
        after = await asyncio.to_thread(node_counters, ports)
    nodes = {
        str(port): {
            "commands_per_s": round((after[port][0] - before[port][0]) / seconds),
            "cpu_s_per_s": round((after[port][1] - before[port][1]) / seconds, 3),
        }
        for port in ports
    }
    return Sample(tasks / seconds, nodes)


def measure(kind: str, tasks: int, repeats: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    prefix = f"bench{uuid.uuid4().hex[:8]}:"
    log_dir = Path(tempfile.mkdtemp(prefix=f"ectrans-scale-{kind}-"))
    with topology(kind) as (url, ports):
        hosts = Hosts(url, prefix, log_dir)
        try:
            hot = hot_keys(ports, Keys(prefix))
            for count in HOST_STEPS:
                hosts.add(count - hosts.count)
                run_async(hosts.wait_ready)
                note(f"{kind}: {count} host(s) ready; {repeats} × {tasks} tasks")
                samples = [run_async(lambda: drive(url, prefix, tasks, ports)) for _ in range(repeats)]
                top = max(samples, key=lambda sample: sample.tasks_per_s)  # other load on the host only slows
                busiest = max(n["cpu_s_per_s"] for n in top.nodes.values())
                redis_cpu = sum(n["cpu_s_per_s"] for n in top.nodes.values())
                rows.append(
                    {
                        "redis": kind,
                        "shards": len(ports),
                        "hosts": count,
                        "processes": 2 * count,
                        "tasks": tasks,
                        "tasks_per_s": round(top.tasks_per_s, 1),
                        "tasks_per_s_samples": [round(sample.tasks_per_s, 1) for sample in samples],
                        "tasks_per_s_per_shard": round(top.tasks_per_s / len(ports), 1),
                        "busiest_node_cpu": busiest,
                        # Redis CPU per task (all nodes), and the rate at which the busiest node would
                        # reach one CPU-second per second at this cost per task: where Redis becomes the limit.
                        "redis_cpu_us_per_task": round(1e6 * redis_cpu / top.tasks_per_s, 1),
                        "redis_ceiling_tasks_per_s": round(top.tasks_per_s / busiest) if busiest > 0 else None,
                        "nodes": top.nodes,
                        "hot_keys_on": hot,
                    }
                )
                note(f"{kind}: {count} host(s): {top.tasks_per_s:.0f} tasks/s")
        finally:
            hosts.stop()
    return rows


def run(quick: bool) -> dict[str, Any]:
    tasks, repeats = (3000, 1) if quick else (10_000, 3)
    info = machine_info()
    rows = measure("single", tasks, repeats) + measure("cluster", tasks, repeats)
    kinds = ("single", "cluster")
    best = {kind: max(r["tasks_per_s"] for r in rows if r["redis"] == kind) for kind in kinds}
    ceiling = {kind: min(r["redis_ceiling_tasks_per_s"] or 0 for r in rows if r["redis"] == kind) for kind in kinds}
    busiest = max(r["busiest_node_cpu"] for r in rows)
    return {
        "scenario": "scale",
        "quick": quick,
        "machine": info,
        "load_average_at_end": load_average(),
        "model": "noop (no model cost: the serving path only)",
        "host": "one dispatcher + one worker process, its own ECTRANS_HOST",
        "note": (
            f"{cores()} CPU cores shared by every process here (Redis nodes, services, the client): "
            "steps beyond that many processes contend for the same cores, so they show the cost of "
            "scaling out on one machine, not what more machines would give"
        ),
        "results": rows,
        "best_tasks_per_s": best,
        "redis_ceiling_tasks_per_s": ceiling,
        "redis_ceiling_note": (
            "tasks/s at which the busiest Redis node would use a whole core, at the measured Redis CPU "
            "per task (the lowest over the steps): the rate that more service hosts could reach before "
            "Redis becomes the limit; on a cluster, the shard holding the ingress stream or a hot "
            "model's queues sets it"
        ),
        "redis_limit": (
            f"the busiest Redis node used {busiest:.2f} CPU-seconds per second at most: "
            + (
                "Redis was near saturation"
                if busiest > SATURATED
                else "Redis was not the limit; the processes around it were"
            )
        ),
    }
