"""Terminal records: build them, and write them exactly once.

`FINISH_LUA` writes a task's result hash only if none exists (idempotent by task id), pushes it to
the client's reply stream, and acknowledges + deletes the source entry — all in one atomic step,
so a crash leaves either everything or nothing done.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from ectrans.common import codec
from ectrans.common.keys import Keys
from ectrans.common.schemas import Task

Fields = dict[str, str | bytes]

REPLY_MAXLEN = 100_000

FINISH_LUA = """
-- KEYS[1] result hash, KEYS[2] source stream, KEYS[3] (optional) client reply stream
-- ARGV: group, entry id, result ttl s, reply maxlen, field, value, field, value, ...
local fresh = redis.call('EXISTS', KEYS[1]) == 0
if fresh then
  redis.call('HSET', KEYS[1], unpack(ARGV, 5))
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  if #KEYS >= 3 then
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', unpack(ARGV, 5))
    redis.call('EXPIRE', KEYS[3], ARGV[3])
  end
end
if ARGV[2] ~= '' then
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[2], ARGV[2])
end
return fresh and 1 or 0
"""


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


@dataclass(frozen=True)
class Finish:
    """One terminal record to write, and the stream entry it answers."""

    task_id: str
    record: Fields
    stream: str
    entry_id: str
    reply_to: str | None = None


class ResultWriter:
    """Writes terminal records through the idempotent FINISH script, many per round trip."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, group: str, ttl_s: int) -> None:
        self.redis = redis
        self.keys = keys
        self.group = group
        self.ttl_s = ttl_s
        self.script: AsyncScript = redis.register_script(FINISH_LUA)

    async def queue(self, pipe: Any, item: Finish) -> None:
        keys = [self.keys.result(item.task_id), item.stream]
        if item.reply_to:
            keys.append(self.keys.reply(item.reply_to))
        args: list[str | bytes | int] = [self.group, item.entry_id, self.ttl_s, REPLY_MAXLEN]
        for name, value in item.record.items():
            args += [name, value]
        # With a pipeline as client this only queues EVALSHA; the pipeline loads the script if needed.
        await self.script(keys=keys, args=args, client=pipe)

    async def write(self, items: list[Finish]) -> list[bool]:
        """Write all records in one pipeline; True where this call created the result."""
        if not items:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for item in items:
            await self.queue(pipe, item)
        replies = await pipe.execute()
        return [bool(r) for r in replies]
