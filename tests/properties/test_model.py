"""Random sequences of calls, on the sync and the async client, against an in-memory model.

The model restates the documented rules in plain Python: balances and holds,
leases that lapse at their deadline, idempotency keys, bypassing plans, rate
limits (GCRA and a credit-weighted token bucket, shadow and per-model) and
refills (rolling and calendar). Hypothesis shrinks any disagreement to a
shortest sequence of calls.

Time is the Redis server's, moved by the test-only ``engine.clock_offset_ms``
in steps of 2**18 ms (about 4 minutes). Real time passes too, some ms per run,
so the server runs ahead of the model by a small, growing lag. The parameters
below keep every decision independent of that lag: deadlines, periods and
emission intervals are whole steps (a comparison either has a step of margin
or is an exact tie, which the lag, never negative and never shrinking within
a run, resolves the way the model does), and each token bucket earns a whole
number of tokens per step at a rate that is a power of two per ms, so Lua's
doubles are exact and the lag adds less than one token. Durations the server
reports (retry-after, reset, deadlines) are checked to within the lag. The
flip side: at an exact tie the server is always a little past it, so this
test cannot tell ``>=`` from ``>`` there.
"""

from __future__ import annotations

import asyncio
import functools
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from fractions import Fraction
from functools import partial
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import pytest
import redis
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from redcredit import (
    AsyncRedCredit,
    IdempotencyConflict,
    InsufficientChatMessages,
    InsufficientCredits,
    InvalidInput,
    RateLimited,
    RedCredit,
    ReservationClosed,
    ReservationLapsed,
    ReservationRef,
    Settings,
    Settlement,
)
from redcredit.config import LimitSettings, PlanSettings, RefillSettings

STEP_MS = 2**18
DAY_MS = 86_400_000
# Model time 0 is this long before a local midnight of ZONE, so the calendar
# refill's day turns within a run.
MIDNIGHT_AT = 6 * STEP_MS
ZONE = "Asia/Kolkata"
# The token buckets earn a token every 8 s at the fastest: with more real time
# than that in one run, the lag could be worth a token.
MAX_LAG_MS = 4_000


def _ms(ms: int) -> timedelta:
    return timedelta(milliseconds=ms)


PLANS = {
    # The default plan: a request limit, a credit bucket, chat messages refilled daily.
    "free": PlanSettings(
        limits=(
            LimitSettings(name="rpm", rate=2, period=_ms(2 * STEP_MS), burst=3),
            LimitSettings(name="tpm", kind="credits", rate=32, period=_ms(STEP_MS), burst=60),
        ),
        refill=RefillSettings(chat_messages=6, every="day", timezone=ZONE),
    ),
    # Bypassing, yet limited and refilled; its limits share names (so state) with free's.
    # The bucket earns at free's rate: a wait for tokens earned at another rate would
    # stretch the lag by the ratio of the two.
    "paid": PlanSettings(
        bypass=True,
        limits=(
            LimitSettings(name="rpm", rate=1, period=_ms(2 * STEP_MS), burst=2),
            LimitSettings(name="tpm", kind="credits", rate=32, period=_ms(STEP_MS), burst=120),
        ),
        refill=RefillSettings(credits=150, every=_ms(2 * STEP_MS)),
    ),
    # A shadow per-model limit; both balances refilled on a rolling period.
    "starter": PlanSettings(
        limits=(
            LimitSettings(
                name="trial", rate=1, period=_ms(STEP_MS), burst=1, per_model=True, shadow=True
            ),
        ),
        refill=RefillSettings(credits=80, chat_messages=5, every=_ms(3 * STEP_MS)),
    ),
    "enterprise": PlanSettings(bypass=True),
}
# Prices of tests/conftest.py's cost table.
FEATURES: dict[str, Callable[[int | None], int]] = {
    "image": lambda units: 10,
    "document": lambda units: 2 + 3 * (units or 0),
}

ACCOUNTS = st.sampled_from(["m1", "m2", "m3"])
# "new" is a key never used before (see keyed); "k1" is soon taken, and reusing it for
# another call is refused.
KEYS = st.sampled_from([None, None, "new", "new", "k1"])
MODELS = st.sampled_from([None, "big"])
PRICES = st.one_of(
    st.integers(0, 60),
    st.just(("image", None)),
    st.tuples(st.just("document"), st.integers(0, 5)),
)
LEASES = st.integers(1, 3)  # in steps


