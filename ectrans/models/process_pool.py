"""An `Executor` backed by K executor processes that share one copy of the model's weights.

Why one module of this length: routing, supervision and memory accounting of the executor
processes still share one lock and the slot table; their split is planned (docs/architecture.md).

    worker process                      holder (one per device and model)
    SharedExecutorPool ── pipes ──▶ executor 1 ─┐  attach: manifest + sealed memfd / CUDA IPC
      submit → least outstanding    executor 2 ─┼─ over a Unix socket; the weights are mapped,
      futures ◀── results           executor K ─┘  not copied

The worker keeps using the `Executor` interface: `submit` queues a batch in the pool, which sends
it to the ready executor process with the fewest outstanding batches (real-time batches first and
never held back; at most `queue_depth` batch-class batches per process, so the rest stay in the
pool, free to go to whichever process frees up first).

Supervision (a thread of the pool): the holder starts first and outlives the executors.
- An executor process that dies takes no batch with it: its outstanding batches go back to the
  front of the queue and run on another process or on its replacement. A batch whose process
  died `max_attempts` times while running it fails with a clear error (it is likely what kills
  them). Restarts back off when a process keeps dying.
- If the holder dies it is restarted. On CPU the executors' mappings stay valid, so they serve on
  and reattach to the new holder one at a time (the old copy is freed when the last one lets go).
  On CUDA the holder's memory may go with it: executors stop at once and their batches rerun on
  replacements attached to the new holder.
- No batch waits forever: if no executor process has been ready for `unavailable_timeout_s`, the
  batches waiting fail with the reason.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ectrans.common.codec import CodecError, packb
from ectrans.common.registry import ModelSpec
from ectrans.models.api import BatchStats, ItemResult, Request
from ectrans.models.executor_process import EXIT_HOLDER_LOST
from ectrans.models.holder import HolderError, HolderProcess, describe_exit
from ectrans.models.ipc import ChannelClosed, decode, read_frame, write_frame
from ectrans.models.weights import spec_to_wire
from ectrans.models.zygote import ChildProcess, ExecSpawner, Spawner, SpawnError, Zygote

logger = logging.getLogger(__name__)

BatchFuture = concurrent.futures.Future[tuple[list[ItemResult], BatchStats]]
EXIT_STATUS_WAIT_S = 2.0
CRASH_WINDOW_S = 60.0
MAX_BACKOFF_S = 30.0
STATS_INTERVAL_S = 5.0


class PoolError(RuntimeError):
    """The pool could not start, or can no longer serve; the message says why."""


class ExecutorProcessDied(RuntimeError):
    """A batch was running in executor processes that died with it too many times."""


@dataclass(eq=False)
class _Batch:
    id: int
    request: Request
    future: BatchFuture
    attempts: int = 0  # deaths of an executor process while it ran this batch

    def frame(self) -> dict[str, Any]:
        request = self.request
        raw = {
            "op": request.op,
            "inputs": list(request.inputs),
            "params": request.params,
            "realtime": request.realtime,
            "segment": request.segment,
        }
        return {"op": "run", "id": self.id, "request": raw}


@dataclass(eq=False)
class _Slot:
    """One executor process position; its process is replaced when it dies."""

    index: int
    state: str = "down"  # down → starting → ready ⇄ attaching; closing → closed
    generation: int = 0
    child: ChildProcess | None = None
    inflight: dict[int, _Batch] = field(default_factory=dict)
    outbox: queue.SimpleQueue[dict[str, Any] | None] = field(default_factory=queue.SimpleQueue)
    info: dict[str, Any] = field(default_factory=dict)
    holder_generation: int = -1  # the holder it is attached to
    pending_generation: int = -1  # the holder it was last told to attach to
    deaths: deque[float] = field(default_factory=deque)
    restart_at: float = 0.0
    spawned_at: float = 0.0
    served: int = 0  # batches this position has completed, over all its processes
    holder_kill: bool = False  # killed by the pool because its holder died (CUDA)
    error: str | None = None

    def batch_load(self) -> int:
        return sum(1 for batch in self.inflight.values() if not batch.request.realtime)


class SharedExecutorPool:
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
        self.share = share
        self.max_attempts = max_attempts
        self.queue_depth = queue_depth
        self.unavailable_timeout_s = unavailable_timeout_s
        self._log_level = log_level or logging.getLevelName(logging.getLogger().getEffectiveLevel())
        self._log_format = log_format
        self._run_dir = Path(tempfile.mkdtemp(prefix=f"ectrans-{spec.name}-"))
        self._args: dict[str, Any] = {
            "spec": spec_to_wire(spec),
            "device": self.device,
            "threads": threads_per_process or max(1, _cores() // processes),
            "segments": segments,
            "queue_depth": queue_depth,
            "mode": "attach" if share else "load",
            "guard": guard,
            "log_level": self._log_level,
            "log_format": log_format,
        }
        self._tokens = _token_counter(spec)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._slots = [_Slot(i) for i in range(processes)]
        self._realtime: deque[_Batch] = deque()
        self._batch: deque[_Batch] = deque()
        self._next_id = 0
        self._closing = False
        self._stopped = False
        self._holder: HolderProcess | None = None
        self._holder_generation = 0
        self._holder_failures = 0
        self._holder_restart_at = 0.0
        self._reattach: deque[_Slot] = deque()
        self._spawner: Spawner | None = None
        self._fork_server = fork_server
        self._ready_since: float | None = None
        self._unready_since = time.monotonic()
        self._memory: dict[str, Any] = {}
        self._memory_at = 0.0
        self.segments: list[str] = []
        self.holder_info: dict[str, Any] = {}
        self.restarts = {"executor": 0, "holder": 0}
        self._supervisor = threading.Thread(target=self._supervise, name=f"ectrans-pool-{spec.name}", daemon=True)
        try:
            self._start(start_timeout_s)
        except BaseException:
            self._shutdown()
            raise

    # -- the Executor contract -----------------------------------------------------------------

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self._tokens(texts)

    def submit(self, request: Request) -> BatchFuture:
        future: BatchFuture = concurrent.futures.Future()
        with self._lock:
            if self._closing:
                future.set_exception(RuntimeError(f"executor pool for {self.spec.name!r} is closed"))
                return future
            batch = _Batch(self._next_id, request, future)
            self._next_id += 1
            (self._realtime if request.realtime else self._batch).append(batch)
            self._dispatch_locked()
        return future

    def close(self, timeout: float = 600.0) -> None:
        """Finish every submitted batch, then stop the executors, the holder and the zygote."""
        with self._lock:
            if self._stopped:
                return
            self._closing = True
            drained = self._changed.wait_for(lambda: not self._pending_locked(), timeout)
            left = self._take_all_locked() if not drained else []
        for batch in left:
            _fail(batch, PoolError(f"executor pool for {self.spec.name!r} closed before this batch ran"))
        self._shutdown()

    def grow(self, count: int = 1, timeout: float = 600.0) -> None:
        """Start `count` more executor processes (with the configured threads each) and wait until
        they are ready."""
        with self._lock:
            if self._closing:
                raise PoolError(f"executor pool for {self.spec.name!r} is closed")
            added = [_Slot(len(self._slots) + i) for i in range(count)]
            self._slots.extend(added)
            self.processes = len(self._slots)
            for slot in added:
                self._spawn_locked(slot)
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
        with self._lock:
            if self._closing:
                raise PoolError(f"executor pool for {self.spec.name!r} is closed")
            if not self._changed.wait_for(lambda: not self._pending_locked(), timeout):
                raise PoolError(f"executor pool for {self.spec.name!r} still busy after {timeout:.0f}s")
            old = [slot for slot in self._slots if slot.child is not None]
            for slot in old:
                slot.state = "closing"
                slot.outbox.put({"op": "close"})
            if not self._changed.wait_for(lambda: all(slot.child is None for slot in old), timeout):
                raise PoolError(f"executor processes of {self.spec.name!r} did not stop in {timeout:.0f}s")
            self._args["threads"] = threads_per_process or max(1, _cores() // processes)
            self._slots = [_Slot(index) for index in range(processes)]
            self.processes = processes
            for slot in self._slots:
                self._spawn_locked(slot)
            started = self._changed.wait_for(lambda: all(s.state == "ready" or s.error for s in self._slots), timeout)
            failed = [slot.error for slot in self._slots if slot.error]
        if failed or not started:
            raise PoolError(f"executor processes of {self.spec.name!r} did not start: {failed or 'timed out'}")

    def wait_settled(self, timeout: float, *, replaced: int | None = None) -> bool:
        """Block until the holder is up and every executor process is ready and attached to it
        (after a restart or a reattach), and process `replaced`, if given, is no longer one of them;
        False on timeout."""

        def settled() -> bool:
            holder = self._holder
            if self.share and (holder is None or holder.info is None):
                return False
            if replaced is not None and any(s.child is not None and s.child.pid == replaced for s in self._slots):
                return False
            current = self._holder_generation if self.share else 0
            return all(s.state == "ready" and (not self.share or s.holder_generation == current) for s in self._slots)

        with self._lock:
            return self._changed.wait_for(settled, timeout)

    @property
    def holder_socket(self) -> str | None:
        """Where the current holder answers attach requests."""
        holder = self._holder
        return holder.socket_path.as_posix() if holder is not None and holder.info is not None else None

    # -- what the worker and the monitor read --------------------------------------------------

    @property
    def weights_bytes(self) -> int:
        """Bytes of weights held once for every process (0 when each loads its own)."""
        return int(self.holder_info.get("weights_bytes", 0)) if self.share else 0

    @property
    def holder_pid(self) -> int | None:
        holder = self._holder
        return holder.pid if holder is not None and holder.alive else None

    @property
    def zygote_pid(self) -> int | None:
        return self._spawner.pid if self._spawner is not None else None

    def executor_pids(self) -> list[int]:
        with self._lock:
            return [int(slot.child.pid) for slot in self._slots if slot.child is not None]

    def executor_info(self) -> list[dict[str, Any]]:
        """What each executor process reported when it last became ready (timings, memory)."""
        with self._lock:
            return [
                slot.info | {"served": slot.served, "state": slot.state, "inflight": len(slot.inflight)}
                for slot in self._slots
            ]

    def memory(self) -> dict[str, Any]:
        """The last memory figures the supervisor measured (every few seconds)."""
        return dict(self._memory)

    def measure_memory(self) -> dict[str, Any]:
        """Memory of the holder, the zygote and each executor process now, from /proc/<pid>/smaps:
        PSS (shared pages split among their users, so the group's sum counts the weights once),
        USS, and `private`: USS without the shared weights (a lone executor maps them privately)."""
        pids = self.executor_pids()
        executors = [m for m in (_process_memory(pid) for pid in pids) if m is not None]
        holder, zygote = _process_memory(self.holder_pid), _process_memory(self.zygote_pid)
        group = [m for m in (*executors, holder, zygote) if m is not None]
        report = {
            "model": self.spec.name,
            "device": self.device,
            "shared": self.share,
            "weights_bytes": self.weights_bytes,
            "holder_pid": self.holder_pid,
            "zygote_pid": self.zygote_pid,
            "executor_pids": pids,
            "executors": executors,
            "executors_pss": [m["pss"] for m in executors],
            "executors_private": [m["private"] for m in executors],
            "executors_cuda_reserved": [int(i.get("cuda_reserved", 0)) for i in self.executor_info()],
            "holder_cuda_reserved": int(self.holder_info.get("cuda_reserved", 0)) if self.share else 0,
            "holder": holder,
            "zygote": zygote,
            "pss_sum": sum(m["pss"] for m in group),
        }
        self._memory = report
        return report

    # -- start and stop --------------------------------------------------------------------------

    def _start(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if self.share:
            self._start_holder()
        if self._fork_server:
            self._spawner = self._start_zygote()
        else:
            self._spawner = ExecSpawner()
        if self._holder is not None:
            try:
                self.holder_info = self._holder.wait_ready(max(1.0, deadline - time.monotonic())).raw
            except HolderError as exc:
                raise PoolError(f"cannot serve {self.spec.name!r}: {exc}") from exc
        if isinstance(self._spawner, Zygote):
            self._spawner.wait_ready(max(1.0, deadline - time.monotonic()))
        with self._lock:
            for slot in self._slots:
                self._spawn_locked(slot)
        self._supervisor.start()
        with self._lock:
            started = self._changed.wait_for(
                lambda: all(s.state == "ready" for s in self._slots) or any(s.error for s in self._slots),
                max(1.0, deadline - time.monotonic()),
            )
            failed = [s.error for s in self._slots if s.error]
            if failed or not started:
                raise PoolError(f"executor processes for {self.spec.name!r} did not start: {failed or 'timed out'}")
            self.segments = list(self._slots[0].info.get("segments", []))
        self.measure_memory()
        logger.info(
            "[pool] %s: %d executor processes on %s%s",
            self.spec.name,
            self.processes,
            self.device,
            f", sharing {self.weights_bytes} bytes of weights" if self.share else ", each with its own weights",
        )

    def _start_holder(self) -> None:
        self._holder_generation += 1
        if self._holder_generation > 1:
            self.restarts["holder"] += 1
        self._holder = HolderProcess(
            self.spec,
            self.device,
            self._run_dir / f"holder-{self._holder_generation}.sock",
            on_ready=lambda holder: self._events.put(("holder_ready", holder)),
            on_exit=lambda holder, code: self._events.put(("holder_exit", holder, code)),
            log_level=self._log_level,
            log_format=self._log_format,
        )

    def _start_zygote(self) -> Zygote:
        return Zygote(
            spec_to_wire(self.spec),
            on_exit=lambda zygote: self._events.put(("zygote_exit", zygote)),
            log_level=self._log_level,
        )

    def _shutdown(self) -> None:
        """Stop everything this pool started (idempotent)."""
        with self._lock:
            if self._stopped:
                return
            self._closing = True
            for slot in self._slots:
                if slot.child is not None:
                    slot.state = "closing"
                    slot.outbox.put({"op": "close"})
            self._changed.wait_for(lambda: all(s.child is None for s in self._slots), 30.0)
            self._stopped = True
            leftovers = [s.child for s in self._slots if s.child is not None]
        for child in leftovers:
            child.kill()
        self._events.put(("stop",))
        if self._supervisor.is_alive():
            self._supervisor.join(30.0)
        if self._holder is not None:
            self._holder.stop()
        if self._spawner is not None:
            self._spawner.stop()
        shutil.rmtree(self._run_dir, ignore_errors=True)

    # -- dispatch (called with the lock held) -----------------------------------------------------

    def _pending_locked(self) -> bool:
        return bool(self._realtime or self._batch or any(s.inflight for s in self._slots))

    def _take_all_locked(self) -> list[_Batch]:
        batches = [*self._realtime, *self._batch]
        self._realtime.clear()
        self._batch.clear()
        for slot in self._slots:
            batches.extend(slot.inflight.values())
            slot.inflight.clear()
        return batches

    def _dispatch_locked(self) -> None:
        ready = [s for s in self._slots if s.state == "ready"]
        while ready and (self._realtime or self._batch):
            realtime = bool(self._realtime)
            candidates = ready if realtime else [s for s in ready if s.batch_load() < self.queue_depth]
            if not candidates:
                return
            slot = min(candidates, key=lambda s: (len(s.inflight), s.index))
            batch = (self._realtime if realtime else self._batch).popleft()
            slot.inflight[batch.id] = batch
            slot.outbox.put(batch.frame())

    def _requeue_locked(self, batches: list[_Batch]) -> None:
        for batch in sorted(batches, key=lambda b: b.id, reverse=True):
            (self._realtime if batch.request.realtime else self._batch).appendleft(batch)

    # -- executor processes -----------------------------------------------------------------------

    def _spawn_locked(self, slot: _Slot) -> None:
        assert self._spawner is not None
        if slot.child is not None:  # never leave a process behind unsupervised
            return
        holder = self._holder
        args = self._args | {"slot": slot.index, "socket": holder.socket_path.as_posix() if holder else ""}
        try:
            child = self._spawner.spawn(args)
        except (SpawnError, OSError) as exc:
            logger.warning("[pool] cannot start executor %d of %s: %s", slot.index, self.spec.name, exc)
            slot.restart_at = time.monotonic() + 1.0
            return
        slot.generation += 1
        slot.spawned_at = time.monotonic()
        slot.child = child
        slot.state = "starting"
        slot.error = None
        slot.holder_kill = False
        slot.pending_generation = self._holder_generation
        slot.outbox = queue.SimpleQueue()
        name = f"ectrans-{self.spec.name}-exec{slot.index}"
        threading.Thread(target=self._read, args=(slot, child, slot.generation), name=name, daemon=True).start()
        threading.Thread(target=self._write, args=(child, slot.outbox), name=f"{name}-out", daemon=True).start()

    def _write(self, child: ChildProcess, outbox: queue.SimpleQueue[dict[str, Any] | None]) -> None:
        while (message := outbox.get()) is not None:
            try:
                write_frame(child.command_fd, packb(message))
            except OSError:  # the process is gone; its reader reports that
                return

    def _read(self, slot: _Slot, child: ChildProcess, generation: int) -> None:
        try:
            while (payload := read_frame(child.report_fd)) is not None:
                self._on_message(slot, generation, decode(payload))
        except (ChannelClosed, OSError, CodecError) as exc:
            logger.warning("[pool] executor %d of %s: broken report stream (%s)", slot.index, self.spec.name, exc)
        self._events.put(("child_eof", slot, generation))

    def _on_message(self, slot: _Slot, generation: int, message: dict[str, Any]) -> None:
        event = message.get("ev")
        done: tuple[_Batch, dict[str, Any]] | None = None
        with self._lock:
            if slot.generation != generation:
                return
            if event == "ready":
                slot.state = "ready"
                slot.info = message | {"startup_s": round(time.monotonic() - slot.spawned_at, 4)}
                slot.holder_generation = slot.pending_generation
                self._ready_since = self._ready_since or time.monotonic()
                if slot in self._reattach:
                    self._reattach.remove(slot)
                self._next_reattach_locked()
                self._changed.notify_all()
            elif event in ("result", "failed") and slot.holder_kill:
                pass  # its holder died: the batch reruns on a replacement once this process is gone
            elif event in ("result", "failed"):
                if "cuda" in message:
                    slot.info["cuda_allocated"], slot.info["cuda_reserved"] = message["cuda"]
                batch = slot.inflight.pop(int(message["id"]), None)
                if batch is not None:
                    slot.served += 1
                    done = (batch, message)
                self._changed.notify_all()
            elif event == "error":
                slot.error = str(message.get("message"))
                logger.error("[pool] executor %d of %s: %s", slot.index, self.spec.name, slot.error)
                self._changed.notify_all()
            self._dispatch_locked()
        if done is not None:
            _complete(*done)

    # -- supervision ------------------------------------------------------------------------------

    def _supervise(self) -> None:
        while True:
            try:
                event = self._events.get(timeout=1.0)
            except queue.Empty:
                event = ("tick",)
            kind = event[0]
            if kind == "stop":
                return
            try:
                if kind == "child_eof":
                    self._on_child_exit(event[1], event[2])
                elif kind == "holder_exit":
                    self._on_holder_exit(event[1], event[2])
                elif kind == "holder_ready":
                    self._on_holder_ready(event[1])
                elif kind == "zygote_exit":
                    self._on_zygote_exit(event[1])
                self._on_timers()
            except Exception:
                logger.exception("[pool] supervisor of %s: unexpected error; carrying on", self.spec.name)

    def _on_child_exit(self, slot: _Slot, generation: int) -> None:
        with self._lock:
            if slot.generation != generation or slot.child is None:
                return
            child = slot.child
        code = child.wait(EXIT_STATUS_WAIT_S)
        if code is None:  # closed its report pipe but lives on: it must not keep running batches
            child.kill()
            code = child.wait(EXIT_STATUS_WAIT_S)
        child.close()
        failed: list[_Batch] = []
        with self._lock:
            slot.child = None
            was = slot.state
            slot.state = "closed" if was == "closing" else "down"
            slot.outbox.put(None)
            lost = list(slot.inflight.values())
            slot.inflight.clear()
            holder_caused = code == EXIT_HOLDER_LOST or slot.holder_kill
            for batch in lost:
                if not holder_caused:
                    batch.attempts += 1
                if batch.attempts >= self.max_attempts:
                    failed.append(batch)
            self._requeue_locked([b for b in lost if b not in failed])
            if slot in self._reattach:
                self._reattach.remove(slot)
            now = time.monotonic()
            if not holder_caused and was != "closing":
                slot.deaths.append(now)
            while slot.deaths and slot.deaths[0] < now - CRASH_WINDOW_S:
                slot.deaths.popleft()
            slot.restart_at = now + _backoff(len(slot.deaths) - 1)
            self._note_readiness_locked()
            self._changed.notify_all()
            self._dispatch_locked()
        if was != "closing" or lost:
            logger.warning(
                "[pool] executor %d (pid %d) of %s exited with %s%s; %d batches rerun, %d failed",
                slot.index,
                child.pid,
                self.spec.name,
                describe_exit(code),
                " (its holder died)" if holder_caused else "",
                len(lost) - len(failed),
                len(failed),
            )
        for batch in failed:
            _fail(
                batch,
                ExecutorProcessDied(
                    f"executor processes of {self.spec.name!r} died {batch.attempts} times while running this batch "
                    f"(last: pid {child.pid}, {describe_exit(code)}); not retried"
                ),
            )

    def _on_holder_exit(self, holder: HolderProcess, code: int | None) -> None:
        if holder is not self._holder or self._stopped:
            return
        ready = holder.info is not None
        logger.error(
            "[pool] holder pid %d of %s exited with %s%s",
            holder.pid,
            self.spec.name,
            describe_exit(code),
            "" if ready else f" before it was ready: {holder.error}",
        )
        holder.stop(timeout=1.0)
        self._holder_failures = 0 if ready else self._holder_failures + 1
        self._holder_restart_at = time.monotonic() + _backoff(self._holder_failures)
        self._holder = None
        if self.device.startswith("cuda"):
            with self._lock:  # the weights may be gone: nothing more runs on them
                for slot in self._slots:
                    if slot.child is not None and slot.state != "closing":
                        slot.state = "attaching"
                        slot.holder_kill = True
                        slot.child.kill()

    def _on_holder_ready(self, holder: HolderProcess) -> None:
        if holder is not self._holder:
            return
        assert holder.info is not None
        self.holder_info = holder.info.raw
        with self._lock:
            stale = [
                s
                for s in self._slots
                if s.child is not None and s.state != "closing" and s.pending_generation != self._holder_generation
            ]
            if stale:
                logger.info("[pool] holder of %s is back (pid %d); executors reattach", self.spec.name, holder.pid)
            self._reattach.extend(stale)
            self._next_reattach_locked()
            self._changed.notify_all()

    def _next_reattach_locked(self) -> None:
        """Reattach executors to the current holder one at a time, so the others keep serving."""
        if any(s.state == "attaching" and s.child is not None and not s.holder_kill for s in self._slots):
            return
        holder = self._holder
        while self._reattach and holder is not None and holder.info is not None:
            slot = self._reattach.popleft()
            if slot.child is None or slot.pending_generation == self._holder_generation:
                continue
            slot.state = "attaching"
            slot.pending_generation = self._holder_generation
            slot.outbox.put({"op": "attach", "socket": holder.socket_path.as_posix()})
            return

    def _on_zygote_exit(self, zygote: Zygote) -> None:
        if zygote is not self._spawner or self._stopped:
            return
        logger.error("[pool] zygote of %s is gone (%s); starting another", self.spec.name, zygote.error)
        self._spawner = self._start_zygote()

    def _on_timers(self) -> None:
        now = time.monotonic()
        if self.share and self._holder is None and not self._stopped and now >= self._holder_restart_at:
            self._start_holder()
        holder_ready = not self.share or (self._holder is not None and self._holder.info is not None)
        spawner_ready = not isinstance(self._spawner, Zygote) or self._spawner.ready
        expired: list[_Batch] = []
        with self._lock:
            for slot in self._slots:
                wanted = not self._closing or self._pending_locked()
                down = slot.child is None and slot.state == "down"
                if down and wanted and holder_ready and spawner_ready and now >= slot.restart_at:
                    self.restarts["executor"] += 1
                    self._spawn_locked(slot)
            self._note_readiness_locked()
            if self._ready_since is None and now - self._unready_since > self.unavailable_timeout_s:
                expired = [*self._realtime, *self._batch]
                self._realtime.clear()
                self._batch.clear()
                self._changed.notify_all()
        for batch in expired:
            _fail(
                batch,
                PoolError(
                    f"no executor process of {self.spec.name!r} has been ready for "
                    f"{self.unavailable_timeout_s:.0f}s (holder: {self._holder_state()})"
                ),
            )
        if now - self._memory_at >= STATS_INTERVAL_S:
            self._memory_at = now
            self.measure_memory()

    def _note_readiness_locked(self) -> None:
        if any(s.state == "ready" for s in self._slots):
            self._ready_since = self._ready_since or time.monotonic()
        elif self._ready_since is not None:
            self._ready_since = None
            self._unready_since = time.monotonic()

    def _holder_state(self) -> str:
        holder = self._holder
        if not self.share:
            return "none (private weights)"
        if holder is None:
            return f"restarting after {self._holder_failures} failed starts"
        return "ready" if holder.info is not None else (holder.error or "loading")


def heartbeat_fields(executors: Sequence[object]) -> dict[str, object]:
    """What a worker adds to its heartbeat for its executor pools (none for in-process executors):
    the shared weights once per model and device, and each process's private memory, so the
    monitor can show the saving as measured."""
    return memory_fields([e.memory() for e in executors if isinstance(e, SharedExecutorPool)])


def memory_fields(reports: Sequence[dict[str, Any]]) -> dict[str, object]:
    """The heartbeat fields for these pools' `memory()` reports (see `heartbeat_fields`)."""
    reports = [r for r in reports if r]
    if not reports:
        return {}
    detail = [
        {
            "model": r["model"],
            "device": r["device"],
            "shared": r["shared"],
            "weights_bytes": r["weights_bytes"],
            "holder_pid": r["holder_pid"],
            "holder_pss": (r["holder"] or {}).get("pss", 0),
            "zygote_pid": r["zygote_pid"],
            "zygote_pss": (r["zygote"] or {}).get("pss", 0),
            "executor_pids": r["executor_pids"],
            "executors_pss": r["executors_pss"],
            "executors_private": r["executors_private"],
            "executors_cuda_reserved": r.get("executors_cuda_reserved", []),
            "holder_cuda_reserved": r.get("holder_cuda_reserved", 0),
            "pss_sum": r["pss_sum"],
        }
        for r in reports
    ]
    return {
        "weights_bytes": sum(int(r["weights_bytes"]) for r in reports),
        "weights_devices": ",".join(sorted({str(r["device"]) for r in reports})),
        "holder_pids": ",".join(str(r["holder_pid"]) for r in reports if r["holder_pid"]),
        "executor_pids": ",".join(str(pid) for r in reports for pid in r["executor_pids"]),
        "executors_private_bytes": sum(sum(r["executors_private"]) for r in reports),
        "group_pss_bytes": sum(int(r["pss_sum"]) for r in reports),
        "weights": json.dumps(detail, separators=(",", ":")),
    }


# -- helpers ---------------------------------------------------------------------------------------------


def _process_memory(pid: int | None) -> dict[str, int] | None:
    """rss, pss, uss of a process; its pss split into anonymous, file-backed (shared libraries,
    memory-mapped checkpoints: shared with any process mapping them, and reclaimable) and shared
    memory; the part of its pss that is shared weights (`weights_pss`) and its private bytes other
    than weights (`private`). None if it is gone."""
    if pid is None:
        return None
    from ectrans.common.heartbeat import process_memory

    try:
        memory = process_memory(pid)
        weights = _weights_mapping(pid)
        rollup = _rollup(pid)
    except Exception:  # gone between listing and reading
        return None
    return memory | rollup | {"weights_pss": weights["pss"], "private": memory["uss"] - weights["private"]}


def _rollup(pid: int) -> dict[str, int]:
    wanted = {"Pss_Anon": "pss_anon", "Pss_File": "pss_file", "Pss_Shmem": "pss_shmem"}
    found = dict.fromkeys(wanted.values(), 0)
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            key, _, rest = line.partition(":")
            if key in wanted:
                found[wanted[key]] = int(rest.split()[0]) * 1024
    return found


def _weights_mapping(pid: int) -> dict[str, int]:
    """PSS and private bytes of a process's mappings of shared weight files (from smaps)."""
    totals = {"pss": 0, "private": 0}
    inside = False
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            if not line[0].isupper():  # a mapping's header line: "start-end perms offset dev inode path"
                inside = "memfd:ectrans-weights-" in line
            elif inside:
                key, _, rest = line.partition(":")
                if key == "Pss":
                    totals["pss"] += int(rest.split()[0]) * 1024
                elif key in ("Private_Clean", "Private_Dirty"):
                    totals["private"] += int(rest.split()[0]) * 1024
    return totals


def _backoff(failures: int) -> float:
    """Seconds to wait before a restart after `failures` recent failures: 0, 1, 2, 4, ... 30."""
    return 0.0 if failures <= 0 else min(MAX_BACKOFF_S, 2.0 ** (failures - 1))


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _token_counter(spec: ModelSpec) -> Callable[[Sequence[str]], list[int]]:
    """Token counts as the executors' tokenizer gives them (the worker packs batches with these)."""
    import transformers

    from ectrans.models.encoder import EncoderTokenizer

    tokenizer = transformers.AutoTokenizer.from_pretrained(spec.path, local_files_only=True)
    return EncoderTokenizer(tokenizer, spec.max_tokens).count_tokens


def _complete(batch: _Batch, message: dict[str, Any]) -> None:
    if batch.future.done():
        return
    if message.get("ev") == "failed":
        batch.future.set_exception(RuntimeError(str(message.get("error"))))
        return
    results = [ItemResult(output=_writable(output), error=error) for output, error in message["results"]]
    size, tokens, padded, service_ms, compute_ms = message["stats"]
    stats = BatchStats(int(size), int(tokens), int(padded), float(service_ms), float(compute_ms))
    batch.future.set_result((results, stats))


def _writable(value: Any) -> Any:
    """Arrays decoded from a frame are read-only views of it; give callers what an in-process
    executor gives."""
    return value.copy() if isinstance(value, np.ndarray) else value


def _fail(batch: _Batch, error: Exception) -> None:
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        batch.future.set_exception(error)
