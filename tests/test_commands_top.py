"""`ectrans top` renders a frame of a real node (real Redis, dispatcher, worker, monitor)."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from ectrans import cli
from ectrans.common.registry import ModelSpec, build_spec
from ectrans.models.noop import NoopExecutor
from tests.stack import running_stack

WIDTH = 100


@pytest.fixture
def top_env(redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECTRANS_REDIS_URL", redis_url)
    monkeypatch.setenv("ECTRANS_PREFIX", prefix)
    monkeypatch.setenv("COLUMNS", str(WIDTH))  # rich's width when stdout is not a terminal


def test_top_once_renders_the_node(
    top_env: None, redis_url: str, prefix: str, registry: dict[str, ModelSpec], capsys: pytest.CaptureFixture[str]
) -> None:
    noop = build_spec("noop", {"kind": "noop"})
    executor = NoopExecutor(noop)

    async def scenario() -> int:
        monitor = {"interval_s": 0.5, "metrics_port": 0}
        async with running_stack(
            redis_url, prefix, {**registry, "noop": noop}, {"noop": executor}, monitor=monitor
        ) as stack:
            assert stack.monitor is not None
            await asyncio.wait_for(stack.monitor.ready.wait(), 10)
            ids = [await stack.xadd(model="noop", op="noop", input="two words", priority="realtime") for _ in range(12)]
            ids += [await stack.xadd(model="nope", op="noop", input="x") for _ in range(2)]
            await stack.results(ids)
            deadline = time.monotonic() + 20
            while stack.monitor.last is None or stack.monitor.last.totals.tasks < len(ids):
                assert time.monotonic() < deadline, "the monitor did not count the tasks"
                await asyncio.sleep(0.05)
            return await asyncio.to_thread(cli.main, ["top", "--once"])

    assert asyncio.run(scenario()) == 0
    frame = capsys.readouterr().out
    print(frame)  # shown with `pytest -s`: the frame docs/monitoring.md quotes
    lines = frame.splitlines()
    assert max(len(line) for line in lines) <= WIDTH
    assert "\x1b[" not in frame, "no colour codes when stdout is not a terminal"
    assert re.search(r"^tasks 14\b.*errors 2\b", frame, re.MULTILINE), frame
    row = next(line for line in lines if "noop/realtime" in line)
    assert row.split()[-1] == "12"  # the total column
    assert any(f"{prefix}tasks" in line for line in lines)
    assert any("worker" in line and "live" in line for line in lines)
    assert re.search(r"^cpu\s+host\s+\d+M / [\d.]+G", frame, re.MULTILINE), frame


def test_top_once_without_a_monitor_says_so(top_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["top", "--once"]) == 0
    assert "no stats yet: is the monitor running?" in capsys.readouterr().out


def test_top_without_redis_fails(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from ectrans.local.redis_server import free_port

    monkeypatch.setenv("ECTRANS_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert cli.main(["top", "--once"]) == 1
    assert "cannot read redis://127.0.0.1:" in capsys.readouterr().out
