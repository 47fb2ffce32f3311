"""Starting executor processes: forked from a preloaded zygote, or as fresh interpreters.

A process that has imported torch and transformers holds about 230 MiB of private memory (heap
and anonymous pages: Python objects, operator tables) before it loads a single weight. A zygote
imports all of that once (and builds the served model on `meta`, which imports its modeling
code), freezes its objects out of the garbage collector, and forks each executor: the children
share those pages copy-on-write, so each costs a few tens of MiB instead. The zygote never
touches CUDA (a CUDA context does not survive fork); children initialise it themselves.

Both spawners give a `ChildProcess`: its pid, the write end of its command pipe, the read end
of its report pipe, its exit status and a kill switch. Frames on the zygote's control socket are
msgpack; the pipes' descriptors travel as SCM_RIGHTS.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, Protocol

from ectrans.sharing.ipc import ChannelClosed, decode, recv_frame, send_frame

logger = logging.getLogger(__name__)

SPAWN_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class SpawnError(RuntimeError):
    """A child process could not be started."""


class ChildProcess(Protocol):
    pid: int
    command_fd: int  # write frames here
    report_fd: int  # read frames here

    def wait(self, timeout: float) -> int | None:
        """Its exit code (negative: killed by that signal), or None if not known in time."""
        ...

    def kill(self) -> None: ...

    def close(self) -> None:
        """Close this side's pipe ends."""
        ...


class Spawner(Protocol):
    pid: int | None  # the zygote's, if any

    def spawn(self, args: dict[str, Any]) -> ChildProcess: ...

    def stop(self) -> None: ...


# 1. Fresh interpreters ------------------------------------------------------------------------------------


class ExecChild:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self._proc = proc
        self.pid = proc.pid
        self.command_fd = proc.stdin.fileno()
        self.report_fd = proc.stdout.fileno()

    def wait(self, timeout: float) -> int | None:
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()

    def close(self) -> None:
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream is not None:
                stream.close()


class ExecSpawner:
    """Each executor a new `python -m ectrans.sharing.executor_process` (the prototype's way)."""

    pid: int | None = None

    def spawn(self, args: dict[str, Any]) -> ChildProcess:
        command = [sys.executable, "-m", "ectrans.sharing.executor_process", f"--args={json.dumps(args)}"]
        return ExecChild(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE))

    def stop(self) -> None:
        pass


# 2. The zygote, supervisor side -----------------------------------------------------------------------------


