"""Hostile and broken clients against a running stack (plain XADDs, as redis-cli would send them):
nothing one client sends may cost another task its result. Each test states the exact invariant:
who gets which terminal record, under which key, on which reply stream.

With `ECTRANS_TEST_REDIS=cluster` every test here runs against a 3-master Redis Cluster too."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from redis.exceptions import ResponseError

from ectrans.client import AsyncClient
from ectrans.common import codec
from ectrans.common.registry import ModelSpec, build_spec
from ectrans.common.schemas import Limits, Reason, Task, TaskError, parse_task
from ectrans.common.split import SPLIT_FORMAT, check_split, pack_activation
from ectrans.models.api import BatchStats, Executor, ItemResult, Request
from ectrans.models.noop import NoopExecutor
from tests.stack import Stack, running_stack, until
from tests.tiny_encoders import make_tiny_bert

NOOP: ModelSpec = build_spec("noop", {"kind": "noop"})
RAN: list[int] = []  # payloads the split property ran on the model (see the test after it)
STREAM_END = "18446744073709551615-18446744073709551615"  # the last ID a stream can hold
_unique = itertools.count()


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def records(stack: Stack, keys: Sequence[str], timeout: float = 30.0) -> dict[str, dict[str, str]]:
    return await stack.results(list(keys), timeout)


async def reply_entries(stack: Stack, client: str) -> list[dict[str, str]]:
    entries: Any = await stack.redis.xrange(stack.keys.reply(client))
    return [{text(k): text(v) for k, v in fields.items()} for _, fields in entries]


async def pipelined(stack: Stack, tasks: Sequence[Mapping[str, str | bytes]]) -> list[str]:
    """XADD every task in one round trip, in order; returns their entry IDs."""
    pipe = stack.redis.pipeline(transaction=False)
    for fields in tasks:
        entry: Any = fields
        pipe.xadd(stack.keys.tasks, entry)
    return [text(entry_id) for entry_id in await pipe.execute()]


# 1. Client ids and entry IDs never share a record -----------------------------------------------------


def test_ids_shaped_like_entry_ids_cannot_take_the_results_of_later_tasks(redis_url: str, prefix: str) -> None:
    """An attacker pushes tasks whose `id` is each millisecond of the next second (an unknown model,
    so they are answered at once): the honest tasks XADDed meanwhile must each get their own result
    under their entry ID, and the attacker's get `bad_input` under theirs."""

    async def scenario() -> None:
        async with running_stack(redis_url, prefix, {"noop": NOOP}, {"noop": NoopExecutor(NOOP)}) as stack:
            seconds, micros = await stack.redis.time()
            now_ms = int(seconds) * 1000 + int(micros) // 1000
            planted = [
                {"model": "nosuchmodel", "op": "noop", "input": "x", "id": f"{ms}-{seq}"}
                for ms in range(now_ms + 20, now_ms + 1020)
                for seq in (0, 1)
            ]
            attacker = await pipelined(stack, planted)
            honest: list[str] = []
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:  # XADD * inside the planted millisecond range
                honest += await pipelined(stack, [{"model": "noop", "op": "noop", "input": "honest"}] * 2)
                await asyncio.sleep(0.004)
            got = await records(stack, honest + attacker)
            for entry_id in honest:
                assert got[entry_id]["status"] == "ok", got[entry_id]
                assert got[entry_id]["id"] == entry_id and got[entry_id]["output"] == '{"chars": 6}'
            for entry_id in attacker:
                assert got[entry_id]["reason"] == Reason.BAD_INPUT, got[entry_id]
                assert "stream entry ID" in got[entry_id]["error"]

    asyncio.run(scenario())


