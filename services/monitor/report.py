"""One interval's figures: the snapshot, its report (JSON lines, `ectrans:stats`) and the log line.

The report is nested — `{section: {entity: {figure: value}}}` plus top-level node figures — and the
stats hash is the same report flattened to `section.entity.figure` fields, so redis-cli users, log
shippers and `ectrans top` all read the same numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ectrans.services.monitor.collect import DeviceState, StreamState, nvml_pids_are_ours
from ectrans.services.monitor.hosts import host_figures, hosts_live
from ectrans.services.monitor.instances import LIVE, InstanceState
from ectrans.services.monitor.stats import ClassTotals, ClassWindow, Totals, Window, percentile

MiB = 1024 * 1024
GiB = 1024 * MiB
SECTIONS = ("classes", "streams", "instances", "devices", "hosts")
CLASS_ABBREVIATIONS = {"realtime": "rt", "batch": "batch", "none": "rejected"}

Report = dict[str, Any]


@dataclass
class Snapshot:
    """What the monitor knows at the end of one interval."""

    at: float  # wall-clock time
    elapsed_s: float
    monitor: str
    window: Window
    totals: Totals
    streams: dict[str, StreamState]
    dead_letters: int  # entries in the dead-letter stream
    instances: list[InstanceState]
    devices: list[DeviceState]
    warnings: list[str] = field(default_factory=list)

    def rate(self, count: float) -> float:
        return count / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def live(self, service: str) -> list[InstanceState]:
        return [i for i in self.instances if i.service == service and i.state == LIVE]

    def private_bytes(self) -> int:
        """Memory that belongs to one process alone (USS), summed over the live processes."""
        by_process = {(i.host, i.pid): i.memory.get("uss", 0) for i in self.instances if i.state == LIVE}
        return sum(by_process.values())


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def class_figures(snap: Snapshot, w: ClassWindow, t: ClassTotals) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "tasks": w.tasks,
        "tasks_per_s": _round(snap.rate(w.tasks), 2),
        "tokens_per_s": _round(snap.rate(w.tokens), 1),
        "errors": sum(w.errors.values()),
        "deadline_misses": w.deadline_misses,
    }
    figures |= {f"error_{reason}": count for reason, count in sorted(w.errors.items())}
    for name, values in (("latency", w.latencies_ms), ("queue", w.queue_ms), ("service", w.service_ms)):
        for q in (50, 95, 99):
            figures[f"{name}_p{q}_ms"] = _round(percentile(values, q))
    figures |= {
        "batches": w.batches,
        "batch_mean": _round(w.mean_batch, 2),
        "batch_max": max(w.batch_sizes, default=None),
        "padding_waste": _round(w.padding_waste, 3),
        "tasks_total": t.tasks,
        "ok_total": t.ok,
        "errors_total": sum(t.errors.values()),
        "deadline_misses_total": t.deadline_misses,
        "tokens_total": t.tokens,
    }
    return figures


def instance_figures(inst: InstanceState, now: float, gpu: dict[int, int]) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "service": inst.service,
        "host": inst.host,
        "pid": inst.pid,
        "state": inst.state,
        "heartbeat_age_s": _round(inst.age_s(now)),
        "uptime_s": _round(inst.uptime_s(now), 0),
        "restarts": inst.restarts,
    }
    figures |= {f"mem_{kind}": value for kind, value in sorted(inst.memory.items())}
    if inst.pid in gpu:
        figures["mem_gpu"] = gpu[inst.pid]
    return figures


def device_figures(dev: DeviceState) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "name": dev.name,
        "memory_used_bytes": dev.used_bytes,
        "memory_total_bytes": dev.total_bytes,
        "utilisation_pct": _round(dev.utilisation_pct),
    }
    if dev.processes:
        figures["processes_bytes"] = sum(dev.processes.values())
    if dev.weights_bytes is not None:
        figures["weights_bytes"] = dev.weights_bytes
    return figures


def gpu_by_pid(snap: Snapshot, host: str, nvml_pids_usable: bool | None = None) -> dict[int, int]:
    """Device memory each instance on this host holds, by its pid: NVML's per-process figures
    summed over the instance and the processes it runs (a worker's weight holders and executor
    processes, from its heartbeat). Where NVML's pids cannot be matched (a container has its own
    pid namespace; NVML reports the host's) a worker's figure is its processes' torch allocator
    view (reserved bytes; that leaves out each CUDA context)."""
    usable = nvml_pids_are_ours() if nvml_pids_usable is None else nvml_pids_usable
    found: dict[int, int] = {}
    for dev in snap.devices:
        for pid, used in dev.processes.items():
            found[pid] = found.get(pid, 0) + used
    figures: dict[int, int] = {}
    for inst in snap.instances:
        if inst.host != host:
            continue
        used = sum(found.get(pid, 0) for pid in process_group(inst)) if usable else 0
        if not used:
            used = allocator_reserved(inst)
        if used:
            figures[inst.pid] = used
    return figures


def process_group(inst: InstanceState) -> set[int]:
    """The instance's pid and those of the processes it reports running for it."""
    pids = {inst.pid}
    for key in ("holder_pids", "executor_pids"):
        pids |= {int(p) for p in inst.fields.get(key, "").split(",") if p.strip().isdigit()}
    return pids


def allocator_reserved(inst: InstanceState) -> int:
    """CUDA memory the torch allocators of a worker's holders and executors have reserved."""
    try:
        detail = json.loads(inst.fields.get("weights", "[]"))
    except ValueError:
        return 0
    if not isinstance(detail, list):
        return 0
    total = 0
    for pool in detail:
        if isinstance(pool, dict) and str(pool.get("device", "")).startswith("cuda"):
            total += int(pool.get("holder_cuda_reserved") or 0) + sum(pool.get("executors_cuda_reserved") or [])
    return total


