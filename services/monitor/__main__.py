"""`python -m ectrans.services.monitor`: start the monitor."""

from __future__ import annotations

import sys

from ectrans.common.lifecycle import run_main, serve
from ectrans.common.logs import setup_logging
from ectrans.common.registry import load_registry
from ectrans.services.monitor.service import Monitor
from ectrans.services.monitor.settings import MonitorSettings


def main() -> int:
    settings = MonitorSettings()
    setup_logging(settings.log_level, settings.log_format, "monitor")
    registry = load_registry(settings.models_file, settings.models_json)
    return run_main(lambda: serve(Monitor(settings, sorted(registry))))


if __name__ == "__main__":
    sys.exit(main())
