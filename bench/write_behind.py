"""Write-behind figures: the syncer's drain rate, the lag under load, and the cost of durability.

    python -m bench.write_behind [--entries 50000] [--seconds 5]

Starts its own Redis (with an AOF, fsync every second) and PostgreSQL on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid

from redcredit.servers.postgres import EmbeddedPostgres
from redcredit.servers.redis import EmbeddedRedis

from .sections.write_behind import lag_under_load, measure_drain, spend_rate, syncer_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=50_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with EmbeddedRedis(appendonly=True) as redis_server, EmbeddedPostgres() as pg_server:
        base = syncer_settings(redis_server.url, pg_server.url, "b" + uuid.uuid4().hex[:8])

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
