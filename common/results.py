"""Terminal records: build them, and write them exactly once.

On a single Redis, `FINISH_MANY_LUA` writes each task's result hash only if none exists (idempotent
by task id), pushes it to the client's reply stream, and acknowledges + deletes the source entry —
all in one atomic step, so a crash leaves either everything or nothing done; up to `FINISH_CHUNK`
tasks per call, their records packed in one msgpack argument: the per-argument encoding in
redis-py cost a worker more than everything else per task (see docs/benchmarks.md, "Redis path").

Results are keyed by task id: a client's `id` field, else the ingress entry ID. The two never meet
(a client id may not look like an entry ID), and the dispatcher claims each client id for the first
entry that names it (`claim_id` in CLAIM_ID_LUA, an owner mark beside the result key, claimed on a
single Redis inside the same script call that forwards the task); a later task naming the same id
is answered `duplicate_id` under its own entry ID, never with or over the owner's record.
A reply stream that cannot take a record costs only that record's push, never another task's write.

On a Redis Cluster those keys live in different slots, where no script or MULTI can span them, so
finishing is three idempotent steps, each on one slot and each only after the previous one is
written: (1) `RESULT_LUA` on the result key's slot creates the hash only if absent (else returns
the stored record); (2) `REPLY_LUA` on the reply stream's slot pushes that stored record unless a
`replied` mark (same hash tag as the stream) says it was pushed already; (3) XACK + XDEL on the
source stream. A crash between steps leaves the entry pending; whoever finishes it again finds the
result and the mark and only completes what is missing — one result, one reply, as on one Redis.

Long on purpose: half of it is Lua, and every script that writes a terminal record (single Redis
and cluster, one and many) sits beside the Python that packs its arguments, so the two change together.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
from redis.commands.core import AsyncScript

from ectrans.common import codec
from ectrans.common.keys import Keys
from ectrans.common.lua import ACK_LUA, Arg, KeyIndex, Lua
from ectrans.common.redis_conn import RedisClient, is_cluster
from ectrans.common.schemas import Task, is_client_id

logger = logging.getLogger(__name__)

Fields = dict[str, str | bytes]

REPLY_MAXLEN = 100_000

# Tasks finished per FINISH_MANY call: the script blocks Redis while it runs (a few us a task), so
# a worker's batch of 256 goes in several calls, all in one round trip.
FINISH_CHUNK = 64

# A result key holds a record only as a hash. Anything else there is no record: a client may SET or
# XADD any `result:*` key where its ACL covers them (the base client user on Redis 6.2, or no ACL),
# e.g. at the entry ID a later task will get; taken for a record, it would cost that task its result
# (or its id). True when `key` holds a record; a key of another type is deleted, for the record.
RECORD_LUA = """
local function record_exists(key)
  if redis.call('EXISTS', key) == 0 then
    return false
  end
  local got = redis.pcall('HGETALL', key)
  if type(got) == 'table' and got.err then
    redis.call('DEL', key)
    return false
  end
  return true
end
"""

# The finish steps for many tasks, shared by FINISH_MANY_LUA and the dispatcher's commit script.
# items: [[result key, source stream key, reply stream key or 0, entry id, [field, value, ...], owner
# mark or 0], ...] with keys as KEYS indices. Writes each absent result (its owner mark, if any, then
# expires with it) and pushes it to its reply stream; collects the entry ids to acknowledge per
# source stream in `acks` (key index -> ids). A reply stream that cannot take the record (a client
# named a key of another type, or a stream at its last possible ID) is skipped: the result and every
# other step still happen (redis.pcall), since a script stopped by an error keeps its earlier writes
# and would answer only part of a read. Each reply stream's TTL is refreshed once per call, after its
# pushes. Returns one code per item: 1 where this call created the result, 2 where it did but the
# reply stream refused it, 0 where the result existed.
FINISH_ALL_LUA = (
    RECORD_LUA
    + """
