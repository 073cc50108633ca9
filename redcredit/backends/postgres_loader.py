"""Loads accounts missing from Redis from PostgreSQL, the system of record."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from ..config import Settings
from ..core.keys import KeySpace
from ..core.loader import AccountSnapshot, DefaultsLoader
from ..errors import BackendUnavailable, ConfigError
from .postgres import (
    RESTORED_KEYS_MAX,
    applied_keys_query,
    fence_for_load,
    fence_key,
    load_account_query,
    snapshot_from_row,
)

__all__ = ["AsyncPostgresLoader", "PostgresLoader", "require_database_url"]


def require_database_url(settings: Settings) -> str:
    if settings.database_url is None:
        raise ConfigError("no PostgreSQL to talk to: set REDCREDIT_DATABASE_URL")
    return settings.database_url


@contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except psycopg.Error as exc:
        # psycopg's messages name the server, never the password.
        raise BackendUnavailable(
            f"cannot load the account from PostgreSQL ({type(exc).__name__}: {exc}); "
            "the call changed nothing and can be retried"
        ) from exc


class _Statements:
    """What both loaders run to read an account, in one transaction."""

    def __init__(self, settings: Settings) -> None:
        self.defaults = DefaultsLoader(settings).load("")
        self.schema = settings.pg_schema
        self.keys = KeySpace(settings.versioned_prefix, settings.partitions)
        self.account = load_account_query(settings.pg_schema)
        self.applied = applied_keys_query(settings.pg_schema)
        self.window_ms = int(settings.idempotency_window.total_seconds() * 1000)
        self.pool_options: dict[str, Any] = {
            "min_size": 1,
            "max_size": settings.database_pool_size,
            "timeout": settings.database_timeout.total_seconds(),
        }

    def _applied_params(self, account: str) -> list[Any]:
        return [self.window_ms, account, self.window_ms, RESTORED_KEYS_MAX]

    def read(self, conn: psycopg.Connection[Any], account: str) -> AccountSnapshot:
        conn.execute(fence_for_load(), fence_key(self.schema, self.keys.partition(account)))
        row = conn.execute(self.account, [account]).fetchone()
        applied = []
        if row is not None:
            applied = conn.execute(self.applied, self._applied_params(account)).fetchall()
        return snapshot_from_row(row, self.defaults, applied)

    async def read_async(self, conn: psycopg.AsyncConnection[Any], account: str) -> AccountSnapshot:
        await conn.execute(fence_for_load(), fence_key(self.schema, self.keys.partition(account)))
        row = await (await conn.execute(self.account, [account])).fetchone()
        applied = []
        if row is not None:
            cursor = await conn.execute(self.applied, self._applied_params(account))
            applied = await cursor.fetchall()
        return snapshot_from_row(row, self.defaults, applied)


class PostgresLoader:
    """Unknown accounts open with the configured defaults; NULL balances read as 0.

    Pass a pool you own, or let the loader create one from the settings; only
    a pool created here is closed by :meth:`close`.
    """

    def __init__(self, settings: Settings, pool: ConnectionPool[Any] | None = None) -> None:
        self._sql = _Statements(settings)
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
        self._sql = _Statements(settings)
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
        pool = await self._pool()
        with _translated():
            async with pool.connection() as conn, conn.transaction():
                return await self._sql.read_async(conn, account)

    async def close(self) -> None:
        if self._owns_pool and self.pool is not None:
            await self.pool.close()
