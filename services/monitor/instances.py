"""Which service instances are live, stale, gone or stopped, and how often each restarted — pure logic.

A heartbeat key expires when its process dies, so the key alone cannot say "this worker died":
the tracker remembers every instance it has seen. An instance whose heartbeat is older than
`stale_beats` of its own intervals is *stale*; one whose key vanished without a clean-stop event is
*gone*; a new pid or start time under a known instance name is a *restart*.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ectrans.services.monitor.collect import Beat
from ectrans.services.monitor.stats import Stopped

LIVE, STALE, GONE, STOPPED = "live", "stale", "gone", "stopped"


@dataclass
class InstanceState:
    """What the monitor knows of one (service, instance)."""

    service: str
    instance: str
    host: str
    pid: int
    started: float
    updated: float  # the last heartbeat, by the instance's clock
    state: str = LIVE
    restarts: int = 0  # process starts seen after the first, since the monitor started
    since: float = 0.0  # when the current state began (gone, stopped), by the monitor's clock
    memory: dict[str, int] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.service, self.instance)

    def age_s(self, now: float) -> float:
        return max(0.0, now - self.updated)

    def uptime_s(self, now: float) -> float:
        return max(0.0, now - self.started) if self.state in (LIVE, STALE) else 0.0


@dataclass(frozen=True)
class Change:
    """A transition worth a warning line."""

    instance: InstanceState
    what: str  # "stale", "gone" or "restarted"
    detail: str = ""


class Tracker:
    def __init__(self, default_interval_s: float, stale_beats: float, forget_after_s: float) -> None:
        self.default_interval_s = default_interval_s
        self.stale_beats = stale_beats
        self.forget_after_s = forget_after_s
        self.known: dict[tuple[str, str], InstanceState] = {}
        self._stopped: dict[tuple[str, str], int] = {}  # clean stops heard of, until the key is gone

    def stale_after_s(self, beat: Beat) -> float:
        return self.stale_beats * (beat.interval_s or self.default_interval_s)

    def stopped(self, event: Stopped) -> None:
        key = (event.service, event.instance)
        if key in self.known:  # one that started and stopped between two looks was never listed
            self._stopped[key] = event.pid

    def update(self, beats: list[Beat], now: float) -> list[Change]:
        """Fold in this interval's heartbeats; the changes are what the report warns about."""
        changes: list[Change] = []
        seen = set()
        for beat in beats:
            seen.add(beat.key)
            changes += self._seen(beat, now)
        for key, inst in list(self.known.items()):
            if key in seen:
                continue
            if self._stopped.get(key) == inst.pid:
                del self._stopped[key]
                inst.state, inst.since = STOPPED, now
            elif inst.state in (LIVE, STALE):
                inst.state, inst.since = GONE, now
                changes.append(Change(inst, GONE))
            if inst.state in (GONE, STOPPED) and now - inst.since > self.forget_after_s:
                del self.known[key]
        return changes

    def _seen(self, beat: Beat, now: float) -> list[Change]:
        changes = []
        inst = self.known.get(beat.key)
        if self._stopped.get(beat.key, beat.pid) != beat.pid:
            del self._stopped[beat.key]  # a stop of an earlier process under this name
        if inst is None:
            inst = InstanceState(beat.service, beat.instance, beat.host, beat.pid, beat.started, beat.updated)
            self.known[beat.key] = inst
        elif (beat.pid, beat.started) != (inst.pid, inst.started):
            inst.restarts += 1
            how = "after a clean stop" if inst.state == STOPPED else f"(was {inst.state})"
            changes.append(Change(inst, "restarted", f"pid {inst.pid} → {beat.pid} {how}"))
            inst.pid, inst.started, inst.host = beat.pid, beat.started, beat.host
        inst.updated, inst.memory, inst.fields = beat.updated, beat.memory, beat.fields
        was = inst.state
        inst.state = STALE if beat.age_s(now) > self.stale_after_s(beat) else LIVE
        if inst.state == STALE and was != STALE:
            changes.append(Change(inst, STALE))
        return changes

    def instances(self) -> list[InstanceState]:
        """Copies, sorted: a snapshot keeps what was true when it was taken."""
        return [
            replace(i, memory=dict(i.memory), fields=dict(i.fields))
            for i in sorted(self.known.values(), key=lambda i: i.key)
        ]
