"""`ectrans bench baselines` runs end to end at a tiny size and prints the JSON it promises.

Only that it runs and its figures are there and positive: the figures themselves are benchmark
results (docs/benchmarks.md), not test assertions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ectrans.bench.workload import percentile, poisson_arrivals, sample_texts

REQUIRED = (
    "throughput_ratio_vs_per_request",
    "throughput_ratio_vs_multitask",
    "ratio_of_upper_bound",
    "redis_path_tasks_per_s",
)


def test_workload_is_seeded_and_shaped() -> None:
    assert sample_texts(20, seed=3) == sample_texts(20, seed=3)
    assert sample_texts(20, seed=3) != sample_texts(20, seed=4)
    long = sample_texts(20, seed=3, mix="long")
    assert min(len(t) for t in long) > max(len(t) for t in sample_texts(20, seed=3, mix="short"))
    arrivals = poisson_arrivals(2000, 100.0, seed=1)
    assert arrivals == sorted(arrivals)
    assert 15 < arrivals[-1] < 25  # mean gap 1/100 s
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_baselines_tiny_prints_its_json(tmp_path: Path) -> None:
    env = {**os.environ, "ECTRANS_BENCH_SIZE": "tiny", "ECTRANS_BENCH_DIR": str(tmp_path)}
    bench = subprocess.Popen(
        [sys.executable, "-m", "ectrans.cli", "bench", "baselines", "--quick", "--compact"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = bench.communicate(timeout=270)
    except subprocess.TimeoutExpired:
        bench.terminate()  # the bench stops the processes it started on SIGTERM
        stdout, stderr = bench.communicate(timeout=25)
        pytest.fail(f"the tiny benchmark did not finish in 270 s:\n{stderr[-3000:]}")
    assert bench.returncode == 0, stderr[-3000:]
    result = json.loads(stdout)  # stdout holds the JSON and nothing else
    for name in REQUIRED:
        assert result[name] > 0, name
    assert result["device"]
    for method in ("ectrans", "per_request", "multitask", "plain_sorted", "plain_arrival"):
        assert result["throughput"][method]["tasks_per_s"] > 0, method
    assert result["redis_path"]["single_task"]["p50_ms"] > 0
    assert result["redis_path"]["bare_round_trip"]["p50_ms"] > 0
    assert result["memory"]["after_load"]["per_request_pss_mib"] > 0
    assert (tmp_path / "baselines.md").read_text().startswith("# Benchmark `baselines`")
    assert (tmp_path / "baselines.png").stat().st_size > 0
