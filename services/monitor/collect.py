"""Reading the node's state from Redis (queues, heartbeats) and the devices (NVML)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from ectrans.common.keys import DISPATCHER_GROUP, TASK_CLASSES, WORKER_GROUP, Keys

logger = logging.getLogger(__name__)


@dataclass
class StreamState:
    length: int
    pending: int
    oldest_pending_ms: int | None = None


@dataclass
class Instance:
    service: str
    instance: str
    host: str
    pid: int
    age_s: float  # seconds since its last heartbeat
    uptime_s: float
    memory: dict[str, int] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)


@dataclass
class DeviceState:
    index: int
    name: str
    used_bytes: int
    total_bytes: int
    utilisation: int
    processes: dict[int, int] = field(default_factory=dict)  # pid → used bytes


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def stream_states(redis: aioredis.Redis, keys: Keys, models: list[str]) -> dict[str, StreamState]:
    streams = {keys.tasks: DISPATCHER_GROUP}
    for model in models:
        for task_class in TASK_CLASSES:
            streams[keys.queue(model, task_class)] = WORKER_GROUP
    pipe = redis.pipeline(transaction=False)
    for stream, group in streams.items():
        pipe.xlen(stream)
        pipe.xpending_range(stream, group, min="-", max="+", count=1)
        pipe.xpending(stream, group)
    replies = await pipe.execute(raise_on_error=False)
    now_ms = int(time.time() * 1000)
    states = {}
    for i, stream in enumerate(streams):
        length, oldest, summary = replies[3 * i : 3 * i + 3]
        pending = summary.get("pending", 0) if isinstance(summary, dict) else 0
        oldest_ms = None
        if isinstance(oldest, list) and oldest:
            oldest_ms = max(0, now_ms - int(_s(oldest[0]["message_id"]).split("-")[0]))
        states[stream] = StreamState(length if isinstance(length, int) else 0, int(pending), oldest_ms)
    return states


async def instances(redis: aioredis.Redis, keys: Keys) -> list[Instance]:
    names = [k async for k in redis.scan_iter(match=keys.heartbeat_pattern, count=500)]
    if not names:
        return []
    pipe = redis.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(name)
    now = time.time()
    found = []
    for raw in await pipe.execute():
        f = {_s(k): _s(v) for k, v in raw.items()}
        if "service" not in f:
            continue
        memory = {k[4:]: int(v) for k, v in f.items() if k.startswith("mem_") and v.isdigit()}
        found.append(
            Instance(
                service=f["service"],
                instance=f.get("instance", "?"),
                host=f.get("host", "?"),
                pid=int(f.get("pid", 0)),
                age_s=now - float(f.get("updated", now)),
                uptime_s=now - float(f.get("started", now)),
                memory=memory,
                fields=f,
            )
        )
    return sorted(found, key=lambda i: (i.service, i.instance))


class Nvml:
    """GPU readings through nvidia-ml-py; `available` is False on hosts without an NVIDIA driver."""

    def __init__(self) -> None:
        self.available = False
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml: Any = pynvml
            self.available = True
        except Exception as exc:  # no driver, no library: CPU host
            logger.debug("NVML unavailable: %s", exc)

    def devices(self) -> list[DeviceState]:
        if not self.available:
            return []
        nv = self._nvml
        states = []
        for index in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            memory = nv.nvmlDeviceGetMemoryInfo(handle)
            util = nv.nvmlDeviceGetUtilizationRates(handle)
            procs = {}
            try:
                for proc in nv.nvmlDeviceGetComputeRunningProcesses(handle):
                    procs[int(proc.pid)] = int(proc.usedGpuMemory or 0)
            except nv.NVMLError:
                pass  # per-process figures need permissions some containers lack
            name = nv.nvmlDeviceGetName(handle)
            states.append(DeviceState(index, _s(name), int(memory.used), int(memory.total), int(util.gpu), procs))
        return states
