"""Monitor settings (`ECTRANS_*`)."""

from __future__ import annotations

from pydantic import Field

from ectrans.common.settings import CommonSettings


class MonitorSettings(CommonSettings):
    instance: str | None = Field(None, description="Instance name; default `<host>-0`.")
    interval_s: float = Field(5.0, gt=0, description="Seconds between report lines.")
    metrics_port: int = Field(9464, ge=0, le=65535, description="Prometheus /metrics port; 0 turns it off.")
    metrics_host: str = Field("0.0.0.0", description="Address the /metrics endpoint listens on.")
    memory_warn_fraction: float = Field(0.9, gt=0, le=1, description="Warn when device memory use exceeds this.")
    heartbeat_s: float = Field(2.0, gt=0)
