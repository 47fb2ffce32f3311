"""When the monitor writes its report line: every interval while there is work, on change or once
a minute while idle, so an idle node does not fill its logs with the same line every 5 s."""

from __future__ import annotations

from dataclasses import dataclass

from ectrans.services.monitor.report import Snapshot


def busy(snap: Snapshot) -> bool:
    """Tasks finished or failed this interval, tasks queued or pending, or a warning."""
    worked = any(w.tasks or w.errors for w in snap.window.classes.values())
    queued = any(s.length or s.pending for s in snap.streams.values())
    return worked or queued or bool(snap.warnings)


def idle_state(snap: Snapshot) -> tuple[object, ...]:
    """What an idle line says that matters: which services are live, and the dead letters."""
    live = sorted((i.service, i.instance) for i in snap.instances if i in snap.live(i.service))
    return (tuple(live), len(snap.instances), snap.dead_letters)


@dataclass
class LineGate:
    idle_every_s: float = 60.0
    _last_logged: float | None = None
    _last_state: tuple[object, ...] | None = None

    def should_log(self, snap: Snapshot, now: float) -> bool:
        state = None if busy(snap) else idle_state(snap)
        due = (
            state is None
            or state != self._last_state
            or self._last_logged is None
            or now - self._last_logged >= self.idle_every_s
        )
        if due:
            self._last_logged, self._last_state = now, state
        return due
