"""Service processes on this machine, started, watched and stopped one way for `ectrans up`, every
benchmark and the tests: `python -m ectrans.services.<kind>` with its environment and log, a ready
check, a restart policy, SIGTERM then SIGKILL after a grace, and a kill for fault injection.

The services themselves never import this module: it is how a local stack is run, not part of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from signal import SIGKILL, SIGTERM, Signals

KINDS = ("dispatcher", "worker", "monitor", "gateway")
POLL_S = 0.1
LOG_TAIL_CHARS = 2000
# `up` restarts a service that died; one that ran this long before dying restarts at once.
STABLE_RUN_S = 60.0
MAX_RESTART_PAUSE_S = 30.0


def service_module(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"service {kind!r}: one of {', '.join(KINDS)}")
    return f"ectrans.services.{kind}"


@dataclass
class ServiceProcess:
    """One service process, restartable under the same name and environment.

    `log`: a file that receives stdout and stderr (appended to across restarts), or None to share
    this process's terminal. `group`: None starts the process in its own session (a terminal's Ctrl-C
    reaches only its launcher, which stops it in order); 0 makes it lead a new process group in this
    session; a pid joins that group, so one `kill_group` reaches all of them. `tied`: the process gets
    SIGTERM when this one dies, even by SIGKILL (see `ectrans.bench.tied`).
    """

    name: str
    kind: str
    env: dict[str, str]
    log: Path | None = None
    cwd: Path | None = None
    group: int | None = None
    tied: bool = False
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)

    def command(self) -> list[str]:
        module = service_module(self.kind)
        if self.tied:
            return [sys.executable, "-m", "ectrans.bench.tied", str(os.getpid()), module]
        return [sys.executable, "-m", module]

    def start(self) -> ServiceProcess:
        with open(self.log, "ab") if self.log is not None else _terminal() as log:
            self.process = subprocess.Popen(
                self.command(),
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT if log is not None else None,
                stdin=subprocess.DEVNULL if log is not None else None,
                start_new_session=self.group is None,
                process_group=self.group,
            )
        self.started_at = time.monotonic()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was never started"
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: Signals) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(sig)

    def wait(self, timeout_s: float) -> int | None:
        """The exit code, or None if it still runs after `timeout_s`."""
        assert self.process is not None
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def kill(self, timeout_s: float = 10.0) -> None:
        """SIGKILL and reap: no handler runs, nothing is handed back (a crash, for fault injection)."""
        self.signal(SIGKILL)
        if self.process is not None:
            self.wait(timeout_s)

    def signal_group(self, sig: Signals) -> None:
        """`sig` to this process's whole group (see `group`)."""
        os.killpg(self.pid, sig)

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        if self.log is None:
            return ""
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def exit_message(self) -> str:
        message = f"{self.name} exited with code {self.returncode}"
        if tail := self.log_tail():
            message += f"; log tail ({self.log}):\n{tail}"
        return message


@contextlib.contextmanager
def _terminal() -> Iterator[None]:
    """No log file: the process writes to this process's stdout and stderr."""
    yield None


def check_alive(services: Iterable[ServiceProcess]) -> None:
    """RuntimeError naming the first service that exited, with the tail of its log."""
    for service in services:
        if service.process is not None and not service.alive():
            raise RuntimeError(service.exit_message())


def wait_ready(
    services: Iterable[ServiceProcess], ready: Callable[[], bool], timeout_s: float, what: str = "the stack"
) -> None:
    """Poll `ready` until it holds; RuntimeError if a service exits first or `timeout_s` passes."""
    watched = list(services)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        check_alive(watched)
        if ready():
            return
        time.sleep(POLL_S)
    raise RuntimeError(f"{what} was not ready after {timeout_s:.0f}s{_logs_hint(watched)}")


async def wait_ready_async(
    services: Iterable[ServiceProcess], ready: Callable[[], Awaitable[bool]], timeout_s: float, what: str = "the stack"
) -> None:
    """`wait_ready` for callers on an event loop (the check is a Redis coroutine)."""
    watched = list(services)
    deadline = time.monotonic() + timeout_s
    while True:
        check_alive(watched)
        if await ready():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} was not ready after {timeout_s:.0f}s{_logs_hint(watched)}")
        await asyncio.sleep(POLL_S)


def _logs_hint(services: list[ServiceProcess]) -> str:
    folders = sorted({str(s.log.parent) for s in services if s.log is not None})
    return f"; logs in {', '.join(folders)}" if folders else ""


def restart_dead(services: Iterable[ServiceProcess], say: Callable[[str], None]) -> None:
    """Restart a service that died, after a pause that grows while it keeps crashing soon after its
    start (so a crash loop does not spin); `say` tells the operator. Call it every few tenths of a second."""
    now = time.monotonic()
    for service in services:
        if service.alive() or now < service.next_start:
            continue
        if service.process is not None and service.next_start == 0.0:
            soon = now - service.started_at < STABLE_RUN_S
            pause = min(MAX_RESTART_PAUSE_S, 2.0 ** min(service.restarts, 5)) if soon else 1.0
            say(f"{service.name} exited with code {service.returncode}; restarting in {pause:.0f}s")
            service.next_start = now + pause
            continue
        service.restarts += 1
        service.next_start = 0.0
        service.start()


def stop_all(services: Iterable[ServiceProcess], grace_s: float, say: Callable[[str], None] | None = None) -> None:
    """SIGTERM every service at once (each drains in parallel), then SIGKILL what still runs after
    `grace_s`; `say` (if given) names each service killed."""
    started = [s for s in services if s.process is not None]
    for service in started:
        service.signal(SIGTERM)
    deadline = time.monotonic() + grace_s
    for service in started:
        if service.wait(max(0.1, deadline - time.monotonic())) is None:
            if say is not None:
                say(f"{service.name} did not stop in {grace_s:.0f}s; killing it")
            service.kill(timeout_s=30.0)
