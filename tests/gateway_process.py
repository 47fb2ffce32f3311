"""The gateway as its own process (`python -m ectrans.services.gateway`), for tests that speak
real HTTP to it while the dispatcher and worker run in the test's process (tests/stack.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import httpx

from ectrans.common.redis_server import free_port

START_TIMEOUT_S = 60.0


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
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "ectrans.services.gateway"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(base, process, log)
            yield base
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_healthy(base: str, process: subprocess.Popen[bytes], log: IO[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited with code {process.returncode}: {_tail(log)}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the gateway did not answer /health in {START_TIMEOUT_S:.0f}s: {_tail(log)}")


def _tail(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-3000:]
