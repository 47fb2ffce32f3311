"""Lua scripts run many per round trip, on a single Redis and on a Redis Cluster alike.

`Lua.run_many` pipelines EVALSHA calls (each routed to its first key's slot on a cluster, where
redis-py's own `Script` cannot be pipelined) and repeats with EVAL only those a node did not know
yet (a fresh node, a restart, a failover), which also caches them there. Every script here is
atomic on its own, so a NOSCRIPT answer means that call did nothing and is safe to repeat.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

from ectrans.common.redis_conn import RedisClient

Arg = str | bytes | int | float


class Lua:
    """One script, by source and SHA1."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def run_many(self, redis: RedisClient, calls: Sequence[tuple[Sequence[str], Sequence[Arg]]]) -> list[Any]:
        """Run the script once per (keys, args), in one round trip when the nodes know it."""
        if not calls:
            return []
        replies = await self._pipeline(redis, calls, range(len(calls)), "EVALSHA", self.sha)
        unknown = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if unknown:
            for i, reply in zip(unknown, await self._pipeline(redis, calls, unknown, "EVAL", self.source), strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise reply
        return replies

    @staticmethod
    async def _pipeline(
        redis: RedisClient,
        calls: Sequence[tuple[Sequence[str], Sequence[Arg]]],
        indices: Sequence[int],
        command: str,
        body: str,
    ) -> list[Any]:
        pipe = redis.pipeline(transaction=False)
        for i in indices:
            keys, args = calls[i]
            pipe.execute_command(command, body, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))
