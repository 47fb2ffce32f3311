"""`ectrans health <service>`: exit 0 if that service on this host has a fresh heartbeat, else 1.

Used by the compose healthchecks."""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from redis.exceptions import RedisError

from ectrans.common.heartbeat import host_name
from ectrans.common.redis_conn import connect
from ectrans.common.settings import CommonSettings
from ectrans.local.stacks import add_redis_url_argument, with_local_stack

SERVICES = ("dispatcher", "worker", "monitor", "gateway")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("service", choices=SERVICES)
    parser.add_argument("--instance", help="check this instance (default: any on this host)")
    parser.add_argument("--max-age", type=float, default=10.0, help="seconds a heartbeat may be old")
    add_redis_url_argument(parser)


async def check(settings: CommonSettings, service: str, instance: str | None, max_age: float) -> bool:
    redis = connect(settings.redis_url, retries=1)
    try:
        keys = settings.keys
        pattern = keys.heartbeat(service, instance or "*")
        now = time.time()
        async for name in redis.scan_iter(match=pattern, count=500):
            raw: dict[Any, Any] = await redis.hgetall(name)
            fields = {k.decode(): v.decode() for k, v in raw.items()}
            on_this_host = instance is not None or fields.get("host") == host_name()
            if on_this_host and now - float(fields.get("updated", 0)) <= max_age:
                return True
        return False
    except RedisError:
        return False
    finally:
        await redis.aclose()


def run(args: argparse.Namespace) -> int:
    settings = with_local_stack(CommonSettings(), args.redis_url)
    healthy = asyncio.run(check(settings, args.service, args.instance, args.max_age))
    print(f"{args.service}: {'healthy' if healthy else 'unhealthy'}")
    return 0 if healthy else 1
