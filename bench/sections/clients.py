"""redcredit's own clients: the async one on a hot account and spread over many, the sync one
in one and in several processes."""

from __future__ import annotations

import functools
import multiprocessing
import random
import time
from typing import Any

from redcredit import AsyncRedCredit, RedCredit, Settings

from ..harness import (
    CONCURRENCY,
    SPREAD_ACCOUNTS,
    Call,
    Config,
    Results,
    Servers,
    Setup,
    async_point,
    measure,
    rc_settings,
    trim_journals,
    warm,
    with_client,
)


def spend_setup(settings: Settings, accounts: list[str]) -> Setup:
    """Each worker spends on the one account, or on accounts of its own seeded choice."""

    def make(rc: AsyncRedCredit, i: int) -> Call:
        if len(accounts) == 1:
            return functools.partial(rc.spend, accounts[0], cost=1)
        choice = random.Random(i).choice
        return lambda: rc.spend(choice(accounts), cost=1)

    return with_client(settings, make)


def run_async(cfg: Config, servers: Servers, res: Results) -> None:
    url = servers.redis_url
    settings = rc_settings(url)
    warm(settings, ["hot"])
    for callers in CONCURRENCY:
        setup = spend_setup(settings, ["hot"])
        res.points.append(async_point(cfg, url, "async", "redcredit async spend", callers, setup))
        trim_journals(settings)


def run_spread(cfg: Config, servers: Servers, res: Results) -> None:
    url = servers.redis_url
    settings = rc_settings(url)
    accounts = [f"user-{i}" for i in range(SPREAD_ACCOUNTS)]
    warm(settings, accounts)
    setup = spend_setup(settings, accounts)
    res.points.append(
        async_point(cfg, url, "spread", "redcredit async spend, 10k accounts", 64, setup)
    )
    trim_journals(settings)


def sync_worker(
    settings_json: str, runs: int, seconds: float, max_ops: int, barrier: Any, queue: Any
) -> None:
    """The body of one process of the multi-process point (module level, for spawn)."""
    settings = Settings.model_validate_json(settings_json)
    with RedCredit(settings=settings) as rc:
        rc.spend("hot", cost=1)
        for _ in range(runs):
            barrier.wait()
            latencies: list[float] = []
            c0 = time.process_time()
            began = time.perf_counter()
            stop = began + seconds
            while len(latencies) < max_ops and (start := time.perf_counter()) < stop:
                rc.spend("hot", cost=1)
                latencies.append(time.perf_counter() - start)
            queue.put(
                (len(latencies), time.perf_counter() - began, latencies, time.process_time() - c0)
            )


def run_sync(cfg: Config, servers: Servers, res: Results) -> None:
    url = servers.redis_url
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
