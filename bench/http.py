"""The demo's non-streaming endpoint with and without the middleware, side by side.

    python -m bench.http [--seconds 5] [--concurrency 32]

Starts its own Redis and PostgreSQL, serves the demo app twice (gated and not)
with uvicorn in separate processes, loads each from this process over loopback
and prints requests/s and the latency the middleware adds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys

from redcredit.servers.postgres import EmbeddedPostgres
from redcredit.servers.redis import EmbeddedRedis

from .harness import drive_setup, percentile_ms
from .sections.http import CONCURRENCY, MODES, http_settings, post_complete, prepare, serve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    args = parser.parse_args()
    with EmbeddedRedis() as redis_server, EmbeddedPostgres() as pg_server:
        settings = http_settings(redis_server.url, pg_server.url)
        prepare(settings, args.concurrency)
        results = {}
        for mode in MODES:
            with serve(settings, mode) as port:
                load = drive_setup(post_complete(port), args.concurrency, args.seconds, sys.maxsize)
                results[mode] = sorted(asyncio.run(load)[2])
        print(f"POST /v1/complete, {args.concurrency} concurrent clients, {args.seconds:g} s each:")
        print(f"  {'':10} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
        for mode, latencies in results.items():
            rate = len(latencies) / args.seconds
            print(f"  {mode:10} {rate:>8,.0f} {percentile_ms(latencies, 0.5):>8.2f} "
                  f"{percentile_ms(latencies, 0.99):>8.2f}")  # fmt: skip
        gated, ungated = results["gated"], results["ungated"]
        print(f"  middleware: {len(gated) / len(ungated):.2f}x the requests/s; adds "
              f"{percentile_ms(gated, 0.5) - percentile_ms(ungated, 0.5):.2f} ms at p50 and "
              f"{percentile_ms(gated, 0.99) - percentile_ms(ungated, 0.99):.2f} ms at p99 "
              f"(mean {statistics.mean(gated) * 1000:.2f} ms)")  # fmt: skip


if __name__ == "__main__":
    main()
