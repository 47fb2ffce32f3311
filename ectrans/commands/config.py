"""`ectrans config`: the effective settings of every service, as they would start here.

Read like the services read them (`ECTRANS_*` environment variables, then `.env`, then the
defaults), with where each value came from. Passwords in URLs are hidden.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings
from rich.console import Console
from rich.table import Table

from ectrans.common.redis_conn import redact
from ectrans.common.settings import ENV_PREFIX, CommonSettings
from ectrans.services.dispatcher.settings import DispatcherSettings
from ectrans.services.gateway.settings import GatewaySettings
from ectrans.services.monitor.settings import MonitorSettings
from ectrans.services.worker.settings import WorkerSettings

SERVICES: dict[str, type[CommonSettings]] = {
    "dispatcher": DispatcherSettings,
    "worker": WorkerSettings,
    "monitor": MonitorSettings,
    "gateway": GatewaySettings,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON object instead of tables")


# Settings holding secrets: shown as set or not, never their values.
SECRET = re.compile(r"password|api_keys|secret|token$")


def effective(settings: BaseSettings) -> dict[str, dict[str, Any]]:
    """Each field's value and source: `env` (environment), `set` (.env or another source), `default`."""
    rows: dict[str, dict[str, Any]] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, str) and "://" in value:
            value = redact(value)
        elif SECRET.search(name) and value:
            value = f"<{len(value)} set>" if isinstance(value, list | tuple) else "<set>"
        if f"{ENV_PREFIX}{name.upper()}" in os.environ:
            source = "env"
        elif name in settings.model_fields_set:
            source = ".env"
        else:
            source = "default"
        rows[name] = {"value": value if isinstance(value, int | float | bool | None) else str(value), "source": source}
    return rows


def collect() -> dict[str, Any]:
    """`{"common": {...}, "<service>": {...}}`: the shared fields once, then each service's own."""
    report: dict[str, Any] = {"common": effective(CommonSettings())}
    for service, settings_class in SERVICES.items():
        try:
            rows = effective(settings_class())
        except ValidationError as exc:
            report[service] = {"error": str(exc)}
            continue
        report[service] = {k: v for k, v in rows.items() if k not in CommonSettings.model_fields}
    return report


def run(args: argparse.Namespace) -> int:
    report = collect()
    if args.json:
        print(json.dumps(report, default=str))
    else:
        console = Console()
        for section, rows in report.items():
            table = Table(title=section, title_justify="left", show_edge=False)
            for column in ("variable", "value", "source"):
                table.add_column(column)
            if "error" in rows:
                table.add_row("-", str(rows["error"]), "invalid")
            for name, row in rows.items() if "error" not in rows else ():
                table.add_row(f"{ENV_PREFIX}{name.upper()}", str(row["value"]), row["source"])
            console.print(table)
    return 0 if all("error" not in rows for rows in report.values()) else 1
