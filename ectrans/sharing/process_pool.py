"""An `Executor` backed by K executor processes that share one copy of the model's weights.

    worker process                      holder (one per device and model)
    SharedExecutorPool ── pipes ──▶ executor 1 ─┐  attach: manifest + sealed memfd / CUDA IPC
      submit → least outstanding    executor 2 ─┼─ over a Unix socket; the weights are mapped,
      futures ◀── results           executor K ─┘  not copied

The worker keeps using the `Executor` interface: `submit` queues a batch in the pool, which sends
it to the ready executor process with the fewest outstanding batches. The pool composes three
parts that share one lock: `routing.Router` (which process runs which batch),
`supervision.Supervisor` (starting, restarting and stopping the holder, the zygote and the
executor processes) and `memory` (what each process's memory is, for the monitor).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ectrans.common.registry import ModelSpec
from ectrans.models.api import Executor, Request
from ectrans.sharing.manifest import spec_to_wire
from ectrans.sharing.memory import PoolProcesses, measure
from ectrans.sharing.routing import Router, fail
from ectrans.sharing.slots import BatchFuture, Slot
from ectrans.sharing.supervision import PoolError, Supervisor

logger = logging.getLogger(__name__)

STATS_INTERVAL_S = 5.0


class SharedExecutorPool(Executor):
    """See the module docstring. `share=False` gives the baseline: each process loads its own copy
    (`fork_server=False` as well: fresh interpreters, as the prototype's multitask mode ran)."""

    def __init__(
        self,
        spec: ModelSpec,
        processes: int,
        *,
        device: str = "auto",
        threads_per_process: int | None = None,
        segments: int | None = None,
        queue_depth: int = 2,
        trace: bool = True,
        share: bool = True,
        fork_server: bool = True,
        guard: bool = True,
        max_attempts: int = 2,
        start_timeout_s: float = 600.0,
        unavailable_timeout_s: float = 300.0,
        log_level: str | None = None,
        log_format: str = "text",
    ) -> None:
        if processes < 1:
            raise ValueError(f"{processes=} must be at least 1")
        if max_attempts < 1:
            raise ValueError(f"{max_attempts=} must be at least 1")
        from ectrans.models.loader import choose_device

        self.spec = spec
        self.processes = processes
        self.device = str(choose_device(device, spec))
        self.realtime_lane = self.device == "cpu"  # the executor processes' default (ectrans.models.pipeline)
        self.share = share
        self.max_attempts = max_attempts
        self.queue_depth = queue_depth
        self.unavailable_timeout_s = unavailable_timeout_s
        level = log_level or logging.getLevelName(logging.getLogger().getEffectiveLevel())
        args: dict[str, Any] = {
            "spec": spec_to_wire(spec),
            "device": self.device,
            "threads": threads_per_process or max(1, _cores() // processes),
            "segments": segments,
            "queue_depth": queue_depth,
            "trace": trace,
            "mode": "attach" if share else "load",
            "guard": guard,
            "log_level": level,
            "log_format": log_format,
        }
        self._tokens = _token_counter(spec)
        self._changed = threading.Condition(threading.Lock())
        self._router = Router(queue_depth)
        self._supervisor = Supervisor(
            spec,
            processes,
            device=self.device,
            share=share,
            fork_server=fork_server,
            args=args,
            run_dir=Path(tempfile.mkdtemp(prefix=f"ectrans-{spec.name}-")),
            max_attempts=max_attempts,
            unavailable_timeout_s=unavailable_timeout_s,
            log_level=level,
            log_format=log_format,
            changed=self._changed,
            router=self._router,
            on_tick=self._measure_when_due,
        )
        self._memory: dict[str, Any] = {}
        self._memory_at = 0.0
        self.segments: list[str] = []
        try:
            self._supervisor.start(start_timeout_s)
        except BaseException:
            self._supervisor.shutdown()
            raise
        with self._changed:
            self.segments = list(self._slots[0].info.get("segments", []))
        self.measure_memory()
        logger.info(
            "[pool] %s: %d executor processes on %s%s",
            self.spec.name,
            self.processes,
            self.device,
            f", sharing {self.weights_bytes} bytes of weights" if self.share else ", each with its own weights",
        )

    @property
    def _slots(self) -> list[Slot]:
        return self._supervisor.slots

    # -- the Executor contract -----------------------------------------------------------------

    @property
    def segment_count(self) -> int:
        return len(self.segments)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self._tokens(texts)

    def submit(self, request: Request) -> BatchFuture:
        future: BatchFuture = concurrent.futures.Future()
        with self._changed:
            if self._supervisor.closing:
                future.set_exception(RuntimeError(f"executor pool for {self.spec.name!r} is closed"))
                return future
            self._router.add(request, future)
            self._router.dispatch(self._slots)
        return future

    def close(self, timeout: float = 600.0) -> None:
        """Finish every submitted batch, then stop the executors, the holder and the zygote."""
        with self._changed:
            if self._supervisor.stopped:
                return
            self._supervisor.closing = True
            drained = self._changed.wait_for(lambda: not self._router.pending(self._slots), timeout)
            left = self._router.take_all(self._slots) if not drained else []
        for batch in left:
            fail(batch, PoolError(f"executor pool for {self.spec.name!r} closed before this batch ran"))
        self._supervisor.shutdown()

    def memory(self) -> dict[str, Any]:
        """The last memory figures measured (every few seconds); see `ectrans.sharing.memory`."""
        return dict(self._memory)

    # -- changing the executor processes ---------------------------------------------------------

    def grow(self, count: int = 1, timeout: float = 600.0) -> None:
        """Start `count` more executor processes (with the configured threads each) and wait until
        they are ready."""
        with self._changed:
            if self._supervisor.closing:
                raise PoolError(f"executor pool for {self.spec.name!r} is closed")
            added = [Slot(len(self._slots) + i) for i in range(count)]
            self._slots.extend(added)
            self.processes = len(self._slots)
            for slot in added:
                self._supervisor.spawn_locked(slot)
            if not self._changed.wait_for(lambda: all(s.state == "ready" or s.error for s in added), timeout):
                raise PoolError(f"{count} more executor processes of {self.spec.name!r} not ready after {timeout:.0f}s")
            failed = [s.error for s in added if s.error]
        if failed:
            raise PoolError(f"more executor processes of {self.spec.name!r} did not start: {failed}")

    def resize(self, processes: int, *, threads_per_process: int | None = None, timeout: float = 600.0) -> None:
        """Replace the executor processes by `processes` new ones with `threads_per_process` threads
        each (default: this host's cores shared between them), once the work queued now is done.
        The holder and the zygote stay; the new processes attach as a restart would."""
        if processes < 1:
            raise ValueError(f"{processes=} must be at least 1")
        supervisor = self._supervisor
        with self._changed:
            if supervisor.closing:
                raise PoolError(f"executor pool for {self.spec.name!r} is closed")
            if not self._changed.wait_for(lambda: not self._router.pending(self._slots), timeout):
                raise PoolError(f"executor pool for {self.spec.name!r} still busy after {timeout:.0f}s")
            old = [slot for slot in self._slots if slot.child is not None]
            for slot in old:
                slot.state = "closing"
                slot.outbox.put({"op": "close"})
            if not self._changed.wait_for(lambda: all(slot.child is None for slot in old), timeout):
                raise PoolError(f"executor processes of {self.spec.name!r} did not stop in {timeout:.0f}s")
            supervisor.args["threads"] = threads_per_process or max(1, _cores() // processes)
            supervisor.slots = [Slot(index) for index in range(processes)]
            self.processes = processes
            for slot in self._slots:
                supervisor.spawn_locked(slot)
            started = self._changed.wait_for(lambda: all(s.state == "ready" or s.error for s in self._slots), timeout)
            failed = [slot.error for slot in self._slots if slot.error]
        if failed or not started:
            raise PoolError(f"executor processes of {self.spec.name!r} did not start: {failed or 'timed out'}")

    def wait_settled(self, timeout: float, *, replaced: int | None = None) -> bool:
        """Block until the holder is up and every executor process is ready and attached to it
        (after a restart or a reattach), and process `replaced`, if given, is no longer one of them;
        False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._supervisor.settled_locked(replaced), timeout)

    # -- what the worker, the monitor and the tests read -------------------------------------------

    @property
    def restarts(self) -> dict[str, int]:
        return self._supervisor.restarts

    @property
    def holder_info(self) -> dict[str, Any]:
        return self._supervisor.holder_info

    @property
    def holder_socket(self) -> str | None:
        """Where the current holder answers attach requests."""
        holder = self._supervisor.holder
        return holder.socket_path.as_posix() if holder is not None and holder.info is not None else None

    @property
    def weights_bytes(self) -> int:
        """Bytes of weights held once for every process (0 when each loads its own)."""
        return int(self.holder_info.get("weights_bytes", 0)) if self.share else 0

    @property
    def holder_pid(self) -> int | None:
        holder = self._supervisor.holder
        return holder.pid if holder is not None and holder.alive else None

    @property
    def zygote_pid(self) -> int | None:
        spawner = self._supervisor.spawner
        return spawner.pid if spawner is not None else None

    def executor_pids(self) -> list[int]:
        with self._changed:
            return [int(slot.child.pid) for slot in self._slots if slot.child is not None]

    def executor_info(self) -> list[dict[str, Any]]:
        """What each executor process reported when it last became ready (timings, memory)."""
        with self._changed:
            return [
                slot.info | {"served": slot.served, "state": slot.state, "inflight": len(slot.inflight)}
                for slot in self._slots
            ]

    def measure_memory(self) -> dict[str, Any]:
        """Memory of the holder, the zygote and each executor process now (see `memory.measure`)."""
        report = measure(
            PoolProcesses(
                model=self.spec.name,
                device=self.device,
                shared=self.share,
                weights_bytes=self.weights_bytes,
                holder_pid=self.holder_pid,
                zygote_pid=self.zygote_pid,
                executor_pids=self.executor_pids(),
                executors_cuda_reserved=[int(i.get("cuda_reserved", 0)) for i in self.executor_info()],
                holder_cuda_reserved=int(self.holder_info.get("cuda_reserved", 0)) if self.share else 0,
            )
        )
        self._memory = report
        return report

    def _measure_when_due(self) -> None:
        now = time.monotonic()
        if now - self._memory_at >= STATS_INTERVAL_S:
            self._memory_at = now
            self.measure_memory()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _token_counter(spec: ModelSpec) -> Callable[[Sequence[str]], list[int]]:
    """Token counts as the executors' tokenizer gives them (the worker packs batches with these)."""
    import transformers

    from ectrans.models.encoder import EncoderTokenizer

    tokenizer = transformers.AutoTokenizer.from_pretrained(spec.path, local_files_only=True)
    counter = EncoderTokenizer(tokenizer, spec.max_tokens)
    counter.keeps_counted = False  # the executor processes tokenise their batches themselves
    return counter.count_tokens
