"""Redis connections with reconnects: jittered exponential backoff, never a tight retry loop."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# Blocking reads wait at most this long, so the socket timeout must exceed it.
BLOCK_MS = 1000
_SOCKET_TIMEOUT_S = 10.0


def connect(url: str, *, client_name: str | None = None, retries: int = 6) -> aioredis.Redis:
    """An asyncio client for `url` returning raw bytes (task fields may hold binary)."""
    retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=2.0), retries)
    return aioredis.Redis.from_url(
        url,
        decode_responses=False,
        retry=retry,
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        socket_timeout=_SOCKET_TIMEOUT_S,
        socket_connect_timeout=5.0,
        health_check_interval=15,
        client_name=client_name,
    )


def redact(url: str) -> str:
    """The URL with any password replaced, safe for logs and stats."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0] if ":" in creds else ""
    return f"{scheme}://{user}:***@{host}"
