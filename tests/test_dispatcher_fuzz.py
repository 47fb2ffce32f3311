"""Property-based fuzzing of the dispatcher: random field sets (random names, binary values, invalid
UTF-8, values over the size limits, numeric edge cases) go into the ingress stream of a running
stack next to valid tasks. Properties: the dispatcher stays up and logs no error, every task gets
exactly one terminal record (one result hash, one reply-stream entry where it named a valid
`reply_to`), and the valid tasks among the junk succeed."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ectrans.common.keys import Keys
from ectrans.common.registry import ModelSpec, build_spec
from ectrans.common.schemas import KNOWN_FIELDS, TASK_ID_RE, Reason, reply_to_of, task_id_of
from ectrans.local.redis_server import RedisServer
from ectrans.models.noop import NoopExecutor
from tests.stack import running_stack

NOOP: ModelSpec = build_spec("noop", {"kind": "noop"})
MAX_TASK_BYTES = 4096
REASONS = {v for k, v in vars(Reason).items() if k.isupper()}

# 1. What the fuzzer throws ----------------------------------------------------------------------------

NUMERIC_EDGES = [
    "0", "-0", "-1", "1", "+1", " 7 ", "8", "250", "86400000", "86400001", "1e9", "1.5", "NaN", "inf", "-inf",
    "0x10", "1_000", "١٢٣", "9" * 25, str(2**63), str(-(2**63)), "", " ", "\x00",
]  # fmt: skip
GOOD_WORDS = ["noop", "minilm", "embed", "realtime", "batch", "msgpack", "json", "error", "x", "some text"]

values = st.one_of(
    st.text(max_size=60),
    st.binary(max_size=60),
    st.binary(max_size=40).map(lambda b: b + b"\xff"),  # 0xFF never occurs in UTF-8
    st.binary(max_size=40).map(lambda b: b"\xed\xa0\x80" + b),  # an encoded surrogate: not UTF-8 either
    st.integers(MAX_TASK_BYTES - 64, MAX_TASK_BYTES + 1024).map(lambda n: b"a" * n),  # around the size limit
    st.sampled_from(NUMERIC_EDGES + GOOD_WORDS),
)
names = st.one_of(st.sampled_from(sorted(KNOWN_FIELDS)), st.text(max_size=16), st.binary(max_size=16))
junk_task = st.dictionaries(names, values, min_size=1, max_size=10)
# A task that is nearly right, with random fields over it: reaches past the first checks.
nearly_valid = st.tuples(
    st.fixed_dictionaries(
        {
            "model": st.sampled_from(["noop", "noop", "noop", "minilm", "NOOP", "noop\x00"]),
            "op": st.sampled_from(["noop", "noop", "noop", "embed", "translate"]),
            "input": st.one_of(st.text(min_size=1, max_size=200), st.sampled_from(GOOD_WORDS)),
        }
    ),
    st.dictionaries(names, values, max_size=3),
).map(lambda parts: {**parts[0], **parts[1]})
any_task = st.one_of(junk_task, nearly_valid)


def as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


_unique = itertools.count()


def prepared(fields: dict[Any, Any], client: str) -> dict[bytes, bytes]:
    """Bytes fields; a valid `id` is made unique (results are idempotent by id) and a valid
    `reply_to` is pointed at this example's reply stream, so that records can be counted."""
    out = {as_bytes(k): as_bytes(v) for k, v in fields.items()}
    task_id = out.get(b"id")
    if task_id is not None and task_id_of("0-1", {b"id": task_id}) != "0-1":
        out[b"id"] = f"u{next(_unique)}-".encode() + task_id[:100]
        assert TASK_ID_RE.match(out[b"id"].decode())
    if reply_to_of(out) is not None:
        out[b"reply_to"] = client.encode()
    return out


# 2. A stack running in a thread for the whole module --------------------------------------------------


class ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Live:
    redis: redis.Redis
    keys: Keys
    dispatcher_heartbeat: str
    errors: ErrorLog
    seen_reasons: Counter[str] = field(default_factory=Counter)


