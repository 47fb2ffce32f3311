"""The baselines a user would pick instead of ECTrans, each in its own process with its own model.

- per request: one process, one task at a time (tokenise, forward at batch 1, pool, to numpy);
- multitask: K such processes sharing one work list (the prototype's multiprocess baseline);
- plain loop: `transformers` at a fixed batch size with inputs tokenised and padded beforehand,
  optionally sorted by length as sentence-transformers' `encode` does; no queueing at all.

All use the model ECTrans serves (`AutoModel` plus the directory's pooling and normalisation), so
the outputs are the same embeddings. A process runs commands its parent sends over a pipe; K
processes share a counter, so whichever is free takes the next input.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

START_DELAY_S = 0.2  # K processes start together this long after the command is sent


@dataclass(frozen=True)
class Timing:
    """One run: when it started and ended (system-wide monotonic seconds) and how much it did."""

    started: float
    ended: float
    items: int
    padded_tokens: int = 0

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass(frozen=True)
class ModelConfig:
    """What a baseline process loads: a model directory, its token limit, a device, torch threads."""

    model_dir: str
    max_tokens: int
    device: str
    threads: int


class _Model:
    """Tokenizer, model and pooling, loaded in the child process."""

    def __init__(self, config: ModelConfig) -> None:
        import torch
        import transformers

        from ectrans.models.encoder import read_pooling, token_limit
        from ectrans.models.results import to_python

        torch.set_num_threads(config.threads)
        transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        self.torch = torch
        self.to_python = to_python
        self.device = torch.device(config.device)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(config.model_dir, local_files_only=True)
        self.max_tokens = token_limit(self.tokenizer, config.max_tokens)
        self.model = transformers.AutoModel.from_pretrained(config.model_dir, local_files_only=True)
        self.model.eval().requires_grad_(False).to(self.device)
        self.pooling = read_pooling(Path(config.model_dir))
        with torch.inference_mode():  # warm-up: first-call allocations and kernel choices
            self.encode(self.tokenize(["a warm-up sentence for the model"]))
            self.encode(self.tokenize(["a warm-up sentence for the model, a little longer"] * 8))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def encode(self, batch: dict[str, Any]) -> list[Any]:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        hidden = self.model(**batch).last_hidden_state
        return self.to_python(list(self.pooling(hidden, batch["attention_mask"])))

    def tokenize(self, texts: list[str], padding: bool = True) -> dict[str, Any]:
        return dict(
            self.tokenizer(texts, padding=padding, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        )

    def per_request(self, texts: Sequence[str], counter: Synchronized[int] | None, start_at: float) -> Timing:
        """Tasks one at a time; with a shared counter, only the inputs this process claims."""
        done = 0
        _sleep_until(start_at)
        started = time.monotonic()
        with self.torch.inference_mode():
            while True:
                index = _claim(counter, done)
                if index >= len(texts):
                    break
                self.encode(self.tokenize([texts[index]]))
                done += 1
        self._sync()
        return Timing(started, time.monotonic(), done)

    def batched(self, texts: Sequence[str], batch_size: int, sort: bool) -> Timing:
        """The plain loop: batches built (tokenised, sorted, padded) before the clock starts."""
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_tokens)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: len(ids[i])) if sort else list(range(len(texts)))
        batches, padded = [], 0
        for start in range(0, len(order), batch_size):
            chunk = [{"input_ids": ids[i]} for i in order[start : start + batch_size]]
            batch = dict(self.tokenizer.pad(chunk, return_tensors="pt"))
            batches.append(batch)
            padded += int(batch["input_ids"].numel())
        with self.torch.inference_mode():
            self.encode(batches[0])  # warm-up at this shape
            self._sync()
            started = time.monotonic()
            for batch in batches:
                self.encode(batch)
            self._sync()
        return Timing(started, time.monotonic(), len(texts), padded)

    def realtime(self, texts: Sequence[str], arrivals: Sequence[float], start_at: float) -> list[float]:
        """Arrivals served one at a time in order: latency (ms) from each arrival to its result."""
        latencies = []
        with self.torch.inference_mode():
            for text, at in zip(texts, arrivals, strict=True):
                _sleep_until(start_at + at)
                self.encode(self.tokenize([text]))
                self._sync()
                latencies.append((time.monotonic() - (start_at + at)) * 1000)
        return latencies


def _sleep_until(at: float) -> None:
    delay = at - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _claim(counter: Synchronized[int] | None, done: int) -> int:
    if counter is None:
        return done
    with counter.get_lock():
        index = int(counter.value)
        counter.value += 1
    return index


def _child_main(conn: Connection, counter: Synchronized[int], config: ModelConfig) -> None:
    """Serve the parent's commands until `stop` (or the pipe closes)."""
    from ectrans.common.heartbeat import process_memory

    model = _Model(config)
    conn.send(("ready", os.getpid()))
    texts: list[str] = []
    while True:
        try:
            command, args = conn.recv()
        except EOFError:
            return
        try:
            if command == "texts":
                texts = list(args)
                reply: Any = len(texts)
            elif command == "per_request":
                reply = model.per_request(texts, counter if args["shared"] else None, args["start_at"])
            elif command == "batched":
                reply = model.batched(texts, args["batch_size"], args["sort"])
            elif command == "realtime":
                reply = model.realtime(args["texts"], args["arrivals"], args["start_at"])
            elif command == "memory":
                reply = {"pss": process_memory()["pss"]}
                if model.device.type == "cuda":
                    reply["gpu_reserved"] = model.torch.cuda.memory_reserved(model.device)
            elif command == "stop":
                conn.send(("ok", None))
                return
            else:
                raise ValueError(f"unknown command {command!r}")
            conn.send(("ok", reply))
        except Exception as exc:  # report to the parent instead of dying silently
            conn.send(("error", repr(exc)))


