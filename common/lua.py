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

from redis.exceptions import NoScriptError

from ectrans.common.redis_conn import RedisClient

Arg = str | bytes | int | float

# Lua helpers for scripts that acknowledge many entries at once (prepend them to a script body).
# `unpack` is bounded by Lua's C stack (LUAI_MAXCSTACK, 8000 in Redis), hence the chunks.
ACK_LUA = """
local function del_all(stream, ids)
  for i = 1, #ids, 1000 do
    redis.call('XDEL', stream, unpack(ids, i, math.min(i + 999, #ids)))
  end
end
local function ack_all(stream, group, ids)
  for i = 1, #ids, 1000 do
    redis.call('XACK', stream, group, unpack(ids, i, math.min(i + 999, #ids)))
  end
  del_all(stream, ids)
end
"""


class KeyIndex:
    """The KEYS of one script call, each listed once; `index(key)` is its 1-based position (KEYS[i] in
    Lua), so a packed argument can name keys by number and a shared stream is declared only once."""

    def __init__(self, *fixed: str) -> None:
        self.keys: list[str] = []
        self._positions: dict[str, int] = {}
        for key in fixed:
            self.index(key)

    def index(self, key: str) -> int:
        position = self._positions.get(key)
        if position is None:
            self.keys.append(key)
            position = self._positions[key] = len(self.keys)
        return position


class Lua:
    """One script, by source and SHA1."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def run_many(self, redis: RedisClient, calls: Sequence[tuple[Sequence[str], Sequence[Arg]]]) -> list[Any]:
        """Run the script once per (keys, args), in one round trip when the nodes know it."""
        if not calls:
            return []
        if len(calls) == 1:  # a lone call skips the pipeline's own cost (most of a round trip's CPU)
            keys, args = calls[0]
            return [await self.run(redis, keys, args)]
        replies = await self._pipeline(redis, calls, range(len(calls)), "EVALSHA", self.sha)
        unknown = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if unknown:
            for i, reply in zip(unknown, await self._pipeline(redis, calls, unknown, "EVAL", self.source), strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, Exception):  # a refused script, or a node lost mid-pipeline (a cluster)
                raise reply
        return replies

    async def run(self, redis: RedisClient, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """Run the script once: EVALSHA, repeated as EVAL when the node does not know it yet."""
        try:
            return await redis.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await redis.execute_command("EVAL", self.source, len(keys), *keys, *args)

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
