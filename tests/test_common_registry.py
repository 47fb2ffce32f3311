"""The model registry: the packaged default, and models added by configuration."""

from __future__ import annotations

import json
import shutil
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
        ("bad name!", {"path": "/x"}, "the name must be"),
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


def write_models(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def test_typo_is_refused_naming_file_model_and_key(tmp_path: Path) -> None:
    minilm = load_registry()["minilm"].path
    models = write_models(tmp_path, f'[models.mine]\npath = "{minilm}"\ndytpe = "float16"\n')
    with pytest.raises(RegistryError) as error:
        load_registry(models)
    assert str(error.value) == f"{models}: model 'mine': unknown key 'dytpe' (did you mean 'dtype'?)"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('max_tokens = "512"', r"'max_tokens': Input should be a valid integer"),
        ('dtype = "fp16"', r"'dtype': Input should be 'float32', 'float16' or 'bfloat16'"),
        ("rt_max_batch = 0", r"'rt_max_batch': Input should be greater than or equal to 1"),
        ("delay_ms = 5", r"'delay_ms' is for kind = \"noop\" models only"),
    ],
)
def test_wrong_values_are_refused(tmp_path: Path, entry: str, message: str) -> None:
    minilm = load_registry()["minilm"].path
    models = write_models(tmp_path, f'[models.mine]\npath = "{minilm}"\n{entry}\n')
    with pytest.raises(RegistryError, match=rf"^{models}: model 'mine': .*{message}"):
        load_registry(models)


def test_unknown_table_and_json_source_are_named(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=r"unknown table 'model'"):
        load_registry(write_models(tmp_path, '[model.mine]\nkind = "noop"\n'))
    with pytest.raises(RegistryError, match=r"^ECTRANS_MODELS_JSON: model 'n': unknown key 'delay'"):
        load_registry(None, json.dumps({"n": {"kind": "noop", "delay": 5}}))


def test_model_batching_overrides_the_worker_defaults() -> None:
    from ectrans.services.worker.service import ModelLane
    from ectrans.services.worker.settings import WorkerSettings

    spec = build_spec("n", {"kind": "noop", "rt_max_batch": 2, "batch_max_wait_ms": 50.0, "token_budget": 4096})
    assert spec.batching == {"rt_max_batch": 2, "batch_max_wait_ms": 50.0, "token_budget": 4096}
    executor = NoopExecutor(spec)
    try:
        lane = ModelLane(spec, executor, WorkerSettings(rt_max_batch=8, batch_max_batch=16))
    finally:
        executor.close()
    assert (lane.batcher.realtime.max_batch, lane.batcher.batch.max_batch) == (2, 16)  # 16: the worker's
    assert (lane.batcher.batch.max_wait_s, lane.batcher.batch.token_budget) == (0.05, 4096)


def test_sentence_transformers_modules_beyond_pooling_are_refused(tmp_path: Path) -> None:
    model = tmp_path / "dense-model"
    shutil.copytree(load_registry()["minilm"].path, model)
    modules = json.loads((model / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (model / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(RegistryError, match=r"model 'dense': .*modules ECTrans does not run \(Dense\)"):
        build_spec("dense", {"path": str(model)})


def test_up_refuses_a_typo_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ectrans import cli

    monkeypatch.setenv("ECTRANS_MODELS_FILE", "")  # restored after the test: `up` sets it for its children
    models = write_models(tmp_path, '[models.n]\nkind = "noop"\nrt_max_bacth = 4\n')
    assert cli.main(["up", "--models-file", str(models)]) == 2
    assert "unknown key 'rt_max_bacth' (did you mean 'rt_max_batch'?)" in capsys.readouterr().err