class ModelProcesses:
    """K processes, each with its own copy of the model and `threads` torch threads."""

    def __init__(self, k: int, config: ModelConfig) -> None:
        context = mp.get_context("spawn")
        self.counter: Synchronized[int] = context.Value("l", 0)
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        self.config = config
        for _ in range(k):
            parent, child = context.Pipe()
            proc = context.Process(target=_child_main, args=(child, self.counter, config), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        self.pids = [self._recv(conn, proc) for conn, proc in zip(self.conns, self.procs, strict=True)]

    @staticmethod
    def _recv(conn: Connection, proc: Any, timeout_s: float = 900) -> Any:
        deadline = time.monotonic() + timeout_s
        while not conn.poll(0.5):
            if not proc.is_alive():
                raise RuntimeError(f"a baseline process exited with code {proc.exitcode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"a baseline process did not answer within {timeout_s:.0f}s")
        status, payload = conn.recv()
        if status == "error":
            raise RuntimeError(f"baseline process failed: {payload}")
        return payload

    def call_all(self, command: str, args: Any = None, processes: int | None = None) -> list[Any]:
        """Send a command to the first `processes` processes (default all) and collect the answers."""
        chosen = list(zip(self.conns, self.procs, strict=True))[:processes]
        for conn, _ in chosen:
            conn.send((command, args))
        return [self._recv(conn, proc) for conn, proc in chosen]

    def call_one(self, command: str, args: Any = None) -> Any:
        self.conns[0].send((command, args))
        return self._recv(self.conns[0], self.procs[0])

    def set_texts(self, texts: Sequence[str]) -> None:
        self.call_all("texts", list(texts))

    def per_request(self, processes: int | None = None) -> tuple[float, int]:
        """The first `processes` (default all) share the work list, one task at a time each;
        returns (seconds from the first start to the last end, items done)."""
        self.counter.value = 0
        start_at = time.monotonic() + START_DELAY_S
        shared = (processes or len(self.conns)) > 1
        timings: list[Timing] = self.call_all("per_request", {"shared": shared, "start_at": start_at}, processes)
        return max(t.ended for t in timings) - min(t.started for t in timings), sum(t.items for t in timings)

    def batched(self, batch_size: int, sort: bool) -> Timing:
        timing: Timing = self.call_one("batched", {"batch_size": batch_size, "sort": sort})
        return timing

    def realtime(self, texts: Sequence[str], arrivals: Sequence[float]) -> list[float]:
        start_at = time.monotonic() + START_DELAY_S
        latencies: list[float] = self.call_one(
            "realtime", {"texts": list(texts), "arrivals": list(arrivals), "start_at": start_at}
        )
        return latencies

    def memory(self) -> list[Any]:
        return self.call_all("memory")

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):  # a process that already died
                conn.send(("stop", None))
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()

    def __enter__(self) -> ModelProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