class Blocking:
    """An AsyncRedCredit behind the sync client's methods: each call runs to its end on one loop.

    It lets one machine drive both clients; only the driver differs between them.
    """

    def __init__(self, settings: Settings) -> None:
        self._runner = asyncio.Runner()
        self._client = self._runner.run(self._open(settings))
        self.engine = self._client.engine

    @staticmethod
    async def _open(settings: Settings) -> AsyncRedCredit:
        return AsyncRedCredit(settings=settings)

    def _wait(self, call: Any) -> Any:
        return self._runner.run(call)

    def spend(self, *args: Any, **kwargs: Any) -> Any:
        return self._wait(self._client.spend(*args, **kwargs))

    def spend_chat_message(self, *args: Any, **kwargs: Any) -> Any:
        return self._wait(self._client.spend_chat_message(*args, **kwargs))

    def chat_turn(self, *args: Any, **kwargs: Any) -> Any:
        return self._wait(self._client.chat_turn(*args, **kwargs))

    def grant(self, *args: Any, **kwargs: Any) -> Any:
        return self._wait(self._client.grant(*args, **kwargs))

    def correct(self, *args: Any, **kwargs: Any) -> Any:
        return self._wait(self._client.correct(*args, **kwargs))

    def set_plan(self, *args: Any, **kwargs: Any) -> Any:
        return self._wait(self._client.set_plan(*args, **kwargs))

    def balance(self, *args: Any, **kwargs: Any) -> Any:
        return self._wait(self._client.balance(*args, **kwargs))

    def reset_limits(self, *args: Any, **kwargs: Any) -> Any:
        return self._wait(self._client.reset_limits(*args, **kwargs))

    def reserve(self, *args: Any, **kwargs: Any) -> Any:
        return self._wait(self._client.reserve(*args, **kwargs))

    def settle(self, *args: Any, **kwargs: Any) -> Any:
        return self._wait(self._client.settle(*args, **kwargs))

    def release(self, *args: Any, **kwargs: Any) -> Any:
        return self._wait(self._client.release(*args, **kwargs))

    def extend(self, *args: Any, **kwargs: Any) -> Any:
        return self._wait(self._client.extend(*args, **kwargs))

    def close(self) -> None:
        self._wait(self._client.close())
        self._runner.close()


@dataclass
class ModelAccount:
    name: str
    credits: int
    chat: int
    plan: str
    # Rate limit state by field: a GCRA theoretical arrival time, or a bucket's (tokens, time).
    limits: dict[str, Any] = field(default_factory=dict)
    # Start of the last refill period, by resource ("c" credits, "m" chat messages).
    marks: dict[str, int] = field(default_factory=dict)
    # Idempotency key -> (what the call was, its first result).
    keys: dict[str, tuple[tuple[object, ...], Any]] = field(default_factory=dict)


@dataclass
class ModelReservation:
    account: str
    id: str
    amount: int
    deadline: int
    bypass: bool  # made on a bypassing plan: holds nothing, charged without limit
    closed: Settlement | None = None

    def __repr__(self) -> str:
        return f"<{self.amount} held by {self.account} until {self.deadline}>"


class ModelLimit(NamedTuple):
    name: str
    limit: int
    window_s: int
    remaining: int
    reset_ms: Fraction
    shadow: bool
    would_refuse: bool


def keyed(method: Callable[..., Any]) -> Callable[..., Any]:
    """Gives key "new" a name never used before, and remembers a keyed call for a retry."""

    @functools.wraps(method)
    def wrapper(self: LedgerMachine, **arguments: Any) -> Any:
        if arguments["key"] == "new":
            self.keys_made += 1
            arguments = {**arguments, "key": f"new{self.keys_made}"}
        if arguments["key"] is not None:
            self.last_keyed = (method, arguments)
        return method(self, **arguments)

    return wrapper


