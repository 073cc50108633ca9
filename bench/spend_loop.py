"""A quick figure: async spends per second from one process, against a local Redis.

    python -m bench.spend_loop [--seconds 5] [--concurrency 1 64]

Starts an embedded Redis unless REDCREDIT_REDIS_URL is set. The full
benchmark suite lives beside this file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import Iterator

from redcredit import AsyncRedCredit, Settings
from redcredit.servers.redis import EmbeddedRedis

from .harness import drive_setup, percentile_ms
from .sections.clients import spend_setup


@contextlib.contextmanager
def redis_url() -> Iterator[str]:
    url = os.environ.get("REDCREDIT_REDIS_URL")
    if url:
        yield url
        return
    with EmbeddedRedis() as server:
        yield server.url


async def measure(url: str, concurrency: int, seconds: float) -> tuple[float, float]:
    settings = Settings(redis_url=url, key_prefix="b" + uuid.uuid4().hex[:8], free_credits=2**52)
    async with AsyncRedCredit(settings=settings) as rc:
        await rc.spend("bench", cost=1)  # create the account, load the scripts
    load = spend_setup(settings, ["bench"])
    done, elapsed, latencies, _ = await drive_setup(load, concurrency, seconds, sys.maxsize)
    latencies.sort()
    return done / elapsed, percentile_ms(latencies, 0.99)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    args = parser.parse_args()
    with redis_url() as url:
        print(f"{'callers':>8}  {'spends/s':>10}  {'p99 ms':>7}")
        for concurrency in args.concurrency:
            rate, p99 = asyncio.run(measure(url, concurrency, args.seconds))
            print(f"{concurrency:>8}  {rate:>10,.0f}  {p99:>7.2f}")


if __name__ == "__main__":
    main()
