"""Accounts missing from Redis are loaded, inserted only if still absent, and the call retried."""

from __future__ import annotations

import asyncio
import threading

import pytest

from redcredit import AccountSnapshot, AsyncRedCredit, InvalidInput, RedCredit, Settings
from redcredit.backends.postgres_loader import AsyncPostgresLoader
from tests.support.helpers import account_entries


class SlowLoader:
    """A system of record that answers slowly, so that callers race to insert."""

    def __init__(self, snapshot: AccountSnapshot, delay: float = 0.05) -> None:
        self.snapshot = snapshot
        self.delay = delay
        self.calls = 0

    async def load(self, account: str) -> AccountSnapshot:
        self.calls += 1
        await asyncio.sleep(self.delay)
        return self.snapshot


async def test_racing_loads_insert_once_and_lose_no_update(
    settings: Settings, redis_client, prefix: str
) -> None:
    loader = SlowLoader(AccountSnapshot(credits=500, chat_messages=5, plan="free", sequence=41))
    async with AsyncRedCredit(settings=settings, loader=loader) as arc:
        results = await asyncio.gather(*(arc.spend("legacy", cost=10) for _ in range(20)))
        assert loader.calls >= 2  # they did race
        assert sorted(r.credits_remaining for r in results) == list(range(300, 500, 10))
        balance = await arc.balance("legacy")
    assert (balance.credits, balance.sequence) == (300, 61)
    entries = account_entries(redis_client, prefix, "legacy")
    # A loaded account is not new: no "open" entry, and its numbering continues.
    assert [int(e["s"]) for e in entries] == list(range(42, 62))
    assert {e["op"] for e in entries} == {"spend"}


def test_new_account_opens_once_under_threads(rc: RedCredit, redis_client, prefix: str) -> None:
    barrier = threading.Barrier(8)

    def first_use() -> None:
        barrier.wait()
        rc.spend("fresh", cost=1)

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    entries = account_entries(redis_client, prefix, "fresh")
    assert [e["op"] for e in entries].count("open") == 1
    assert entries[0]["op"] == "open" and entries[0]["dc"] == "100"
    assert rc.balance("fresh").credits == 92


def test_loader_snapshot_is_validated(settings: Settings) -> None:
    class BadLoader:
        def load(self, account: str) -> AccountSnapshot:
            return AccountSnapshot(credits=-5, chat_messages=0, plan="free")

    with (
        RedCredit(settings=settings, loader=BadLoader()) as client,
        pytest.raises(InvalidInput, match="credits"),
    ):
        client.spend("broken", cost=1)


class CountedPostgresLoader(AsyncPostgresLoader):
    """The real PostgreSQL loader, counting the reads it makes."""

    reads = 0

    async def _read(self, account: str) -> AccountSnapshot:
        self.reads += 1
        return await super()._read(account)


async def test_a_cold_client_reads_each_account_from_postgres_once(pg_settings: Settings) -> None:
    """64 first calls at once: one pool opened, one read per account, shared by its callers."""
    loader = CountedPostgresLoader(pg_settings)
    async with AsyncRedCredit(settings=pg_settings, loader=loader) as arc:
        results = await asyncio.gather(
            *(arc.spend(f"cold-{n % 4}", cost=1) for n in range(64)), return_exceptions=True
        )
        assert [r for r in results if isinstance(r, BaseException)] == []
        assert loader.reads == 4
        balances = [await arc.balance(f"cold-{n}") for n in range(4)]
    await loader.close()
    assert {b.credits for b in balances} == {100 - 16}
