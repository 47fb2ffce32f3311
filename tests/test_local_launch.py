"""The one launcher of service processes (ectrans/local/launch.py): ready check, exit report, restart
policy and stop, on real service processes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import redis

from ectrans.local.launch import ServiceProcess, check_alive, restart_dead, stop_all, wait_ready


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="one of dispatcher, worker"):
        ServiceProcess("x", "scheduler", {}).command()


def test_a_service_that_exits_is_reported_with_its_log_and_restarted(tmp_path: Path) -> None:
    # A port that is not a number: the gateway refuses its settings and exits at once.
    env = {**os.environ, "ECTRANS_GATEWAY_PORT": "not-a-port"}
    gateway = ServiceProcess("gateway", "gateway", env, log=tmp_path / "gateway.log", cwd=tmp_path).start()
    with pytest.raises(RuntimeError, match=r"gateway exited with code [1-9]\d*; log tail") as exited:
        wait_ready([gateway], lambda: False, timeout_s=60)
    assert "not-a-port" in str(exited.value)  # the log's tail says why
    first_pid = gateway.pid
    said: list[str] = []
    restart_dead([gateway], said.append)
    assert said == [f"gateway exited with code {gateway.returncode}; restarting in 1s"]
    assert gateway.restarts == 0  # the pause comes first
    time.sleep(1.1)
    restart_dead([gateway], said.append)
    assert gateway.restarts == 1 and gateway.pid != first_pid
    stop_all([gateway], grace_s=10)
    assert not gateway.alive()


def test_stop_ends_a_running_service_with_sigterm(redis_url: str, prefix: str, tmp_path: Path) -> None:
    env = {**os.environ, "ECTRANS_REDIS_URL": redis_url, "ECTRANS_PREFIX": prefix, "ECTRANS_HEARTBEAT_S": "0.5"}
    dispatcher = ServiceProcess("d0", "dispatcher", env, log=tmp_path / "d0.log", cwd=tmp_path).start()
    with redis.Redis.from_url(redis_url) as client:
        wait_ready([dispatcher], lambda: bool(list(client.scan_iter(match=f"{prefix}hb:*"))), timeout_s=60)
    check_alive([dispatcher])
    said: list[str] = []
    stop_all([dispatcher], grace_s=20, say=said.append)
    assert dispatcher.returncode == 0 and said == []  # a clean stop, not a kill
