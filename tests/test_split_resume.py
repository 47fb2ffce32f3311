"""Split tasks at the model layer: a client's first k units + the server's resumed rest equal the
unsplit run, for every split point, on tiny encoders and encoder-decoders (random weights)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ectrans.common.registry import build_spec
from ectrans.common.split import pack_activation, unpack_activation
from ectrans.models.api import Executor, ItemResult, Request
from ectrans.split.local import LocalModel
from tests.tiny_encoders import make_tiny_bert, make_tiny_distilbert
from tests.tiny_seq2seq import make_tiny_bart, make_tiny_marian, make_tiny_t5

TEXTS = ["hello world", "the cat sees a big red house near the river", "go"]
MAKERS: dict[str, Callable[[Path], Path]] = {
    "bert": make_tiny_bert,
    "distilbert": make_tiny_distilbert,
    "marian": make_tiny_marian,
    "t5": make_tiny_t5,
    "bart": make_tiny_bart,
}
GENERATION = {"max_new_tokens": 8, "num_beams": 1}


@pytest.fixture(scope="module", params=sorted(MAKERS))
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalModel, Executor]]:
    from ectrans.models.loader import load_executor

    family = str(request.param)
    path = MAKERS[family](tmp_path_factory.mktemp(family))
    spec = build_spec(family, {"path": str(path)})
    executor = load_executor(spec, device="cpu", threads=1, segments=2)
    yield LocalModel(path, name=family, threads=1), executor
    executor.close()


def op_of(local: LocalModel) -> tuple[str, dict[str, int]]:
    return ("embed", {}) if local.spec.kind == "encoder" else ("translate", GENERATION)


def run(executor: Executor, request: Request) -> list[ItemResult]:
    results, _ = executor.submit(request).result(timeout=60)
    return results


def assert_same(got: list[ItemResult], want: list[ItemResult]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.error is None and w.error is None, (g.error, w.error)
        if isinstance(w.output, dict):
            assert g.output["token_ids"] == w.output["token_ids"]
            assert g.output["text"] == w.output["text"]
        else:
            np.testing.assert_allclose(g.output, w.output, atol=1e-5, rtol=0)


def test_every_split_point_equals_the_unsplit_task(served: tuple[LocalModel, Executor]) -> None:
    local, executor = served
    op, params = op_of(local)
    unsplit = run(executor, Request(op, TEXTS, params))
    for k in range(1, local.all_local):
        resumed = run(executor, Request(op, local.payloads(TEXTS, k, params), params, segment=k))
        assert_same(resumed, unsplit)
    everything_local = [ItemResult(output=o) for o in local.run_all(TEXTS, params)]
    assert_same(everything_local, unsplit)


def test_half_precision_payloads_stay_close(served: tuple[LocalModel, Executor]) -> None:
    local, executor = served
    if local.spec.kind != "encoder":
        pytest.skip("decoded tokens may flip on float16 rounding; the option is for encoders' vectors")
    unsplit = run(executor, Request("embed", TEXTS))
    k = local.all_local - 1
    halves = local.payloads(TEXTS, k, half=True)
    assert len(halves[0]) < len(local.payloads(TEXTS, k)[0]) * 0.6
    resumed = run(executor, Request("embed", halves, segment=k))
    for g, w in zip(resumed, unsplit, strict=True):
        np.testing.assert_allclose(g.output, w.output, atol=5e-3)


def test_a_bad_payload_fails_alone(served: tuple[LocalModel, Executor]) -> None:
    local, executor = served
    op, params = op_of(local)
    k = 2
    good = local.payloads(TEXTS[:1], k, params)[0]
    wrong_width = unpack_activation(good)
    assert wrong_width.hidden is not None
    narrow = pack_activation(k, wrong_width.ids, wrong_width.hidden[:, :3])
    elsewhere = local.payloads(TEXTS[:1], k + 1, params)[0]  # the state one layer later, labelled k by the task
    bad: list[Any] = [good, b"\x00not msgpack", narrow, elsewhere, "text", good]
    results = run(executor, Request(op, bad, params, segment=k))
    assert results[0].error is None and results[-1].error is None
    assert "not valid" in str(results[1].error)
    assert "wide" in str(results[2].error)
    assert "split point 3, not 2" in str(results[3].error)
    assert "must be bytes" in str(results[4].error)
