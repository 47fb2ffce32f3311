"""`SharedExecutorPool` across processes, on CPU (real holder, zygote and executor processes): two
executors give the privately loaded model's outputs, a write attempt fails loudly and changes
nothing for the others, SIGKILL of the holder or of an executor under load loses no batch, a
restarted executor attaches to the holder's weights (no reload), a batch whose processes keep dying fails
alone, the worker serves through the pool, and adding an executor adds far less memory than the
model's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from ectrans.common.registry import ModelSpec, build_spec, packaged_minilm_path
from ectrans.models.api import ItemResult, Request
from ectrans.models.loader import load_executor
from ectrans.models.synthetic import make_prototype_marian
from ectrans.sharing.manifest import spec_to_wire
from ectrans.sharing.process_pool import SharedExecutorPool
from ectrans.sharing.supervision import ExecutorProcessDied
from tests import tiny_seq2seq
from tests.stack import running_stack
from tests.test_sharing_weights import REPO, TEXTS, assert_same, run


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# 1. Across processes: MiniLM, two executors ----------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> ModelSpec:
    return build_spec("minilm", {"path": str(packaged_minilm_path())})


@pytest.fixture(scope="module")
def minilm_reference(minilm: ModelSpec) -> list[ItemResult]:
    executor = load_executor(minilm, device="cpu", threads=1)
    try:
        return run(executor, "embed", TEXTS, {})
    finally:
        executor.close()


@pytest.fixture(scope="module")
def minilm_pool(minilm: ModelSpec) -> Iterator[SharedExecutorPool]:
    pool = SharedExecutorPool(minilm, 2, device="cpu", threads_per_process=1)
    yield pool
    pool.close()


def embed_many(pool: SharedExecutorPool, count: int) -> list[Any]:
    return [pool.submit(Request("embed", TEXTS)) for _ in range(count)]


@pytest.mark.slow
def test_two_executor_processes_give_the_private_models_outputs(
    minilm_pool: SharedExecutorPool, minilm_reference: list[ItemResult]
) -> None:
    for future in embed_many(minilm_pool, 8):
        assert_same(future.result(timeout=120)[0], minilm_reference)
    infos = minilm_pool.executor_info()
    assert all(info["served"] > 0 for info in infos), infos  # both processes did work
    assert all(info["guarded"] and info["weight_files"] == 1 for info in infos)
    assert {info["holder_pid"] for info in infos} == {minilm_pool.holder_pid}


@pytest.mark.slow
def test_a_write_attempt_fails_loudly_and_the_others_are_unchanged(
    minilm_pool: SharedExecutorPool, minilm_reference: list[ItemResult], minilm: ModelSpec
) -> None:
    assert minilm_pool.holder_socket is not None
    writer = subprocess.run(
        [sys.executable, "-m", "tests.weights_writer", minilm_pool.holder_socket, json.dumps(spec_to_wire(minilm))],
        capture_output=True,
        check=False,
        text=True,
        timeout=150,
        cwd=REPO,
    )
    outcomes = {line["attempt"]: line["outcome"] for line in map(json.loads, writer.stdout.splitlines())}
    assert writer.returncode == -signal.SIGSEGV, writer.stderr[-2000:]
    for name in ("torch add_", "torch copy_", "torch setitem", "tensor.numpy"):
        assert outcomes[name].startswith("RuntimeError: Cannot access data pointer"), outcomes
    for name in ("pwrite to the shared file", "ftruncate the shared file", "writable shared mapping"):
        assert outcomes[name].startswith("PermissionError"), outcomes
    assert outcomes["raw store"] == "next"  # the store itself never returned
    for future in embed_many(minilm_pool, 4):
        assert_same(future.result(timeout=120)[0], minilm_reference)


@pytest.mark.slow
def test_holder_killed_under_load_loses_no_batch_and_executors_reattach(
    minilm_pool: SharedExecutorPool, minilm_reference: list[ItemResult]
) -> None:
    futures = embed_many(minilm_pool, 12)
    old = minilm_pool.holder_pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    for future in futures:
        assert_same(future.result(timeout=150)[0], minilm_reference)
    assert minilm_pool.wait_settled(150)
    new = minilm_pool.holder_pid
    assert new not in (None, old)
    infos = minilm_pool.executor_info()
    assert {info["holder_pid"] for info in infos} == {new}
    assert all(info["weight_files"] == 1 for info in infos)  # the old copy was let go
    for future in embed_many(minilm_pool, 4):
        assert_same(future.result(timeout=120)[0], minilm_reference)


@pytest.mark.slow
def test_executor_killed_under_load_loses_no_batch_and_comes_back_on_the_same_weights(
    minilm_pool: SharedExecutorPool, minilm_reference: list[ItemResult]
) -> None:
    """How much sooner a restart is than a fresh load is `ectrans bench memory`'s `restart` figure
    (both measured in one run); here, what makes it fast: the new process attaches to the holder's
    weights instead of loading its own."""
    holder = minilm_pool.holder_pid
    futures = embed_many(minilm_pool, 12)
    victim = minilm_pool.executor_pids()[0]
    os.kill(victim, signal.SIGKILL)
    for future in futures:
        assert_same(future.result(timeout=150)[0], minilm_reference)
    assert minilm_pool.wait_settled(150, replaced=victim)
    assert minilm_pool.restarts["executor"] >= 1
    assert minilm_pool.holder_pid == holder  # the weights were not reloaded
    infos = minilm_pool.executor_info()
    assert {info["holder_pid"] for info in infos} == {holder}
    assert all(info["weight_files"] == 1 for info in infos)
    for future in embed_many(minilm_pool, 4):
        assert_same(future.result(timeout=120)[0], minilm_reference)


def running_batch_pid(pool: SharedExecutorPool, not_pid: int | None, timeout: float = 60.0) -> int:
    """The pid of the executor process that holds a batch now (deadline-bounded poll)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for info in pool.executor_info():
            if info["inflight"] and info["state"] == "ready" and info["pid"] != not_pid:
                return int(info["pid"])
        time.sleep(0.005)
    raise TimeoutError("no executor process took the batch")