def test_a_duplicate_id_gets_duplicate_id_never_the_owners_record(redis_url: str, prefix: str) -> None:
    """The first task to name an id owns it. A later one naming it (finished or still in flight,
    valid or not) is answered `duplicate_id` under its own entry ID and on its own reply stream;
    the owner's record and reply stay the owner's."""

    async def scenario() -> None:
        async with running_stack(redis_url, prefix, {"noop": NOOP}, {"noop": NoopExecutor(NOOP)}) as stack:
            owner = {"model": "noop", "op": "noop", "input": "owner", "reply_to": "owner-c"}
            done = await pipelined(stack, [{**owner, "id": "job-done"}])
            assert (await records(stack, ["job-done"]))["job-done"]["status"] == "ok"
            intruders = [
                {"model": "noop", "op": "noop", "input": "intruder!", "reply_to": "thief-c", "id": "job-done"},
                {"model": "nosuchmodel", "op": "noop", "input": "x", "reply_to": "thief-c", "id": "job-done"},
            ]
            # Same read: the owner comes first in the stream, so it owns `job-live`.
            live = await pipelined(
                stack,
                [
                    *intruders,
                    {**owner, "id": "job-live"},
                    {**intruders[0], "id": "job-live"},
                    {**intruders[1], "id": "job-live"},
                ],
            )
            entries = [live[0], live[1], live[3], live[4]]
            got = await records(stack, ["job-done", "job-live", *entries])
            for task_id in ("job-done", "job-live"):
                assert got[task_id]["status"] == "ok" and got[task_id]["output"] == '{"chars": 5}', got[task_id]
            for entry_id, requested in zip(entries, ["job-done", "job-done", "job-live", "job-live"], strict=True):
                record = got[entry_id]
                assert record["reason"] == Reason.DUPLICATE_ID and record["id"] == entry_id, record
                assert record["requested_id"] == requested
            owner_replies = await reply_entries(stack, "owner-c")
            assert sorted(r["id"] for r in owner_replies) == ["job-done", "job-live"]
            assert all(r["status"] == "ok" for r in owner_replies)
            thief_replies = await reply_entries(stack, "thief-c")
            assert sorted(r["id"] for r in thief_replies) == sorted(entries), "never the owner's record"
            assert all(r["reason"] == Reason.DUPLICATE_ID for r in thief_replies)
            assert done  # the owner's first entry was answered once, under its id

    asyncio.run(scenario())


def test_keys_planted_where_results_go_cost_no_task_its_result(redis_url: str, prefix: str) -> None:
    """A client whose ACL covers `result:*` (the base client user on Redis 6.2, or no ACL) SETs a
    string at the result key of each entry ID of the next second, and a string and a stream at the
    keys of two ids a client will use. Neither is a record: every honest task still gets its own
    result under its key, once, and on its reply stream; the two ids stay their tasks'."""

    async def scenario() -> None:
        async with running_stack(redis_url, prefix, {"noop": NOOP}, {"noop": NoopExecutor(NOOP)}) as stack:
            keys, redis = stack.keys, stack.redis
            seconds, micros = await redis.time()
            now_ms = int(seconds) * 1000 + int(micros) // 1000
            pipe = redis.pipeline(transaction=False)
            for ms in range(now_ms + 20, now_ms + 1020):
                for seq in (0, 1):
                    pipe.set(keys.result(f"{ms}-{seq}"), "planted")
            await pipe.execute()
            await redis.set(keys.result("job-a"), "planted")
            await redis.xadd(keys.result("job-b"), {"status": "ok", "output": "forged"})
            task = {"model": "noop", "op": "noop", "input": "honest", "reply_to": "honest-c"}
            named = await pipelined(stack, [{**task, "id": "job-a"}, {**task, "id": "job-b"}])
            honest: list[str] = []
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:  # XADD * inside the planted millisecond range
                honest += await pipelined(stack, [task] * 2)
                await asyncio.sleep(0.004)
            got = await records(stack, [*honest, "job-a", "job-b"])
            for task_id in [*honest, "job-a", "job-b"]:
                assert got[task_id]["status"] == "ok" and got[task_id]["output"] == '{"chars": 6}', got[task_id]
                assert got[task_id]["id"] == task_id
            assert len(named) == 2
            replies = await reply_entries(stack, "honest-c")
            assert sorted(r["id"] for r in replies) == sorted([*honest, "job-a", "job-b"])

    asyncio.run(scenario())


