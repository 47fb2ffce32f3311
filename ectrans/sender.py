"""One writer per client: the Redis commands of every concurrent call go out together.

A call adds its commands to an outbox and awaits its replies; a single writer task takes everything
queued by then and sends it as one pipeline on one connection. Thousands of concurrent calls cost
one connection and a few round trips, never a pooled connection each (redis-py's asyncio pool
refuses the 101st concurrent command). A lone command goes out as a plain command, which costs
less than a pipeline of one; a call cancelled before its turn is dropped unsent.

A burst of submissions (a round trip of nothing but XADDs) goes out as one MULTI/EXEC on a single
Redis. Redis serves a reader blocked on a stream after each command, so in a plain pipeline the
dispatcher woke with the first task alone and read the rest a round trip later; the worker then
started a batch of one and the others waited for it (many clients answered together resubmit
together). In one transaction the reader wakes once, with all of them. Each XADD still gets its own
reply or error. Not on a Redis Cluster, where a pipeline spans slots, nor for a user whose ACL
refuses MULTI (asked once: a refused MULTI would leave the XADDs after it run outside any
transaction while the pipeline reports an error, and the caller would submit them twice).

A command redis-py cannot encode (a lone surrogate in a str, a None) fails the whole round trip
before a byte is sent; the round trip's calls are then sent again in halves, so that only the call
holding it fails and every other caller's commands go out as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import DataError

from ectrans.common.redis_conn import RedisClient, is_cluster

logger = logging.getLogger(__name__)

Command = tuple[Any, ...]

# The most XADDs sent as one transaction: Redis runs one without serving anyone else meanwhile, and
# past the dispatcher's read size (256) a larger one wakes nobody sooner.
ATOMIC_SUBMISSIONS_MAX = 256
# What redis-py raises while packing commands, before anything is sent: nothing reached Redis.
UNENCODABLE = (DataError, UnicodeError)


class SenderClosed(RuntimeError):
    """A command was given to a sender that has been closed."""


@dataclass
class _Call:
    commands: Sequence[Command]
    replies: asyncio.Future[list[Any]]


class Sender:
    """Coalesces the commands of concurrent callers into one pipeline per round trip."""

    def __init__(self, redis: RedisClient) -> None:
        self._redis = redis
        self._atomic: bool | None = False if is_cluster(redis) else None  # None: MULTI not tried yet
        self._outbox: list[_Call] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._writer: asyncio.Task[None] | None = None
        self.flushes = 0  # round trips made, for tests and curiosity
        self.largest_flush = 0  # the most commands sent in one round trip

    def start(self) -> None:
        self._writer = asyncio.create_task(self._write_loop(), name="ectrans-sender")

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        """Send `commands` with whatever else is queued; their replies, in order. Raises the first
        error reply among them (a failed connection fails every call of that round trip)."""
        if self._closing or self._writer is None:
            raise SenderClosed("the client is closed")
        call = _Call(commands, asyncio.get_running_loop().create_future())
        self._outbox.append(call)
        self._wake.set()
        return await call.replies

    async def close(self) -> None:
        """Send what is queued, then stop the writer."""
        if self._writer is None:
            return
        self._closing = True
        self._wake.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        self._writer = None

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._outbox:
                calls, self._outbox = self._outbox, []
                live = [call for call in calls if not call.replies.done()]  # cancelled callers: unsent
                if live:
                    await self._flush(live)
            if self._closing:
                return

    async def _flush(self, calls: list[_Call]) -> None:
        commands = [command for call in calls for command in call.commands]
        self.flushes += 1
        self.largest_flush = max(self.largest_flush, len(commands))
        try:
            replies = await self._send(commands)
        except UNENCODABLE as exc:
            await self._isolate(calls, exc)
            return
        except Exception as exc:  # the writer outlives any failure; its callers get the error
            for call in calls:
                if not call.replies.done():
                    call.replies.set_exception(exc)
            return
        start = 0
        for call in calls:
            mine = replies[start : start + len(call.commands)]
            start += len(call.commands)
            if call.replies.done():
                continue
            error = next((reply for reply in mine if isinstance(reply, Exception)), None)
            if error is not None:
                call.replies.set_exception(error)
            else:
                call.replies.set_result(mine)

    async def _isolate(self, calls: list[_Call], exc: Exception) -> None:
        """Nothing of `calls` was sent (one could not be encoded): the halves go out on their own,
        down to the guilty call, which alone gets `exc`."""
        if len(calls) == 1:
            if not calls[0].replies.done():
                calls[0].replies.set_exception(exc)
            return
        half = len(calls) // 2
        for part in (calls[:half], calls[half:]):
            live = [call for call in part if not call.replies.done()]  # callers cancelled meanwhile: unsent
            if live:
                await self._flush(live)

    async def _send(self, commands: list[Command]) -> list[Any]:
        if len(commands) == 1:
            return [await self._redis.execute_command(*commands[0])]
        burst = len(commands) <= ATOMIC_SUBMISSIONS_MAX and all(command[0] == "XADD" for command in commands)
        pipe = self._redis.pipeline(transaction=burst and await self._transactions_allowed())
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute(raise_on_error=False))

    async def _transactions_allowed(self) -> bool:
        """Whether this connection may run MULTI (a Redis ACL may refuse it), asked once."""
        if self._atomic is None:
            probe = self._redis.pipeline(transaction=False)
            probe.execute_command("MULTI")
            probe.execute_command("DISCARD")
            multi, _ = await probe.execute(raise_on_error=False)
            self._atomic = not isinstance(multi, Exception)
        return self._atomic
