"""Recurring grants (refills with a mode, a rollover and an expiry) and overdrafts."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from redcredit import InsufficientCredits, PlanSettings, RedCredit, RefillSettings, Settings

from .conftest import buckets, journal, make_settings

DAY_MS = 86_400_000


def _client(settings: Settings, **refill: Any) -> RedCredit:
    plan = PlanSettings(refill=RefillSettings(credits=100, every=timedelta(days=1), **refill))
    plans = {**settings.plans, "daily": plan}
    changed = make_settings(settings.redis_url, settings.key_prefix, plans=plans)
    client = RedCredit(settings=changed)
    return client


def _day(client: RedCredit, days: int) -> None:
    client.engine.clock_offset_ms = days * DAY_MS + 1_000 * days


def _start(client: RedCredit, account: str) -> None:
    client.set_plan(account, "daily")
    client.balance(account)  # the first touch starts the clock


def test_add_with_a_capped_rollover(grant_settings: Settings) -> None:
    with _client(grant_settings, mode="add", rollover=30) as client:
        _start(client, "roll")
        _day(client, 1)
        assert buckets(client, "roll") == {"refill": (100, 0), "base": (0, 0)}
        client.spend("roll", cost=20)
        _day(client, 2)
        # 80 left: 30 roll over, 50 expire, and 100 are added.
        assert buckets(client, "roll") == {"refill": (130, 0), "base": (0, 0)}
        ops = [(e["op"], e["dc"], e.get("f")) for e in journal(client, "roll")]
        assert ops[-2:] == [("expire", "-50", "rollover"), ("refill", "100", "refill")]


def test_rollover_none_keeps_what_live_holds_need(grant_settings: Settings) -> None:
    with _client(grant_settings, mode="add", rollover="none") as client:
        _start(client, "none")
        _day(client, 1)
        assert client.balance("none").credits == 100
        client.engine.clock_offset_ms += DAY_MS - 3_600_000
        held = client.reserve("none", 40, ttl=timedelta(hours=2))
        _day(client, 2)
        # 60 free credits expire; the 40 held stay, and 100 are added.
        assert buckets(client, "none") == {"refill": (140, 40), "base": (0, 0)}
        assert client.settle(held, 40).credits_remaining == 100


def test_top_up_to_never_lowers_a_balance(grant_settings: Settings) -> None:
    with _client(grant_settings) as client:
        _start(client, "top")
        client.grant("top", 150, grant_id="bought")
        _day(client, 1)
        assert client.balance("top").credits == 150
        client.spend("top", cost=120)
        _day(client, 2)
        # Topped up to 100: 30 left of the purchase, 70 refilled.
        assert buckets(client, "top") == {"refill": (70, 0), "bought": (30, 0), "base": (0, 0)}


def test_a_refill_bucket_expires(grant_settings: Settings) -> None:
    with _client(grant_settings, mode="add", expires_in=timedelta(hours=6)) as client:
        _start(client, "short")
        _day(client, 1)
        assert client.balance("short").credits == 100
        client.engine.clock_offset_ms += 6 * 3_600_000
        assert client.balance("short").credits == 0
        assert journal(client, "short")[-1]["op"] == "expire"


def test_refilled_chat_messages_add(grant_settings: Settings) -> None:
    plan = PlanSettings(refill=RefillSettings(chat_messages=3, every=timedelta(days=1), mode="add"))
    settings = make_settings(
        grant_settings.redis_url, grant_settings.key_prefix, plans={"chatty": plan}
    )
    with RedCredit(settings=settings) as client:
        client.set_plan("chat", "chatty")
        client.balance("chat")
        _day(client, 1)
        assert client.balance("chat").chat_messages == 5 + 3


def test_an_overdraft_lets_credits_go_below_zero_down_to_its_line(grc: RedCredit) -> None:
    grc.set_plan("post", "postpaid")
    assert grc.spend("post", cost=300).credits_remaining == -300
    with pytest.raises(InsufficientCredits) as refused:
        grc.spend("post", cost=201)
    assert refused.value.available == 200
    held = grc.reserve("post", 200)
    settled = grc.settle(held, 260)
    assert (settled.charged, settled.uncharged, settled.credits_remaining) == (200, 60, -500)
    balance = grc.balance("post")
    assert (balance.credits, balance.overdraft) == (-500, 500)
    # A plain grant pays the debt back first: it is the base bucket's.
    assert grc.grant("post", 600).credits == 100


def test_without_an_overdraft_never_below_zero(grc: RedCredit) -> None:
    grc.grant("free", 10)
    with pytest.raises(InsufficientCredits):
        grc.spend("free", cost=11)
    assert grc.balance("free").credits == 10


def test_an_overdraft_is_drawn_from_the_base_bucket_after_the_grants(grc: RedCredit) -> None:
    grc.set_plan("mix", "postpaid")
    grc.grant("mix", 50, grant_id="promo", category="promotional", expires_in=3600)
    assert grc.spend("mix", cost=80).credits_remaining == -30
    assert buckets(grc, "mix") == {"base": (-30, 0)}
    assert journal(grc, "mix")[-1]["bk"] == "promo:-50:0,base:-30:-30"
