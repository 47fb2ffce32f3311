"""`python -m ectrans.services.dispatcher`: start the dispatcher."""

from __future__ import annotations

import sys

from ectrans.common.lifecycle import run_main, serve
from ectrans.common.logs import setup_logging
from ectrans.common.registry import load_registry
from ectrans.services.dispatcher.service import Dispatcher
from ectrans.services.dispatcher.settings import DispatcherSettings


def main() -> int:
    settings = DispatcherSettings()
    setup_logging(settings.log_level, settings.log_format, "dispatcher")
    registry = load_registry(settings.models_file, settings.models_json)
    return run_main(lambda: serve(Dispatcher(settings, registry)))


if __name__ == "__main__":
    sys.exit(main())
