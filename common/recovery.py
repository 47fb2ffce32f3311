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

from redis.exceptions import ResponseError

from ectrans.common.keys import Keys
from ectrans.common.redis_conn import RedisClient
from ectrans.common.results import Finish, ResultWriter, error_record
from ectrans.common.schemas import Reason, as_str_dict, entry_ms, reply_to_of, task_id_of

Entry = tuple[str, dict[bytes, bytes]]


async def ensure_group(redis: RedisClient, stream: str, group: str) -> None:
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def decode_entries(raw: Any) -> list[Entry]:
    """Stream entries as (id, fields); a deleted-but-pending entry comes back with empty fields.

    Redis 6.2's XAUTOCLAIM answers such an entry with a bare null (no id): it is left out here.
    """
    return [(_text(eid), fields or {}) for eid, fields in raw if eid is not None]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def read_group(
    redis: RedisClient,
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
        redis: RedisClient,
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
        start = self.cursor
        try:
            reply = await self.redis.xautoclaim(
                self.stream, self.group, self.consumer, self.min_idle_ms, start_id=start, count=count
            )
        finally:
            await self.redis.delete(lock)
        self.cursor = _text(reply[0])
        entries = decode_entries(reply[1])
        if len(entries) < len(reply[1]):
            await self._ack_deleted(start, self.cursor, count)
        return await self.split_by_deliveries(entries)

    async def _ack_deleted(self, start: str, end: str, count: int) -> None:
        """Acknowledge our pending entries in [start, end) whose data is gone (deleted by hand).

        Redis 7 drops such entries from the PEL during XAUTOCLAIM; 6.2 keeps them, claims them and
        answers nulls, so without this they would cycle between consumers forever.
        """
        upper = "+" if end == "0-0" else f"({end}"
        rows = await self.redis.xpending_range(
            self.stream, self.group, min=start, max=upper, count=count * 4, consumername=self.consumer
        )
        ids = [_text(row["message_id"]) for row in rows]
        if not ids:
            return
        pipe = self.redis.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xrange(self.stream, min=entry_id, max=entry_id, count=1)
        gone = [entry_id for entry_id, found in zip(ids, await pipe.execute(), strict=True) if not found]
        if gone:
            await self.redis.xack(self.stream, self.group, *gone)

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
        """Times each entry was delivered, one exact XPENDING per id (ids do not sort as strings:
        `5-10` < `5-9`, and a range query would also count other consumers' entries in between)."""
        pipe = self.redis.pipeline(transaction=False)
        for entry_id in entry_ids:
            pipe.xpending_range(self.stream, self.group, min=entry_id, max=entry_id, count=1)
        counts = {}
        for entry_id, rows in zip(entry_ids, await pipe.execute(), strict=True):
            if rows:
                counts[entry_id] = int(rows[0]["times_delivered"])
        return counts


def _task_id(entry_id: str, fields: dict[bytes, bytes], ingress: bool) -> str:
    """A dead entry's task id: a forwarded entry carries the one the dispatcher settled on."""
    if ingress:
        return task_id_of(entry_id, fields)
    return fields.get(b"id", entry_id.encode()).decode("utf-8", "replace")


def _submitted_ms(entry_id: str, fields: dict[bytes, bytes], ingress: bool) -> int:
    """When the task was submitted: an ingress entry's own ID, or the time a forwarded entry carries."""
    value = None if ingress else fields.get(b"submitted_ms")
    return int(value) if value is not None and value.isdigit() else entry_ms(entry_id)


async def dead_letter(
    redis: RedisClient,
    keys: Keys,
    writer: ResultWriter,
    stream: str,
    entries: list[tuple[Entry, int]],
    *,
    consumer: str,
) -> None:
    """Move entries past the delivery limit to the dead-letter stream and answer their clients.

    One MULTI on a single Redis. On a cluster the dead-letter stream and the result live in other
    slots: the dead letters are written first, then the results (idempotent, acking the entries);
    a crash in between can repeat a dead-letter record, never a result."""
    if not entries:
        return
    finishes: list[Finish] = []
    # An ingress entry's client id was never claimed (see `ResultWriter.claim`): claim it now, or key
    # the record by the entry ID, so a dead letter cannot land on another task's id either.
    ingress = stream == keys.tasks  # never judged by the fields: a client could add `submitted_ms`
    ids = [_task_id(entry_id, fields, ingress) for (entry_id, fields), _ in entries]
    # Forwarded entries' ids were claimed at dispatch.
    owned = await writer.claim([(t, e[0][0]) for t, e in zip(ids, entries, strict=True)]) if ingress else []
    pipe = redis.pipeline(transaction=not writer.cluster)
    for i, ((entry_id, fields), deliveries) in enumerate(entries):
        readable = as_str_dict(fields)
        requested_id = ids[i]
        task_id = requested_id if not ingress or owned[i] else entry_id
        history = {"stream": stream, "entry_id": entry_id, "deliveries": deliveries, "dead_at": time.time()}
        pipe.xadd(
            keys.dead_letters,
            {"task_id": str(task_id), "history": json.dumps(history), "fields": json.dumps(readable)},
            maxlen=100_000,
            approximate=True,
        )
        submitted = _submitted_ms(entry_id, fields, ingress)
        record = error_record(
            str(task_id),
            Reason.DEAD_LETTER,
            f"task was delivered {deliveries} times without finishing; moved to the dead-letter stream",
            submitted_ms=submitted,
            task_class=readable.get("class", ""),
            model=readable.get("model", ""),
            op=readable.get("op", ""),
        )
        if task_id != requested_id:
            record["requested_id"] = requested_id
        finish = Finish(str(task_id), record, stream, entry_id, reply_to_of(fields))
        if writer.cluster:
            finishes.append(finish)
        else:
            await writer.queue(pipe, finish)
    await pipe.execute()
    await writer.write(finishes)
