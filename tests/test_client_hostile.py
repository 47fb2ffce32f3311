"""Inputs the client cannot send as they are: each fails only its own task or call, never another
caller's (the no-op model: only the path is exercised)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ectrans.client import AsyncClient, TaskFailed
from tests.test_client import noop_stack

LONE_SURROGATE = "half an emoji \ud83d"  # what a JSON "\ud83d" or a surrogateescape'd file name gives


def test_a_lone_surrogate_fails_its_own_task_alone(redis_url: str, prefix: str) -> None:
    """A str with no UTF-8 form among good inputs: that task gets `bad_input` saying where, its
    batch-mates and a concurrent caller sharing the round trip get their results."""

    async def scenario() -> None:
        async with noop_stack(redis_url, prefix), AsyncClient(redis_url, prefix=prefix) as client:
            mixed, other = await asyncio.gather(
                client.submit_many("noop", "noop", ["good", LONE_SURROGATE, "x\x00y\r\n"], timeout=10),
                client.submit_many("noop", "noop", ["another caller"], timeout=10),
            )
            assert [r.output for r in (mixed[0], mixed[2], other[0])] == [{"chars": 4}, {"chars": 5}, {"chars": 14}]
            assert (mixed[1].status, mixed[1].reason) == ("error", "bad_input")
            assert "not valid UTF-8 (byte 14" in str(mixed[1].error)

    asyncio.run(scenario())


def test_an_unencodable_call_fails_alone_in_its_round_trip(redis_url: str, prefix: str) -> None:
    """A call whose shared fields redis-py cannot encode raises, and no other call of the same round
    trip does: those are sent again without it."""

    async def scenario() -> None:
        async with noop_stack(redis_url, prefix), AsyncClient(redis_url, prefix=prefix) as client:
            calls = [client.submit_many("noop", "noop", [f"text {i}"], timeout=10) for i in range(4)]
            calls.insert(2, client.submit_many("noop\ud800", "noop", ["bad model name"], timeout=10))
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            assert isinstance(outcomes.pop(2), UnicodeEncodeError)
            assert [[r.output for r in results] for results in outcomes] == [[{"chars": 6}]] * 4  # type: ignore[union-attr]

    asyncio.run(scenario())


def test_an_input_that_is_no_text_raises_before_anything_is_sent(redis_url: str, prefix: str) -> None:
    async def scenario() -> None:
        async with noop_stack(redis_url, prefix), AsyncClient(redis_url, prefix=prefix) as client:
            with pytest.raises(TypeError, match="input 1 must be str"):
                await client.submit_many("noop", "noop", ["fine", None], timeout=10)  # type: ignore[list-item]
            assert not client._waiting  # no handle left waiting for a task never sent
            assert (await client.submit("noop", "noop", "still usable", timeout=10)).ok

    asyncio.run(scenario())


def test_embed_of_no_texts_is_an_empty_matrix(redis_url: str, prefix: str) -> None:
    async def scenario() -> None:
        async with AsyncClient(redis_url, prefix=prefix) as client:
            vectors = await client.embed([], timeout=10)
            assert vectors.shape == (0, 0) and vectors.dtype == np.float32
            assert await client.translate([], model="any", timeout=10) == []

    asyncio.run(scenario())


def test_a_lone_string_is_one_input_not_one_per_character(redis_url: str, prefix: str) -> None:
    """`embed("some text")` as OpenAI's `input: "some text"`: one task, one row; the same for
    `submit_many`, `translate` and `cancel` (one id)."""

    async def scenario() -> None:
        async with noop_stack(redis_url, prefix), AsyncClient(redis_url, prefix=prefix) as client:
            results = await client.submit_many("noop", "noop", "some text", timeout=10)
            assert [r.output for r in results] == [{"chars": 9}]
            with pytest.raises(TaskFailed) as failed:  # one task: the no-op model has no `embed`
                await client.embed("some text", model="noop", timeout=10)
            assert failed.value.reason == "unknown_op"
            with pytest.raises(TaskFailed, match="is empty"):
                await client.embed("", model="noop", timeout=10)  # an empty text, not an empty list
            handles = await client.submit_tasks("noop", "noop", "abc")
            assert len(handles) == 1 and (await handles[0]).ok
            await client.cancel(handles[0].id)
            marks = await client._send([("EXISTS", client.keys.cancelled(handles[0].id), client.keys.cancelled("a"))])
            assert marks == [1]  # the id's mark, none per character

    asyncio.run(scenario())
