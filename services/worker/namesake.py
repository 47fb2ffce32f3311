"""Two workers under one instance name on one host (a second `python -m ectrans.services.worker`
without its own `ECTRANS_INSTANCE`) would share one consumer's pending list and one heartbeat key:
each takes the other's in-flight entries as its own on start, and the monitor reports a restart
every interval. A worker checks at start, before it loads its models, and refuses to run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from ectrans.common.heartbeat import host_name
from ectrans.common.keys import Keys
from ectrans.common.redis_conn import RedisClient

WORKER_MODULE = b"ectrans.services.worker"


class NameTaken(Exception):
    """Another live worker on this host runs under this worker's instance name."""


async def live_namesake(redis: RedisClient, keys: Keys, instance: str) -> int | None:
    """The pid of another worker process alive on this host whose heartbeat names `instance`. A
    heartbeat left by a process that died (a restart under its own name) is no namesake; nor is one
    that cannot be read (Redis not there yet: the start waits for it later)."""
    try:
        beat: dict[Any, Any] = await redis.hgetall(keys.heartbeat("worker", instance))
    except RedisError:
        return None
    try:
        host, pid = beat[b"host"].decode(), int(beat[b"pid"])
    except (KeyError, ValueError, UnicodeDecodeError):
        return None
    if host != host_name() or pid == os.getpid() or not _runs_a_worker(pid):
        return None
    return pid


def _runs_a_worker(pid: int) -> bool:
    """Whether `pid` is a worker process (not another process that got the pid of a dead one)."""
    try:
        return WORKER_MODULE in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
