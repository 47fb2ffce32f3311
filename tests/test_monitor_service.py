"""The monitor on a real Redis with the real dispatcher and worker (the weightless `noop` model):
what it counts equals what was submitted, in the stats hash, the JSON lines and `/metrics` alike."""

from __future__ import annotations

import asyncio
import json
import logging
import platform
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ectrans import __version__
from ectrans.common.heartbeat import host_name
from ectrans.common.recovery import dead_letter, ensure_group
from ectrans.common.registry import ModelSpec, build_spec
from ectrans.common.results import ResultWriter
from ectrans.local.redis_server import free_port
from ectrans.models.api import Executor
from ectrans.services.monitor.collect import Nvml, nvml_pids_are_ours
from ectrans.services.monitor.report import build_report, flatten
from ectrans.services.monitor.service import Monitor
from tests.stack import Stack, running_stack
from tests.test_compose import METRICS

NOOP = build_spec("noop", {"kind": "noop"})
REALTIME, BATCH = 30, 50
REJECTED = {"unknown_model": 3, "unknown_op": 2, "bad_input": 1}


@pytest.fixture(scope="module")
def noop_executor() -> Iterator[Executor]:
    from ectrans.models.noop import NoopExecutor  # what `load_executor(NOOP)` gives, without transformers

    executor = NoopExecutor(NOOP)
    yield executor
    executor.close()


