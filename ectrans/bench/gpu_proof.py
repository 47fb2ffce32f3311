"""Everything CUDA in one call: `make gpu-proof` (`python -m ectrans.bench.gpu_proof`).

On a host with one CUDA GPU and no network (within about 8 minutes on an H100) it runs, in order,
each step in its own process under a time limit, and writes `docs/bench/gpu-proof.json` and `.md`
(device, driver, torch, commit, every figure; the scenarios' own reports go to `docs/bench/gpu/`):

1. `pytest -m cuda`: the CUDA tests (weight sharing through CUDA IPC, NVML readings).
2. NVML as the monitor reads it against `nvidia-smi --query-compute-apps`, on a shared pool.
3. `ectrans bench memory` at its GPU size: K = 1, 2, 4 sharing one copy vs K independent copies,
   device memory split into contexts, weights and the executors' allocators.
4. `ectrans bench baselines --quick` and 5. `ectrans bench mixed --quick` on the GPU.
6. `ectrans bench serve --quick`, where this version has that scenario.

`--dry` (`make gpu-proof DRY=1`) runs every step at its smallest size on the CPU, skips the
CUDA-only steps with the reason, and writes to a temporary folder (or `--out`), never to docs/.
A step that fails or runs out of time is recorded as such; the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ectrans.bench import SCENARIOS
from ectrans.bench.harness import REPO_ROOT, markdown_table, note

BUDGET_S = 480.0  # the whole proof, on an H100
RESERVE_S = 10.0  # kept back for writing the report
MiB = 2**20


@dataclass
class Step:
    name: str
    what: str
    timeout_s: float
    cuda_only: bool = False
    result: dict[str, Any] = field(default_factory=dict)


@dataclass
class Proof:
    dry: bool
    out: Path
    bench_dir: Path
    deadline: float
    steps: list[Step] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        env = {**os.environ, "ECTRANS_BENCH_DIR": str(self.bench_dir), "HF_HUB_OFFLINE": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), str(REPO_ROOT)) if p)
        if self.dry:
            env |= {"ECTRANS_BENCH_SIZE": "tiny", "CUDA_VISIBLE_DEVICES": ""}
        return env

    def limit(self, step: Step) -> float:
        return max(1.0, min(step.timeout_s, self.deadline - time.monotonic() - RESERVE_S))


# 1. Running one step -------------------------------------------------------------------------------------


def run_command(proof: Proof, step: Step, command: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `command` under the step's time limit: exit code, seconds, stdout, the tail of stderr."""
    limit = proof.limit(step)
    started = time.monotonic()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or proof.env(), cwd=REPO_ROOT
    )
    try:
        stdout, stderr = process.communicate(timeout=limit)
        timed_out = False
    except subprocess.TimeoutExpired:
        process.terminate()  # benchmarks stop what they started on SIGTERM
        try:
            stdout, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        timed_out = True
    return {
        "command": " ".join(command),
        "exit_code": process.returncode,
        "timed_out": timed_out,
        "limit_s": round(limit, 1),
        "seconds": round(time.monotonic() - started, 1),
        "stdout": stdout,
        "stderr_tail": stderr[-3000:],
    }


def bench(proof: Proof, step: Step, scenario: str, *, quick: bool = True, size: str | None = None) -> dict[str, Any]:
    """`ectrans bench <scenario>`: its JSON figures, or why there are none."""
    if scenario not in SCENARIOS:
        return {"status": "skipped", "reason": f"`ectrans bench {scenario}` does not exist in this version"}
    command = [sys.executable, "-m", "ectrans.cli", "bench", scenario, "--compact"] + (["--quick"] if quick else [])
    env = proof.env()
    if size is not None and not proof.dry:
        env["ECTRANS_BENCH_SIZE"] = size
    ran = run_command(proof, step, command, env)
    figures: dict[str, Any] | None = None
    with contextlib.suppress(ValueError):
        figures = json.loads(ran["stdout"]) if ran["stdout"].strip() else None
    status = "ok" if ran["exit_code"] == 0 and figures is not None else ("timed out" if ran["timed_out"] else "failed")
    return {"status": status, **{k: v for k, v in ran.items() if k != "stdout"}, "figures": figures}


