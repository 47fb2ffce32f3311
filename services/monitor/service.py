"""The monitor service: one readable line per interval, warnings when something is wrong,
and the same figures in `HGETALL ectrans:stats`."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from ectrans.common.heartbeat import Heartbeat, default_instance
from ectrans.common.keys import Keys
from ectrans.common.redis_conn import connect
from ectrans.services.monitor.collect import DeviceState, Instance, Nvml, StreamState, instances, stream_states
from ectrans.services.monitor.settings import MonitorSettings
from ectrans.services.monitor.stats import ClassWindow, Window

logger = logging.getLogger(__name__)
MiB = 1024 * 1024


@dataclass
class Snapshot:
    """What the monitor knows at the end of one interval."""

    at: float
    elapsed_s: float
    window: Window
    streams: dict[str, StreamState]
    instances: list[Instance]
    devices: list[DeviceState]
    dead_letters: int
    totals: dict[str, int] = field(default_factory=dict)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}ms"


def class_summary(name: str, w: ClassWindow, elapsed_s: float) -> str:
    rate = w.tasks / elapsed_s if elapsed_s > 0 else 0.0
    return f"{name} {rate:.1f}/s p50 {_ms(w.percentile(50))} p99 {_ms(w.percentile(99))}"


def report_line(snap: Snapshot, keys: Keys) -> str:
    """The compact line an operator reads in `docker compose logs -f monitor`."""
    classes = snap.window.by_class()
    parts = [class_summary(c, classes[c], snap.elapsed_s) for c in ("realtime", "batch", "fifo") if c in classes]
    if not parts:
        parts = ["idle"]
    errors = sum(sum(w.errors.values()) for w in classes.values())
    queued = sum(s.length for s in snap.streams.values())
    pending = sum(s.pending for s in snap.streams.values())
    workers = [i for i in snap.instances if i.service == "worker"]
    rss = sum(i.memory.get("pss", i.memory.get("rss", 0)) for i in workers)
    line = " | ".join(parts) + f" | errors {errors} | queued {queued} pending {pending}"
    line += f" | workers {len(workers)} mem {rss / MiB:.0f}MiB"
    for dev in snap.devices:
        line += f" | gpu{dev.index} {dev.used_bytes / MiB:.0f}/{dev.total_bytes / MiB:.0f}MiB {dev.utilisation}%"
    if snap.dead_letters:
        line += f" | dead {snap.dead_letters}"
    return line


def warnings(snap: Snapshot, previous: Snapshot | None, settings: MonitorSettings) -> list[str]:
    found = []
    stale_after = 3 * settings.heartbeat_s
    for inst in snap.instances:
        if inst.age_s > stale_after:
            found.append(f"{inst.service} {inst.instance} is stale: no heartbeat for {inst.age_s:.0f}s")
    if not any(i.service == "worker" for i in snap.instances):
        found.append("no live worker: queued tasks will wait")
    if previous is not None:
        for stream, state in snap.streams.items():
            before = previous.streams.get(stream)
            if before is not None and state.length > before.length and state.length >= 100:
                found.append(f"queue {stream} is growing: {before.length} → {state.length}")
        if snap.dead_letters > previous.dead_letters:
            found.append(
                f"{snap.dead_letters - previous.dead_letters} new dead letters in {settings.keys.dead_letters}"
            )
    for dev in snap.devices:
        if dev.total_bytes and dev.used_bytes / dev.total_bytes > settings.memory_warn_fraction:
            found.append(f"gpu{dev.index} memory at {100 * dev.used_bytes / dev.total_bytes:.0f}%")
    return found


def stats_fields(snap: Snapshot) -> dict[str, str]:
    """Flat figures for `HGETALL ectrans:stats` (no secrets: only counts and timings)."""
    out: dict[str, str] = {"updated": f"{snap.at:.3f}", "interval_s": f"{snap.elapsed_s:.2f}"}
    for name, w in snap.window.by_class().items():
        out[f"{name}.tasks_per_s"] = f"{w.tasks / snap.elapsed_s:.2f}" if snap.elapsed_s else "0"
        for q in (50, 95, 99):
            value = w.percentile(q)
            if value is not None:
                out[f"{name}.latency_p{q}_ms"] = f"{value:.1f}"
        out[f"{name}.errors"] = str(sum(w.errors.values()))
    for stream, state in snap.streams.items():
        out[f"stream.{stream}.length"] = str(state.length)
        out[f"stream.{stream}.pending"] = str(state.pending)
    for inst in snap.instances:
        prefix = f"{inst.service}.{inst.instance}"
        out[f"{prefix}.age_s"] = f"{inst.age_s:.1f}"
        for kind, value in inst.memory.items():
            out[f"{prefix}.mem_{kind}"] = str(value)
    for dev in snap.devices:
        out[f"gpu{dev.index}.used_bytes"] = str(dev.used_bytes)
        out[f"gpu{dev.index}.total_bytes"] = str(dev.total_bytes)
    out["dead_letters"] = str(snap.dead_letters)
    out.update({f"total.{k}": str(v) for k, v in snap.totals.items()})
    return out


class Monitor:
    name = "monitor"

    def __init__(self, settings: MonitorSettings, models: list[str], redis: aioredis.Redis | None = None) -> None:
        self.settings = settings
        self.keys = settings.keys
        self.models = models
        self.instance = settings.instance or default_instance()
        self._own_redis = redis is None
        self.redis = redis or connect(settings.redis_url, client_name=f"ectrans-monitor-{self.instance}")
        self.heartbeat = Heartbeat(self.redis, self.keys, self.name, self.instance, interval_s=settings.heartbeat_s)
        self.nvml = Nvml()
        self._stopping = asyncio.Event()
        self.last: Snapshot | None = None
        self.totals: dict[str, int] = {"tasks": 0, "errors": 0}
        self._cursor = "$"

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        logger.info("[start] monitor %s, a line every %.0fs", self.instance, self.settings.interval_s)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.heartbeat.run(self._stopping))
                tg.create_task(self._loop())
        finally:
            if self._own_redis:
                await self.redis.aclose()

    async def _loop(self) -> None:
        started = time.monotonic()
        window = Window()
        while not self._stopping.is_set():
            try:
                await self._read_metrics(window, until=started + self.settings.interval_s)
                if time.monotonic() < started + self.settings.interval_s:
                    continue
                snap = await self.snapshot(window, time.monotonic() - started)
                self.publish(snap)
                await self.redis.hset(self.keys.stats, mapping=stats_fields(snap))  # type: ignore[arg-type]
            except RedisConnectionError as exc:
                logger.warning("[redis] monitor cannot reach Redis: %s", exc)
                await asyncio.sleep(random.uniform(0.5, 1.5))
            except RedisError:
                logger.exception("[monitor] Redis refused a command")
                await asyncio.sleep(1.0)
            started, window = time.monotonic(), Window()

    async def _read_metrics(self, window: Window, until: float) -> None:
        """Fold metrics entries into `window` until the interval ends (or a stop)."""
        while not self._stopping.is_set():
            remaining_ms = int((until - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                return
            reply: Any = await self.redis.xread({self.keys.metrics: self._cursor}, count=1000, block=remaining_ms)
            for _, entries in reply or []:
                for entry_id, raw in entries:
                    self._cursor = entry_id.decode()
                    window.add({k.decode(): v.decode() for k, v in raw.items()})

    async def snapshot(self, window: Window, elapsed_s: float) -> Snapshot:
        classes = window.by_class()
        self.totals["tasks"] += sum(w.tasks for w in classes.values())
        self.totals["errors"] += sum(sum(w.errors.values()) for w in classes.values())
        return Snapshot(
            at=time.time(),
            elapsed_s=elapsed_s,
            window=window,
            streams=await stream_states(self.redis, self.keys, self.models),
            instances=await instances(self.redis, self.keys),
            devices=self.nvml.devices(),
            dead_letters=int(await self.redis.xlen(self.keys.dead_letters)),
            totals=dict(self.totals),
        )

    def publish(self, snap: Snapshot) -> None:
        logger.info("%s", report_line(snap, self.keys))
        for warning in warnings(snap, self.last, self.settings):
            logger.warning("[health] %s", warning)
        self.last = snap
