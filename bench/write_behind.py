"""Write-behind figures: the syncer's drain rate, the lag under load, and the cost of durability.

    python -m bench.write_behind [--entries 50000] [--seconds 5]

Starts its own Redis (with an AOF, fsync every second) and PostgreSQL on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from datetime import timedelta

import psycopg

from redcredit import AsyncRedCredit, Settings
from redcredit.backends.migrate import migrate
from redcredit.ledger.syncer import Syncer
from redcredit.servers.postgres import EmbeddedPostgres
from redcredit.servers.redis import EmbeddedRedis


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=50_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with EmbeddedRedis(appendonly=True) as redis_server, EmbeddedPostgres() as pg_server:
        base = Settings(
            redis_url=redis_server.url,
            database_url=pg_server.url,
            key_prefix="b" + uuid.uuid4().hex[:8],
            sync_interval=timedelta(milliseconds=50),
        )
        with psycopg.connect(pg_server.url, autocommit=True) as conn:
            migrate(conn, base.pg_schema)

        none = asyncio.run(spend_rate(base, args.seconds))
        aof_settings = base.model_copy(update={"durability": "aof", "key_prefix": "aof"})
        aof = asyncio.run(spend_rate(aof_settings, args.seconds))
        print("async spends/s, 64 callers, one process (AOF on, fsync every second):")
        print(f"  durability=none  {none:>9,.0f}")
        print(f"  durability=aof   {aof:>9,.0f}   ({aof / none:.2f}x: WAITAOF waits for the fsync)")

        drain_settings = base.model_copy(update={"key_prefix": "drain"})
        waiting, elapsed = measure_drain(drain_settings, args.entries, timeout_s=600)
        print(f"drain: {waiting:,} entries into PostgreSQL in {elapsed:.2f} s "
              f"= {waiting / elapsed:,.0f} entries/s")  # fmt: skip

        load_settings = base.model_copy(update={"key_prefix": "load"})
        rate, highest_entries, highest_ms = lag_under_load(load_settings, args.seconds)
        print(f"under load ({rate:,.0f} spends/s with the syncer running): highest lag "
              f"{highest_entries:,} entries, oldest entry {highest_ms} ms")  # fmt: skip


if __name__ == "__main__":
    main()
