"""The ECTrans client library: submit tasks, await their terminal records.

    async with AsyncClient(url) as client:
        vectors = await client.embed(["a", "b"], priority="realtime", timeout=5)

    with Client(url) as client:          # the sync twin
        vectors = client.embed(["a", "b"])

Each client owns a reply stream that workers push its results to; one reader loop resolves every
task in flight, so thousands of tasks share one client without polling per task. Submissions go out
through one writer (`ectrans.sender`): any number of concurrent calls share one connection.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ectrans.common import codec
from ectrans.common.cost import CostModel
from ectrans.common.keys import TASK_CLASSES, Keys
from ectrans.common.redis_conn import BLOCK_MS, RedisClient, connect, disconnect
from ectrans.common.settings import CommonSettings
from ectrans.local.stacks import with_local_stack
from ectrans.sender import Command, Sender, SenderClosed

T = TypeVar("T")
logger = logging.getLogger(__name__)
# The reply stream is trimmed once this many entries were read, or at a read a second after the last trim.
TRIM_EVERY = 256
TRIM_AFTER_S = 1.0
# How long a cancel mark is kept: a task still queued after this is run after all.
CANCEL_TTL_S = 3600
# Longest close() waits for Redis to delete the reply stream (which expires unread anyway).
FAREWELL_S = 1.0
# How long the reply reader rides out an unreachable Redis (a restart) before failing the calls waiting.
RECONNECT_TIMEOUT_S = 5.0


def _next_id(entry_id: str) -> str:
    """The smallest stream id after `entry_id`: XTRIM MINID with it drops `entry_id` and all before."""
    ms, seq = entry_id.split("-")
    return f"{ms}-{int(seq) + 1}"


def _one_per_input(inputs: Sequence[str | bytes] | str | bytes) -> Sequence[str | bytes]:
    """A lone text (or split payload) is one input, as OpenAI's `input` takes one: iterated, a str
    would become a task per character and `embed("some text")` a vector per letter."""
    return [inputs] if isinstance(inputs, str | bytes) else inputs


def _wire_input(index: int, text: object) -> bytes | bytearray | memoryview:
    """An input as the bytes its task carries. A str with a lone surrogate (from `surrogateescape`d
    file names, broken JSON) has no UTF-8 form: it goes as it is, and the server answers that task
    alone with `bad_input`, where redis-py's encoder would fail the call and every call sharing its
    round trip."""
    if isinstance(text, str):
        return text.encode("utf-8", "surrogatepass")
    if isinstance(text, bytes | bytearray | memoryview):
        return text
    raise TypeError(f"input {index} must be str (or bytes of a split payload), not {type(text).__name__}")


class ECTransError(Exception):
    """Base of the client's errors."""


class TaskFailed(ECTransError):
    """The server answered a task with an error result (`index`: its input's position, where known)."""

    def __init__(self, result: TaskResult, index: int | None = None) -> None:
        super().__init__(f"task {result.id} failed ({result.reason}): {result.error}")
        self.result = result
        self.reason = result.reason
        self.error = result.error
        self.index = index


class TaskTimeout(ECTransError, TimeoutError):
    """No terminal record arrived in time (the task may still finish; its result hash will hold it)."""


class ConnectionLost(ECTransError, RedisConnectionError):
    """Redis stayed unreachable for the client's `reconnect_timeout` while tasks waited for their
    records. A redis-py `ConnectionError` too, as a command on a Redis that went away raises. The
    tasks may still finish once Redis is back (their result hashes will hold them); the client
    reconnects by itself for later calls."""


@dataclass
class TaskResult:
    """A task's terminal record."""

    id: str
    status: str
    output: Any = None
    error: str | None = None
    reason: str | None = None
    task_class: str = ""
    latency_ms: float = 0.0
    fields: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def raise_for_status(self) -> TaskResult:
        if not self.ok:
            raise TaskFailed(self)
        return self

    @classmethod
    def from_fields(cls, raw: dict[bytes, bytes]) -> TaskResult:
        f = {k.decode(): v for k, v in raw.items()}
        text = {k: v.decode("utf-8", "replace") for k, v in f.items() if k != "output"}
        output: Any = None
        if "output" in f:
            output = codec.unpackb(f["output"]) if text.get("encoding") == "msgpack" else f["output"].decode()
        return cls(
            id=text.get("id", ""),
            status=text.get("status", "error"),
            output=output,
            error=text.get("error"),
            reason=text.get("reason"),
            task_class=text.get("class", ""),
            latency_ms=float(text.get("latency_ms", 0) or 0),
            fields=text,
        )