@pytest.mark.slow
def test_a_batch_whose_processes_keep_dying_fails_alone(
    minilm_pool: SharedExecutorPool, minilm_reference: list[ItemResult]
) -> None:
    assert minilm_pool.wait_settled(150)
    poison = minilm_pool.submit(Request("embed", [" ".join(TEXTS * 8)] * 48))  # runs for seconds
    first = running_batch_pid(minilm_pool, None)
    os.kill(first, signal.SIGKILL)  # the batch is rerun on the other process ...
    os.kill(running_batch_pid(minilm_pool, first), signal.SIGKILL)  # ... which dies too
    with pytest.raises(ExecutorProcessDied, match="died 2 times while running this batch"):
        poison.result(timeout=150)
    assert_same(run(minilm_pool, "embed", TEXTS, {}), minilm_reference)  # everything else goes on
    assert minilm_pool.wait_settled(150)


@pytest.mark.slow
def test_worker_serves_through_the_pool_and_loses_no_task_when_the_holder_dies(
    redis_url: str,
    prefix: str,
    registry: dict[str, ModelSpec],
    minilm_pool: SharedExecutorPool,
    minilm_reference: list[ItemResult],
) -> None:
    texts = TEXTS * 10

    async def scenario() -> tuple[list[dict[str, str]], dict[str, str]]:
        worker = {"executors_per_device": 2, "batch_max_batch": 4, "rt_max_batch": 2}
        async with running_stack(redis_url, prefix, registry, {"minilm": minilm_pool}, worker=worker) as stack:
            ids = [await stack.xadd(model="minilm", op="embed", input=text) for text in texts[:20]]
            holder = minilm_pool.holder_pid
            assert holder is not None
            os.kill(holder, signal.SIGKILL)  # with tasks queued and running
            ids += [await stack.xadd(model="minilm", op="embed", input=text) for text in texts[20:]]
            by_id = await stack.results(ids, timeout=150)
            # Every result can arrive before the last executor is back: wait for it, then a heartbeat.
            assert await asyncio.to_thread(minilm_pool.wait_settled, 150)
            await asyncio.sleep(1.5)
            raw = await stack.redis.hgetall(stack.keys.heartbeat("worker", stack.worker.consumer))
            heartbeat = {_text(k): _text(v) for k, v in raw.items()}
            return [by_id[i] for i in ids], heartbeat

    records, heartbeat = asyncio.run(scenario())
    want = {text: result.output for text, result in zip(TEXTS, minilm_reference, strict=True)}
    for text, record in zip(texts, records, strict=True):
        assert record["status"] == "ok", record
        np.testing.assert_allclose(np.asarray(json.loads(record["output"]), dtype=np.float32), want[text], atol=1e-6)
    assert int(heartbeat["weights_bytes"]) == minilm_pool.weights_bytes > 80 * 2**20
    assert len(heartbeat["executor_pids"].split(",")) == 2
    detail = json.loads(heartbeat["weights"])
    assert detail[0]["model"] == "minilm" and len(detail[0]["executors_private"]) == 2


# 2. Memory: the prototype-sized Marian ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def prototype(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    path = make_prototype_marian(tmp_path_factory.mktemp("prototype") / "marian")
    return build_spec("prototype", {"path": str(path)})


@pytest.mark.slow
def test_a_second_executor_adds_far_less_memory_than_the_weights(prototype: ModelSpec) -> None:
    texts = tiny_seq2seq.SENTENCES
    params = {"num_beams": 1, "max_new_tokens": 6}
    reference = load_executor(prototype, device="cpu", threads=1)
    want = run(reference, "translate", texts, params)
    reference.close()
    del reference
    with contextlib.closing(SharedExecutorPool(prototype, 1, device="cpu", threads_per_process=1)) as pool:
        assert_same(run(pool, "translate", texts, params), want)
        one = pool.measure_memory()
        pool.grow(1)
        futures = [pool.submit(Request("translate", texts, params)) for _ in range(4)]
        for future in futures:
            assert_same(future.result(timeout=120)[0], want)
        assert all(info["served"] > 0 for info in pool.executor_info())
        two = pool.measure_memory()
    weights = pool.weights_bytes
    growth = two["pss_sum"] - one["pss_sum"]
    print(f"\nweights {weights / 2**20:.0f} MiB; group PSS {one['pss_sum'] / 2**20:.0f} MiB with one executor, "
          f"{two['pss_sum'] / 2**20:.0f} MiB with two: +{growth / 2**20:.0f} MiB")  # fmt: skip
    assert weights > 300 * 2**20  # about 93M float32 parameters
    assert one["pss_sum"] > weights  # the group holds the weights once ...
    assert growth < 0.35 * weights  # ... and a second executor adds its private memory only