def test_an_entry_at_the_last_possible_id_stops_submissions_only_until_it_is_answered(
    redis_url: str, prefix: str
) -> None:
    """A client XADDs to the ingress stream at the last possible ID: until the dispatcher has answered
    it, every other XADD is refused by Redis (its client knows: nothing is lost). Then the stream's
    last ID is back at the clock: later tasks get IDs of now and their results, and the tasks sent
    before the attack keep theirs."""

    async def scenario() -> None:
        async with running_stack(redis_url, prefix, {"noop": NOOP}, {"noop": NoopExecutor(NOOP)}) as stack:
            task = {"model": "noop", "op": "noop", "input": "honest", "reply_to": "honest-c"}
            before = await pipelined(stack, [task] * 5)
            planted: Any = {**task, "input": "x"}
            attacker = text(await stack.redis.xadd(stack.keys.tasks, planted, id=STREAM_END))
            assert attacker == STREAM_END
            assert (await records(stack, [STREAM_END]))[STREAM_END]["status"] == "ok"

            async def accepted() -> bool:
                try:
                    await stack.redis.xadd(stack.keys.tasks, {"model": "noop", "op": "noop", "input": "probe"})
                except ResponseError:
                    return False
                return True

            await until(accepted, 10, "the ingress stream takes entries again")
            after = await pipelined(stack, [task] * 5)
            seconds, _ = await stack.redis.time()
            assert all(abs(int(entry_id.split("-")[0]) // 1000 - int(seconds)) < 60 for entry_id in after)
            got = await records(stack, [*before, *after])
            assert all(got[t]["status"] == "ok" and got[t]["output"] == '{"chars": 6}' for t in got), got
            replies = await reply_entries(stack, "honest-c")
            assert sorted(r["id"] for r in replies) == sorted([*before, STREAM_END, *after])
            assert stack.dispatcher.rewinder.rewound == 1

    asyncio.run(scenario())


# 2. A split task is checked against its model, and a failing batch costs only the guilty task --------


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModelSpec, Executor]]:
    from ectrans.models.loader import load_executor

    path: Path = make_tiny_bert(tmp_path_factory.mktemp("bert"))
    spec = build_spec("bert", {"path": str(path)})
    executor = load_executor(spec, device="cpu", threads=1)
    yield spec, executor
    executor.close()


def raw_payload(segment: int, **arrays: Any) -> bytes:
    """A payload as a hostile client would pack it: any dtype, any shape, nothing converted."""
    return codec.packb({"format": SPLIT_FORMAT, "segment": segment, **arrays})


def split_task(spec: ModelSpec, payload: bytes, segment: int, **extra: str) -> dict[str, str | bytes]:
    return {
        "model": spec.name, "op": "embed", "input": payload, "segment": str(segment), "revision": spec.revision,
        "reply_to": "split-c", **extra,
    }  # fmt: skip


def test_split_tasks_outside_the_model_are_refused_and_their_batch_mates_run(
    redis_url: str, prefix: str, tiny_bert: tuple[ModelSpec, Executor]
) -> None:
    spec, executor = tiny_bert
    vocab, tokens = spec.vocab_size, np.array([2, 7, 9, 3], np.int32)
    good = pack_activation(1, tokens)
    bad = {
        "ids past the vocabulary": pack_activation(1, np.array([2, vocab, 3], np.int32)),
        "ids far past it": pack_activation(1, np.array([2, 2**31 - 1, 3], np.int64)),
        "type ids past the model's": pack_activation(1, tokens, types=np.array([0, 2, 0, 0], np.int32)),
        "more tokens than positions": pack_activation(1, np.full(spec.max_tokens + 1, 5, np.int32)),
        "uint64 ids that wrap to small ones": raw_payload(1, ids=np.array([2, 2**64 - 1, 3], np.uint64)),
    }

    async def scenario() -> None:
        async with running_stack(redis_url, prefix, {"bert": spec}, {"bert": executor}) as stack:
            tasks = [split_task(spec, good, 1, id=f"good-{i}") for i in range(3)]
            tasks += [split_task(spec, payload, 1, id=f"bad-{i}") for i, payload in enumerate(bad.values())]
            tasks += [{"model": "bert", "op": "embed", "input": "the cat", "id": "text-0"}]
            await pipelined(stack, tasks)
            got = await records(stack, [text(t["id"]) for t in tasks])
            for i in range(3):
                assert got[f"good-{i}"]["status"] == "ok", got[f"good-{i}"]
            assert got["text-0"]["status"] == "ok"
            for i, what in enumerate(bad):
                assert got[f"bad-{i}"]["reason"] == Reason.BAD_INPUT, (what, got[f"bad-{i}"])

    asyncio.run(scenario())


