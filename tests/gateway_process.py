"""The gateway as its own process (`python -m ectrans.services.gateway`), for tests that speak
real HTTP to it while the dispatcher and worker run in the test's process (tests/stack.py)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from ectrans.local.launch import ServiceProcess, stop_all, wait_ready
from ectrans.local.redis_server import free_port

START_TIMEOUT_S = 60.0
STOP_GRACE_S = 20.0


@contextmanager
def gateway_process(redis_url: str, prefix: str, **settings: str) -> Iterator[str]:
    """Start a gateway and yield its base URL once `/health` answers; `settings` are ECTRANS_GATEWAY_*
    or other ECTRANS_* settings without the prefix (`MODELS_JSON='...'`)."""
    port = free_port()
    env = {
        **os.environ,
        "ECTRANS_REDIS_URL": redis_url,
        "ECTRANS_PREFIX": prefix,
        "ECTRANS_GATEWAY_HOST": "127.0.0.1",
        "ECTRANS_GATEWAY_PORT": str(port),
        "ECTRANS_HEARTBEAT_S": "0.5",
        **{f"ECTRANS_{key.upper()}": value for key, value in settings.items()},
    }
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="ectrans-gateway-") as log_dir:
        gateway = ServiceProcess("gateway", "gateway", env, log=Path(log_dir) / "gateway.log").start()
        try:
            wait_ready([gateway], lambda: _healthy(base), START_TIMEOUT_S, "the gateway")
            yield base
        finally:
            stop_all([gateway], STOP_GRACE_S)


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
