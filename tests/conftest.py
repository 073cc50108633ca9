"""Real servers for the tests: a user's own through environment variables, else embedded ones.

``REDCREDIT_TEST_REDIS_URL`` points the tests at a Redis you run; otherwise a
private server is started on a free loopback port from the binaries that
:mod:`redcredit.embedded` finds. Tests that kill or restart a server start
their own with ``redis_factory``. Every test works under a key prefix of its
own, so a shared server needs no flushing.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis

from redcredit import AsyncRedCredit, CostTable, RedCredit, Settings
from redcredit.config import PlanSettings
from redcredit.embedded import EmbeddedRedis


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("REDCREDIT_TEST_REDIS_URL")
    if url:
        yield url
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture(scope="session")
def cluster_redis_url() -> Iterator[str]:
    url = os.environ.get("REDCREDIT_TEST_CLUSTER_URL")
    if url:
        yield url
        return
    with EmbeddedRedis(cluster=True) as server:
        yield server.url


@pytest.fixture
def redis_factory() -> Iterator[Callable[..., EmbeddedRedis]]:
    started: list[EmbeddedRedis] = []

    def start(**options: Any) -> EmbeddedRedis:
        server = EmbeddedRedis(**options).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def prefix() -> str:
    return "t" + uuid.uuid4().hex[:16]


TEST_COSTS = CostTable.from_mapping(
    {
        "image": 10,
        "free_feature": 0,
        "document": {"base": 2, "per_unit": 3, "unit": "pages"},
    }
)


@pytest.fixture
def settings(redis_url: str, prefix: str) -> Settings:
    return Settings(
        redis_url=redis_url,
        key_prefix=prefix,
        free_credits=100,
        free_chat_messages=10,
        costs=TEST_COSTS,
        plans={"enterprise": PlanSettings(bypass=True), "starter": PlanSettings()},
    )


@pytest.fixture
def rc(settings: Settings) -> Iterator[RedCredit]:
    with RedCredit(settings=settings) as client:
        yield client


@pytest.fixture
async def arc(settings: Settings) -> AsyncIterator[AsyncRedCredit]:
    async with AsyncRedCredit(settings=settings) as client:
        yield client
