"""The bucket model test's servers, clients and checks (its rules are in test_model_buckets.py).

Time moves as in ``test_model.py``: the test-only ``engine.clock_offset_ms``
in whole steps of 2**18 ms, so the server runs a small, growing lag ahead of
the model, and every instant the model hits (an expiry, a start, a deadline,
a refill period) is hit exactly. The clock is set a millisecond ahead, so an
instant the server computed (a deadline, ``expires_in``) lies after one the
client sent (``expires_at``) at the same model time; the model learns each
call's lag from what it reports (see ``bucket_model.Clock``).

After every step the account is read back and compared bucket by bucket
(in burn order), each live hold's backing is read from the account hash,
and the journal is summed entry by entry.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis.stateful import RuleBasedStateMachine

from redcredit import (
    AsyncRedCredit,
    IdempotencyConflict,
    PlanSettings,
    RefillSettings,
    Settings,
    Settlement,
)
from redcredit.config import GrantSettings

from .bucket_model import BASE, Account, Bucket, Clock, Instant, Ledger, Refused

STEP_MS = 2**18
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FREE_CREDITS = 50
# Entries a call journals for what time did before it: they carry the call's key.
TIME_OPS = {"open", "lapse", "expire", "effective", "refill"}
# What the runs did (refusals, expiries, moved holds...), printed under ``pytest -s``.
SEEN: collections.Counter[str] = collections.Counter()


def duration(n: int) -> timedelta:
    """``n`` steps."""
    return timedelta(milliseconds=n * STEP_MS)


# Refill priorities differ from every grant's (test_model_buckets.PRIORITIES, and the base
# bucket's 50), so a refill made by a call burns in an order that call's own clock cannot
# change.
PLANS = {
    "free": PlanSettings(),
    "postpaid": PlanSettings(overdraft=150),
    "topup": PlanSettings(refill=RefillSettings(credits=80, every=duration(3), priority=40)),
    "addcap": PlanSettings(
        refill=RefillSettings(
            credits=50,
            every=duration(2),
            mode="add",
            rollover=20,
            expires_in=duration(3),
            priority=60,
        )
    ),
    "addnone": PlanSettings(
        refill=RefillSettings(
            credits=40,
            every=duration(2),
            mode="add",
            rollover="none",
            expires_in=duration(2),
            category="paid",
            priority=45,
        )
    ),
    # Refills that outlive their period: each refill moves the kept credits' expiry on.
    "addall": PlanSettings(
        refill=RefillSettings(
            credits=30, every=duration(3), mode="add", expires_in=duration(4), priority=55
        )
    ),
    "postrefill": PlanSettings(
        overdraft=100,
        refill=RefillSettings(
            credits=60, every=duration(4), rollover=30, expires_in=duration(3), priority=10
        ),
    ),
}
GRANTS = GrantSettings(categories=("free", "promotional", "paid"), max_grants=4)


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


class BucketChecks(RuleBasedStateMachine):
    """The bucket machine without its rules: the model beside the server, and the
    comparison after each step."""

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
