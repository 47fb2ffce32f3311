"""The model registry: the packaged default, and models added by configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ectrans.common.registry import RegistryError, build_spec, load_registry


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
    ],
)
def test_bad_entries_are_named(name: str, entry: dict[str, str], message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        build_spec(name, entry)


def test_wrong_op_for_architecture() -> None:
    with pytest.raises(RegistryError, match="cannot serve"):
        build_spec("enc", {"path": str(load_registry()["minilm"].path), "ops": ["translate"]})
