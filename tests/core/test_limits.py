"""Rate limits and refills, checked in the same script as credits and chat messages."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from redcredit import (
    AsyncRedCredit,
    InsufficientCredits,
    RateLimited,
    RedCredit,
    Settings,
)
from redcredit.config import LimitSettings, PlanSettings, RefillSettings
from tests.support.helpers import account_entries

MINUTE = timedelta(minutes=1)


def _client(redis_url: str, prefix: str, **plans: PlanSettings) -> RedCredit:
    return RedCredit(
        settings=Settings(
            redis_url=redis_url, key_prefix=prefix, free_credits=1000, free_chat_messages=5,
            plans=plans,
        )
    )  # fmt: skip


@pytest.fixture
def limited(redis_url: str, prefix: str):
    plan = PlanSettings(
        limits=(
            LimitSettings(name="rpm", rate=60, period=MINUTE, burst=5),
            LimitSettings(name="tpm", kind="credits", rate=600, period=MINUTE, burst=100),
        )
    )
    with _client(redis_url, prefix, free=plan) as client:
        yield client


def test_gcra_burst_then_emission_interval(limited: RedCredit) -> None:
    states = [limited.spend("u", cost=1).limits for _ in range(5)]
    assert [s[0].remaining for s in states] == [4, 3, 2, 1, 0]
    assert (states[0][0].name, states[0][0].limit, states[0][0].window_s) == ("rpm", 60, 60)
    with pytest.raises(RateLimited) as refused:
        limited.spend("u", cost=1)
    assert refused.value.limit == "rpm"
    # One request per second refills the burst: the wait is what is left of it.
    assert 900 <= refused.value.retry_after_ms <= 1000
    limited.engine.clock_offset_ms = 1000
    limited.spend("u", cost=1)
    with pytest.raises(RateLimited):
        limited.spend("u", cost=1)


def test_token_bucket_weighted_by_cost(limited: RedCredit) -> None:
    assert limited.spend("t", cost=60).limits[1].remaining == 40
    with pytest.raises(RateLimited) as refused:
        limited.spend("t", cost=50)
    # 10 credits short, at 10 credits a second.
    assert refused.value.limit == "tpm"
    assert 990 <= refused.value.retry_after_ms <= 1000
    assert limited.balance("t").credits == 940
    limited.engine.clock_offset_ms = 1_000
    assert limited.spend("t", cost=50).credits_remaining == 890


def test_refused_by_one_limit_spends_nothing_anywhere(limited: RedCredit) -> None:
    limited.spend("a", cost=90)
    before = limited.balance("a")
    with pytest.raises(RateLimited, match="tpm"):
        limited.chat_turn("a", cost=20)
    after = limited.balance("a")
    assert (after.credits, after.chat_messages) == (before.credits, before.chat_messages)
    # The request limit did not count the refused call either.
    assert after.limits[0].remaining == before.limits[0].remaining
    # And a refusal for credits leaves every limit untouched.
    limited.correct("a", -905)
    with pytest.raises(InsufficientCredits):
        limited.spend("a", cost=8)
    now = limited.balance("a").limits
    assert now[0] == after.limits[0]
    assert 0 <= now[1].remaining - after.limits[1].remaining <= 1  # real time refills it


def test_peek_reads_limits_without_spending(limited: RedCredit) -> None:
    limited.spend("p", cost=10)
    first, second = limited.balance("p"), limited.balance("p")
    assert first.limits[0] == second.limits[0]  # a peek counts no request
    assert [s.name for s in first.limits] == ["rpm", "tpm"]
    assert first.limits[0].remaining == 4
    assert 90 <= first.limits[1].remaining <= second.limits[1].remaining <= 91


async def test_exact_under_concurrency(redis_url: str, prefix: str) -> None:
    plan = PlanSettings(limits=(LimitSettings(name="burst", rate=1, period=MINUTE, burst=10),))
    settings = Settings(redis_url=redis_url, key_prefix=prefix, free_credits=1000,
                        plans={"free": plan})  # fmt: skip
    async with AsyncRedCredit(settings=settings) as arc:

        async def attempt() -> bool:
            try:
                await arc.spend("crowd", cost=1)
            except RateLimited:
                return False
            return True

        results = await asyncio.gather(*(attempt() for _ in range(60)))
    assert sum(results) == 10


def test_per_model_limits_are_separate(redis_url: str, prefix: str) -> None:
    plan = PlanSettings(
        limits=(LimitSettings(name="rpm", rate=1, period=MINUTE, burst=2, per_model=True),)
    )
    with _client(redis_url, prefix, free=plan) as client:
        for _ in range(2):
            client.chat_turn("m", cost=1, model="gpt-large")
        with pytest.raises(RateLimited):
            client.chat_turn("m", cost=1, model="gpt-large")
        client.chat_turn("m", cost=1, model="gpt-small")
        assert client.balance("m", model="gpt-small").limits[0].remaining == 1


def test_shadow_limit_never_refuses_but_records(redis_url: str, prefix: str, redis_client) -> None:
    plan = PlanSettings(
        limits=(LimitSettings(name="trial", rate=1, period=MINUTE, burst=1, shadow=True),)
    )
    with _client(redis_url, prefix, free=plan) as client:
        results = [client.spend("s", cost=1) for _ in range(3)]
    assert [r.limits[0].would_refuse for r in results] == [False, True, True]
    assert all(r.limits[0].shadow for r in results)
    spends = [e for e in account_entries(redis_client, prefix, "s") if e["op"] == "spend"]
    assert [e.get("sh") for e in spends] == [None, "trial", "trial"]


def test_limits_apply_to_bypassing_plans(redis_url: str, prefix: str) -> None:
    paid = PlanSettings(bypass=True, limits=(LimitSettings(name="rpm", rate=1, period=MINUTE),))
    with _client(redis_url, prefix, paid=paid) as client:
        client.set_plan("vip", "paid")
        assert client.spend("vip", cost=10**6).credits_remaining is None
        with pytest.raises(RateLimited):
            client.spend("vip", cost=1)


def test_reset_limits_is_journaled(limited: RedCredit, redis_client, prefix: str) -> None:
    for _ in range(5):
        limited.spend("r", cost=1)
    with pytest.raises(RateLimited):
        limited.spend("r", cost=1)
    assert limited.reset_limits("r", "rpm") == 1
    limited.spend("r", cost=1)
    assert account_entries(redis_client, prefix, "r")[-2]["op"] == "limit_reset"


def test_stream_reservation_checks_limits_and_spends_a_message(limited: RedCredit) -> None:
    reservation = limited.reserve("st", 80, messages=1)
    assert [s.remaining for s in reservation.limits] == [4, 20]
    assert limited.balance("st").chat_messages == 4
    with pytest.raises(RateLimited, match="tpm"):
        limited.reserve("st", 30, messages=1)
    assert limited.balance("st").chat_messages == 4
    assert limited.settle(reservation, 50).charged == 50


def _next_utc_midnight_ms(now_ms: int) -> int:
    now = datetime.fromtimestamp(now_ms / 1000, UTC)
    midnight = datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
    return int(midnight.timestamp() * 1000)


def test_daily_refill_across_the_day_boundary(redis_url: str, prefix: str, redis_client) -> None:
    plan = PlanSettings(refill=RefillSettings(chat_messages=20, credits=50, every="day"))
    with _client(redis_url, prefix, free=plan) as client:
        opened = client.balance("d")  # the first touch starts the clock, no refill
        assert (opened.credits, opened.chat_messages) == (1000, 5)
        client.correct("d", -990)
        for _ in range(5):
            client.spend_chat_message("d")
        # Redis time moves to one millisecond before the next UTC midnight...
        boundary = _next_utc_midnight_ms(opened.server_time_ms)
        client.engine.clock_offset_ms = boundary - opened.server_time_ms - 1_000
        assert client.balance("d").chat_messages == 0
        # ...then past it: topped up to 20 messages and 50 credits, once.
        client.engine.clock_offset_ms += 2_000
        refilled = client.balance("d")
        assert (refilled.credits, refilled.chat_messages) == (50, 20)
        assert client.spend_chat_message("d").chat_messages_remaining == 19
    refills = [e for e in account_entries(redis_client, prefix, "d") if e["op"] == "refill"]
    assert sorted((e["dc"], e["dm"]) for e in refills) == [("0", "20"), ("40", "0")]


def test_refill_never_lowers_a_bought_balance(redis_url: str, prefix: str) -> None:
    plan = PlanSettings(refill=RefillSettings(chat_messages=3, every=timedelta(seconds=10)))
    with _client(redis_url, prefix, free=plan) as client:
        client.balance("rich")
        client.grant("rich", chat_messages=100)
        client.engine.clock_offset_ms = 10_000
        assert client.balance("rich").chat_messages == 105
        for _ in range(105):
            client.spend_chat_message("rich")
        client.engine.clock_offset_ms = 19_000
        assert client.balance("rich").chat_messages == 0  # rolling: 10 s after the last refill
        client.engine.clock_offset_ms = 20_000
        assert client.balance("rich").chat_messages == 3
