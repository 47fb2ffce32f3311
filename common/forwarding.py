"""Moving entries from one stream to another exactly once where no MULTI can span both.

On a Redis Cluster the ingress stream and a model's queue live in different slots. The dispatcher
then forwards in two idempotent steps instead of one MULTI: (1) on the queue's slot, `FORWARD_LUA`
marks the task as forwarded (a dedupe key sharing the queue's hash tag, kept as long as results)
and appends it to the queue only if this very ingress entry was not forwarded before; (2) XACK +
XDEL of the ingress entries. A crash between the steps leaves the ingress entry pending; its next
delivery finds the mark and forwards nothing, then acknowledges. Past the mark's TTL a repeat would
run the task again, and the result hash (idempotent by task id) still keeps one terminal record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ectrans.common.keys import Keys
from ectrans.common.lua import Arg, Lua
from ectrans.common.redis_conn import RedisClient, same_slot_pipeline

FORWARD_LUA = """
-- KEYS[1] dedupe mark, KEYS[2] target stream (same slot); ARGV: ttl s, source entry id, field, value, ...
-- The mark holds the source entry id: a different entry reusing the task id is a new task.
if redis.call('GET', KEYS[1]) == ARGV[2] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[1])
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
return 1
"""


@dataclass(frozen=True)
class Forwarding:
    """One entry to move: its target queue, the task it carries and the source entry it answers."""

    queue: str
    model: str
    task_id: str
    entry_id: str
    fields: dict[str, str | bytes]


class Forwarder:
    """Forwards entries of `source` (read in `group`) to their queues, idempotently per slot."""

    def __init__(self, redis: RedisClient, keys: Keys, source: str, group: str, ttl_s: int) -> None:
        self.redis = redis
        self.keys = keys
        self.source = source
        self.group = group
        self.ttl_s = ttl_s
        self._script = Lua(FORWARD_LUA)

    async def forward(self, items: Sequence[Forwarding]) -> int:
        """Forward and then acknowledge every item; returns how many were new (not repeats)."""
        fresh = await self.append(items)
        await self.acknowledge(items)
        return fresh

    async def append(self, items: Sequence[Forwarding]) -> int:
        """Step 1: append each item to its queue unless this very entry was appended before."""
        if not items:
            return 0
        calls: list[tuple[list[str], list[Arg]]] = []
        for item in items:
            args: list[Arg] = [self.ttl_s, item.entry_id]
            for name, value in item.fields.items():
                args += [name, value]
            calls.append(([self.keys.forwarded(item.model, item.task_id), item.queue], args))
        return sum(int(r) for r in await self._script.run_many(self.redis, calls))

    async def acknowledge(self, items: Sequence[Forwarding]) -> None:
        """Step 2: XACK + XDEL the source entries (one key: one pipelined send)."""
        if not items:
            return
        entry_ids = [item.entry_id for item in items]
        pipe = same_slot_pipeline(self.redis)
        pipe.xack(self.source, self.group, *entry_ids)
        pipe.xdel(self.source, *entry_ids)
        await pipe.execute()
