"""Hostile text through a stack serving an encoder, an encoder-decoder and the no-op model at once:
every kind of Unicode, control characters and special-token strings give what the reference gives
(a direct transformers forward, `model.generate`), and the bad inputs among them fail alone."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ectrans.common.registry import ModelSpec, build_spec
from ectrans.models.api import Executor
from ectrans.models.noop import NoopExecutor
from tests.stack import reference_embeddings, running_stack
from tests.tiny_encoders import make_tiny_bert
from tests.tiny_seq2seq import make_tiny_marian

NOOP: ModelSpec = build_spec("noop", {"kind": "noop"})
HOSTILE = [
    "👨‍👩‍👧‍👦 the family 🏳️‍🌈",  # emoji with zero-width joiners
    "中文 日本語 한국어 the cat",
    "مرحبا שלום \u202ethe house",  # right to left, an override
    "e\u0301\u0301 the zalgo" + "\u0336" * 200,  # combining marks
    "nul\x00inside ctrl\x01\x07\x1b[31m red",
    "crlf\r\nline\ttab \ufeffbom \u200bzero width",
    "[CLS] [SEP] [PAD] </s> <pad> <unk> hello",  # special tokens' spellings
    "\x00",  # no token but the specials
    "the " * 200,  # over every model's token limit: cut, as the task asks
]
GENERATION: dict[str, str | bytes] = {"num_beams": "2", "max_new_tokens": "6", "truncate": "1"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, ModelSpec], dict[str, Executor]]]:
    from ectrans.models.loader import load_executor

    root = tmp_path_factory.mktemp("models")
    specs = {
        "bert": build_spec("bert", {"path": str(make_tiny_bert(root / "bert"))}),
        "marian": build_spec("marian", {"path": str(make_tiny_marian(root / "marian"))}),
        "noop": NOOP,
    }
    executors: dict[str, Executor] = {"noop": NoopExecutor(NOOP)}
    executors.update({name: load_executor(specs[name], device="cpu", threads=1) for name in ("bert", "marian")})
    yield specs, executors
    for executor in executors.values():
        executor.close()


def generated(path: Path, texts: list[str], max_tokens: int) -> list[list[int]]:
    """`model.generate`'s ids after the start token, through the first end-of-sequence token."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSeq2SeqLM.from_pretrained(path).eval()
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_tokens)
    with torch.inference_mode():
        out = model.generate(**batch, num_beams=2, max_new_tokens=6, do_sample=False)
    eos = model.generation_config.eos_token_id
    return [row[1:][: row[1:].index(eos) + 1] if eos in row[1:] else row[1:] for row in out.tolist()]


def test_hostile_text_on_three_models_at_once_equals_the_reference(
    redis_url: str, prefix: str, models: tuple[dict[str, ModelSpec], dict[str, Executor]]
) -> None:
    specs, executors = models
    embed: dict[str, str | bytes] = {"model": "bert", "op": "embed"}
    translate: dict[str, str | bytes] = {"model": "marian", "op": "translate", "input": "hi"}
    bad: dict[str, tuple[dict[str, str | bytes], str]] = {
        "invalid UTF-8": ({**embed, "input": b"ok \xc3\x28 \xff"}, "not valid UTF-8"),
        "lone surrogate": ({**embed, "input": "\ud83d".encode("utf-8", "surrogatepass")}, "not valid UTF-8"),
        "over the limit": ({**embed, "input": "the " * 200}, "truncate=1"),
        "blank": ({**translate, "input": " \r\n\t"}, "is empty"),
        "beams past 8": ({**translate, "num_beams": "9"}, "between 1 and 8"),
        "beams on embed": ({**embed, "input": "hi", "num_beams": "2"}, "op 'embed' does not take"),
        "past the decoder": (
            {**translate, "max_new_tokens": "128"},
            "model 'marian': max_new_tokens must be an integer from 1 to 127",
        ),
    }

    async def scenario() -> tuple[dict[str, dict[str, str]], list[str], dict[str, str]]:
        async with running_stack(redis_url, prefix, specs, executors) as stack:
            pipe = stack.redis.pipeline(transaction=False)  # one round trip: good and bad share batches
            good: list[dict[str, str | bytes]] = []
            for text in HOSTILE:
                good.append({**embed, "input": text, "truncate": "1"})
                good.append({**translate, "input": text, **GENERATION})
                good.append({"model": "noop", "op": "noop", "input": text})
            for fields in [*good, *(fields for fields, _ in bad.values())]:
                entry: Any = fields
                pipe.xadd(stack.keys.tasks, entry)
            ids = [i.decode() for i in await pipe.execute()]
            records = await stack.results(ids)
            return records, ids, dict(zip(bad, ids[3 * len(HOSTILE) :], strict=True))

    records, ids, bad_ids = asyncio.run(scenario())
    vectors = reference_embeddings(str(specs["bert"].path), HOSTILE, specs["bert"].max_tokens)
    tokens = generated(specs["marian"].path, HOSTILE, specs["marian"].max_tokens)
    for index, text in enumerate(HOSTILE):
        embedded, translated, counted = (records[ids[3 * index + k]] for k in range(3))
        assert embedded["status"] == translated["status"] == counted["status"] == "ok", (text, embedded, translated)
        assert np.abs(np.asarray(json.loads(embedded["output"])) - vectors[index]).max() <= 1e-5, text
        assert json.loads(translated["output"])["token_ids"] == tokens[index], text
        assert json.loads(counted["output"]) == {"chars": len(text)}
    for name, task_id in bad_ids.items():
        record = records[task_id]
        assert (record["status"], record["reason"]) == ("error", "bad_input"), (name, record)
        assert bad[name][1] in record["error"], (name, record["error"])
