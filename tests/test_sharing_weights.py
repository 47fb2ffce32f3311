"""One copy of the weights shared by executor processes, on CPU, in one process (fast, every
supported family): export to a sealed memfd, attach on `meta`, identical outputs, tied weights stay
one tensor, writes raise. Across processes: tests/test_sharing_process_pool.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ectrans.common.codec import packb, unpackb
from ectrans.common.registry import ModelSpec, build_spec
from ectrans.models.api import Executor, ItemResult, Request
from ectrans.models.loader import load_executor, load_model
from ectrans.sharing.attach import attach_model
from ectrans.sharing.export import export_cpu
from ectrans.sharing.manifest import AttachError, Manifest
from tests import tiny_encoders, tiny_seq2seq

REPO = Path(__file__).resolve().parents[1]
TEXTS = [
    "hello world",
    "the cat sat on the mat and looked at the dog",
    "edge servers batch real-time and bulk tasks together",
    "thanks!",
]
TRANSLATE = {"num_beams": 2, "max_new_tokens": 8}


def run(executor: Executor, op: str, texts: list[str], params: dict[str, Any]) -> list[ItemResult]:
    results, _ = executor.submit(Request(op, texts, params)).result(timeout=120)
    return results


def assert_same(got: list[ItemResult], want: list[ItemResult]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.error == w.error
        if isinstance(w.output, np.ndarray):
            assert isinstance(g.output, np.ndarray)
            assert g.output.dtype == w.output.dtype
            np.testing.assert_array_equal(g.output, w.output)
        else:
            assert g.output == w.output


def op_for(spec: ModelSpec) -> tuple[str, dict[str, Any]]:
    return ("embed", {}) if spec.kind == "encoder" else ("translate", TRANSLATE)


# 1. In one process ------------------------------------------------------------------------------------

FAMILIES = [
    *((name, "float32") for name in tiny_encoders.MAKERS),
    *((name, "float32") for name in tiny_seq2seq.MAKERS),
    ("bert", "bfloat16"),
    ("marian", "bfloat16"),
    ("t5", "float16"),
]


@pytest.mark.parametrize(("family", "dtype"), FAMILIES)
def test_attached_model_gives_the_loaded_models_outputs(tmp_path: Path, family: str, dtype: str) -> None:
    makers = {**tiny_encoders.MAKERS, **tiny_seq2seq.MAKERS}
    spec = build_spec(family, {"path": str(makers[family](tmp_path / family)), "dtype": dtype})
    op, params = op_for(spec)
    texts = tiny_encoders.SENTENCES if spec.kind == "encoder" else tiny_seq2seq.SENTENCES
    model = load_model(spec, torch.device("cpu"))
    reference = load_executor(spec, device="cpu", threads=1, model=model)
    want = run(reference, op, texts, params)
    reference.close()

    manifest, fd = export_cpu(model, spec)
    try:
        wire = Manifest.from_wire(unpackb(packb(manifest.to_wire())))  # as it travels
        attached = attach_model(spec, wire, [os.dup(fd)])
    finally:
        os.close(fd)
    assert attached.guarded
    executor = load_executor(spec, device="cpu", threads=1, model=attached.model)
    assert_same(run(executor, op, texts, params), want)
    executor.close()

    # Tied weights stay one Parameter under every name; each storage was exported once.
    model = attached.model
    for entry in wire.tensors:
        held = {id(model.get_parameter(n) if entry.is_param else model.get_buffer(n)) for n in entry.names}
        assert len(held) == 1, entry.names
    assert len({s.offset for s in wire.storages}) == len(wire.storages)
    if family == "marian":
        shared: Any = attached.model
        assert shared.lm_head.weight is shared.model.shared.weight
    attached.release()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    path = tiny_encoders.make_tiny_bert(tmp_path_factory.mktemp("bert") / "bert")
    return build_spec("bert", {"path": str(path)})


def test_writes_through_torch_raise_and_change_nothing(tiny_bert: ModelSpec) -> None:
    manifest, fd = export_cpu(load_model(tiny_bert, torch.device("cpu")), tiny_bert)
    before = os.pread(fd, manifest.file_bytes, 0)
    attached = attach_model(tiny_bert, manifest, [os.dup(fd)])
    weight = attached.model.get_parameter("embeddings.word_embeddings.weight")
    with torch.no_grad():
        for write in (lambda: weight.add_(1.0), weight.zero_, lambda: weight.__setitem__(0, 1.0)):
            with pytest.raises(RuntimeError, match="Cannot access data pointer"):
                write()
    assert os.pread(fd, manifest.file_bytes, 0) == before
    with pytest.raises(PermissionError):
        os.pwrite(fd, b"\0", 0)  # sealed: not even the holder can write any more
    attached.release()
    os.close(fd)


def test_attach_refuses_another_models_weights(tiny_bert: ModelSpec) -> None:
    manifest, fd = export_cpu(load_model(tiny_bert, torch.device("cpu")), tiny_bert)
    other = build_spec("bert", {"path": str(tiny_bert.path), "dtype": "float16"})
    with pytest.raises(AttachError, match="dtype"):
        attach_model(other, manifest, [fd])


def test_attach_refuses_a_writable_file(tiny_bert: ModelSpec) -> None:
    manifest, sealed = export_cpu(load_model(tiny_bert, torch.device("cpu")), tiny_bert)
    os.close(sealed)
    unsealed = os.memfd_create("ectrans-weights-test", os.MFD_ALLOW_SEALING)
    os.ftruncate(unsealed, manifest.file_bytes)
    with pytest.raises(AttachError, match="not sealed"):
        attach_model(tiny_bert, manifest, [unsealed])
