"""The demo's non-streaming endpoint with and without the middleware, side by side.

    python -m bench.http [--seconds 5] [--concurrency 32]

Starts its own Redis and PostgreSQL, serves the demo app twice (gated and not)
with uvicorn in separate processes, loads each from this process over loopback
and prints requests/s and the latency the middleware adds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
import psycopg

from redcredit import Settings
from redcredit.backends.migrate import migrate
from redcredit.servers.postgres import EmbeddedPostgres
from redcredit.servers.redis import EmbeddedRedis
from redcredit.servers.spawn import free_port

SERVE = """
import sys, uvicorn
from redcredit import Settings
from redcredit.demo.app import build_app, demo_settings
settings = demo_settings(Settings.model_validate_json(sys.argv[1]))
uvicorn.run(build_app(settings, gated=sys.argv[2] == "gated"), host="127.0.0.1",
            port=int(sys.argv[3]), log_level="warning")
"""


async def load(port: int, seconds: float, concurrency: int) -> list[float]:
    """Keep-alive HTTP/1.1 over raw sockets: a client far lighter than the server it loads."""
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = (
            f"POST /v1/complete HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer bench-{i}\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        try:
            while (start := time.perf_counter()) < stop:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200"), head
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - start)
        finally:
            writer.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return latencies


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * fraction), len(ordered) - 1)] * 1000


@contextlib.contextmanager
def serve(settings: Settings, mode: str) -> Iterator[int]:
    """Serve the demo app (``gated`` or ``ungated``) in a child process; yields its port."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", SERVE, settings.model_dump_json(), mode, str(port)],
        env={**os.environ},
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/v1/account", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        yield port
    finally:
        server.terminate()
        server.wait(10)


def prepare(settings: Settings, concurrency: int) -> None:
    """Migrate PostgreSQL and put the callers on the paid plan."""
    from redcredit import RedCredit

    with psycopg.connect(str(settings.database_url), autocommit=True) as conn:
        migrate(conn, settings.pg_schema)
    with RedCredit(settings=settings) as rc:
        # Paid accounts: every call still runs the script and is journaled,
        # but no rate limit gets in the way of the measurement.
        for i in range(concurrency):
            rc.set_plan(f"bench-{i}", "paid")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    with EmbeddedRedis() as redis_server, EmbeddedPostgres() as pg_server:
        settings = Settings(
            redis_url=redis_server.url, database_url=pg_server.url,
            key_prefix="h" + uuid.uuid4().hex[:6],
        )  # fmt: skip
        prepare(settings, args.concurrency)
        results = {}
        for mode in ("ungated", "gated"):
            with serve(settings, mode) as port:
                results[mode] = asyncio.run(load(port, args.seconds, args.concurrency))
        print(f"POST /v1/complete, {args.concurrency} concurrent clients, {args.seconds:g} s each:")
        print(f"  {'':10} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
        for mode, latencies in results.items():
            rate = len(latencies) / args.seconds
            print(f"  {mode:10} {rate:>8,.0f} {percentile(latencies, 0.5):>8.2f} "
                  f"{percentile(latencies, 0.99):>8.2f}")  # fmt: skip
        gated, ungated = results["gated"], results["ungated"]
        print(f"  middleware: {len(gated) / len(ungated):.2f}x the requests/s; adds "
              f"{percentile(gated, 0.5) - percentile(ungated, 0.5):.2f} ms at p50 and "
              f"{percentile(gated, 0.99) - percentile(ungated, 0.99):.2f} ms at p99 "
              f"(mean {statistics.mean(gated) * 1000:.2f} ms)")  # fmt: skip


if __name__ == "__main__":
    main()
