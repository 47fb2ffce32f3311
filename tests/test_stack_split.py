"""Split deployment through the real stack (Redis, dispatcher, worker): the client runs the first
k units, the worker the rest; every k gives the unsplit result, and a task computed with another
revision or at a point the model lacks gets `version_mismatch`."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ectrans.client import AsyncClient, TaskResult
from ectrans.common.cost import MIN_SAMPLES
from ectrans.common.keys import Keys
from ectrans.common.redis_conn import connect
from ectrans.common.registry import ModelSpec, build_spec
from ectrans.common.split import pack_activation
from ectrans.models.api import Executor
from ectrans.split.client import SplitClient
from ectrans.split.local import LocalModel
from tests.stack import running_stack
from tests.tiny_encoders import make_tiny_bert
from tests.tiny_seq2seq import make_tiny_marian

TEXTS = ["hello world", "the cat sees a big red house", "go"]
GENERATION = {"max_new_tokens": 8}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[ModelSpec, Executor, LocalModel]]]:
    from ectrans.models.loader import load_executor

    served = {}
    for name, make in (("bert", make_tiny_bert), ("marian", make_tiny_marian)):
        path: Path = make(tmp_path_factory.mktemp(name))
        spec = build_spec(name, {"path": str(path)})
        served[name] = (spec, load_executor(spec, device="cpu", threads=1), LocalModel(path, name=name, threads=1))
    yield served
    for _, executor, _ in served.values():
        executor.close()


def same_output(got: TaskResult, want: TaskResult) -> bool:
    if isinstance(want.output, dict):
        return bool(got.output["token_ids"] == want.output["token_ids"])
    return bool(np.allclose(got.output, want.output, atol=1e-5, rtol=0))


@pytest.mark.parametrize("name", ["bert", "marian"])
def test_split_at_every_k_equals_the_unsplit_task(
    redis_url: str, prefix: str, models: dict[str, tuple[ModelSpec, Executor, LocalModel]], name: str
) -> None:
    spec, executor, local = models[name]
    op, params = ("embed", {}) if spec.kind == "encoder" else ("translate", GENERATION)

    async def scenario() -> None:
        async with (
            running_stack(redis_url, prefix, {name: spec}, {name: executor}),
            AsyncClient(redis_url, prefix=prefix) as client,
        ):
            unsplit = await client.submit_many(name, op, TEXTS, params=params)
            assert all(r.ok for r in unsplit), [r.error for r in unsplit]
            for k in range(local.all_local + 1):
                results = await SplitClient(client, local, split=k).run(op, TEXTS, params)
                for got, want in zip(results, unsplit, strict=True):
                    assert got.ok, (k, got.error)
                    assert same_output(got, want), f"split at {k} differs"
            auto = SplitClient(client, local, split="auto")
            results = await auto.run(op, TEXTS, params)
            assert all(same_output(g, w) for g, w in zip(results, unsplit, strict=True))
            assert auto.last is not None and len(auto.last.predicted_ms) == local.all_local + 1

    asyncio.run(scenario())


def test_mismatched_revision_or_segment_gets_the_versioning_error(
    redis_url: str, prefix: str, models: dict[str, tuple[ModelSpec, Executor, LocalModel]]
) -> None:
    spec, executor, local = models["bert"]
    payload = local.payloads(TEXTS[:1], 3)[0]

    async def scenario() -> list[TaskResult]:
        async with (
            running_stack(redis_url, prefix, {"bert": spec}, {"bert": executor}),
            AsyncClient(redis_url, prefix=prefix) as client,
        ):
            cases = [
                ([payload], 3, "0123456789ab"),  # another revision
                ([payload], 99, local.revision),  # no such split point
                ([payload], 2, local.revision),  # the payload says 3
                ([pack_activation(3, None, np.zeros((2, 5), np.float32))], 3, local.revision),  # wrong width
                ([b"\x93garbage"], 3, local.revision),
            ]
            out = []
            for inputs, segment, revision in cases:
                out += await client.submit_many("bert", "embed", inputs, segment=segment, revision=revision)
            return out

    other_revision, no_point, relabelled, wrong_width, garbage = asyncio.run(scenario())
    assert other_revision.reason == "version_mismatch" and "revision" in str(other_revision.error)
    assert no_point.reason == "version_mismatch" and "split point" in str(no_point.error)
    assert relabelled.reason == "version_mismatch"
    assert wrong_width.reason == "bad_input" and "wide" in str(wrong_width.error)
    assert garbage.reason == "bad_input"


def test_split_batches_stay_out_of_the_published_batch_cost(
    redis_url: str, prefix: str, models: dict[str, tuple[ModelSpec, Executor, LocalModel]]
) -> None:
    """A split batch runs only the units after its split point: fitting the whole-batch cost on it
    would make admission and batch sizing think the model is nearly free."""
    spec, executor, local = models["bert"]

    async def scenario() -> tuple[bool, bool]:
        redis = connect(redis_url)
        cost_key = Keys(prefix).cost("bert")
        try:
            async with (
                running_stack(redis_url, prefix, {"bert": spec}, {"bert": executor}),
                AsyncClient(redis_url, prefix=prefix) as client,
            ):
                split = SplitClient(client, local, split=local.all_local - 1)
                for _ in range(MIN_SAMPLES + 2):  # one batch each, more than a fit needs
                    assert all(r.ok for r in await split.run("embed", TEXTS[:1]))
                after_split = bool(await redis.exists(cost_key))
                for _ in range(MIN_SAMPLES + 2):
                    assert all(r.ok for r in await client.submit_many("bert", "embed", TEXTS[:1]))
                return after_split, bool(await redis.exists(cost_key))
        finally:
            await redis.aclose()

    after_split, after_whole = asyncio.run(scenario())
    assert not after_split, "split batches were fitted into the whole-batch cost"
    assert after_whole
