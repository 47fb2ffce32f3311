"""Reading the node's state: streams (XLEN, XINFO GROUPS, XPENDING), heartbeats, devices (NVML, host)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from ectrans.common import presence
from ectrans.common.keys import DISPATCHER_GROUP, TASK_CLASSES, WORKER_GROUP, Keys
from ectrans.common.redis_conn import RedisClient

logger = logging.getLogger(__name__)


@dataclass
class StreamState:
    length: int
    pending: int  # delivered to a consumer, not yet acknowledged
    lag: int  # not yet delivered to the group
    consumers: int = 0
    oldest_pending_s: float | None = None  # age of the oldest pending entry, from its ID


@dataclass
class Beat:
    """One heartbeat hash as read from Redis."""

    service: str
    instance: str
    host: str
    pid: int
    started: float
    updated: float
    interval_s: float | None
    memory: dict[str, int] = field(default_factory=dict)  # rss, pss, uss
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.service, self.instance)

    def age_s(self, now: float) -> float:
        return max(0.0, now - self.updated)


@dataclass
class DeviceState:
    """A device of the node: `cuda:N` from NVML, or `cpu` (the host) from /proc."""

    device: str
    name: str
    used_bytes: int
    total_bytes: int
    utilisation_pct: float
    processes: dict[int, int] = field(default_factory=dict)  # pid → device memory it holds
    weights_bytes: int | None = None  # the shared weights, counted once (reported by a weight holder)


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def watched_streams(keys: Keys, models: list[str]) -> dict[str, str]:
    """stream → the consumer group that reads it."""
    streams = {keys.tasks: DISPATCHER_GROUP}
    for model in models:
        for task_class in TASK_CLASSES:
            streams[keys.queue(model, task_class)] = WORKER_GROUP
    return streams


def _group_figures(groups: Any, group: str, length: int) -> tuple[int, int, int]:
    """(pending, lag, consumers) of `group` from an XINFO GROUPS reply."""
    if not isinstance(groups, list):
        return 0, length, 0
    for info in groups:
        if text(info.get("name", "")) == group:
            pending = int(info.get("pending") or 0)
            lag = info.get("lag")  # Redis >= 7; nil there when deletions make it unknowable
            if not isinstance(lag, int):
                # ECTrans deletes every entry it acknowledges, so what is in the stream and not
                # pending has not been delivered yet (exact on 6.2 too).
                lag = max(0, length - pending)
            return pending, lag, int(info.get("consumers") or 0)
    return 0, length, 0


async def stream_states(redis: RedisClient, streams: dict[str, str]) -> dict[str, StreamState]:
    pipe = redis.pipeline(transaction=False)
    for stream, group in streams.items():
        pipe.xlen(stream)
        pipe.xinfo_groups(stream)
        pipe.xpending_range(stream, group, min="-", max="+", count=1)
    replies = await pipe.execute(raise_on_error=False)
    now_ms = time.time() * 1000
    states = {}
    for i, (stream, group) in enumerate(streams.items()):
        raw_length, groups, oldest = replies[3 * i : 3 * i + 3]
        length = raw_length if isinstance(raw_length, int) else 0
        pending, lag, consumers = _group_figures(groups, group, length)
        oldest_s = None
        if isinstance(oldest, list) and oldest:
            oldest_s = max(0.0, now_ms - int(text(oldest[0]["message_id"]).split("-")[0])) / 1000
        states[stream] = StreamState(length, pending, lag, consumers, oldest_s)
    return states


def _beat(f: dict[str, str]) -> Beat | None:
    try:
        return Beat(
            service=f["service"],
            instance=f.get("instance", "?"),
            host=f.get("host", "?"),
            pid=int(f.get("pid", 0)),
            started=float(f["started"]),
            updated=float(f["updated"]),
            interval_s=float(f["interval_s"]) if "interval_s" in f else None,
            memory={k[4:]: int(v) for k, v in f.items() if k.startswith("mem_") and v.isdigit()},
            fields=f,
        )
    except (KeyError, ValueError):
        return None  # not a heartbeat ECTrans wrote


async def heartbeats(redis: RedisClient, keys: Keys) -> list[Beat]:
    """Every heartbeat key that still exists (stale ones too), found through the presence index."""
    beats = [_beat(p.fields) for p in await presence.live(redis, keys)]
    return sorted((b for b in beats if b is not None), key=lambda b: b.key)


def host_device() -> DeviceState:
    """The host as the `cpu` device: memory in use (total less available) and CPU utilisation."""
    memory = psutil.virtual_memory()
    busy = psutil.cpu_percent(interval=None)  # since the previous call (the previous interval)
    return DeviceState("cpu", "host", int(memory.total - memory.available), int(memory.total), float(busy))


class Nvml:
    """GPU readings through nvidia-ml-py; `available` is False on hosts without an NVIDIA driver."""

    def __init__(self) -> None:
        self.available = False
        self._unreadable: set[int] = set()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml: Any = pynvml
            self.available = True
        except Exception as exc:  # no driver, no library: a CPU host
            logger.debug("NVML unavailable: %s", exc)

    def devices(self) -> list[DeviceState]:
        """Every GPU NVML can read; one it cannot (a MIG parent, a GPU lost to a reset) is left out
        alone, with a warning the first time."""
        if not self.available:
            return []
        try:
            count = self._nvml.nvmlDeviceGetCount()
        except self._nvml.NVMLError as exc:  # a driver reset must not stop the monitor
            logger.warning("[nvml] cannot read the GPUs: %s", exc)
            return []
        found = []
        for index in range(count):
            try:
                found.append(self._device(index))
            except self._nvml.NVMLError as exc:
                if index not in self._unreadable:
                    self._unreadable.add(index)
                    logger.warning("[nvml] cannot read GPU %d: %s", index, exc)
        return found

    def _device(self, index: int) -> DeviceState:
        nv = self._nvml
        handle = nv.nvmlDeviceGetHandleByIndex(index)
        memory = nv.nvmlDeviceGetMemoryInfo(handle)
        try:
            busy = float(nv.nvmlDeviceGetUtilizationRates(handle).gpu)
        except nv.NVMLError:  # not supported with MIG enabled
            busy = 0.0
        procs = {}
        try:
            for proc in nv.nvmlDeviceGetComputeRunningProcesses(handle):
                procs[int(proc.pid)] = int(proc.usedGpuMemory or 0)
        except nv.NVMLError:
            pass  # per-process figures need permissions some containers lack
        name = text(nv.nvmlDeviceGetName(handle))
        return DeviceState(f"cuda:{index}", name, int(memory.used), int(memory.total), busy, procs)

    def close(self) -> None:
        if self.available:
            self.available = False
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as exc:
                logger.debug("nvmlShutdown: %s", exc)


def nvml_pids_are_ours(status: str | None = None) -> bool:
    """Whether NVML's process ids name processes of this pid namespace. NVML reports the host's
    pids; inside a container (its own pid namespace: more than one id on `NSpid` of
    /proc/self/status, or `status` for tests) they match nothing here."""
    if status is None:
        try:
            with open("/proc/self/status") as file:
                status = file.read()
        except OSError:
            return True
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            return len(line.split()) <= 2
    return True
