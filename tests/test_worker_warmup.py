"""The worker runs every served model once per task class before it reports ready."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterator, Sequence

import pytest

from ectrans.common.registry import ModelSpec, build_spec
from ectrans.models.api import BatchStats, Executor, ItemResult, Request
from ectrans.models.loader import load_executor
from ectrans.services.worker import service
from ectrans.services.worker.batcher import BatchPolicy
from ectrans.services.worker.settings import WorkerSettings
from ectrans.services.worker.warmup import warm_up
from tests.tiny_encoders import make_tiny_bert, one_torch_thread
from tests.tiny_seq2seq import make_tiny_marian


class Recording(Executor):
    """A real executor that notes every request it is given."""

    def __init__(self, inner: Executor) -> None:
        self.inner = inner
        self.spec = inner.spec
        self.requests: list[Request] = []

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self.inner.count_tokens(texts)

    def submit(self, request: Request) -> concurrent.futures.Future[tuple[list[ItemResult], BatchStats]]:
        self.requests.append(request)
        return self.inner.submit(request)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def tiny_specs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelSpec]:
    root = tmp_path_factory.mktemp("warm")
    return {
        "encoder": build_spec("tiny-bert", {"path": str(make_tiny_bert(root / "bert"))}),
        "seq2seq": build_spec("tiny-marian", {"path": str(make_tiny_marian(root / "marian"))}),
    }


@pytest.mark.parametrize(("kind", "op"), [("encoder", "embed"), ("seq2seq", "generate")])
def test_one_batch_per_class_at_its_largest_size(tiny_specs: dict[str, ModelSpec], kind: str, op: str) -> None:
    executor = Recording(load_executor(tiny_specs[kind], device="cpu", threads=1, segments=1))
    try:
        warm_up(executor, BatchPolicy(3, 0.002), BatchPolicy(5, 0.02))
    finally:
        executor.close()
    assert [(len(r.inputs), r.realtime, r.op) for r in executor.requests] == [(3, True, op), (5, False, op)]


def test_noop_models_are_not_warmed() -> None:
    executor = Recording(load_executor(build_spec("noop", {"kind": "noop"})))
    warm_up(executor, BatchPolicy(3, 0.002), BatchPolicy(5, 0.02))
    assert executor.requests == []


def test_worker_warms_before_it_joins_its_queues(
    redis_url: str, prefix: str, tiny_specs: dict[str, ModelSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = tiny_specs["encoder"]
    loaded: list[Recording] = []

    def load(specs: list[ModelSpec], settings: WorkerSettings) -> dict[str, Executor]:
        loaded.append(Recording(load_executor(spec, device="cpu", threads=1, segments=1)))
        return {spec.name: loaded[0]}

    monkeypatch.setattr(service, "load_executors", load)
    settings = WorkerSettings(redis_url=redis_url, prefix=prefix, serve_models=spec.name, rt_max_batch=2)

    async def start() -> None:
        worker = service.Worker(settings, {spec.name: spec})
        try:
            await worker.start()
        finally:
            loaded[0].close()
            await worker.redis.aclose()

    asyncio.run(start())
    assert [(len(r.inputs), r.realtime) for r in loaded[0].requests] == [(2, True), (32, False)]
