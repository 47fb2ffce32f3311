"""An input over the model's token limit is refused (`bad_input`) unless the task or the model entry
says `truncate`; it is never cut without a word."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import numpy as np

from ectrans.common.registry import ModelSpec
from ectrans.models.api import Executor
from tests.stack import running_stack

LONG = " ".join(["Edge servers run many inference tasks at once."] * 60)  # about 600 tokens, MiniLM takes 256
SHORT = "Edge servers run many inference tasks at once."


def run(
    redis_url: str, prefix: str, registry: dict[str, ModelSpec], executor: Executor, **extra: str
) -> list[dict[str, str]]:
    async def scenario() -> list[dict[str, str]]:
        async with running_stack(redis_url, prefix, registry, {"minilm": executor}) as stack:
            ids = [await stack.xadd(model="minilm", op="embed", input=text, **extra) for text in (LONG, SHORT)]
            by_id = await stack.results(ids)
            return [by_id[i] for i in ids]

    return asyncio.run(scenario())


def test_over_long_input_is_refused(
    redis_url: str, prefix: str, registry: dict[str, ModelSpec], minilm_executor: Executor
) -> None:
    long, short = run(redis_url, prefix, registry, minilm_executor)
    assert (long["status"], long["reason"]) == ("error", "bad_input")
    assert "longer than the 256 tokens" in long["error"] and "truncate" in long["error"]
    assert short["status"] == "ok"  # a batch-mate is not affected


def test_task_truncate_field_cuts_it(
    redis_url: str, prefix: str, registry: dict[str, ModelSpec], minilm_executor: Executor
) -> None:
    long, short = run(redis_url, prefix, registry, minilm_executor, truncate="1")
    assert long["status"] == short["status"] == "ok"
    assert np.asarray(json.loads(long["output"])).shape == (384,)


def test_model_entry_truncate_cuts_it(
    redis_url: str, prefix: str, registry: dict[str, ModelSpec], minilm_executor: Executor
) -> None:
    cutting = {**registry, "minilm": dataclasses.replace(registry["minilm"], truncate=True)}
    long, short = run(redis_url, prefix, cutting, minilm_executor)
    assert long["status"] == short["status"] == "ok"