class ForkedChild:
    def __init__(self, zygote: Zygote, pid: int, command_fd: int, report_fd: int) -> None:
        self._zygote = zygote
        self.pid = pid
        self.command_fd = command_fd
        self.report_fd = report_fd

    def wait(self, timeout: float) -> int | None:
        return self._zygote.exit_code(self.pid, timeout)

    def kill(self) -> None:
        if self._zygote.exit_code(self.pid, 0) is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def close(self) -> None:
        for fd in (self.command_fd, self.report_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


class Zygote:
    """A preloaded process that forks executors on request. `on_exit(zygote)` runs (from its
    reader thread) if it goes away; children it already forked live on."""

    def __init__(
        self,
        preload: dict[str, Any] | None = None,
        *,
        on_exit: Callable[[Zygote], None] | None = None,
        log_level: str = "INFO",
    ) -> None:
        self.on_exit = on_exit
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        command = [
            sys.executable,
            "-m",
            "ectrans.sharing.zygote",
            f"--control-fd={theirs.fileno()}",
            f"--preload={json.dumps(preload)}",
            f"--log-level={log_level}",
        ]
        # torch.cuda.is_available() from NVML, not the CUDA driver: a driver initialised before
        # fork is not usable in the children.
        env = os.environ | {"PYTORCH_NVML_BASED_CUDA_CHECK": "1"}
        # stdout goes to stderr: a library's stray print must not land in the worker's stdout.
        self._proc = subprocess.Popen(command, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=2, env=env)
        theirs.close()
        self.pid: int | None = self._proc.pid
        self.error: str | None = None
        self._ready = threading.Event()
        self._gone = threading.Event()
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._spawned: dict[int, int | str] = {}  # tag → pid, or the reason it failed
        self._exits: dict[int, int] = {}
        self._tags = itertools.count()
        self._reader = threading.Thread(target=self._read, name="ectrans-zygote", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            while (frame := recv_frame(self._sock, max_fds=0)) is not None:
                message = decode(frame[0])
                with self._cond:
                    event = message.get("ev")
                    if event == "ready":
                        self._ready.set()
                    elif event == "spawned":
                        self._spawned[int(message["tag"])] = message.get("pid") or str(message.get("error"))
                    elif event == "exited":
                        self._exits[int(message["pid"])] = int(message["code"])
                    self._cond.notify_all()
        except (ChannelClosed, OSError, ValueError) as exc:
            self.error = f"zygote channel broke: {exc}"
        code = self._proc.wait()
        self.error = self.error or f"zygote exited with code {code}"
        with self._cond:
            self._gone.set()
            self._cond.notify_all()
        self._ready.set()
        if self.on_exit is not None:
            self.on_exit(self)

    @property
    def alive(self) -> bool:
        return not self._gone.is_set()

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.alive

    def wait_ready(self, timeout: float) -> None:
        if not self._ready.wait(timeout):
            raise SpawnError(f"the zygote was not ready after {timeout:.0f}s")
        if not self.alive:
            raise SpawnError(self.error or "the zygote exited")

    def spawn(self, args: dict[str, Any]) -> ChildProcess:
        from ectrans.common.codec import packb

        self.wait_ready(SPAWN_TIMEOUT_S)
        command_read, command_write = os.pipe()
        report_read, report_write = os.pipe()
        tag = next(self._tags)
        try:
            with self._send_lock:
                send_frame(self._sock, packb({"op": "spawn", "tag": tag, "args": args}), [command_read, report_write])
        except OSError as exc:
            for fd in (command_read, command_write, report_read, report_write):
                os.close(fd)
            raise SpawnError(f"cannot reach the zygote: {exc}") from exc
        os.close(command_read)
        os.close(report_write)
        with self._cond:
            done = self._cond.wait_for(lambda: tag in self._spawned or self._gone.is_set(), SPAWN_TIMEOUT_S)
            outcome = self._spawned.pop(tag, None)
        if not done or not isinstance(outcome, int):
            os.close(command_write)
            os.close(report_read)
            raise SpawnError(f"the zygote did not fork an executor: {outcome or self.error or 'timed out'}")
        return ForkedChild(self, outcome, command_write, report_read)

    def exit_code(self, pid: int, timeout: float) -> int | None:
        with self._cond:
            self._cond.wait_for(lambda: pid in self._exits or self._gone.is_set(), timeout)
            return self._exits.get(pid)

    def stop(self) -> None:
        """Close the control socket (the zygote exits on end of stream); its children live on."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        try:
            self._proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(STOP_TIMEOUT_S)


# 3. The zygote process --------------------------------------------------------------------------------------


def preload(spec_wire: dict[str, Any] | None) -> None:
    """Import everything an executor needs (and the served model's modeling code) before forking."""
    import transformers

    _ = transformers.AutoTokenizer, transformers.PreTrainedTokenizerFast  # resolve lazy imports
    if spec_wire is not None:
        from ectrans.sharing.attach import build_on_meta
        from ectrans.sharing.manifest import spec_from_wire

        spec = spec_from_wire(spec_wire)
        model = build_on_meta(spec)
        del model
    check_fork_safe()
    gc.collect()
    gc.freeze()  # the children share these objects; keep the collector from writing to their pages


def check_fork_safe(maps: str | None = None) -> None:
    """Refuse to fork executors from a process that has touched the CUDA driver: torch's own lazy
    init, or any runtime call (`torch.cuda.device_count()` among them) that loaded libcuda."""
    import torch

    from ectrans.sharing.cuda_env import cuda_driver_loaded

    if torch.cuda.is_initialized() or cuda_driver_loaded(maps):  # type: ignore[no-untyped-call]
        raise SpawnError("the CUDA driver was initialised while preloading; forked executors could not use it")


def _fork_child(args: dict[str, Any], fds: list[int], close: list[int]) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        for fd in close:
            os.close(fd)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        from ectrans.sharing.executor_process import serve

        code = serve(args, fds[0], fds[1])
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _reap() -> list[tuple[int, int]]:
    exited: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return exited
        if pid == 0:
            return exited
        exited.append((pid, os.waitstatus_to_exitcode(status)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ectrans.sharing.zygote")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--preload", default="null", help="the served model's registry entry, as JSON")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(asctime)s worker.zygote %(message)s")
    from ectrans.common.codec import packb

    control = socket.socket(fileno=args.control_fd)
    preload(json.loads(args.preload))
    if threading.active_count() != 1:
        logger.warning("[zygote] %d threads alive before forking: %s", threading.active_count(), threading.enumerate())
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # the wakeup descriptor does the work
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ, "control")
    selector.register(wake_read, selectors.EVENT_READ, "child")
    send_frame(control, packb({"ev": "ready", "pid": os.getpid()}))
    while True:
        for key, _ in selector.select():
            if key.data == "child":
                os.read(wake_read, 4096)
                for pid, code in _reap():
                    send_frame(control, packb({"ev": "exited", "pid": pid, "code": code}))
                continue
            frame = recv_frame(control, max_fds=2)
            if frame is None:
                return 0  # the supervisor is gone; executors notice on their own pipes
            message, fds = decode(frame[0]), frame[1]
            tag = message.get("tag")
            try:
                if message.get("op") != "spawn" or len(fds) != 2:
                    raise SpawnError(f"bad spawn request {message.get('op')!r} with {len(fds)} descriptors")
                pid = _fork_child(message["args"], fds, [control.fileno(), wake_read, wake_write, selector.fileno()])
                reply: dict[str, Any] = {"ev": "spawned", "tag": tag, "pid": pid}
            except Exception as exc:
                reply = {"ev": "spawned", "tag": tag, "pid": None, "error": f"{type(exc).__name__}: {exc}"}
            finally:
                for fd in fds:
                    os.close(fd)
            send_frame(control, packb(reply))


if __name__ == "__main__":
    sys.exit(main())
