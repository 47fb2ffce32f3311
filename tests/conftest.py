"""Shared fixtures: a private Redis for the session, a fresh key prefix per test, loaded models."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from ectrans.common.redis_server import RedisServer
from ectrans.common.registry import ModelSpec, load_registry
from ectrans.models.api import Executor

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


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
