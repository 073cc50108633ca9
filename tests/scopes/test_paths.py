"""Calls on a path of a tree: every level checked, the nearest level pays, all in one script."""

from __future__ import annotations

from datetime import timedelta

import pytest

from redcredit import (
    AccountHasHistory,
    Cap,
    CapReached,
    InsufficientCredits,
    NotInScope,
    RateLimited,
    RedCredit,
    Scope,
    ScopeRequired,
)

from .conftest import entries, tree

ALICE = Scope("acme", "research", "alice")
KEY = ALICE.child("key-9")


def _org(rc: RedCredit, credits: int = 1_000) -> None:
    tree(rc, ("acme", "research"), ("acme", "research", "alice"), KEY.path)
    if credits:
        rc.grant("acme", credits)


def test_the_root_pays_for_a_call_on_a_path(rc: RedCredit) -> None:
    _org(rc)
    result = rc.spend(KEY, cost=100, idempotency_key="call-1")
    assert result.credits_remaining == 0  # the key's own credits
    assert rc.balance("acme").credits == 900
    (leaf,) = [e for e in entries(rc, "acme", "key-9") if e["op"] == "spend"]
    (root,) = [e for e in entries(rc, "acme", "acme") if e["op"] == "spend"]
    # The call's own account carries its key; the level that paid, the credits.
    assert (leaf["dc"], leaf["k"], leaf["lv"], leaf["uc"]) == ("0", "call-1", "4", "100")
    assert (root["dc"], root["v"], root["lv"], root["uc"]) == ("-100", "key-9", "1", "100")
    assert "k" not in root
    # A retry is applied once, at every level.
    assert rc.spend(KEY, cost=100, idempotency_key="call-1").replayed
    assert rc.balance("acme").credits == 900


def test_the_nearest_level_pays_first(rc: RedCredit) -> None:
    _org(rc)
    rc.grant(ALICE, 50)
    rc.spend(KEY, cost=80)
    assert rc.balance(ALICE).credits == 0
    assert rc.balance("acme").credits == 970


def test_a_short_path_is_refused_naming_the_root_and_changes_nothing(rc: RedCredit) -> None:
    _org(rc, credits=30)
    rc.grant(ALICE, 5)
    with pytest.raises(InsufficientCredits) as refused:
        rc.spend(KEY, cost=36)
    assert (refused.value.level, refused.value.required, refused.value.available) == (
        "acme",
        36,
        35,
    )
    assert "acme" in str(refused.value)
    assert rc.balance("acme").credits == 30
    assert rc.balance(ALICE).credits == 5


def test_a_cap_refuses_naming_its_level(rc: RedCredit) -> None:
    _org(rc)
    rc.set_cap(ALICE, Cap(credits=100, period="month"))
    rc.spend(KEY, cost=60)
    with pytest.raises(CapReached) as refused:
        rc.spend(KEY, cost=60)
    error = refused.value
    assert (error.level, error.resource, error.cap, error.used) == ("alice", "credits", 100, 60)
    assert error.retry_after_ms > 0
    assert rc.balance("acme").credits == 940
    # Another user of the same pool is not capped by alice's cap.
    rc.attach(Scope("acme", "research", "bob"))
    rc.spend(Scope("acme", "research", "bob"), cost=500)
    assert rc.balance("acme").credits == 440


def test_a_cap_window_turns(rc: RedCredit) -> None:
    _org(rc)
    rc.set_cap(ALICE, Cap(credits=10, period=timedelta(hours=1)))
    rc.spend(ALICE, cost=10)
    with pytest.raises(CapReached):
        rc.spend(ALICE, cost=1)
    rc.engine.clock_offset_ms += 3_600_000
    rc.spend(ALICE, cost=10)
    assert rc.balance("acme").credits == 980


def test_every_levels_rate_limits_apply(rc: RedCredit) -> None:
    _org(rc)
    rc.set_plan(ALICE, "member")
    for _ in range(3):
        rc.spend(KEY, cost=1)
    with pytest.raises(RateLimited) as refused:
        rc.spend(KEY, cost=1)
    assert (refused.value.level, refused.value.limit) == ("alice", "per_minute")
    assert rc.balance("acme").credits == 997
    # The limit's states come back with every call, named by their level.
    bob = Scope("acme", "research", "bob")
    rc.attach(bob)
    assert rc.spend(bob, cost=1).limits == ()


def test_a_path_that_is_not_the_tree_is_refused(rc: RedCredit) -> None:
    _org(rc)
    with pytest.raises(NotInScope) as refused:
        rc.spend(Scope("acme", "alice"), cost=1)
    assert (refused.value.level, refused.value.parent) == ("alice", "research")
    with pytest.raises(NotInScope):
        rc.spend(Scope("acme", "research", "stranger"), cost=1)
    with pytest.raises(ScopeRequired) as named_alone:
        rc.spend("alice", cost=1)
    assert named_alone.value.root == "acme"
    assert rc.balance("acme").credits == 1_000


def test_only_a_new_account_is_attached(rc: RedCredit) -> None:
    _org(rc)
    rc.grant("loner", 5)
    with pytest.raises(AccountHasHistory):
        rc.attach(Scope("acme", "loner"))
    assert rc.balance("loner").credits == 5
    # Attaching again changes nothing; under another parent it is refused.
    assert not rc.attach(ALICE).attached
    with pytest.raises(NotInScope):
        rc.attach(Scope("acme", "alice"))


def test_a_bypassing_level_pays_for_what_is_left(rc: RedCredit) -> None:
    _org(rc)
    rc.set_plan(Scope("acme", "research"), "paid")
    rc.grant(ALICE, 20)
    rc.spend(KEY, cost=50)
    assert rc.balance(ALICE).credits == 0
    assert rc.balance("acme").credits == 1_000
    (covered,) = [e for e in entries(rc, "acme", "research") if e["op"] == "spend"]
    assert (covered["dc"], covered["uc"]) == ("0", "50")


def test_overdrafts_come_after_every_levels_credits(rc: RedCredit) -> None:
    _org(rc, credits=0)
    rc.set_plan("acme", "postpaid")
    rc.grant(ALICE, 10)
    rc.spend(KEY, cost=60)
    assert rc.balance(ALICE).credits == 0
    assert rc.balance("acme").credits == -50
    with pytest.raises(InsufficientCredits):
        rc.spend(KEY, cost=51)


def test_chat_messages_come_from_the_nearest_level(rc: RedCredit) -> None:
    _org(rc)
    rc.grant("acme", chat_messages=3)
    rc.grant(ALICE, chat_messages=1)
    # A cap counts what passes through its level from the moment it is set.
    rc.set_cap(ALICE, Cap(chat_messages=2, period="day"))
    rc.chat_turn(KEY, cost=1, messages=2)
    assert rc.balance(ALICE).chat_messages == 0
    assert rc.balance("acme").chat_messages == 2
    with pytest.raises(CapReached) as refused:
        rc.spend_chat_message(KEY)
    assert (refused.value.resource, refused.value.used) == ("messages", 2)
    assert rc.balance("acme").chat_messages == 2
