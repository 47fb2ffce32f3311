"""Moving entries from one stream to another exactly once where no MULTI can span both.

On a Redis Cluster the ingress stream and a model's queue live in different slots. The dispatcher
then forwards in two idempotent steps instead of one MULTI: (1) on the queue's slot, `FORWARD_LUA`
marks the task as forwarded (a dedupe key sharing the queue's hash tag, kept as long as results)
and appends it to the queue only if this very ingress entry was not forwarded before; (2) XACK +
XDEL of the ingress entries. A crash between the steps leaves the ingress entry pending; its next
delivery finds the mark and forwards nothing, then acknowledges. Past the mark's TTL a repeat would
run the task again, and the result hash (idempotent by task id) still keeps one terminal record.

On a single Redis, `Forwarder.commit` does a whole read in one `COMMIT_LUA` call instead: every
forward, every error result, the rejection metrics and the acknowledgements, atomically. A task is
appended only if its ingress entry was still pending (its XACK answers 1), so a repeated call (a
retry after a lost reply, or a peer that claimed the same entry) forwards nothing twice; only if
its entry owns the client id it names (claimed in the same call, by the rule of `ResultWriter.claim`);
and only if its queue is under the length limit, checked at that very moment. A duplicate or a
refused entry stays pending until the caller answers it (`duplicate_id` under its entry ID, or
`overloaded`): a read costs one script call, its claims included.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ectrans.common.heartbeat import METRICS_MAXLEN
from ectrans.common.keys import Keys
from ectrans.common.lua import ACK_LUA, Arg, KeyIndex, Lua
from ectrans.common.redis_conn import RedisClient, same_slot_pipeline
from ectrans.common.results import (
    CLAIM_ID_LUA,
    FINISH_ALL_LUA,
    OWNER_GRACE_S,
    REPLY_MAXLEN,
    Finish,
    ResultWriter,
    packb_items,
)
from ectrans.common.schemas import is_client_id

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

# Bytes of forwarded fields per commit call: a read of large split payloads goes in several calls
# (each atomic for its own entries), so that no script argument nears Redis's proto-max-bulk-len
# (512 MB) and no single call blocks Redis for long.
COMMIT_MAX_BYTES = 16 * 1024 * 1024

COMMIT_LUA = (
    ACK_LUA
    + FINISH_ALL_LUA
    + CLAIM_ID_LUA
    + """
-- Single Redis only. KEYS[1] source stream, KEYS[2] metrics stream, then the queues, owner marks,
-- result hashes and reply streams, each once. ARGV[1] group, ARGV[2] result ttl s, ARGV[3] reply
-- maxlen, ARGV[4] metrics maxlen, ARGV[5] msgpack [forwards, finishes, metrics], ARGV[6] owner
-- mark ttl s:
--   forwards [[queue key, entry id, [field, value, ...], queue length limit (0: none),
--   owner mark key or 0, result key or 0], ...] (keys as KEYS indices; a mark for a client id),
--   finishes as in finish_all, all answering entries of KEYS[1],
--   metrics [[field, value, ...], ...], appended only if an entry they count was still pending.
-- A forward first claims its client id (claim_id), then checks its queue's limit (so a duplicate is
-- never refused under the owner's id). A duplicate, or a forward to a queue at the limit, is left
-- pending, its entry id returned (only while still pending: an earlier call may have seen it
-- answered) for the caller to answer. Returns {refused entry ids, finish_all's code per finish,
-- duplicate entry ids}.
local function pending(entry)
  return #redis.call('XPENDING', KEYS[1], ARGV[1], entry, entry, 1) > 0
