"""Random sequences of operations against a simple in-memory model of the rules."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from redcredit import (
    InsufficientChatMessages,
    InsufficientCredits,
    RedCredit,
    Reservation,
    ReservationLapsed,
    Settings,
)

ACCOUNTS = st.sampled_from(["m1", "m2", "m3"])
AMOUNTS = st.integers(min_value=0, max_value=60)
STEP_MS = 2_500  # time moves in steps far larger than the real time a run takes


@dataclass
class ModelAccount:
    credits: int = 100
    chat: int = 10
    plan: str = "free"
    holds: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (amount, deadline)

    def held(self, now: int) -> int:
        return sum(amount for amount, deadline in self.holds.values() if now < deadline)

    def available(self, now: int) -> int:
        return self.credits - self.held(now)

    @property
    def bypass(self) -> bool:
        return self.plan in ("paid", "demo", "enterprise")


class LedgerMachine(RuleBasedStateMachine):
    client: RedCredit

    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.accounts: dict[str, ModelAccount] = {}
        self.open: list[tuple[Reservation, int]] = []  # (reservation, its model deadline)
        self.client.engine.clock_offset_ms = 0

    def model(self, account: str) -> ModelAccount:
        return self.accounts.setdefault(account, ModelAccount())

    @rule(account=ACCOUNTS, cost=AMOUNTS)
    def spend(self, account: str, cost: int) -> None:
        m = self.model(account)
        if not m.bypass and cost > m.available(self.now):
            with pytest.raises(InsufficientCredits):
                self.client.spend(account, cost=cost)
            return
        result = self.client.spend(account, cost=cost)
        if not m.bypass:
            m.credits -= cost
        assert result.credits_remaining == (None if m.bypass else m.credits)

    @rule(account=ACCOUNTS, cost=AMOUNTS)
    def chat_turn(self, account: str, cost: int) -> None:
        m = self.model(account)
        if not m.bypass and cost > m.available(self.now):
            with pytest.raises(InsufficientCredits):
                self.client.chat_turn(account, cost=cost)
        elif not m.bypass and m.chat < 1:
            with pytest.raises(InsufficientChatMessages):
                self.client.chat_turn(account, cost=cost)
        else:
            self.client.chat_turn(account, cost=cost)
            if not m.bypass:
                m.credits -= cost
                m.chat -= 1

    @rule(
        account=ACCOUNTS,
        credits=AMOUNTS,
        messages=st.integers(0, 3),
        key=st.sampled_from([None, "g1", "g2"]),
    )
    def grant(self, account: str, credits: int, messages: int, key: str | None) -> None:
        if credits == 0 and messages == 0:
            return
        m = self.model(account)
        result = self.client.grant(
            account,
            credits,
            chat_messages=messages,
            idempotency_key=f"{account}-{key}-{credits}-{messages}" if key else None,
        )
        if not result.replayed:
            m.credits += credits
            m.chat += messages
        assert (result.credits, result.chat_messages) == (m.credits, m.chat) or result.replayed

    @rule(account=ACCOUNTS, plan=st.sampled_from(["free", "paid", "starter"]))
    def set_plan(self, account: str, plan: str) -> None:
        self.client.set_plan(account, plan)
        self.model(account).plan = plan

    @rule(account=ACCOUNTS, amount=st.integers(1, 60), steps=st.integers(1, 4))
    def reserve(self, account: str, amount: int, steps: int) -> None:
        m = self.model(account)
        ttl_s = steps * 5
        if not m.bypass and amount > m.available(self.now):
            with pytest.raises(InsufficientCredits):
                self.client.reserve(account, amount, ttl=ttl_s)
            return
        reservation = self.client.reserve(account, amount, ttl=ttl_s)
        deadline = self.now + ttl_s * 1000
        if not m.bypass:
            m.holds[reservation.id] = (amount, deadline)
        self.open.append((reservation, deadline))

    @precondition(lambda self: self.open)
    @rule(data=st.data(), actual=st.integers(0, 90), late=st.booleans(), release=st.booleans())
    def close(self, data: st.DataObject, actual: int, late: bool, release: bool) -> None:
        reservation, deadline = self.open.pop(data.draw(st.integers(0, len(self.open) - 1)))
        m = self.model(reservation.account)
        hold = m.holds.pop(reservation.id, None)
        lapsed = self.now >= deadline
        if release:
            assert self.client.release(reservation).charged == 0
            return
        if lapsed and not late:
            with pytest.raises(ReservationLapsed):
                self.client.settle(reservation, actual)
            return
        settlement = self.client.settle(reservation, actual, allow_late=late)
        if hold is None:  # a bypassing plan's reservation
            assert settlement.charged == actual
            return
        expected = min(actual, m.available(self.now))  # the hold itself is popped already
        assert settlement.charged == expected
        m.credits -= expected

    @rule(steps=st.integers(1, 4))
    def advance_time(self, steps: int) -> None:
        self.now += steps * STEP_MS
        self.client.engine.clock_offset_ms = self.now

    @invariant()
    def balances_match(self) -> None:
        for account, m in self.accounts.items():
            balance = self.client.balance(account)
            assert (balance.credits, balance.chat_messages, balance.plan) == (
                m.credits,
                m.chat,
                m.plan,
            )
            assert balance.held == m.held(self.now)
            assert balance.available >= 0


def test_engine_agrees_with_model(settings: Settings) -> None:
    class Machine(LedgerMachine):
        def __init__(self) -> None:
            # Each run of the machine gets fresh accounts under a new prefix.
            prefix = "m" + uuid.uuid4().hex[:12]
            update = {"key_prefix": prefix}
            type(self).client = RedCredit(settings=settings.model_copy(update=update))
            super().__init__()

        def teardown(self) -> None:
            self.client.close()

    run_state_machine_as_test(
        Machine,
        settings=hypothesis_settings(
            max_examples=25,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
