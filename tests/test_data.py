"""The benchmark sentences and the Compose schema ship inside the package."""

from __future__ import annotations

import fnmatch
import json
import tomllib
from pathlib import Path

import pytest

from ectrans.bench.workload import SHARED_FILES, load_sentences
from ectrans.data import PACKAGE_DATA, data_dir, data_file

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = (*SHARED_FILES, "compose-spec.json", "README.md")


def test_packaged_files_are_used_without_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ECTRANS_DATA_DIR", raising=False)
    assert data_dir() == PACKAGE_DATA
    assert len(load_sentences("sentences_100.txt")) == 100
    assert len(load_sentences("sentences_extra.txt")) == 19
    assert "$schema" in json.loads(data_file("compose-spec.json").read_text())


def test_every_data_file_is_package_data() -> None:
    """An installed (non-editable) package has them only if pyproject lists them."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setuptools["package-data"]["ectrans.data"]
    for name in SHIPPED:
        assert (PACKAGE_DATA / name).is_file(), name
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name


def test_override_folder_wins_and_missing_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sentences_100.txt").write_text("one\n\n two \n")
    monkeypatch.setenv("ECTRANS_DATA_DIR", str(tmp_path))
    assert load_sentences("sentences_100.txt") == ["one", "two"]
    with pytest.raises(FileNotFoundError, match=r"compose-spec\.json.*ECTRANS_DATA_DIR"):
        data_file("compose-spec.json")
