"""`ectrans bench chaos`: faults under a steady load, and what each does to the tasks in flight.

A private Redis (AOF on, its files in a fixed directory so that a restart keeps them) and the trio as
real processes (`python -m ectrans.services.<name>`). A steady stream of tasks with known ids goes in
with raw XADDs, as redis-cli would send them; one fault per phase; then the phase's tasks are counted
from their result hashes and the reply stream:

    submitted   XADDs that Redis acknowledged (an entry id came back)
    ok, error   tasks whose result hash says so (`reasons` breaks errors down)
    duplicates  terminal records beyond the first per task: the result hash is written once by
                construction, so a second record would show as a second reply-stream entry
    lost        acknowledged tasks still without a result when the phase's deadline passed
    refused     XADDs that failed while Redis was down: the client saw the error, nothing is lost

Faults (`noop` model unless named): SIGKILL a worker holding tasks (its peer takes them over after
the claim idle time; the killed one restarts under its old name); SIGTERM a worker holding queued
tasks (it exits 0 and hands them back at once); SIGKILL the dispatcher (restarted under its name);
restart Redis (SIGTERM, AOF everysec); SIGKILL Redis (AOF everysec, then always); stop the monitor;
and on MiniLM: SIGKILL a worker mid-batch, then SIGTERM the other with a batch in flight.

On a 3-master Redis Cluster (`ECTRANS_BENCH_REDIS=cluster`, AOF on every node) the same process
faults run, and instead of the single-Redis restarts: SIGKILL the master that serves the ingress
stream (AOF everysec, then always) and start it again on its port and files.

`duplicates` and `lost` must be 0 for every fault (and `error` too: no fault here is the task's
fault), except a SIGKILL under `appendfsync everysec`: there Redis itself may drop up to ~2 s of
writes it acknowledged, so those phases are reported (`everysec_sigkill_lost`) but not judged.
Progress lines go to stderr; `run` returns the JSON that `ectrans bench chaos` prints.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ectrans.common.keys import DISPATCHER_GROUP, WORKER_GROUP, Keys
from ectrans.common.redis_conn import RedisClient, connect
from ectrans.local.launch import ServiceProcess, stop_all, wait_ready_async
from ectrans.local.redis_server import RedisServer, free_port
from ectrans.local.redis_topology import LocalCluster, command

SINGLE, CLUSTER = "single", "cluster"  # `topology`: one Redis, or a 3-master Redis Cluster
# Redis under `appendfsync everysec` may lose up to ~2 s of acknowledged writes to a SIGKILL: while
# its background fsync runs, it holds new AOF writes in memory and answers clients meanwhile (see
# docs/reliability.md and `ectrans bench durability`). What these faults lose is Redis's, not ours.
EVERYSEC_SIGKILLS = frozenset({"redis_sigkill_aof_everysec", "cluster_master_sigkill_aof_everysec"})
RedisFaults = Literal["all", "durable", "none"]
NOOP_MODELS = json.dumps({"noop": {"kind": "noop"}})
READY_TIMEOUT_S = 180.0
CLAIM_IDLE_MS = 1000
GRACE_S = 10.0
_WORDS = (
    "edge server model task batch queue worker latency token vector network camera sensor city traffic "
    "signal frame video stream power budget memory device cache reply result error deadline realtime "
    "the a of to and in on for with from by at as is was are were be been will can may must"
)


WORDS = tuple(_WORDS.split())


def note(message: str) -> None:
    print(f"[chaos] {message}", file=sys.stderr, flush=True)


def sentences(n: int, seed: int = 0) -> list[str]:
    """Seeded English-like inputs of 8 to 40 words: real work for MiniLM, no data files needed."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))).capitalize() + "." for _ in range(n)]


# 1. The stack as processes ---------------------------------------------------------------------------


