"""A real worker process, killed, restarted and stopped, as the monitor reports it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from ectrans.services.monitor.instances import GONE, LIVE, STALE, STOPPED
from ectrans.services.monitor.report import Snapshot
from ectrans.services.monitor.service import Monitor
from ectrans.services.monitor.settings import MonitorSettings

INTERVAL_S = 1.5
HEARTBEAT_S = 0.5  # stale after two missed beats: 1 s, under one interval
START_TIMEOUT_S = 90.0  # a worker imports torch first; slow on a busy 2-core machine


# `python -m ectrans.services.worker`, with its imports done before a line on stdin lets it start:
# the replacement worker is warm when the test needs it.
WARM_WORKER = (
    "import sys, ectrans.models.loader, ectrans.services.worker.__main__ as worker; "
    "sys.stdin.readline(); sys.exit(worker.main())"
)


def spawn_worker(redis_url: str, prefix: str, instance: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "ECTRANS_REDIS_URL": redis_url,
        "ECTRANS_PREFIX": prefix,
        "ECTRANS_MODELS_JSON": json.dumps({"noop": {"kind": "noop"}}),
        "ECTRANS_SERVE_MODELS": "noop",
        "ECTRANS_INSTANCE": instance,
        "ECTRANS_HEARTBEAT_S": str(HEARTBEAT_S),
        "ECTRANS_LOG_LEVEL": "WARNING",
    }
    return subprocess.Popen([sys.executable, "-c", WARM_WORKER], env=env, stdin=subprocess.PIPE)


def start(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(b"go\n")
    proc.stdin.close()


class Recorder:
    """Every snapshot the monitor publishes, in order."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.snapshots: list[Snapshot] = []

    async def run(self) -> None:
        while True:
            last = self.monitor.last
            if last is not None and (not self.snapshots or self.snapshots[-1] is not last):
                self.snapshots.append(last)
            await asyncio.sleep(0.02)

    async def first(self, pred: object, *, after: float = 0.0, timeout: float = START_TIMEOUT_S) -> Snapshot:
        """The first snapshot taken at or after `after` (wall clock) for which `pred` holds."""
        assert callable(pred)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for snap in self.snapshots:
                if snap.at >= after and pred(snap):
                    return snap
            await asyncio.sleep(0.05)
        raise TimeoutError("no such snapshot")


def state(snap: Snapshot, instance: str) -> str | None:
    found = [i.state for i in snap.instances if i.service == "worker" and i.instance == instance]
    return found[0] if found else None


def restarts(snap: Snapshot, instance: str) -> int:
    return next(i.restarts for i in snap.instances if i.service == "worker" and i.instance == instance)


def about(snap: Snapshot, instance: str) -> list[str]:
    return [w for w in snap.warnings if f"worker {instance} " in w]


def test_killed_worker_is_stale_within_one_interval_then_gone_restarted_and_stopped(
    redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ectrans.services.monitor")
    settings = MonitorSettings(
        redis_url=redis_url, prefix=prefix, interval_s=INTERVAL_S, heartbeat_s=HEARTBEAT_S, metrics_port=0
    )
    first = spawn_worker(redis_url, prefix, "victim")
    second = spawn_worker(redis_url, prefix, "victim")  # the restart under the same name, as compose does
    start(first)

    async def scenario() -> None:
        monitor = Monitor(settings, ["noop"])
        recorder = Recorder(monitor)
        tasks = [asyncio.create_task(monitor.run()), asyncio.create_task(recorder.run())]
        try:
            await recorder.first(lambda s: state(s, "victim") == LIVE)

            first.send_signal(signal.SIGKILL)
            killed_at = time.time()

            # Any report made one interval or more after the death shows it, and one by then warned of
            # it (a stale instance each interval; a gone one once, when it goes).
            snap = await recorder.first(lambda s: True, after=killed_at + INTERVAL_S, timeout=4 * INTERVAL_S)
            assert state(snap, "victim") in (STALE, GONE)
            since = [w for s in recorder.snapshots if killed_at <= s.at <= snap.at for w in about(s, "victim")]
            assert any("is stale" in w or "is gone" in w for w in since), since

            # Its key expires (TTL 3 beats) without a clean stop: gone, not forgotten.
            snap = await recorder.first(lambda s: state(s, "victim") == GONE, after=killed_at, timeout=5 * INTERVAL_S)
            assert any("is gone" in w and "no clean stop" in w for w in about(snap, "victim"))

            # A new process heartbeats under the old name: a restart.
            start(second)
            snap = await recorder.first(lambda s: state(s, "victim") == LIVE, after=killed_at)
            assert restarts(snap, "victim") == 1
            assert any("restarted" in w for w in about(snap, "victim"))

            # A clean stop is not a death: no warning.
            second.send_signal(signal.SIGTERM)
            await asyncio.to_thread(second.wait, 30)
            stopped_at = time.time()
            snap = await recorder.first(lambda s: True, after=stopped_at + INTERVAL_S, timeout=4 * INTERVAL_S)
            assert state(snap, "victim") == STOPPED
            assert about(snap, "victim") == []
        finally:
            monitor.stop()
            await asyncio.wait_for(tasks[0], 10)
            tasks[1].cancel()

    try:
        asyncio.run(scenario())
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdin is not None:  # a restart never started: its pipe, closed here, not by a later GC
                proc.stdin.close()
    logged = [r.getMessage() for r in caplog.records]
    assert any("[health] worker victim is stale" in line or "[health] worker victim is gone" in line for line in logged)
