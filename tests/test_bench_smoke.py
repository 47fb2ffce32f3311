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
from typing import Any

import pytest

from ectrans.bench.workload import percentile, poisson_arrivals, sample_texts

REQUIRED = (
    "throughput_ratio_vs_per_request",
    "throughput_ratio_vs_multitask",
    "ratio_of_upper_bound",
    "redis_path_tasks_per_s",
)


def run_tiny_bench(scenario: str, tmp_path: Path, timeout_s: float) -> dict[str, Any]:
    """`ectrans bench <scenario> --quick --compact` at the tiny size, reports under `tmp_path`: its JSON.

    It must exit 0 within `timeout_s` and print the JSON and nothing else on stdout.
    """
    env = {**os.environ, "ECTRANS_BENCH_SIZE": "tiny", "ECTRANS_BENCH_DIR": str(tmp_path)}
    bench = subprocess.Popen(
        [sys.executable, "-m", "ectrans.cli", "bench", scenario, "--quick", "--compact"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = bench.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        bench.terminate()  # the bench stops the processes it started on SIGTERM
        stdout, stderr = bench.communicate(timeout=25)
        pytest.fail(f"the tiny {scenario} benchmark did not finish in {timeout_s:.0f} s:\n{stderr[-3000:]}")
    assert bench.returncode == 0, stderr[-3000:]
    result: dict[str, Any] = json.loads(stdout)  # stdout holds the JSON and nothing else
    return result


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
    result = run_tiny_bench("baselines", tmp_path, timeout_s=270)
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


def test_mixed_counts_batches_and_misses() -> None:
    from ectrans.bench.mixed import Outcome, completion_rate, rt_summary

    # Results of a batch come together: the interval starts when the first batch has finished.
    assert completion_rate([1.0, 1.0, 2.0, 2.0, 3.0, 3.0], 0.0, 10.0) == 2.0
    assert completion_rate([1.0, 1.0], 0.0, 10.0) is None
    outcomes = [
        Outcome(0, "error", "deadline", 5.0),  # carries the deadline: a miss
        Outcome(1, "ok", "", 40.0),  # no deadline: a latency sample
        Outcome(2, "ok", "", 300.0),  # late
        Outcome(3, "ok", "", 60.0),
    ]
    summary = rt_summary(outcomes, deadline_ms=250)
    assert summary["latencies_ms"] == [40.0, 60.0]
    assert summary["deadline_miss_rate"] == 1.0
    assert summary["misses"] == {"deadline": 1, "late": 1}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_mixed_tiny_prints_its_json(tmp_path: Path) -> None:
    result = run_tiny_bench("mixed", tmp_path, timeout_s=270)
    for name in ("rt_p99_ms_idle", "rt_p99_ms_loaded", "rt_p99_ms_loaded_fifo", "rt_p99_ms_loaded_per_request"):
        assert isinstance(result[name], float) and result[name] > 0, name
    for name in ("deadline_miss_rate", "deadline_miss_rate_fifo"):
        assert 0.0 <= result[name] <= 1.0, name
    for name in ("batch_throughput_ratio", "one_segment_ms", "rt_p99_target_ms"):  # None: too few batches
        assert result[name] is None or result[name] > 0, name
    assert result["meets_rt_target"] in (True, False, None)
    assert isinstance(result["lost"], int) and result["lost"] >= 0
    assert result["device"]
    assert (tmp_path / "mixed.md").read_text().startswith("# Benchmark `mixed`")
    assert (tmp_path / "mixed.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bench_split_tiny_prints_its_json(tmp_path: Path) -> None:
    result = run_tiny_bench("split", tmp_path, timeout_s=150)
    assert result["scenario"] == "split" and result["device"]
    assert result["bandwidths_mbps"] == [1.0, 10.0, 100.0]
    last = str(len(result["units"]))  # k = K: every unit local
    for bw in ("1", "10", "100"):
        latency = result["latency_ms"][bw]
        assert {"0", last, "auto"} <= set(latency), latency
        assert all(ms > 0 for ms in latency.values()), latency
        assert result["auto_vs_best_fixed"][bw] > 0
        assert sum(result["auto_choices"][bw].values()) == result["samples_per_point"][bw]["auto"]
        assert len(result["predicted_ms"][bw]) == len(result["units"]) + 1
    assert isinstance(result["meets_target"], bool)
    assert result["payload_bytes"]["2"] > result["payload_bytes"]["0"] > 0
    assert result["profile_s"] > 0 and result["client_threads"] == 1
    assert (tmp_path / "split.md").read_text().startswith("# Benchmark `split`")
    assert (tmp_path / "split.png").stat().st_size > 0


def test_bench_gateway_tiny_prints_its_json(tmp_path: Path) -> None:
    result = run_tiny_bench("gateway", tmp_path, timeout_s=150)
    assert result["scenario"] == "gateway"
    single = result["one_at_a_time"]
    assert single["http"]["p50_ms"] > 0 and single["python_client"]["p50_ms"] > 0
    assert [level["clients"] for level in result["closed_loops"]] == [1, 32]
    assert all(level["requests_per_s"] > 0 and not level["errors"] for level in result["closed_loops"])
    used = result["closed_loops"][-1]["cpu_us_per_request"]
    assert set(used) == {"gateway", "dispatcher", "worker-0", "redis", "load"} and all(us > 0 for us in used.values())
    assert result["gateway_cpu_us_per_request"] == used["gateway"] and result["requests_per_s_alone"] > 0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_bench_serve_tiny_prints_its_json(tmp_path: Path) -> None:
    result = run_tiny_bench("serve", tmp_path, timeout_s=210)
    assert result["scenario"] == "serve" and result["device"]
    assert set(result["bare_loops_tasks_per_s"]) == {"per_request", "arrival_batch_8"}
    assert all(rate > 0 for rate in result["bare_loops_tasks_per_s"].values())
    assert [row["clients"] for row in result["closed"]] == [1, 8]
    for row, loop in zip(result["closed"], ("per_request", "arrival_batch_8"), strict=True):
        assert row["answered"] > 0 and row["p50_ms"] > 0 and row["server_batches"]["batches"] > 0, row
        bare = row["bare"]  # the level's bare loop, just before and just after it
        assert bare["loop"] == loop and bare["mean"] == round((bare["before"] + bare["after"]) / 2, 2) > 0
        assert result["ratios"][f"clients_{row['clients']}"] == round(row["tasks_per_s"] / bare["mean"], 3)
    assert set(result["ratios"]) == {"clients_1", "clients_8"} and all(r > 0 for r in result["ratios"].values())
    assert result["open"][0]["answered"] > 0 and result["open_kept_at_top_load"] > 0


def test_bench_lone_times_each_way_quiet_and_beside_a_busy_core() -> None:
    from ectrans.bench.lone import WAYS, bench_lone

    out = bench_lone(sample_texts(6, seed=1), 1, threads=2)
    for load in ("quiet", "busy_core"):
        assert set(out[load]["ms_per_request"]) == set(WAYS)
        assert all(ms > 0 for ms in out[load]["ms_per_request"].values()) and out[load]["chosen_vs_best"] > 0


def test_bench_traced_pairs_traced_and_eager_layers() -> None:
    from ectrans.bench.traced import bench_traced

    out = bench_traced(sample_texts(9, seed=1), 2, threads=1)
    for kind in ("request", "batch"):
        assert set(out[f"ms_per_{kind}"]) == {"traced", "eager"} and all(v > 0 for v in out[f"ms_per_{kind}"].values())
        assert out[f"traced_vs_eager_per_{kind}"] > 0