# 2. The steps --------------------------------------------------------------------------------------------


def step_pytest(proof: Proof, step: Step) -> dict[str, Any]:
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-s", "-p", "no:cacheprovider", "tests"]
    ran = run_command(proof, step, command)
    summary = next((line for line in reversed(ran["stdout"].splitlines()) if " in " in line), "")
    printed = []
    for line in ran["stdout"].splitlines():
        with contextlib.suppress(ValueError):
            value = json.loads(line.strip().lstrip("."))
            if isinstance(value, dict):
                printed.append(value)
    status = "ok" if ran["exit_code"] == 0 else ("timed out" if ran["timed_out"] else "failed")
    return {
        "status": status,
        "summary": summary,
        "figures": printed,
        **{k: v for k, v in ran.items() if k != "stdout"},
        "stdout_tail": ran["stdout"][-4000:],
    }


def step_nvml(proof: Proof, step: Step) -> dict[str, Any]:
    """A shared pool of K = 2 on the GPU; NVML's per-process figures as the monitor reads them,
    nvidia-smi's for the same processes, and what the monitor attributes to the worker."""
    ran = run_command(proof, step, [sys.executable, "-m", "ectrans.bench.gpu_proof", "--nvml-probe"])
    figures = None
    with contextlib.suppress(ValueError):
        figures = json.loads(ran["stdout"]) if ran["stdout"].strip() else None
    status = "ok" if ran["exit_code"] == 0 and figures is not None else ("timed out" if ran["timed_out"] else "failed")
    return {"status": status, **{k: v for k, v in ran.items() if k != "stdout"}, "figures": figures}


def nvml_probe() -> dict[str, Any]:
    """Run in its own process (`--nvml-probe`), so that only the pool's processes hold the GPU."""
    from ectrans.bench.harness import minilm_path
    from ectrans.common.registry import build_spec
    from ectrans.models.api import Request
    from ectrans.services.monitor.collect import Nvml, nvml_pids_are_ours
    from ectrans.services.monitor.instances import InstanceState
    from ectrans.services.monitor.report import Snapshot, gpu_by_pid
    from ectrans.services.monitor.stats import Totals, Window
    from ectrans.sharing.memory import memory_fields
    from ectrans.sharing.process_pool import SharedExecutorPool

    spec = build_spec("minilm", {"path": str(minilm_path())})
    with contextlib.closing(SharedExecutorPool(spec, 2, device="cuda")) as pool:
        for future in [pool.submit(Request("embed", ["hello world"] * 16)) for _ in range(8)]:
            future.result(timeout=120)
        report = pool.measure_memory()
        nvml = Nvml()
        try:
            devices = nvml.devices()
        finally:
            nvml.close()
        smi = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        by_smi = {}
        for line in smi.stdout.splitlines():
            pid, _, used = line.partition(",")
            with contextlib.suppress(ValueError):
                by_smi[int(pid)] = int(used.strip()) * MiB
        by_nvml = {pid: used for dev in devices for pid, used in dev.processes.items()}
        fields = {k: str(v) for k, v in memory_fields([report]).items()}
        worker = InstanceState("worker", "proof", "here", os.getpid(), 0.0, 0.0, fields=fields)
        snap = Snapshot(time.time(), 1.0, "proof", Window(), Totals(), {}, 0, [worker], devices)
        attributed = gpu_by_pid(snap, "here").get(os.getpid(), 0)
        group = [p for p in [report["holder_pid"], *report["executor_pids"]] if p]
        return {
            "pool_pids": group,
            "nvml_pids_are_ours": nvml_pids_are_ours(),
            "nvml_per_process": {str(p): by_nvml.get(p) for p in group},
            "nvidia_smi_per_process": {str(p): by_smi.get(p) for p in group},
            "nvidia_smi_error": smi.stderr.strip()[-500:] or None,
            "nvml_all_pids": sorted(by_nvml),
            "nvidia_smi_all_pids": sorted(by_smi),
            "monitor_attributed_to_worker": attributed,
            "allocator_reserved": {
                "holder": report.get("holder_cuda_reserved"),
                "executors": report.get("executors_cuda_reserved"),
            },
            "device_used": {dev.device: dev.used_bytes for dev in devices},
            "weights_bytes": report["weights_bytes"],
        }


