"""Scripts survive SCRIPT FLUSH and server restarts; an unreachable server is a typed error."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
import redis

from redcredit import AsyncRedCredit, BackendUnavailable, RedCredit, Settings
from redcredit.backends.migrate import migrate
from tests.support.helpers import snapshot


def test_script_flush_mid_traffic_costs_no_call(rc: RedCredit, redis_client) -> None:
    for i in range(50):
        if i % 10 == 5:
            redis_client.script_flush()
        rc.spend("flushy", cost=1)
    assert rc.balance("flushy").credits == 50


async def test_script_flush_async(arc: AsyncRedCredit, redis_client) -> None:
    async def spend_many() -> None:
        for _ in range(20):
            await arc.spend("flushy-async", cost=1)

    tasks = [asyncio.create_task(spend_many()) for _ in range(5)]
    for _ in range(5):
        redis_client.script_flush()
        await asyncio.sleep(0.005)
    await asyncio.gather(*tasks)
    assert (await arc.balance("flushy-async")).credits == 0


def test_restart_costs_no_call(redis_factory, settings: Settings) -> None:
    server = redis_factory(appendonly=True, extra_args=["--appendfsync", "always"])
    client = RedCredit(settings=settings.model_copy(update={"redis_url": server.url}))
    try:
        client.spend("restarted", cost=10)
        server.kill()
        server.restart()
        # Scripts are gone after the restart, pooled connections are dead: neither shows.
        assert client.spend("restarted", cost=10).credits_remaining == 80
    finally:
        client.close()


def test_unreachable_redis_is_backend_unavailable(redis_factory, settings: Settings) -> None:
    server = redis_factory()
    client = RedCredit(settings=settings.model_copy(update={"redis_url": server.url}))
    try:
        client.spend("gone", cost=1)
        server.stop()
        with pytest.raises(BackendUnavailable):
            client.spend("gone", cost=1)
    finally:
        client.close()


def test_client_given_is_not_closed(redis_url: str, settings: Settings) -> None:
    own = redis.Redis.from_url(redis_url)
    with RedCredit(own, settings=settings) as client:
        client.spend("mine", cost=1)
    assert own.ping()
    own.close()


async def test_postgres_down_while_loading_is_backend_unavailable(
    postgres_factory, settings: Settings, redis_client, prefix: str
) -> None:
    """An account that must come from PostgreSQL while it is down: a typed error, no write."""
    server = postgres_factory()
    with psycopg.connect(server.url, autocommit=True) as conn:
        migrate(conn, "rc")
    down = settings.model_copy(update={"database_url": server.url, "pg_schema": "rc"})
    server.stop()
    before = snapshot(redis_client, prefix)
    with RedCredit(settings=down) as rc, pytest.raises(BackendUnavailable, match="PostgreSQL"):
        rc.spend("cold", cost=1)
    async with AsyncRedCredit(settings=down) as arc:
        with pytest.raises(BackendUnavailable, match="PostgreSQL"):
            await arc.spend("cold", cost=1)
    assert snapshot(redis_client, prefix) == before
    server.start()
    with RedCredit(settings=down) as rc:
        assert rc.spend("cold", cost=1).credits_remaining == down.free_credits - 1
