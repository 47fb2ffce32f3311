"""The `ectrans` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from ectrans.bench import SCENARIOS

COMMANDS = {
    "up": "start Redis, dispatcher, worker and monitor on this machine",
    "submit": "send one task and print its result",
    "health": "exit 0 if a service on this host is alive (for healthchecks)",
    "top": "a live view of the node: devices, tasks, streams, instances",
    "profile": "measure a model's per-layer latency and store its profile",
}


def _bench(args: argparse.Namespace) -> int:
    module_name = SCENARIOS[args.scenario]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        print(f"scenario {args.scenario!r} is not available in this version", file=sys.stderr)
        return 2
    result = module.run(quick=args.quick)
    print(json.dumps(result, indent=None if args.compact else 2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ectrans", description="Transformer inference serving for edge GPUs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"ectrans.commands.{name}")
        command = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(command)
        command.set_defaults(handler=module.run)
    bench = sub.add_parser("bench", help="run a benchmark scenario; prints one JSON object")
    bench.add_argument("scenario", choices=sorted(SCENARIOS))
    bench.add_argument("--quick", action="store_true", help="the small size (about a minute on a 2-core CPU)")
    bench.add_argument("--compact", action="store_true", help="JSON on one line")
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # ECTrans never reaches a model hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
