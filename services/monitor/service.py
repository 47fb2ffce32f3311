"""The monitor service: every interval, one readable line, warning lines when something is wrong,
the same figures in `HGETALL ectrans:stats` (and JSON lines when asked), and `/metrics` always current.

Each interval it (1) reads the metrics and dead-letter streams until the interval ends, folding
every entry into the interval's window, the running totals and the Prometheus counters; then (2)
reads heartbeats, streams and devices; (3) judges instances and what is wrong; (4) publishes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from ectrans.common.heartbeat import Heartbeat, default_instance, host_name
from ectrans.common.outage import Outage
from ectrans.common.redis_conn import BLOCK_MS, RedisClient, connect, same_slot_pipeline
from ectrans.services.monitor import alerts
from ectrans.services.monitor.collect import (
    Beat,
    DeviceState,
    Nvml,
    heartbeats,
    host_device,
    stream_states,
    text,
    watched_streams,
)
from ectrans.services.monitor.instances import Tracker
from ectrans.services.monitor.jsonlog import JsonLines
from ectrans.services.monitor.ownership import may_write
from ectrans.services.monitor.prometheus import Exporter
from ectrans.services.monitor.quiet import LineGate
from ectrans.services.monitor.report import Snapshot, build_report, flatten, report_line
from ectrans.services.monitor.settings import MonitorSettings
from ectrans.services.monitor.stats import Stopped, TaskEntry, Totals, Window, parse_dead_letter, parse_metrics

logger = logging.getLogger(__name__)

READ_COUNT = 1000


class Monitor:
    name = "monitor"

    def __init__(self, settings: MonitorSettings, models: list[str], redis: RedisClient | None = None) -> None:
        self.settings = settings
        self.keys = settings.keys
        self.models = set(models)  # served models: label values and queues to watch
        self.instance = settings.instance or default_instance()
        self.host = host_name()
        self._own_redis = redis is None
        self.redis = redis or connect(settings.redis_url, client_name=f"ectrans-monitor-{self.instance}")
        self.heartbeat = Heartbeat(self.redis, self.keys, self.name, self.instance, interval_s=settings.heartbeat_s)
        self.nvml = Nvml()
        self.tracker = Tracker(settings.heartbeat_s, settings.stale_beats, settings.forget_after_s)
        self.totals = Totals()
        self.exporter = Exporter(self.host)
        self.metrics_port: int | None = None  # the bound port once serving
        self.json_lines = JsonLines(settings.monitor_json) if settings.monitor_json else None
        self.last: Snapshot | None = None
        self.line_gate = LineGate(settings.idle_log_s)
        self.ready = asyncio.Event()  # set once the stream cursors are placed: later entries all count
        self._stopping = asyncio.Event()
        self._cursors: dict[str, str] = {}
        self._writes_stats: bool | None = None  # whether the last interval wrote the stats hash

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        self._serve_metrics()
        if self.settings.stale_after_s >= self.settings.interval_s:
            logger.warning(
                "[start] heartbeats go stale after %.1fs, longer than the %.1fs interval: a dead instance "
                "shows up one or more lines late",
                self.settings.stale_after_s,
                self.settings.interval_s,
            )
        logger.info(
            "[start] monitor %s, a line every %gs while busy (on change, at least every %gs, while idle)",
            self.instance,
            self.settings.interval_s,
            self.settings.idle_log_s,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.heartbeat.run(self._stopping))
                tg.create_task(self._loop())
        finally:
            self.exporter.close()
            self.nvml.close()
            if self.json_lines is not None:
                self.json_lines.close()
            if self._own_redis:
                await self.redis.aclose()
        logger.info("[shutdown] monitor %s stopped", self.instance)

    def _serve_metrics(self) -> None:
        if not self.settings.metrics_port:
            return
        try:
            self.metrics_port = self.exporter.serve(self.settings.metrics_port, self.settings.metrics_host)
            logger.info(
                "[start] Prometheus metrics on http://%s:%d/metrics", self.settings.metrics_host, self.metrics_port
            )
        except OSError as exc:  # the line and the stats hash are still worth having
            logger.error("[start] cannot serve /metrics on port %d: %s", self.settings.metrics_port, exc)

    async def _loop(self) -> None:
        outage = Outage("monitor", first_pause_s=0.5, max_pause_s=1.5, error_pause_s=1.0)
        while not self._stopping.is_set():
            await outage.attempt(self._interval)

    async def step(self) -> Snapshot:
        """One interval without waiting for it: what the streams hold now is folded in, the node's
        state read, the line logged (if due) and the figures published; the snapshot is returned.
        The first step places the cursors after what is already there. Tests drive the monitor's
        logic with it, no `run()` or interval needed."""
        started = time.monotonic()
        window = Window()
        if not self.ready.is_set():
            await self._place_cursors()
        snap = await self.snapshot(window, time.monotonic() - started)  # it reads what the streams hold
        await self.publish(snap)
        return snap

    async def _interval(self) -> None:
        started = time.monotonic()
        window = Window()
        if not self.ready.is_set():
            await self._place_cursors()
        await self._read(window, until=started + self.settings.interval_s)
        if self._stopping.is_set():
            return
        await self.publish(await self.snapshot(window, time.monotonic() - started))

    # 1. Reading the streams -------------------------------------------------------------------

    async def _place_cursors(self) -> None:
        """Start after the newest entry of each stream: what comes later is counted, once."""
        for stream in (self.keys.metrics, self.keys.dead_letters):
            newest: Any = await self.redis.xrevrange(stream, count=1)
            self._cursors[stream] = text(newest[0][0]) if newest else "0-0"
        self.ready.set()

    async def _read(self, window: Window, until: float) -> None:
        """Fold entries into `window` until `until` (monotonic) or a stop."""
        while not self._stopping.is_set():
            remaining_ms = int((until - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                return
            got = await self._read_once(window, block_ms=min(remaining_ms, BLOCK_MS))
            if got == READ_COUNT:
                await asyncio.sleep(0)  # a backlog: keep reading without starving the loop

    async def _read_once(self, window: Window, block_ms: int | None) -> int:
        """One read of the metrics stream (blocking up to `block_ms`), then of the dead letters (not
        blocking): two calls, as the two streams may live on different cluster nodes."""
        got = 0
        for stream, block in ((self.keys.metrics, block_ms), (self.keys.dead_letters, None)):
            reply: Any = await self.redis.xread({stream: self._cursors[stream]}, count=READ_COUNT, block=block)
            for _, entries in reply or []:
                for entry_id, raw in entries:
                    self._cursors[stream] = text(entry_id)
                    self._fold(window, self._parse(stream, {text(k): text(v) for k, v in raw.items()}))
                got = max(got, len(entries))
        return got

    def _parse(self, stream: str, fields: dict[str, str]) -> TaskEntry | Stopped | None:
        if stream == self.keys.dead_letters:
            return parse_dead_letter(fields, self.models)
        return parse_metrics(fields, self.models)

    def _fold(self, window: Window, entry: TaskEntry | Stopped | None) -> None:
        if isinstance(entry, Stopped):
            self.tracker.stopped(entry)
        elif entry is not None:
            window.add(entry)
            self.totals.add(entry)
            self.exporter.add(entry)

    # 2. The node's state ----------------------------------------------------------------------

    async def snapshot(self, window: Window, elapsed_s: float) -> Snapshot:
        beats = await heartbeats(self.redis, self.keys)
        # A clean stop deletes its key and writes its event atomically: read events that raced the scan.
        while await self._read_once(window, block_ms=None) == READ_COUNT:
            pass
        self.models |= served_models(beats)
        streams = await stream_states(self.redis, watched_streams(self.keys, sorted(self.models)))
        dead_letters = int(await self.redis.xlen(self.keys.dead_letters))
        now = time.time()
        changes = self.tracker.update(beats, now)
        snap = Snapshot(
            at=now,
            elapsed_s=elapsed_s,
            monitor=self.instance,
            window=window,
            totals=self.totals.copy(),
            streams=streams,
            dead_letters=dead_letters,
            instances=self.tracker.instances(),
            devices=with_weights([host_device(), *self.nvml.devices()], beats),
        )
        snap.warnings = alerts.warnings(snap, self.last, changes, self.settings)
        return snap

    # 3. Publishing ----------------------------------------------------------------------------

    async def publish(self, snap: Snapshot) -> None:
        if self.line_gate.should_log(snap, time.monotonic()):
            logger.info("%s", report_line(snap))
        for warning in snap.warnings:
            logger.warning("[health] %s", warning)
        self.exporter.update(snap)
        report = build_report(snap, self.host, self.last)
        if self.json_lines is not None:
            self.json_lines.write(report)
        if await self._own_stats(snap.at):
            pipe = same_slot_pipeline(self.redis)  # readers never see a half-written hash (one key)
            pipe.delete(self.keys.stats)
            pipe.hset(self.keys.stats, mapping=flatten(report))  # type: ignore[arg-type]
            await pipe.execute()
        self.last = snap

    async def _own_stats(self, now: float) -> bool:
        """Whether this monitor writes the stats hash now (see `ownership`); a change is logged once."""
        current: dict[Any, Any] = await self.redis.hgetall(self.keys.stats)
        writes = may_write(current, self.instance, now, self.settings.interval_s)
        if writes != self._writes_stats and not (writes and self._writes_stats is None):
            if writes:
                logger.info("[stats] monitor %s writes %s now", self.instance, self.keys.stats)
            else:
                owner = current.get(b"monitor", b"?").decode(errors="replace")
                logger.info(
                    "[stats] %s is written by monitor %s; this one logs and serves /metrics", self.keys.stats, owner
                )
        self._writes_stats = writes
        return writes


def served_models(beats: list[Beat]) -> set[str]:
    """Models that live workers say they serve (a worker may be configured apart from the monitor)."""
    return {m for b in beats if b.service == "worker" for m in b.fields.get("models", "").split(",") if m}


def with_weights(devices: list[DeviceState], beats: list[Beat]) -> list[DeviceState]:
    """Attach to their device the shared weights each worker's pools hold (the `weights` detail of
    its heartbeat, one entry per pool and so one copy per holder). A pool on `cuda` runs on the
    current device, cuda:0."""
    by_name = {d.device: d for d in devices}
    for beat in beats:
        if beat.service != "worker":
            continue
        try:
            pools = json.loads(beat.fields.get("weights", "[]"))
        except ValueError:
            continue
        for pool in pools if isinstance(pools, list) else []:
            if not isinstance(pool, dict) or not pool.get("shared") or not pool.get("weights_bytes"):
                continue
            name = str(pool.get("device", "cpu"))
            device = by_name.get("cuda:0" if name == "cuda" else name)
            if device is not None:
                device.weights_bytes = (device.weights_bytes or 0) + int(pool["weights_bytes"])
    return devices
