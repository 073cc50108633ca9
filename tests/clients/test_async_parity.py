"""The asyncio client has the same methods and gives the same results as the sync one."""

from __future__ import annotations

import inspect
from dataclasses import asdict
from typing import Any

import pytest
import redis.asyncio

from redcredit import (
    AsyncRedCredit,
    InsufficientChatMessages,
    InsufficientCredits,
    RedCredit,
    RedCreditError,
    Settings,
)

PUBLIC = [
    name
    for name, member in inspect.getmembers(RedCredit, inspect.isfunction)
    if not name.startswith("_")
]


def test_same_public_methods_and_signatures() -> None:
    for name in PUBLIC:
        sync_sig = inspect.signature(getattr(RedCredit, name))
        async_sig = inspect.signature(getattr(AsyncRedCredit, name))
        assert list(sync_sig.parameters) == list(async_sig.parameters), name
        if name != "reservation":  # a context-manager factory on both sides
            assert inspect.iscoroutinefunction(getattr(AsyncRedCredit, name)), name


def _comparable(result: object) -> Any:
    if isinstance(result, RedCreditError):
        return (type(result).__name__, str(result))
    fields = asdict(result)  # type: ignore[call-overload]
    for volatile in ("id", "reservation_id", "deadline_ms", "server_time_ms"):
        fields.pop(volatile, None)
    return (type(result).__name__, fields)


SCRIPT: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("balance", ("p",), {}),
    ("spend", ("p", "image"), {}),
    ("spend", ("p",), {"cost": 91}),
    ("spend", ("p",), {"cost": 3, "idempotency_key": "k"}),
    ("spend", ("p",), {"cost": 3, "idempotency_key": "k"}),
    ("chat_turn", ("p",), {"cost": 1, "messages": 11}),
    ("spend_chat_message", ("p",), {"messages": 2}),
    ("grant", ("p", 50), {"chat_messages": 1, "reason": "promo"}),
    ("correct", ("p", -7), {}),
    ("set_plan", ("p", "demo"), {}),
    ("spend", ("p",), {"cost": 10**6}),
    ("set_plan", ("p", "free"), {}),
    ("balance", ("p",), {}),
]


async def test_same_results(rc: RedCredit, arc: AsyncRedCredit) -> None:
    sync_results, async_results = [], []
    for name, args, kwargs in SCRIPT:
        try:
            sync_results.append(_comparable(getattr(rc, name)(*args, **kwargs)))
        except RedCreditError as exc:
            sync_results.append(_comparable(exc))
        async_args = ("q", *args[1:])
        try:
            async_results.append(_comparable(await getattr(arc, name)(*async_args, **kwargs)))
        except RedCreditError as exc:
            async_results.append(_comparable(exc))
    normalised = [repr(r).replace("'q'", "'p'") for r in async_results]
    assert [repr(r) for r in sync_results] == normalised
    assert any("InsufficientCredits" in repr(r) for r in sync_results)
    assert any("InsufficientChatMessages" in repr(r) for r in sync_results)


async def test_async_reservation_calls(arc: AsyncRedCredit) -> None:
    reservation = await arc.reserve("r", 60, ttl=5)
    extended = await arc.extend(reservation, ttl=10)
    assert extended.deadline_ms > reservation.deadline_ms
    with pytest.raises(InsufficientCredits):
        await arc.spend("r", cost=41)
    settled = await arc.settle(reservation, 70)
    assert (settled.charged, settled.credits_remaining) == (70, 30)
    assert (await arc.release(reservation)).replayed
    with pytest.raises(InsufficientChatMessages):
        await arc.spend_chat_message("r", messages=11)


async def test_given_async_client_is_not_closed(redis_url: str, settings: Settings) -> None:
    own = redis.asyncio.Redis.from_url(redis_url)
    async with AsyncRedCredit(own, settings=settings) as client:
        await client.spend("mine", cost=1)
    assert await own.ping()
    await own.aclose()
