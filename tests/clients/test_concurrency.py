"""Many spenders on one account: exactly floor(balance / cost) succeed, never below zero."""

from __future__ import annotations

import asyncio
import multiprocessing

from redcredit import AsyncRedCredit, InsufficientCredits, RedCredit, Settings
from tests.support.helpers import account_entries


async def test_200_async_spenders_on_one_account(arc: AsyncRedCredit, rc: RedCredit) -> None:
    rc.grant("hot", 900)  # 1,000 credits in all
    cost = 7

    async def spender() -> int:
        done = 0
        while True:
            try:
                result = await arc.spend("hot", cost=cost)
            except InsufficientCredits:
                return done
            assert result.credits_remaining is not None and result.credits_remaining >= 0
            done += 1

    counts = await asyncio.gather(*(spender() for _ in range(200)))
    assert sum(counts) == 1000 // cost
    balance = rc.balance("hot")
    assert balance.credits == 1000 % cost


async def test_concurrent_reservations_never_oversell(arc: AsyncRedCredit, rc: RedCredit) -> None:
    async def attempt(i: int) -> int:
        try:
            reservation = await arc.reserve("streams", 15)
        except InsufficientCredits:
            return 0
        settlement = await arc.settle(reservation, 20 if i % 2 else 10)
        return settlement.charged

    charged = await asyncio.gather(*(attempt(i) for i in range(100)))
    balance = rc.balance("streams")
    assert balance.credits == 100 - sum(charged) >= 0
    assert balance.held == 0


def _spend_until_refused(settings_json: str, cost: int, results: multiprocessing.Queue) -> None:
    client = RedCredit(settings=Settings.model_validate_json(settings_json))
    done = 0
    while True:
        try:
            client.spend("shared", cost=cost)
        except InsufficientCredits:
            break
        done += 1
    client.close()
    results.put(done)


def test_8_processes_on_one_account(
    rc: RedCredit, settings: Settings, redis_client, prefix
) -> None:
    rc.grant("shared", 1_900)  # 2,000 credits in all
    cost = 3
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue = context.Queue()
    workers = [
        context.Process(
            target=_spend_until_refused,
            args=(settings.model_dump_json(context={"reveal_secrets": True}), cost, results),
        )
        for _ in range(8)
    ]
    for worker in workers:
        worker.start()
    counts = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    assert sum(counts) == 2_000 // cost
    assert rc.balance("shared").credits == 2_000 % cost
    entries = account_entries(redis_client, prefix, "shared")
    assert [int(e["s"]) for e in entries] == list(range(1, len(entries) + 1))
    assert sum(int(e["dc"]) for e in entries) == 2_000 % cost
