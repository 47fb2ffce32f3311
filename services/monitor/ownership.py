"""Which monitor writes `ectrans:stats` when several watch one Redis and prefix (a monitor per host,
two `ectrans up` stacks on one Redis): the one whose figures are there while they stay fresh.

Each monitor counts from its own start, so two writing in turn would make `HGETALL ectrans:stats`
and `ectrans top` flip between two sets of totals every few seconds. The others still log their
line and serve their own `/metrics`; one takes over once the writer's figures go stale (it stopped
or died). Clocks of other hosts only move the handover: a monitor always keeps its own hash.
"""

from __future__ import annotations

from collections.abc import Mapping

STALE_INTERVALS = 3.0  # another monitor's figures older than this many intervals are abandoned


def may_write(current: Mapping[bytes, bytes], me: str, now: float, interval_s: float) -> bool:
    """True unless `current` (the stats hash as read) holds another monitor's fresh figures."""
    owner = current.get(b"monitor")
    if owner is None or owner.decode(errors="replace") == me:
        return True
    try:
        written = float(current[b"ts"])
        their_interval = float(current.get(b"interval_s", b"0"))
    except (KeyError, ValueError):  # not a report this code wrote: nothing to keep
        return True
    return now - written > STALE_INTERVALS * max(interval_s, their_interval)
