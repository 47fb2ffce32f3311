"""The model registry: the packaged default, and models added by configuration."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ectrans.common.registry import RegistryError, build_spec, load_registry
from ectrans.models.api import Request
from ectrans.models.noop import NoopExecutor


def test_packaged_minilm_is_always_known() -> None:
    spec = load_registry()["minilm"]
    assert spec.kind == "encoder" and spec.ops == {"embed"} and spec.max_tokens == 256
    assert (spec.path / "model.safetensors").exists() and len(spec.revision) == 12


def test_models_from_toml_and_json(tmp_path: Path) -> None:
    minilm = load_registry()["minilm"].path
    toml = tmp_path / "models.toml"
    toml.write_text(f'[models.mine]\npath = "{minilm}"\ndtype = "bfloat16"\n')
    extra = json.dumps({"models": {"noop": {"kind": "noop"}}})
    registry = load_registry(toml, extra)
    assert registry["mine"].dtype == "bfloat16" and registry["mine"].kind == "encoder"
    assert registry["noop"].ops == {"noop"}


@pytest.mark.parametrize(
    ("name", "entry", "message"),
    [
        ("bad name!", {"path": "/x"}, "model name"),
        ("nopath", {}, "'path'"),
        ("missing", {"path": "/does/not/exist"}, "cannot read"),
        ("slow", {"kind": "noop", "delay_ms": -1}, "delay_ms"),
        ("slow", {"kind": "noop", "delay_ms": "5"}, "delay_ms"),
    ],
)
def test_bad_entries_are_named(name: str, entry: dict[str, object], message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        build_spec(name, entry)


def test_wrong_op_for_architecture() -> None:
    with pytest.raises(RegistryError, match="cannot serve"):
        build_spec("enc", {"path": str(load_registry()["minilm"].path), "ops": ["translate"]})


def test_noop_delay_runs_batches_one_after_another() -> None:
    """`delay_ms` stands in for a device: each batch takes that long, and batches queue behind each other."""
    executor = NoopExecutor(build_spec("slow", {"kind": "noop", "delay_ms": 100}))
    try:
        started = time.monotonic()
        futures = [executor.submit(Request("noop", [f"text {i}"])) for i in range(3)]
        outputs = [future.result(timeout=10) for future in futures]
        elapsed = time.monotonic() - started
    finally:
        executor.close()
    assert [results[0].output for results, _ in outputs] == [{"chars": 6}] * 3
    assert all(stats.compute_ms == 100.0 for _, stats in outputs)
    assert elapsed >= 0.3