@pytest.fixture(scope="module")
def live(redis_server: RedisServer) -> Iterator[Live]:
    prefix = f"fz{uuid.uuid4().hex[:8]}:"
    ready = threading.Event()
    stops: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
    failure: list[BaseException] = []
    errors = ErrorLog()
    logging.getLogger().addHandler(errors)

    async def serve() -> None:
        stop = asyncio.Event()
        stops.append((asyncio.get_running_loop(), stop))
        async with running_stack(
            redis_server.url, prefix, {"noop": NOOP}, {"noop": NoopExecutor(NOOP)},
            dispatcher={"max_task_bytes": MAX_TASK_BYTES, "max_input_chars": 1000, "instance": "fuzz-d"},
        ):  # fmt: skip
            ready.set()
            await stop.wait()

    def thread_main() -> None:
        try:
            asyncio.run(serve())
        except BaseException as exc:
            failure.append(exc)
            ready.set()

    thread = threading.Thread(target=thread_main, name="fuzz-stack")
    thread.start()
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert ready.wait(60) and not failure, failure
        keys = Keys(prefix)
        yield Live(client, keys, keys.heartbeat("dispatcher", "fuzz-d"), errors)
    finally:
        for loop, stop in stops:
            loop.call_soon_threadsafe(stop.set)
        thread.join(60)
        client.close()
        logging.getLogger().removeHandler(errors)
    assert not failure, failure


def wait_results(live: Live, keys: list[str], timeout_s: float = 30.0) -> dict[str, dict[bytes, bytes]]:
    found: dict[str, dict[bytes, bytes]] = {}
    deadline = time.monotonic() + timeout_s
    while len(found) < len(keys) and time.monotonic() < deadline:
        pipe = live.redis.pipeline(transaction=False)
        missing = [k for k in keys if k not in found]
        for key in missing:
            pipe.hgetall(live.keys.result(key))
        for key, record in zip(missing, pipe.execute(), strict=True):
            if record:
                found[key] = record
        time.sleep(0.01)
    return found


# 3. The properties --------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.lists(any_task, min_size=1, max_size=6), valid_at=st.integers(0, 6))
def test_random_field_sets_each_get_exactly_one_terminal_record(
    live: Live, junk: list[dict[Any, Any]], valid_at: int
) -> None:
    client = f"fuzz-{next(_unique)}"
    valid_id = f"valid-{next(_unique)}"
    tasks = [prepared(fields, client) for fields in junk]
    valid = {b"model": b"noop", b"op": b"noop", b"input": b"a valid task among the junk", b"id": valid_id.encode()}
    tasks.insert(min(valid_at, len(tasks)), {**valid, b"reply_to": client.encode()})

    pipe = live.redis.pipeline(transaction=False)
    for fields in tasks:
        pipe.xadd(live.keys.tasks, fields)  # type: ignore[arg-type]
    entry_ids = [e.decode() for e in pipe.execute()]
    keyed = [task_id_of(eid, fields) for eid, fields in zip(entry_ids, tasks, strict=True)]
    assert len(set(keyed)) == len(keyed)

    results = wait_results(live, keyed)
    assert len(results) == len(keyed), f"no terminal record for {sorted(set(keyed) - set(results))}"
    assert results[valid_id][b"status"] == b"ok", results[valid_id]
    for key, record in results.items():
        assert record[b"status"] in (b"ok", b"error"), record
        if record[b"status"] == b"error":
            assert record[b"reason"].decode() in REASONS and record[b"error"], record
            live.seen_reasons[record[b"reason"].decode()] += 1
        elif key != valid_id:
            live.seen_reasons["junk_ok"] += 1
        assert record[b"id"].decode() == key

    entries: list[tuple[bytes, dict[bytes, bytes]]] = live.redis.xrange(live.keys.reply(client))  # type: ignore[assignment]
    replies = Counter(f[b"id"].decode() for _, f in entries)
    expected = Counter(key for key, fields in zip(keyed, tasks, strict=True) if reply_to_of(fields) == client)
    assert replies == expected, "one reply-stream record per task that named a valid reply_to"

    heartbeat = live.redis.hget(live.dispatcher_heartbeat, "updated")
    assert heartbeat is not None and time.time() - float(heartbeat) < 5, "the dispatcher is alive"
    assert not live.errors.records, [r.getMessage() for r in live.errors.records]


def test_the_fuzzer_reached_past_validation(live: Live) -> None:
    """Runs after the property (file order): the junk must have exercised more than one kind of
    answer, or the property above proved little."""
    if not live.seen_reasons:
        pytest.skip("the property test did not run")
    print(f"\nterminal records by reason: {dict(live.seen_reasons)}")
    seen = live.seen_reasons
    assert seen["bad_input"] and seen["unknown_model"] + seen["unknown_op"], seen
    assert seen["junk_ok"], "some junk was valid enough to run, besides the one valid task per example"
