"""What every section measures with: the run settings, the points, the load drivers, the CPU
readings of Redis and PostgreSQL, and the servers the suite starts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis
import redis.cluster

from redcredit import AsyncRedCredit, Settings
from redcredit.core.engine import Engine
from redcredit.servers.cluster import EmbeddedCluster
from redcredit.servers.postgres import EmbeddedPostgres
from redcredit.servers.redis import EmbeddedRedis

CONCURRENCY = (1, 16, 64, 256)
CLUSTER_PRIMARIES = 3
SPREAD_ACCOUNTS = 10_000
BIG = 2**52

Op = Callable[[], Awaitable[int]]  # one call (or batch); returns how many calls it made
MakeOp = Callable[[int], Awaitable[Op]]  # worker index -> its op
Call = Callable[[], Awaitable[object]]  # what a worker repeats on a client
Setup = Callable[[], Awaitable[tuple[MakeOp, Callable[[], Awaitable[None]]]]]
RunOnce = Callable[[], tuple[int, float, list[float], float]]
T = TypeVar("T")


@dataclass
class Config:
    runs: int
    seconds: float
    max_ops: int
    drain_entries: int
    quick: bool


@dataclass(frozen=True)
class Servers:
    """The servers a section declared it needs; asking for another is a mistake in the registry,
    so it fails the same way whether or not some other selected section started that server."""

    section: str
    redis_url: str
    port: int | None = None
    pg_url: str | None = None
    cluster_nodes: tuple[str, ...] | None = None  # every node's URL, the first a way in

    @property
    def redis_port(self) -> int:
        return self._declared(self.port, "the Redis port")

    @property
    def cluster_urls(self) -> tuple[str, ...]:
        return self._declared(self.cluster_nodes, "a Redis Cluster")

    @property
    def postgres_url(self) -> str:
        return self._declared(self.pg_url, "PostgreSQL")

    def _declared(self, value: T | None, what: str) -> T:
        if value is None:
            raise LookupError(f"section {self.section!r} does not declare that it needs {what}")
        return value


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
    client_cpu_us_per_call: float | None = None  # this client's CPU time over the calls made
    redis_script_us_per_call: float | None = None  # INFO commandstats: EVALSHA usec per EVALSHA
    redis_cpu_us_per_call: float | None = None  # INFO cpu: Redis CPU time over the calls made

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


def redis_cpu_of(urls: Sequence[str]) -> float:
    """CPU seconds of several servers (the nodes of a cluster), summed."""
    return sum(redis_cpu(url) for url in urls)


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


async def drive_setup(
    setup: Setup, concurrency: int, seconds: float, max_ops: int
) -> tuple[int, float, list[float], float]:
    """``drive`` between ``setup`` and its cleanup; adds this process's CPU seconds."""
    make_op, cleanup = await setup()
    try:
        c0 = time.process_time()
        done, elapsed, lat = await drive(make_op, concurrency, seconds, max_ops)
        return done, elapsed, lat, time.process_time() - c0
    finally:
        await cleanup()


def script_stats(urls: Sequence[str]) -> tuple[int, int]:
    """Calls and usec of ``EVALSHA`` so far (``INFO commandstats``), summed over servers."""
    calls = usec = 0
    for url in urls:
        with redis.Redis.from_url(url) as conn:
            stats = conn.info("commandstats").get("cmdstat_evalsha", {})
        calls += int(stats.get("calls", 0))
        usec += int(stats.get("usec", 0))
    return calls, usec


@dataclass
class Tally:
    """What the runs of one point add up to, read around each run."""

    servers: Sequence[str]
    rates: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    cpu: float = 0.0
    wall: float = 0.0
    rcpu: float = 0.0
    pcpu: float = 0.0
    calls: int = 0
    script_calls: int = 0
    script_usec: int = 0

    def run(self, run_once: RunOnce) -> None:
        r0, p0, (n0, u0) = redis_cpu_of(self.servers), pg_cpu(), script_stats(self.servers)
        done, elapsed, lat, cpu_s = run_once()
        self.rcpu += redis_cpu_of(self.servers) - r0
        p1 = pg_cpu()
        self.pcpu += (p1 - p0) if p0 is not None and p1 is not None else 0.0
        n1, u1 = script_stats(self.servers)
        self.script_calls += n1 - n0
        self.script_usec += u1 - u0
        self.rates.append(done / elapsed)
        self.latencies += lat
        self.cpu += cpu_s
        self.wall += elapsed
        self.calls += done

    def point(self, section: str, system: str, callers: int, note: str) -> Point:
        self.latencies.sort()
        calls = self.calls
        point = Point(
            section,
            system,
            callers,
            self.rates,
            percentile_ms(self.latencies, 0.5),
            percentile_ms(self.latencies, 0.99),
            percentile_ms(self.latencies, 0.999),
            self.cpu / self.wall,
            self.rcpu / self.wall,
            calls,
            note,
            self.pcpu / self.wall if section == "db" else None,
            self.cpu / calls * 1e6 if calls else None,
            self.script_usec / self.script_calls if self.script_calls else None,
            self.rcpu / calls * 1e6 if calls else None,
        )
        print(f"  {system:<34} {callers:>4}  {point.rate:>10,.0f}/s  p99 {point.p99_ms:6.2f} ms")
        return point


