"""`op translate` through the whole stack on a tiny random Marian, against `model.generate`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from ectrans.common.registry import ModelSpec, build_spec
from ectrans.models.api import Executor
from tests.stack import running_stack
from tests.tiny_seq2seq import make_tiny_marian

TEXTS = ["hello world", "the cat sees a big red house", "please translate this sentence", "go"]


@pytest.fixture(scope="module")
def marian(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModelSpec, Executor]]:
    from ectrans.models.loader import load_executor

    spec = build_spec("marian", {"path": str(make_tiny_marian(tmp_path_factory.mktemp("marian")))})
    executor = load_executor(spec, device="cpu", threads=1)
    yield spec, executor
    executor.close()


def generate_reference(path: Path, texts: list[str], num_beams: int, max_new_tokens: int) -> list[list[int]]:
    """`model.generate` on the same inputs, as ids after the decoder start token, through the first EOS."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSeq2SeqLM.from_pretrained(path).eval()
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**batch, num_beams=num_beams, max_new_tokens=max_new_tokens, do_sample=False)
    eos = model.generation_config.eos_token_id
    rows = []
    for row in out.tolist():
        ids = row[1:]
        rows.append(ids[: ids.index(eos) + 1] if eos in ids else ids)
    return rows


@pytest.mark.parametrize(("op", "num_beams"), [("translate", 1), ("generate", 3)])
def test_translate_through_the_stack_equals_generate(
    redis_url: str, prefix: str, marian: tuple[ModelSpec, Executor], op: str, num_beams: int
) -> None:
    spec, executor = marian

    async def scenario() -> list[dict[str, str]]:
        async with running_stack(redis_url, prefix, {"marian": spec}, {"marian": executor}) as stack:
            ids = [
                await stack.xadd(model="marian", op=op, input=t, num_beams=str(num_beams), max_new_tokens="12")
                for t in TEXTS
            ]
            by_id = await stack.results(ids)
            return [by_id[i] for i in ids]

    records = asyncio.run(scenario())
    expected = generate_reference(spec.path, TEXTS, num_beams, 12)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.path)
    for record, ids in zip(records, expected, strict=True):
        assert record["status"] == "ok", record
        output = json.loads(record["output"])
        assert output["token_ids"] == ids
        assert output["text"] == tokenizer.decode(ids, skip_special_tokens=True)
