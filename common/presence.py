"""Who is alive, without SCAN: heartbeat keys indexed in one sorted set scored by their expiry.

A SCAN for `hb:*` walks every key of the database (millions of result hashes on a busy node, on
every shard of a cluster); the index answers with one ZRANGEBYSCORE plus one HGETALL per instance.
Heartbeat keys stay the truth (they expire by themselves); the index only says where to look.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ectrans.common.keys import Keys
from ectrans.common.redis_conn import RedisClient

FORGET_AFTER_MS = 60_000  # index members this long past their expiry are removed


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Presence:
    """One live instance as its heartbeat describes it."""

    service: str
    instance: str
    host: str
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        """Models a worker serves (from its heartbeat's `models` field)."""
        return [m for m in self.fields.get("models", "").split(",") if m]


async def announce(redis: RedisClient, keys: Keys, heartbeat_key: str, ttl_ms: int) -> None:
    """Index a heartbeat key until its expiry (call after each beat)."""
    expires = int(time.time() * 1000) + ttl_ms
    await redis.zadd(keys.live, {heartbeat_key: expires})


async def withdraw(redis: RedisClient, keys: Keys, heartbeat_key: str) -> None:
    await redis.zrem(keys.live, heartbeat_key)


async def live(redis: RedisClient, keys: Keys, service: str | None = None) -> list[Presence]:
    """Instances whose heartbeat is indexed as unexpired and still exists, optionally of one service."""
    now = int(time.time() * 1000)
    names = [_text(n) for n in await redis.zrangebyscore(keys.live, now, "+inf")]
    if service is not None:
        names = [n for n in names if n.startswith(keys.heartbeat(service, ""))]
    pipe = redis.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(name)
    pipe.zremrangebyscore(keys.live, "-inf", now - FORGET_AFTER_MS)
    replies = await pipe.execute()
    found = []
    for raw in replies[:-1]:
        fields = {_text(k): _text(v) for k, v in raw.items()}
        if "service" in fields:
            found.append(Presence(fields["service"], fields.get("instance", "?"), fields.get("host", "?"), fields))
    return found
