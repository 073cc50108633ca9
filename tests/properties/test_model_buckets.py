"""Random sequences of grant, spend, hold and void calls against the bucket model, on one
server and on a three-primary cluster, with the sync and the async client.

The model (``bucket_model.py``) restates docs/grants.md: buckets with a
category, priority, start and expiry burning in order, holds backed only by
credits that outlive them, voids that move those holds or are refused,
overdrafts, and refills with a mode, a rollover and an expiry. After every
step the account is read back and compared bucket by bucket, its holds'
backing is read from the account hash, and its journal is summed.

Time moves as in ``test_model.py``: the test-only ``engine.clock_offset_ms``
in whole steps of 2**18 ms, so the server runs a small, growing lag ahead of
the model, and every instant the model hits (an expiry, a start, a deadline,
a refill period) is hit exactly. The clock is set a millisecond ahead, so an
instant the server computed (a deadline, ``expires_in``) lies after one the
client sent (``expires_at``) at the same model time; the model learns each
call's lag from what it reports (see ``bucket_model.Clock``). A lease that
would end at the model time a bucket computed by another call expires is
lengthened by a step: whether the two differ by a millisecond is not the
model's to know.

``REDCREDIT_MODEL_EXAMPLES`` sets the examples per topology and client (the
long mode: e.g. 2000).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from redcredit import (
    AsyncRedCredit,
    IdempotencyConflict,
    InvalidInput,
    PlanSettings,
    RedCredit,
    RefillSettings,
    ReservationClosed,
    ReservationLapsed,
    ReservationRef,
    Settings,
    Settlement,
    SettlementOutcome,
)
from redcredit.config import GrantSettings

from .bucket_model import BASE, Account, Bucket, Clock, Instant, Ledger, Refused

STEP_MS = 2**18
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
EXAMPLES = int(os.environ.get("REDCREDIT_MODEL_EXAMPLES", "40"))
FREE_CREDITS = 50
# Entries a call journals for what time did before it: they carry the call's key.
TIME_OPS = {"open", "lapse", "expire", "effective", "refill"}
# What the runs did (refusals, expiries, moved holds...), printed under ``pytest -s``.
SEEN: collections.Counter[str] = collections.Counter()


def _steps(n: int) -> timedelta:
    return timedelta(milliseconds=n * STEP_MS)


# Refill priorities differ from every grant's (PRIORITIES, and the base bucket's 50), so a
# refill made by a call burns in an order that call's own clock cannot change.
PLANS = {
    "free": PlanSettings(),
    "postpaid": PlanSettings(overdraft=150),
    "topup": PlanSettings(refill=RefillSettings(credits=80, every=_steps(3), priority=40)),
    "addcap": PlanSettings(
        refill=RefillSettings(
            credits=50, every=_steps(2), mode="add", rollover=20, expires_in=_steps(3), priority=60
        )
    ),
    "addnone": PlanSettings(
        refill=RefillSettings(
            credits=40,
            every=_steps(2),
            mode="add",
            rollover="none",
            expires_in=_steps(2),
            category="paid",
            priority=45,
        )
    ),
    # Refills that outlive their period: each refill moves the kept credits' expiry on.
    "addall": PlanSettings(
        refill=RefillSettings(
            credits=30, every=_steps(3), mode="add", expires_in=_steps(4), priority=55
        )
    ),
    "postrefill": PlanSettings(
        overdraft=100,
        refill=RefillSettings(
            credits=60, every=_steps(4), rollover=30, expires_in=_steps(3), priority=10
        ),
    ),
}
GRANTS = GrantSettings(categories=("free", "promotional", "paid"), max_grants=4)

ACCOUNTS = st.sampled_from(["b1", "b2"])
# "new" is a key never used before; "k1" is soon taken, and reusing it for another call is refused.
KEYS = st.sampled_from([None, None, "new", "k1"])
GRANT_IDS = st.sampled_from([None, None, "g1", "g2", "g3"])
CATEGORIES = st.sampled_from([None, "promotional", "paid", "free"])
PRIORITIES = st.sampled_from([None, 0, 50, 200])
STARTS = st.sampled_from([None, None, 0, 1, 2])  # steps from now
EXPIRIES = st.one_of(st.none(), st.tuples(st.sampled_from(["at", "in"]), st.integers(0, 5)))
LEASES = st.integers(1, 4)


class Blocking:
    """An AsyncRedCredit behind the sync client's methods, each call run to its end on one loop."""

    def __init__(self, settings: Settings) -> None:
        self._runner = asyncio.Runner()
        self._client = self._runner.run(self._open(settings))
        self.engine = self._client.engine

    @staticmethod
    async def _open(settings: Settings) -> AsyncRedCredit:
        return AsyncRedCredit(settings=settings)

    def _wait(self, call: Any) -> Any:
        return self._runner.run(call)

    def grant(self, *args: Any, **kwargs: Any) -> Any:
        return self._wait(self._client.grant(*args, **kwargs))

    def void(self, *args: Any, **kwargs: Any) -> Any:
        return self._wait(self._client.void(*args, **kwargs))

    def spend(self, *args: Any, **kwargs: Any) -> Any:
        return self._wait(self._client.spend(*args, **kwargs))

    def correct(self, *args: Any, **kwargs: Any) -> Any:
        return self._wait(self._client.correct(*args, **kwargs))

    def set_plan(self, *args: Any, **kwargs: Any) -> Any:
        return self._wait(self._client.set_plan(*args, **kwargs))

    def balance(self, *args: Any, **kwargs: Any) -> Any:
        return self._wait(self._client.balance(*args, **kwargs))

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
class ModelReservation:
    account: str
    id: str
    amount: int
    deadline: Instant
    closed: Settlement | None = None

    def __repr__(self) -> str:
        return f"<{self.amount} held by {self.account} until {self.deadline.model}>"


