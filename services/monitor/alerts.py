"""Warning lines: what is wrong on the node at the end of an interval."""

from __future__ import annotations

from ectrans.services.monitor.instances import GONE, STALE, Change
from ectrans.services.monitor.report import Snapshot
from ectrans.services.monitor.settings import MonitorSettings


def instance_warnings(snap: Snapshot, changes: list[Change]) -> list[str]:
    """Stale instances every interval (a passing state: live again, or gone, within a few beats); a
    gone one once, when it goes: it stays listed as gone (`ectrans top`, /metrics) for
    `forget_after_s`, and a warning each interval for that long would bury the others."""
    found = []
    went = {change.instance.key for change in changes if change.what == GONE}
    for inst in snap.instances:
        where = f"pid {inst.pid} on {inst.host}"
        if inst.state == STALE:
            found.append(
                f"{inst.service} {inst.instance} is stale: last heartbeat {inst.age_s(snap.at):.1f}s ago ({where})"
            )
        elif inst.state == GONE and inst.key in went:
            found.append(
                f"{inst.service} {inst.instance} is gone: no heartbeat for {inst.age_s(snap.at):.0f}s "
                f"and no clean stop ({where})"
            )
    for change in changes:
        if change.what == "restarted":
            inst = change.instance
            found.append(f"{inst.service} {inst.instance} restarted: {change.detail} ({inst.restarts} so far)")
    return found


def stream_warnings(snap: Snapshot, previous: Snapshot | None, settings: MonitorSettings) -> list[str]:
    found = []
    queued = sum(s.length for s in snap.streams.values())
    if queued and not snap.live("worker"):
        found.append(f"no live worker: {queued} queued tasks wait")
    for name, state in snap.streams.items():
        before = previous.streams.get(name) if previous is not None else None
        if before is not None and state.length > before.length and state.length >= settings.queue_warn_len:
            found.append(f"queue {name} is growing: {before.length} → {state.length}")
        if state.oldest_pending_s is not None and state.oldest_pending_s > settings.pending_warn_s:
            found.append(f"a task in {name} has been pending for {state.oldest_pending_s:.0f}s")
    dead = sum(w.errors["dead_letter"] for w in snap.window.classes.values())
    if dead:
        found.append(f"{dead} tasks dead-lettered this interval ({snap.dead_letters} in {settings.keys.dead_letters})")
    return found


def memory_warnings(snap: Snapshot, settings: MonitorSettings) -> list[str]:
    found = []
    for dev in snap.devices:
        if dev.total_bytes and dev.used_bytes / dev.total_bytes > settings.memory_warn_fraction:
            found.append(
                f"{dev.device} memory at {100 * dev.used_bytes / dev.total_bytes:.0f}% of {dev.total_bytes >> 20}MiB"
            )
    return found


def warnings(snap: Snapshot, previous: Snapshot | None, changes: list[Change], settings: MonitorSettings) -> list[str]:
    return (
        instance_warnings(snap, changes) + stream_warnings(snap, previous, settings) + memory_warnings(snap, settings)
    )
