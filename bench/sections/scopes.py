"""What a path through a tree of accounts costs a call: spends on the leaf of paths of 1 to 4
levels, the root holding the pool, beside spends on a plain account, in one run (the series
and their checks are the buckets section's, see bench/sections/buckets.py).

A caller has a tree of its own, ``org → team → user → key`` cut to the setup's depth: the root
is granted the pool, the other levels have nothing, so the leaf's spend is paid two or three
levels up and every level's limits are read. A cap on ``team`` (large: it never refuses)
makes that level count every call, so it writes its hash and journals an entry of its own, as
the root does for paying. The targets are 3-level paths, capped or not, against the plain spend
(8 buckets on a plain account are the buckets section's); a 3-level path whose paying level
carries 8 buckets, both costs at once, is reported beside them.
"""

from __future__ import annotations

import redis

from redcredit import AsyncRedCredit, Cap, Scope, Settings
from redcredit.core.engine import Engine

from ..harness import Config, Results, Servers
from .buckets import (
    GRANT_CREDITS,
    PLAIN,
    AccountSetup,
    Ratio,
    Series,
    run_series,
    series_ratios,
    with_buckets,
)

LEVELS = ("org", "team", "user", "key")
CAPPED = 2  # the level a capped setup caps: team, a middle level of 3 and 4
# The cap's credits per month: far more than any run spends, so it counts and never refuses.
CAP = Cap(credits=2**52, period="month")
# Every level starts empty (no free credits, no chat messages): only the root's grants pay.
EMPTY = (("free_credits", 0), ("free_chat_messages", 0))


def path_of(root: str, depth: int) -> Scope:
    """The path of ``depth`` levels under ``root``: the root is the caller's own account."""
    return Scope(root, *(f"{root}-{level}" for level in LEVELS[1:depth]))


def on_path(depth: int, capped: bool = False, buckets: int = 0) -> AccountSetup:
    """A tree of ``depth`` levels per caller, the root granted the pool (in ``buckets`` grants
    of their own, or one plain grant), ``team`` capped or not."""
    bucketed = with_buckets(buckets)

    async def prepare(rc: AsyncRedCredit, root: str) -> None:
        path = path_of(root, depth)
        for k in range(2, depth + 1):
            await rc.attach(Scope(*path.path[:k]))  # parents first
        if buckets:
            await bucketed.prepare(rc, root)
        else:
            await rc.grant(root, GRANT_CREDITS)
        if capped:
            await rc.set_cap(Scope(*path.path[:CAPPED]), CAP)

    name = f"{depth} level" + ("s" if depth > 1 else "")
    if capped:
        name += f", {LEVELS[CAPPED - 1]} capped"
    if buckets:
        name += f", {bucketed.name} at {LEVELS[0]}"

    return AccountSetup(
        name,
        prepare,
        bucketed.buckets if buckets else 0,
        EMPTY,
        path=lambda root: path_of(root, depth),
        check=check_cap_counted if capped else None,
    )


def check_cap_counted(settings: Settings, roots: list[str]) -> None:
    """Every capped level counted the calls through it (credits charged in its window)."""
    keys = Engine(settings).keys
    with redis.Redis.from_url(str(settings.redis_url)) as conn:
        for root in roots:
            team = path_of(root, CAPPED).account
            counted = conn.hget(keys.for_account(team, root).hash, "Kc")
            if counted is None or int(counted) <= 0:
                raise RuntimeError(f"{team}: its cap counted nothing ({counted!r})")


async def _spend(rc: AsyncRedCredit, target: str | Scope) -> None:
    await rc.spend(target, cost=1)


async def _cycle(rc: AsyncRedCredit, target: str | Scope) -> None:
    held = await rc.reserve(target, 10, ttl=60)
    await rc.settle(held, 5)


THREE_LEVELS = on_path(3)
THREE_LEVELS_CAPPED = on_path(3, capped=True)
SPEND = Series(
    "spend on a path",
    _spend,
    1,
    (
        PLAIN,
        on_path(1),
        on_path(2),
        THREE_LEVELS,
        THREE_LEVELS_CAPPED,
        on_path(4, capped=True),
        on_path(4),
        on_path(3, capped=True, buckets=8),
    ),
)
SERIES = (
    SPEND,
    Series(
        "reserve -> settle on a path",
        _cycle,
        2,
        (PLAIN, THREE_LEVELS_CAPPED),
        note="cycles/s; two scripts per cycle",
    ),
)
# The targets: (series, setup) -> lowest calls/s over the series' plain account.
TARGETS = {(SPEND.name, THREE_LEVELS.name): 0.7, (SPEND.name, THREE_LEVELS_CAPPED.name): 0.7}


def run(cfg: Config, servers: Servers, res: Results) -> None:
    run_series(cfg, servers.redis_url, "scopes", SERIES, res)


def ratios(res: Results) -> list[Ratio]:
    return series_ratios(res, SERIES, TARGETS)
