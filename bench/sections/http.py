"""The demo's non-streaming endpoint with and without the middleware, side by side (also run
alone by ``python -m bench.http``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
import psycopg

from redcredit import RedCredit, Settings
from redcredit.backends.migrate import migrate
from redcredit.servers.spawn import free_port

from ..harness import Config, Op, Results, Servers, Setup, async_point, over_sockets

CONCURRENCY = 16
MODES = ("ungated", "gated")

SERVE = """
import sys, uvicorn
from redcredit import Settings
from redcredit.demo.app import build_app, demo_settings
settings = demo_settings(Settings.model_validate_json(sys.argv[1]))
uvicorn.run(build_app(settings, gated=sys.argv[2] == "gated"), host="127.0.0.1",
            port=int(sys.argv[3]), log_level="warning")
"""


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
    with psycopg.connect(str(settings.database_url), autocommit=True) as conn:
        migrate(conn, settings.pg_schema)
    with RedCredit(settings=settings) as rc:
        # Paid accounts: every call still runs the script and is journaled,
        # but no rate limit gets in the way of the measurement.
        for i in range(concurrency):
            rc.set_plan(f"bench-{i}", "paid")


def http_settings(redis_url: str, pg_url: str) -> Settings:
    return Settings(redis_url=redis_url, database_url=pg_url, key_prefix="h" + uuid.uuid4().hex[:6])


def post_complete(port: int) -> Setup:
    """Keep-alive HTTP/1.1 over raw sockets, worker ``i`` as caller ``bench-i``: a client far
    lighter than the server it loads."""

    def make(i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Op:
        request = (
            f"POST /v1/complete HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer bench-{i}\r\nContent-Length: 0\r\n\r\n"
        ).encode()

        async def op() -> int:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            return 1

        return op

    return over_sockets(port, make)


def run(cfg: Config, servers: Servers, res: Results) -> None:
    url = servers.redis_url
    settings = http_settings(url, servers.postgres_url)
    prepare(settings, CONCURRENCY)
    for mode in MODES:
        with serve(settings, mode) as port:
            res.points.append(
                async_point(
                    cfg,
                    url,
                    "http",
                    f"demo POST /v1/complete, {mode}",
                    CONCURRENCY,
                    post_complete(port),
                    note="client CPU is the load generator's, not the server's",
                )
            )
