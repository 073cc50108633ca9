"""Calls that run more than a debit: a reserve -> settle cycle, and a chat turn with rate
limits."""

from __future__ import annotations

import functools
from datetime import timedelta

from redcredit import AsyncRedCredit
from redcredit.config import LimitSettings, PlanSettings

from ..harness import (
    Call,
    Config,
    Results,
    Servers,
    async_point,
    rc_settings,
    trim_journals,
    warm,
    with_client,
)


def run_reserve(cfg: Config, servers: Servers, res: Results) -> None:
    url = servers.redis_url
    settings = rc_settings(url)
    accounts = [f"r{i}" for i in range(64)]
    warm(settings, accounts)

    def make(rc: AsyncRedCredit, i: int) -> Call:
        async def cycle() -> None:
            held = await rc.reserve(accounts[i], 10, ttl=60)
            await rc.settle(held, 5)

        return cycle

    res.points.append(
        async_point(
            cfg,
            url,
            "reserve",
            "redcredit reserve -> settle cycle",
            64,
            with_client(settings, make),
            note="cycles/s; two scripts per cycle",
        )
    )
    trim_journals(settings)


def run_chat(cfg: Config, servers: Servers, res: Results) -> None:
    url = servers.redis_url
    plan = PlanSettings(
        limits=(
            LimitSettings(name="rpm", rate=10**9, period=timedelta(seconds=1)),
            LimitSettings(name="tpm", kind="credits", rate=10**9, period=timedelta(seconds=1)),
        )
    )
    settings = rc_settings(url, plans={"free": plan})
    accounts = [f"c{i}" for i in range(64)]
    warm(settings, accounts)

    def make(rc: AsyncRedCredit, i: int) -> Call:
        return functools.partial(rc.chat_turn, accounts[i], cost=1)

    res.points.append(
        async_point(
            cfg,
            url,
            "chat",
            "redcredit chat_turn, 2 rate limits",
            64,
            with_client(settings, make),
            note="one account per caller; limits never refuse",
        )
    )
    trim_journals(settings)