def measure(
    cfg: Config,
    redis_url: str,
    section: str,
    system: str,
    callers: int,
    run_once: RunOnce,
    note: str = "",
    redis_urls: Sequence[str] = (),
) -> Point:
    """Repeats ``run_once`` (calls, wall, latencies, client cpu-seconds) ``cfg.runs`` times.

    Redis CPU is that of ``redis_url``, or the sum over ``redis_urls`` (a cluster's nodes).
    """
    tally = Tally(list(redis_urls) or [redis_url])
    for _ in range(cfg.runs):
        tally.run(run_once)
    return tally.point(section, system, callers, note)


@dataclass(frozen=True)
class Load:
    """One point of a side-by-side comparison; ``after`` runs after each of its runs, outside
    the readings (dropping the journal it wrote, say)."""

    system: str
    callers: int
    run_once: RunOnce
    note: str = ""
    after: Callable[[], None] | None = None


def measure_alternating(
    cfg: Config, redis_url: str, section: str, loads: Sequence[Load]
) -> list[Point]:
    """Like ``measure`` for each load, but the loads take turns, one run each per round, so
    that whatever else the machine runs meanwhile weighs on all of them alike."""
    tallies = [Tally([redis_url]) for _ in loads]
    for _ in range(cfg.runs):
        for load, tally in zip(loads, tallies, strict=True):
            tally.run(load.run_once)
            if load.after is not None:
                load.after()
    return [
        tally.point(section, load.system, load.callers, load.note)
        for load, tally in zip(loads, tallies, strict=True)
    ]


def async_point(
    cfg: Config,
    redis_url: str,
    section: str,
    system: str,
    callers: int,
    setup: Setup,
    note: str = "",
    workers: int | None = None,
    redis_urls: Sequence[str] = (),
) -> Point:
    """An asyncio load in this process; ``setup`` gives the op factory and a cleanup.

    ``callers`` is what the report shows (calls in flight); ``workers`` how many
    coroutines run (fewer than ``callers`` when each sends a pipelined batch).
    """
    run_once = async_run(cfg, setup, workers or callers)
    return measure(cfg, redis_url, section, system, callers, run_once, note, redis_urls)


def async_run(cfg: Config, setup: Setup, workers: int) -> RunOnce:
    """One run of an asyncio load in this process, on a fresh event loop."""

    def run_once() -> tuple[int, float, list[float], float]:
        return asyncio.run(drive_setup(setup, workers, cfg.seconds, cfg.max_ops))

    return run_once


# --- loads ----------------------------------------------------------------------------------


def over_sockets(
    port: int, make: Callable[[int, asyncio.StreamReader, asyncio.StreamWriter], Op]
) -> Setup:
    """A load over raw loopback connections, one a worker; ``make`` gives a worker its op."""

    async def setup() -> tuple[MakeOp, Callable[[], Awaitable[None]]]:
        writers: list[asyncio.StreamWriter] = []

        async def make_op(i: int) -> Op:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writers.append(writer)
            return make(i, reader, writer)

        async def cleanup() -> None:
            for writer in writers:
                writer.close()

        return make_op, cleanup

    return setup


def with_client(settings: Settings, make: Callable[[AsyncRedCredit, int], Call]) -> Setup:
    """A load on one ``AsyncRedCredit`` shared by the workers; ``make(rc, i)`` gives worker
    ``i`` the call it repeats."""

    async def setup() -> tuple[MakeOp, Callable[[], Awaitable[None]]]:
        rc = AsyncRedCredit(settings=settings)

        async def make_op(i: int) -> Op:
            call = make(rc, i)

            async def op() -> int:
                await call()
                return 1

            return op

        return make_op, rc.close

    return setup


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
    journals = Engine(settings).keys.journals()
    if settings.redis_cluster is True:
        # One key at a time: the streams live in as many slots as there are partitions.
        cluster = redis.cluster.RedisCluster.from_url(str(settings.redis_url))
        try:
            for journal in journals:
                cluster.delete(journal)
        finally:
            cluster.close()
        return
    with redis.Redis.from_url(str(settings.redis_url)) as conn:
        conn.delete(*journals)


def warm(settings: Settings, accounts: list[str]) -> None:
    """Creates the accounts (and loads the scripts) before any point is timed."""

    async def go() -> None:
        async with AsyncRedCredit(settings=settings) as rc:
            for start in range(0, len(accounts), 512):
                await asyncio.gather(*(rc.grant(a, 1) for a in accounts[start : start + 512]))

    asyncio.run(go())


# --- servers --------------------------------------------------------------------------------


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


@contextlib.contextmanager
def cluster(needed: bool) -> Iterator[tuple[str, ...] | None]:
    """The URL of every node of a cluster of ``CLUSTER_PRIMARIES`` primaries, if needed."""
    if not needed:
        yield None
        return
    with EmbeddedCluster(primaries=CLUSTER_PRIMARIES) as started:
        yield tuple(started.urls)


@contextlib.contextmanager
def suite_servers(
    postgres_needed: bool, cluster_needed: bool
) -> Iterator[tuple[str, int, str | None, tuple[str, ...] | None]]:
    """The suite's Redis (URL and port), and PostgreSQL and a cluster when a section needs them."""
    with (
        EmbeddedRedis() as server,
        postgres(postgres_needed) as pg_url,
        cluster(cluster_needed) as cluster_urls,
    ):
        yield server.url, server.port, pg_url, cluster_urls