async def until(check: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def next_report(monitor: Monitor) -> None:
    """Wait until the monitor has published once more (everything folded so far is in it)."""
    before = monitor.last
    await until(lambda: monitor.last is not before, what="a report")


async def submit_all(stack: Stack) -> list[str]:
    ids = [await stack.xadd(model="noop", op="noop", input=f"word {i}", priority="realtime") for i in range(REALTIME)]
    ids += [await stack.xadd(model="noop", op="noop", input="a b c", priority="batch") for _ in range(BATCH)]
    ids += [await stack.xadd(model="nope", op="noop", input="x") for _ in range(REJECTED["unknown_model"])]
    ids += [await stack.xadd(model="noop", op="fly", input="x") for _ in range(REJECTED["unknown_op"])]
    ids += [await stack.xadd(model="noop", op="noop") for _ in range(REJECTED["bad_input"])]
    return ids


async def give_up_on_one(stack: Stack) -> str:
    """A task past its delivery limit, dead-lettered by the recovery code the services use."""
    stream = f"{stack.keys.prefix}scratch"
    await ensure_group(stack.redis, stream, "scratch")
    task = {
        "id": "doomed-1",
        "model": "noop",
        "class": "batch",
        "op": "noop",
        "submitted_ms": str(int(time.time() * 1000)),
    }
    raw_id: Any = await stack.redis.xadd(stream, task)  # type: ignore[arg-type]
    entry_id = raw_id.decode()
    writer = ResultWriter(stack.redis, stack.keys, "scratch", 60)
    fields = {k.encode(): v.encode() for k, v in task.items()}
    await dead_letter(stack.redis, stack.keys, writer, stream, [((entry_id, fields), 4)], consumer="test")
    return "doomed-1"


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body: bytes = response.read()
    return body.decode()


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        found.setdefault(family.name, [])
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def total(series: list[tuple[dict[str, str], float]], **labels: str) -> float:
    return sum(value for got, value in series if all(got.get(k) == v for k, v in labels.items()))


SUBMITTED = REALTIME + BATCH + sum(REJECTED.values()) + 1  # + the dead letter


@pytest.fixture
def noop(registry: dict[str, ModelSpec], noop_executor: Executor) -> tuple[dict[str, ModelSpec], dict[str, Executor]]:
    return {**registry, "noop": NOOP}, {"noop": noop_executor}


def run_node(
    redis_url: str, prefix: str, noop: tuple[dict[str, ModelSpec], dict[str, Executor]], tmp_path: Path
) -> tuple[dict[str, str], str, Path]:
    """Submit every kind of task through a real node; what the monitor says once it counted them all."""
    port = free_port()
    json_path = tmp_path / "logs" / "monitor.jsonl"
    # A loose staleness bound: on a loaded CI box the in-process heartbeats can lag a second.
    settings = {
        "interval_s": 0.5,
        "heartbeat_s": 2.0,
        "metrics_port": port,
        "metrics_host": "127.0.0.1",
        "monitor_json": str(json_path),
    }

    async def scenario() -> tuple[dict[str, str], str]:
        async with running_stack(redis_url, prefix, *noop, worker={"heartbeat_s": 1.0}, monitor=settings) as stack:
            monitor = stack.monitor
            assert monitor is not None
            await asyncio.wait_for(monitor.ready.wait(), 10)
            ids = await submit_all(stack)
            ids.append(await give_up_on_one(stack))
            results = await stack.results(ids)
            assert Counter(r["status"] for r in results.values()) == {"ok": REALTIME + BATCH, "error": 7}
            await until(lambda: monitor.totals.tasks >= len(ids), what="the monitor to count every task")
            await next_report(monitor)
            raw: dict[Any, Any] = await stack.redis.hgetall(stack.keys.stats)
            text = await asyncio.to_thread(scrape, port)
            return {k.decode(): v.decode() for k, v in raw.items()}, text

    stats, text = asyncio.run(scenario())
    return stats, text, json_path


def check_stats(stats: dict[str, str], prefix: str) -> None:
    """The stats hash, for redis-cli users."""
    assert int(stats["tasks_total"]) == SUBMITTED
    assert int(stats["errors_total"]) == 7
    assert int(stats["classes.noop/realtime.tasks_total"]) == REALTIME
    assert int(stats["classes.noop/batch.tasks_total"]) == BATCH + 1  # the dead letter was a batch task
    assert int(stats["classes.none/none.tasks_total"]) == sum(REJECTED.values())
    assert int(stats["classes.noop/realtime.tokens_total"]) == 2 * REALTIME  # "word i": two words each
    assert int(stats["classes.noop/batch.tokens_total"]) == 3 * BATCH
    assert int(stats["dead_letters"]) == 1
    assert int(stats["workers_live"]) == 1
    assert int(stats[f"streams.{prefix}tasks.length"]) == 0
    workers = [k for k in stats if k.startswith("instances.worker/") and k.endswith(".state")]
    assert [stats[k] for k in workers] == ["live"]
    assert int(stats["devices.cpu.memory_total_bytes"]) > 0


def check_metrics(text: str, prefix: str) -> None:
    """/metrics, through prometheus-client's own parser."""
    found = samples(text)
    assert total(found["ectrans_tasks_total"]) == SUBMITTED
    assert total(found["ectrans_tasks_total"], status="ok") == REALTIME + BATCH
    assert total(found["ectrans_tasks_total"], model="noop", **{"class": "realtime"}) == REALTIME
    errors = {labels["reason"]: value for labels, value in found["ectrans_task_errors_total"]}
    assert errors == {**REJECTED, "dead_letter": 1}
    for histogram in ("latency", "queue", "service"):
        assert total(found[f"ectrans_task_{histogram}_seconds_count"]) == REALTIME + BATCH
    assert total(found["ectrans_batch_size_sum"]) == REALTIME + BATCH
    assert total(found["ectrans_tokens_total"]) == 2 * REALTIME + 3 * BATCH
    assert total(found["ectrans_workers_alive"]) == 1
    queues = {(labels["model"], labels["class"]) for labels, _ in found["ectrans_queue_length"]}
    assert queues >= {("", "ingress"), ("noop", "realtime"), ("noop", "batch")}
    assert found["ectrans_build_info"] == [({"version": __version__, "python": platform.python_version()}, 1.0)]
    memory = {(labels["service"], labels["kind"]) for labels, _ in found["ectrans_process_memory_bytes"]}
    assert {
        ("worker", "rss"),
        ("worker", "pss"),
        ("worker", "uss"),
        ("dispatcher", "uss"),
        ("monitor", "uss"),
    } <= memory
    assert total(found["ectrans_dead_letters"]) == 1
    missing = {name for name in METRICS if name not in found}
    assert not missing, f"the dashboard's metrics are not exported: {sorted(missing)}"


def test_figures_match_counted_truth(
    redis_url: str,
    prefix: str,
    noop: tuple[dict[str, ModelSpec], dict[str, Executor]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ectrans.services.monitor")
    stats, text, json_path = run_node(redis_url, prefix, noop, tmp_path)
    check_stats(stats, prefix)
    check_metrics(text, prefix)

    # JSON lines: one object per interval, the same figures as the hash.
    lines = [json.loads(line) for line in json_path.read_text().splitlines()]
    assert lines and all(set(line) >= {"ts", "classes", "streams", "instances", "devices"} for line in lines)
    same = [line for line in lines if str(line["ts"]) == stats["ts"]]
    assert len(same) == 1 and flatten(same[0]) == stats

    # The log: one line per interval, readable.
    report_lines = [r.getMessage() for r in caplog.records if r.name.endswith("monitor.service")]
    assert any(line.startswith("rt ") and "batch " in line and "workers 1/1" in line for line in report_lines), (
        report_lines
    )


def test_monitor_without_metrics_port_serves_nothing(redis_url: str, prefix: str) -> None:
    from ectrans.services.monitor.settings import MonitorSettings

    async def scenario() -> Monitor:
        monitor = Monitor(
            MonitorSettings(redis_url=redis_url, prefix=prefix, metrics_port=0, interval_s=0.3, heartbeat_s=0.1), []
        )
        task = asyncio.create_task(monitor.run())
        await until(lambda: monitor.last is not None, what="a report")
        monitor.stop()
        await asyncio.wait_for(task, 10)
        return monitor

    monitor = asyncio.run(scenario())
    assert monitor.metrics_port is None
    assert monitor.last is not None and [i.service for i in monitor.last.instances] == ["monitor"]


def gpu_present() -> bool:
    nvml = Nvml()
    try:
        return nvml.available and bool(nvml.devices())
    finally:
        nvml.close()


GPU = gpu_present()


@pytest.mark.cuda
@pytest.mark.skipif(not GPU, reason="needs an NVIDIA GPU and driver (NVML)")
def test_nvml_reads_the_gpus() -> None:
    nvml = Nvml()
    try:
        devices = nvml.devices()
    finally:
        nvml.close()
    assert devices and all(d.device.startswith("cuda:") for d in devices)
    for dev in devices:
        assert 0 < dev.used_bytes <= dev.total_bytes
        assert 0 <= dev.utilisation_pct <= 100


@pytest.mark.cuda
@pytest.mark.skipif(not GPU, reason="needs an NVIDIA GPU and driver (NVML)")
def test_gpu_figures_reach_the_report_and_metrics(redis_url: str, prefix: str) -> None:
    import torch

    from ectrans.services.monitor.settings import MonitorSettings

    held = torch.empty(64 * 1024 * 1024, dtype=torch.float32, device="cuda")  # 256 MiB in this process
    torch.cuda.synchronize()
    port = free_port()
    settings = MonitorSettings(
        redis_url=redis_url, prefix=prefix, metrics_port=port, metrics_host="127.0.0.1", interval_s=0.5, heartbeat_s=0.2
    )

    async def scenario() -> tuple[Monitor, str]:
        monitor = Monitor(settings, [])
        task = asyncio.create_task(monitor.run())
        await until(lambda: monitor.last is not None, what="a report")
        text = await asyncio.to_thread(scrape, port)
        monitor.stop()
        await asyncio.wait_for(task, 10)
        return monitor, text

    monitor, text = asyncio.run(scenario())
    assert monitor.last is not None
    gpus = [d for d in monitor.last.devices if d.device.startswith("cuda:")]
    assert gpus
    found = samples(text)
    assert {labels["device"] for labels, _ in found["ectrans_gpu_memory_used_bytes"]} == {d.device for d in gpus}
    assert all(value > 0 for _, value in found["ectrans_gpu_memory_total_bytes"])
    report = flatten(build_report(monitor.last, host_name()))
    assert int(report[f"devices.{gpus[0].device}.memory_used_bytes"]) > 0
    # NVML lists processes where the driver lets it, by the host's pids: inside a container (its own
    # pid namespace) none is ours, and only workers' allocator figures stand in (see gpu_by_pid).
    if any(d.processes for d in gpus) and nvml_pids_are_ours():
        by_service = {labels["service"]: value for labels, value in found["ectrans_process_gpu_memory_bytes"]}
        assert by_service.get("monitor", 0) >= held.numel() * 4
    del held
