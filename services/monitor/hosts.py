"""Per-host figures for a site of many worker hosts on one Redis — pure logic over instance states.

Heartbeats carry each instance's host (`ECTRANS_HOST`, else the host name) and, for workers, the
models served and cumulative task counters (`n_ok`, `n_error`): the monitor sums them per host, and
takes the rate from the change since the previous interval (a restarted process starts from zero,
so only instances with the same pid in both intervals count towards the rate).
"""

from __future__ import annotations

from typing import Any

from ectrans.services.monitor.instances import LIVE, InstanceState


def finished(inst: InstanceState) -> int:
    """Tasks a worker process has finished (ok or error) since it started, from its heartbeat."""
    total = 0
    for name in ("n_ok", "n_error"):
        value = inst.fields.get(name, "0")
        total += int(value) if value.isdigit() else 0
    return total


def host_figures(
    instances: list[InstanceState], previous: list[InstanceState] | None, elapsed_s: float
) -> dict[str, dict[str, Any]]:
    """host → its live/known workers, models, tasks finished and their rate, private memory."""
    before = {(i.service, i.instance, i.pid): finished(i) for i in previous or []}
    hosts: dict[str, dict[str, Any]] = {}
    for inst in instances:
        figures = hosts.setdefault(
            inst.host,
            {"instances_live": 0, "workers_live": 0, "workers_known": 0, "models": set(), "tasks_total": 0,
             "tasks_in_interval": 0, "private_bytes": 0},
        )  # fmt: skip
        live = inst.state == LIVE
        figures["instances_live"] += live
        if live:
            figures["private_bytes"] += inst.memory.get("uss", 0)
        if inst.service != "worker":
            continue
        figures["workers_known"] += 1
        figures["workers_live"] += live
        if live:
            figures["models"].update(m for m in inst.fields.get("models", "").split(",") if m)
        done = finished(inst)
        figures["tasks_total"] += done
        earlier = before.get((inst.service, inst.instance, inst.pid))
        if earlier is not None:
            figures["tasks_in_interval"] += max(0, done - earlier)
    for figures in hosts.values():
        figures["models"] = ",".join(sorted(figures["models"]))
        in_interval = figures.pop("tasks_in_interval")
        figures["tasks_per_s"] = round(in_interval / elapsed_s, 2) if previous is not None and elapsed_s > 0 else None
    return dict(sorted(hosts.items()))


def hosts_live(instances: list[InstanceState]) -> int:
    """Hosts with at least one live instance: the site's size as the monitor sees it."""
    return len({i.host for i in instances if i.state == LIVE})
