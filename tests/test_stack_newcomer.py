"""A newcomer's first hour, in a fresh clone with nothing beside it: `ectrans up`, then `top` and
`submit` with no URL (they find the stack `up` started), a benchmark at its smallest size, and a
typo in a models file refused. Runs with this environment's Python (no second install), its
imports pointed into the clone."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def fresh_clone(tmp_path: Path) -> Path:
    if os.environ.get("ECTRANS_NEWCOMER_WALKED_AFTER"):
        pytest.skip("CI walks this after the suite, in a clone with its own install (.ci/newcomer)")
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout to clone")
    home = tmp_path / "alone"  # the clone has no ../shared or anything else beside it
    home.mkdir()
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(home / "ectrans")], check=True, timeout=120)
    return home / "ectrans"


def newcomer_env(clone: Path, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECTRANS_")}
    env.update(PYTHONPATH=str(clone), XDG_RUNTIME_DIR=str(tmp_path / "runtime"), HOME=str(tmp_path / "home"))
    return env


def ectrans(clone: Path, env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "ectrans.cli", *args]
    return subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def wait_for(log: Path, pattern: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, log.read_text()):
            return
        time.sleep(0.2)
    raise AssertionError(f"no line matching {pattern!r} within {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def test_first_hour_in_a_fresh_clone(tmp_path: Path) -> None:
    clone = fresh_clone(tmp_path)
    env = newcomer_env(clone, tmp_path)
    where = subprocess.run(
        [sys.executable, "-c", "import ectrans; print(ectrans.__file__)"], env=env, cwd=tmp_path,
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert where.stdout.strip().startswith(str(clone)), where.stdout

    # A typo in a models file is refused before anything starts, naming the file, model and key.
    typo = clone / "models.toml"
    typo.write_text('[models.mine]\nkind = "noop"\nbatch_max_bacth = 8\n')
    refused = ectrans(clone, env, "up", "--models-file", str(typo))
    assert refused.returncode == 2
    assert f"{typo}: model 'mine': unknown key 'batch_max_bacth' (did you mean 'batch_max_batch'?)" in refused.stderr

    log = tmp_path / "up.log"
    with log.open("w") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "ectrans.cli", "up"], cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_for(log, r"\[up\] ready in", 180)
        top = ectrans(clone, env, "top", "--once")
        assert top.returncode == 0, top.stdout + top.stderr
        port = re.search(r"-p (\d+) XADD", log.read_text())
        assert port is not None
        assert "minilm" in top.stdout and f":{port.group(1)}/" in top.stdout  # the stack `up` started
        submitted = ectrans(clone, env, "submit", "some text")
        assert submitted.returncode == 0, submitted.stderr
        result = json.loads(submitted.stdout)
        assert result["status"] == "ok" and len(result["output"]) == 384
        assert ectrans(clone, env, "health", "worker").returncode == 0
        second = ectrans(clone, env, "up")
        assert second.returncode == 2 and "already runs" in second.stderr
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
    assert "Traceback" not in log.read_text()
    assert not list((tmp_path / "runtime").glob("ectrans/up-*.json"))  # removed on a clean stop

    # The smallest benchmark: its files land under ./ectrans-bench, the repository's docs untouched.
    bench = ectrans(clone, {**env, "ECTRANS_BENCH_SIZE": "tiny"}, "bench", "durability", "--quick", timeout=240)
    assert bench.returncode == 0, bench.stderr[-3000:]
    assert json.loads(bench.stdout) == json.loads((clone / "ectrans-bench" / "durability.json").read_text())
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True, check=True)
    assert status.stdout.split() == ["??", "models.toml"]  # ectrans-bench/ is ignored; nothing tracked changed
