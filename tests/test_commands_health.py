"""`ectrans health <service>`, as the compose healthchecks run it: exit 0 when fresh, 1 otherwise."""

from __future__ import annotations

import asyncio
import time

import pytest

from ectrans import cli
from ectrans.common.heartbeat import Heartbeat
from ectrans.common.keys import Keys
from ectrans.common.redis_conn import connect
from ectrans.local.redis_server import free_port


@pytest.fixture(autouse=True)
def env(redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECTRANS_REDIS_URL", redis_url)
    monkeypatch.setenv("ECTRANS_PREFIX", prefix)


def beat(redis_url: str, prefix: str, service: str, instance: str, *, stop: bool = False) -> list[dict[bytes, bytes]]:
    """One real heartbeat from this process (and a clean stop if asked); returns the metrics entries."""

    async def go() -> list[dict[bytes, bytes]]:
        redis = connect(redis_url)
        try:
            heartbeat = Heartbeat(redis, Keys(prefix), service, instance, interval_s=0.5)
            await heartbeat.beat()
            if stop:
                await heartbeat.stopped()
            entries: list[tuple[bytes, dict[bytes, bytes]]] = await redis.xrange(Keys(prefix).metrics)  # type: ignore[assignment]
            return [fields for _, fields in entries]
        finally:
            await redis.aclose()

    return asyncio.run(go())


def health(*args: str) -> int:
    return cli.main(["health", *args])


def test_absent_service_is_unhealthy(capsys: pytest.CaptureFixture[str]) -> None:
    assert health("worker") == 1
    assert capsys.readouterr().out.strip() == "worker: unhealthy"


def test_fresh_heartbeat_is_healthy(redis_url: str, prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    beat(redis_url, prefix, "worker", "w-1")
    assert health("worker") == 0
    assert capsys.readouterr().out.strip() == "worker: healthy"
    assert health("worker", "--instance", "w-1") == 0
    assert health("worker", "--instance", "w-2") == 1
    assert health("dispatcher") == 1  # another service's heartbeat does not count


def test_stale_heartbeat_is_unhealthy(redis_url: str, prefix: str) -> None:
    beat(redis_url, prefix, "monitor", "m-1")
    time.sleep(0.4)
    assert health("monitor", "--max-age", "0.2") == 1
    assert health("monitor", "--max-age", "5") == 0


def test_clean_stop_is_unhealthy_and_announced(redis_url: str, prefix: str) -> None:
    entries = beat(redis_url, prefix, "dispatcher", "d-1", stop=True)
    assert health("dispatcher") == 1
    assert [e[b"kind"] for e in entries] == [b"stopped"]
    assert entries[0][b"service"] == b"dispatcher" and entries[0][b"instance"] == b"d-1"


def test_unreachable_redis_is_unhealthy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECTRANS_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert health("worker") == 1
