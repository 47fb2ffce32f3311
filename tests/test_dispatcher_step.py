"""The dispatcher's logic one read at a time (`Dispatcher.step`), against a real Redis and without
`run()`: no heartbeat, no placement loop, no worker, no polling."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from ectrans.common.cost import CostModel
from ectrans.common.keys import DISPATCHER_GROUP, Keys
from ectrans.common.recovery import ensure_group, read_group
from ectrans.common.redis_conn import RedisClient, connect, is_cluster
from ectrans.common.registry import ModelSpec, build_spec
from ectrans.common.results import Finish
from ectrans.services.dispatcher.service import Dispatcher
from ectrans.services.dispatcher.settings import DispatcherSettings

NOOP: ModelSpec = build_spec("noop", {"kind": "noop"})


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def stepped(
    redis_url: str, prefix: str, body: Callable[[Dispatcher, RedisClient, Keys], Awaitable[None]], **settings: Any
) -> None:
    """Run `body` with a dispatcher that is only ever stepped, and a Redis connection of its own."""

    async def scenario() -> None:
        dispatcher = Dispatcher(DispatcherSettings(redis_url=redis_url, prefix=prefix, **settings), {"noop": NOOP})
        redis = connect(redis_url)
        try:
            await body(dispatcher, redis, dispatcher.keys)
        finally:
            await redis.aclose()
            await dispatcher.redis.aclose()

    asyncio.run(scenario())


async def submit(redis: RedisClient, keys: Keys, task_id: str, **fields: str) -> str:
    task = {"model": "noop", "op": "noop", "input": "x", "id": task_id, **fields}
    return text(await redis.xadd(keys.tasks, task))  # type: ignore[arg-type]


async def result(redis: RedisClient, keys: Keys, task_id: str) -> dict[str, str]:
    return {text(k): text(v) for k, v in (await redis.hgetall(keys.result(task_id))).items()}


async def queued_ids(redis: RedisClient, keys: Keys, task_class: str) -> list[str]:
    entries: Any = await redis.xrange(keys.queue("noop", task_class))
    return [text(fields[b"id"]) for _, fields in entries]


async def ingress_left(redis: RedisClient, keys: Keys) -> tuple[int, int]:
    """Entries still in the ingress stream, and those still pending in the dispatchers' group."""
    pending: Any = await redis.xpending(keys.tasks, DISPATCHER_GROUP)
    return int(await redis.xlen(keys.tasks)), int(pending["pending"])


def test_a_step_forwards_each_task_to_its_class_queue_and_clears_the_ingress(redis_url: str, prefix: str) -> None:
    async def body(d: Dispatcher, redis: RedisClient, keys: Keys) -> None:
        assert not await d.step()  # nothing submitted: nothing to do, and no wait
        await submit(redis, keys, "rt", priority="realtime")
        await submit(redis, keys, "bulk", priority="batch")
        assert await d.step()
        assert await queued_ids(redis, keys, "realtime") == ["rt"]
        assert await queued_ids(redis, keys, "batch") == ["bulk"]
        assert await ingress_left(redis, keys) == (0, 0)  # acknowledged and deleted in the same commit
        assert (d.forwarded, d.rejected) == (2, 0)
        assert not await d.step()

    stepped(redis_url, prefix, body)


def test_a_step_answers_bad_entries_and_forwards_the_good_ones_of_the_same_read(redis_url: str, prefix: str) -> None:
    async def body(d: Dispatcher, redis: RedisClient, keys: Keys) -> None:
        await submit(redis, keys, "good")
        await submit(redis, keys, "model", model="nosuchmodel")
        await submit(redis, keys, "op", op="nosuchop")
        await submit(redis, keys, "late", deadline_ms="1", priority="batch")  # a 1 ms deadline, long gone
        await redis.xadd(keys.tasks, {"id": "fieldless"})  # no model, no op, no input
        await asyncio.sleep(0.01)  # the 1 ms deadline has passed for sure
        assert await d.step()
        assert (await result(redis, keys, "model"))["reason"] == "unknown_model"
        assert (await result(redis, keys, "op"))["reason"] == "unknown_op"
        assert (await result(redis, keys, "late"))["reason"] == "deadline"
        assert (await result(redis, keys, "fieldless"))["reason"] == "bad_input"
        assert await result(redis, keys, "good") == {}  # forwarded, not answered: a worker answers it
        queued = await queued_ids(redis, keys, "realtime") + await queued_ids(redis, keys, "batch")
        assert queued == ["good"]
        assert await ingress_left(redis, keys) == (0, 0)
        assert (d.forwarded, d.rejected) == (1, 4)

    stepped(redis_url, prefix, body)


