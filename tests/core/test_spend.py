"""Spending credits and chat messages: the atomic check-and-decrement."""

from __future__ import annotations

import pytest

from redcredit import (
    InsufficientChatMessages,
    InsufficientCredits,
    InvalidInput,
    RedCredit,
    UnknownFeature,
)
from tests.support.helpers import account_entries, snapshot


def test_new_account_opens_with_configured_defaults(rc: RedCredit) -> None:
    balance = rc.balance("alice")
    assert (balance.credits, balance.chat_messages, balance.held) == (100, 10, 0)
    assert balance.plan == "free"
    assert balance.available == 100
    assert not balance.unlimited


def test_spend_explicit_cost_and_feature(rc: RedCredit) -> None:
    assert rc.spend("bob", cost=7).credits_remaining == 93
    # "image" costs 10 in the test cost table
    result = rc.spend("bob", "image")
    assert result.credits_remaining == 83
    assert result.chat_messages_remaining == 10
    assert result.sequence == 3  # open, spend, spend
    assert not result.replayed


def test_spend_priced_per_unit(rc: RedCredit) -> None:
    # "document" costs 2 + 3 per page
    assert rc.spend("carol", "document", units=4).credits_remaining == 100 - 14
    with pytest.raises(InvalidInput):
        rc.spend("carol", "document")


def test_insufficient_credits_changes_nothing(rc: RedCredit, redis_client, prefix: str) -> None:
    rc.spend("dave", cost=95)
    before = snapshot(redis_client, prefix)
    with pytest.raises(InsufficientCredits) as refused:
        rc.spend("dave", cost=6)
    assert (refused.value.required, refused.value.available) == (6, 5)
    assert refused.value.account == "dave"
    assert snapshot(redis_client, prefix) == before
    assert rc.spend("dave", cost=5).credits_remaining == 0
    with pytest.raises(InsufficientCredits):
        rc.spend("dave", cost=1)
    assert rc.balance("dave").credits == 0


def test_spend_zero_cost_feature_is_recorded(rc: RedCredit, redis_client, prefix: str) -> None:
    assert rc.spend("erin", "free_feature").credits_remaining == 100
    last = account_entries(redis_client, prefix, "erin")[-1]
    assert (last["op"], last["dc"], last["f"], last["uc"]) == ("spend", "0", "free_feature", "0")


def test_unknown_feature_is_an_error_not_zero(rc: RedCredit, redis_client, prefix: str) -> None:
    before = snapshot(redis_client, prefix)
    with pytest.raises(UnknownFeature):
        rc.spend("frank", "no-such-feature")
    assert snapshot(redis_client, prefix) == before


def test_feature_and_cost_are_exclusive(rc: RedCredit) -> None:
    with pytest.raises(InvalidInput):
        rc.spend("gina", "image", cost=3)
    with pytest.raises(InvalidInput):
        rc.spend("gina")


def test_chat_messages_run_out(rc: RedCredit) -> None:
    for left in range(9, -1, -1):
        assert rc.spend_chat_message("hank").chat_messages_remaining == left
    with pytest.raises(InsufficientChatMessages) as refused:
        rc.spend_chat_message("hank")
    assert (refused.value.required, refused.value.available) == (1, 0)
    assert rc.balance("hank").credits == 100


def test_chat_turn_spends_both_or_neither(rc: RedCredit) -> None:
    turn = rc.chat_turn("ivy", cost=30)
    assert (turn.credits_remaining, turn.chat_messages_remaining) == (70, 9)
    with pytest.raises(InsufficientCredits):
        rc.chat_turn("ivy", cost=71)
    balance = rc.balance("ivy")
    assert (balance.credits, balance.chat_messages) == (70, 9)

    rc.correct("ivy", chat_messages=-9, reason="test")
    with pytest.raises(InsufficientChatMessages):
        rc.chat_turn("ivy", cost=1)
    assert rc.balance("ivy").credits == 70


def test_grant_and_correct(rc: RedCredit) -> None:
    change = rc.grant("jack", 50, chat_messages=5, reason="top-up")
    assert (change.credits, change.chat_messages) == (150, 15)
    assert rc.correct("jack", -20, reason="refund reversal").credits == 130
    with pytest.raises(InsufficientCredits):
        rc.correct("jack", -131)
    with pytest.raises(InvalidInput):
        rc.grant("jack")
    with pytest.raises(InvalidInput):
        rc.grant("jack", -5)


def test_journal_records_every_change_and_conserves(
    rc: RedCredit, redis_client, prefix: str
) -> None:
    rc.spend("kate", cost=10, idempotency_key="k1")
    rc.grant("kate", 5)
    rc.chat_turn("kate", "image")
    rc.set_plan("kate", "paid")
    rc.spend("kate", cost=1000)
    entries = account_entries(redis_client, prefix, "kate")
    assert [e["op"] for e in entries] == ["open", "spend", "grant", "turn", "plan", "spend"]
    assert [int(e["s"]) for e in entries] == list(range(1, 7))
    assert entries[1]["k"] == "k1"
    assert sum(int(e["dc"]) for e in entries) == rc.balance("kate").credits == 85
    assert sum(int(e["dm"]) for e in entries) == rc.balance("kate").chat_messages == 9
    assert (entries[-1]["dc"], entries[-1]["uc"], entries[-1]["p"]) == ("0", "1000", "paid")
    assert all(int(e["t"]) > 1_600_000_000_000 for e in entries)
