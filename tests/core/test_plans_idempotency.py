"""Bypassing plans, and calls retried with the same idempotency key."""

from __future__ import annotations

import pytest

from redcredit import CostTable, IdempotencyConflict, RedCredit, Settings, UnknownPlan
from tests.support.helpers import account_entries, snapshot


def test_paid_and_demo_bypass_but_usage_is_journaled(
    rc: RedCredit, redis_client, prefix: str
) -> None:
    for plan in ("paid", "demo"):
        account = f"{plan}-user"
        change = rc.set_plan(account, plan)
        assert (change.plan, change.previous_plan) == (plan, "free")
        result = rc.spend(account, cost=10_000)
        assert result.credits_remaining is None and result.unlimited
        turn = rc.chat_turn(account, cost=3, messages=50)
        assert turn.chat_messages_remaining is None
        balance = rc.balance(account)
        assert (balance.credits, balance.chat_messages, balance.unlimited) == (100, 10, True)
        spends = [e for e in account_entries(redis_client, prefix, account) if e["op"] != "open"]
        assert [(e["op"], e["dc"], e.get("uc"), e.get("um")) for e in spends] == [
            ("plan", "0", None, None),
            ("spend", "0", "10000", "0"),
            ("turn", "0", "3", "50"),
        ]


def test_back_to_free_applies_limits_again(rc: RedCredit) -> None:
    rc.set_plan("lee", "paid")
    rc.spend("lee", cost=500)
    rc.set_plan("lee", "free")
    assert rc.spend("lee", cost=100).credits_remaining == 0


def test_custom_plan_from_config(rc: RedCredit) -> None:
    assert rc.set_plan("mia", "enterprise").plan == "enterprise"
    assert rc.spend("mia", cost=10**9).credits_remaining is None
    assert rc.set_plan("mia", "starter").plan == "starter"
    assert rc.spend("mia", cost=1).credits_remaining == 99


def test_unknown_plan_refused_before_redis(rc: RedCredit, redis_client, prefix: str) -> None:
    before = snapshot(redis_client, prefix)
    with pytest.raises(UnknownPlan):
        rc.set_plan("ned", "platinum")
    assert snapshot(redis_client, prefix) == before


def test_spend_replay_returns_first_result(rc: RedCredit, redis_client, prefix: str) -> None:
    first = rc.spend("olga", cost=10, idempotency_key="req-1")
    rc.spend("olga", cost=1)
    state = snapshot(redis_client, prefix)
    again = rc.spend("olga", cost=10, idempotency_key="req-1")
    assert again.replayed and not first.replayed
    assert (again.credits_remaining, again.sequence) == (first.credits_remaining, first.sequence)
    assert snapshot(redis_client, prefix) == state
    assert rc.balance("olga").credits == 89


def test_grant_keyed_by_payment_id_applies_once(rc: RedCredit) -> None:
    for _ in range(3):
        change = rc.grant("pam", 500, idempotency_key="pi_3MtwBwLkdIwHu7ix28a3tqPa")
    assert change.replayed and change.credits == 600
    assert rc.balance("pam").credits == 600


def test_same_key_for_another_call_is_refused(rc: RedCredit) -> None:
    rc.spend("quinn", cost=5, idempotency_key="op-7")
    with pytest.raises(IdempotencyConflict):
        rc.spend("quinn", cost=6, idempotency_key="op-7")
    with pytest.raises(IdempotencyConflict):
        rc.grant("quinn", 5, idempotency_key="op-7")
    assert rc.balance("quinn").credits == 95


def test_keys_are_scoped_per_account(rc: RedCredit) -> None:
    rc.spend("rita", cost=5, idempotency_key="shared")
    assert not rc.spend("sam", cost=5, idempotency_key="shared").replayed
    # Ids that would collide if keys were joined naively.
    rc.spend("x:k", cost=1, idempotency_key="y")
    assert not rc.spend("x", cost=1, idempotency_key="k:y").replayed


def test_refusals_are_not_remembered(rc: RedCredit) -> None:
    rc.spend("tom", cost=100)
    with pytest.raises(Exception, match="needs 5 credits"):
        rc.spend("tom", cost=5, idempotency_key="retry-me")
    rc.grant("tom", 5)
    assert rc.spend("tom", cost=5, idempotency_key="retry-me").credits_remaining == 0


def test_settle_replay(rc: RedCredit) -> None:
    reservation = rc.reserve("uma", 40)
    first = rc.settle(reservation, 25, idempotency_key="settle-1")
    again = rc.settle(reservation, 25, idempotency_key="settle-1")
    assert again.replayed and again.charged == first.charged == 25
    assert rc.balance("uma").credits == 75


def test_reserve_replay_returns_the_first_reservation(rc: RedCredit) -> None:
    first = rc.reserve("vic", 30, idempotency_key="stream-9")
    again = rc.reserve("vic", 30, idempotency_key="stream-9")
    assert again.id == first.id and again.replayed
    assert rc.balance("vic").held == 30


def test_a_key_first_used_on_a_closed_reservation_is_kept_for_that_call(rc: RedCredit) -> None:
    # Closing a closed reservation replays its outcome; the key it came with
    # must then be bound to that call like any other, or a later call could take
    # it and the closing call, retried, would be refused as a conflict.
    reservation = rc.reserve("wes", 40)
    rc.release(reservation)
    again = rc.settle(reservation, 25, idempotency_key="close-2")
    assert again.replayed and (again.outcome, again.charged) == ("released", 0)
    with pytest.raises(IdempotencyConflict):
        rc.spend("wes", cost=5, idempotency_key="close-2")
    assert rc.settle(reservation, 25, idempotency_key="close-2") == again
    assert rc.balance("wes").credits == 100


def test_the_key_tells_feature_and_model_apart(settings: Settings) -> None:
    # Names may hold ":": feature "a:b" with model "c" is not feature "a" with model "b:c".
    priced = settings.model_copy(update={"costs": CostTable.from_mapping({"a": 5, "a:b": 5})})
    with RedCredit(settings=priced) as rc:
        rc.spend("yan", "a:b", model="c", idempotency_key="k")
        with pytest.raises(IdempotencyConflict):
            rc.spend("yan", "a", model="b:c", idempotency_key="k")
