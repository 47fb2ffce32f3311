"""`make gpu-proof DRY=1` keeps working where no GPU is: every step runs at its smallest size on the
CPU or is skipped with its reason, the report is written, and nothing under docs/ changes.

The tiny baselines, mixed and serve runs are left out here (`--skip`): tests/test_bench_smoke.py runs
them at the same size already.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ectrans.bench.gpu_proof import STEPS, headlines

REPO = Path(__file__).resolve().parents[1]
SMOKE_TESTED = "baselines,mixed,serve"  # steps tests/test_bench_smoke.py runs at the same size


def docs_state() -> str:
    found = subprocess.run(
        ["git", "status", "--porcelain", "--", "docs"], capture_output=True, text=True, cwd=REPO, check=False
    )
    return found.stdout


@pytest.mark.slow
def test_the_dry_run_runs_every_step_or_says_why_not(tmp_path: Path) -> None:
    before = docs_state()
    out = tmp_path / "proof"
    ran = subprocess.run(
        [sys.executable, "-m", "ectrans.bench.gpu_proof", "--dry", "--out", str(out), "--skip", SMOKE_TESTED],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=170,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    result = json.loads((out / "gpu-proof.json").read_text())
    assert list(result["steps"]) == [name for name, *_ in STEPS]
    for name, _, _, cuda_only, _ in STEPS:
        step = result["steps"][name]
        if cuda_only:
            assert step == step | {"status": "skipped", "reason": "dry run: needs a CUDA GPU"}
    memory = result["steps"]["memory"]
    assert memory["status"] == "ok", memory
    assert memory["figures"]["ks"] == [1, 2]
    assert "saving_k2" in " ".join(result["headlines"])
    assert result["machine"]["dry"] and result["machine"]["commit"] != "unknown"
    markdown = (out / "gpu-proof.md").read_text()
    assert "dry run" in markdown and "needs a CUDA GPU" in markdown
    assert docs_state() == before  # a dry run never rewrites the tracked reports


def test_a_dry_run_refuses_to_write_into_docs() -> None:
    ran = subprocess.run(
        [sys.executable, "-m", "ectrans.bench.gpu_proof", "--dry", "--out", str(REPO / "docs" / "bench")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 2 and "does not write to docs/bench" in ran.stderr


def test_headlines_pick_the_target_figures() -> None:
    split = {"weights_shared": 356 * 2**20, "executors_allocators": 0, "contexts": 2**30, "processes": 3}
    steps: dict[str, dict[str, Any]] = {
        "baselines": {"figures": {"throughput_ratio_vs_per_request": 6.1, "ratio_of_upper_bound": 0.93}},
        "memory": {
            "figures": {
                "saving_vs_independent": {"prototype-marian": {"float32": {"4": 0.45}}},
                "models": {
                    "prototype-marian": {"float32": {"k": {"4": {"shared": {"served": {"device_split": split}}}}}}
                },
            }
        },
    }
    found = headlines(steps)
    assert found["baselines.throughput_ratio_vs_per_request"] == 6.1
    assert found["memory.prototype-marian.float32.saving_k4"] == 0.45
    assert found["memory.prototype-marian.float32.k4.split_mib"]["contexts"] == 1024.0
