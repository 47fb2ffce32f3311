"""Heartbeats: a hash per service instance with a TTL; a missing key means a gone instance.

A clean stop writes a `kind=stopped` entry to the metrics stream, then deletes the key, so that the
monitor can tell a stop from a death (whose key just expires)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import psutil
from redis.exceptions import RedisError

from ectrans.common.keys import Keys
from ectrans.common.lifecycle import wait_or_timeout
from ectrans.common.outage import Outage
from ectrans.common.presence import announce, withdraw
from ectrans.common.redis_conn import RedisClient, same_slot_pipeline

METRICS_MAXLEN = 10_000  # entries kept in the metrics stream (the monitor reads far faster)


def host_name() -> str:
    return os.environ.get("ECTRANS_HOST") or socket.gethostname()


def default_instance(index: int = 0) -> str:
    """Stable per host and slot, so a restarted process takes back its own pending entries."""
    return f"{host_name()}-{index}"


def process_memory(pid: int | None = None) -> dict[str, int]:
    """RSS, and PSS/USS where the kernel gives them (shared pages counted fairly)."""
    proc = psutil.Process(pid)
    try:
        full = proc.memory_full_info()
        return {"rss": full.rss, "pss": getattr(full, "pss", full.rss), "uss": getattr(full, "uss", full.rss)}
    except (psutil.AccessDenied, psutil.ZombieProcess):
        rss = proc.memory_info().rss
        return {"rss": rss, "pss": rss, "uss": rss}


class Heartbeat:
    """Refreshes `hb:<service>:<instance>` every `interval_s`, expiring after `ttl_s`."""

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        service: str,
        instance: str,
        *,
        interval_s: float = 2.0,
        extra: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.key = keys.heartbeat(service, instance)
        self.interval_s = interval_s
        self.ttl_ms = int(max(3 * interval_s, 1.0) * 1000)
        self.extra = extra
        self.started = time.time()
        self.static = {
            "service": service,
            "instance": instance,
            "host": host_name(),
            "pid": os.getpid(),
            "interval_s": interval_s,  # lets the monitor judge staleness per instance
        }

    async def beat(self) -> None:
        fields: dict[str, Any] = {
            **self.static,
            "started": f"{self.started:.3f}",
            "updated": f"{time.time():.3f}",
        }
        fields.update({f"mem_{k}": v for k, v in process_memory().items()})
        if self.extra is not None:
            fields.update(self.extra())
        pipe = same_slot_pipeline(self.redis)
        pipe.hset(self.key, mapping={k: str(v) for k, v in fields.items()})
        pipe.pexpire(self.key, self.ttl_ms)
        await pipe.execute()
        await announce(self.redis, self.keys, self.key, self.ttl_ms)  # the index the dispatcher reads

    async def run(self, stop: asyncio.Event) -> None:
        # The interval is the pause between tries: an outage is logged when lost and when back.
        outage = Outage("heartbeat", first_pause_s=0.0, max_pause_s=0.0, error_pause_s=0.0)
        while not stop.is_set():
            await outage.attempt(self.beat)
            await wait_or_timeout(stop, self.interval_s)
        with contextlib.suppress(RedisError):
            await self.stopped()

    async def stopped(self) -> None:
        """A clean stop is not a stale instance: the monitor hears why before the key goes (two steps
        in this order, as the two keys may live on different cluster nodes)."""
        event = {"kind": "stopped", **{k: str(self.static[k]) for k in ("service", "instance", "host", "pid")}}
        await self.redis.xadd(self.keys.metrics, event, maxlen=METRICS_MAXLEN, approximate=True)  # type: ignore[arg-type]
        await withdraw(self.redis, self.keys, self.key)
        await self.redis.delete(self.key)
