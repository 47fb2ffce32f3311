"""Benchmark reports: the JSON is written first, the plot extra is checked before the run, and the
files go to `--out` (default under the current directory), never into the repository's docs."""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ectrans import cli
from ectrans.bench import PLOTTED, SCENARIOS, harness


@pytest.fixture(autouse=True)
def fresh_report_options(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(harness, "REPORTS", harness.ReportOptions())
    monkeypatch.delenv("ECTRANS_BENCH_DIR", raising=False)
    yield


def test_default_output_is_under_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert harness.output_dir() == tmp_path / "ectrans-bench"
    monkeypatch.setenv("ECTRANS_BENCH_DIR", str(tmp_path / "env"))
    assert harness.output_dir() == tmp_path / "env"
    harness.REPORTS.out = tmp_path / "flag"
    assert harness.output_dir() == tmp_path / "flag"  # the flag wins over the environment


def test_json_is_written_before_a_failing_plot(tmp_path: Path) -> None:
    harness.REPORTS.out = tmp_path

    def broken(figure: Any) -> None:
        raise RuntimeError("the plot failed")

    with pytest.raises(RuntimeError, match="the plot failed"):
        harness.write_report("demo", {"tasks_per_s": 12.5}, "# demo\n", broken)
    assert json.loads((tmp_path / "demo.json").read_text()) == {"tasks_per_s": 12.5}
    assert (tmp_path / "demo.md").read_text() == "# demo\n"


def test_missing_plot_extra_stops_before_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(harness, "plotting_missing", lambda: "matplotlib is not installed")
    started: list[str] = []
    monkeypatch.setattr(importlib.import_module(SCENARIOS["baselines"]), "run", lambda quick: started.append("run"))
    assert cli.main(["bench", "baselines", "--quick", "--out", str(tmp_path)]) == 2
    assert started == []
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_no_plot_runs_without_the_extra_and_keeps_the_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(harness, "plotting_missing", lambda: "matplotlib is not installed")

    def fake_run(quick: bool) -> dict[str, Any]:
        result: dict[str, Any] = {"quick": quick}
        result["report"] = harness.write_report("baselines", result, "# md\n", lambda fig: None)
        return result

    monkeypatch.setattr(importlib.import_module(SCENARIOS["baselines"]), "run", fake_run)
    assert cli.main(["bench", "baselines", "--quick", "--no-plot", "--out", str(tmp_path), "--compact"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["quick"] is True
    assert json.loads((tmp_path / "baselines.json").read_text()) == printed
    assert not (tmp_path / "baselines.png").exists()


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_plotted_lists_every_scenario_that_draws(scenario: str) -> None:
    source = inspect.getsource(importlib.import_module(SCENARIOS[scenario]))
    draws = "lambda fig: draw(" in source
    assert draws == (scenario in PLOTTED)
