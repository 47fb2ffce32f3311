"""Weight sharing on a CUDA GPU: K executor processes on one device attached to one holder's weights
through CUDA IPC. Skipped without CUDA. On a GPU host (see docs/weight-sharing.md):

    .venv/bin/pytest -m cuda tests/test_sharing_cuda.py -s -p no:cacheprovider

Device memory is NVML's `used` for the whole device, so run it on an otherwise idle GPU.
Outputs are compared bit for bit with a private load in another process: the same kernels on the
same shapes (cuBLAS picks its algorithm by shape; `CUBLAS_WORKSPACE_CONFIG` pins its workspace so
split-K reductions cannot differ between processes).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from ectrans.common.registry import ModelSpec, build_spec
from ectrans.models.api import ItemResult, Request
from ectrans.models.loader import load_executor
from ectrans.models.synthetic import make_minilm_shape, make_prototype_marian
from ectrans.sharing.manifest import spec_to_wire
from ectrans.sharing.process_pool import SharedExecutorPool
from tests.test_sharing_weights import TEXTS, assert_same, run
from tests.tiny_seq2seq import SENTENCES

pytestmark = [pytest.mark.cuda, pytest.mark.slow]
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # inherited by the pools' processes
REPO = Path(__file__).resolve().parents[1]
DEVICE = "cuda:0"
PARAMS = {"num_beams": 1, "max_new_tokens": 8}


def device_used() -> int:
    """Bytes in use on GPU 0 for every process (NVML)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)
    finally:
        pynvml.nvmlShutdown()


def reference(spec: ModelSpec, op: str, texts: list[str], params: dict[str, Any]) -> list[ItemResult]:
    executor = load_executor(spec, device=DEVICE, threads=1)
    try:
        return run(executor, op, texts, params)
    finally:
        executor.close()
        torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def prototype(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    path = make_prototype_marian(tmp_path_factory.mktemp("prototype") / "marian")
    return build_spec("prototype", {"path": str(path)})


@pytest.fixture(scope="module")
def prototype_reference(prototype: ModelSpec) -> list[ItemResult]:
    return reference(prototype, "translate", SENTENCES, PARAMS)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_k_executors_on_one_device_hold_the_weights_once(
    prototype: ModelSpec, prototype_reference: list[ItemResult], k: int
) -> None:
    """Device memory split into what each part holds: the holder's allocator (the one copy of the
    weights), each executor's allocator (activations), and the CUDA contexts (one per process,
    about 400-500 MiB on an H100: as large as the weights here, so "an added executor costs less
    than the weights" would not hold). Sharing saves what K private copies would add: the weights
    K - 1 times over."""
    before = device_used()
    with contextlib.closing(SharedExecutorPool(prototype, 1, device=DEVICE)) as pool:
        assert_same(run(pool, "translate", SENTENCES, PARAMS), prototype_reference)
        one = device_used() - before
        if k > 1:
            pool.grow(k - 1)
        futures = [pool.submit(Request("translate", SENTENCES, PARAMS)) for _ in range(4 * k)]
        for future in futures:
            assert_same(future.result(timeout=300)[0], prototype_reference)
        infos = pool.executor_info()
        assert all(info["served"] > 0 for info in infos)
        assert all(info["guarded"] for info in infos), "a CUDA kernel refused the write guard"
        total = device_used() - before
        weights = pool.weights_bytes
        holder_reserved = int(pool.holder_info["cuda_reserved"])
        executors_reserved = [int(info["cuda_reserved"]) for info in infos]
    contexts = total - holder_reserved - sum(executors_reserved)
    per_context = contexts / (k + 1)  # the holder's and each executor's
    figures: dict[str, Any] = {
        "k": k,
        "weights_bytes": weights,
        "device_used_with_one": one,
        "device_used_with_k": total,
        "holder_reserved": holder_reserved,
        "executors_reserved": executors_reserved,
        "contexts": contexts,
        "per_context": per_context,
    }
    independent = None
    if k == 4:  # K private copies, measured the same way
        before = device_used()
        with contextlib.closing(SharedExecutorPool(prototype, k, device=DEVICE, share=False, fork_server=False)) as own:
            for future in [own.submit(Request("translate", SENTENCES, PARAMS)) for _ in range(4 * k)]:
                assert_same(future.result(timeout=300)[0], prototype_reference)
            independent = device_used() - before
        figures |= {"independent": independent, "saving_vs_independent": 1 - total / independent}
    print("\n" + json.dumps(figures))
    assert weights > 300 * 2**20
    assert holder_reserved >= weights  # the holder holds the weights
    assert all(reserved < weights for reserved in executors_reserved)  # executors hold no copy
    assert 0 < per_context < 2**30
    if independent is not None:
        # Sharing saves the weights of every executor but one, less the holder's own context.
        assert independent - total > (k - 1) * weights - per_context - 128 * 2**20


def test_segment_compute_time_comes_from_cuda_events(prototype: ModelSpec) -> None:
    """On CUDA the batch cost the worker fits must be the segments' run time on their streams,
    not zero and not the service time with the waits between stages."""
    executor = load_executor(prototype, device=DEVICE, threads=1)
    try:
        futures = [executor.submit(Request("translate", SENTENCES, PARAMS)) for _ in range(6)]
        stats = [future.result(timeout=300)[1] for future in futures]
    finally:
        executor.close()
    assert all(s.compute_ms > 0 for s in stats)
    assert all(s.compute_ms <= s.service_ms * 1.01 for s in stats)
    assert stats[-1].compute_ms < stats[-1].service_ms  # the last batch queued behind five others


@pytest.fixture(scope="module")
def minilm_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedExecutorPool]:
    # A model of MiniLM's shape built from its config: GPU hosts without network lack the package.
    spec = build_spec("minilm", {"path": str(make_minilm_shape(tmp_path_factory.mktemp("minilm") / "model"))})
    pool = SharedExecutorPool(spec, 2, device=DEVICE)
    yield pool
    pool.close()


