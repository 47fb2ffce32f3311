"""The `ectrans` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from ectrans import __version__
from ectrans.bench import PLOTTED, SCENARIOS
from ectrans.local import stacks

COMMANDS = {
    "up": "start Redis, dispatcher, worker and monitor on this machine",
    "submit": "send one task and print its result",
    "health": "exit 0 if a service on this host is alive (for healthchecks)",
    "top": "a live view of the node: devices, tasks, streams, instances",
    "profile": "measure a model's per-layer latency and store its profile",
    "config": "print the effective settings of every service (and where each came from)",
}


def _bench(args: argparse.Namespace) -> int:
    from ectrans.bench import harness  # imports the client and rich: only when a benchmark runs

    harness.REPORTS.out = Path(args.out) if args.out else None
    harness.REPORTS.plots = not args.no_plot
    if args.scenario in PLOTTED and not args.no_plot and (missing := harness.plotting_missing()):
        print(f"ectrans bench {args.scenario}: {missing}", file=sys.stderr)  # before the run, not after it
        return 2
    module_name = SCENARIOS[args.scenario]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        print(f"scenario {args.scenario!r} is not available in this version", file=sys.stderr)
        return 2
    result = module.run(quick=args.quick)
    text = json.dumps(result, indent=None if args.compact else 2, default=str)
    (harness.output_dir() / f"{args.scenario}.json").write_text(text + "\n")
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ectrans", description="Transformer inference serving for edge GPUs.")
    parser.add_argument("--version", action="version", version=f"ectrans {__version__}")
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
    bench.add_argument(
        "--out",
        metavar="DIR",
        help="where <scenario>.json/.md/.png go (default: $ECTRANS_BENCH_DIR, else ./ectrans-bench); "
        "--out docs/bench refreshes the repository's reports",
    )
    bench.add_argument("--no-plot", action="store_true", help="skip the .png (no matplotlib needed)")
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # ECTrans never reaches a model hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except stacks.StackNotFound as exc:
        print(f"ectrans: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
