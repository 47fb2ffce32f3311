"""Taking over work a dead consumer left behind, and giving up on poison entries.

XAUTOCLAIM runs under a short lock with a TTL (so a crashed claimer never blocks the others) that
is released right after the claim, never held while processing; the cursor is carried across
calls; entries delivered more than `max_deliveries` times go to the dead-letter stream.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from ectrans.common.keys import Keys
from ectrans.common.results import Finish, ResultWriter, error_record
from ectrans.common.schemas import Reason, as_str_dict, entry_ms, reply_to_of, task_id_of

Entry = tuple[str, dict[bytes, bytes]]


async def ensure_group(redis: aioredis.Redis, stream: str, group: str) -> None:
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def decode_entries(raw: Any) -> list[Entry]:
    """Stream entries as (id, fields); a deleted-but-pending entry comes back with empty fields."""
    return [(_text(eid), fields or {}) for eid, fields in raw]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def read_group(
    redis: aioredis.Redis,
    group: str,
    consumer: str,
    streams: dict[str, str],
    *,
    count: int,
    block: int | None,
) -> list[tuple[str, list[Entry]]]:
    """XREADGROUP, normalised to [(stream, entries)] whatever the protocol version returns."""
    reply: Any = await redis.xreadgroup(group, consumer, streams, count=count, block=block)  # type: ignore[arg-type]
    if not reply:
        return []
    pairs = reply.items() if isinstance(reply, dict) else reply
    result = []
    for stream, entries in pairs:
        nested = entries and isinstance(entries[0], list) and len(entries) == 1 and isinstance(entries[0][0], list)
        result.append((_text(stream), decode_entries(entries[0] if nested else entries)))  # RESP3 nests once more
    return result


@dataclass
class Claimed:
    live: list[Entry] = field(default_factory=list)
    dead: list[tuple[Entry, int]] = field(default_factory=list)


class Reclaimer:
    """Claims idle pending entries of one stream for `consumer`, carrying the XAUTOCLAIM cursor."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        stream: str,
        group: str,
        consumer: str,
        *,
        min_idle_ms: int,
        max_deliveries: int,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.min_idle_ms = min_idle_ms
        self.max_deliveries = max_deliveries
        self.cursor = "0-0"

    async def claim(self, count: int = 100) -> Claimed:
        lock = self.keys.claim_lock(self.stream)
        if not await self.redis.set(lock, self.consumer, nx=True, px=max(self.min_idle_ms, 1000)):
            return Claimed()
        try:
            reply = await self.redis.xautoclaim(
                self.stream, self.group, self.consumer, self.min_idle_ms, start_id=self.cursor, count=count
            )
        finally:
            await self.redis.delete(lock)
        self.cursor = _text(reply[0])
        return await self.split_by_deliveries(decode_entries(reply[1]))

    async def split_by_deliveries(self, entries: list[Entry]) -> Claimed:
        """Separate entries still worth running from those past the delivery limit."""
        claimed = Claimed()
        if not entries:
            return claimed
        counts = await self.delivery_counts([eid for eid, _ in entries])
        for entry in entries:
            deliveries = counts.get(entry[0], 1)
            if deliveries > self.max_deliveries:
                claimed.dead.append((entry, deliveries))
            else:
                claimed.live.append(entry)
        return claimed

    async def delivery_counts(self, entry_ids: list[str]) -> dict[str, int]:
        rows = await self.redis.xpending_range(
            self.stream, self.group, min=min(entry_ids), max=max(entry_ids), count=len(entry_ids) * 4
        )
        wanted = set(entry_ids)
        counts = {}
        for row in rows:
            eid = _text(row["message_id"])
            if eid in wanted:
                counts[eid] = int(row["times_delivered"])
        return counts


async def dead_letter(
    redis: aioredis.Redis,
    keys: Keys,
    writer: ResultWriter,
    stream: str,
    entries: list[tuple[Entry, int]],
    *,
    consumer: str,
) -> None:
    """Move entries past the delivery limit to the dead-letter stream and answer their clients."""
    if not entries:
        return
    pipe = redis.pipeline(transaction=True)
    for (entry_id, fields), deliveries in entries:
        readable = as_str_dict(fields)
        task_id = readable.get("id") if "submitted_ms" in readable else task_id_of(entry_id, fields)
        history = {"stream": stream, "entry_id": entry_id, "deliveries": deliveries, "dead_at": time.time()}
        pipe.xadd(
            keys.dead_letters,
            {"task_id": str(task_id), "history": json.dumps(history), "fields": json.dumps(readable)},
            maxlen=100_000,
            approximate=True,
        )
        submitted = int(readable.get("submitted_ms", entry_ms(entry_id)))
        record = error_record(
            str(task_id),
            Reason.DEAD_LETTER,
            f"task was delivered {deliveries} times without finishing; moved to the dead-letter stream",
            submitted_ms=submitted,
            task_class=readable.get("class", ""),
            model=readable.get("model", ""),
            op=readable.get("op", ""),
        )
        await writer.queue(pipe, Finish(str(task_id), record, stream, entry_id, reply_to_of(fields)))
    await pipe.execute()