STEPS: list[tuple[str, str, float, bool, Callable[[Proof, Step], dict[str, Any]]]] = [
    ("pytest_cuda", "pytest -m cuda tests", 150.0, True, step_pytest),
    ("nvml_vs_nvidia_smi", "the monitor's NVML figures vs nvidia-smi --query-compute-apps", 60.0, True, step_nvml),
    (
        "memory",
        "ectrans bench memory (GPU size: K = 1, 2, 4)",
        150.0,
        False,
        lambda p, s: bench(p, s, "memory", size="gpu"),
    ),
    ("baselines", "ectrans bench baselines --quick", 120.0, False, lambda p, s: bench(p, s, "baselines")),
    ("mixed", "ectrans bench mixed --quick", 120.0, False, lambda p, s: bench(p, s, "mixed")),
    ("serve", "ectrans bench serve --quick", 90.0, False, lambda p, s: bench(p, s, "serve")),
]


# 3. Headline figures and the report -----------------------------------------------------------------------


def headlines(steps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The figures the GPU targets are about, picked out of each step's JSON (None where absent)."""
    found: dict[str, Any] = {}
    baselines = (steps.get("baselines") or {}).get("figures") or {}
    for key in ("throughput_ratio_vs_per_request", "ratio_of_upper_bound", "throughput_ratio_vs_multitask"):
        found[f"baselines.{key}"] = baselines.get(key)
    mixed = (steps.get("mixed") or {}).get("figures") or {}
    for key in ("realtime_p99_idle_ms", "realtime_p99_loaded_ms", "batch_throughput_ratio", "deadline_miss_rate"):
        if key in mixed:
            found[f"mixed.{key}"] = mixed[key]
    memory = (steps.get("memory") or {}).get("figures") or {}
    for model, dtypes in (memory.get("saving_vs_independent") or {}).items():
        for dtype, by_k in dtypes.items():
            for k, saving in by_k.items():
                found[f"memory.{model}.{dtype}.saving_k{k}"] = saving
    for model, figures in (memory.get("models") or {}).items():
        for dtype, per in figures.items():
            if not isinstance(per, dict) or "k" not in per:
                continue
            for k, row in per["k"].items():
                split = ((row.get("shared") or {}).get("served") or {}).get("device_split")
                if split:
                    found[f"memory.{model}.{dtype}.k{k}.split_mib"] = {
                        name: round(value / MiB, 1) for name, value in split.items() if name != "processes"
                    }
    nvml = (steps.get("nvml_vs_nvidia_smi") or {}).get("figures") or {}
    if nvml:
        found["nvml.per_process"] = nvml.get("nvml_per_process")
        found["nvml.nvidia_smi"] = nvml.get("nvidia_smi_per_process")
    return found


def machine(dry: bool) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "commit": _commit(),
        "dry": dry,
    }
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            info["device"] = _text(pynvml.nvmlDeviceGetName(handle))
            info["driver"] = _text(pynvml.nvmlSystemGetDriverVersion())
            info["device_memory_bytes"] = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # no driver: the dry run on a CPU host
        info["device"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        info["driver"] = f"none ({type(exc).__name__})"
    return info


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _commit() -> str:
    try:
        found = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, cwd=REPO_ROOT, check=False
        )
        return found.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(result: dict[str, Any]) -> str:
    info = result["machine"]
    rows = [
        [name, step.get("status"), step.get("seconds"), step.get("reason") or step.get("summary") or ""]
        for name, step in result["steps"].items()
    ]
    lines = [
        "# GPU proof" + (" (dry run on CPU)" if result["machine"]["dry"] else ""),
        "",
        f"`{result['command']}` on {info['device']} (driver {info['driver']}), torch {info['torch']} "
        f"(CUDA {info['torch_cuda']}), Python {info['python']}, commit {info['commit']}, {info['date']}; "
        f"{result['seconds']:.0f} s in all.",
        "",
        markdown_table(["step", "status", "seconds", "note"], rows),
        "",
        "## Headline figures",
        "",
        markdown_table(["figure", "value"], [[k, json.dumps(v)] for k, v in result["headlines"].items()]),
        "",
        "Every figure is in `gpu-proof.json`; each scenario's own report is in the bench folder "
        f"(`{result['bench_dir']}`).",
        "",
    ]
    return "\n".join(lines)