def test_entry_ids_ahead_of_the_clock_do_not_move_submission_times(redis_url: str, prefix: str) -> None:
    """A client XADDs with an explicit ID a year ahead: every later `XADD *` gets an ID of that
    millisecond too. Their tasks are still dated from when the dispatcher read them, so their
    deadlines can expire and their latencies count as usual."""

    async def body(d: Dispatcher, redis: RedisClient, keys: Keys) -> None:
        seconds, micros = await redis.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        ahead = now_ms + 365 * 24 * 3600 * 1000
        entry: Any = {"model": "noop", "op": "noop", "input": "x", "id": "ahead", "priority": "batch"}
        await redis.xadd(keys.tasks, entry, id=f"{ahead}-0")
        honest = await submit(redis, keys, "honest", priority="batch")
        assert honest == f"{ahead}-1"
        await submit(redis, keys, "late", deadline_ms="60000", priority="batch")
        assert await d.step()
        entries: Any = await redis.xrange(keys.queue("noop", "batch"))
        submitted = {text(f[b"id"]): int(f[b"submitted_ms"]) for _, f in entries}
        assert sorted(submitted) == ["ahead", "honest", "late"]
        assert all(now_ms <= ms <= now_ms + 60_000 for ms in submitted.values()), submitted
        (_, late), *_ = [e for e in entries if e[1][b"id"] == b"late"]
        assert int(late[b"submitted_ms"]) + int(late[b"deadline_ms"]) < ahead  # it can expire this year

    stepped(redis_url, prefix, body)


def test_a_step_answers_tasks_past_the_queue_limit_overloaded(redis_url: str, prefix: str) -> None:
    async def body(d: Dispatcher, redis: RedisClient, keys: Keys) -> None:
        for i in range(3):
            await submit(redis, keys, f"t{i}", priority="batch")
        assert await d.step()
        assert await queued_ids(redis, keys, "batch") == ["t0", "t1"]
        assert (await result(redis, keys, "t2"))["reason"] == "overloaded"
        assert await ingress_left(redis, keys) == (0, 0)

    stepped(redis_url, prefix, body, max_queue_len=2)


def test_a_second_task_naming_a_taken_id_is_answered_under_its_entry_id(redis_url: str, prefix: str) -> None:
    async def body(d: Dispatcher, redis: RedisClient, keys: Keys) -> None:
        await submit(redis, keys, "mine", priority="batch")
        assert await d.step()
        entry_id = await submit(redis, keys, "mine", priority="batch")
        assert await d.step()
        assert await queued_ids(redis, keys, "batch") == ["mine"]  # the owner only
        duplicate = await result(redis, keys, entry_id)
        assert (duplicate["reason"], duplicate["requested_id"]) == ("duplicate_id", "mine")

    stepped(redis_url, prefix, body)


def test_entries_read_before_a_crash_are_handled_first_and_once(redis_url: str, prefix: str) -> None:
    """Entries this consumer read but never committed (it died in between) stay pending under its
    name; the next step handles them before anything new, and each is forwarded once."""

    async def body(d: Dispatcher, redis: RedisClient, keys: Keys) -> None:
        await submit(redis, keys, "read-before", priority="batch")
        await ensure_group(redis, keys.tasks, DISPATCHER_GROUP)
        got = await read_group(redis, DISPATCHER_GROUP, d.consumer, {keys.tasks: ">"}, count=10, block=None)
        assert [text(fields[b"id"]) for _, fields in got[0][1]] == ["read-before"]  # read, then the crash
        await submit(redis, keys, "new", priority="batch")
        assert await d.step()  # the backlog alone
        assert await queued_ids(redis, keys, "batch") == ["read-before"]
        assert await d.step()  # then what is new
        assert await queued_ids(redis, keys, "batch") == ["read-before", "new"]
        assert not await d.step()
        assert await ingress_left(redis, keys) == (0, 0)

    stepped(redis_url, prefix, body)


async def script_calls(redis: RedisClient) -> int:
    """Script calls Redis has run so far (INFO commandstats), a NOSCRIPT miss and its EVAL included."""
    stats: Any = await redis.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("eval", "evalsha"))