class LedgerMachine(RuleBasedStateMachine):
    reservations = Bundle("reservations")

    def __init__(self, client: Any, raw: redis.Redis) -> None:
        super().__init__()
        self.client = client
        self.raw = raw
        self.now = 0
        self.accounts: dict[str, ModelAccount] = {}
        self.all_reservations: list[ModelReservation] = []
        self.last_keyed: tuple[Callable[..., Any], dict[str, Any]] | None = None
        self.keys_made = 0
        self.started_ms = self.server_time_ms()
        zone = ZoneInfo(ZONE)
        today = datetime.fromtimestamp(self.started_ms / 1000, zone).date()
        midnight = datetime.combine(today + timedelta(days=1), datetime.min.time(), zone)
        # Server time of model time 0, give or take the lag.
        self.origin_ms = int(midnight.timestamp() * 1000) - MIDNIGHT_AT
        self.offset_ms = self.origin_ms - self.started_ms
        client.engine.clock_offset_ms = self.offset_ms

    def teardown(self) -> None:
        self.client.close()

    # -- the model -----------------------------------------------------------------------------

    def model(self, account: str) -> ModelAccount:
        if account not in self.accounts:
            opening = self.client.engine.settings
            self.accounts[account] = ModelAccount(
                account, opening.free_credits, opening.free_chat_messages, opening.default_plan
            )
        return self.accounts[account]

    def plan(self, m: ModelAccount) -> PlanSettings:
        return self.client.engine.settings.plans[m.plan]

    def bypass(self, m: ModelAccount) -> bool:
        return self.plan(m).bypass

    def held(self, account: str) -> int:
        return sum(
            r.amount
            for r in self.all_reservations
            if r.account == account and not r.bypass and r.closed is None and self.now < r.deadline
        )

    def available(self, m: ModelAccount) -> int:
        return m.credits - self.held(m.name)

    def apply_refills(self, m: ModelAccount) -> None:
        """Refills due on the account's plan, as the first script to touch it in a period does.

        The first touch only starts the clock; a refill tops a balance up to its
        amount, never down. Rolling periods count from the last refill; the
        calendar day starts at local midnight (model time MIDNIGHT_AT; the day
        before started a day earlier, its exact length immaterial here). Both
        kinds share one mark per resource, whatever plan set it.
        """
        refill = self.plan(m).refill
        if refill is None:
            return
        for resource, amount in (("c", refill.credits), ("m", refill.chat_messages)):
            if not amount:
                continue
            mark = m.marks.get(resource)
            start: int | None
            if isinstance(refill.every, timedelta):
                period = refill.every // _ms(1)
                start = self.now if mark is None or self.now >= mark + period else None
            else:
                assert refill.every == "day"
                start = MIDNIGHT_AT if self.now >= MIDNIGHT_AT else MIDNIGHT_AT - DAY_MS
                if mark is not None and mark >= start:
                    start = None
            if start is None:
                continue
            m.marks[resource] = start
            if mark is not None and resource == "c":
                m.credits = max(m.credits, amount)
            elif mark is not None:
                m.chat = max(m.chat, amount)

    def evaluate_limits(
        self, m: ModelAccount, model: str | None, requests: int, weight: int
    ) -> tuple[tuple[str, Fraction] | None, list[ModelLimit], dict[str, Any]]:
        """(refusal, states, new state) of the plan's limits for a call.

        Limits are checked in order; the first one that refuses, unless it is a
        shadow, refuses the call, with the wait until it would allow it. GCRA:
        a call is allowed when its new theoretical arrival time is at most
        ``burst`` emission intervals ahead. Token bucket: ``burst`` tokens,
        earned at ``rate`` per ``period``, and a call takes its weight.
        """
        now = self.now
        states, writes = [], {}
        for limit in self.plan(m).limits:
            name = f"l.{limit.name}" + (f".{model or ''}" if limit.per_model else "")
            period = limit.period // _ms(1)
            burst = limit.capacity
            if limit.kind == "requests":
                interval = Fraction(period, limit.rate)
                tat = max(m.limits.get(name, now), now)
                new_tat = tat + interval * requests
                allow_at = new_tat - interval * burst
                allowed = allow_at <= now
                value: Any = new_tat
                retry = allow_at - now
                remaining = math.floor((now - allow_at) / interval) if allowed else 0
                reset = new_tat - now if allowed else tat - now
            else:
                per_ms = Fraction(limit.rate, period)
                tokens, last = m.limits.get(name, (Fraction(burst), now))
                tokens = min(Fraction(burst), tokens + (now - last) * per_ms)
                allowed = weight <= tokens
                left = tokens - weight if allowed else tokens
                value = (left, now)
                retry = (weight - tokens) / per_ms
                remaining = math.floor(left)
                reset = (burst - left) / per_ms
            if not allowed and not limit.shadow:
                return (limit.name, retry), [], {}
            if allowed:
                writes[name] = value
            states.append(
                ModelLimit(
                    limit.name,
                    limit.rate,
                    math.ceil(period / 1000),
                    remaining,
                    reset,
                    limit.shadow,
                    not allowed,
                )
            )
        return None, states, writes

    # -- checks --------------------------------------------------------------------------------

    def server_time_ms(self) -> int:
        seconds, micros = self.raw.time()
        return seconds * 1000 + micros // 1000

    def lag_ms(self) -> int:
        """How far the server has run ahead of the model so far, at least as far as any script saw.

        Measured on the server's clock, as the scripts are, by a TIME sent after
        them: a client-side clock disagrees with it by however long a request
        waits to be served, which a loaded machine stretches past any allowance.
        """
        return self.server_time_ms() - self.started_ms

    def check_duration(self, reported: int, model_ms: Fraction | int, per: int = 1) -> None:
        """A wait or reset measured by the server: shorter than the model's by at most the lag."""
        lag = self.lag_ms()
        low = math.ceil(max(model_ms - Fraction(lag), 0) / per)
        assert low <= reported <= math.ceil(max(model_ms, 0) / per), (reported, model_ms, lag)

    def check_instant(self, reported_ms: int, model_ms: int) -> None:
        """A server time: the model's, plus the lag."""
        assert 0 <= reported_ms - (self.origin_ms + model_ms) <= self.lag_ms()

    def check_limits(self, reported: Any, expected: list[ModelLimit]) -> None:
        assert [
            (s.name, s.limit, s.window_s, s.remaining, s.shadow, s.would_refuse) for s in reported
        ] == [
            (e.name, e.limit, e.window_s, e.remaining, e.shadow, e.would_refuse) for e in expected
        ]
        for state, model in zip(reported, expected, strict=True):
            self.check_duration(state.reset_s, model.reset_ms, per=1000)

    def expect_rate_limited(self, call: Callable[[], Any], refusal: tuple[str, Fraction]) -> None:
        with pytest.raises(RateLimited) as refused:
            call()
        assert refused.value.limit == refusal[0]
        self.check_duration(refused.value.retry_after_ms, refusal[1])

    def expect_short(
        self, call: Callable[[], Any], error: type[Exception], required: int, available: int
    ) -> None:
        with pytest.raises(error) as refused:
            call()
        assert (refused.value.required, refused.value.available) == (required, available)  # type: ignore[attr-defined]

    def replayed_or_conflicting(
        self, m: ModelAccount, key: str | None, call_id: tuple[object, ...], call: Callable[[], Any]
    ) -> bool:
        """True when ``key`` was used before: the call then changes nothing.

        The same call returns the first result; any other call is refused.
        """
        if key is None or key not in m.keys:
            return False
        first_id, first = m.keys[key]
        if first_id != call_id:
            with pytest.raises(IdempotencyConflict):
                call()
        elif isinstance(first, int):
            assert call() == first
        else:
            assert call() == replace(first, replayed=True)
        return True

    def remember(
        self, m: ModelAccount, key: str | None, call_id: tuple[object, ...], result: Any
    ) -> None:
        if key is not None:
            m.keys[key] = (call_id, result)

    def check_journal(self, account: str, sequence: int, credits: int, chat: int) -> None:
        """Conservation: the account's journal entries, numbered 1..n, sum to its balances."""
        journal = self.client.engine.keys.for_account(account).journal
        entries = [
            entry for _, entry in self.raw.xrange(journal) if entry[b"a"] == account.encode()
        ]
        assert [int(e[b"s"]) for e in entries] == list(range(1, sequence + 1))
        assert sum(int(e[b"dc"]) for e in entries) == credits
        assert sum(int(e[b"dm"]) for e in entries) == chat

    def check_last_entry(self, account: str, **fields: int | str) -> None:
        """The call just made is journaled with its usage, on a bypassing plan too."""
        journal = self.client.engine.keys.for_account(account).journal
        [(_, entry)] = self.raw.xrevrange(journal, count=1)
        assert entry[b"a"] == account.encode()
        assert {name: entry[name.encode()].decode() for name in fields} == {
            name: str(value) for name, value in fields.items()
        }

    @invariant()
    def lag_stays_small(self) -> None:
        # The margins described at the top of the file need this; a loaded machine could break it.
        assert self.lag_ms() < MAX_LAG_MS, "the run was too slow for the model's timing margins"

    # -- rules ---------------------------------------------------------------------------------

    def debit(
        self,
        account: str,
        call_id: tuple[object, ...],
        call: Callable[[], Any],
        *,
        cost: int,
        messages: int,
        model: str | None,
        key: str | None,
    ) -> None:
        """A spend, chat message or chat turn: limits, then credits, then chat messages."""
        m = self.model(account)
        if self.replayed_or_conflicting(m, key, call_id, call):
            return
        self.apply_refills(m)
        refusal, states, writes = self.evaluate_limits(m, model, 1, cost)
        if refusal is not None:
            self.expect_rate_limited(call, refusal)
            return
        bypass = self.bypass(m)
        if not bypass and cost > self.available(m):
            self.expect_short(call, InsufficientCredits, cost, self.available(m))
            return
        if not bypass and messages > m.chat:
            self.expect_short(call, InsufficientChatMessages, messages, m.chat)
            return
        result = call()
        m.limits.update(writes)
        if not bypass:
            m.credits -= cost
            m.chat -= messages
        remaining = (None, None) if bypass else (m.credits, m.chat)
        assert (result.credits_remaining, result.chat_messages_remaining) == remaining
        assert not result.replayed
        self.check_limits(result.limits, states)
        dc, dm = (0, 0) if bypass else (-cost, -messages)
        self.check_last_entry(account, op=call_id[0], uc=cost, um=messages, dc=dc, dm=dm)
        self.remember(m, key, call_id, result)

    @rule(account=ACCOUNTS, price=PRICES, model=MODELS, key=KEYS)
    @keyed
    def spend(self, account: str, price: Any, model: str | None, key: str | None) -> None:
        if isinstance(price, int):
            feature, units, cost = None, None, price
        else:
            feature, units = price
            cost = FEATURES[feature](units)
        call = partial(
            self.client.spend,
            account,
            feature,
            cost=None if feature else cost,
            units=units,
            model=model,
            idempotency_key=key,
        )
        call_id = ("spend", cost, feature, model)
        self.debit(account, call_id, call, cost=cost, messages=0, model=model, key=key)

    @rule(
        account=ACCOUNTS,
        messages=st.integers(1, 2),
        cost=st.one_of(st.none(), st.integers(0, 30)),
        model=MODELS,
        key=KEYS,
    )
    @keyed
    def chat(
        self, account: str, messages: int, cost: int | None, model: str | None, key: str | None
    ) -> None:
        """A chat message alone (no cost), or a chat turn: messages and credits together."""
        call: Callable[[], Any]
        if cost is None:
            call = partial(
                self.client.spend_chat_message,
                account,
                messages=messages,
                model=model,
                idempotency_key=key,
            )
        else:
            call = partial(
                self.client.chat_turn,
                account,
                cost=cost,
                messages=messages,
                model=model,
                idempotency_key=key,
            )
        call_id = ("chat" if cost is None else "turn", cost or 0, messages, model)
        self.debit(account, call_id, call, cost=cost or 0, messages=messages, model=model, key=key)

    @rule(
        account=ACCOUNTS,
        correct=st.booleans(),
        credits=st.integers(-60, 60),
        messages=st.integers(-5, 5),
        key=KEYS,
    )
    @keyed
    def adjust(
        self, account: str, correct: bool, credits: int, messages: int, key: str | None
    ) -> None:
        """A grant (amounts >= 0) or a correction (signed); never below the holds or zero."""
        m = self.model(account)
        method = self.client.correct if correct else self.client.grant
        call = partial(method, account, credits, chat_messages=messages, idempotency_key=key)
        if (credits == messages == 0) or (not correct and min(credits, messages) < 0):
            with pytest.raises(InvalidInput):
                call()
            return
        call_id = ("correct" if correct else "grant", credits, messages)
        if self.replayed_or_conflicting(m, key, call_id, call):
            return
        if -credits > self.available(m):
            self.expect_short(call, InsufficientCredits, -credits, self.available(m))
            return
        if -messages > m.chat:
            self.expect_short(call, InsufficientChatMessages, -messages, m.chat)
            return
        result = call()
        m.credits += credits
        m.chat += messages
        assert (result.credits, result.chat_messages, result.replayed) == (m.credits, m.chat, False)
        self.remember(m, key, call_id, result)

    @rule(account=ACCOUNTS)
    def drain(self, account: str) -> None:
        """Corrects the available credits to exactly zero: any error in the holds counted shows."""
        available = self.available(self.model(account))
        if available > 0:
            self.adjust(account=account, correct=True, credits=-available, messages=0, key=None)

    @rule(
        account=ACCOUNTS, plan=st.sampled_from(["free", "starter", "paid", "enterprise"]), key=KEYS
    )
    @keyed
    def set_plan(self, account: str, plan: str, key: str | None) -> None:
        m = self.model(account)
        call = partial(self.client.set_plan, account, plan, idempotency_key=key)
        if self.replayed_or_conflicting(m, key, ("plan", plan), call):
            return
        result = call()
        assert (result.plan, result.previous_plan, result.replayed) == (plan, m.plan, False)
        m.plan = plan
        self.remember(m, key, ("plan", plan), result)

    @rule(account=ACCOUNTS, name=st.sampled_from([None, "rpm", "tpm", "trial"]), key=KEYS)
    @keyed
    def reset_limits(self, account: str, name: str | None, key: str | None) -> None:
        """Forgets a limit's state (every model's, for a per-model limit), or all limits'."""
        m = self.model(account)
        call = partial(self.client.reset_limits, account, name, idempotency_key=key)
        if self.replayed_or_conflicting(m, key, ("reset", name), call):
            return
        gone = [
            f for f in m.limits if name is None or f == f"l.{name}" or f.startswith(f"l.{name}.")
        ]
        removed = call()
        assert removed == len(gone)
        for f in gone:
            del m.limits[f]
        self.remember(m, key, ("reset", name), removed)

    @rule(
        target=reservations,
        account=ACCOUNTS,
        amount=st.integers(1, 60),
        lease=LEASES,
        messages=st.integers(0, 1),
        model=MODELS,
        key=KEYS,
    )
    @keyed
    def reserve(
        self,
        account: str,
        amount: int,
        lease: int,
        messages: int,
        model: str | None,
        key: str | None,
    ) -> Any:
        """Holds credits for a lease (spending chat messages now); limits weigh the amount held."""
        m = self.model(account)
        call = partial(
            self.client.reserve,
            account,
            amount,
            ttl=_ms(lease * STEP_MS),
            messages=messages,
            model=model,
            idempotency_key=key,
        )
        call_id = ("reserve", amount, lease, messages, model)
        if self.replayed_or_conflicting(m, key, call_id, call):
            return multiple()
        self.apply_refills(m)
        refusal, states, writes = self.evaluate_limits(m, model, 1, amount)
        if refusal is not None:
            self.expect_rate_limited(call, refusal)
            return multiple()
        bypass = self.bypass(m)
        if not bypass and amount > self.available(m):
            self.expect_short(call, InsufficientCredits, amount, self.available(m))
            return multiple()
        if not bypass and messages > m.chat:
            self.expect_short(call, InsufficientChatMessages, messages, m.chat)
            return multiple()
        result = call()
        m.limits.update(writes)
        if not bypass:
            m.chat -= messages
        reservation = ModelReservation(
            account, result.id, amount, self.now + lease * STEP_MS, bypass
        )
        self.all_reservations.append(reservation)
        assert (result.amount, result.replayed) == (amount, False)
        self.check_instant(result.deadline_ms, reservation.deadline)
        self.check_limits(result.limits, states)
        self.remember(m, key, call_id, result)
        return reservation

    @rule(
        reservation=reservations,
        how=st.sampled_from(["release", "settle", "settle_late"]),
        actual=st.integers(0, 90),
        key=KEYS,
    )
    @keyed
    def close(self, reservation: ModelReservation, how: str, actual: int, key: str | None) -> None:
        """Settles (charging ``actual``) or releases; closing again returns the first outcome."""
        r = reservation
        m = self.model(r.account)
        ref = ReservationRef(r.account, r.id)
        release, late = how == "release", how == "settle_late"
        call: Callable[[], Any]
        if release:
            call_id: tuple[object, ...] = ("release", r.id)
            call = partial(self.client.release, ref, idempotency_key=key)
        else:
            call_id = ("settle", r.id, actual, late)
            call = partial(self.client.settle, ref, actual, allow_late=late, idempotency_key=key)
        if self.replayed_or_conflicting(m, key, call_id, call):
            return
        if r.closed is not None:
            assert call() == replace(r.closed, replayed=True)
            self.remember(m, key, call_id, r.closed)
            return
        lapsed = self.now >= r.deadline
        if lapsed and not release and not late:
            with pytest.raises(ReservationLapsed):
                call()
            return
        # The hold ends first (a lapsed one counts for nothing already); a charge
        # above it is taken only as far as the available balance goes.
        own = 0 if lapsed or r.bypass else r.amount
        charged = 0 if release else actual if r.bypass else min(actual, self.available(m) + own)
        result = call()
        if not r.bypass:
            m.credits -= charged
        outcome = "released" if release else "settled_late" if lapsed else "settled"
        assert result == Settlement(
            account=r.account,
            reservation_id=r.id,
            outcome=outcome,
            charged=charged,
            uncharged=(0 if release else actual) - charged,
            credits_remaining=None if r.bypass else m.credits,
            sequence=result.sequence,
        )
        r.closed = result
        dc = 0 if r.bypass else -charged
        op = "release" if release else "settle"
        self.check_last_entry(r.account, op=op, uc=0 if release else actual, dc=dc)
        self.remember(m, key, call_id, result)

    @rule(reservation=reservations, lease=LEASES)
    def extend(self, reservation: ModelReservation, lease: int) -> None:
        """Renews a live lease to now + ttl; a closed or lapsed one cannot be revived."""
        r = reservation
        call = partial(
            self.client.extend, ReservationRef(r.account, r.id), ttl=_ms(lease * STEP_MS)
        )
        if r.closed is not None:
            with pytest.raises(ReservationClosed):
                call()
            return
        if self.now >= r.deadline:
            with pytest.raises(ReservationLapsed):
                call()
            return
        result = call()
        r.deadline = self.now + lease * STEP_MS
        assert (result.id, result.amount) == (r.id, r.amount)
        self.check_instant(result.deadline_ms, r.deadline)

    @precondition(lambda self: self.last_keyed is not None)
    @rule()
    def repeat_keyed_call(self) -> None:
        """Retries the last call made with an idempotency key, as a client would after a timeout."""
        assert self.last_keyed is not None
        method, arguments = self.last_keyed
        method(self, **arguments)

    @rule(steps=st.integers(1, 4))
    def advance_time(self, steps: int) -> None:
        self.now += steps * STEP_MS
        self.client.engine.clock_offset_ms = self.offset_ms + self.now

    @rule(model=MODELS)
    def check_balances(self, model: str | None) -> None:
        """Reads every account seen so far and peeks at its limits.

        A read applies the refills due, like any call, so it is a step of its
        own rather than an invariant: between two reads, refills stay lazy.
        """
        for account, m in self.accounts.items():
            self.apply_refills(m)
            _, states, _ = self.evaluate_limits(m, model, 0, 0)
            balance = self.client.balance(account, model=model)
            assert (balance.credits, balance.chat_messages, balance.plan, balance.unlimited) == (
                m.credits,
                m.chat,
                m.plan,
                self.bypass(m),
            )
            assert balance.held == self.held(account)
            assert balance.available >= 0
            self.check_limits(balance.limits, states)
            self.check_instant(balance.server_time_ms, self.now)
            self.check_journal(account, balance.sequence, balance.credits, balance.chat_messages)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_clients_agree_with_model(kind: str, settings: Settings, redis_client: redis.Redis) -> None:
    def machine() -> LedgerMachine:
        # Each run of the machine gets fresh accounts under a new prefix.
        update = {
            "key_prefix": "m" + uuid.uuid4().hex[:12],
            "plans": {**settings.plans, **PLANS},
            # Few, so that running out of chat messages happens too.
            "free_chat_messages": 4,
        }
        run_settings = settings.model_copy(update=update)
        client = RedCredit(settings=run_settings) if kind == "sync" else Blocking(run_settings)
        return LedgerMachine(client, redis_client)

    run_state_machine_as_test(
        machine,
        settings=hypothesis_settings(
            max_examples=200,
            stateful_step_count=60,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
