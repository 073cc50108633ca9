"""One Redis against a cluster of three primaries, in the same run: async spends over 10k
accounts (so every node has its share of the partitions), at 1, 64 and 256 callers in this
process and 64 callers in each of several processes.

The client is configured by settings alone (``redis_cluster=True`` and one node's URL), as an
application would be. Each point also records how many calls the per-node pipelines carried
per round trip: spread over three nodes, the same callers make smaller batches, and that is
where a cluster's extra client CPU comes from.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
from collections.abc import Awaitable, Callable
from typing import Any

import redis

from redcredit import AsyncRedCredit, Settings

from ..harness import (
    CLUSTER_PRIMARIES,
    SPREAD_ACCOUNTS,
    Config,
    MakeOp,
    Op,
    Point,
    Results,
    Servers,
    Setup,
    async_point,
    drive_setup,
    measure,
    rc_settings,
    trim_journals,
    warm,
)

CALLERS = (1, 64, 256)
PROCESSES = 4
CALLERS_PER_PROCESS = 64
STANDALONE = "standalone"
CLUSTER = f"{CLUSTER_PRIMARIES}-primary cluster"
# Enough distinct accounts before the clock starts that every node has been called.
_WARM_CALLS = 256


def system(kind: str, processes: int = 1) -> str:
    """The name a point of this section carries in the results (and in the ratios)."""
    name = f"redcredit async spend, {kind}, 10k accounts"
    return name if processes == 1 else f"{name}, {processes} processes"


def accounts() -> list[str]:
    return [f"user-{i}" for i in range(SPREAD_ACCOUNTS)]


Batches = list[tuple[int, int]]  # (round trips, calls) of each timed run


def spend_setup(settings: Settings, names: list[str], batches: Batches) -> Setup:
    """Each worker spends on accounts of its own seeded choice, on one client per run, whose
    connections and slot map are made before the clock starts."""

    async def setup() -> tuple[MakeOp, Callable[[], Awaitable[None]]]:
        rc = AsyncRedCredit(settings=settings)
        await asyncio.gather(*(rc.spend(name, cost=1) for name in names[:_WARM_CALLS]))
        before = _pipelined(rc)

        async def make_op(i: int) -> Op:
            choice = random.Random(i).choice

            async def op() -> int:
                await rc.spend(choice(names), cost=1)
                return 1

            return op

        async def cleanup() -> None:
            after = _pipelined(rc)
            batches.append((after[0] - before[0], after[1] - before[1]))
            await rc.close()

        return make_op, cleanup

    return setup


def _pipelined(rc: AsyncRedCredit) -> tuple[int, int]:
    coalescers = rc.topology.coalescers.values()
    return sum(c.round_trips for c in coalescers), sum(c.calls for c in coalescers)


def _per_round_trip(batches: Batches) -> float:
    trips = sum(trips for trips, _ in batches)
    return sum(calls for _, calls in batches) / trips if trips else float("nan")


def process_worker(
    settings_json: str,
    callers: int,
    runs: int,
    seconds: float,
    max_ops: int,
    barrier: Any,
    queue: Any,
) -> None:
    """The body of one process of the multi-process point (module level, for spawn)."""
    settings = Settings.model_validate_json(settings_json)
    names = accounts()
    for _ in range(runs):
        barrier.wait()
        batches: Batches = []
        done, elapsed, latencies, cpu = asyncio.run(
            drive_setup(spend_setup(settings, names, batches), callers, seconds, max_ops)
        )
        queue.put((done, elapsed, latencies, cpu, batches))


def processes_point(
    cfg: Config, settings: Settings, kind: str, node_urls: list[str]
) -> tuple[Point, Batches]:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES + 1)
    queue = ctx.Queue()
    batches: Batches = []
    args = (
        settings.model_dump_json(),
        CALLERS_PER_PROCESS,
        cfg.runs,
        cfg.seconds,
        max(1, cfg.max_ops // PROCESSES),
        barrier,
        queue,
    )
    children = [
        ctx.Process(target=process_worker, args=args, daemon=True) for _ in range(PROCESSES)
    ]
    for child in children:
        child.start()

    def run_once() -> tuple[int, float, list[float], float]:
        barrier.wait(timeout=60)
        parts = [queue.get(timeout=cfg.seconds + 60) for _ in range(PROCESSES)]
        for part in parts:
            batches.extend(part[4])
        done = sum(p[0] for p in parts)
        wall = max(p[1] for p in parts)
        return done, wall, [x for p in parts for x in p[2]], sum(p[3] for p in parts)

    try:
        point = measure(
            cfg,
            node_urls[0],
            "cluster",
            system(kind, PROCESSES),
            PROCESSES * CALLERS_PER_PROCESS,
            run_once,
            note=f"{PROCESSES} processes x {CALLERS_PER_PROCESS} callers",
            redis_urls=node_urls,
        )
    finally:
        for child in children:
            child.join(10)
            if child.is_alive():
                child.kill()
    return point, batches


def keys_per_node(node_urls: list[str]) -> list[int]:
    sizes = []
    for url in node_urls:
        with redis.Redis.from_url(url) as node:
            sizes.append(int(node.dbsize()))
    return sizes


# The points compared: (processes, callers in all), each on both systems.
SHAPES = [*((1, callers) for callers in CALLERS), (PROCESSES, PROCESSES * CALLERS_PER_PROCESS)]


def run(cfg: Config, servers: Servers, res: Results) -> None:
    node_urls = list(servers.cluster_urls)
    res.machine["redis_cluster"] = f"{CLUSTER_PRIMARIES} primaries, no replicas"
    kinds = {
        STANDALONE: (rc_settings(servers.redis_url), [servers.redis_url]),
        CLUSTER: (rc_settings(node_urls[0], redis_cluster=True), node_urls),
    }
    names = accounts()
    for settings, _ in kinds.values():
        warm(settings, names)
    res.extra["cluster: keys per node after warming 10k accounts"] = keys_per_node(node_urls)
    per_trip: dict[tuple[str, int, int], float] = {}
    # Standalone and cluster points alternate, so that whatever else the machine runs
    # weighs on both alike.
    for processes, callers in SHAPES:
        for kind, (settings, urls) in kinds.items():
            if processes == 1:
                batches: Batches = []
                setup = spend_setup(settings, names, batches)
                point = async_point(
                    cfg, urls[0], "cluster", system(kind), callers, setup, redis_urls=urls
                )
            else:
                point, batches = processes_point(cfg, settings, kind, urls)
            per_trip[kind, processes, callers] = _per_round_trip(batches)
            trips = f"{per_trip[kind, processes, callers]:.1f} calls per round trip"
            point.note = f"{point.note}, {trips}" if point.note else trips
            res.points.append(point)
            trim_journals(settings)
    _summarise(res, per_trip)


def _summarise(res: Results, per_trip: dict[tuple[str, int, int], float]) -> None:
    """Cluster over standalone at every shape, with the batch sizes that explain the CPU."""
    for processes, callers in SHAPES:
        one = res.find(system(STANDALONE, processes), callers)
        many = res.find(system(CLUSTER, processes), callers)
        if one is None or many is None:
            continue
        shape = described(processes, callers)
        res.extra[f"cluster / standalone, {shape}"] = (
            f"calls/s {many.rate / one.rate:.2f}x ({many.rate:,.0f} vs {one.rate:,.0f}); "
            f"client CPU per call {_ratio(many, one):.2f}x ({_us(many)} vs {_us(one)}); "
            f"calls per round trip {per_trip[CLUSTER, processes, callers]:.1f} "
            f"vs {per_trip[STANDALONE, processes, callers]:.1f}"
        )


def described(processes: int, callers: int) -> str:
    if processes > 1:
        return f"{processes} processes x {callers // processes} callers"
    return f"{callers} caller" + ("s" if callers > 1 else "")


def cpu_ratio(num: Point | None, den: Point | None) -> float | None:
    """Client CPU per call of ``num`` over that of ``den``, when both were measured."""
    if num is None or den is None:
        return None
    a, b = num.client_cpu_us_per_call, den.client_cpu_us_per_call
    return a / b if a is not None and b else None


def _ratio(num: Point, den: Point) -> float:
    value = cpu_ratio(num, den)
    return float("nan") if value is None else value


def _us(point: Point) -> str:
    value = point.client_cpu_us_per_call
    return "-" if value is None else f"{value:.0f} us"