def test_a_read_of_named_tasks_costs_one_script_call(redis_url: str, prefix: str) -> None:
    """On a single Redis the claims of the forwards' client ids ride in the commit script: a read of
    tasks that name ids (as the client library's all do) is one script call, not a claim and a commit."""

    async def body(d: Dispatcher, redis: RedisClient, keys: Keys) -> None:
        if is_cluster(redis):
            pytest.skip("a cluster claims and forwards per slot")
        await submit(redis, keys, "warm", priority="batch")
        assert await d.step()  # the scripts are loaded now: no NOSCRIPT miss below
        named = [await submit(redis, keys, f"named-{i}", priority="realtime" if i else "batch") for i in range(3)]
        before = await script_calls(redis)
        assert await d.step()
        assert await script_calls(redis) - before == 1
        assert await queued_ids(redis, keys, "batch") == ["warm", "named-0"]
        assert await queued_ids(redis, keys, "realtime") == ["named-1", "named-2"]
        assert [text(await redis.get(keys.owner(f"named-{i}"))) for i in range(3)] == named  # claimed all the same
        assert (d.forwarded, d.rejected) == (4, 0)

    stepped(redis_url, prefix, body)


async def error_metrics(redis: RedisClient, keys: Keys) -> list[str]:
    entries: Any = await redis.xrange(keys.metrics)
    return sorted(text(fields[b"reasons"]) for _, fields in entries if fields.get(b"kind") == b"errors")


def test_in_one_read_the_first_entry_owns_an_id_and_a_duplicate_is_never_overloaded(
    redis_url: str, prefix: str
) -> None:
    """Two entries naming one id in the same read: the first owns it. The second is bound for a queue
    that the first just filled, and is answered `duplicate_id` under its entry ID, not `overloaded`
    under the owner's id; a task of its own id is refused `overloaded`. Counters and metrics count
    each once."""

    async def body(d: Dispatcher, redis: RedisClient, keys: Keys) -> None:
        owner = await submit(redis, keys, "shared", priority="batch")
        duplicate = await submit(redis, keys, "shared", priority="batch")
        late = await submit(redis, keys, "late", priority="batch")
        bad = await submit(redis, keys, "shared", model="nosuchmodel")  # an error result naming the id
        assert await d.step()
        assert await queued_ids(redis, keys, "batch") == ["shared"]
        assert text(await redis.get(keys.owner("shared"))) == owner
        assert await result(redis, keys, "shared") == {}  # the owner's record is its worker's to write
        for entry_id in (duplicate, bad):
            record = await result(redis, keys, entry_id)
            assert (record["reason"], record["requested_id"]) == ("duplicate_id", "shared"), record
        assert (await result(redis, keys, "late"))["reason"] == "overloaded"
        assert await result(redis, keys, late) == {}
        assert await ingress_left(redis, keys) == (0, 0)
        assert (d.forwarded, d.rejected) == (1, 3)
        reasons = ",".join(await error_metrics(redis, keys)).split(",")
        assert sorted(reasons) == ["duplicate_id:1", "duplicate_id:1", "overloaded:1"]

    stepped(redis_url, prefix, body, max_queue_len=1)


def test_an_error_result_naming_an_id_after_its_owner_in_the_read_is_a_duplicate(redis_url: str, prefix: str) -> None:
    """An error result is claimed before the commit, and the forwards naming its id with it, in the
    order of the read: the forward that comes first keeps the id."""

    async def body(d: Dispatcher, redis: RedisClient, keys: Keys) -> None:
        owner = await submit(redis, keys, "mine", priority="batch")
        bad = await submit(redis, keys, "mine", op="nosuchop")
        assert await d.step()
        assert await queued_ids(redis, keys, "batch") == ["mine"]
        assert text(await redis.get(keys.owner("mine"))) == owner
        assert (await result(redis, keys, bad))["reason"] == "duplicate_id"
        assert await result(redis, keys, "mine") == {}
        assert (d.forwarded, d.rejected) == (1, 1)

    stepped(redis_url, prefix, body)


def test_a_duplicate_that_admission_rejects_is_answered_duplicate_id(redis_url: str, prefix: str) -> None:
    """Admission runs before the claims on a single Redis: a real-time duplicate it rejects (predicted
    past its deadline) names the owner's id, and must be claimed, and found a duplicate, before any
    record is written under that id."""

    async def body(d: Dispatcher, redis: RedisClient, keys: Keys) -> None:
        slow = CostModel(overhead_ms=1000.0, ms_per_token=1.0, segments=1, samples=50, max_batch_tokens=100)
        await redis.hset(keys.cost("noop"), mapping=dict(slow.to_fields()))  # type: ignore[arg-type]
        await submit(redis, keys, "held", priority="batch")
        assert await d.step()
        duplicate = await submit(redis, keys, "held", priority="realtime", deadline_ms="100")
        fresh = await submit(redis, keys, "fresh", priority="realtime", deadline_ms="100")
        assert await d.step()
        assert await result(redis, keys, "held") == {}  # no `deadline` record under the owner's id
        record = await result(redis, keys, duplicate)
        assert (record["reason"], record["requested_id"]) == ("duplicate_id", "held"), record
        assert (await result(redis, keys, "fresh"))["reason"] == "deadline"
        assert await result(redis, keys, fresh) == {}
        assert (d.forwarded, d.rejected) == (1, 2)

    stepped(redis_url, prefix, body)