class TaskHandle:
    """One submitted task. `await handle` (or `await handle.result(timeout)`) gives its terminal record;
    `await handle.cancel()` asks workers to drop it if they have not started it: the record then says
    `cancelled` (or is the result, for a task already running)."""

    def __init__(self, client: AsyncClient, task_id: str, future: asyncio.Future[TaskResult]) -> None:
        self.id = task_id
        self.future = future
        self._client = client

    def done(self) -> bool:
        return self.future.done()

    def __await__(self) -> Generator[Any, None, TaskResult]:
        return self.result().__await__()

    async def result(self, timeout: float | None = None) -> TaskResult:
        """The terminal record; TaskTimeout if none came within `timeout` (the handle stays usable)."""
        try:
            return await asyncio.wait_for(asyncio.shield(self.future), timeout)
        except TimeoutError:
            raise TaskTimeout(f"task {self.id} unanswered after {timeout}s") from None

    async def cancel(self) -> None:
        await self._client.cancel([self.id])

    def __repr__(self) -> str:
        return f"TaskHandle({self.id!r}, done={self.done()})"


async def _all_results(futures: Sequence[asyncio.Future[TaskResult]], fail_fast: bool) -> list[TaskResult]:
    """Every future's result, in order; with `fail_fast`, TaskFailed at the first error to arrive (the
    unanswered futures cancelled). One callback per future, as `gather` adds: no task per input."""
    everything = asyncio.gather(*futures)
    if not fail_fast:
        return list(await everything)
    failed: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def check(index: int, future: asyncio.Future[TaskResult]) -> None:
        # A future failed with an exception (ConnectionLost) ends `everything` itself.
        if not failed.done() and not future.cancelled() and future.exception() is None and not future.result().ok:
            failed.set_result(index)

    for index, future in enumerate(futures):
        future.add_done_callback(functools.partial(check, index))
    first: list[asyncio.Future[Any]] = [everything, failed]
    try:
        await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not everything.done():  # cancelled, or a task failed: stop waiting for the rest
            everything.cancel()
    if failed.done():
        index = failed.result()
        raise TaskFailed(futures[index].result(), index)
    failed.cancel()
    return list(everything.result())