def build_report(snap: Snapshot, host: str, previous: Snapshot | None = None) -> Report:
    keys = sorted(set(snap.window.classes) | set(snap.totals.classes))
    workers = [i for i in snap.instances if i.service == "worker"]
    gpu = gpu_by_pid(snap, host)
    return {
        "ts": round(snap.at, 3),
        "interval_s": round(snap.elapsed_s, 2),
        "monitor": snap.monitor,
        "tasks_per_s": round(snap.rate(sum(w.tasks for w in snap.window.classes.values())), 2),
        "tasks_total": snap.totals.tasks,
        "errors_total": snap.totals.errors,
        "dead_letters": snap.dead_letters,
        "workers_live": len(snap.live("worker")),
        "workers_known": len(workers),
        "hosts_live": hosts_live(snap.instances),
        "private_bytes": snap.private_bytes(),
        "classes": {
            f"{model}/{task_class}": class_figures(
                snap,
                snap.window.classes.get((model, task_class), ClassWindow()),
                snap.totals.classes.get((model, task_class), ClassTotals()),
            )
            for model, task_class in keys
        },
        "streams": {
            name: {
                "length": s.length,
                "pending": s.pending,
                "lag": s.lag,
                "consumers": s.consumers,
                "oldest_pending_s": _round(s.oldest_pending_s),
            }
            for name, s in snap.streams.items()
        },
        "instances": {f"{i.service}/{i.instance}": instance_figures(i, snap.at, gpu) for i in snap.instances},
        "devices": {d.device: device_figures(d) for d in snap.devices},
        "hosts": host_figures(snap.instances, previous.instances if previous else None, snap.elapsed_s),
        "warnings": list(snap.warnings),
    }


def flatten(report: Report) -> dict[str, str]:
    """The report as flat hash fields: `section.entity.figure`; absent figures are left out."""
    out: dict[str, str] = {}
    for name, value in report.items():
        if name in SECTIONS:
            for entity, figures in value.items():
                out |= {f"{name}.{entity}.{k}": str(v) for k, v in figures.items() if v is not None}
        elif name == "warnings":
            out[name] = "\n".join(value)
        elif value is not None:
            out[name] = str(value)
    return out


def unflatten(fields: dict[str, str]) -> Report:
    """The nested report back from hash fields (values stay strings); entity names may hold dots."""
    report: Report = {section: {} for section in SECTIONS}
    for name, value in fields.items():
        section, _, rest = name.partition(".")
        if section in SECTIONS and "." in rest:
            entity, _, figure = rest.rpartition(".")
            report[section].setdefault(entity, {})[figure] = value
        else:
            report[name] = [w for w in value.split("\n") if w] if name == "warnings" else value
    return report


def _ms(value: float | None) -> str:
    """A latency, short: `850ms`, `13.7s`."""
    if value is None:
        return "-"
    return f"{value:.0f}ms" if value < 1000 else f"{value / 1000:.1f}s"


def _class_part(name: str, w: ClassWindow, snap: Snapshot) -> str:
    part = f"{CLASS_ABBREVIATIONS.get(name, name)} {snap.rate(w.tasks):.1f}/s"
    if w.latencies_ms:
        part += f" p50 {_ms(percentile(w.latencies_ms, 50))} p99 {_ms(percentile(w.latencies_ms, 99))}"
        part += f" (queue {_ms(percentile(w.queue_ms, 50))})"
    if w.tokens:
        part += f" {snap.rate(w.tokens):.0f}tok/s"
    if w.batches:
        part += f" size {w.mean_batch:.1f}"
    if w.padding_waste:
        part += f" pad {100 * w.padding_waste:.0f}%"
    if w.deadline_misses:
        part += f" missed {w.deadline_misses}"
    return part


def report_line(snap: Snapshot) -> str:
    """The compact line an operator reads in `docker compose logs -f monitor`."""
    classes = snap.window.by_class()
    parts = [
        _class_part(c, classes[c], snap) for c in ("realtime", "batch", "none") if classes.get(c, ClassWindow()).tasks
    ]
    if not parts:
        parts = ["idle"]
    errors = sum((w.errors for w in classes.values()), start=ClassWindow().errors)
    if errors:
        parts.append(f"errors {sum(errors.values())} (" + ", ".join(f"{r} {n}" for r, n in errors.most_common()) + ")")
    queued = sum(s.length for s in snap.streams.values())
    pending = sum(s.pending for s in snap.streams.values())
    parts.append(f"queued {queued} pending {pending}")
    workers = [i for i in snap.instances if i.service == "worker"]
    parts.append(f"workers {len(snap.live('worker'))}/{len(workers)}")
    if (hosts := hosts_live(snap.instances)) > 1:
        parts[-1] += f" on {hosts} hosts"
    parts.append(f"private {snap.private_bytes() / MiB:.0f}MiB")
    for dev in snap.devices:
        part = f"{dev.device} {dev.used_bytes / GiB:.1f}/{dev.total_bytes / GiB:.1f}GiB {dev.utilisation_pct:.0f}%"
        if dev.weights_bytes is not None:
            part += f" weights {dev.weights_bytes / MiB:.0f}MiB"
        parts.append(part)
    if snap.dead_letters:
        parts.append(f"dead {snap.dead_letters}")
    return " | ".join(parts)