class PoisonedModel(NoopExecutor):
    """A model that fails a whole batch when one input is `poison` (as a kernel would on an input
    the checks missed): what the worker does then is under test, not the model."""

    def submit(self, request: Request) -> concurrent.futures.Future[tuple[list[ItemResult], BatchStats]]:
        if "poison" in request.inputs:
            failed: concurrent.futures.Future[tuple[list[ItemResult], BatchStats]] = concurrent.futures.Future()
            failed.set_exception(IndexError("index out of range in self"))
            return failed
        return super().submit(request)


def test_a_failing_batch_fails_only_its_guilty_task(redis_url: str, prefix: str) -> None:
    async def scenario() -> None:
        executor = PoisonedModel(NOOP)
        worker = {"batch_max_wait_ms": 200}  # all 16 in one batch
        async with running_stack(redis_url, prefix, {"noop": NOOP}, {"noop": executor}, worker=worker) as stack:
            inputs = [f"task {i}" for i in range(15)]
            inputs.insert(9, "poison")
            ids = [f"b{i}" for i in range(len(inputs))]
            tasks = [
                {"model": "noop", "op": "noop", "input": x, "id": i, "priority": "batch"}
                for x, i in zip(inputs, ids, strict=True)
            ]
            await pipelined(stack, tasks)
            got = await records(stack, ids)
            assert got["b9"]["reason"] == Reason.INTERNAL and "index out of range" in got["b9"]["error"]
            assert [got[i]["status"] for i in ids if i != "b9"] == ["ok"] * 15

    asyncio.run(scenario())


# 3. A reply stream that cannot be written costs only its own push --------------------------------------


def test_unwritable_reply_streams_cost_no_other_task_its_result(redis_url: str, prefix: str) -> None:
    """Reply streams named by some tasks are a hash and a stream at its last possible ID: those
    tasks keep their record in the result hash only; every other task of the same reads and
    batches is answered and acknowledged at once (not after the claim idle time)."""

    async def scenario() -> None:
        # No peer takes an entry over during the test: every answer comes from its first delivery.
        never = {"claim_idle_ms": 3_600_000}
        executors: dict[str, Executor] = {"noop": NoopExecutor(NOOP)}
        async with running_stack(redis_url, prefix, {"noop": NOOP}, executors, dispatcher=never, worker=never) as stack:
            keys = stack.keys
            await stack.redis.hset(keys.reply("hashed"), "not", "a stream")
            await stack.redis.xadd(keys.reply("full"), {"x": "1"}, id=STREAM_END)
            tasks: list[dict[str, str | bytes]] = []
            for i in range(200):
                model = "nosuchmodel" if i % 3 == 0 else "noop"  # dispatcher and worker paths
                reply_to = ("hashed", "full")[i % 2] if i % 10 < 2 else "honest"
                tasks.append({"model": model, "op": "noop", "input": f"t{i}", "id": f"r{i}", "reply_to": reply_to})
            await pipelined(stack, tasks)
            got = await records(stack, [f"r{i}" for i in range(200)], timeout=15)
            for i, fields in enumerate(tasks):
                expected = "error" if fields["model"] == "nosuchmodel" else "ok"
                assert got[f"r{i}"]["status"] == expected, got[f"r{i}"]
            honest = await reply_entries(stack, "honest")
            assert sorted(r["id"] for r in honest) == sorted(text(t["id"]) for t in tasks if t["reply_to"] == "honest")
            assert await stack.redis.type(keys.reply("hashed")) == b"hash"
            for stream in (keys.tasks, keys.queue("noop", "batch"), keys.queue("noop", "realtime")):
                pending: Any = await stack.redis.xpending(stream, "dispatchers" if stream == keys.tasks else "workers")
                assert pending["pending"] == 0, stream

    asyncio.run(scenario())