class AsyncClient:
    """Asyncio client; many tasks in flight share one reply stream and one reader loop."""

    def __init__(
        self,
        url: str | None = None,
        *,
        prefix: str | None = None,
        client_id: str | None = None,
        reconnect_timeout: float | None = RECONNECT_TIMEOUT_S,
    ) -> None:
        """`reconnect_timeout`: how long a Redis that went away may stay unreachable before the calls
        waiting for records fail with `ConnectionLost` (a shorter outage, a restart, is ridden out);
        None: they wait for their own timeouts."""
        if url is None or prefix is None:  # $ECTRANS_REDIS_URL/_PREFIX, else the stack `ectrans up` runs here
            settings = with_local_stack(CommonSettings(), url)  # a given URL keeps the local stack's prefix out
            url, prefix = url or settings.redis_url, prefix or settings.prefix
        self.url = url
        self.keys = Keys(prefix)
        self.client_id = client_id or uuid.uuid4().hex
        self.reconnect_timeout = reconnect_timeout
        self.reply_stream = self.keys.reply(self.client_id)
        self._redis: RedisClient | None = None
        self._reader_redis: RedisClient | None = None
        self._sender: Sender | None = None
        self._connecting = asyncio.Lock()
        self._waiting: dict[str, asyncio.Future[TaskResult]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._closing = False
        self._cancelling: set[asyncio.Task[None]] = set()  # cancel marks being written for abandoned calls
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop its connections and tasks belong to

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        self._check_loop()
        async with self._connecting:  # many first calls at once connect once
            if self._redis is None:
                name = f"ectrans-client-{self.client_id[:8]}"
                redis = connect(self.url, client_name=name)
                # The blocking reader gets its own connection so submissions never wait behind it. Its
                # loop pauses and retries by itself, and must see a loss at once to time the outage:
                # redis-py's back-off (seconds) would also hold up a close() while Redis is gone.
                reader = connect(self.url, client_name=name, retries=0)
                try:
                    await redis.ping()
                except BaseException:
                    await redis.aclose()
                    await reader.aclose()
                    raise
                self._reader_redis = reader
                self._sender = Sender(redis)
                self._sender.start()
                self._redis = redis
                self._loop = asyncio.get_running_loop()
                self._closing = False
                self._reader = asyncio.create_task(self._read_replies())

    async def close(self) -> None:
        self._check_loop()
        if self._cancelling:  # cancel marks of abandoned calls go out before the writer closes
            await asyncio.wait(set(self._cancelling), timeout=2)
        unanswered = [task_id for task_id, fut in self._waiting.items() if not fut.done()]
        if unanswered and self._sender is not None:  # no one will read their records: drop what has not started
            await self.cancel(unanswered)
        if self._sender is not None:
            await self._sender.close()  # what callers queued still goes out
            self._sender = None
        if self._reader is not None:
            # redis-py can swallow a cancel during a blocking XREAD, so the reader is stopped
            # cooperatively: the flag ends its loop, dropping its connection ends the wait.
            self._closing = True
            if self._reader_redis is not None:
                await disconnect(self._reader_redis)
            with contextlib.suppress(TimeoutError, asyncio.CancelledError, RedisConnectionError):
                await asyncio.wait_for(self._reader, BLOCK_MS / 1000 + 2)
            self._reader = None
        for fut in self._waiting.values():
            if not fut.done():  # their callers get an error, not a cancellation they never asked for
                fut.set_exception(SenderClosed("the client was closed before this task's record arrived"))
                fut.exception()  # read now: a handle no one awaits any more is nothing to log
        self._waiting.clear()
        if self._redis is not None:
            with contextlib.suppress(Exception):  # a courtesy: bounded, as Redis may be stopping too
                await asyncio.wait_for(self._redis.delete(self.reply_stream), FAREWELL_S)
            await self._redis.aclose()
            self._redis = None
        if self._reader_redis is not None:
            await self._reader_redis.aclose()
            self._reader_redis = None
        self._loop = None  # closed: free to connect again on any loop

    async def _ready(self) -> None:
        """Connected, on the running event loop."""
        self._check_loop()
        if self._sender is None:
            await self.connect()

    def _check_loop(self) -> None:
        """A client's connections and its reader and writer tasks belong to the event loop it connected
        on. Once that loop has ended (a second `asyncio.run` with one client) the client starts afresh
        on the running one; while that loop is still open, a call from another one gets a clear error
        instead of waiting forever on a writer that never runs."""
        loop = asyncio.get_running_loop()
        if self._loop is None or self._loop is loop:
            return
        if not self._loop.is_closed():
            raise ECTransError(
                "this AsyncClient is connected on another event loop that is still open: use one "
                "AsyncClient per event loop (or close it there first), or the sync Client from any thread"
            )
        # Its connections, tasks and waiters went with the ended loop; nothing of them can run again.
        self._redis = self._reader_redis = None
        self._sender, self._reader = None, None
        self._waiting.clear()
        self._cancelling.clear()
        self._connecting = asyncio.Lock()
        self._loop = None

    async def _read_replies(self) -> None:
        assert self._reader_redis is not None
        try:
            last = "0-0"
            unread, trimmed_at = 0, time.monotonic()  # entries read since the stream was last trimmed
            reached = time.monotonic()  # when Redis last answered a read
            while not self._closing:
                try:
                    reply: Any = await self._reader_redis.xread({self.reply_stream: last}, count=1000, block=BLOCK_MS)
                except (RedisConnectionError, RedisTimeoutError) as exc:
                    if not self._closing:
                        self._fail_after_outage(time.monotonic() - reached, exc)
                        await asyncio.sleep(random.uniform(0.1, 0.5))
                    continue
                except Exception:  # the reader must outlive any surprise, or every waiter would hang
                    logger.exception("[client] reply reader error; retrying")
                    await asyncio.sleep(random.uniform(0.1, 1.0))
                    continue
                reached = time.monotonic()
                for _, entries in reply or []:
                    for entry_id, raw in entries:
                        last = entry_id.decode()
                        unread += 1
                        self._resolve(last, raw)
                # Trimming is housekeeping, done now and then rather than after every read: a command
                # sent here would go out before the callers just answered get to run.
                if unread >= TRIM_EVERY or (unread and time.monotonic() - trimmed_at >= TRIM_AFTER_S):
                    with contextlib.suppress(RedisError, SenderClosed):  # results are delivered either way
                        await self._send([("XTRIM", self.reply_stream, "MINID", "=", _next_id(last))])
                    unread, trimmed_at = 0, time.monotonic()
        except asyncio.CancelledError:
            if not self._closing:  # cancelled with its event loop (asyncio.run ending, no close())
                await self._close_connections()  # while that loop still runs: it cannot be done later
            raise

    def _fail_after_outage(self, unreachable_s: float, cause: Exception) -> None:
        """Once Redis has been unreachable for `reconnect_timeout`, the calls waiting for records get
        `ConnectionLost` now rather than a `TaskTimeout` at the end of their own timeouts."""
        if self.reconnect_timeout is None or unreachable_s < self.reconnect_timeout:
            return
        waiting = [fut for fut in self._waiting.values() if not fut.done()]
        self._waiting.clear()
        message = f"Redis unreachable for {unreachable_s:.1f}s while waiting for task records ({cause})"
        for fut in waiting:
            fut.set_exception(ConnectionLost(message))
            fut.exception()  # read now: a handle no one awaits any more is nothing to log
        if waiting:
            logger.warning("[client] %s: %d tasks failed with ConnectionLost", message, len(waiting))

    async def _close_connections(self) -> None:
        for redis in (self._redis, self._reader_redis):
            if redis is not None:
                with contextlib.suppress(Exception):
                    await redis.aclose()

    def _resolve(self, entry_id: str, raw: dict[bytes, bytes]) -> None:
        """Resolve the task a reply entry answers. An entry that is no record (anyone allowed to write
        reply streams could add one) is skipped: it must not stop the reader every waiter relies on."""
        try:
            result = TaskResult.from_fields(raw)
        except Exception as exc:
            logger.warning("[client] skipped reply entry %s that is no task record: %r", entry_id, exc)
            return
        fut = self._waiting.pop(result.id, None)
        if fut is not None and not fut.done():
            fut.set_result(result)

    async def submit_tasks(
        self,
        model: str,
        op: str,
        inputs: Sequence[str | bytes] | str | bytes,
        *,
        priority: str | None = None,
        deadline_ms: int | None = None,
        on_miss: str | None = None,
        params: dict[str, int] | None = None,
        segment: int = 0,
        revision: str = "",
        truncate: bool = False,
    ) -> list[TaskHandle]:
        """Submit one task per input (one round trip, shared with concurrent calls) and return at once
        with a handle per task: await it (or `.result(timeout)`), `.cancel()` it, or pass the handles
        to `as_completed` / `wait`.

        With `segment` k > 0 the inputs are split payloads: the state after the model's first k
        units, computed by the caller with model `revision` (see `ectrans.split`). `truncate` cuts
        an input over the model's token limit instead of having it refused."""
        inputs = _one_per_input(inputs)
        payloads = [_wire_input(index, text) for index, text in enumerate(inputs)]  # a TypeError sends nothing
        await self._ready()
        loop = asyncio.get_running_loop()
        # Ids start with the client's id, so a per-tenant ACL (docs/security.md) can confine results
        # and cancel marks to the tenant's prefix; the random part keeps them unguessable.
        ids = [f"{self.client_id[:64]}.{os.urandom(16).hex()}" for _ in inputs]  # a quarter of uuid4's CPU
        handles = [TaskHandle(self, task_id, loop.create_future()) for task_id in ids]
        self._waiting.update((h.id, h.future) for h in handles)
        # Flat XADDs, the fields every task of the call shares built once: about a fifth less client CPU
        # per task than `xadd` with a dict per task.
        head = ("XADD", self.keys.tasks, "*", "model", model, "op", op)
        tail = self._shared_fields(priority=priority, deadline_ms=deadline_ms, on_miss=on_miss, params=params)
        if segment:
            tail += ["segment", str(segment), "revision", revision]
        if truncate:
            tail += ["truncate", "1"]
        commands = [(*head, "input", text, "id", task_id, *tail) for task_id, text in zip(ids, payloads, strict=True)]
        try:
            await self._send(commands)
        except BaseException:
            self._forget(ids)
            raise
        return handles

    async def submit_many(
        self,
        model: str,
        op: str,
        inputs: Sequence[str | bytes] | str | bytes,
        *,
        timeout: float | None = 30.0,
        fail_fast: bool = False,
        **options: Any,
    ) -> list[TaskResult]:
        """Submit one task per input and wait for all their terminal records (options as for
        `submit_tasks`). TaskTimeout if not all arrive within `timeout`; `wait` returns what did.
        With `fail_fast`, the first error record to arrive raises TaskFailed (with its input's index)
        and the unanswered tasks are cancelled: a caller that fails as a whole need not wait for them."""
        handles = await self.submit_tasks(model, op, inputs, **options)
        futures = [h.future for h in handles]
        try:
            return await asyncio.wait_for(_all_results(futures, fail_fast), timeout)
        except TimeoutError:
            unanswered = sum(f.cancelled() or not f.done() for f in futures)  # wait_for cancelled the rest
            raise TaskTimeout(f"{unanswered} of {len(handles)} tasks unanswered after {timeout}s") from None
        except (asyncio.CancelledError, TaskFailed):
            # The caller gave up (a closed HTTP request, Ctrl-C), or one failure fails the call: tasks no
            # worker has started are dropped, not computed. Written in the background: it returns at once.
            abandoned = [h.id for h in handles if h.future.cancelled() or not h.future.done()]
            if abandoned:
                writing = asyncio.create_task(self.cancel(abandoned))
                self._cancelling.add(writing)
                writing.add_done_callback(self._cancelling.discard)
            raise
        finally:
            self._forget([h.id for h in handles])

    async def as_completed(
        self, handles: Sequence[TaskHandle], timeout: float | None = None
    ) -> AsyncIterator[TaskResult]:
        """Each task's terminal record as it arrives; TaskTimeout, after those that came, when the
        rest have not within `timeout` (they are not cancelled: await or cancel their handles)."""
        pending = {h.future: h for h in handles}
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = await asyncio.wait(list(pending), timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                raise TaskTimeout(f"{len(pending)} of {len(handles)} tasks unanswered after {timeout}s")
            for future in done:
                pending.pop(future)
                yield future.result()

    async def wait(
        self, handles: Sequence[TaskHandle], timeout: float | None = None
    ) -> tuple[list[TaskResult], list[TaskHandle]]:
        """What arrived within `timeout` (in the handles' order), and the handles still waiting
        (not cancelled: await them later, or cancel them)."""
        futures = [h.future for h in handles]
        if futures:
            await asyncio.wait(futures, timeout=timeout)
        arrived = [h.future.result() for h in handles if h.future.done()]
        return arrived, [h for h in handles if not h.future.done()]

    def _forget(self, ids: Sequence[str]) -> None:
        for task_id in ids:
            self._waiting.pop(task_id, None)

    async def cancel(self, ids: Sequence[str] | str) -> None:
        """Ask workers to drop these tasks: one not started yet ends with a `cancelled` error record
        instead of running; one already running or done is unaffected. A call to `submit_many` (or
        `embed`, ...) that is itself cancelled does this for its unanswered tasks."""
        ids = [ids] if isinstance(ids, str) else ids  # one id, not one per character
        if not ids:
            return
        await self._ready()
        commands = [("SET", self.keys.cancelled(task_id), b"1", "EX", CANCEL_TTL_S) for task_id in ids]
        try:
            await self._send(commands)
        except (RedisError, SenderClosed) as exc:  # best effort: the tasks then run, and their results are dropped
            logger.warning("[client] %d tasks not cancelled: %s", len(ids), exc)

    async def _send(self, commands: Sequence[Command]) -> list[Any]:
        """Send `commands` through the client's one writer, together with every other call's; their
        replies in order. Raises SenderClosed once the client is closed."""
        if self._sender is None:
            raise SenderClosed("the client is closed")
        return await self._sender.execute(commands)

    def _shared_fields(
        self, *, priority: str | None, deadline_ms: int | None, on_miss: str | None, params: dict[str, int] | None
    ) -> list[str]:
        """Task fields after `model`, `op`, `input` and `id`, as flat field, value pairs."""
        fields = {"reply_to": self.client_id, "encoding": "msgpack"}
        if priority is not None:
            fields["priority"] = priority
        if deadline_ms is not None:
            fields["deadline_ms"] = str(deadline_ms)
        if on_miss is not None:
            fields["on_miss"] = on_miss
        fields.update({k: str(v) for k, v in (params or {}).items()})
        return [x for pair in fields.items() for x in pair]

    async def model_state(self, model: str) -> tuple[CostModel | None, dict[str, int]]:
        """What the server publishes about `model`: its fitted batch cost (None until workers have
        served enough batches) and the length of each class's queue."""
        await self._ready()
        commands: list[Command] = [("HGETALL", self.keys.cost(model))]
        commands += [("XLEN", self.keys.queue(model, task_class)) for task_class in TASK_CLASSES]
        raw, *lengths = await self._send(commands)
        cost = CostModel.from_fields({k.decode(): v.decode() for k, v in raw.items()})
        return cost, dict(zip(TASK_CLASSES, map(int, lengths), strict=True))

    async def submit(self, model: str, op: str, text: str, **options: Any) -> TaskResult:
        return (await self.submit_many(model, op, [text], **options))[0]

    async def embed(
        self,
        texts: Sequence[str] | str,
        *,
        model: str = "minilm",
        priority: str | None = None,
        deadline_ms: int | None = None,
        on_miss: str | None = None,
        timeout: float | None = 30.0,
        truncate: bool = False,
    ) -> np.ndarray:
        """Sentence embeddings, one row per text (none for no texts: shape (0, 0)); raises TaskFailed
        on any error result. `priority`, `deadline_ms`, `on_miss` and `truncate` are the task fields of
        the same names (README's task table)."""
        inputs = _one_per_input(texts)  # one text: one row
        if not inputs:
            return np.zeros((0, 0), dtype=np.float32)
        results = await self.submit_many(
            model, "embed", inputs, priority=priority, deadline_ms=deadline_ms, on_miss=on_miss, timeout=timeout,
            truncate=truncate,
        )  # fmt: skip
        return np.stack([np.asarray(r.raise_for_status().output, dtype=np.float32) for r in results])

    async def translate(
        self,
        texts: Sequence[str] | str,
        *,
        model: str,
        num_beams: int | None = None,
        max_new_tokens: int | None = None,
        priority: str | None = None,
        deadline_ms: int | None = None,
        on_miss: str | None = None,
        timeout: float | None = 60.0,
        truncate: bool = False,
    ) -> list[str]:
        """The generated text, one per input; raises TaskFailed on any error result. `num_beams` and
        `max_new_tokens` default to the model's own settings (greedy, 64 new tokens unless its entry
        says otherwise); the other options are as for `embed`."""
        params = {k: v for k, v in (("num_beams", num_beams), ("max_new_tokens", max_new_tokens)) if v is not None}
        results = await self.submit_many(
            model, "translate", texts, priority=priority, deadline_ms=deadline_ms, on_miss=on_miss, params=params,
            timeout=timeout, truncate=truncate,
        )  # fmt: skip
        return [str(r.raise_for_status().output["text"]) for r in results]


class SyncTaskHandle:
    """A TaskHandle for the sync `Client`: `.result(timeout)`, `.cancel()`, `.done()`."""

    def __init__(self, client: Client, handle: TaskHandle) -> None:
        self.id = handle.id
        self.handle = handle
        self._client = client

    def done(self) -> bool:
        return self.handle.done()

    def result(self, timeout: float | None = None) -> TaskResult:
        return self._client._call(self.handle.result(timeout))

    def cancel(self) -> None:
        self._client._call(self.handle.cancel())

    def __repr__(self) -> str:
        return f"SyncTaskHandle({self.id!r}, done={self.done()})"


class Client:
    """The synchronous twin of AsyncClient: same methods, run on a private event loop thread. Any
    number of threads may call one Client at once; their calls share its connections."""

    def __init__(
        self,
        url: str | None = None,
        *,
        prefix: str | None = None,
        reconnect_timeout: float | None = RECONNECT_TIMEOUT_S,
    ) -> None:
        # First: it raises if ECTRANS_STACK's stack is not here.
        self._async = AsyncClient(url, prefix=prefix, reconnect_timeout=reconnect_timeout)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ectrans-client", daemon=True)
        self._thread.start()
        try:
            self._call(self._async.connect())
        except BaseException:  # Redis unreachable: no loop thread left behind by a client never made
            self.close()
            raise

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if not self._thread.is_alive():
            coro.close()
            raise SenderClosed("the client is closed")
        started, finished = threading.Event(), threading.Event()

        async def run() -> T:
            started.set()
            try:
                return await coro
            finally:
                finished.set()

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        try:
            return future.result()
        except BaseException:
            # A caller interrupted while waiting (Ctrl-C) cancels its call, and with it its unanswered
            # tasks, as a cancelled AsyncClient call does; a call that ended on its own is unaffected.
            # Its cleanup is let to run first, so a `close()` right after still sends the cancel marks.
            future.cancel()
            if started.is_set():
                finished.wait(5)
            raise

    def submit(self, model: str, op: str, text: str, **options: Any) -> TaskResult:
        return self._call(self._async.submit(model, op, text, **options))

    def submit_many(self, model: str, op: str, inputs: Sequence[str] | str, **options: Any) -> list[TaskResult]:
        return self._call(self._async.submit_many(model, op, inputs, **options))

    def embed(self, texts: Sequence[str] | str, **options: Any) -> np.ndarray:
        return self._call(self._async.embed(texts, **options))

    def translate(self, texts: Sequence[str] | str, **options: Any) -> list[str]:
        return self._call(self._async.translate(texts, **options))

    def model_state(self, model: str) -> tuple[CostModel | None, dict[str, int]]:
        return self._call(self._async.model_state(model))

    def submit_tasks(self, model: str, op: str, inputs: Sequence[str] | str, **options: Any) -> list[SyncTaskHandle]:
        handles = self._call(self._async.submit_tasks(model, op, inputs, **options))
        return [SyncTaskHandle(self, handle) for handle in handles]

    def cancel(self, ids: Sequence[str] | str) -> None:
        self._call(self._async.cancel(ids))

    def as_completed(self, handles: Sequence[SyncTaskHandle], timeout: float | None = None) -> Iterator[TaskResult]:
        """Each task's terminal record as it arrives; TaskTimeout when the rest have not within `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        waiting = concurrent.futures.wait  # on the futures the client's loop resolves
        pending = {asyncio.run_coroutine_threadsafe(h.handle.result(), self._loop) for h in handles}
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = waiting(pending, timeout=left, return_when=concurrent.futures.FIRST_COMPLETED)
            if not done:
                for future in pending:
                    future.cancel()
                raise TaskTimeout(f"{len(pending)} of {len(handles)} tasks unanswered after {timeout}s")
            for future in done:
                yield future.result()

    def wait(
        self, handles: Sequence[SyncTaskHandle], timeout: float | None = None
    ) -> tuple[list[TaskResult], list[SyncTaskHandle]]:
        """What arrived within `timeout`, and the handles still waiting."""
        arrived, rest = self._call(self._async.wait([h.handle for h in handles], timeout))
        still = {id(h) for h in rest}
        return arrived, [h for h in handles if id(h.handle) in still]

    def close(self) -> None:
        if self._thread.is_alive():
            self._call(self._async.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
