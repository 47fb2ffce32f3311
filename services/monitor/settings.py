"""Monitor settings (`ECTRANS_*`)."""

from __future__ import annotations

from pydantic import Field

from ectrans.common.settings import CommonSettings


class MonitorSettings(CommonSettings):
    instance: str | None = Field(None, description="Instance name; default `<host>-0`.")
    interval_s: float = Field(5.0, gt=0, description="Seconds between report lines while busy (and stats updates).")
    idle_log_s: float = Field(
        60.0, ge=0, description="While idle, the line is written when it changes or this often (0: every interval)."
    )
    metrics_port: int = Field(9464, ge=0, le=65535, description="Prometheus /metrics port; 0 turns it off.")
    metrics_host: str = Field("0.0.0.0", description="Address the /metrics endpoint listens on.")
    monitor_json: str | None = Field(
        None, description="Also write each report as one JSON line: `stdout`, `stderr` or a file path to append to."
    )
    memory_warn_fraction: float = Field(0.9, gt=0, le=1, description="Warn when a device's memory use exceeds this.")
    queue_warn_len: int = Field(100, ge=1, description="Warn when a stream at least this long grew in an interval.")
    pending_warn_s: float = Field(120.0, gt=0, description="Warn when a task has been pending this long.")
    stale_beats: float = Field(2.0, gt=1, description="Missed heartbeats after which an instance is stale.")
    forget_after_s: float = Field(600.0, ge=0, description="How long a gone or stopped instance stays listed.")
    heartbeat_s: float = Field(2.0, gt=0, description="The monitor's own heartbeat; also assumed for others.")

    @property
    def stale_after_s(self) -> float:
        """When an instance beating at the monitor's own rate counts as stale."""
        return self.stale_beats * self.heartbeat_s