# 4. Main --------------------------------------------------------------------------------------------------


def run(dry: bool, out: Path | None, budget_s: float = BUDGET_S, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    started = time.monotonic()
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="ectrans-gpu-proof-dry-")) if dry else REPO_ROOT / "docs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    bench_dir = out / ("bench" if dry else "gpu")
    bench_dir.mkdir(parents=True, exist_ok=True)
    proof = Proof(dry, out, bench_dir, started + budget_s)
    gpu = not dry and _has_cuda()
    result: dict[str, Any] = {
        "command": "make gpu-proof" + (" DRY=1" if dry else ""),
        "machine": machine(dry),
        "steps": {},
    }
    for name, what, timeout_s, cuda_only, action in STEPS:
        step = Step(name, what, timeout_s, cuda_only)
        if name in skip:
            step.result = {"status": "skipped", "reason": "left out by --skip"}
        elif cuda_only and not gpu:
            reason = "dry run: needs a CUDA GPU" if dry else "no CUDA GPU on this host"
            step.result = {"status": "skipped", "reason": reason}
        elif proof.deadline - time.monotonic() < RESERVE_S + 5:
            step.result = {"status": "skipped", "reason": f"out of the {budget_s:.0f} s budget"}
        else:
            note(f"{name}: {what}")
            step.result = action(proof, step)
        note(f"{name}: {step.result.get('status')} {step.result.get('reason', '')}".rstrip())
        result["steps"][name] = {"what": what, **step.result}
    result["headlines"] = headlines(result["steps"])
    result["seconds"] = round(time.monotonic() - started, 1)
    result["bench_dir"] = os.path.relpath(bench_dir, REPO_ROOT) if not dry else str(bench_dir)
    result["out"] = str(out)
    result["ok"] = all(s.get("status") in ("ok", "skipped") for s in result["steps"].values())
    (out / "gpu-proof.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "gpu-proof.md").write_text(markdown(result))
    return result


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ectrans.bench.gpu_proof", description=__doc__.split("\n")[0])
    parser.add_argument("--dry", action="store_true", help="every step at its smallest size on the CPU")
    parser.add_argument("--out", type=Path, help="report folder (default: docs/bench; a temp folder when dry)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="time for all steps together")
    parser.add_argument(
        "--skip", default="", help=f"steps to leave out, comma-separated: {', '.join(n for n, *_ in STEPS)}"
    )
    parser.add_argument("--nvml-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.nvml_probe:
        print(json.dumps(nvml_probe()))
        return 0
    if not args.dry and not _has_cuda():
        print("no CUDA GPU here: `make gpu-proof DRY=1` runs the proof's steps on the CPU", file=sys.stderr)
        return 2
    if args.out is not None and args.dry and args.out.resolve() == (REPO_ROOT / "docs" / "bench").resolve():
        print("a dry run does not write to docs/bench", file=sys.stderr)
        return 2
    skip = frozenset(name for name in args.skip.split(",") if name)
    if unknown := skip - {name for name, *_ in STEPS}:
        print(f"unknown steps in --skip: {sorted(unknown)}", file=sys.stderr)
        return 2
    result = run(args.dry, args.out, args.budget_s, skip)
    note(f"{'all steps ok or skipped' if result['ok'] else 'a step FAILED'}: see {result['out']}/gpu-proof.md")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
