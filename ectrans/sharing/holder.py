"""The weight holder: one process per (device, model) that loads the weights once and exports them.

Process side (`python -m ectrans.sharing.holder`): load the model in its serving dtype, export it
(`export.export_cpu` / `export.export_cuda`), report ready on stdout, then answer executors'
attach requests (`weight_server`). On CPU the process then replaces itself (exec, same pid) with
the torch-free server: the weights live in the sealed memfd, not in the holder's heap. On CUDA
the holder keeps the model (the IPC handles point into its allocations) and its CUDA context.
It exits when its supervisor's pipe (stdin) closes.

Supervisor side (`HolderProcess`): starts the process, reads its ready report, and tells its
owner when it exits, so the owner can restart it and have executors reattach.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ectrans.common.registry import ModelSpec
from ectrans.sharing.cuda_env import without_expandable_segments
from ectrans.sharing.ipc import ChannelClosed, decode, private_stdout, read_frame, write_frame
from ectrans.sharing.manifest import spec_from_wire, spec_to_wire

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0


def describe_exit(code: int | None) -> str:
    if code is None:
        return "an unknown status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


# 1. The holder process ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ectrans.sharing.holder")
    parser.add_argument("--spec", required=True, help="the registry entry, as JSON")
    parser.add_argument("--device", required=True)
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", default="text")
    args = parser.parse_args(argv)
    report_fd = private_stdout()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when the holder stops

    from ectrans.common.logs import setup_logging

    setup_logging(args.log_level, args.log_format, "worker.holder")
    spec = spec_from_wire(json.loads(args.spec))
    try:
        return _hold(spec, args, report_fd)
    except Exception as exc:
        logger.exception("[weights] holder for %s failed", spec.name)
        _report(report_fd, {"ev": "error", "message": f"{type(exc).__name__}: {exc}"})
        return 1


def _report(fd: int, message: dict[str, Any]) -> None:
    from ectrans.common.codec import packb

    write_frame(fd, packb(message))


def _hold(spec: ModelSpec, args: argparse.Namespace, report_fd: int) -> int:
    import torch

    from ectrans.common.codec import packb
    from ectrans.models.device import resolve_device
    from ectrans.models.loader import load_model
    from ectrans.sharing.cuda_env import ipc_allocator_problem
    from ectrans.sharing.export import export_cpu, export_cuda, summary
    from ectrans.sharing.weight_server import bind, serve

    device = resolve_device(args.device)
    if device.type == "cuda" and (problem := ipc_allocator_problem()):
        raise HolderError(problem)
    started = time.perf_counter()
    model = load_model(spec, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    load_s = time.perf_counter() - started
    info: dict[str, Any] = {"model": spec.name, "device": str(device), "dtype": spec.dtype, "load_s": round(load_s, 3)}
    if device.type == "cpu":
        started = time.perf_counter()
        manifest, weights_fd = export_cpu(model, spec)
        info |= {"export_s": round(time.perf_counter() - started, 3), **_sizes(manifest.to_wire())}
        del model
        manifest_fd = os.memfd_create("ectrans-manifest", os.MFD_CLOEXEC)
        os.write(manifest_fd, packb(manifest.to_wire()))
        for fd in (weights_fd, manifest_fd, report_fd):
            os.set_inheritable(fd, True)
        logger.info("[weights] %s: %d bytes exported in %.2fs; serving", spec.name, manifest.weights_bytes, load_s)
        sys.stderr.flush()
        os.execv(
            sys.executable,
            [
                sys.executable,
                "-m",
                "ectrans.sharing.weight_server",
                f"--socket={args.socket}",
                f"--weights-fd={weights_fd}",
                f"--manifest-fd={manifest_fd}",
                f"--report-fd={report_fd}",
                f"--ready={json.dumps(info)}",
                f"--log-level={args.log_level}",
            ],
        )
    # One export for every attach: each `_share_cuda_` call wraps the storage in another
    # ref-counted sharing context with its own CUDA event, which would pile up per attach.
    started = time.perf_counter()
    payload = packb(export_cuda(model, spec).to_wire())
    info |= {
        "export_s": round(time.perf_counter() - started, 3),
        **summary(model),
        "cuda_reserved": torch.cuda.memory_reserved(device),
        "cuda_allocated": torch.cuda.memory_allocated(device),
    }
    listener = bind(args.socket)
    _report(report_fd, info | {"ev": "ready", "socket": str(args.socket), "pid": os.getpid()})
    logger.info("[weights] %s: %d bytes on %s; serving", spec.name, info["weights_bytes"], device)
    serve(listener, lambda _request: (payload, []), control_fd=0)
    return 0


def _sizes(manifest: dict[str, Any]) -> dict[str, int]:
    storages = manifest["storages"]
    return {
        "weights_bytes": sum(int(s[0]) for s in storages),
        "storages": len(storages),
        "tensors": len(manifest["tensors"]),
    }


# 2. The supervisor's handle -----------------------------------------------------------------------------


class HolderError(RuntimeError):
    """The holder could not load or export the model; the message carries its reason."""


@dataclass(frozen=True)
class HolderInfo:
    """What a ready holder reported."""

    pid: int
    socket: str
    weights_bytes: int
    load_s: float
    export_s: float
    storages: int
    tensors: int
    device: str
    raw: dict[str, Any]

    @classmethod
    def from_report(cls, report: dict[str, Any]) -> HolderInfo:
        return cls(
            pid=int(report["pid"]),
            socket=str(report["socket"]),
            weights_bytes=int(report["weights_bytes"]),
            load_s=float(report["load_s"]),
            export_s=float(report["export_s"]),
            storages=int(report["storages"]),
            tensors=int(report["tensors"]),
            device=str(report["device"]),
            raw=report,
        )


class HolderProcess:
    """One run of a holder process. `on_exit(holder, code)` is called once, from a thread of this
    object, when the process has exited (whether or not it was ready)."""

    def __init__(
        self,
        spec: ModelSpec,
        device: str,
        socket_path: Path,
        *,
        on_ready: Callable[[HolderProcess], None] | None = None,
        on_exit: Callable[[HolderProcess, int | None], None] | None = None,
        log_level: str = "INFO",
        log_format: str = "text",
    ) -> None:
        self.spec = spec
        self.device = device
        self.socket_path = socket_path
        self.on_ready = on_ready
        self.on_exit = on_exit
        self.info: HolderInfo | None = None
        self.error: str | None = None
        self.exit_code: int | None = None
        self.started = time.monotonic()
        self.startup_s: float | None = None  # from process start to ready
        self._ready = threading.Event()
        self._exited = threading.Event()
        command = [
            sys.executable,
            "-m",
            "ectrans.sharing.holder",
            f"--spec={json.dumps(spec_to_wire(spec))}",
            f"--device={device}",
            f"--socket={socket_path}",
            f"--log-level={log_level}",
            f"--log-format={log_format}",
        ]
        env = without_expandable_segments(os.environ)  # see cuda_env.ipc_allocator_problem
        self._proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.pid = self._proc.pid
        self._reader = threading.Thread(target=self._read, name=f"ectrans-holder-{spec.name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        try:
            while (payload := read_frame(fd)) is not None:
                report = decode(payload)
                if report.get("ev") == "ready":
                    self.startup_s = round(time.monotonic() - self.started, 4)
                    self.info = HolderInfo.from_report(report | {"startup_s": self.startup_s})
                    self._ready.set()
                    if self.on_ready is not None:
                        self.on_ready(self)
                elif report.get("ev") == "error":
                    self.error = str(report.get("message"))
        except (ChannelClosed, OSError, ValueError) as exc:
            self.error = self.error or f"unreadable report: {exc}"
        self.exit_code = self._proc.wait()
        if self.info is None:
            self.error = f"holder exited with {describe_exit(self.exit_code)} before it was ready: {self.error}"
        self._exited.set()
        self._ready.set()
        if self.on_exit is not None:
            self.on_exit(self, self.exit_code)

    @property
    def alive(self) -> bool:
        return not self._exited.is_set()

    def wait_ready(self, timeout: float) -> HolderInfo:
        if not self._ready.wait(timeout):
            raise HolderError(f"the holder for {self.spec.name!r} was not ready after {timeout:.0f}s")
        if self.info is None or not self.alive:
            raise HolderError(self.error or f"the holder for {self.spec.name!r} exited")
        return self.info

    def wait_exit(self, timeout: float) -> bool:
        return self._exited.wait(timeout)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Close its pipe (the holder exits on end of file); kill it if it does not."""
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            self._proc.stdin.close()
        if not self._exited.wait(timeout) and self._proc.poll() is None:
            logger.warning("[weights] holder pid %d did not stop in %.0fs; killing it", self.pid, timeout)
            self._proc.kill()
            self._exited.wait(timeout)
        self._reader.join(timeout)
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self.socket_path.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