# 4. Properties: ids and reply streams aimed at other tasks ----------------------------------------------

ID_POOL = ["a", "b", "c"]
REPLY_POOL = ["c1", "c2", "hashed"]
hostile_task = st.fixed_dictionaries(
    {
        "id": st.one_of(st.none(), st.sampled_from(ID_POOL), st.sampled_from(["0-1", "1700000000000-0", "9-9"])),
        "reply_to": st.one_of(st.none(), st.sampled_from(REPLY_POOL)),
        "model": st.sampled_from(["noop", "noop", "noop", "nosuchmodel"]),
    }
)


@pytest.fixture
def property_stack(redis_url: str) -> Iterator[tuple[asyncio.AbstractEventLoop, Stack]]:
    """One stack for every example of a test (each example uses ids and clients of its own)."""
    loop = asyncio.new_event_loop()
    context = running_stack(redis_url, f"hp{next(_unique)}:", {"noop": NOOP}, {"noop": NoopExecutor(NOOP)})
    stack = loop.run_until_complete(context.__aenter__())
    loop.run_until_complete(stack.redis.hset(stack.keys.reply("hashed"), "not", "a stream"))
    try:
        yield loop, stack
    finally:
        loop.run_until_complete(context.__aexit__(None, None, None))
        loop.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(hostile_task, min_size=1, max_size=12))
def test_ids_and_reply_streams_aimed_at_other_tasks(
    property_stack: tuple[asyncio.AbstractEventLoop, Stack], batch: list[dict[str, str | None]]
) -> None:
    """Every task gets exactly one record: under its id if it is the first to name it, else under its
    entry ID (`duplicate_id`, or `bad_input` for an id shaped like an entry ID); each record's output
    is computed from that task's own input; a reply stream receives only its own tasks' records."""
    loop, stack = property_stack
    run = next(_unique)
    tasks: list[dict[str, str | bytes]] = []
    for i, drawn in enumerate(batch):
        fields: dict[str, str | bytes] = {"model": str(drawn["model"]), "op": "noop", "input": "x" * (i + 1)}
        if drawn["id"] is not None:
            fields["id"] = drawn["id"] if "-" in drawn["id"] else f"p{run}{drawn['id']}"
        if drawn["reply_to"] is not None:
            fields["reply_to"] = drawn["reply_to"] if drawn["reply_to"] == "hashed" else f"p{run}{drawn['reply_to']}"
        tasks.append(fields)
    entries = loop.run_until_complete(pipelined(stack, tasks))

    owned: set[str] = set()
    keyed: list[str] = []  # where each task's record must be: its id if it owns it, else its entry ID
    for fields, entry_id in zip(tasks, entries, strict=True):
        task_id = text(fields.get("id", entry_id))
        owns = "id" in fields and "-" not in task_id and task_id not in owned
        owned |= {task_id} if owns else set()
        keyed.append(task_id if owns else entry_id)
    got = loop.run_until_complete(records(stack, keyed))
    for i, (fields, key) in enumerate(zip(tasks, keyed, strict=True)):
        record = got[key]
        if key == entries[i] and "id" in fields:
            expected = Reason.BAD_INPUT if "-" in text(fields["id"]) else Reason.DUPLICATE_ID
            assert record["reason"] == expected, (fields, record)
        elif fields["model"] == "noop":
            assert record["status"] == "ok" and record["output"] == f'{{"chars": {i + 1}}}', (fields, record)
        else:
            assert record["reason"] == Reason.UNKNOWN_MODEL, (fields, record)
    for client in {text(f["reply_to"]) for f in tasks if "reply_to" in f and f["reply_to"] != "hashed"}:
        pushed = loop.run_until_complete(reply_entries(stack, client))
        mine = [key for fields, key in zip(tasks, keyed, strict=True) if fields.get("reply_to") == client]
        assert sorted(r["id"] for r in pushed) == sorted(mine), "one record per own task, none of another's"
        for reply in pushed:
            assert reply == {k: v for k, v in got[reply["id"]].items()}, "the reply equals the stored record"


