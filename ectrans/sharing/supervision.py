"""Supervision of a pool's processes: the weight holder, the zygote and the executor processes.

Why one module of this length: the supervisor thread, the executor processes' reader threads and
the start and stop paths all move the same slots between states under the pool's lock; split
apart, each part would reach into the others' state.

The holder starts first and outlives the executors; a supervisor thread reacts to their exits.
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

Each executor process has a reader thread (its reports) and a writer thread (its commands); the
slots, the router and the flags here are read and changed under the pool's lock (`changed`).
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ectrans.common.codec import CodecError, packb
from ectrans.common.registry import ModelSpec
from ectrans.sharing.executor_process import EXIT_HOLDER_LOST
from ectrans.sharing.holder import HolderError, HolderProcess, describe_exit
from ectrans.sharing.ipc import ChannelClosed, decode, read_frame, write_frame
from ectrans.sharing.manifest import spec_to_wire
from ectrans.sharing.routing import Router, complete, fail
from ectrans.sharing.slots import Batch, Slot
from ectrans.sharing.zygote import ChildProcess, ExecSpawner, Spawner, SpawnError, Zygote

logger = logging.getLogger(__name__)

EXIT_STATUS_WAIT_S = 2.0
CRASH_WINDOW_S = 60.0
MAX_BACKOFF_S = 30.0


class PoolError(RuntimeError):
    """The pool could not start, or can no longer serve; the message says why."""


class ExecutorProcessDied(RuntimeError):
    """A batch was running in executor processes that died with it too many times."""


class Supervisor:
    """Starts, watches, restarts and stops one pool's processes; see the module docstring.
    `args` are the executor processes' start arguments; `on_tick` runs on the supervisor thread
    about once a second."""

    def __init__(
        self,
        spec: ModelSpec,
        processes: int,
        *,
        device: str,
        share: bool,
        fork_server: bool,
        args: dict[str, Any],
        run_dir: Path,
        max_attempts: int,
        unavailable_timeout_s: float,
        log_level: str,
        log_format: str,
        changed: threading.Condition,
        router: Router,
        on_tick: Callable[[], None],
    ) -> None:
        self.spec = spec
        self.device = device
        self.share = share
        self.args = args
        self.max_attempts = max_attempts
        self.unavailable_timeout_s = unavailable_timeout_s
        self.changed = changed
        self.router = router
        self.slots = [Slot(i) for i in range(processes)]
        self.closing = False
        self.stopped = False
        self.holder: HolderProcess | None = None
        self.holder_info: dict[str, Any] = {}
        self.spawner: Spawner | None = None
        self.restarts = {"executor": 0, "holder": 0}
        self._run_dir = run_dir
        self._fork_server = fork_server
        self._log_level = log_level
        self._log_format = log_format
        self._on_tick = on_tick
        self._events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._holder_generation = 0
        self._holder_failures = 0
        self._holder_restart_at = 0.0
        self._reattach: deque[Slot] = deque()
        self._ready_since: float | None = None
        self._unready_since = time.monotonic()
        self._thread = threading.Thread(target=self._supervise, name=f"ectrans-pool-{spec.name}", daemon=True)

    # -- start and stop --------------------------------------------------------------------------

    def start(self, timeout: float) -> None:
        """Start the holder, the zygote and every executor process; return once all are ready."""
        deadline = time.monotonic() + timeout
        if self.share:
            self._start_holder()
        self.spawner = self._start_zygote() if self._fork_server else ExecSpawner()
        if self.holder is not None:
            try:
                self.holder_info = self.holder.wait_ready(max(1.0, deadline - time.monotonic())).raw
            except HolderError as exc:
                raise PoolError(f"cannot serve {self.spec.name!r}: {exc}") from exc
        if isinstance(self.spawner, Zygote):
            self.spawner.wait_ready(max(1.0, deadline - time.monotonic()))
        with self.changed:
            for slot in self.slots:
                self.spawn_locked(slot)
        self._thread.start()
        with self.changed:
            started = self.changed.wait_for(
                lambda: all(s.state == "ready" for s in self.slots) or any(s.error for s in self.slots),
                max(1.0, deadline - time.monotonic()),
            )
            failed = [s.error for s in self.slots if s.error]
            if failed or not started:
                raise PoolError(f"executor processes for {self.spec.name!r} did not start: {failed or 'timed out'}")

    def _start_holder(self) -> None:
        self._holder_generation += 1
        if self._holder_generation > 1:
            self.restarts["holder"] += 1
        self.holder = HolderProcess(
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

    def shutdown(self) -> None:
        """Stop everything this supervisor started (idempotent)."""
        with self.changed:
            if self.stopped:
                return
            self.closing = True
            for slot in self.slots:
                if slot.child is not None:
                    slot.state = "closing"
                    slot.outbox.put({"op": "close"})
            self.changed.wait_for(lambda: all(s.child is None for s in self.slots), 30.0)
            self.stopped = True
            leftovers = [s.child for s in self.slots if s.child is not None]
        for child in leftovers:
            child.kill()
        self._events.put(("stop",))
        if self._thread.is_alive():
            self._thread.join(30.0)
        if self.holder is not None:
            self.holder.stop()
        if self.spawner is not None:
            self.spawner.stop()
        shutil.rmtree(self._run_dir, ignore_errors=True)

    def settled_locked(self, replaced: int | None) -> bool:
        """Whether the holder is up and every executor process is ready and attached to it, and
        process `replaced`, if given, is no longer one of them."""
        holder = self.holder
        if self.share and (holder is None or holder.info is None):
            return False
        if replaced is not None and any(s.child is not None and s.child.pid == replaced for s in self.slots):
            return False
        current = self._holder_generation if self.share else 0
        return all(s.state == "ready" and (not self.share or s.holder_generation == current) for s in self.slots)

    # -- executor processes -----------------------------------------------------------------------

    def spawn_locked(self, slot: Slot) -> None:
        assert self.spawner is not None
        if slot.child is not None:  # never leave a process behind unsupervised
            return
        holder = self.holder
        args = self.args | {"slot": slot.index, "socket": holder.socket_path.as_posix() if holder else ""}
        try:
            child = self.spawner.spawn(args)
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

    def _read(self, slot: Slot, child: ChildProcess, generation: int) -> None:
        try:
            while (payload := read_frame(child.report_fd)) is not None:
                self._on_message(slot, generation, decode(payload))
        except (ChannelClosed, OSError, CodecError) as exc:
            logger.warning("[pool] executor %d of %s: broken report stream (%s)", slot.index, self.spec.name, exc)
        self._events.put(("child_eof", slot, generation))

    def _on_message(self, slot: Slot, generation: int, message: dict[str, Any]) -> None:
        event = message.get("ev")
        done: tuple[Batch, dict[str, Any]] | None = None
        with self.changed:
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
                self.changed.notify_all()
            elif event in ("result", "failed") and slot.holder_kill:
                pass  # its holder died: the batch reruns on a replacement once this process is gone
            elif event in ("result", "failed"):
                if "cuda" in message:
                    slot.info["cuda_allocated"], slot.info["cuda_reserved"] = message["cuda"]
                batch = slot.inflight.pop(int(message["id"]), None)
                if batch is not None:
                    slot.served += 1
                    done = (batch, message)
                self.changed.notify_all()
            elif event == "error":
                slot.error = str(message.get("message"))
                logger.error("[pool] executor %d of %s: %s", slot.index, self.spec.name, slot.error)
                self.changed.notify_all()
            self.router.dispatch(self.slots)
        if done is not None:
            complete(*done)

    # -- the supervisor thread ----------------------------------------------------------------------

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

    def _on_child_exit(self, slot: Slot, generation: int) -> None:
        with self.changed:
            if slot.generation != generation or slot.child is None:
                return
            child = slot.child
        code = child.wait(EXIT_STATUS_WAIT_S)
        if code is None:  # closed its report pipe but lives on: it must not keep running batches
            child.kill()
            code = child.wait(EXIT_STATUS_WAIT_S)
        child.close()
        failed: list[Batch] = []
        with self.changed:
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
            self.router.requeue([b for b in lost if b not in failed])
            if slot in self._reattach:
                self._reattach.remove(slot)
            now = time.monotonic()
            if not holder_caused and was != "closing":
                slot.deaths.append(now)
            while slot.deaths and slot.deaths[0] < now - CRASH_WINDOW_S:
                slot.deaths.popleft()
            slot.restart_at = now + backoff(len(slot.deaths) - 1)
            self._note_readiness_locked()
            self.changed.notify_all()
            self.router.dispatch(self.slots)
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
            fail(
                batch,
                ExecutorProcessDied(
                    f"executor processes of {self.spec.name!r} died {batch.attempts} times while running this batch "
                    f"(last: pid {child.pid}, {describe_exit(code)}); not retried"
                ),
            )

    def _on_holder_exit(self, holder: HolderProcess, code: int | None) -> None:
        if holder is not self.holder or self.stopped:
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
        self._holder_restart_at = time.monotonic() + backoff(self._holder_failures)
        self.holder = None
        if self.device.startswith("cuda"):
            with self.changed:  # the weights may be gone: nothing more runs on them
                for slot in self.slots:
                    if slot.child is not None and slot.state != "closing":
                        slot.state = "attaching"
                        slot.holder_kill = True
                        slot.child.kill()

    def _on_holder_ready(self, holder: HolderProcess) -> None:
        if holder is not self.holder:
            return
        assert holder.info is not None
        self.holder_info = holder.info.raw
        with self.changed:
            stale = [
                s
                for s in self.slots
                if s.child is not None and s.state != "closing" and s.pending_generation != self._holder_generation
            ]
            if stale:
                logger.info("[pool] holder of %s is back (pid %d); executors reattach", self.spec.name, holder.pid)
            self._reattach.extend(stale)
            self._next_reattach_locked()
            self.changed.notify_all()

    def _next_reattach_locked(self) -> None:
        """Reattach executors to the current holder one at a time, so the others keep serving."""
        if any(s.state == "attaching" and s.child is not None and not s.holder_kill for s in self.slots):
            return
        holder = self.holder
        while self._reattach and holder is not None and holder.info is not None:
            slot = self._reattach.popleft()
            if slot.child is None or slot.pending_generation == self._holder_generation:
                continue
            slot.state = "attaching"
            slot.pending_generation = self._holder_generation
            slot.outbox.put({"op": "attach", "socket": holder.socket_path.as_posix()})
            return

    def _on_zygote_exit(self, zygote: Zygote) -> None:
        if zygote is not self.spawner or self.stopped:
            return
        logger.error("[pool] zygote of %s is gone (%s); starting another", self.spec.name, zygote.error)
        self.spawner = self._start_zygote()

    def _on_timers(self) -> None:
        now = time.monotonic()
        if self.share and self.holder is None and not self.stopped and now >= self._holder_restart_at:
            self._start_holder()
        holder_ready = not self.share or (self.holder is not None and self.holder.info is not None)
        spawner_ready = not isinstance(self.spawner, Zygote) or self.spawner.ready
        expired: list[Batch] = []
        with self.changed:
            for slot in self.slots:
                wanted = not self.closing or self.router.pending(self.slots)
                down = slot.child is None and slot.state == "down"
                if down and wanted and holder_ready and spawner_ready and now >= slot.restart_at:
                    self.restarts["executor"] += 1
                    self.spawn_locked(slot)
            self._note_readiness_locked()
            if self._ready_since is None and now - self._unready_since > self.unavailable_timeout_s:
                expired = self.router.take_waiting()
                self.changed.notify_all()
        for batch in expired:
            fail(
                batch,
                PoolError(
                    f"no executor process of {self.spec.name!r} has been ready for "
                    f"{self.unavailable_timeout_s:.0f}s (holder: {self._holder_state()})"
                ),
            )
        self._on_tick()

    def _note_readiness_locked(self) -> None:
        if any(s.state == "ready" for s in self.slots):
            self._ready_since = self._ready_since or time.monotonic()
        elif self._ready_since is not None:
            self._ready_since = None
            self._unready_since = time.monotonic()

    def _holder_state(self) -> str:
        holder = self.holder
        if not self.share:
            return "none (private weights)"
        if holder is None:
            return f"restarting after {self._holder_failures} failed starts"
        return "ready" if holder.info is not None else (holder.error or "loading")


def backoff(failures: int) -> float:
    """Seconds to wait before a restart after `failures` recent failures: 0, 1, 2, 4, ... 30."""
    return 0.0 if failures <= 0 else min(MAX_BACKOFF_S, 2.0 ** (failures - 1))
