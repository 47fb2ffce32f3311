"""The client at any concurrency: thousands of calls at once on one client, one sync client shared by
many threads, all on a few connections (the no-op model: only the path is measured)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ectrans.client import AsyncClient, Client, TaskTimeout
from ectrans.common.keys import Keys
from ectrans.common.redis_conn import RedisClient, connect, is_cluster
from ectrans.common.registry import ModelSpec, build_spec
from ectrans.models.noop import NoopExecutor
from ectrans.sender import Sender, SenderClosed
from tests.stack import running_stack, stack_in_thread
from tests.tiny_encoders import HIDDEN, SENTENCES, make_tiny_bert

NOOP: ModelSpec = build_spec("noop", {"kind": "noop"})
CONCURRENT_CALLS = 10_000


@asynccontextmanager
async def noop_stack(redis_url: str, prefix: str) -> AsyncIterator[None]:
    async with running_stack(redis_url, prefix, {"noop": NOOP}, {"noop": NoopExecutor(NOOP)}):
        yield


async def connections_named(redis_url: str, name: str) -> int:
    """How many connections the server holds under a client name (single Redis only)."""
    admin = connect(redis_url)
    try:
        listing = await admin.client_list()
        return sum(1 for entry in listing if entry.get("name") == name)
    finally:
        await admin.aclose()


def client_name(client: AsyncClient) -> str:
    return f"ectrans-client-{client.client_id[:8]}"


def test_ten_thousand_concurrent_submits_share_two_connections(redis_url: str, prefix: str) -> None:
    """Each call a separate `submit`, all at once: every task answered, with the client holding its
    writer's and its reader's connection only (a connection per call hits redis-py's pool limit)."""

    async def scenario() -> None:
        async with noop_stack(redis_url, prefix), AsyncClient(redis_url, prefix=prefix) as client:
            texts = [f"text {i}" for i in range(CONCURRENT_CALLS)]
            results = await asyncio.gather(*(client.submit("noop", "noop", t, timeout=120) for t in texts))
            assert all(r.ok for r in results), [r for r in results if not r.ok][:3]
            assert [r.output["chars"] for r in results] == [len(t) for t in texts]
            assert client._sender is not None and client._sender.flushes < CONCURRENT_CALLS / 10  # coalesced
            assert client._redis is not None
            if not is_cluster(client._redis):
                assert await connections_named(redis_url, client_name(client)) <= 2

    asyncio.run(scenario())


def test_ten_thousand_concurrent_embeds_and_model_state(redis_url: str, prefix: str, tmp_path: Path) -> None:
    """`embed` calls (a tiny BERT) and `model_state` calls, all at once on one client."""
    from ectrans.models.loader import load_executor

    spec = build_spec("bert", {"path": str(make_tiny_bert(tmp_path / "bert"))})
    executor = load_executor(spec, device="cpu", threads=1)

    async def scenario() -> None:
        async with (
            running_stack(redis_url, prefix, {"bert": spec}, {"bert": executor}),
            AsyncClient(redis_url, prefix=prefix) as client,
        ):
            texts = [SENTENCES[i % len(SENTENCES)] for i in range(CONCURRENT_CALLS)]
            embeds = asyncio.gather(*(client.embed([t], model="bert", timeout=300, truncate=True) for t in texts))
            states = asyncio.gather(*(client.model_state("bert") for _ in range(100)))
            vectors, lengths = await asyncio.gather(embeds, states)
            by_text = {t: v for t, v in zip(texts, vectors, strict=True)}
            for text, vector in zip(texts, vectors, strict=True):  # the same text, the same vector
                assert vector.shape == (1, HIDDEN) and np.allclose(vector, by_text[text], atol=1e-5)
            assert all(set(state) == {"realtime", "batch"} for _, state in lengths)
            cost, _ = await client.model_state("bert")
            assert cost is not None and cost.realtime_lane  # on a CPU: admission predicts no segment wait

    try:
        asyncio.run(scenario())
    finally:
        executor.close()


def test_many_threads_share_one_sync_client(redis_url: str, prefix: str) -> None:
    """200 threads (past the pool's 100), released together, each submitting on the same Client."""
    threads_count, per_thread = 200, 5
    barrier = threading.Barrier(threads_count)
    answers: dict[int, list[str]] = {}
    errors: list[BaseException] = []

    with (
        stack_in_thread(redis_url, prefix, {"noop": NOOP}, {"noop": NoopExecutor(NOOP)}),
        Client(redis_url, prefix=prefix) as client,
    ):

        def user(n: int) -> None:
            try:
                barrier.wait(30)
                texts = [f"user {n} call {i}" for i in range(per_thread)]
                results = [client.submit("noop", "noop", t, timeout=120) for t in texts]
                answers[n] = [str(r.output["chars"]) if r.ok else str(r.error) for r in results]
            except BaseException as exc:  # reported below with the thread's number
                errors.append(exc)

        workers = [threading.Thread(target=user, args=(n,)) for n in range(threads_count)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join(180)

    assert not errors, errors[:3]
    assert answers == {n: [str(len(f"user {n} call {i}")) for i in range(per_thread)] for n in range(threads_count)}


def test_sender_coalesces_and_drops_cancelled_calls(redis_url: str, prefix: str) -> None:
    """Calls queued while a round trip is out go in the next one together; a call cancelled before
    its turn is never sent; an error reply fails only the call it belongs to."""

    async def scenario(redis: RedisClient) -> None:
        sender = Sender(redis)
        sender.start()
        key = f"{prefix}counter"
        calls = [asyncio.create_task(sender.execute([("INCR", key)])) for _ in range(50)]
        dropped = asyncio.create_task(sender.execute([("INCRBY", key, 1000)]))
        dropped.cancel()
        bad = asyncio.create_task(sender.execute([("INCR", key), ("HGET", key, "field")]))  # wrong type
        replies = await asyncio.gather(*calls)
        assert sorted(r[0] for r in replies) == list(range(1, 51))
        with pytest.raises(Exception, match="WRONGTYPE"):
            await bad
        assert sender.flushes <= 2 and sender.largest_flush >= 50
        assert await redis.get(key) == b"51"  # the cancelled INCRBY never went out
        await sender.close()
        with pytest.raises(SenderClosed):
            await sender.execute([("PING",)])

    async def main() -> None:
        redis = connect(redis_url)
        try:
            await scenario(redis)
        finally:
            await redis.aclose()

    asyncio.run(main())


def test_a_burst_of_submissions_wakes_a_blocked_reader_once_with_all_of_them(redis_url: str, prefix: str) -> None:
    """Clients answered together resubmit together: the dispatcher blocked on the ingress stream must
    read the whole burst at once, not its first task alone (the worker would run a batch of one);
    each XADD keeps its own reply and error."""

    async def scenario(redis: RedisClient, reader: RedisClient) -> None:
        sender = Sender(redis)
        sender.start()
        stream, other = f"{prefix}tasks", f"{prefix}other"
        await redis.set(other, "not a stream")

        async def read_once() -> Any:
            return await reader.xread({stream: "$"}, count=100, block=5000)

        blocked = asyncio.create_task(read_once())
        await asyncio.sleep(0.2)  # the reader is blocked before the burst
        calls = [asyncio.create_task(sender.execute([("XADD", stream, "*", "n", n)])) for n in range(20)]
        wrong = asyncio.create_task(sender.execute([("XADD", other, "*", "n", "x")]))
        replies = await asyncio.gather(*calls)
        assert len({r[0] for r in replies}) == 20
        with pytest.raises(Exception, match="WRONGTYPE"):
            await wrong
        got = await blocked
        entries = got[0][1] if isinstance(got, list) else got[stream.encode()][0]
        if is_cluster(redis):  # a pipeline spans slots there: no transaction, the reader wakes at the first
            assert len(entries) >= 1
        else:
            assert len(entries) == 20
        await sender.close()

    async def main() -> None:
        redis, reader = connect(redis_url), connect(redis_url)
        try:
            await scenario(redis, reader)
        finally:
            await redis.aclose()
            await reader.aclose()

    asyncio.run(main())


def test_a_user_whose_acl_refuses_multi_submits_each_task_once(redis_url: str, prefix: str) -> None:
    """An ACL written before submissions went out in MULTI/EXEC: bursts go out as a plain pipeline,
    every XADD once (a refused MULTI would run them outside it and report an error)."""
    admin = connect(redis_url)
    if is_cluster(admin):
        asyncio.run(admin.aclose())
        pytest.skip("ACL users are per node on a cluster")
    user, stream = f"{prefix.rstrip(':')}-no-multi", f"{prefix}tasks"

    async def scenario() -> None:
        await admin.execute_command(
            "ACL", "SETUSER", user, "reset", "on", ">pw", f"~{prefix}*", "+@connection", "+xadd", "+xlen"
        )
        limited = connect(redis_url.replace("redis://", f"redis://{user}:pw@", 1))
        sender = Sender(limited)
        sender.start()
        try:
            replies = await asyncio.gather(*(sender.execute([("XADD", stream, "*", "n", n)]) for n in range(20)))
            assert len({r[0] for r in replies}) == 20
            assert await admin.xlen(stream) == 20
            await sender.close()
        finally:
            await limited.aclose()
            await admin.execute_command("ACL", "DELUSER", user)
            await admin.aclose()

    asyncio.run(scenario())


# Task handles: submit now, collect later ----------------------------------------------------------------

SLOW: ModelSpec = build_spec("slow", {"kind": "noop", "delay_ms": 400})


def test_task_handles_wait_as_completed_and_cancel(redis_url: str, prefix: str) -> None:
    """A slow device (one batch at a time, 400 ms each): handles can be awaited, time out without
    being lost, stream out as they complete, come back partially from `wait`, and a handle cancelled
    before its batch starts ends with a `cancelled` record that the model never computed."""
    worker = {"max_inflight_batches": 1, "batch_max_batch": 1, "rt_max_batch": 1}

    async def scenario() -> None:
        stack = running_stack(redis_url, prefix, {"slow": SLOW}, {"slow": NoopExecutor(SLOW)}, worker=worker)
        async with stack, AsyncClient(redis_url, prefix=prefix) as client:
            first, second, third, fourth = await client.submit_tasks(
                "slow", "noop", ["a", "bb", "ccc", "dddd"], priority="batch"
            )
            assert all(h.id.startswith(f"{client.client_id}.") for h in (first, second, third, fourth))
            with pytest.raises(TaskTimeout):
                await first.result(timeout=0.05)  # not lost: awaited again below
            await fourth.cancel()  # queued behind three 400 ms batches: dropped before it runs
            arrived, pending = await client.wait([first, second, third], timeout=0.6)
            assert [r.output["chars"] for r in arrived] == [1] and pending == [second, third]
            streamed = [r.output["chars"] async for r in client.as_completed(pending, timeout=10)]
            assert sorted(streamed) == [2, 3]
            assert (await first).output["chars"] == 1
            cancelled = await fourth
            assert cancelled.reason == "cancelled" and cancelled.output is None
            late = await client.submit_tasks("slow", "noop", ["x"] * 3)
            with pytest.raises(TaskTimeout):
                async for _ in client.as_completed(late, timeout=0.5):
                    pass
            assert [r.ok for r in await asyncio.gather(*late)] == [True] * 3

    asyncio.run(scenario())


def test_sync_handles(redis_url: str, prefix: str) -> None:
    with (
        stack_in_thread(redis_url, prefix, {"noop": NOOP}, {"noop": NoopExecutor(NOOP)}),
        Client(redis_url, prefix=prefix) as client,
    ):
        handles = client.submit_tasks("noop", "noop", ["a", "bb", "ccc"])
        assert sorted(r.output["chars"] for r in client.as_completed(handles, timeout=30)) == [1, 2, 3]
        assert handles[1].result(timeout=5).output["chars"] == 2
        arrived, pending = client.wait(handles, timeout=5)
        assert len(arrived) == 3 and pending == []


def test_fail_fast_raises_at_the_first_error_to_arrive_and_cancels_the_rest() -> None:
    """`submit_many(fail_fast=True)` waits for one error, not for every task (the gateway's requests
    fail as a whole); without it, every result comes back, errors included."""
    from ectrans.client import TaskFailed, TaskResult, _all_results

    async def scenario(fail_fast: bool) -> tuple[list[TaskResult] | TaskFailed, list[asyncio.Future[TaskResult]]]:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[TaskResult]] = [loop.create_future() for _ in range(3)]
        waiting = asyncio.create_task(_all_results(futures, fail_fast))
        futures[0].set_result(TaskResult("a", "ok"))
        futures[2].set_result(TaskResult("c", "error", reason="overloaded"))
        await asyncio.sleep(0.01)
        if not waiting.done():
            futures[1].set_result(TaskResult("b", "ok"))
        try:
            return await waiting, futures
        except TaskFailed as failure:
            return failure, futures

    failure, futures = asyncio.run(scenario(True))
    assert isinstance(failure, TaskFailed) and failure.index == 2 and failure.reason == "overloaded"
    assert futures[1].cancelled()  # the unanswered task: submit_many cancels it on the server too
    results, _ = asyncio.run(scenario(False))
    assert isinstance(results, list) and [r.id for r in results] == ["a", "b", "c"]


def test_embed_and_translate_take_the_same_task_options_async_and_sync(redis_url: str, prefix: str) -> None:
    """`deadline_ms` and `on_miss` reach the task from `translate` as from `embed`, on both clients
    (`translate` had neither). No stack runs: the tasks stay unanswered and are read back as sent."""

    async def sent_fields() -> list[dict[bytes, bytes]]:
        redis = connect(redis_url)
        try:
            entries: Any = await redis.xrange(Keys(prefix).tasks)
            return [fields for _, fields in entries]
        finally:
            await redis.aclose()

    async def on_the_async_client() -> None:
        async with AsyncClient(redis_url, prefix=prefix) as client:
            with pytest.raises(TaskTimeout):
                await client.translate("hi", model="m", deadline_ms=900, on_miss="batch", num_beams=2, timeout=0.05)
            with pytest.raises(TaskTimeout):
                await client.embed("hi", model="m", deadline_ms=800, on_miss="batch", timeout=0.05)

    asyncio.run(on_the_async_client())
    with Client(redis_url, prefix=prefix) as client, pytest.raises(TaskTimeout):
        client.translate(["hi"], model="m", deadline_ms=700, on_miss="error", max_new_tokens=5, timeout=0.05)
    sent = [(f[b"op"], f[b"deadline_ms"], f[b"on_miss"]) for f in asyncio.run(sent_fields())]
    assert sent == [(b"translate", b"900", b"batch"), (b"embed", b"800", b"batch"), (b"translate", b"700", b"error")]


def test_a_redis_that_goes_away_fails_waiting_calls_soon_and_the_client_reconnects_after() -> None:
    """Redis killed under calls waiting for records: after `reconnect_timeout` (not their own 30 s
    timeouts) they raise ConnectionLost, a redis-py ConnectionError as its users expect; once Redis
    is back on its port, the same client submits again without being remade."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from ectrans.client import ConnectionLost
    from ectrans.local.redis_server import RedisServer

    server = RedisServer().start()

    async def scenario() -> None:
        async with AsyncClient(server.url, prefix="lost:", reconnect_timeout=0.5) as client:
            handle, *_ = await client.submit_tasks("m", "embed", ["a"])  # no stack: no answer will come
            waiting = asyncio.create_task(client.submit_many("m", "embed", ["b", "c"], fail_fast=True))
            await asyncio.sleep(0.2)
            await asyncio.to_thread(server.stop, kill=True)
            started = time.monotonic()
            with pytest.raises(ConnectionLost) as lost:
                await handle.result(timeout=30)
            assert time.monotonic() - started < 3 and isinstance(lost.value, RedisConnectionError)
            with pytest.raises(ConnectionLost):
                await waiting
            await asyncio.to_thread(server.start)  # the same port
            assert len(await client.submit_tasks("m", "embed", ["d"])) == 1
            assert await client._send([("XLEN", client.keys.tasks)]) == [1]  # a fresh Redis: only the new one

    try:
        asyncio.run(scenario())
    finally:
        server.stop()
