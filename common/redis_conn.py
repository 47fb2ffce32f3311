"""Redis connections with reconnects: jittered exponential backoff, never a tight retry loop.

One `connect(url)` for every topology; the URL's scheme decides:

    redis://[user:pass@]host:port/db            a single Redis (also `rediss://` for TLS)
    redis+cluster://[user:pass@]h1:p1,h2:p2     a Redis Cluster, from any of its nodes (`rediss+cluster://`)
    redis+sentinel://[user:pass@]s1:p1,s2:p2/master-name[/db]
                                                the master that Sentinel names, followed across failovers
                                                (`rediss+sentinel://`; `?sentinel_password=` for sentinels
                                                with their own password)

The rest of the code holds a `RedisClient` and asks `is_cluster(client)` once, where a step must
differ (atomic scripts across keys on a single Redis, idempotent steps per slot on a cluster).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, TypeAlias
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
import redis.asyncio as aioredis
import redis.cluster
import redis.sentinel
from redis._parsers import AsyncCommandsParser  # what RedisCluster itself uses
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.maint_notifications import MaintNotificationsConfig

# Blocking reads wait at most this long, so the socket timeout must exceed it.
BLOCK_MS = 1000
_SOCKET_TIMEOUT_S = 10.0
_CONNECT_TIMEOUT_S = 5.0

RedisClient: TypeAlias = aioredis.Redis | RedisCluster
"""What `connect` returns: a single Redis (plain or Sentinel-managed) or a Redis Cluster."""

SINGLE, CLUSTER, SENTINEL = "single", "cluster", "sentinel"
_SCHEMES = {
    "redis": (SINGLE, False),
    "rediss": (SINGLE, True),
    "unix": (SINGLE, False),
    "redis+cluster": (CLUSTER, False),
    "rediss+cluster": (CLUSTER, True),
    "redis+sentinel": (SENTINEL, False),
    "rediss+sentinel": (SENTINEL, True),
}


@dataclass(frozen=True)
class Target:
    """A parsed connection URL."""

    topology: str  # single, cluster or sentinel
    tls: bool
    nodes: list[tuple[str, int]] = field(default_factory=list)  # cluster startup nodes or sentinels
    service: str = ""  # Sentinel's master name
    db: int = 0
    username: str | None = None
    password: str | None = None
    options: dict[str, str] = field(default_factory=dict)  # query-string options


def parse(url: str) -> Target:
    """Split a connection URL into its parts; raises ValueError naming what is wrong."""
    scheme = url.partition("://")[0].lower()
    if scheme not in _SCHEMES or "://" not in url:
        raise ValueError(f"unsupported Redis URL scheme {scheme!r}; use one of: {', '.join(_SCHEMES)}")
    topology, tls = _SCHEMES[scheme]
    if topology == SINGLE:
        return Target(SINGLE, tls)
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
    nodes = [_host_port(item, url) for item in hosts.split(",") if item]
    if not nodes:
        raise ValueError(f"no host:port in {redact(url)}")
    path = [p for p in parts.path.split("/") if p]
    service, db = "", 0
    if topology == SENTINEL:
        if not path:
            raise ValueError(f"a Sentinel URL names the master: redis+sentinel://host:port/master-name ({redact(url)})")
        service = unquote(path[0])
        db = _int(path[1], "db", url) if len(path) > 1 else 0
    elif path and path != ["0"]:
        raise ValueError(f"a Redis Cluster has only db 0 ({redact(url)})")
    return Target(
        topology,
        tls,
        nodes,
        service,
        db,
        unquote(username) or None,
        unquote(password) or None,
        dict(parse_qsl(parts.query)),
    )


def _host_port(item: str, url: str) -> tuple[str, int]:
    host, sep, port = item.rpartition(":")
    if not sep:
        return item, 6379 if not url.startswith(("redis+sentinel", "rediss+sentinel")) else 26379
    return host.strip("[]"), _int(port, "port", url)


def _int(text: str, what: str, url: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a number in {redact(url)}") from None


def _retry(retries: int) -> Retry:
    return Retry(ExponentialWithJitterBackoff(base=0.05, cap=2.0), retries)


# redis-py opens each connection with CLIENT SETINFO and CLIENT MAINT_NOTIFICATIONS and ignores a
# refusal. Neither helps here, no single ACL line can allow them on Redis 6.2, 7.0 and 7.2+ alike
# (each rejects subcommand names it does not know), and every refusal would sit in ACL LOG hiding
# real ones: so ECTrans's connections skip both.
QUIET_HANDSHAKE: dict[str, Any] = {
    "driver_info": None,
    "maint_notifications_config": MaintNotificationsConfig(enabled=False),
}


def connect(url: str, *, client_name: str | None = None, retries: int = 6) -> RedisClient:
    """An asyncio client for `url` returning raw bytes (task fields may hold binary)."""
    target = parse(url)
    common: dict[str, Any] = {
        "decode_responses": False,
        "retry": _retry(retries),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        "socket_timeout": _SOCKET_TIMEOUT_S,
        "socket_connect_timeout": _CONNECT_TIMEOUT_S,
        "health_check_interval": 15,
        "client_name": client_name,
        **QUIET_HANDSHAKE,
    }
    if target.topology == CLUSTER:
        return _cluster(target, common)
    if target.topology == SENTINEL:
        return _sentinel(target, common)
    return aioredis.Redis.from_url(url, **common)


def _tls_and_query(target: Target) -> dict[str, Any]:
    """Query-string options cast as redis-py casts them for plain URLs, plus TLS."""
    query = "&".join(f"{k}={v}" for k, v in target.options.items() if k != "sentinel_password")
    kwargs: dict[str, Any] = dict(parse_url(f"redis://localhost/?{query}")) if query else {}
    for name in ("host", "port", "db", "path", "connection_class"):
        kwargs.pop(name, None)
    return kwargs


class _StreamKeysParser(AsyncCommandsParser):
    """Finds the keys of XREAD and XREADGROUP (the names after STREAMS) without a round trip.

    They are "movablekeys" commands, for which redis-py asks a node `COMMAND GETKEYS` before every
    call: one extra round trip per read, all to one node. Every other command is left to redis-py.
    """

    async def get_keys(self, *args: Any) -> tuple[Any, ...] | None:
        if len(args) > 2 and str(args[0]).upper() in ("XREAD", "XREADGROUP"):
            words = [a.upper() if isinstance(a, str) else a for a in args]
            for marker in ("STREAMS", b"STREAMS"):
                if marker in words:
                    rest = args[words.index(marker) + 1 :]
                    return tuple(rest[: len(rest) // 2])
        return await super().get_keys(*args)


def _cluster(target: Target, common: dict[str, Any]) -> RedisCluster:
    kwargs = {**common, **_tls_and_query(target)}
    if target.tls:
        kwargs["ssl"] = True
    client = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        username=target.username,
        password=target.password,
        **kwargs,
    )
    client.commands_parser = _StreamKeysParser()
    return client


class SentinelRedis(aioredis.Redis):
    """The master client Sentinel hands out; closing it closes the sentinel connections too."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        pool = self.connection_pool
        await super().aclose(close_connection_pool)
        if isinstance(pool, SentinelConnectionPool):
            await pool.sentinel_manager.aclose()


