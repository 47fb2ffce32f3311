"""`ectrans submit`: send one task and print its terminal record as JSON."""

from __future__ import annotations

import argparse
import json
import sys

from redis.exceptions import RedisError

from ectrans.client import Client, TaskTimeout
from ectrans.common.redis_conn import redact
from ectrans.common.settings import CommonSettings
from ectrans.local.stacks import add_redis_url_argument, with_local_stack


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="the text to process")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--op", default="embed")
    parser.add_argument("--priority", choices=("realtime", "batch"))
    parser.add_argument("--deadline-ms", type=int)
    parser.add_argument("--num-beams", type=int)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--timeout", type=float, default=60.0)
    add_redis_url_argument(parser)


def run(args: argparse.Namespace) -> int:
    settings = with_local_stack(CommonSettings(), args.redis_url)
    params = {k: v for k, v in (("num_beams", args.num_beams), ("max_new_tokens", args.max_new_tokens)) if v}
    try:
        client = Client(settings.redis_url, prefix=settings.prefix)
    except RedisError as exc:
        print(f"ectrans submit: cannot reach {redact(settings.redis_url)}: {exc}", file=sys.stderr)
        return 1
    with client:
        try:
            result = client.submit(
                args.model, args.op, args.input, priority=args.priority, deadline_ms=args.deadline_ms,
                params=params, timeout=args.timeout,
            )  # fmt: skip
        except TaskTimeout as exc:
            print(json.dumps({"status": "timeout", "error": str(exc)}))
            return 1
    output = result.output.tolist() if hasattr(result.output, "tolist") else result.output
    print(json.dumps({**result.fields, "output": output} if result.ok else result.fields))
    return 0 if result.ok else 1
