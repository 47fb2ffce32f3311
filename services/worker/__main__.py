"""`python -m ectrans.services.worker`: start a worker."""

from __future__ import annotations

import logging
import os
import sys

from ectrans.common.lifecycle import run_main, serve
from ectrans.common.logs import setup_logging
from ectrans.common.registry import load_registry
from ectrans.services.worker.namesake import NameTaken
from ectrans.services.worker.service import Worker
from ectrans.services.worker.settings import WorkerSettings


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models load from local directories only
    settings = WorkerSettings()
    setup_logging(settings.log_level, settings.log_format, "worker")
    registry = load_registry(settings.models_file, settings.models_json)
    try:
        return run_main(lambda: serve(Worker(settings, registry)))
    except NameTaken as exc:  # before anything was loaded: one line, no traceback, no restart loop of loads
        logging.getLogger("ectrans.services.worker").error("[start] %s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
