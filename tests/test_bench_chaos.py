"""Faults under a steady load, with real processes and a real Redis: every task gets exactly one
terminal record, none is lost. The scenarios are those of `ectrans bench chaos` (quick size); each
test prints the counts per fault (run with `-s` to see them as they come)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from ectrans.bench import chaos
from ectrans.common.registry import ModelSpec, build_spec
from ectrans.local.redis_server import RedisServer
from ectrans.models.noop import NoopExecutor
from tests.stack import running_stack

NOOP: ModelSpec = build_spec("noop", {"kind": "noop"})


def check_counts(faults: dict[str, dict[str, Any]], logs: Path) -> None:
    """The bar for every fault: all submitted tasks answered ok, once, and no service crashed."""
    print()
    for name, counts in faults.items():
        print(f"{name:36s} " + json.dumps({k: counts[k] for k in ("submitted", "ok", "error", "duplicates", "lost")}))
    for name, counts in faults.items():
        where = f"{name}: {counts} (logs in {logs})"
        assert counts["submitted"] > 0, where
        assert counts["duplicates"] == 0 and counts["lost"] == 0, where
        assert counts["error"] == 0 and counts["ok"] == counts["submitted"], where
        assert counts["records_without_reply"] == 0 and counts["crashed"] == [], where


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_faults_under_load_on_the_noop_model(tmp_path: Path) -> None:
    """Process faults, a graceful Redis restart and a Redis SIGKILL under `appendfsync always`: the
    faults through which Redis keeps every write it acknowledged (the everysec SIGKILL is the bench's)."""
    faults = asyncio.run(chaos.noop_faults(tmp_path, quick=True, redis_faults="durable"))
    assert "redis_sigkill_aof_always" in faults and "redis_sigkill_aof_everysec" not in faults
    check_counts(faults, tmp_path)
    assert faults["worker_sigkill"]["abandoned"] > 0, "the killed worker held tasks for its peers to take over"
    sigterm = faults["worker_sigterm"]
    assert sigterm["exit_code"] == 0, sigterm
    assert sigterm["handed_back"] > 0, "queued tasks went back to the group at once"
    assert faults["monitor_stop"]["exit_code"] == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_faults_on_a_3_master_cluster(tmp_path: Path) -> None:
    """The process faults again, on a local 3-master Redis Cluster (AOF on each node), and a SIGKILL
    of the master that serves the ingress stream under `appendfsync always`. (Under everysec Redis
    may drop writes it acknowledged; `ectrans bench chaos` with `ECTRANS_BENCH_REDIS=cluster` runs
    that one and reports it.)"""
    faults = asyncio.run(chaos.noop_faults(tmp_path, quick=True, topology=chaos.CLUSTER, redis_faults="durable"))
    expected = ["worker_sigkill", "worker_sigterm", "dispatcher_sigkill", "cluster_master_sigkill_aof_always"]
    assert sorted(faults) == sorted([*expected, "monitor_stop"])
    check_counts(faults, tmp_path)
    assert faults["worker_sigkill"]["abandoned"] > 0, "the killed worker held tasks for its peers to take over"
    sigterm = faults["worker_sigterm"]
    assert sigterm["exit_code"] == 0, sigterm
    assert sigterm["handed_back"] > 0, "queued tasks went back to the group at once"
    assert faults["monitor_stop"]["exit_code"] == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_minilm_worker_killed_mid_batch_and_terminated_in_flight(tmp_path: Path) -> None:
    faults = asyncio.run(chaos.minilm_faults(tmp_path, quick=True))
    check_counts(faults, tmp_path)
    assert faults["minilm_worker_sigkill_mid_batch"]["abandoned"] > 0
    sigterm = faults["minilm_worker_sigterm_in_flight"]
    assert sigterm["exit_code"] == 0, sigterm
    assert sigterm["in_flight_batches"] + sigterm["handed_back"] > 0, "it held work when told to stop"


def test_services_rejoin_after_a_redis_restart_without_persistence(tmp_path: Path, prefix: str) -> None:
    """Without persistence a restarted Redis is empty: the consumer groups are gone (NOGROUP), and
    the services create them again and carry on with new tasks."""
    server = RedisServer(appendonly=False, data_dir=tmp_path).start()

    async def scenario() -> tuple[dict[str, str], dict[str, dict[str, str]]]:
        async with running_stack(server.url, prefix, {"noop": NOOP}, {"noop": NoopExecutor(NOOP)}) as stack:
            first = await stack.xadd(model="noop", op="noop", input="before")
            before = await stack.result(first)
            await asyncio.to_thread(server.stop)
            await asyncio.to_thread(server.start)
            assert await stack.redis.exists(stack.keys.result(first)) == 0, "the restarted Redis is empty"
            started = time.monotonic()
            ids: list[str] = []
            while time.monotonic() - started < 20 and len(ids) < 20:  # submit as soon as Redis answers
                ids.append(await stack.xadd(model="noop", op="noop", input=f"after {len(ids)}"))
            return before, await stack.results(ids, timeout=30)

    try:
        before, after = asyncio.run(scenario())
    finally:
        server.cleanup()
    assert before["status"] == "ok"
    assert [r["status"] for r in after.values()] == ["ok"] * 20


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bench_durability_tiny_prints_its_json(tmp_path: Path) -> None:
    """`ectrans bench durability` at the tiny size: under `appendfsync always` a Redis SIGKILL keeps
    every write it acknowledged, on this disk and on the slow one (what everysec loses is a figure,
    not an assertion: it depends on where the kill lands)."""
    from tests.test_bench_smoke import run_tiny_bench

    result = run_tiny_bench("durability", tmp_path, timeout_s=100)
    assert result["scenario"] == "durability"
    lost = result["lost_acknowledged_writes"]
    assert sorted(lost) == ["always", "everysec"]
    assert result["always_lost_nothing"] is True and all(n == 0 for n in lost["always"].values())
    for by_disk in result["runs"].values():
        for runs in by_disk.values():
            assert all(r["acknowledged"] > 0 and r["kept"] <= r["acknowledged"] for r in runs)
