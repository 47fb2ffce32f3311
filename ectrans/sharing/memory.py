"""Memory accounting of a pool's processes, from /proc/<pid>/smaps, and the heartbeat fields a
worker publishes for the monitor.

PSS splits shared pages among their users, so the group's sum counts the shared weights once;
`private` is a process's USS without the shared weights (a lone executor maps them privately).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ectrans.models.api import Executor


@dataclass(frozen=True)
class PoolProcesses:
    """What a pool knows about its processes at one moment (the input of `measure`)."""

    model: str
    device: str
    shared: bool
    weights_bytes: int
    holder_pid: int | None
    zygote_pid: int | None
    executor_pids: list[int]
    executors_cuda_reserved: list[int]
    holder_cuda_reserved: int


def measure(processes: PoolProcesses) -> dict[str, Any]:
    """Memory of the holder, the zygote and each executor process now (see the module docstring)."""
    executors = [m for m in (process_memory(pid) for pid in processes.executor_pids) if m is not None]
    holder, zygote = process_memory(processes.holder_pid), process_memory(processes.zygote_pid)
    group = [m for m in (*executors, holder, zygote) if m is not None]
    return {
        "model": processes.model,
        "device": processes.device,
        "shared": processes.shared,
        "weights_bytes": processes.weights_bytes,
        "holder_pid": processes.holder_pid,
        "zygote_pid": processes.zygote_pid,
        "executor_pids": processes.executor_pids,
        "executors": executors,
        "executors_pss": [m["pss"] for m in executors],
        "executors_private": [m["private"] for m in executors],
        "executors_cuda_reserved": processes.executors_cuda_reserved,
        "holder_cuda_reserved": processes.holder_cuda_reserved,
        "holder": holder,
        "zygote": zygote,
        "pss_sum": sum(m["pss"] for m in group),
    }


def heartbeat_fields(executors: Sequence[Executor]) -> dict[str, object]:
    """What a worker adds to its heartbeat for its executors (none for in-process executors, whose
    `memory()` is empty): the shared weights once per model and device, and each process's private
    memory, so the monitor can show the saving as measured."""
    return memory_fields([executor.memory() for executor in executors])


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


def process_memory(pid: int | None) -> dict[str, int] | None:
    """rss, pss, uss of a process; its pss split into anonymous, file-backed (shared libraries,
    memory-mapped checkpoints: shared with any process mapping them, and reclaimable) and shared
    memory; the part of its pss that is shared weights (`weights_pss`) and its private bytes other
    than weights (`private`). None if it is gone."""
    if pid is None:
        return None
    from ectrans.common.heartbeat import process_memory as basic_memory

    try:
        memory = basic_memory(pid)
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
