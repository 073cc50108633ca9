"""The write-behind side: the database-only design redcredit is measured against, and the
syncer's drain rate and lag into PostgreSQL (also run alone by ``python -m bench.write_behind``)."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta

import psycopg

from redcredit import AsyncRedCredit, Settings
from redcredit.backends.migrate import migrate
from redcredit.ledger.syncer import Syncer

from ..harness import (
    BIG,
    CONCURRENCY,
    SPREAD_ACCOUNTS,
    Config,
    MakeOp,
    Op,
    Results,
    Servers,
    async_point,
)

# --- the database-only design ---------------------------------------------------------------

UPDATE = (
    "UPDATE bench_accounts SET credits = credits - %(c)s "
    "WHERE id = %(id)s AND credits >= %(c)s RETURNING credits"
)


def run_db(cfg: Config, servers: Servers, res: Results) -> None:
    from psycopg_pool import AsyncConnectionPool

    url, pg_url = servers.redis_url, servers.postgres_url
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_accounts")
        conn.execute("CREATE TABLE bench_accounts (id int PRIMARY KEY, credits bigint NOT NULL)")
        conn.execute(
            "INSERT INTO bench_accounts SELECT g, %s FROM generate_series(1, %s) g",
            (BIG, SPREAD_ACCOUNTS),
        )
        conn.execute("VACUUM ANALYZE bench_accounts")
    for spread in (False, True):
        for callers in CONCURRENCY:

            async def setup(
                callers: int = callers, spread: bool = spread
            ) -> tuple[MakeOp, Callable[[], Awaitable[None]]]:
                size = min(callers, 64)
                pool = AsyncConnectionPool(
                    pg_url, min_size=size, max_size=size, open=False, kwargs={"autocommit": True}
                )
                await pool.open(wait=True)

                async def make_op(i: int) -> Op:
                    rng = random.Random(i)

                    async def op() -> int:
                        target = rng.randint(1, SPREAD_ACCOUNTS) if spread else 1
                        async with pool.connection() as conn:
                            cur = await conn.execute(UPDATE, {"c": 1, "id": target})
                            row = await cur.fetchone()
                        assert row is not None
                        return 1

                    return op

                return make_op, pool.close

            name = "database-only, spread 10k rows" if spread else "database-only, hot row"
            res.points.append(
                async_point(
                    cfg,
                    url,
                    "db",
                    name,
                    callers,
                    setup,
                    note=f"psycopg pool of {min(callers, 64)}; durable",
                )
            )


# --- the syncer -----------------------------------------------------------------------------


async def spend_rate(settings: Settings, seconds: float, callers: int = 64) -> float:
    async with AsyncRedCredit(settings=settings) as rc:
        accounts = [f"a{i}" for i in range(1000)]
        for account in accounts[:callers]:
            await rc.grant(account, 10**12)
        stop = time.perf_counter() + seconds
        done = 0

        async def worker(account: str) -> None:
            nonlocal done
            while time.perf_counter() < stop:
                await rc.spend(account, cost=1)
                done += 1

        began = time.perf_counter()
        await asyncio.gather(*(worker(a) for a in accounts[:callers]))
        return done / (time.perf_counter() - began)


async def journal_entries(settings: Settings, count: int) -> None:
    async with AsyncRedCredit(settings=settings) as rc:
        accounts = [f"d{i}" for i in range(10_000)]
        for start in range(0, count, 256):
            await asyncio.gather(
                *(rc.grant(accounts[i % len(accounts)], 1) for i in range(start, start + 256))
            )


def measure_drain(settings: Settings, entries: int, timeout_s: float) -> tuple[int, float]:
    """Journals about ``entries`` entries, then drains them: (entries drained, seconds)."""
    asyncio.run(journal_entries(settings, entries))
    with Syncer(settings) as syncer:
        waiting = syncer.lag().entries
        began = time.perf_counter()
        lag = syncer.drain(timeout_s=timeout_s)
        elapsed = time.perf_counter() - began
    if not lag.caught_up:
        raise RuntimeError(f"the syncer did not catch up in {timeout_s} s: {lag}")
    return waiting, elapsed


def lag_under_load(settings: Settings, seconds: float) -> tuple[float, int, int]:
    """Spends for ``seconds`` beside a running syncer: (spends/s, highest lag in entries and ms)."""
    with Syncer(settings) as syncer:
        syncer.start()
        highest = [0, 0]

        async def load_and_watch() -> float:
            task = asyncio.create_task(spend_rate(settings, seconds))
            while not task.done():
                lag = syncer.lag()
                highest[0] = max(highest[0], lag.entries)
                highest[1] = max(highest[1], lag.oldest_age_ms or 0)
                await asyncio.sleep(0.05)
            return await task

        rate = asyncio.run(load_and_watch())
        syncer.stop()
        syncer.drain(timeout_s=120)
    return rate, highest[0], highest[1]


def syncer_settings(redis_url: str, pg_url: str, key_prefix: str) -> Settings:
    """Settings for a syncer run, with the ledger's tables migrated."""
    settings = Settings(
        redis_url=redis_url,
        database_url=pg_url,
        key_prefix=key_prefix,
        sync_interval=timedelta(milliseconds=50),
    )
    with psycopg.connect(pg_url, autocommit=True) as conn:
        migrate(conn, settings.pg_schema)
    return settings


def run_syncer(cfg: Config, servers: Servers, res: Results) -> None:
    base = syncer_settings(servers.redis_url, servers.postgres_url, "s" + uuid.uuid4().hex[:8])
    drain_settings = base.model_copy(update={"key_prefix": base.key_prefix + "d"})
    waiting, elapsed = measure_drain(drain_settings, cfg.drain_entries, timeout_s=120)
    res.syncer["drain_entries"] = waiting
    res.syncer["drain_seconds"] = elapsed
    res.syncer["drain_rate"] = waiting / elapsed
    res.syncer["drain_caught_up"] = True
    print(f"  syncer drain: {waiting:,} entries in {elapsed:.2f} s = {waiting / elapsed:,.0f}/s")

    load_settings = base.model_copy(update={"key_prefix": base.key_prefix + "l"})
    seconds = max(cfg.seconds * 3, 1.0)
    rate, highest_entries, highest_ms = lag_under_load(load_settings, seconds)
    res.syncer["load_spend_rate"] = rate
    res.syncer["load_seconds"] = seconds
    res.syncer["highest_lag_entries"] = highest_entries
    res.syncer["highest_lag_ms"] = highest_ms
    print(
        f"  syncer under load: {rate:,.0f} spends/s, highest lag {highest_entries:,} entries, "
        f"{highest_ms} ms"
    )