end
local body = cmsgpack.unpack(ARGV[5])
local done, refused, duplicates, lengths, answered = {}, {}, {}, {}, 0
for _, item in ipairs(body[2]) do  -- acks first: a missing group fails the call before any write
  if item[4] ~= '' then
    answered = answered + redis.call('XACK', KEYS[1], ARGV[1], item[4])
    done[#done + 1] = item[4]
  end
end
for _, f in ipairs(body[1]) do
  local queue = f[1]
  local length = lengths[queue] or redis.call('XLEN', KEYS[queue])
  local limit = f[4]
  if f[5] > 0 and not claim_id(KEYS[f[5]], KEYS[f[6]], f[2], ARGV[6]) then
    if pending(f[2]) then
      duplicates[#duplicates + 1] = f[2]
    end
  elseif limit > 0 and length >= limit then
    if pending(f[2]) then
      refused[#refused + 1] = f[2]
    end
  else
    -- Only an entry still pending is forwarded (and deleted): one not pending was forwarded by an
    -- earlier call, or (after a Redis roll-back) is to be delivered again.
    if redis.call('XACK', KEYS[1], ARGV[1], f[2]) == 1 then
      redis.call('XADD', KEYS[queue], '*', unpack(f[3]))
      length = length + 1
      done[#done + 1] = f[2]
    end
  end
  lengths[queue] = length
end
local codes = finish_all(body[2], ARGV[2], ARGV[3], {})
if answered > 0 then
  for _, m in ipairs(body[3]) do
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', unpack(m))
  end
end
del_all(KEYS[1], done)
return {refused, codes, duplicates}
"""
)


@dataclass(frozen=True)
class Forwarding:
    """One entry to move: its target queue, the task it carries and the source entry it answers."""

    queue: str
    model: str
    task_id: str
    entry_id: str
    fields: dict[str, str | bytes]


@dataclass(frozen=True)
class Held:
    """Entries a commit left pending for the caller to answer: forwards refused by a full queue, and
    forwards naming a client id that another entry owns."""

    refused: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.refused or self.duplicates)


class Forwarder:
    """Forwards entries of `source` (read in `group`) to their queues, idempotently per slot."""

    def __init__(self, redis: RedisClient, keys: Keys, source: str, group: str, ttl_s: int) -> None:
        self.redis = redis
        self.keys = keys
        self.source = source
        self.group = group
        self.ttl_s = ttl_s
        self._script = Lua(FORWARD_LUA)
        self._commit = Lua(COMMIT_LUA)

    async def commit(
        self,
        items: Sequence[Forwarding],
        finishes: Sequence[Finish],
        writer: ResultWriter,
        metrics: Sequence[Mapping[str, str]] = (),
        *,
        limit: int | Mapping[str, int] = 0,
    ) -> Held:
        """Single Redis: forward `items`, write the error results `finishes` (answering entries of the
        source stream, through `writer`), append `metrics` to the metrics stream and acknowledge it
        all in one atomic script call (several, each atomic, in one round trip when the forwarded
        fields exceed COMMIT_MAX_BYTES). An item naming a client id claims it first; one whose id
        another entry owns is a duplicate. An item bound for a queue already at its limit (`limit`,
        one for every queue or one per queue key; 0 or absent: no limit) is refused. Both are left
        pending, their entry ids returned for the caller to answer. The finishes' client ids must
        be claimed beforehand (`ResultWriter.claim`)."""
        if not items and not finishes:
            return Held()
        if any(finish.stream != self.source for finish in finishes):
            raise ValueError(f"commit answers entries of {self.source} only")
        calls = []
        for i, chunk in enumerate(_chunks(items, COMMIT_MAX_BYTES)):
            first = i == 0  # the error results and their metrics go with the first call
            calls.append(self._commit_call(chunk, finishes if first else (), writer, metrics if first else (), limit))
        replies = await self._commit.run_many(self.redis, calls)
        codes = [int(code) for code in replies[0][1]]  # the finishes went with the first call
        writer.refused_replies.note(f for f, code in zip(finishes, codes, strict=True) if code == 2)
        return Held(
            [_text(entry_id) for reply in replies for entry_id in reply[0]],
            [_text(entry_id) for reply in replies for entry_id in reply[2]],
        )

    def _commit_call(
        self,
        items: Sequence[Forwarding],
        finishes: Sequence[Finish],
        writer: ResultWriter,
        metrics: Sequence[Mapping[str, str]],
        limit: int | Mapping[str, int],
    ) -> tuple[list[str], list[Arg]]:
        keys = KeyIndex(self.source, self.keys.metrics)
        forwards = []
        for item in items:
            owner, result = 0, 0
            if is_client_id(item.task_id):
                owner, result = keys.index(self.keys.owner(item.task_id)), keys.index(self.keys.result(item.task_id))
            queue = keys.index(item.queue)
            forwards.append([queue, item.entry_id, _flat(item.fields), _limit_of(limit, item.queue), owner, result])
        body: list[Any] = [forwards, writer.pack(finishes, keys), [_flat(m) for m in metrics]]
        owner_ttl = self.ttl_s + OWNER_GRACE_S
        return keys.keys, [self.group, self.ttl_s, REPLY_MAXLEN, METRICS_MAXLEN, packb_items(body), owner_ttl]

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


def _chunks(items: Sequence[Forwarding], max_bytes: int) -> list[Sequence[Forwarding]]:
    """`items` in runs of at most `max_bytes` of field values (one item alone may exceed it); at
    least one run, maybe empty, so that a commit without forwards still answers its finishes."""
    chunks: list[Sequence[Forwarding]] = []
    start, size = 0, 0
    for i, item in enumerate(items):
        item_size = sum(len(value) for value in item.fields.values())
        if i > start and size + item_size > max_bytes:
            chunks.append(items[start:i])
            start, size = i, 0
        size += item_size
    chunks.append(items[start:])
    return chunks


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _limit_of(limit: int | Mapping[str, int], queue: str) -> int:
    return limit if isinstance(limit, int) else limit.get(queue, 0)


def _flat(fields: Mapping[str, str | bytes]) -> list[str | bytes]:
    return [x for pair in fields.items() for x in pair]
