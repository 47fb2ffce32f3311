"""Shared fixtures: a private Redis for the session, a fresh key prefix per test, loaded models."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from ectrans.common.registry import ModelSpec, load_registry
from ectrans.local.redis_server import RedisServer
from ectrans.local.redis_topology import LocalCluster
from ectrans.models.api import Executor

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def private_stack_records(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """`ectrans up` records its stack under $XDG_RUNTIME_DIR: tests never see (or take) a live one."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_RUNTIME_DIR", str(tmp_path_factory.mktemp("runtime")))
        patch.delenv("ECTRANS_STACK", raising=False)
        yield


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    """A 3-master Redis Cluster on free ports, started once per session by whoever needs it."""
    with LocalCluster(3) as cluster:
        yield cluster


@pytest.fixture
def redis_url(request: pytest.FixtureRequest) -> str:
    """The Redis every test talks to: one server, or with `ECTRANS_TEST_REDIS=cluster` the
    3-master cluster, so the whole suite runs unchanged against a cluster."""
    if os.environ.get("ECTRANS_TEST_REDIS", "single") == "cluster":
        cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        return cluster.url
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


@pytest.fixture
def prefix() -> str:
    """Unique key names per test instead of FLUSHALL: tests never see each other's streams."""
    return f"t{uuid.uuid4().hex[:10]}:"


@pytest.fixture(scope="session")
def registry() -> dict[str, ModelSpec]:
    return load_registry()


@pytest.fixture(scope="session")
def minilm_executor(registry: dict[str, ModelSpec]) -> Iterator[Executor]:
    from ectrans.models.loader import load_executor

    executor = load_executor(registry["minilm"], device="cpu", threads=2)
    yield executor
    executor.close()
