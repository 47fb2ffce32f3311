"""`python -m ectrans.services.worker`: start a worker."""

from __future__ import annotations

import os
import sys

from ectrans.common.lifecycle import run_main, serve
from ectrans.common.logs import setup_logging
from ectrans.common.registry import load_registry
from ectrans.services.worker.service import Worker
from ectrans.services.worker.settings import WorkerSettings


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models load from local directories only
    settings = WorkerSettings()
    setup_logging(settings.log_level, settings.log_format, "worker")
    registry = load_registry(settings.models_file, settings.models_json)
    return run_main(lambda: serve(Worker(settings, registry)))


if __name__ == "__main__":
    sys.exit(main())