def test_embeddings_from_shared_weights_equal_a_private_load(minilm_pool: SharedExecutorPool) -> None:
    want = reference(minilm_pool.spec, "embed", TEXTS, {})
    futures = [minilm_pool.submit(Request("embed", TEXTS)) for _ in range(8)]
    for future in futures:
        assert_same(future.result(timeout=120)[0], want)


def test_writes_through_torch_raise_in_the_writer_only(minilm_pool: SharedExecutorPool) -> None:
    want = reference(minilm_pool.spec, "embed", TEXTS, {})
    assert minilm_pool.holder_socket is not None
    writer = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.weights_writer",
            minilm_pool.holder_socket,
            json.dumps(spec_to_wire(minilm_pool.spec)),
        ],
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert writer.returncode == 0, writer.stderr[-2000:]
    outcomes = {line["attempt"]: line["outcome"] for line in map(json.loads, writer.stdout.splitlines())}
    for name in ("torch add_", "torch copy_", "torch setitem"):
        assert outcomes[name].startswith("RuntimeError: Cannot access data pointer"), outcomes
    for future in [minilm_pool.submit(Request("embed", TEXTS)) for _ in range(4)]:
        assert_same(future.result(timeout=120)[0], want)


def test_holder_killed_under_load_executors_restart_and_no_batch_is_lost(minilm_pool: SharedExecutorPool) -> None:
    want = reference(minilm_pool.spec, "embed", TEXTS, {})
    old_executors = set(minilm_pool.executor_pids())
    futures = [minilm_pool.submit(Request("embed", TEXTS)) for _ in range(24)]
    holder = minilm_pool.holder_pid
    assert holder is not None
    os.kill(holder, signal.SIGKILL)
    for future in futures:
        assert_same(future.result(timeout=300)[0], want)
    assert minilm_pool.wait_settled(300)
    assert minilm_pool.holder_pid not in (None, holder)
    # On CUDA the holder's memory may go with it, so executors are replaced, not reattached.
    assert not old_executors & set(minilm_pool.executor_pids())
    infos = minilm_pool.executor_info()
    print(
        f"\nreplacement executors ready in {[i['startup_s'] for i in infos]}s; "
        f"the holder's fresh load took {minilm_pool.holder_info.get('startup_s')}s"
    )