def keyed(method: Callable[..., Any]) -> Callable[..., Any]:
    """Gives key "new" a name never used before, and remembers a keyed call for a retry."""

    @functools.wraps(method)
    def wrapper(self: BucketMachine, **arguments: Any) -> Any:
        if arguments["key"] == "new":
            self.keys_made += 1
            arguments = {**arguments, "key": f"new{self.keys_made}"}
        if arguments["key"] is not None:
            self.last_keyed = (method, arguments)
        return method(self, **arguments)

    return wrapper


class BucketMachine(RuleBasedStateMachine):
    reservations = Bundle("reservations")

    def __init__(self, client: Any, raw: Any) -> None:
        super().__init__()
        self.client = client
        self.raw = raw
        self.now = 0
        self.accounts: dict[str, Account] = {}
        self.last_keyed: tuple[Callable[..., Any], dict[str, Any]] | None = None
        self.keys_made = 0
        self.made: dict[str, ModelReservation] = {}
        self.origin = self.server_ms()
        self.clock = Clock()
        self.ledger = Ledger(GRANTS, PLANS, self.clock, self.origin)
        self.set_clock()

    def teardown(self) -> None:
        self.client.close()

    # -- time ----------------------------------------------------------------------------------

    def server_ms(self) -> int:
        seconds, micros = self.raw.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def set_clock(self) -> None:
        # One ms ahead: a lag of at least 1 (see the module's docstring).
        self.client.engine.clock_offset_ms = self.now + 1

    def at(self, steps: int) -> datetime:
        return EPOCH + timedelta(milliseconds=self.origin + self.now + steps * STEP_MS)

    @staticmethod
    def next_ms() -> None:
        """After a call that made an instant: the next one is made a millisecond later at least.

        Two creation times or deadlines that tie to the millisecond burn (or
        move) in the order of their random ids, which a replay of the same run
        would not repeat.
        """
        time.sleep(0.001)

    def learn(self, instant: Instant, server_ms: int) -> None:
        lag = self.clock.learn(instant, server_ms - self.origin)
        if lag is not None:
            # A call's clock: the model's, plus no more lag than the run has built up so far.
            assert lag <= self.server_ms() - self.origin + 1, (instant, lag)

    # -- the model -----------------------------------------------------------------------------

    def model(self, account: str) -> Account:
        if account not in self.accounts:
            self.accounts[account] = self.ledger.open(account, FREE_CREDITS, "free")
        return self.accounts[account]

    def begin(self, m: Account, *, refills: bool) -> int:
        """A call that reaches the account: time's effects first, which stay even if it refuses."""
        call = self.clock.begin()
        self.ledger.catch_up(m, self.now, call, refills=refills)
        return call

    def attempt(
        self, m: Account, label: str, change: Callable[[Account], Any], call: Callable[[], Any]
    ) -> Any:
        """Runs ``change`` on a copy of the account: a refusal must be the server's too.

        Returns (server result, changed copy), or None after checking the refusal.
        """
        trial = Ledger.trial(m)
        try:
            outcome = change(trial)
        except Refused as refusal:
            refused = refusal
        else:
            SEEN[label] += 1
            return call(), outcome
        SEEN[f"{label} refused: {refused.error}"] += 1
        with pytest.raises(Exception) as raised:
            call()
        assert type(raised.value).__name__ == refused.error, raised.value
        if refused.details:
            error: Any = raised.value
            assert (error.required, error.available) == refused.details
        return None

    def commit(self, trial: Account) -> None:
        self.accounts[trial.name] = trial

    def replayed_or_conflicting(
        self, m: Account, key: str | None, call_id: tuple[object, ...], call: Callable[[], Any]
    ) -> bool:
        """True when ``key`` was used before: the same call returns the first result, any other
        is refused, and neither changes anything (nor lets time's effects in)."""
        if key is None or key not in m.keys:
            return False
        first_id, first = m.keys[key]
        if first_id != call_id:
            with pytest.raises(IdempotencyConflict):
                call()
        else:
            assert call() == replace(first, replayed=True)  # type: ignore[type-var]
        return True

    @staticmethod
    def remember(m: Account, key: str | None, call_id: tuple[object, ...], result: Any) -> None:
        if key is not None:
            m.keys[key] = (call_id, result)

    # -- the comparison after each step ---------------------------------------------------------

    def compare(self, account: str) -> None:
        m = self.model(account)
        call = self.begin(m, refills=True)
        SEEN.update(self.ledger.happened)
        self.ledger.happened.clear()
        balance = self.client.balance(account)
        self.learn(Instant(self.now, call), balance.server_time_ms)
        assert self.server_ms() - self.origin + 1 < STEP_MS // 4, "too slow for the steps"
        listed = {b.id: b for b in balance.buckets}
        assert set(listed) == {b.id for b in m.buckets}
        for b in m.buckets:
            self.check_bucket(b, listed[b.id])
        self.ledger.sort(m)
        assert [b.id for b in balance.buckets] == [b.id for b in m.buckets], "burn order"
        assert (balance.credits, balance.held, balance.plan, balance.overdraft) == (
            m.credits,
            m.held,
            m.plan,
            PLANS[m.plan].overdraft,
        )
        # Invariants on the server's own numbers.
        assert balance.credits == sum(b.remaining for b in balance.buckets if b.live)
        assert balance.held == sum(b.held for b in balance.buckets)
        # Only the base bucket goes below zero or holds more than it has (an overdraft); a
        # pending bucket backs nothing.
        for b in balance.buckets:
            assert b.id == BASE or (0 <= b.held <= b.remaining and (b.live or not b.held)), b
        floor = max((PLANS[p].overdraft for p in m.overdrawn_plans | {m.plan}), default=0)
        assert balance.available >= -floor
        self.check_holds(m, listed)
        self.check_journal(m, balance.sequence, balance.credits)

    def check_bucket(self, b: Bucket, got: Any) -> None:
        assert (got.remaining, got.held, got.live, got.category, got.priority, got.granted) == (
            b.remaining,
            b.held,
            b.live,
            b.category,
            b.priority,
            b.granted,
        ), b.id
        self.learn(b.effective, got.effective_at_ms)
        self.learn(b.created, got.created_ms)
        assert (got.expires_at_ms is None) == (b.expires is None), b.id
        if b.expires is not None:
            self.learn(b.expires, got.expires_at_ms)

    def check_holds(self, m: Account, listed: dict[str, Any]) -> None:
        """Every live hold is backed: its parts, in the account hash, sit on buckets that last."""
        keys = self.client.engine.keys.for_account(m.name)
        fields = {
            k.decode(): v.decode()
            for k, v in self.raw.hgetall(keys.hash).items()
            if k[:2] in (b"r.", b"q.")  # field B is msgpack
        }
        holds = {
            rid.decode(): int(float(d))
            for rid, d in self.raw.zrange(keys.holds, 0, -1, withscores=True)
        }
        assert set(holds) == set(m.holds)
        on_buckets: dict[str, int] = {}
        for rid, hold in m.holds.items():
            assert holds[rid] == self.origin + self.clock.offset(hold.deadline)  # type: ignore[operator]
            assert int(fields[f"r.{rid}"]) == hold.amount
            text = fields.get(f"q.{rid}", f"{BASE}:{hold.amount}")
            parts = [(p.rsplit(":", 1)[0], int(p.rsplit(":", 1)[1])) for p in text.split(",")]
            assert parts == hold.parts, rid
            assert sum(n for _, n in parts) == hold.amount
            for bucket_id, n in parts:
                b = listed[bucket_id]
                assert b.live and (b.expires_at_ms is None or b.expires_at_ms >= holds[rid])
                on_buckets[bucket_id] = on_buckets.get(bucket_id, 0) + n
        assert {i: b.held for i, b in listed.items() if b.held} == {
            i: n for i, n in on_buckets.items() if n
        }

    def check_journal(self, m: Account, sequence: int, credits: int) -> None:
        """Conservation, entry by entry: the credits after each entry are the sum of the
        changes so far, and so is each bucket's remaining (``bk``: id, change, remaining
        after); an entry without bucket changes is the base bucket's (the plain path)."""
        journal = self.client.engine.keys.for_account(m.name).journal
        entries = [
            {k.decode(): v.decode() for k, v in entry.items()}
            for _, entry in self.raw.xrange(journal)
            if entry[b"a"] == m.name.encode()
        ]
        assert [int(e["s"]) for e in entries] == list(range(1, sequence + 1))
        # Each keyed call applied once: one entry of its own per key (what time did before
        # it, journaled by the same call, carries the key too).
        own = [e["k"] for e in entries if "k" in e and e["op"] not in TIME_OPS]
        assert len(own) == len(set(own)), own
        total, sums = 0, {BASE: 0}
        for e in entries:
            total += int(e["dc"])
            assert int(e["c"]) == total, e
            if "bk" not in e:
                sums[BASE] += int(e["dc"])
                continue
            for change in e["bk"].split(","):
                bucket_id, delta, left = change.rsplit(":", 2)
                sums[bucket_id] = sums.get(bucket_id, 0) + int(delta)
                assert sums[bucket_id] == int(left), (bucket_id, e)
        assert total == credits
        remaining = {b.id: b.remaining for b in m.buckets}
        assert {i: n for i, n in sums.items() if n or i == BASE} == {
            i: n for i, n in remaining.items() if n or i == BASE
        }

    # -- rules ---------------------------------------------------------------------------------

    @rule(
        account=ACCOUNTS,
        credits=st.integers(1, 60),
        plain=st.booleans(),
        grant_id=GRANT_IDS,
        category=CATEGORIES,
        priority=PRIORITIES,
        start=STARTS,
        expiry=EXPIRIES,
        key=KEYS,
    )
    @keyed
    def grant(
        self,
        account: str,
        credits: int,
        plain: bool,
        grant_id: str | None,
        category: str | None,
        priority: int | None,
        start: int | None,
        expiry: tuple[str, int] | None,
        key: str | None,
    ) -> None:
        """A plain grant (to the base bucket) or one with a bucket of its own."""
        m = self.model(account)
        if plain:
            grant_id = category = priority = start = expiry = None
        effective_at = None if start is None else self.at(start)
        expires_at = self.at(expiry[1]) if expiry and expiry[0] == "at" else None
        expires_in = _steps(expiry[1]) if expiry and expiry[0] == "in" else None
        call = partial(
            self.client.grant,
            account,
            credits,
            category=category,
            priority=priority,
            effective_at=effective_at,
            expires_at=expires_at,
            expires_in=expires_in,
            grant_id=grant_id,
            idempotency_key=key,
        )
        # Every bucket argument left out is a plain grant too.
        plain = all(a is None for a in (grant_id, category, priority, start, expiry))
        if not plain and (
            (expiry == ("in", 0)) or (start is not None and expires_at and expiry[1] <= start)  # type: ignore[index]
        ):
            with pytest.raises(InvalidInput) as raised:
                call()
            assert type(raised.value) is InvalidInput
            return self.compare(account)
        if plain:
            call_id: tuple[object, ...] = ("grant", credits)
        else:
            call_id = (
                "bucket",
                credits,
                grant_id or "",
                category or "paid",
                GRANTS.default_priority if priority is None else priority,
                0 if start is None else self.now + start * STEP_MS,
                expiry and expiry[0] == "at" and self.now + expiry[1] * STEP_MS,
                expiry and expiry[0] == "in" and expiry[1],
            )
        if self.replayed_or_conflicting(m, key, call_id, call):
            return self.compare(account)
        c = self.begin(m, refills=False)
        now = Instant(self.now, c)
        if plain:
            done = self.attempt(m, "plain grant", lambda a: self.ledger.correct(a, credits), call)
        else:
            effective = now if start is None else Instant(self.now + start * STEP_MS)
            expires = None
            if expiry is not None:
                at = self.now + expiry[1] * STEP_MS
                expires = Instant(at) if expiry[0] == "at" else Instant(at, c)
            change = partial(
                self.ledger.grant_bucket,
                bucket_id=grant_id or "unnamed",
                credits=credits,
                category=category or "paid",
                priority=GRANTS.default_priority if priority is None else priority,
                effective=effective,
                expires=expires,
                now=now,
            )
            done = self.attempt(m, "grant", change, call)
        if done is not None:
            self.next_ms()
            result, trial = done
            assert not result.replayed
            if not plain:
                made = trial.bucket(grant_id or "unnamed")
                made.id = result.grant_id
                assert grant_id is None or result.grant_id == grant_id
                self.learn(made.effective, result.effective_at_ms)
                if made.expires is not None:
                    self.learn(made.expires, result.expires_at_ms)
                else:
                    assert result.expires_at_ms is None
            assert result.credits == trial.credits
            self.commit(trial)
            self.remember(trial, key, call_id, result)
        self.compare(account)

    @rule(account=ACCOUNTS, cost=st.integers(0, 45), key=KEYS)
    @keyed
    def spend(self, account: str, cost: int, key: str | None) -> None:
        m = self.model(account)
        call = partial(self.client.spend, account, cost=cost, idempotency_key=key)
        if not self.replayed_or_conflicting(m, key, ("spend", cost), call):
            self.begin(m, refills=True)
            done = self.attempt(m, "spend", lambda a: self.ledger.spend(a, cost), call)
            if done is not None:
                result, trial = done
                assert (result.credits_remaining, result.replayed) == (trial.credits, False)
                self.commit(trial)
                self.remember(trial, key, ("spend", cost), result)
        self.compare(account)

    @rule(account=ACCOUNTS, credits=st.integers(-30, -1), key=KEYS)
    @keyed
    def correct(self, account: str, credits: int, key: str | None) -> None:
        """A negative correction: burns in order, never what live holds need."""
        m = self.model(account)
        call = partial(self.client.correct, account, credits, idempotency_key=key)
        if not self.replayed_or_conflicting(m, key, ("correct", credits), call):
            self.begin(m, refills=False)
            done = self.attempt(m, "correct", lambda a: self.ledger.correct(a, credits), call)
            if done is not None:
                result, trial = done
                assert (result.credits, result.replayed) == (trial.credits, False)
                self.commit(trial)
                self.remember(trial, key, ("correct", credits), result)
        self.compare(account)

    @rule(account=ACCOUNTS, plan=st.sampled_from(sorted(PLANS)), key=KEYS)
    @keyed
    def set_plan(self, account: str, plan: str, key: str | None) -> None:
        m = self.model(account)
        call = partial(self.client.set_plan, account, plan, idempotency_key=key)
        if not self.replayed_or_conflicting(m, key, ("plan", plan), call):
            self.begin(m, refills=False)
            result = call()
            assert (result.plan, result.previous_plan, result.replayed) == (plan, m.plan, False)
            m.plan = plan
            if PLANS[plan].overdraft:
                m.overdrawn_plans.add(plan)
            self.remember(m, key, ("plan", plan), result)
        self.compare(account)

    def lease(self, m: Account, steps: int, call: int) -> int:
        """``steps``, or longer where the deadline would meet an expiry another call computed."""
        lagged = {
            b.expires.model for b in m.buckets if b.expires and b.expires.call not in (0, call)
        }
        while self.now + steps * STEP_MS in lagged:
            steps += 1
        return steps

    @rule(target=reservations, account=ACCOUNTS, amount=st.integers(1, 40), lease=LEASES, key=KEYS)
    @keyed
    def reserve(self, account: str, amount: int, lease: int, key: str | None) -> Any:
        m = self.model(account)
        ttl = _steps(lease)
        call = partial(self.client.reserve, account, amount, ttl=ttl, idempotency_key=key)
        call_id = ("reserve", amount, lease)
        if self.replayed_or_conflicting(m, key, call_id, call):
            self.compare(account)
            return multiple()
        c = self.begin(m, refills=True)
        steps = self.lease(m, lease, c)
        if steps != lease:
            # The key's call is the one with the lease actually sent.
            ttl, call_id = _steps(steps), ("reserve", amount, steps)
            call = partial(self.client.reserve, account, amount, ttl=ttl, idempotency_key=key)
        deadline = Instant(self.now + steps * STEP_MS, c)
        done = self.attempt(
            m, "reserve", lambda a: self.ledger.reserve(a, "new", amount, deadline), call
        )
        if done is None:
            self.compare(account)
            return multiple()
        self.next_ms()
        result, trial = done
        trial.holds[result.id] = trial.holds.pop("new")
        trial.holds[result.id].rid = result.id
        self.learn(deadline, result.deadline_ms)
        assert (result.amount, result.replayed) == (amount, False)
        self.commit(trial)
        self.remember(trial, key, call_id, result)
        self.compare(account)
        made = ModelReservation(account, result.id, amount, deadline)
        self.made[made.id] = made
        return made

    @rule(
        reservation=reservations,
        how=st.sampled_from(["release", "settle", "settle_late"]),
        offset=st.one_of(st.just(0), st.integers(-60, 40)),
        key=KEYS,
    )
    @keyed
    def close(self, reservation: ModelReservation, how: str, offset: int, key: str | None) -> None:
        """Settles for less, as much as or more than held (or late), or releases."""
        r = reservation
        m = self.model(r.account)
        ref = ReservationRef(r.account, r.id)
        actual = max(r.amount + offset, 0)
        release, late = how == "release", how == "settle_late"
        call: Callable[[], Any]
        if release:
            call_id: tuple[object, ...] = ("release", r.id)
            call = partial(self.client.release, ref, idempotency_key=key)
        else:
            call_id = ("settle", r.id, actual, late)
            call = partial(self.client.settle, ref, actual, allow_late=late, idempotency_key=key)
        if self.replayed_or_conflicting(m, key, call_id, call):
            return self.compare(r.account)
        if r.closed is not None:
            assert call() == replace(r.closed, replayed=True)
            self.remember(m, key, call_id, replace(r.closed, replayed=True))
            return self.compare(r.account)
        lapsed = self.now >= r.deadline.model
        self.begin(m, refills=False)
        if lapsed and not release and not late:
            with pytest.raises(ReservationLapsed):
                call()
            return self.compare(r.account)
        trial, charged = self.ledger.settle(Ledger.trial(m), r.id, None if release else actual)
        result = call()
        outcome: SettlementOutcome = (
            "released" if release else "settled_late" if lapsed else "settled"
        )
        assert result == Settlement(
            account=r.account,
            reservation_id=r.id,
            outcome=outcome,
            charged=charged,
            uncharged=(0 if release else actual) - charged,
            credits_remaining=trial.credits,
            sequence=result.sequence,
        )
        r.closed = result
        self.commit(trial)
        self.remember(trial, key, call_id, result)
        self.compare(r.account)

    @rule(reservation=reservations, lease=LEASES)
    def extend(self, reservation: ModelReservation, lease: int) -> None:
        self.renew(reservation, lease)

    def expiring_holds(self) -> list[tuple[ModelReservation, int]]:
        """Live holds with credits on a bucket that expires, and that bucket's expiry."""
        found = []
        for r in self.made.values():  # in the order they were made
            hold = self.accounts[r.account].holds.get(r.id)
            for bucket_id, _ in hold.parts if hold else ():
                b = self.accounts[r.account].bucket(bucket_id)
                if b is not None and b.expires is not None:
                    found.append((r, b.expires.model))
        return found

    @rule(pick=st.integers(0, 3), beyond=st.integers(0, 1))
    def extend_past_expiry(self, pick: int, beyond: int) -> None:
        """Renews a hold to the expiry of credits backing it, or a step past."""
        holds = self.expiring_holds()
        if holds:
            r, expires = holds[pick % len(holds)]
            self.renew(r, max((expires - self.now) // STEP_MS + beyond, 1))

    def renew(self, r: ModelReservation, lease: int) -> None:
        """Renews a live lease; past a bucket's expiry the hold moves to credits that last."""
        m = self.model(r.account)
        ref = ReservationRef(r.account, r.id)
        if r.closed is not None:
            with pytest.raises(ReservationClosed):
                self.client.extend(ref, ttl=_steps(lease))
            return self.compare(r.account)
        c = self.begin(m, refills=False)
        if self.now >= r.deadline.model:
            with pytest.raises(ReservationLapsed):
                self.client.extend(ref, ttl=_steps(lease))
            return self.compare(r.account)
        steps = self.lease(m, lease, c)
        deadline = Instant(self.now + steps * STEP_MS, c)
        call = partial(self.client.extend, ref, ttl=_steps(steps))
        done = self.attempt(m, "extend", lambda a: self.ledger.extend(a, r.id, deadline), call)
        if done is not None:
            self.next_ms()
            result, trial = done
            assert (result.id, result.amount) == (r.id, r.amount)
            self.learn(deadline, result.deadline_ms)
            r.deadline = deadline
            self.commit(trial)
        self.compare(r.account)

    @rule(account=ACCOUNTS, pick=st.sampled_from([0, 0, 1, 2, 5]), key=KEYS)
    @keyed
    def void(self, account: str, pick: int, key: str | None) -> None:
        """Voids one of the account's grants (by its place among them), or one it lacks."""
        m = self.model(account)
        ids = self.grant_ids(m)
        grant_id = ids[pick] if pick < len(ids) else f"g{pick}"
        call = partial(self.client.void, account, grant_id, idempotency_key=key)
        if not self.replayed_or_conflicting(m, key, ("void", grant_id), call):
            self.begin(m, refills=False)
            done = self.attempt(m, "void", lambda a: self.ledger.void(a, grant_id), call)
            if done is not None:
                result, (trial, taken, moved) = done
                assert (result.voided, result.credits, result.moved, result.replayed) == (
                    taken,
                    trial.credits,
                    moved,
                    False,
                )
                self.commit(trial)
                self.remember(trial, key, ("void", grant_id), result)
        self.compare(account)

    @staticmethod
    def grant_ids(m: Account) -> list[str]:
        """The account's grants in the order they were made: a pick never depends on an id
        the client drew at random (hypothesis replays a run and must see the same choices)."""
        grants = [b for b in m.buckets if b.id not in (BASE, "refill")]
        return [b.id for b in sorted(grants, key=lambda b: b.made)]

    @rule(pick=st.integers(0, 3), key=KEYS)
    def void_held_grant(self, pick: int, key: str | None) -> None:
        """Voids a grant that backs live holds: they move, or the void is refused."""
        held = [
            (name, i)
            for name, m in sorted(self.accounts.items())
            for i, bucket_id in enumerate(self.grant_ids(m))
            if m.bucket(bucket_id).held  # type: ignore[union-attr]
        ]
        if held:
            account, index = held[pick % len(held)]
            self.void(account=account, pick=index, key=key)

    @precondition(lambda self: self.last_keyed is not None)
    @rule()
    def repeat_keyed_call(self) -> None:
        """Retries the last call made with an idempotency key, as a client would after a timeout."""
        assert self.last_keyed is not None
        method, arguments = self.last_keyed
        method(self, **arguments)

    @rule(steps=st.integers(1, 3))
    def advance_time(self, steps: int) -> None:
        """No read follows: the next call, whatever it is, applies what time did."""
        self.now += steps * STEP_MS
        self.set_clock()

    @rule()
    def advance_to_next_instant(self) -> None:
        """To the next start, expiry, deadline or refill period of any account, exactly."""
        due = []
        for m in self.accounts.values():
            for b in m.buckets:
                due += [b.effective.model] if not b.live else []
                due += [b.expires.model] if b.expires else []
            due += [h.deadline.model for h in m.holds.values()]
            refill = PLANS[m.plan].refill
            if refill is not None and m.mark is not None:
                due.append(m.mark + refill.every // timedelta(milliseconds=1))  # type: ignore[operator]
        later = [t for t in due if t > self.now]
        self.now = min(later) if later else self.now + STEP_MS
        self.set_clock()


WHERE = ["redis_url", "three_primary_cluster_url"]


@pytest.fixture(params=WHERE, ids=["one-node", "cluster"])
def topology_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(request.param))


@pytest.fixture
def reader(topology_url: str) -> Iterator[Any]:
    """A client of the same servers for reading keys directly (hashes, streams, TIME)."""
    with RedCredit(settings=Settings(redis_url=topology_url, key_prefix="reader")) as client:
        yield client.redis


@pytest.mark.timeout(max(300, 4 * EXAMPLES))
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_buckets_agree_with_model(kind: str, topology_url: str, reader: Any) -> None:
    def machine() -> BucketMachine:
        settings = Settings(
            redis_url=topology_url,
            # Each run of the machine gets fresh accounts under a new prefix.
            key_prefix="mb" + uuid.uuid4().hex[:12],
            free_credits=FREE_CREDITS,
            free_chat_messages=0,
            plans=PLANS,
            grants=GRANTS,
        )
        client = RedCredit(settings=settings) if kind == "sync" else Blocking(settings)
        return BucketMachine(client, reader)

    run_state_machine_as_test(
        machine,  # type: ignore[arg-type]
        settings=hypothesis_settings(
            max_examples=EXAMPLES,
            stateful_step_count=50,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    print(f"\n{kind}:", ", ".join(f"{what} {n}" for what, n in sorted(SEEN.items())))
    SEEN.clear()
