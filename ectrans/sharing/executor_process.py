"""An executor process: attaches to its holder's weights (or loads its own), then serves batches.

The supervisor (`process_pool.SharedExecutorPool`) talks to it in frames over two pipes:

    in:  {"op": "run", "id", "request": {"op", "inputs", "params", "realtime"}}
         {"op": "attach", "socket"}   drain, let go of the current weights, attach to this holder
         {"op": "close"}              drain, exit
    out: {"ev": "ready", ...}         attached (or loaded) and warmed up; timings and memory
         {"ev": "result", "id", "results": [[output, error], ...], "stats": [size, tokens, padded, ms]}
         {"ev": "failed", "id", "error"}
         {"ev": "error", "message"}   could not attach or load; the process exits

Inside, batches run on the same `PipelinedExecutor` an in-process worker uses (`load_executor`
with `model=`), so outputs are the same. If the holder goes away: on CUDA the IPC memory may be
freed with it, so the process exits at once (`EXIT_HOLDER_LOST`) and the supervisor re-runs its
batches; a CUDA result is sent only after the holder has answered a fence sent once the batch was
done (`HolderLink`), so no batch computed on freed memory counts. On CPU the mapped pages stay
valid, so it serves on until told to reattach.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import psutil

from ectrans.models.api import BatchStats, Executor, ItemResult, Request
from ectrans.sharing.attach import AttachedModel, mapped_weight_files
from ectrans.sharing.ipc import FrameWriter, decode, private_stdout, read_frame, recv_frame, send_frame
from ectrans.sharing.manifest import Manifest, spec_from_wire

logger = logging.getLogger(__name__)

EXIT_HOLDER_LOST = 75
FENCE_TIMEOUT_S = 10.0
_GUARD_REFUSED = "Cannot access data pointer of Tensor"
_WARM_UP = "warm up"


@dataclass
class Session:
    """One attachment (or private load) and the executor running on it."""

    executor: Executor
    attached: AttachedModel | None = None
    holder: HolderLink | None = None
    info: dict[str, Any] = field(default_factory=dict)
    closing: threading.Event = field(default_factory=threading.Event)

    def close(self) -> None:
        """Finish the batches in flight, then let go of the weights and the holder connection."""
        self.closing.set()
        self.executor.close()
        if self.holder is not None:
            self.holder.close()
        if self.attached is not None:
            self.attached.release()

    def holder_alive_since(self) -> bool:
        """Whether the holder was still running after this call began (a fence; see `HolderLink`).
        Always True for a private copy of the weights."""
        return self.holder is None or self.holder.fence()


class HolderLink:
    """The connection to the holder: tells when the holder goes, and fences results.

    The holder echoes every byte an executor sends. An echo proves the holder process was still
    running after the byte was sent, so a batch that finished before `fence()` was called ran on
    weights that were still there. On CUDA that matters: the holder's memory dies with it and a
    kernel reading it afterwards computes garbage without an error.
    """

    def __init__(self, sock: socket.socket, on_lost: Callable[[], None]) -> None:
        self.sock = sock
        self.lost = False
        self._on_lost = on_lost
        self._cond = threading.Condition()
        self._sent = 0
        self._echoed = 0
        self._thread = threading.Thread(target=self._watch, name="ectrans-holder-link", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        try:
            while data := self.sock.recv(4096):
                with self._cond:
                    self._echoed += len(data)
                    self._cond.notify_all()
        except OSError:
            pass
        with self._cond:
            self.lost = True
            self._cond.notify_all()
        self._on_lost()

    def fence(self, timeout: float = FENCE_TIMEOUT_S) -> bool:
        """True once the holder has echoed a byte sent now; False if it is gone (or silent)."""
        with self._cond:
            if self.lost:
                return False
            self._sent += 1
            wanted = self._sent
            try:
                self.sock.send(b"f")
            except OSError:
                return False
            self._cond.wait_for(lambda: self._echoed >= wanted or self.lost, timeout)
            return self._echoed >= wanted

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def _private_bytes() -> int:
    return int(psutil.Process().memory_full_info().uss)


def request_manifest(path: str) -> tuple[socket.socket, Manifest, list[int]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        from ectrans.common.codec import packb

        send_frame(sock, packb({"op": "attach", "pid": os.getpid()}))
        frame = recv_frame(sock)
        if frame is None:
            raise ConnectionError(f"the holder at {path} closed the connection without a manifest")
        payload, fds = frame
        return sock, Manifest.from_wire(decode(payload)), fds
    except BaseException:
        sock.close()
        raise


def _warm_up(executor: Executor) -> None:
    """One tiny batch: pays lazy initialisation before real work, and proves every kernel the model
    uses runs on read-only weights."""
    spec = executor.spec
    if "embed" in spec.ops:
        request = Request("embed", [_WARM_UP])
    else:
        request = Request("translate", [_WARM_UP], {"max_new_tokens": 2, "num_beams": 1})
    results, _ = executor.submit(request).result()
    if results[0].error is not None:
        raise RuntimeError(f"warm-up input failed: {results[0].error}")


def open_session(args: dict[str, Any], socket_path: str, on_holder_lost: Callable[[Session], None]) -> Session:
    """Attach to the holder at `socket_path` (or, in mode "load", load a private copy), build the
    executor and warm it up."""
    from ectrans.models.loader import load_executor

    spec = spec_from_wire(args["spec"])
    build = {
        "device": args["device"],
        "threads": args["threads"],
        "segments": args["segments"],
        "queue_depth": args["queue_depth"],
        "trace": args.get("trace", True),
    }
    runtime_bytes = _private_bytes()
    started = time.perf_counter()
    if args["mode"] == "load":
        executor = load_executor(spec, **build)
        session = Session(executor)
        attach_s = time.perf_counter() - started
    else:
        guard = bool(args["guard"])
        while True:
            session = _attach(spec, socket_path, guard, build, on_holder_lost)
            attach_s = float(session.info["attach_s"])
            try:
                _warm_up(session.executor)
                break
            except RuntimeError as exc:
                session.close()
                if not (guard and _GUARD_REFUSED in str(exc)):
                    raise
                logger.warning(
                    "[weights] a kernel of %s asked for a writable pointer to a weight; serving without the "
                    "write guard (on CPU the read-only mapping still traps writes): %s",
                    spec.name,
                    exc,
                )
                guard = False
    if args["mode"] == "load":
        _warm_up(session.executor)
    _trim_heap()
    session.info |= {
        "ev": "ready",
        "pid": os.getpid(),
        "mode": args["mode"],
        "attach_s": round(attach_s, 4),
        "ready_s": round(time.perf_counter() - started, 4),
        "runtime_bytes": runtime_bytes,
        "private_bytes": _private_bytes(),
        "segments": [str(s.name) for s in getattr(session.executor, "segments", [])],
        "weight_files": mapped_weight_files(),
        **_cuda_memory(str(args["device"])),
    }
    return session


def _attach(
    spec: Any, socket_path: str, guard: bool, build: dict[str, Any], on_lost: Callable[[Session], None]
) -> Session:
    from ectrans.models.loader import load_executor
    from ectrans.sharing.attach import attach_model

    started = time.perf_counter()
    sock, manifest, fds = request_manifest(socket_path)
    try:
        attached = attach_model(spec, manifest, fds, guard=guard)
        attach_s = time.perf_counter() - started
        executor = load_executor(spec, **build, model=attached.model)
    except BaseException:
        sock.close()
        raise
    info = {
        "attach_s": attach_s,
        "guarded": attached.guarded,
        "weights_bytes": manifest.weights_bytes,
        "holder_pid": manifest.holder_pid,
    }
    session = Session(executor, attached, None, info)
    session.holder = HolderLink(sock, lambda: None if session.closing.is_set() else on_lost(session))
    return session


def _trim_heap() -> None:
    """Give the C heap's free pages back to the kernel (glibc keeps what loading freed)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _cuda_memory(device: str) -> dict[str, int]:
    if not device.startswith("cuda"):
        return {}
    import torch

    return {"cuda_allocated": torch.cuda.memory_allocated(device), "cuda_reserved": torch.cuda.memory_reserved(device)}


