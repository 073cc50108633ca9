"""Loads accounts missing from Redis from PostgreSQL, the system of record."""

from __future__ import annotations

from functools import partial
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from ..config import Settings
from ..core.keys import KeySpace
from ..core.loader import AccountSnapshot, DefaultsLoader
from ..errors import ConfigError
from .postgres import postgres_errors_translated, read_snapshot, read_snapshot_async

__all__ = ["AsyncPostgresLoader", "PostgresLoader", "require_database_url"]


def require_database_url(settings: Settings) -> str:
    if settings.database_url is None:
        raise ConfigError("no PostgreSQL to talk to: set REDCREDIT_DATABASE_URL")
    return settings.database_url


_translated = partial(
    postgres_errors_translated,
    "load the account from PostgreSQL",
    "; the call changed nothing and can be retried",
)


class _Reads:
    """What both loaders share: how an account is read (in their transaction), and the pool."""

    def __init__(self, settings: Settings) -> None:
        self.defaults = DefaultsLoader(settings).load("")
        self.schema = settings.pg_schema
        self.keys = KeySpace(settings.versioned_prefix, settings.partitions)
        self.window_ms = int(settings.idempotency_window.total_seconds() * 1000)
        self.pool_options: dict[str, Any] = {
            "min_size": 1,
            "max_size": settings.database_pool_size,
            "timeout": settings.database_timeout.total_seconds(),
        }

    def _options(self, account: str) -> dict[str, Any]:
        return {
            "partition": self.keys.partition(account),
            "window_ms": self.window_ms,
            "defaults": self.defaults,
        }

    def read(self, conn: psycopg.Connection[Any], account: str) -> AccountSnapshot:
        return read_snapshot(conn, self.schema, account, **self._options(account))

    async def read_async(self, conn: psycopg.AsyncConnection[Any], account: str) -> AccountSnapshot:
        return await read_snapshot_async(conn, self.schema, account, **self._options(account))


class PostgresLoader:
    """Unknown accounts open with the configured defaults; NULL balances read as 0.

    Pass a pool you own, or let the loader create one from the settings; only
    a pool created here is closed by :meth:`close`.
    """

    def __init__(self, settings: Settings, pool: ConnectionPool[Any] | None = None) -> None:
        self._sql = _Reads(settings)
        self._owns_pool = pool is None
        self.pool = pool or ConnectionPool(
            require_database_url(settings), open=True, **self._sql.pool_options
        )

    def load(self, account: str) -> AccountSnapshot:
        with _translated(), self.pool.connection() as conn, conn.transaction():
            return self._sql.read(conn, account)

    def close(self) -> None:
        if self._owns_pool:
            self.pool.close()


class AsyncPostgresLoader:
    def __init__(self, settings: Settings, pool: AsyncConnectionPool[Any] | None = None) -> None:
        self._sql = _Reads(settings)
        self._owns_pool = pool is None
        self._url = require_database_url(settings) if pool is None else ""
        self.pool = pool

    async def _pool(self) -> AsyncConnectionPool[Any]:
        # An async pool must be opened inside a running event loop.
        if self.pool is None:
            self.pool = AsyncConnectionPool(self._url, open=False, **self._sql.pool_options)
            await self.pool.open()
        return self.pool

    async def load(self, account: str) -> AccountSnapshot:
        with _translated():
            pool = await self._pool()
            async with pool.connection() as conn, conn.transaction():
                return await self._sql.read_async(conn, account)

    async def close(self) -> None:
        if self._owns_pool and self.pool is not None:
            await self.pool.close()
