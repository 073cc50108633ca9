"""Random sequences of grant, spend, hold and void calls against the bucket model, on one
server and on a three-primary cluster, with the sync and the async client.

The model (``bucket_model.py``) restates docs/grants.md: buckets with a
category, priority, start and expiry burning in order, holds backed only by
credits that outlive them, voids that move those holds or are refused,
overdrafts, and refills with a mode, a rollover and an expiry; how time moves
and what is compared after each step is in ``bucket_machine.py``. A lease
that would end at the model time a bucket computed by another call expires
is lengthened by a step: whether the two differ by a millisecond is not the
model's to know.

``REDCREDIT_MODEL_EXAMPLES`` sets the examples per topology and client (the
long mode: e.g. 2000).
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from functools import partial
from typing import Any

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from redcredit import (
    InvalidInput,
    RedCredit,
    ReservationClosed,
    ReservationLapsed,
    ReservationRef,
    Settings,
    Settlement,
    SettlementOutcome,
)

from .bucket_machine import (
    FREE_CREDITS,
    GRANTS,
    PLANS,
    SEEN,
    STEP_MS,
    Blocking,
    BucketChecks,
    ModelReservation,
    duration,
)
from .bucket_model import BASE, Account, Instant, Ledger

EXAMPLES = int(os.environ.get("REDCREDIT_MODEL_EXAMPLES", "40"))

ACCOUNTS = st.sampled_from(["b1", "b2"])
# "new" is a key never used before; "k1" is soon taken, and reusing it for another call is refused.
KEYS = st.sampled_from([None, None, "new", "k1"])
GRANT_IDS = st.sampled_from([None, None, "g1", "g2", "g3"])
CATEGORIES = st.sampled_from([None, "promotional", "paid", "free"])
PRIORITIES = st.sampled_from([None, 0, 50, 200])
STARTS = st.sampled_from([None, None, 0, 1, 2])  # steps from now
EXPIRIES = st.one_of(st.none(), st.tuples(st.sampled_from(["at", "in"]), st.integers(0, 5)))
LEASES = st.integers(1, 4)


def keyed(method: Callable[..., Any]) -> Callable[..., Any]:
    """Gives key "new" a name never used before, and remembers a keyed call for a retry."""

    @functools.wraps(method)
    def wrapper(self: BucketChecks, **arguments: Any) -> Any:
        if arguments["key"] == "new":
            self.keys_made += 1
            arguments = {**arguments, "key": f"new{self.keys_made}"}
        if arguments["key"] is not None:
            self.last_keyed = (method, arguments)
        return method(self, **arguments)

    return wrapper


class BucketMachine(BucketChecks):
    reservations = Bundle("reservations")

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
        expires_in = duration(expiry[1]) if expiry and expiry[0] == "in" else None
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
        ttl = duration(lease)
        call = partial(self.client.reserve, account, amount, ttl=ttl, idempotency_key=key)
        call_id = ("reserve", amount, lease)
        if self.replayed_or_conflicting(m, key, call_id, call):
            self.compare(account)
            return multiple()
        c = self.begin(m, refills=True)
        steps = self.lease(m, lease, c)
        if steps != lease:
            # The key's call is the one with the lease actually sent.
            ttl, call_id = duration(steps), ("reserve", amount, steps)
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
                self.client.extend(ref, ttl=duration(lease))
            return self.compare(r.account)
        c = self.begin(m, refills=False)
        if self.now >= r.deadline.model:
            with pytest.raises(ReservationLapsed):
                self.client.extend(ref, ttl=duration(lease))
            return self.compare(r.account)
        steps = self.lease(m, lease, c)
        deadline = Instant(self.now + steps * STEP_MS, c)
        call = partial(self.client.extend, ref, ttl=duration(steps))
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
