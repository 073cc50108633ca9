"""Every scope test runs on one Redis server and on a real three-primary cluster."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from redcredit import LimitSettings, PlanSettings, RedCredit, Scope, Settings

WHERE = ["redis_url", "three_primary_cluster_url"]


@pytest.fixture(params=WHERE, ids=["one-node", "cluster"])
def scope_settings(request: pytest.FixtureRequest, prefix: str) -> Settings:
    return make_settings(request.getfixturevalue(request.param), prefix)


def make_settings(url: str, prefix: str, **changes: Any) -> Settings:
    options: dict[str, Any] = {
        "redis_url": url,
        "key_prefix": prefix,
        "free_credits": 0,
        "free_chat_messages": 0,
        "plans": {
            "postpaid": PlanSettings(overdraft=100),
            "member": PlanSettings(
                limits=[LimitSettings(name="per_minute", kind="requests", rate=3, period=60)]
            ),
        },
    }
    options.update(changes)
    return Settings(**options)


@pytest.fixture
def rc(scope_settings: Settings) -> Iterator[RedCredit]:
    with RedCredit(settings=scope_settings) as client:
        yield client


def tree(client: RedCredit, *paths: tuple[str, ...]) -> None:
    """Attaches every path's last account (paths listed parents first)."""
    for path in paths:
        client.attach(Scope(*path))


def entries(client: RedCredit, root: str, account: str) -> list[dict[str, str]]:
    """An account's journal entries in its tree's partition, oldest first, as text."""
    key = client.engine.keys.for_account(account, root).journal
    found = []
    for _, fields in client.redis.xrange(key):
        entry = {_text(k): _text(v) for k, v in fields.items()}
        if entry["a"] == account:
            found.append(entry)
    return found


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
