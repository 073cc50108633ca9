"""redcredit's benchmark suite: every design side by side, on the same servers, in one run.

    python -m bench                 # full mode: 5 runs of 3 s per point (~8 minutes)
    python -m bench --quick         # 3 runs of 0.3 s per point, whole run under a minute
    python -m bench --quick --only ceiling,async,memory
    python -m bench --out DIR       # results go to DIR instead of bench/results/<timestamp>/

It starts its own servers the way the tests do (``EmbeddedRedis``, and
``EmbeddedPostgres`` when a section needs one), talks to them over loopback
only, and bounds every load both in time (``--seconds`` per run) and in count
(``--max-ops`` calls per run). Sections (``--only`` takes a comma-separated list):

``ceiling``
    What Redis itself gives for redcredit's debit script: a minimal asyncio RESP
    client (replies parsed by hiredis) sending ``EVALSHA`` with the exact keys and arguments that
    ``Engine.spend`` builds, unpipelined (64 connections, one call in flight on
    each) and pipelined (16 connections, 16 calls per write); raw redis-py, one
    call per round trip, 64 callers; and ``redis-benchmark`` (or
    ``valkey-benchmark``) when one is on PATH or beside the server binary.
``async``   ``AsyncRedCredit.spend`` on one hot account at 1, 16, 64, 256 callers.
``sync``    ``RedCredit.spend`` in 1 and in 4 processes (one caller each).
``db``      the database-only design, ``UPDATE accounts SET credits = credits - $1
            WHERE id = $2 AND credits >= $1 RETURNING credits`` through a psycopg
            async pool, on one hot row and spread over 10k rows, at 1..256 callers.
            (The embedded PostgreSQL runs durably, fsync and synchronous commit on,
            as a system of record does.)
``limits``  the ``limits`` library (limits.aio, moving window at every concurrency,
            fixed window at 64) against the same Redis.
``reserve`` a reserve -> settle cycle (two scripts), 64 callers, one account each.
``chat``    ``chat_turn`` with two rate limits configured (large, so none refuses).
``spread``  ``AsyncRedCredit.spend`` at 64 callers over 10k accounts (vs one hot one).
``syncer``  the syncer's drain rate into PostgreSQL, and the lag it reaches while
            spends run (the logic of ``bench/write_behind.py``).
``memory``  ``MEMORY USAGE`` of an idle account, and of one with an active hold
            (its hash, holds set and reservation record), plus bytes per journal entry.
``http``    the demo's ``POST /v1/complete`` with and without the middleware
            (``bench/http.py``), 16 keep-alive connections.

For every point it reports calls/s (median of the runs, with min-max), the
p50/p99/p99.9 latency of single calls (for pipelined points: the round trip of
the batch), the CPU of this client process (``time.process_time`` over wall
time; for the multi-process points, the sum over the processes) and the CPU of
Redis (``used_cpu_user + used_cpu_sys`` of ``INFO cpu``, before and after),
and for the ``db`` section of PostgreSQL (postmaster and backends, from
``/proc``); 100% is one core. It
prints a table, a table of ratios against the issue's targets (met / missed),
and writes ``results.json``, ``results.md`` and PNG plots (throughput and p99
against concurrency) with machine info (CPU count, Python, Redis/Valkey and
PostgreSQL versions).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hiredis
import psycopg
import redis

from redcredit import AsyncRedCredit, RedCredit, Settings
from redcredit.config import LimitSettings, PlanSettings
from redcredit.core.engine import Engine, ScriptCall
from redcredit.servers.postgres import EmbeddedPostgres
from redcredit.servers.redis import EmbeddedRedis, find_redis_server

from .sync_worker import sync_worker

SECTIONS = (
    "ceiling",
    "async",
    "sync",
    "db",
    "limits",
    "reserve",
    "chat",
    "spread",
    "syncer",
    "memory",
    "http",
)
NEEDS_POSTGRES = {"db", "syncer", "http"}
CONCURRENCY = (1, 16, 64, 256)
SPREAD_ACCOUNTS = 10_000
BIG = 2**52

Op = Callable[[], Awaitable[int]]  # one call (or batch); returns how many calls it made
MakeOp = Callable[[int], Awaitable[Op]]  # worker index -> its op


@dataclass
class Config:
    runs: int
    seconds: float
    max_ops: int
    drain_entries: int
    quick: bool


@dataclass
class Point:
    section: str
    system: str
    callers: int
    rates: list[float]
    p50_ms: float
    p99_ms: float
    p999_ms: float
    client_cpu: float  # fraction of one core
    redis_cpu: float | None
    calls: int
    note: str = ""
    postgres_cpu: float | None = None

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)


@dataclass
class Results:
    started: str
    mode: str
    machine: dict[str, Any]
    points: list[Point] = field(default_factory=list)
    syncer: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def find(self, system: str, callers: int | None = None) -> Point | None:
        for point in self.points:
            if point.system == system and (callers is None or point.callers == callers):
                return point
        return None


# --- measuring ------------------------------------------------------------------------------


def percentile_ms(ordered: list[float], fraction: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(int(len(ordered) * fraction), len(ordered) - 1)] * 1000


PG_PID: list[int] = []  # the postmaster, when PostgreSQL runs


def pg_cpu() -> float | None:
    """CPU seconds of the postmaster, its reaped children and its live backends (from /proc)."""
    if not PG_PID:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(stat.parent.name), int(fields[1])
        if pid == PG_PID[0]:
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        elif ppid == PG_PID[0]:
            total += int(fields[11]) + int(fields[12])
    return total / tick


def redis_cpu(url: str) -> float:
    with redis.Redis.from_url(url) as conn:
        info = conn.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def drive(
    make_op: MakeOp, concurrency: int, seconds: float, max_ops: int
) -> tuple[int, float, list[float]]:
    """Runs ``concurrency`` workers until ``seconds`` pass or ``max_ops`` calls are made."""
    ops = await asyncio.gather(*(make_op(i) for i in range(concurrency)))
    latencies: list[float] = []
    done = 0
    began = time.perf_counter()
    stop = began + seconds

    async def worker(op: Op) -> None:
        nonlocal done
        while done < max_ops and (start := time.perf_counter()) < stop:
            n = await op()
            elapsed = time.perf_counter() - start
            latencies.extend([elapsed] * n)
            done += n

    await asyncio.gather(*(worker(op) for op in ops))
    return done, time.perf_counter() - began, latencies


def measure(
    cfg: Config,
    redis_url: str,
    section: str,
    system: str,
    callers: int,
    run_once: Callable[[], tuple[int, float, list[float], float]],
    note: str = "",
) -> Point:
    """Repeats ``run_once`` (calls, wall, latencies, client cpu-seconds) ``cfg.runs`` times."""
    rates: list[float] = []
    latencies: list[float] = []
    cpu = wall = rcpu = pcpu = 0.0
    calls = 0
    for _ in range(cfg.runs):
        r0, p0 = redis_cpu(redis_url), pg_cpu()
        done, elapsed, lat, cpu_s = run_once()
        rcpu += redis_cpu(redis_url) - r0
        p1 = pg_cpu()
        pcpu += (p1 - p0) if p0 is not None and p1 is not None else 0.0
        rates.append(done / elapsed)
        latencies += lat
        cpu += cpu_s
        wall += elapsed
        calls += done
    latencies.sort()
    point = Point(
        section,
        system,
        callers,
        rates,
        percentile_ms(latencies, 0.5),
        percentile_ms(latencies, 0.99),
        percentile_ms(latencies, 0.999),
        cpu / wall,
        rcpu / wall,
        calls,
        note,
        pcpu / wall if section == "db" else None,
    )
    print(f"  {system:<34} {callers:>4}  {point.rate:>10,.0f}/s  p99 {point.p99_ms:6.2f} ms")
    return point


def async_point(
    cfg: Config,
    redis_url: str,
    section: str,
    system: str,
    callers: int,
    setup: Callable[[], Awaitable[tuple[MakeOp, Callable[[], Awaitable[None]]]]],
    note: str = "",
    workers: int | None = None,
) -> Point:
    """An asyncio load in this process; ``setup`` gives the op factory and a cleanup.

    ``callers`` is what the report shows (calls in flight); ``workers`` how many
    coroutines run (fewer than ``callers`` when each sends a pipelined batch).
    """

    def run_once() -> tuple[int, float, list[float], float]:
        async def go() -> tuple[int, float, list[float], float]:
            make_op, cleanup = await setup()
            try:
                c0 = time.process_time()
                done, elapsed, lat = await drive(
                    make_op, workers or callers, cfg.seconds, cfg.max_ops
                )
                return done, elapsed, lat, time.process_time() - c0
            finally:
                await cleanup()

        return asyncio.run(go())

    return measure(cfg, redis_url, section, system, callers, run_once, note)


# --- a minimal RESP client ------------------------------------------------------------------


def resp_command(*parts: str | int | bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def evalsha_bytes(call: ScriptCall) -> bytes:
    return resp_command("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)


def spend_call(settings: Settings, account: str) -> ScriptCall:
    step = next(Engine(settings).spend(account, cost=1))
    assert isinstance(step, ScriptCall)
    return step


# --- sections -------------------------------------------------------------------------------


def rc_settings(redis_url: str, **update: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "key_prefix": "b" + uuid.uuid4().hex[:8],
        "free_credits": BIG,
        "free_chat_messages": BIG,
        "redis_max_connections": 256,
    }
    return Settings(**{**values, **update})


def trim_journals(settings: Settings) -> None:
    """Spends are journaled; dropping the streams between points keeps Redis memory flat."""
    with redis.Redis.from_url(str(settings.redis_url)) as conn:
        conn.delete(*Engine(settings).keys.journals())


async def warm(rc: AsyncRedCredit, accounts: list[str]) -> None:
    for start in range(0, len(accounts), 512):
        await asyncio.gather(*(rc.grant(a, 1) for a in accounts[start : start + 512]))


def section_ceiling(cfg: Config, url: str, port: int, res: Results) -> None:
    settings = rc_settings(url)
    with RedCredit(settings=settings) as rc:
        rc.spend("hot", cost=1)  # creates the account and loads the script
    call = spend_call(settings, "hot")
    one = evalsha_bytes(call)

    def raw(depth: int) -> Callable[[], Awaitable[tuple[MakeOp, Callable[[], Awaitable[None]]]]]:
        async def setup() -> tuple[MakeOp, Callable[[], Awaitable[None]]]:
            writers: list[asyncio.StreamWriter] = []
            batch = one * depth

            async def make_op(i: int) -> Op:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writers.append(writer)

                parser = hiredis.Reader()

                async def op() -> int:
                    writer.write(batch)
                    got = 0
                    while got < depth:
                        parser.feed(await reader.read(1 << 16))
                        while (reply := parser.gets()) is not False:
                            assert reply[0] == 0, reply
                            got += 1
                    return depth

                return op

            async def cleanup() -> None:
                for writer in writers:
                    writer.close()

            return make_op, cleanup

        return setup

    res.points.append(async_point(cfg, url, "ceiling", "raw RESP EVALSHA, unpipelined", 64, raw(1)))
    res.points.append(
        async_point(
            cfg,
            url,
            "ceiling",
            "raw RESP EVALSHA, pipelined x16",
            256,
            raw(16),
            note="16 connections x 16 calls per write",
            workers=16,
        )
    )

    async def redis_py() -> tuple[MakeOp, Callable[[], Awaitable[None]]]:
        client = redis.asyncio.Redis.from_url(url, max_connections=64)

        async def make_op(i: int) -> Op:
            async def op() -> int:
                await client.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
                return 1

            return op

        return make_op, client.aclose

    res.points.append(
        async_point(cfg, url, "ceiling", "redis-py EVALSHA, 1 call/round trip", 64, redis_py)
    )
    trim_journals(settings)
    beside = Path(find_redis_server()).parent
    binary = (
        shutil.which("redis-benchmark")
        or shutil.which("valkey-benchmark")
        or next(
            (
                str(p)
                for p in (beside / "redis-benchmark", beside / "valkey-benchmark")
                if p.is_file()
            ),
            None,
        )
    )
    if binary:
        n = min(cfg.max_ops, 200_000 if not cfg.quick else 20_000)
        args = ["EVALSHA", call.script.sha, str(len(call.keys)), *map(str, call.keys)]
        args += [str(a) for a in call.args]
        for pipeline in (1, 16):
            done = subprocess.run(
                [
                    binary,
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-c",
                    "64",
                    "-n",
                    str(n),
                    "-P",
                    str(pipeline),
                    "-q",
                    *args,
                ],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            res.extra[f"redis-benchmark -P {pipeline}"] = done.stdout.strip()[-300:]
        trim_journals(settings)
    else:
        res.extra["redis-benchmark"] = "not on PATH (optional)"


def spend_setup(
    settings: Settings, accounts: list[str]
) -> Callable[[], Awaitable[tuple[MakeOp, Callable[[], Awaitable[None]]]]]:
    async def setup() -> tuple[MakeOp, Callable[[], Awaitable[None]]]:
        rc = AsyncRedCredit(settings=settings)

        async def make_op(i: int) -> Op:
            if len(accounts) == 1:
                account = accounts[0]

                async def op() -> int:
                    await rc.spend(account, cost=1)
                    return 1

                return op
            choice = random.Random(i).choice

            async def op_spread() -> int:
                await rc.spend(choice(accounts), cost=1)
                return 1

            return op_spread

        return make_op, rc.close

    return setup


def section_async(cfg: Config, url: str, res: Results) -> None:
    settings = rc_settings(url)
    asyncio.run(_warm_with(settings, ["hot"]))
    for callers in CONCURRENCY:
        setup = spend_setup(settings, ["hot"])
        res.points.append(async_point(cfg, url, "async", "redcredit async spend", callers, setup))
        trim_journals(settings)


async def _warm_with(settings: Settings, accounts: list[str]) -> None:
    async with AsyncRedCredit(settings=settings) as rc:
        await warm(rc, accounts)


def section_spread(cfg: Config, url: str, res: Results) -> None:
    settings = rc_settings(url)
    accounts = [f"user-{i}" for i in range(SPREAD_ACCOUNTS)]
    asyncio.run(_warm_with(settings, accounts))
    setup = spend_setup(settings, accounts)
    res.points.append(
        async_point(cfg, url, "spread", "redcredit async spend, 10k accounts", 64, setup)
    )
    trim_journals(settings)


def section_sync(cfg: Config, url: str, res: Results) -> None:
    settings = rc_settings(url)
    ctx = multiprocessing.get_context("spawn")
    for processes in (1, 4):
        barrier = ctx.Barrier(processes + 1)
        queue = ctx.Queue()
        per_process = max(1, cfg.max_ops // processes)
        children = [
            ctx.Process(
                target=sync_worker,
                args=(
                    settings.model_dump_json(),
                    cfg.runs,
                    cfg.seconds,
                    per_process,
                    barrier,
                    queue,
                ),
                daemon=True,
            )
            for _ in range(processes)
        ]
        for child in children:
            child.start()

        def run_once(
            processes: int = processes, barrier: Any = barrier, queue: Any = queue
        ) -> tuple[int, float, list[float], float]:
            barrier.wait(timeout=30)
            parts = [queue.get(timeout=cfg.seconds + 60) for _ in range(processes)]
            done = sum(p[0] for p in parts)
            wall = max(p[1] for p in parts)
            return done, wall, [x for p in parts for x in p[2]], sum(p[3] for p in parts)

        try:
            res.points.append(
                measure(
                    cfg,
                    url,
                    "sync",
                    f"redcredit sync spend, {processes} process(es)",
                    processes,
                    run_once,
                    note=f"{processes} process(es), one caller each",
                )
            )
        finally:
            for child in children:
                child.join(10)
                if child.is_alive():
                    child.kill()
        trim_journals(settings)


def section_db(cfg: Config, url: str, pg_url: str, res: Results) -> None:
    from psycopg_pool import AsyncConnectionPool

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_accounts")
        conn.execute("CREATE TABLE bench_accounts (id int PRIMARY KEY, credits bigint NOT NULL)")
        conn.execute(
            "INSERT INTO bench_accounts SELECT g, %s FROM generate_series(1, %s) g",
            (BIG, SPREAD_ACCOUNTS),
        )
        conn.execute("VACUUM ANALYZE bench_accounts")
    update = (
        "UPDATE bench_accounts SET credits = credits - %(c)s "
        "WHERE id = %(id)s AND credits >= %(c)s RETURNING credits"
    )
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
                            cur = await conn.execute(update, {"c": 1, "id": target})
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


def section_limits(cfg: Config, url: str, port: int, res: Results) -> None:
    from limits import parse
    from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter
    from limits.storage import storage_from_string

    item = parse("1000000000/second")
    runs = [("moving", c) for c in CONCURRENCY] + [("fixed", 64)]
    for kind, callers in runs:

        async def setup(kind: str = kind) -> tuple[MakeOp, Callable[[], Awaitable[None]]]:
            storage = storage_from_string(f"async+redis://127.0.0.1:{port}")
            cls = MovingWindowRateLimiter if kind == "moving" else FixedWindowRateLimiter
            limiter = cls(storage)  # type: ignore[arg-type]

            async def make_op(i: int) -> Op:
                async def op() -> int:
                    assert await limiter.hit(item, "bench", "hot")
                    return 1

                return op

            async def cleanup() -> None:
                await storage.reset()

            return make_op, cleanup

        res.points.append(
            async_point(cfg, url, "limits", f"limits {kind} window hit", callers, setup)
        )


def section_reserve(cfg: Config, url: str, res: Results) -> None:
    settings = rc_settings(url)
    accounts = [f"r{i}" for i in range(64)]
    asyncio.run(_warm_with(settings, accounts))

    async def setup() -> tuple[MakeOp, Callable[[], Awaitable[None]]]:
        rc = AsyncRedCredit(settings=settings)

        async def make_op(i: int) -> Op:
            async def op() -> int:
                held = await rc.reserve(accounts[i], 10, ttl=60)
                await rc.settle(held, 5)
                return 1

            return op

        return make_op, rc.close

    res.points.append(
        async_point(
            cfg,
            url,
            "reserve",
            "redcredit reserve -> settle cycle",
            64,
            setup,
            note="cycles/s; two scripts per cycle",
        )
    )
    trim_journals(settings)


def section_chat(cfg: Config, url: str, res: Results) -> None:
    plan = PlanSettings(
        limits=(
            LimitSettings(name="rpm", rate=10**9, period=timedelta(seconds=1)),
            LimitSettings(name="tpm", kind="credits", rate=10**9, period=timedelta(seconds=1)),
        )
    )
    settings = rc_settings(url, plans={"free": plan})
    accounts = [f"c{i}" for i in range(64)]
    asyncio.run(_warm_with(settings, accounts))

    async def setup() -> tuple[MakeOp, Callable[[], Awaitable[None]]]:
        rc = AsyncRedCredit(settings=settings)

        async def make_op(i: int) -> Op:
            async def op() -> int:
                await rc.chat_turn(accounts[i], cost=1)
                return 1

            return op

        return make_op, rc.close

    res.points.append(
        async_point(
            cfg,
            url,
            "chat",
            "redcredit chat_turn, 2 rate limits",
            64,
            setup,
            note="one account per caller; limits never refuse",
        )
    )
    trim_journals(settings)


def section_syncer(cfg: Config, url: str, pg_url: str, res: Results) -> None:
    from redcredit.backends.migrate import migrate

    from .write_behind import lag_under_load, measure_drain

    base = Settings(
        redis_url=url,
        database_url=pg_url,
        key_prefix="s" + uuid.uuid4().hex[:8],
        sync_interval=timedelta(milliseconds=50),
    )
    with psycopg.connect(pg_url, autocommit=True) as conn:
        migrate(conn, base.pg_schema)
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


def section_memory(url: str, res: Results) -> None:
    settings = rc_settings(url, free_credits=100, free_chat_messages=20)
    engine = Engine(settings)

    async def go() -> tuple[str, str]:
        async with AsyncRedCredit(settings=settings) as rc:
            await rc.spend("idle-account", cost=1)
            await rc.spend("held-account", cost=1)
            held = await rc.reserve("held-account", 10, ttl=600)
            for i in range(1000):
                await rc.grant(f"j{i}", 1)
            return held.id, held.account

    reservation_id, account = asyncio.run(go())
    with redis.Redis.from_url(url) as conn:

        def usage(key: str) -> int:
            return int(conn.memory_usage(key, samples=0) or 0)

        idle = engine.keys.for_account("idle-account")
        keys = engine.keys.for_account(account)
        res.memory["idle_account_bytes"] = usage(idle.hash)
        res.memory["held_account_hash_bytes"] = usage(keys.hash)
        res.memory["held_holds_set_bytes"] = usage(keys.holds)
        res.memory["held_reservation_record_bytes"] = usage(keys.reservation(reservation_id))
        res.memory["held_account_total_bytes"] = (
            res.memory["held_account_hash_bytes"]
            + res.memory["held_holds_set_bytes"]
            + res.memory["held_reservation_record_bytes"]
        )
        entries = used = 0
        for journal in engine.keys.journals():
            entries += int(conn.xlen(journal))
            used += usage(journal)
        res.memory["journal_bytes_per_entry"] = used / max(entries, 1)
    print(f"  memory: {res.memory}")
    trim_journals(settings)


def section_http(cfg: Config, url: str, pg_url: str, res: Results) -> None:
    from .http import prepare, serve

    concurrency = 16
    settings = Settings(redis_url=url, database_url=pg_url, key_prefix="h" + uuid.uuid4().hex[:6])
    prepare(settings, concurrency)
    request_for = [
        (
            f"POST /v1/complete HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer bench-{i}\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        for i in range(concurrency)
    ]
    for mode in ("ungated", "gated"):
        with serve(settings, mode) as port:

            async def setup(port: int = port) -> tuple[MakeOp, Callable[[], Awaitable[None]]]:
                writers: list[asyncio.StreamWriter] = []

                async def make_op(i: int) -> Op:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    writers.append(writer)

                    async def op() -> int:
                        writer.write(request_for[i])
                        head = await reader.readuntil(b"\r\n\r\n")
                        assert head.startswith(b"HTTP/1.1 200"), head
                        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                        await reader.readexactly(length)
                        return 1

                    return op

                async def cleanup() -> None:
                    for writer in writers:
                        writer.close()

                return make_op, cleanup

            res.points.append(
                async_point(
                    cfg,
                    url,
                    "http",
                    f"demo POST /v1/complete, {mode}",
                    concurrency,
                    setup,
                    note="client CPU is the load generator's, not the server's",
                )
            )


# --- report ---------------------------------------------------------------------------------


def machine_info(redis_url: str, pg_url: str | None) -> dict[str, Any]:
    with redis.Redis.from_url(redis_url) as conn:
        server = conn.info("server")
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "redis_server": server.get("server_name", "redis"),
        "redis_version": server.get("valkey_version") or server.get("redis_version"),
    }
    if pg_url is not None:
        with psycopg.connect(pg_url) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        info["postgresql_version"] = row[0] if row else None
    return info


def ratios(res: Results) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, num: Point | None, den: Point | None, target: float) -> None:
        value = num.rate / den.rate if num and den else None
        out.append(ratio_row(name, value, f">= {target:g}x", value is not None and value >= target))

    hot = res.find("redcredit async spend", 64)
    spread = res.find("redcredit async spend, 10k accounts", 64)
    add(
        "async spend 64 / ceiling pipelined", hot, res.find("raw RESP EVALSHA, pipelined x16"), 0.35
    )
    add(
        "async spend 64 / raw redis-py 1 call/RTT",
        hot,
        res.find("redis-py EVALSHA, 1 call/round trip"),
        3,
    )
    add("async spend 64 / database-only hot", hot, res.find("database-only, hot row", 64), 10)
    add(
        "async spend 64 (10k accts) / database-only spread",
        spread,
        res.find("database-only, spread 10k rows", 64),
        5,
    )
    limits = [
        p
        for p in (res.find("limits moving window hit", 64), res.find("limits fixed window hit", 64))
        if p
    ]
    add(
        "async spend 64 / limits (faster window)",
        hot,
        max(limits, key=lambda p: p.rate) if limits else None,
        3,
    )
    p99 = hot.p99_ms if hot else None
    out.append(ratio_row("p99 at 64 callers (ms)", p99, "<= 5 ms", p99 is not None and p99 <= 5))
    spends = [
        p.rate for p in res.points if p.system.startswith("redcredit") and "spend" in p.system
    ]
    drain = res.syncer.get("drain_rate")
    value = drain / max(spends) if drain and spends else None
    out.append(
        ratio_row(
            "drain / highest spend rate", value, ">= 1.5x", value is not None and value >= 1.5
        )
    )
    idle = res.memory.get("idle_account_bytes")
    out.append(
        ratio_row(
            "Redis bytes per idle account", idle, "<= 200 B", idle is not None and idle <= 200
        )
    )
    return out


def ratio_row(name: str, value: float | None, target: str, met: bool) -> dict[str, Any]:
    status = "n/a" if value is None else ("met" if met else "MISSED")
    return {"measure": name, "value": value, "target": target, "status": status}


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def tables(res: Results, rows: list[dict[str, Any]]) -> tuple[str, str]:
    head = (
        "| section | system | callers | calls/s (median) | min-max | p50 ms | p99 ms "
        "| p99.9 ms | client CPU | Redis CPU | PostgreSQL CPU |"
    )
    lines = [head, "|" + "---|" * 11]
    for p in res.points:
        redis_share = "-" if p.redis_cpu is None else f"{p.redis_cpu:.0%}"
        pg_share = "-" if p.postgres_cpu is None else f"{p.postgres_cpu:.0%}"
        lines.append(
            f"| {p.section} | {p.system} | {p.callers} | {p.rate:,.0f} | "
            f"{min(p.rates):,.0f}-{max(p.rates):,.0f} | {p.p50_ms:.2f} | {p.p99_ms:.2f} | "
            f"{p.p999_ms:.2f} | {p.client_cpu:.0%} | {redis_share} | {pg_share} |"
        )
    ratio_lines = ["| measure | value | target | status |", "|---|---|---|---|"]
    for r in rows:
        ratio_lines.append(
            f"| {r['measure']} | {fmt(r['value'])} | {r['target']} | {r['status']} |"
        )
    return "\n".join(lines), "\n".join(ratio_lines)


def plot(res: Results, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[Point]] = {}
    for p in res.points:
        series.setdefault(p.system, []).append(p)
    series = {k: sorted(v, key=lambda p: p.callers) for k, v in series.items() if len(v) > 1}
    if not series:
        return []
    written = []
    for metric, label, name in (
        ("rate", "calls/s", "throughput.png"),
        ("p99_ms", "p99 latency (ms)", "p99.png"),
    ):
        fig, ax = plt.subplots(figsize=(8, 5))
        for system, points in series.items():
            ax.plot(
                [p.callers for p in points],
                [getattr(p, metric) for p in points],
                "o-",
                label=system,
            )
        if metric == "rate":
            for ceiling, style in (("raw RESP EVALSHA, pipelined x16", "--"),
                                   ("raw RESP EVALSHA, unpipelined", ":")):  # fmt: skip
                point = res.find(ceiling)
                if point is not None:
                    ax.axhline(
                        point.rate, color="grey", linestyle=style, label=f"ceiling: {ceiling}"
                    )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent callers")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs concurrency ({res.mode})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def write(res: Results, out: Path) -> None:
    rows = ratios(res)
    table, ratio_table = tables(res, rows)
    out.mkdir(parents=True, exist_ok=True)
    plots = plot(res, out)
    data = {
        "started": res.started,
        "mode": res.mode,
        "machine": res.machine,
        "points": [{**asdict(p), "rate": p.rate} for p in res.points],
        "ratios": rows,
        "syncer": res.syncer,
        "memory": res.memory,
        "extra": res.extra,
        "plots": plots,
    }
    (out / "results.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    machine = ", ".join(f"{k}: {v}" for k, v in res.machine.items())
    extra = "\n".join(f"- {k}: {v}" for k, v in {**res.syncer, **res.memory, **res.extra}.items())
    md = (
        f"# redcredit benchmark ({res.mode}, {res.started})\n\n{machine}\n\n{table}\n\n"
        f"## Ratios and targets\n\n{ratio_table}\n\n## Syncer, memory, other\n\n{extra}\n"
        + "".join(f"\n![{p}]({p})\n" for p in plots)
    )
    (out / "results.md").write_text(md)
    print(f"\nMachine: {machine}\n\n{table}\n\n{ratio_table}\n")
    if extra:
        print(extra)
    print(f"\nwritten to {out}")


# --- main -----------------------------------------------------------------------------------


@contextlib.contextmanager
def postgres(needed: bool) -> Iterator[str | None]:
    if not needed:
        yield None
        return
    # Durable, as a system of record runs: fsync and synchronous commit on.
    with EmbeddedPostgres(durable=True) as server:
        if server.pid is not None:
            PG_PID[:] = [server.pid]
        yield server.url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="3 short runs per point")
    parser.add_argument(
        "--only", default="", help="comma-separated sections: " + ",".join(SECTIONS)
    )
    parser.add_argument("--runs", type=int, help="runs per point (default 3 quick, 5 full)")
    parser.add_argument("--seconds", type=float, help="seconds per run (0.3 quick, 3 full)")
    parser.add_argument("--max-ops", type=int, help="most calls per run (default 1,000,000)")
    parser.add_argument("--out", type=Path, help="output directory")
    args = parser.parse_args(argv)
    only = [s for s in args.only.split(",") if s] or list(SECTIONS)
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    cfg = Config(
        runs=args.runs or (3 if args.quick else 5),
        seconds=args.seconds or (0.3 if args.quick else 3.0),
        max_ops=args.max_ops or 1_000_000,
        drain_entries=20_000 if args.quick else 100_000,
        quick=args.quick,
    )
    started = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or Path(__file__).resolve().parent / "results" / started
    with EmbeddedRedis() as redis_server, postgres(bool(NEEDS_POSTGRES & set(only))) as pg_url:
        url, port = redis_server.url, redis_server.port
        res = Results(started, "quick" if args.quick else "full", machine_info(url, pg_url))
        res.machine.update(runs=cfg.runs, seconds_per_run=cfg.seconds, max_ops=cfg.max_ops)
        for section in SECTIONS:
            if section not in only:
                continue
            print(f"[{section}]", flush=True)
            if section == "ceiling":
                section_ceiling(cfg, url, port, res)
            elif section == "async":
                section_async(cfg, url, res)
            elif section == "sync":
                section_sync(cfg, url, res)
            elif section == "db":
                assert pg_url is not None
                section_db(cfg, url, pg_url, res)
            elif section == "limits":
                section_limits(cfg, url, port, res)
            elif section == "reserve":
                section_reserve(cfg, url, res)
            elif section == "chat":
                section_chat(cfg, url, res)
            elif section == "spread":
                section_spread(cfg, url, res)
            elif section == "syncer":
                assert pg_url is not None
                section_syncer(cfg, url, pg_url, res)
            elif section == "memory":
                section_memory(url, res)
            elif section == "http":
                assert pg_url is not None
                section_http(cfg, url, pg_url, res)
        write(res, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
