"""Every grant test runs on one Redis server and on a real three-primary cluster."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from redcredit import PlanSettings, RedCredit, RefillSettings, Settings
from redcredit.config import GrantSettings

WHERE = ["redis_url", "three_primary_cluster_url"]


@pytest.fixture(params=WHERE, ids=["one-node", "cluster"])
def grant_settings(request: pytest.FixtureRequest, prefix: str) -> Settings:
    return make_settings(request.getfixturevalue(request.param), prefix)


def make_settings(url: str, prefix: str, **changes: Any) -> Settings:
    options: dict[str, Any] = {
        "redis_url": url,
        "key_prefix": prefix,
        "free_credits": 0,
        "free_chat_messages": 5,
        "plans": {
            "postpaid": PlanSettings(overdraft=500),
            "monthly": PlanSettings(
                refill=RefillSettings(
                    credits=100, every="month", mode="add", rollover=30, category="promotional"
                )
            ),
        },
        "grants": GrantSettings(categories=("free", "promotional", "paid")),
    }
    options.update(changes)
    return Settings(**options)


@pytest.fixture
def grc(grant_settings: Settings) -> Iterator[RedCredit]:
    with RedCredit(settings=grant_settings) as client:
        yield client


def journal(client: RedCredit, account: str) -> list[dict[str, str]]:
    """The account's journal entries, oldest first, as text."""
    key = client.engine.keys.for_account(account).journal
    found = []
    for _, fields in client.redis.xrange(key):
        entry = {_text(k): _text(v) for k, v in fields.items()}
        if entry["a"] == account:
            found.append(entry)
    return found


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def server_ms(client: RedCredit, account: str) -> int:
    return client.balance(account).server_time_ms - client.engine.clock_offset_ms


def buckets(client: RedCredit, account: str) -> dict[str, tuple[int, int]]:
    """Remaining and held of every bucket, by id."""
    return {b.id: (b.remaining, b.held) for b in client.balance(account).buckets}