# 5. Properties: split payloads of every shape and dtype -------------------------------------------------

int_arrays = hnp.arrays(
    dtype=st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint32, np.uint64]),
    shape=hnp.array_shapes(min_dims=1, max_dims=2, min_side=0, max_side=40),
)
float_arrays = hnp.arrays(
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
    shape=st.tuples(st.integers(0, 40), st.sampled_from([32, 31, 1])),
    elements=st.floats(allow_nan=True, allow_infinity=True, width=16),
)
wild_payloads = st.fixed_dictionaries(
    {"segment": st.sampled_from([1, 2, 3, 5, 6, 7])},
    optional={"ids": int_arrays, "types": int_arrays, "hidden": float_arrays},
)


@st.composite
def near_payloads(draw: st.DrawFn) -> dict[str, Any]:
    """Payloads of one consistent length, with values around the model's limits (vocabulary 109,
    2 token types, width 32): most pass the checks, so the model gets to run them."""
    tokens = draw(st.integers(1, 24))
    body: dict[str, Any] = {"segment": draw(st.integers(1, 6))}
    body["ids"] = draw(hnp.arrays(np.int32, tokens, elements=st.integers(0, 112)))
    if draw(st.booleans()):
        body["types"] = draw(hnp.arrays(np.int64, tokens, elements=st.integers(0, 2)))
    if body["segment"] > 1:
        values = st.floats(-7e4, 7e4, allow_nan=False, width=32) | st.sampled_from([float("nan"), float("inf")])
        body["hidden"] = draw(hnp.arrays(np.float32, (tokens, 32), elements=values))
    return body


payloads = st.one_of(wild_payloads, near_payloads())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=payloads)
def test_a_split_payload_either_is_refused_or_runs(tiny_bert: tuple[ModelSpec, Executor], body: dict[str, Any]) -> None:
    """No payload the checks let through may fail on the model: on a GPU, such a failure would be a
    device-side assert that poisons the process's whole CUDA context."""
    spec, executor = tiny_bert
    segment = body.pop("segment")
    payload = raw_payload(segment, **body)
    raw = split_task(spec, payload, segment)
    try:
        task: Task = parse_task(
            "1-1", {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in raw.items()}, Limits()
        )
        check_split(task, spec)
    except TaskError as err:
        assert err.reason in (Reason.BAD_INPUT, Reason.VERSION_MISMATCH), err
        return
    results, _ = executor.submit(Request("embed", [payload], segment=segment)).result(timeout=60)
    assert results[0].error is None and np.isfinite(results[0].output).all(), results[0]
    RAN.append(segment)


def test_the_split_property_reached_the_model() -> None:
    """Runs after the property (file order): payloads that all fail the checks would prove little."""
    if not RAN:
        pytest.skip("the property test did not run")
    assert len(set(RAN)) >= 2, f"payloads run on the model, by split point: {RAN}"


# 6. A reply entry that is no record cannot stop a client's reader --------------------------------------


def test_junk_in_a_reply_stream_does_not_stop_the_clients_reader(redis_url: str, prefix: str) -> None:
    """Anyone allowed to write reply streams (the shared client user) can add entries to another
    client's: the client skips what is no record and keeps resolving its own tasks."""

    async def scenario() -> None:
        async with (
            running_stack(redis_url, prefix, {"noop": NOOP}, {"noop": NoopExecutor(NOOP)}) as stack,
            AsyncClient(redis_url, prefix=prefix) as client,
        ):
            junk: list[dict[str, str | bytes]] = [
                {"id": "x", "encoding": "msgpack", "output": b"\xc1 not msgpack", "status": "ok"},
                {"id": "y", "latency_ms": "soon"},
                {b"\xff\xfe".decode("latin-1"): b"\xff"},
            ]
            for fields in junk:
                entry: Any = fields
                await stack.redis.xadd(stack.keys.reply(client.client_id), entry)
            results = await client.submit_many("noop", "noop", ["after the junk", "and again"], timeout=20)
            assert [r.output["chars"] for r in results] == [14, 9]

    asyncio.run(scenario())