class Server:
    """The frame loop of one executor process."""

    def __init__(self, args: dict[str, Any], fd_in: int, fd_out: int) -> None:
        self.args = args
        self.fd_in = fd_in
        self.out = FrameWriter(fd_out)
        self.device = str(args["device"])

    def _holder_lost(self, session: Session) -> None:
        pid = session.info.get("holder_pid")
        if self.device.startswith("cuda"):
            # The holder's CUDA memory may already be freed: nothing more may run on it.
            logger.error("[weights] holder pid %s is gone; this executor exits so its batches rerun", pid)
            sys.stderr.flush()
            os._exit(EXIT_HOLDER_LOST)
        logger.warning("[weights] holder pid %s is gone; serving from the mapped weights until reattached", pid)

    def _reply(self, session: Session, batch_id: int, future: Future[tuple[list[ItemResult], BatchStats]]) -> None:
        if self.device.startswith("cuda") and not session.holder_alive_since():
            # The batch may have read the holder's memory after it was freed: send nothing, exit,
            # and let the supervisor rerun the batch on a replacement.
            self._holder_lost(session)
            return
        try:
            results, stats = future.result()
            message: dict[str, Any] = {
                "ev": "result",
                "id": batch_id,
                "results": [[r.output, r.error] for r in results],
                "stats": [stats.batch_size, stats.tokens, stats.padded_tokens, stats.service_ms, stats.compute_ms],
            }
            if self.device.startswith("cuda"):  # the allocator's view, for the monitor
                cuda = _cuda_memory(self.device)
                message["cuda"] = [cuda["cuda_allocated"], cuda["cuda_reserved"]]
        except Exception as exc:
            message = {"ev": "failed", "id": batch_id, "error": str(exc)}
        try:
            self.out.send(message)
        except OSError as exc:  # the supervisor is gone; nobody is left to tell
            logger.debug("result %d not sent: %s", batch_id, exc)

    def run(self) -> int:
        try:
            session = open_session(self.args, str(self.args["socket"]), self._holder_lost)
        except Exception as exc:
            logger.exception("[weights] executor for %s could not start", self.args["spec"]["name"])
            self.out.send({"ev": "error", "message": f"{type(exc).__name__}: {exc}"})
            return 1
        self.out.send(session.info)
        while (payload := read_frame(self.fd_in)) is not None:
            message = decode(payload)
            op = message.get("op")
            if op == "run":
                raw = message["request"]
                request = Request(
                    str(raw["op"]), list(raw["inputs"]), dict(raw["params"]), bool(raw["realtime"]), int(raw["segment"])
                )
                session.executor.submit(request).add_done_callback(
                    functools.partial(self._reply, session, int(message["id"]))
                )
            elif op == "attach":
                session.close()
                try:
                    session = open_session(self.args, str(message["socket"]), self._holder_lost)
                except Exception as exc:
                    logger.exception("[weights] reattaching failed")
                    self.out.send({"ev": "error", "message": f"reattach failed: {type(exc).__name__}: {exc}"})
                    return 1
                self.out.send(session.info)
            elif op == "close":
                break
            else:
                logger.warning("[weights] unknown frame op %r ignored", op)
        session.close()
        return 0


def serve(args: dict[str, Any], fd_in: int, fd_out: int) -> int:
    """Run one executor process's life (also the entry point of a child forked by the zygote)."""
    from ectrans.common.logs import setup_logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when executors stop
    setup_logging(str(args["log_level"]), str(args["log_format"]), f"worker.executor{args['slot']}")
    import torch

    torch.set_num_threads(int(args["threads"]))
    with contextlib.suppress(RuntimeError):  # already set (a forked child inherits its zygote's setting)
        torch.set_num_interop_threads(1)
    return Server(args, fd_in, fd_out).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ectrans.sharing.executor_process")
    parser.add_argument("--args", required=True, help="the executor's arguments, as JSON")
    options = parser.parse_args(argv)
    fd_out = private_stdout()
    return serve(json.loads(options.args), 0, fd_out)


if __name__ == "__main__":
    sys.exit(main())