local function finish_all(items, ttl, maxlen, acks)
  local created, replied = {}, {}
  for i = 1, #items do
    local item = items[i]
    local result, fields = KEYS[item[1]], item[5]
    local code = 0
    if not record_exists(result) then
      code = 1
      redis.call('HSET', result, unpack(fields))
      redis.call('EXPIRE', result, ttl)
      if (item[6] or 0) > 0 then
        redis.call('EXPIRE', KEYS[item[6]], ttl)
      end
      if item[3] > 0 then
        local pushed = redis.pcall('XADD', KEYS[item[3]], 'MAXLEN', '~', maxlen, '*', unpack(fields))
        if type(pushed) == 'table' and pushed.err then
          code = 2
        else
          replied[item[3]] = true
        end
      end
    end
    if item[4] ~= '' then
      local ids = acks[item[2]] or {}
      ids[#ids + 1] = item[4]
      acks[item[2]] = ids
    end
    created[i] = code
  end
  for key = 1, #KEYS do  -- in KEYS order: a script's writes stay deterministic
    if replied[key] then
      redis.call('EXPIRE', KEYS[key], ttl)
    end
  end
  return created
end
"""
)

FINISH_MANY_LUA = (
    ACK_LUA
    + FINISH_ALL_LUA
    + """
-- FINISH_LUA for many tasks at once (single Redis only: the keys live in many slots), with one XACK
-- and one XDEL per source stream. KEYS: every result hash, source and reply stream once (see finish_all).
-- ARGV[1] group, ARGV[2] result ttl s, ARGV[3] reply maxlen, ARGV[4] msgpack items (see finish_all).
-- Returns one code per task (see finish_all).
local acks = {}
local created = finish_all(cmsgpack.unpack(ARGV[4]), ARGV[2], ARGV[3], acks)
for key = 1, #KEYS do
  if acks[key] then
    ack_all(KEYS[key], ARGV[1], acks[key])
  end
end
return created
"""
)

RESULT_LUA = (
    RECORD_LUA
    + """
-- Cluster step 1, on the result key's own slot. KEYS[1] result hash, KEYS[2] (optional) its owner
-- mark (same slot); ARGV: ttl s, field, value, ...
-- Returns 1 when this call created the result, else the stored record (field, value, ...).
if not record_exists(KEYS[1]) then
  redis.call('HSET', KEYS[1], unpack(ARGV, 2))
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  if #KEYS >= 2 then
    redis.call('EXPIRE', KEYS[2], ARGV[1])
  end
  return 1
end
return redis.call('HGETALL', KEYS[1])
"""
)

REPLY_LUA = """
-- Cluster step 2, on the reply stream's slot. KEYS[1] replied mark, KEYS[2] reply stream (same tag)
-- ARGV: ttl s, reply maxlen, field, value, ...  Returns 1 when pushed now, 0 when pushed before, 2
-- when the stream refused the record (of another type, or at its last possible ID): not retried.
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return 0
end
local pushed = redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
if type(pushed) == 'table' and pushed.err then
  return 2
end
redis.call('EXPIRE', KEYS[2], ARGV[1])
return 1
"""

# The claim rule, shared by every script that claims a client id (CLAIM_LUA, CLAIM_MANY_LUA and the
# dispatcher's commit script): the first ingress entry to name an id owns it, and that entry may
# claim it again (a redelivery). True when `entry` owns the id behind owner mark `mark`, false when
# another entry does (or a result `result` already exists, written before any mark).
CLAIM_ID_LUA = (
    RECORD_LUA
    + """
local function claim_id(mark, result, entry, ttl)
  local owner = redis.call('GET', mark)
  if owner then
    return owner == entry
  end
  if record_exists(result) then
    return false
  end
  redis.call('SET', mark, entry, 'EX', ttl)
  return true
end
"""
)

CLAIM_LUA = (
    CLAIM_ID_LUA
    + """
-- KEYS[1] owner mark of a client id, KEYS[2] its result hash (same slot); ARGV: entry id, ttl s.
-- Returns 1 when ARGV[1] owns the id, 0 when another entry does (see claim_id).
return claim_id(KEYS[1], KEYS[2], ARGV[1], ARGV[2]) and 1 or 0
"""
)

CLAIM_MANY_LUA = (
    CLAIM_ID_LUA
    + """
-- CLAIM_LUA for many ids in one call (single Redis only: the keys live in many slots).
-- KEYS: owner mark, result hash, owner mark, result hash, ...; ARGV[1] ttl s, then one entry id per
-- pair of keys. Returns one 1/0 per id, as CLAIM_LUA.
local owned = {}
for i = 1, #KEYS / 2 do
  owned[i] = claim_id(KEYS[2 * i - 1], KEYS[2 * i], ARGV[i + 1], ARGV[1]) and 1 or 0
end
return owned
"""
)

# An owner mark lives until its task's result expires (the finish sets the same TTL on both); until
# then, this long: a task may wait up to a day for its deadline and its result then lives `ttl`.
OWNER_GRACE_S = 24 * 3600


def now_ms() -> int:
    return int(time.time() * 1000)


def encode_output(output: Any, encoding: str) -> str | bytes:
    """JSON text for redis-cli users; typed msgpack for the client library."""
    if encoding == "msgpack":
        return codec.packb(output)
    if isinstance(output, np.ndarray):
        return json.dumps(output.tolist())
    return json.dumps(output, default=_json_default)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray | np.generic):
        return obj.tolist()
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


def ok_record(task: Task, output: Any, *, service_ms: float, started_ms: int) -> Fields:
    finished = now_ms()
    record: Fields = {
        "id": task.id,
        "status": "ok",
        "class": task.task_class,
        "model": task.model,
        "op": task.op,
        "encoding": task.encoding,
        "output": encode_output(output, task.encoding),
        "latency_ms": str(max(0, finished - task.submitted_ms)),
        "queue_ms": str(max(0, started_ms - task.submitted_ms)),
        "service_ms": f"{service_ms:.2f}",
        "finished_ms": str(finished),
    }
    if task.downgraded:
        record["downgraded"] = "1"
    return record


def error_record(
    task_id: str,
    reason: str,
    message: str,
    *,
    submitted_ms: int,
    task_class: str = "",
    model: str = "",
    op: str = "",
) -> Fields:
    finished = now_ms()
    return {
        "id": task_id,
        "status": "error",
        "reason": reason,
        "error": message,
        "class": task_class,
        "model": model,
        "op": op,
        "latency_ms": str(max(0, finished - submitted_ms)),
        "finished_ms": str(finished),
    }


def task_error_record(task: Task, reason: str, message: str) -> Fields:
    """The error record of a task that was read and validated: its id, class, model and op, and its
    latency counted from its ingress entry."""
    return error_record(
        task.id, reason, message, submitted_ms=task.submitted_ms, task_class=task.task_class, model=task.model,
        op=task.op,
    )  # fmt: skip


@dataclass(frozen=True)
class Finish:
    """One terminal record to write, and the stream entry it answers."""

    task_id: str
    record: Fields
    stream: str
    entry_id: str
    reply_to: str | None = None


class ResultWriter:
    """Writes terminal records, many per round trip: one atomic FINISH script per record on a single
    Redis, three idempotent per-slot steps on a cluster (see the module docstring)."""

    def __init__(self, redis: RedisClient, keys: Keys, group: str, ttl_s: int) -> None:
        self.redis = redis
        self.keys = keys
        self.group = group
        self.ttl_s = ttl_s
        self.cluster = is_cluster(redis)
        self.script: AsyncScript = redis.register_script(FINISH_MANY_LUA)
        self._finish_many = Lua(FINISH_MANY_LUA)
        self._result = Lua(RESULT_LUA)
        self._reply = Lua(REPLY_LUA)
        self._claim = Lua(CLAIM_LUA)
        self._claim_many = Lua(CLAIM_MANY_LUA)
        self.refused_replies = RefusedReplies()

    def _finish_many_calls(self, items: Sequence[Finish]) -> list[tuple[list[str], list[Arg]]]:
        """FINISH_MANY calls of at most FINISH_CHUNK tasks each."""
        calls: list[tuple[list[str], list[Arg]]] = []
        for start in range(0, len(items), FINISH_CHUNK):
            keys = KeyIndex()
            body = packb_items(self.pack(items[start : start + FINISH_CHUNK], keys))
            calls.append((keys.keys, [self.group, self.ttl_s, REPLY_MAXLEN, body]))
        return calls

    def pack(self, items: Sequence[Finish], keys: KeyIndex) -> list[list[Any]]:
        """`finish_all` items (see FINISH_ALL_LUA), their keys added to `keys`."""
        packed: list[list[Any]] = []
        for item in items:
            result, stream = keys.index(self.keys.result(item.task_id)), keys.index(item.stream)
            reply = keys.index(self.keys.reply(item.reply_to)) if item.reply_to else 0
            owner = keys.index(self.keys.owner(item.task_id)) if is_client_id(item.task_id) else 0
            record = [x for pair in item.record.items() for x in pair]
            packed.append([result, stream, reply, item.entry_id, record, owner])
        return packed

    async def claim(self, owners: Sequence[tuple[str, str]]) -> list[bool]:
        """Claim client ids for the ingress entries naming them, `(task id, entry id)` pairs, in one
        round trip: True where the entry owns its id (first to name it, or a redelivery of that
        entry), False where another task owns it. Entry-ID-keyed tasks need no claim (always True)."""
        claims = [(task_id, entry_id) for task_id, entry_id in owners if is_client_id(task_id)]
        ttl = self.ttl_s + OWNER_GRACE_S
        calls: list[tuple[list[str], list[Arg]]] = []
        if self.cluster:  # one call per id, each on its own slot
            for task_id, entry_id in claims:
                calls.append(([self.keys.owner(task_id), self.keys.result(task_id)], [entry_id, ttl]))
            answers = [int(r) for r in await self._claim.run_many(self.redis, calls)]
        else:  # one call for the whole read: a command per task cost the dispatcher more than the rest
            for start in range(0, len(claims), FINISH_CHUNK * 4):
                chunk = claims[start : start + FINISH_CHUNK * 4]
                keys = [key for task_id, _ in chunk for key in (self.keys.owner(task_id), self.keys.result(task_id))]
                calls.append((keys, [ttl, *(entry_id for _, entry_id in chunk)]))
            answers = [int(r) for reply in await self._claim_many.run_many(self.redis, calls) for r in reply]
        replies = iter(answers)
        return [not is_client_id(task_id) or next(replies) == 1 for task_id, _ in owners]

    async def queue(self, pipe: Any, item: Finish) -> None:
        """Queue one atomic finish in a MULTI `pipe` beside other commands (single Redis only: on a
        cluster the keys of one finish live apart, so callers use `write` there)."""
        if self.cluster:
            raise TypeError("a Redis Cluster cannot finish a task inside a MULTI; use ResultWriter.write")
        ((keys, args),) = self._finish_many_calls([item])
        # With a pipeline as client this only queues EVALSHA; the pipeline loads the script if needed.
        await self.script(keys=keys, args=args, client=pipe)

    async def write(self, items: Sequence[Finish]) -> list[bool]:
        """Write all records; True where this call created the result. An item with an empty record
        only acknowledges its entry (one deleted while pending: nothing to answer)."""
        if not items:
            return []
        with_record = [item for item in items if item.record]
        if self.cluster:
            stored = await self.store(with_record)
            await self.push(with_record, stored)
            await self.acknowledge(items)  # only now, after the result and the reply are written
            created = [record is None for record in stored]
        else:
            replies = await self._finish_many.run_many(self.redis, self._finish_many_calls(with_record))
            codes = [int(r) for reply in replies for r in reply]
            self.refused_replies.note(item for item, code in zip(with_record, codes, strict=True) if code == 2)
            created = [code > 0 for code in codes]
            await self.acknowledge([item for item in items if not item.record])
        fresh = {id(item): c for item, c in zip(with_record, created, strict=True)}
        return [fresh.get(id(item), False) for item in items]

    # The cluster's three steps, public so that a test can stop between them as a crash would.

    async def store(self, items: Sequence[Finish]) -> list[dict[Any, Any] | None]:
        """Step 1: create each result hash where absent. None where this call created it, else the
        record an earlier attempt stored (which the reply must then carry)."""
        calls: list[tuple[list[str], list[Arg]]] = []
        for item in items:
            args: list[Arg] = [self.ttl_s]
            for name, value in item.record.items():
                args += [name, value]
            keys = [self.keys.result(item.task_id)]
            if is_client_id(item.task_id):
                keys.append(self.keys.owner(item.task_id))
            calls.append((keys, args))
        replies = await self._result.run_many(self.redis, calls)
        return [None if reply == 1 else _pairs(reply) for reply in replies]

    async def push(self, items: Sequence[Finish], stored: Sequence[dict[Any, Any] | None]) -> None:
        """Step 2: push each result to its client's reply stream, once per task."""
        pushes: list[tuple[list[str], list[Arg]]] = []
        pushed: list[Finish] = []
        for item, earlier in zip(items, stored, strict=True):
            if item.reply_to:
                pushed.append(item)
                record: dict[Any, Any] = item.record if earlier is None else earlier
                args: list[Arg] = [self.ttl_s, REPLY_MAXLEN]
                for name, value in record.items():
                    args += [name, value]
                keys = [self.keys.replied(item.reply_to, item.task_id), self.keys.reply(item.reply_to)]
                pushes.append((keys, args))
        codes = await self._reply.run_many(self.redis, pushes)
        self.refused_replies.note(item for item, code in zip(pushed, codes, strict=True) if code == 2)

    async def acknowledge(self, items: Sequence[Finish]) -> None:
        """Step 3 (and entries with nothing to answer): XACK + XDEL the source entries, per stream."""
        by_stream: dict[str, list[str]] = {}
        for item in items:
            if item.entry_id:
                by_stream.setdefault(item.stream, []).append(item.entry_id)
        if not by_stream:
            return
        pipe = self.redis.pipeline(transaction=False)
        for stream, entry_ids in by_stream.items():
            pipe.xack(stream, self.group, *entry_ids)
            pipe.xdel(stream, *entry_ids)
        await pipe.execute()


class RefusedReplies:
    """Reply streams that refused a record (a key of another type, a stream at its last ID): the
    result hash holds the record, and operators get one warning per `every_s`, not one per task."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self.count = 0  # all refusals so far
        self._unreported = 0
        self._reported_at = -every_s

    def note(self, items: Iterable[Finish]) -> None:
        names = sorted({item.reply_to or "" for item in items})
        if not names:
            return
        self.count += len(names)
        self._unreported += len(names)
        if time.monotonic() - self._reported_at >= self.every_s:
            logger.warning(
                "[result] %d reply streams refused a record (kept in the result hash only), e.g. %s",
                self._unreported,
                ", ".join(repr(name) for name in names[:3]),
            )
            self._unreported, self._reported_at = 0, time.monotonic()


def packb_items(items: Any) -> bytes:
    """Items for a script's msgpack argument: str and bytes alike as raw strings, which Lua's
    cmsgpack reads byte for byte (binary split payloads included)."""
    packed: bytes = msgpack.packb(items, use_bin_type=False)
    return packed


def _pairs(flat: Any) -> dict[bytes, bytes]:
    """HGETALL as a script returns it (field, value, ...) → a mapping."""
    values = list(flat) if isinstance(flat, list) else []
    return dict(zip(values[::2], values[1::2], strict=True))
