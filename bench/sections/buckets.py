"""What credit buckets cost a call: the same call on accounts set up differently, side by side
in one run, each against the first setup of its series (a plain account).

A series is one call (a spend; a reserve -> settle cycle) and a list of named account setups;
another comparison (scope levels, say) is one more entry of ``SERIES``, with setups of its own
and the settings they need.
Every point gets fresh accounts of its own, one per caller, prepared before the clock starts,
and checked after its runs: a setup's buckets must all still be there, none run dry. The points
of a series take turns, one run each per round, so that a busy machine weighs on them alike.
Besides the harness's figures, each point gives the Redis CPU of one script call from
``INFO commandstats`` (``EVALSHA``'s usec over its calls: the script alone, timed by the wall
clock, so a busy machine inflates it) and from ``INFO cpu`` (the whole server's CPU time:
reading, parsing and answering too).

A bucket account carries its grants besides its base bucket, with varied priorities (so the
array is not already in burn order when granted) and expiries years away; the first in burn
order has enough credits for every run, so one bucket burns and the others ride along, packed
and unpacked by every call.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from redcredit import AsyncRedCredit, Scope, Settings

from ..harness import (
    Call,
    Config,
    Load,
    Point,
    Results,
    Servers,
    async_run,
    measure_alternating,
    rc_settings,
    trim_journals,
    with_client,
)

CALLERS = 64
# Credits of each grant: more than every run of a point can spend (runs x max_ops).
GRANT_CREDITS = 10**12
Prepare = Callable[[AsyncRedCredit, str], Awaitable[None]]
Operation = Callable[[AsyncRedCredit, str | Scope], Awaitable[object]]


@dataclass(frozen=True)
class AccountSetup:
    """One kind of account: its name in the results, what is done to a fresh account before
    the clock starts, how many buckets it then lists, and the settings it needs (over the
    suite's; a later series, such as scope levels, may need its own).

    ``path`` makes the account the root of a tree and gives the path a call is made on (the
    account alone without it); the buckets counted are the root's, since it pays."""

    name: str
    prepare: Prepare
    buckets: int
    settings: tuple[tuple[str, Any], ...] = ()
    path: Callable[[str], Scope] | None = None
    # A further check of the accounts after the runs (by the roots' names), if any.
    check: Callable[[Settings, list[str]], None] | None = None

    def target(self, account: str) -> str | Scope:
        return account if self.path is None else self.path(account)


@dataclass(frozen=True)
class Series:
    """One call measured on every setup; ratios are taken against the first setup."""

    name: str
    operation: Operation
    scripts_per_call: int
    setups: tuple[AccountSetup, ...]
    note: str = ""

    def system(self, setup: AccountSetup) -> str:
        return f"redcredit {self.name}, {setup.name}"


async def _plain(rc: AsyncRedCredit, account: str) -> None:
    await rc.grant(account, 1)


def with_buckets(n: int) -> AccountSetup:
    """An account with ``n`` grants of its own beside its base bucket."""

    async def prepare(rc: AsyncRedCredit, account: str) -> None:
        for k in range(n):
            await rc.grant(
                account,
                GRANT_CREDITS,
                # Spread over 0..99, around the base bucket's default 50, out of order.
                priority=(k * 37) % 100,
                category=("promotional", "paid")[k % 2],
                expires_in=timedelta(days=5 * 365 + 30 * k),
            )

    return AccountSetup(f"{n} bucket" + ("s" if n > 1 else ""), prepare, n + 1)


PLAIN = AccountSetup("plain account", _plain, 0)


async def _spend(rc: AsyncRedCredit, account: str | Scope) -> None:
    await rc.spend(account, cost=1)


async def _cycle(rc: AsyncRedCredit, account: str | Scope) -> None:
    held = await rc.reserve(account, 10, ttl=60)
    await rc.settle(held, 5)


SERIES = (
    Series("async spend", _spend, 1, (PLAIN, with_buckets(1), with_buckets(8), with_buckets(32))),
    Series(
        "reserve -> settle",
        _cycle,
        2,
        (PLAIN, with_buckets(8)),
        note="cycles/s; two scripts per cycle",
    ),
)
# The target of the issue: (series, setup) -> lowest calls/s over the series' plain account.
TARGETS = {("async spend", "8 buckets"): 0.7}


def accounts(series: Series, setup: AccountSetup) -> list[str]:
    tag = re.sub("[^a-z0-9]+", "-", f"{series.name} {setup.name}")
    return [f"{tag}-{i}" for i in range(CALLERS)]


def prepare_accounts(
    settings: Settings, series: Series, setup: AccountSetup, names: list[str]
) -> None:
    """Makes the accounts, makes the series' call once on each (so its scripts are loaded
    before any reading) and checks that each lists the setup's buckets."""

    async def go() -> None:
        async with AsyncRedCredit(settings=settings) as rc:
            await asyncio.gather(*(setup.prepare(rc, name) for name in names))
            await asyncio.gather(*(series.operation(rc, setup.target(name)) for name in names))

    asyncio.run(go())
    check_buckets(settings, setup, names)


def check_buckets(settings: Settings, setup: AccountSetup, names: list[str]) -> None:
    async def go() -> list[int]:
        async with AsyncRedCredit(settings=settings) as rc:
            balances = await asyncio.gather(*(rc.balance(name) for name in names))
        return [sum(1 for b in balance.buckets if b.live) for balance in balances]

    live = asyncio.run(go())
    # A plain account lists its base bucket, or nothing at all on the plain path.
    expected = {setup.buckets} if setup.buckets else {0, 1}
    wrong = [(name, n) for name, n in zip(names, live, strict=True) if n not in expected]
    if wrong:
        raise RuntimeError(f"{setup.name}: live buckets {wrong[:3]}, expected {expected}")


def load(
    cfg: Config, url: str, series: Series, setup: AccountSetup
) -> tuple[Load, Callable[[], None]]:
    """The setup's accounts, made and checked, its load, and the check to run after it."""
    settings = rc_settings(url, **dict(setup.settings))
    names = accounts(series, setup)
    prepare_accounts(settings, series, setup, names)
    targets = [setup.target(name) for name in names]

    def make(rc: AsyncRedCredit, i: int) -> Call:
        return lambda: series.operation(rc, targets[i])

    run_once = async_run(cfg, with_client(settings, make), CALLERS)

    def check() -> None:
        check_buckets(settings, setup, names)
        if setup.check is not None:
            setup.check(settings, names)

    return (
        Load(
            series.system(setup),
            CALLERS,
            run_once,
            series.note,
            after=lambda: trim_journals(settings),
        ),
        check,
    )


def run(cfg: Config, servers: Servers, res: Results) -> None:
    run_series(cfg, servers.redis_url, "buckets", SERIES, res)


def run_series(
    cfg: Config, url: str, section: str, all_series: tuple[Series, ...], res: Results
) -> None:
    """Measures each series' setups side by side, checks them, and writes their summaries
    under ``section`` in the results' extras."""
    # Client and Redis share the cores with whatever else runs: the ratios need to say how busy.
    before = os.getloadavg()[0]
    for series in all_series:
        loads, checks = zip(
            *(load(cfg, url, series, setup) for setup in series.setups), strict=True
        )
        points = measure_alternating(cfg, url, section, loads)
        for check in checks:
            check()
        base = points[0]
        for setup, point in zip(series.setups, points, strict=True):
            script_us = point.redis_script_us_per_call or float("nan")
            server_us = (point.redis_cpu_us_per_call or float("nan")) / series.scripts_per_call
            point.note = ", ".join(
                s for s in (point.note, f"Redis {script_us:.1f} us per script call") if s
            )
            res.points.append(point)
            summary = (
                f"{point.rate:,.0f} calls/s; Redis CPU per script call {script_us:.1f} us "
                f"in the script (commandstats), {server_us:.1f} us in the server (INFO cpu)"
            )
            if point is not base:
                summary += (
                    f"; over {series.setups[0].name}: calls/s {point.rate / base.rate:.2f}x, "
                    f"Redis CPU per script call {_over(point, base, 'redis_script_us_per_call')} "
                    f"(script), {_over(point, base, 'redis_cpu_us_per_call')} (server)"
                )
            res.extra[f"{section}: {series.system(setup)}"] = summary
    res.extra[f"{section}: load average (1 min), before and after"] = (
        f"{before:.2f}, {os.getloadavg()[0]:.2f}"
    )


def _over(point: Point, base: Point, attribute: str) -> str:
    num, den = getattr(point, attribute), getattr(base, attribute)
    return f"{num / den:.2f}x" if num is not None and den else "-"


Ratio = tuple[str, float | None, str, bool | None]


def ratios(res: Results) -> list[Ratio]:
    return series_ratios(res, SERIES, TARGETS)


def series_ratios(
    res: Results, all_series: tuple[Series, ...], targets: dict[tuple[str, str], float]
) -> list[Ratio]:
    """Each setup's calls/s over its series' first setup, at 64 callers: (measure, value,
    target, met), where met is None for a ratio reported without a target."""
    rows: list[Ratio] = []
    for series in all_series:
        base = res.find(series.system(series.setups[0]), CALLERS)
        for setup in series.setups[1:]:
            point = res.find(series.system(setup), CALLERS)
            value = point.rate / base.rate if point and base else None
            target = targets.get((series.name, setup.name))
            name = f"{series.name}, {setup.name} / {series.setups[0].name}, {CALLERS} callers"
            if target is None:
                rows.append((name, value, "-", None))
            else:
                met = value is not None and value >= target
                rows.append((name, value, f">= {target:g}x", met))
    return rows