def test_errors_found_after_validation_name_the_tasks_model_and_class(redis_url: str, prefix: str) -> None:
    """`deadline`, `unavailable` and `duplicate_id` answers of a valid task: the record and the
    monitor's figures (its `kind=errors` entry) name the model and class, not `none`."""

    async def body(d: Dispatcher, redis: RedisClient, keys: Keys) -> None:
        await submit(redis, keys, "late", deadline_ms="1")
        await submit(redis, keys, "taken", priority="batch")
        duplicate = await submit(redis, keys, "taken", priority="batch")
        await asyncio.sleep(0.01)  # past the 1 ms deadline
        assert await d.step()
        d.placement.models["noop"].unserved_since = time.monotonic() - d.placement.grace_s - 1  # no worker for long
        await submit(redis, keys, "nobody", priority="batch")
        assert await d.step()
        answered = {task_id: await result(redis, keys, task_id) for task_id in ("late", duplicate, "nobody")}
        figures = {task_id: (r["reason"], r["model"], r["class"]) for task_id, r in answered.items()}
        assert figures == {
            "late": ("deadline", "noop", "realtime"),
            duplicate: ("duplicate_id", "noop", "batch"),
            "nobody": ("unavailable", "noop", "batch"),
        }
        metrics: Any = await redis.xrange(keys.metrics)
        counted = {(text(f[b"model"]), text(f[b"class"]), text(f[b"reasons"])) for _, f in metrics}
        assert counted == {
            ("noop", "realtime", "deadline:1"),
            ("noop", "batch", "duplicate_id:1"),
            ("noop", "batch", "unavailable:1"),
        }

    stepped(redis_url, prefix, body)


def seq2seq_spec(root: Path, name: str, positions: int | None, **options: int) -> ModelSpec:
    """A translation model's registry entry: the dispatcher reads its config alone, never its weights."""
    config: dict[str, Any] = {"model_type": "marian", "is_encoder_decoder": True}
    if positions is not None:
        config["max_position_embeddings"] = positions
    (root / name).mkdir()
    (root / name / "config.json").write_text(json.dumps(config))
    return build_spec(name, {"path": str(root / name), **options})


def test_generation_settings_past_a_models_own_limits_are_refused_at_once_naming_it(tmp_path: Path) -> None:
    """The dispatcher knows each model's limits (its entry's options, below its decoder's positions):
    a task past them gets one `bad_input` naming the model and the limit now, not the worker's
    "cannot prepare input" after queueing; a task within them, or on a model of defaults, goes on."""
    registry = {
        "small": seq2seq_spec(tmp_path, "small", 128),  # 127 new tokens at most: the start token takes one
        "narrow": seq2seq_spec(tmp_path, "narrow", None, max_num_beams=2, max_new_tokens=40),
        "t5ish": seq2seq_spec(tmp_path, "t5ish", None),  # relative positions: the default cap of 256
    }
    dispatcher = Dispatcher(DispatcherSettings(redis_url="redis://127.0.0.1:1/0"), registry)  # never connects

    def decided(model: str, **params: str) -> str:
        fields = {"model": model, "op": "translate", "input": "hello", **params}
        decision = dispatcher.decide("1700000000000-0", {k.encode(): v.encode() for k, v in fields.items()})
        if isinstance(decision, Finish):
            assert decision.record["reason"] == "bad_input", decision.record
            return str(decision.record["error"])
        return "forwarded"

    refused = decided("small", max_new_tokens="128")
    assert refused == "model 'small': max_new_tokens must be an integer from 1 to 127, not 128"
    assert decided("small", max_new_tokens="127", num_beams="8") == "forwarded"
    assert "model 'narrow'" in (error := decided("narrow", num_beams="3")) and "from 1 to 2" in error
    assert "from 1 to 40" in decided("narrow", max_new_tokens="41")
    assert decided("narrow") == decided("t5ish", max_new_tokens="256") == "forwarded"
    assert "from 1 to 256" in decided("t5ish", max_new_tokens="257")