class ChaosStack:
    """Redis with AOF in a fixed directory and port (or a 3-master cluster, each node so), plus named
    service processes."""

    def __init__(
        self, work_dir: Path, *, serve_models: str, models_json: str | None, settings: dict[str, str],
        topology: str = SINGLE,
    ):  # fmt: skip
        if topology not in (SINGLE, CLUSTER):
            raise ValueError(f"topology {topology!r}: {SINGLE} or {CLUSTER}")
        self.work_dir = work_dir
        self.prefix = "chaos:"
        self.keys = Keys(self.prefix)
        self.topology = topology
        (work_dir / "redis").mkdir(parents=True, exist_ok=True)
        self._server: RedisServer | None = None
        self._cluster: LocalCluster | None = None
        if topology == CLUSTER:
            self._cluster = LocalCluster(3, appendonly=True, data_dir=work_dir / "redis")
        else:
            self._server = RedisServer(free_port(), appendonly=True, data_dir=work_dir / "redis")
        self.serve_models = serve_models
        self.models_json = models_json
        self.settings = settings
        self.services: dict[str, ServiceProcess] = {}

    @property
    def redis_server(self) -> RedisServer:
        assert self._server is not None, "a single-Redis fault on a cluster stack"
        return self._server

    @property
    def cluster(self) -> LocalCluster:
        assert self._cluster is not None, "a cluster fault on a single-Redis stack"
        return self._cluster

    @property
    def url(self) -> str:
        return self.cluster.url if self._cluster is not None else self.redis_server.url

    def start_redis(self) -> None:
        if self._cluster is not None:
            self._cluster.start()
        else:
            self.redis_server.start()

    def stop_redis(self) -> None:
        if self._cluster is not None:
            self._cluster.stop()
        else:
            self.redis_server.stop()

    def env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ECTRANS_")}
        env |= {
            "ECTRANS_REDIS_URL": self.url,
            "ECTRANS_PREFIX": self.prefix,
            "ECTRANS_SERVE_MODELS": self.serve_models,
            "ECTRANS_LOG_LEVEL": "INFO",
            "ECTRANS_METRICS_PORT": "0",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        if self.models_json:
            env["ECTRANS_MODELS_JSON"] = self.models_json
        env |= {f"ECTRANS_{k.upper()}": v for k, v in {**self.settings, **extra}.items()}
        return env

    def start_service(self, name: str, kind: str, extra: dict[str, str] | None = None) -> ServiceProcess:
        env = self.env({"INSTANCE": name, **(extra or {})})
        # cwd: no developer's .env file is read by accident.
        service = ServiceProcess(name, kind, env, log=self.work_dir / f"{name}.log", cwd=self.work_dir)
        self.services[name] = service.start()
        return service

    async def wait_ready(self, names: list[str], redis: RedisClient, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Each named process has beaten its heartbeat: the pid field tells a restart from its predecessor."""
        waiting = {name: self.services[name] for name in names}

        async def beating() -> bool:
            for name, service in list(waiting.items()):
                pid = await redis.hget(self.keys.heartbeat(service.kind, name), "pid")
                if pid is not None and int(pid) == service.pid:
                    del waiting[name]
            return not waiting

        await wait_ready_async(list(waiting.values()), beating, timeout_s, f"services {sorted(names)}")

    def stop(self) -> None:
        stop_all(self.services.values(), GRACE_S + 10)
        self.stop_redis()


async def pending_of(redis: RedisClient, streams: list[str], group: str, consumer: str) -> int:
    total = 0
    for stream in streams:
        rows = await redis.xpending_range(stream, group, min="-", max="+", count=10_000, consumername=consumer)
        total += len(rows)
    return total


async def wait_holding(
    redis: RedisClient, streams: list[str], group: str, consumer: str, *, at_least: int, timeout_s: float
) -> int:
    """Poll until `consumer` holds `at_least` pending entries (or the timeout); how many it holds."""
    deadline = time.monotonic() + timeout_s
    held = await pending_of(redis, streams, group, consumer)
    while held < at_least and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
        held = await pending_of(redis, streams, group, consumer)
    return held


# 2. Load and counting --------------------------------------------------------------------------------


@dataclass
class Submission:
    submitted: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


async def steady_load(
    url: str, keys: Keys, phase: str, texts: list[str], *, model: str, op: str, rate: float, chunk: int
) -> Submission:
    """Submit `texts` at `rate` tasks/s, `chunk` per round trip; a failed XADD counts as refused."""
    redis = connect(url, client_name=f"chaos-load-{phase}")
    out = Submission()
    started = time.monotonic()
    try:
        for first in range(0, len(texts), chunk):
            delay = started + first / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            ids = [f"{phase}-{i:05d}" for i in range(first, min(first + chunk, len(texts)))]
            pipe = redis.pipeline(transaction=False)
            for n, (task_id, text) in enumerate(zip(ids, texts[first : first + chunk], strict=True)):
                fields: dict[Any, Any] = {"model": model, "op": op, "input": text, "id": task_id, "reply_to": phase}
                fields["priority"] = "realtime" if (first + n) % 2 else "batch"  # both classes, half each
                pipe.xadd(keys.tasks, fields)
            try:
                replies = await pipe.execute(raise_on_error=False)
            except Exception:  # Redis down past the client's retries
                out.refused += ids
                continue
            for task_id, reply in zip(ids, replies, strict=True):
                (out.refused if isinstance(reply, Exception) else out.submitted).append(task_id)
    finally:
        await redis.aclose()
    return out


async def answered(redis: RedisClient, keys: Keys, ids: list[str]) -> dict[str, dict[str, str]]:
    pipe = redis.pipeline(transaction=False)
    for task_id in ids:
        pipe.hmget(keys.result(task_id), ["status", "reason"])
    found = {}
    for task_id, (status, reason) in zip(ids, await pipe.execute(), strict=True):
        if status is not None:
            found[task_id] = {"status": status.decode(), "reason": (reason or b"").decode()}
    return found


async def _entries(reply: Awaitable[Any]) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Stream entries of a reply (redis-py types them loosely; this client returns bytes)."""
    return list(await reply or [])


async def count(
    redis: RedisClient, keys: Keys, phase: str, load: Submission, timeout_s: float
) -> tuple[dict[str, Any], float]:
    """Wait for a record per submitted task (or the timeout), then count; also the seconds waited."""
    started = time.monotonic()
    results: dict[str, dict[str, str]] = {}
    missing = list(load.submitted)
    while missing and time.monotonic() - started < timeout_s:
        results |= await answered(redis, keys, missing)
        missing = [t for t in load.submitted if t not in results]
        if missing:
            await asyncio.sleep(0.1)
    waited = time.monotonic() - started
    replies = Counter[str]()
    last = "-"
    while batch := await _entries(redis.xrange(keys.reply(phase), min=last, max="+", count=10_000)):
        replies.update(fields[b"id"].decode() for _, fields in batch)
        last = "(" + batch[-1][0].decode()
    refused_answered = await answered(redis, keys, load.refused) if load.refused else {}
    reasons = Counter(r["reason"] for r in results.values() if r["status"] != "ok")
    counts: dict[str, Any] = {
        "submitted": len(load.submitted),
        "ok": sum(r["status"] == "ok" for r in results.values()),
        "error": sum(r["status"] != "ok" for r in results.values()),
        "duplicates": sum(n - 1 for n in replies.values() if n > 1),
        "lost": len(missing),
        "refused": len(load.refused),
        # A refused XADD that Redis did execute (its reply was lost): answered once, not a duplicate.
        "refused_but_answered": len(refused_answered),
        "records_without_reply": sum(1 for t in results if replies[t] == 0),
    }
    if reasons:
        counts["reasons"] = dict(reasons)
    return counts, waited


# 3. Faults -------------------------------------------------------------------------------------------

Fault = Callable[["Phase"], Awaitable[dict[str, Any]]]


@dataclass
class Phase:
    stack: ChaosStack
    redis: RedisClient
    queues: list[str]
    stopped: set[str] = field(default_factory=set)  # services a fault stopped on purpose


def _logged(service: ServiceProcess, pattern: str) -> int:
    """Sum of the numbers a service logged in lines matching `pattern` (one group)."""
    assert service.log is not None
    return sum(int(m) for m in re.findall(pattern, service.log.read_text(errors="replace")))


def kill_worker(victim: str, *, restart: bool, at_least: int = 1) -> Fault:
    """SIGKILL `victim` while it holds tasks; peers take them over, or its restart under the same name."""

    async def fault(p: Phase) -> dict[str, Any]:
        held = await wait_holding(p.redis, p.queues, WORKER_GROUP, victim, at_least=at_least, timeout_s=5.0)
        await asyncio.to_thread(p.stack.services[victim].kill)
        abandoned = await pending_of(p.redis, p.queues, WORKER_GROUP, victim)
        if restart:
            p.stack.start_service(victim, "worker")
        else:
            p.stopped.add(victim)
        return {"held_at_kill": held, "abandoned": abandoned, "restarted": restart}

    return fault


def term_worker(victim: str, *, at_least: int = 1) -> Fault:
    """SIGTERM `victim` while it holds tasks: it must exit 0 after finishing what runs (within the
    grace period) and handing back what waits."""

    async def fault(p: Phase) -> dict[str, Any]:
        held = await wait_holding(p.redis, p.queues, WORKER_GROUP, victim, at_least=at_least, timeout_s=5.0)
        service = p.stack.services[victim]
        sent = time.monotonic()
        p.stopped.add(victim)
        service.signal(signal.SIGTERM)
        code = await asyncio.to_thread(service.wait, GRACE_S + 10)
        return {
            "held_at_signal": held,
            "exit_code": code,
            "exit_s": round(time.monotonic() - sent, 2),
            "in_flight_batches": _logged(service, r"draining (\d+) in-flight batches"),
            "handed_back": _logged(service, r"handed back (\d+) queued tasks"),
        }

    return fault


async def kill_dispatcher(p: Phase) -> dict[str, Any]:
    held = await wait_holding(p.redis, [p.stack.keys.tasks], DISPATCHER_GROUP, "d0", at_least=1, timeout_s=1.0)
    await asyncio.to_thread(p.stack.services["d0"].kill)
    abandoned = await pending_of(p.redis, [p.stack.keys.tasks], DISPATCHER_GROUP, "d0")
    p.stack.start_service("d0", "dispatcher")
    return {"held_at_kill": held, "abandoned": abandoned}


async def restart_redis(p: Phase) -> dict[str, Any]:
    """SIGTERM (Redis writes out its AOF), one second down, start again on the same port and files."""
    server = p.stack.redis_server
    stopped = time.monotonic()
    await asyncio.to_thread(server.stop)
    await asyncio.sleep(1.0)
    await asyncio.to_thread(server.start)
    return {"down_s": round(time.monotonic() - stopped, 2), "appendfsync": "everysec"}


def kill_redis(appendfsync: str) -> Fault:
    """SIGKILL Redis: no shutdown, no final write. With `always` every acknowledged write was fsynced
    before its reply; with `everysec` it was at least written to the file (the page cache survives a
    process crash, not a machine crash)."""

    async def fault(p: Phase) -> dict[str, Any]:
        server = p.stack.redis_server
        await p.redis.config_set("appendfsync", appendfsync)
        stopped = time.monotonic()
        await asyncio.to_thread(server.stop, kill=True)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(server.start)  # back to the command line's everysec
        return {"down_s": round(time.monotonic() - stopped, 2), "appendfsync": appendfsync, "signal": "SIGKILL"}

    return fault


def kill_cluster_master(appendfsync: str) -> Fault:
    """SIGKILL the cluster master that serves the ingress stream, its `appendfsync` set first as in
    `kill_redis`; start it again on the same port and files one second later (back to everysec), and
    wait for `cluster_state:ok` on every node."""

    async def fault(p: Phase) -> dict[str, Any]:
        cluster = p.stack.cluster
        index = cluster.master_of(p.stack.keys.tasks)
        await asyncio.to_thread(command, cluster.ports[index], "CONFIG", "SET", "appendfsync", appendfsync)
        stopped = time.monotonic()
        await asyncio.to_thread(cluster.restart_node, index, kill=True, down_s=1.0)
        return {"down_s": round(time.monotonic() - stopped, 2), "port": cluster.ports[index],
                "appendfsync": appendfsync, "signal": "SIGKILL"}  # fmt: skip

    return fault


async def stop_monitor(p: Phase) -> dict[str, Any]:
    service = p.stack.services["m0"]
    p.stopped.add("m0")
    service.signal(signal.SIGTERM)
    return {"exit_code": await asyncio.to_thread(service.wait, 15)}


async def run_phase(
    p: Phase, name: str, fault: Fault, texts: list[str], *, model: str, op: str, rate: float, chunk: int,
    fault_at_s: float, answer_timeout_s: float = 60.0,
) -> dict[str, Any]:  # fmt: skip
    """Steady load for the phase; the fault at `fault_at_s`; then count the phase's tasks."""
    load = asyncio.create_task(
        steady_load(p.stack.url, p.stack.keys, name, texts, model=model, op=op, rate=rate, chunk=chunk)
    )
    await asyncio.sleep(fault_at_s)
    info = await fault(p)
    submission = await load
    counts, waited = await count(p.redis, p.stack.keys, name, submission, answer_timeout_s)
    crashed = sorted(n for n, s in p.stack.services.items() if not s.alive() and n not in p.stopped)
    result = {**counts, **info, "drain_s": round(waited, 2), "crashed": crashed}
    note(f"{name}: " + json.dumps(result))
    return result


# 4. Scenarios ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    rate: float
    seconds: float
    chunk: int

    def count(self) -> int:
        return int(self.rate * self.seconds)


NOOP_SIZE = {True: Size(rate=150, seconds=4, chunk=5), False: Size(rate=400, seconds=10, chunk=10)}
MINILM_SIZE = {True: Size(rate=24, seconds=6, chunk=8), False: Size(rate=40, seconds=12, chunk=10)}


async def _with_stack(stack: ChaosStack, body: Callable[[Phase], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    await asyncio.to_thread(stack.start_redis)
    redis = connect(stack.url, client_name="chaos-observer")
    try:
        return await body(Phase(stack, redis, []))
    finally:
        await redis.aclose()
        await asyncio.to_thread(stack.stop)


async def noop_faults(
    work_dir: Path, quick: bool, topology: str = SINGLE, *, redis_faults: RedisFaults = "all"
) -> dict[str, Any]:
    """Every fault but the MiniLM ones, one after another on one stack serving the `noop` model; on a
    cluster the master SIGKILL takes the place of the single-Redis restarts. `redis_faults`: "all",
    "durable" (only those through which Redis keeps every write it acknowledged: the graceful restart
    and the SIGKILLs under `appendfsync always`), or "none" (the process faults only)."""
    size = NOOP_SIZE[quick]
    # No queue bound in seconds of work: the victims' slow fake device and the instant one of their
    # peers publish one cost for the same model, which the bound reads as every worker's.
    settings = {"CLAIM_IDLE_MS": str(CLAIM_IDLE_MS), "HEARTBEAT_S": "0.5", "INTERVAL_S": "1", "GRACE_S": str(GRACE_S),
                "BATCH_MAX_WAIT_MS": "200", "BATCH_MAX_QUEUE_S": "0", "REALTIME_MAX_QUEUE_S": "0"}  # fmt: skip
    stack = ChaosStack(work_dir, serve_models="noop", models_json=NOOP_MODELS, settings=settings, topology=topology)
    texts = [f"task number {i} of the steady load" for i in range(size.count())]
    # The victims' no-op model takes 200 ms a batch of at most 8, one batch at a time: what they read
    # waits in them (queued, not started), so the SIGKILL leaves work for peers and the SIGTERM has
    # queued tasks to hand back. (An instant no-op runs what it reads at once: nothing would wait.)
    slow = {
        "MODELS_JSON": json.dumps({"noop": {"kind": "noop", "delay_ms": 200}}),
        "BATCH_MAX_BATCH": "8",
        "RT_MAX_BATCH": "8",
        "MAX_INFLIGHT_BATCHES": "1",
        "PREFETCH": "32",  # a few batches' worth, not the whole load
    }

    async def body(p: Phase) -> dict[str, Any]:
        p.queues = [stack.keys.queue("noop", c) for c in ("realtime", "batch")]
        for name, kind in (("d0", "dispatcher"), ("w2", "worker"), ("m0", "monitor")):
            stack.start_service(name, kind)
        for victim in ("w0", "w1"):
            stack.start_service(victim, "worker", slow)
        await stack.wait_ready(["d0", "w0", "w1", "w2", "m0"], p.redis)
        note("noop stack ready")
        store_faults: list[tuple[str, Fault]] = [
            ("redis_restart_aof_everysec", restart_redis),
            ("redis_sigkill_aof_everysec", kill_redis("everysec")),
            ("redis_sigkill_aof_always", kill_redis("always")),
        ]
        if topology == CLUSTER:
            store_faults = [
                ("cluster_master_sigkill_aof_everysec", kill_cluster_master("everysec")),
                ("cluster_master_sigkill_aof_always", kill_cluster_master("always")),
            ]
        if redis_faults == "durable":
            store_faults = [(n, f) for n, f in store_faults if n not in EVERYSEC_SIGKILLS]
        elif redis_faults == "none":
            store_faults = []
        faults: list[tuple[str, Fault]] = [
            ("worker_sigkill", kill_worker("w0", restart=False)),
            ("worker_sigterm", term_worker("w1")),
            ("dispatcher_sigkill", kill_dispatcher),
            *store_faults,
            ("monitor_stop", stop_monitor),
        ]
        out: dict[str, Any] = {}
        for name, fault in faults:
            out[name] = await run_phase(
                p, name, fault, texts, model="noop", op="noop", rate=size.rate, chunk=size.chunk,
                fault_at_s=size.seconds / 3,
            )  # fmt: skip
        return out

    return await _with_stack(stack, body)


async def minilm_faults(work_dir: Path, quick: bool, topology: str = SINGLE) -> dict[str, Any]:
    """The real model: SIGKILL a worker mid-batch (it restarts under its name), then at once SIGTERM
    the other with a batch in flight: what it hands back waits in Redis for the restarted one."""
    size = MINILM_SIZE[quick]
    settings = {"CLAIM_IDLE_MS": str(CLAIM_IDLE_MS), "HEARTBEAT_S": "0.5", "INTERVAL_S": "1", "GRACE_S": str(GRACE_S),
                "THREADS": "1"}  # fmt: skip
    stack = ChaosStack(work_dir, serve_models="minilm", models_json=None, settings=settings, topology=topology)

    async def body(p: Phase) -> dict[str, Any]:
        p.queues = [stack.keys.queue("minilm", c) for c in ("realtime", "batch")]
        for name, kind in (("d0", "dispatcher"), ("w0", "worker"), ("w1", "worker")):
            stack.start_service(name, kind)
        await stack.wait_ready(["d0", "w0", "w1"], p.redis)
        note("minilm stack ready")
        half = size.chunk // 2

        async def phase(name: str, fault: Fault, seed: int) -> dict[str, Any]:
            texts = sentences(size.count(), seed=seed)
            return await run_phase(
                p, name, fault, texts, model="minilm", op="embed", rate=size.rate, chunk=size.chunk,
                fault_at_s=size.seconds / 3,
            )  # fmt: skip

        out: dict[str, Any] = {}
        name = "minilm_worker_sigkill_mid_batch"
        out[name] = await phase(name, kill_worker("w0", restart=True, at_least=half), seed=0)
        name = "minilm_worker_sigterm_in_flight"
        out[name] = await phase(name, term_worker("w1", at_least=half), seed=1)
        return out

    return await _with_stack(stack, body)


def run(quick: bool, topology: str | None = None) -> dict[str, Any]:
    """Both scenarios; per-fault counts go to stderr as they come and into the returned JSON.

    `topology` (default: env `ECTRANS_BENCH_REDIS`, else `single`) is `single` or `cluster` (a local
    3-master Redis Cluster); the JSON names it only for a cluster, so the single-Redis JSON is as before."""
    topology = topology or os.environ.get("ECTRANS_BENCH_REDIS", SINGLE)
    if topology not in (SINGLE, CLUSTER):
        raise ValueError(f"ECTRANS_BENCH_REDIS={topology!r}: {SINGLE} or {CLUSTER}")
    work_dir = Path(tempfile.mkdtemp(prefix="ectrans-chaos-"))
    started = time.monotonic()
    try:
        faults = asyncio.run(noop_faults(work_dir / "noop", quick, topology))
        faults |= asyncio.run(minilm_faults(work_dir / "minilm", quick, topology))
    except BaseException:
        note(f"logs kept in {work_dir}")
        raise
    shutil.rmtree(work_dir, ignore_errors=True)
    judged = {name: f for name, f in faults.items() if name not in EVERYSEC_SIGKILLS}
    clean = all(f["duplicates"] == 0 and f["lost"] == 0 and not f["crashed"] for f in judged.values())
    topology_field = {"topology": topology} if topology == CLUSTER else {}
    return {
        "scenario": "chaos",
        **topology_field,
        "quick": quick,
        "claim_idle_ms": CLAIM_IDLE_MS,
        "grace_s": GRACE_S,
        "faults": faults,
        "no_duplicates_no_loss": clean,
        "everysec_sigkill_lost": {name: faults[name]["lost"] for name in EVERYSEC_SIGKILLS if name in faults},
        "seconds": round(time.monotonic() - started, 1),
    }