def _sentinel(target: Target, common: dict[str, Any]) -> aioredis.Redis:
    extra = _tls_and_query(target)
    if target.tls:
        from redis.asyncio.connection import SSLConnection

        extra["connection_class"] = SSLConnection
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": _CONNECT_TIMEOUT_S,
        "socket_connect_timeout": _CONNECT_TIMEOUT_S,
        "retry": _retry(2),
    }
    if "sentinel_password" in target.options:
        sentinel_kwargs["password"] = target.options["sentinel_password"]
    # Typed as Any: redis-py's annotations for Sentinel and ClusterNode differ between releases.
    sentinel_cls: Any = Sentinel
    manager = sentinel_cls(target.nodes, sentinel_kwargs=sentinel_kwargs)
    client: aioredis.Redis = manager.master_for(
        target.service,
        redis_class=SentinelRedis,
        db=target.db,
        username=target.username,
        password=target.password,
        **common,
        **extra,
    )
    return client


def connect_sync(url: str, *, socket_timeout: float = _CONNECT_TIMEOUT_S) -> redis.Redis | redis.RedisCluster:
    """A blocking client for the same URLs, for command-line tools and setup code (services use
    `connect`). Closing it (`with connect_sync(url) as client:`) closes its connections."""
    target = parse(url)
    kwargs: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        **QUIET_HANDSHAKE,
    }
    if target.topology == CLUSTER:
        cluster_node: Any = redis.cluster.ClusterNode
        return redis.RedisCluster(
            startup_nodes=[cluster_node(host, port) for host, port in target.nodes],
            username=target.username,
            password=target.password,
            ssl=target.tls,
            **kwargs,
            **_tls_and_query(target),
        )
    if target.topology == SENTINEL:
        sentinel_kwargs = dict(kwargs)
        if "sentinel_password" in target.options:
            sentinel_kwargs["password"] = target.options["sentinel_password"]
        sync_sentinel_cls: Any = redis.sentinel.Sentinel
        manager = sync_sentinel_cls(target.nodes, sentinel_kwargs=sentinel_kwargs, **kwargs)
        client: redis.Redis = manager.master_for(
            target.service, db=target.db, username=target.username, password=target.password, **_tls_and_query(target)
        )
        return client
    return redis.Redis.from_url(url, **kwargs)


def is_cluster(client: RedisClient | Any) -> bool:
    """True for a Redis Cluster client (or one of its pipelines): keys of one step may live apart."""
    return isinstance(client, RedisCluster | ClusterPipeline)


def same_slot_pipeline(client: RedisClient) -> Pipeline | ClusterPipeline:
    """A pipeline for commands on one key (or one slot) that belong together: a MULTI on a single
    Redis; a plain pipeline on a cluster, written to its one node in one send.

    Not a cluster MULTI: redis-py 8.1's async cluster transaction runs `asyncio.run` in a new thread
    for every queued command, and on a fresh client the connections it opens there belong to a loop
    that is closed right after ("Future attached to a different loop", "Event loop is closed")."""
    return client.pipeline(transaction=not is_cluster(client))


async def disconnect(client: RedisClient) -> None:
    """Drop every open connection now (ends a blocking read on another task); reusable afterwards."""
    if isinstance(client, RedisCluster):
        for node in client.get_nodes():
            await node.disconnect()
    else:
        await client.connection_pool.disconnect()


def redact(url: str) -> str:
    """The URL with any password replaced, safe for logs and stats: the user-info part (up to its last
    `@`; a raw `/` in a password is tolerated) and `password=`/`sentinel_password=` query values."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    if "@" in authority:
        creds, _, hosts = authority.rpartition("@")
        user = creds.split(":", 1)[0] if ":" in creds else ""
        authority = f"{user}:***@{hosts}"
    tail = re.sub(r"(?i)([?&](?:sentinel_)?password=)[^&#]*", r"\1***", tail)
    return f"{scheme}://{authority}{tail}"
