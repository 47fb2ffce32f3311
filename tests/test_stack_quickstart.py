"""The README's quickstart, as a newcomer runs it: `ectrans up`, plain redis-cli, Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ectrans.local.redis_server import find_redis_binary

pytestmark = pytest.mark.slow


def redis_cli(port: int, *args: str) -> str:
    out = subprocess.run(
        [find_redis_binary("redis-cli"), "-p", str(port), *args], capture_output=True, text=True, timeout=10, check=True
    )
    return out.stdout.strip()


def wait_for_line(log: Path, pattern: str, timeout: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text())
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no line matching {pattern!r} within {timeout}s:\n{log.read_text()}")


def test_up_then_redis_cli_then_ctrl_c(tmp_path: Path) -> None:
    log = tmp_path / "up.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECTRANS_")}
    with log.open("w") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "ectrans.cli", "up"], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path
        )
    try:
        port = int(wait_for_line(log, r"-p (\d+) XADD", 30).group(1))
        wait_for_line(log, r"\[up\] ready in", 120)

        # Exactly the README's commands.
        entry_id = redis_cli(port, "XADD", "ectrans:tasks", "*", "model", "minilm", "op", "embed", "input", "some text")
        deadline = time.monotonic() + 30
        status = ""
        while time.monotonic() < deadline and not status:
            status = redis_cli(port, "HGET", f"ectrans:result:{entry_id}", "status")
            time.sleep(0.05)
        assert status == "ok"
        fields = redis_cli(port, "HMGET", f"ectrans:result:{entry_id}", "class", "latency_ms", "output").splitlines()
        assert fields[0] in ("realtime", "batch") and float(fields[1]) >= 0
        assert len(json.loads(fields[2])) == 384

        cli_env = {**env, "ECTRANS_REDIS_URL": f"redis://127.0.0.1:{port}/0"}
        submit = [sys.executable, "-m", "ectrans.cli", "submit", "hello from the CLI"]
        submitted = subprocess.run(submit, capture_output=True, text=True, timeout=60, env=cli_env, check=False)
        assert submitted.returncode == 0, submitted.stderr
        assert json.loads(submitted.stdout)["status"] == "ok"

        # The HTTP gateway `up` started, at the address it printed.
        base = wait_for_line(log, r"curl (http://\S+)/v1/embeddings", 1).group(1)
        answer = httpx.post(f"{base}/v1/embeddings", json={"model": "minilm", "input": "some text"}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["data"][0]["embedding"]) == 384
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(timeout=60)
    assert code == 0
    text = log.read_text()
    assert "Traceback" not in text, text
    for service in ("dispatcher", "worker"):
        assert f"[shutdown] {service}" in text
