"""Loads accounts missing from Redis from PostgreSQL, the system of record."""

from __future__ import annotations

from typing import Any

from psycopg_pool import AsyncConnectionPool, ConnectionPool

from .config import Settings
from .errors import ConfigError
from .loader import AccountSnapshot, DefaultsLoader
from .store import load_account_query, snapshot_from_row

__all__ = ["AsyncPostgresLoader", "PostgresLoader", "require_database_url"]


def require_database_url(settings: Settings) -> str:
    if settings.database_url is None:
        raise ConfigError("no PostgreSQL to talk to: set REDCREDIT_DATABASE_URL")
    return settings.database_url


class PostgresLoader:
    """Unknown accounts open with the configured defaults; NULL balances read as 0.

    Pass a pool you own, or let the loader create one from the settings; only
    a pool created here is closed by :meth:`close`.
    """

    def __init__(self, settings: Settings, pool: ConnectionPool[Any] | None = None) -> None:
        self._defaults = DefaultsLoader(settings).load("")
        self._query = load_account_query(settings.pg_schema)
        self._owns_pool = pool is None
        self.pool = pool or ConnectionPool(
            require_database_url(settings),
            min_size=1,
            max_size=settings.database_pool_size,
            open=True,
        )

    def load(self, account: str) -> AccountSnapshot:
        with self.pool.connection() as conn:
            row = conn.execute(self._query, [account]).fetchone()
        return snapshot_from_row(row, self._defaults)

    def close(self) -> None:
        if self._owns_pool:
            self.pool.close()


class AsyncPostgresLoader:
    def __init__(self, settings: Settings, pool: AsyncConnectionPool[Any] | None = None) -> None:
        self._defaults = DefaultsLoader(settings).load("")
        self._query = load_account_query(settings.pg_schema)
        self._owns_pool = pool is None
        self._url = require_database_url(settings) if pool is None else ""
        self._max_size = settings.database_pool_size
        self.pool = pool

    async def _pool(self) -> AsyncConnectionPool[Any]:
        # An async pool must be opened inside a running event loop.
        if self.pool is None:
            self.pool = AsyncConnectionPool(
                self._url, min_size=1, max_size=self._max_size, open=False
            )
            await self.pool.open()
        return self.pool

    async def load(self, account: str) -> AccountSnapshot:
        pool = await self._pool()
        async with pool.connection() as conn:
            cursor = await conn.execute(self._query, [account])
            row = await cursor.fetchone()
        return snapshot_from_row(row, self._defaults)

    async def close(self) -> None:
        if self._owns_pool and self.pool is not None:
            await self.pool.close()
