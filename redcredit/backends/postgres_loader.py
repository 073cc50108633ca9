"""Loads accounts missing from Redis from PostgreSQL, the system of record."""

from __future__ import annotations

import asyncio
import math
from functools import partial
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from ..config import Settings
from ..core.keys import KeySpace
from ..core.loader import AccountSnapshot, DefaultsLoader
from ..errors import ConfigError
from .postgres import postgres_errors_translated, read_snapshot, read_snapshot_async

__all__ = ["AsyncPostgresLoader", "PostgresLoader", "database_conninfo", "require_database_url"]


def require_database_url(settings: Settings) -> str:
    if settings.database_url is None:
        raise ConfigError("no PostgreSQL to talk to: set REDCREDIT_DATABASE_URL")
    return settings.database_url


def database_conninfo(settings: Settings) -> str:
    """The PostgreSQL URL, with ``database_timeout`` as libpq's connect_timeout.

    Without one, libpq waits about 130 s for a server that takes the
    connection and never answers. A connect_timeout the URL gives itself is kept.
    """
    url = require_database_url(settings)
    if "connect_timeout" in conninfo_to_dict(url):
        return url
    # libpq counts whole seconds (and takes 1 as 2).
    seconds = max(1, math.ceil(settings.database_timeout.total_seconds()))
    return make_conninfo(url, connect_timeout=seconds)


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
            database_conninfo(settings), open=True, **self._sql.pool_options
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
        self._url = database_conninfo(settings) if pool is None else ""
        self.pool = pool
        self._opening: asyncio.Future[AsyncConnectionPool[Any]] | None = None
        self._loading: dict[str, asyncio.Future[AccountSnapshot]] = {}

    async def _pool(self) -> AsyncConnectionPool[Any]:
        # An async pool must be opened inside a running event loop, once: the
        # first callers of a cold client all wait for the same opening.
        if self.pool is not None:
            return self.pool
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
        return await asyncio.shield(self._opening)

    async def _open(self) -> AsyncConnectionPool[Any]:
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            self._url, open=False, **self._sql.pool_options
        )
        try:
            await pool.open()
        except BaseException:
            self._opening = None  # the next caller tries again
            raise
        self.pool = pool
        return pool

    async def load(self, account: str) -> AccountSnapshot:
        """The account as PostgreSQL holds it; callers that ask at once share one read."""
        pending = self._loading.get(account)
        if pending is None:
            pending = asyncio.ensure_future(self._read(account))
            self._loading[account] = pending
            pending.add_done_callback(lambda _done: self._loading.pop(account, None))
        # Shielded: a caller that gives up does not cancel the others' read.
        return await asyncio.shield(pending)

    async def _read(self, account: str) -> AccountSnapshot:
        with _translated():
            pool = await self._pool()
            async with pool.connection() as conn, conn.transaction():
                return await self._sql.read_async(conn, account)

    async def close(self) -> None:
        if self._owns_pool and self.pool is not None:
            await self.pool.close()
