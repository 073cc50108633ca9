"""The credit buckets of docs/grants.md, restated in plain Python for the bucket model test.

No I/O: ``test_model_buckets.py`` drives the real server and this model side
by side. An account's credits are buckets in burn order (lower priority,
soonest expiry, category, earliest start, earliest made, then id); holds are
backed only by buckets that live until their deadlines; time's effects (a
lapsed hold dropped, a bucket starting or expiring, a refill period begun)
are applied by the next call that touches the account, in that order.

Times are :class:`Instant`: a model time in whole steps plus where it came
from. An instant the client computed (``expires_at``, ``effective_at``) is
exact; one the server computed from its clock (a deadline, ``expires_in``, a
creation time) carries the lag of the call that made it, learnt from what
the server reports. Two instants at different model times compare by them;
at the same model time, by the server's values, which is what makes the
burn order and "a bucket backs a hold until its deadline" exact ties decidable.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from redcredit.config import GrantSettings, PlanSettings

BASE, REFILL = "base", "refill"
_CRITERIA = {"priority": "p", "expiry": "x", "category": "c", "effective": "e", "created": "d"}


class Ambiguous(Exception):
    """Two instants the model cannot order: the machine avoids making them."""


@dataclass(frozen=True)
class Instant:
    """A model time (ms from the run's origin); ``call`` 0 when exact, else the call it came from."""

    model: int
    call: int = 0


class Clock:
    """The lag of each call, as learnt from what the server reported.

    A call's lag is the same for every instant it made (a script reads TIME
    once), and never below 1 ms: the machine sets the clock a millisecond
    ahead, so a lagged instant always lies after an exact one at the same
    model time.
    """

    def __init__(self) -> None:
        self.lags: dict[int, int] = {}
        self.calls = 0

    def begin(self) -> int:
        self.calls += 1
        return self.calls

    def learn(self, instant: Instant, server_offset: int) -> int | None:
        """``server_offset``: the server's value minus the run's origin.

        Returns the call's lag when it was not known yet, for the caller to
        bound by the lag so far.
        """
        lag = server_offset - instant.model
        if instant.call == 0:
            assert lag == 0, (instant, server_offset)
            return None
        assert lag >= 1, (instant, server_offset)
        known = self.lags.setdefault(instant.call, lag)
        assert known == lag, ("one call, two clocks", instant, known, lag)
        return lag if known is lag else None

    def offset(self, instant: Instant) -> int | None:
        """The server's value minus the origin, when known."""
        if instant.call == 0:
            return instant.model
        lag = self.lags.get(instant.call)
        return None if lag is None else instant.model + lag

    def compare(self, a: Instant, b: Instant) -> int:
        if a.model != b.model:
            return -1 if a.model < b.model else 1
        x, y = self.offset(a), self.offset(b)
        if x is not None and y is not None:
            return (x > y) - (x < y)
        if a.call == b.call:
            return 0
        if a.call == 0 or b.call == 0:
            # Lag is at least 1: the exact one is earlier.
            return -1 if a.call == 0 else 1
        raise Ambiguous(a, b)


@dataclass
class Bucket:
    id: str
    remaining: int
    held: int
    priority: int
    category: str
    effective: Instant
    expires: Instant | None  # None: never
    created: Instant
    granted: int
    live: bool
    # The model's own: the order grants were made in, for picking one whatever its id.
    made: int = 0


@dataclass
class Hold:
    rid: str
    amount: int
    deadline: Instant
    # (bucket id, credits), in the order the server keeps them.
    parts: list[tuple[str, int]]


@dataclass
class Account:
    name: str
    plan: str
    buckets: list[Bucket]
    holds: dict[str, Hold] = field(default_factory=dict)
    # Model time of the refill period's start; None before the first touch.
    mark: int | None = None
    # Idempotency key -> (what the call was, its first result).
    keys: dict[str, tuple[tuple[object, ...], object]] = field(default_factory=dict)
    # Ever on a plan with an overdraft: its credits may stay below zero after.
    overdrawn_plans: set[str] = field(default_factory=set)

    @property
    def credits(self) -> int:
        return sum(b.remaining for b in self.buckets if b.live)

    @property
    def held(self) -> int:
        return sum(b.held for b in self.buckets)

    @property
    def available(self) -> int:
        return self.credits - self.held

    def bucket(self, bucket_id: str) -> Bucket | None:
        return next((b for b in self.buckets if b.id == bucket_id), None)

    def base(self) -> Bucket:
        found = self.bucket(BASE)
        assert found is not None
        return found


class Refused(Exception):
    """What the server must refuse with: the error's name and its (required, available)."""

    def __init__(self, error: str, *details: int) -> None:
        super().__init__(error, *details)
        self.error = error
        self.details = details


class Ledger:
    """The rules of docs/grants.md over model accounts; each method is one script's effect."""

    def __init__(
        self, grants: GrantSettings, plans: dict[str, PlanSettings], clock: Clock, origin: int
    ) -> None:
        self.grants = grants
        self.plans = plans
        self.clock = clock
        self.origin = origin
        self.order = "".join(_CRITERIA[c] for c in grants.burn_order)
        self.ranks = {name: i for i, name in enumerate(grants.categories, start=1)}
        # What happened, for the test's statistics.
        self.happened: list[str] = []
        self.grants_made = 0

    # -- accounts and order --------------------------------------------------------------------

    def open(self, name: str, credits: int, plan: str) -> Account:
        never = Instant(-self.origin)  # ms 0 on the server's clock
        base = Bucket(
            BASE, credits, 0, self.grants.default_priority, "paid", never, None, never, 0, True
        )
        return Account(name, plan, [base])

    def burns_before(self, a: Bucket, b: Bucket) -> int:
        for letter in self.order:
            if letter == "p":
                c = (a.priority > b.priority) - (a.priority < b.priority)
            elif letter == "x":
                c = self._expiry(a.expires, b.expires)
            elif letter == "c":
                x, y = self.ranks.get(a.category, 1000), self.ranks.get(b.category, 1000)
                c = (x > y) - (x < y)
            elif letter == "e":
                c = self.clock.compare(a.effective, b.effective)
            else:
                c = self.clock.compare(a.created, b.created)
            if c:
                return c
        return (a.id > b.id) - (a.id < b.id)

    def _expiry(self, a: Instant | None, b: Instant | None) -> int:
        if a is None or b is None:
            return (a is None) - (b is None)
        return self.clock.compare(a, b)

    def sort(self, acct: Account) -> None:
        # Sorted where the order is used, once every instant it compares is known: a
        # bucket's creation time is learnt from the read after the call that made it.
        acct.buckets.sort(key=functools.cmp_to_key(self.burns_before))

    def lasts(self, b: Bucket, deadline: Instant) -> bool:
        return b.expires is None or self.clock.compare(b.expires, deadline) >= 0

    @staticmethod
    def tidy(acct: Account) -> None:
        """A spent bucket is done with; the base bucket stays."""
        acct.buckets = [b for b in acct.buckets if b.id == BASE or b.remaining or b.held]

    def overdraft(self, acct: Account) -> int:
        return self.plans[acct.plan].overdraft

    # -- time's effects ------------------------------------------------------------------------

    def catch_up(self, acct: Account, now: int, call: int, *, refills: bool) -> None:
        """Lapsed holds, then due buckets, then (for spends, holds and reads) a due refill."""
        for rid, hold in list(acct.holds.items()):
            if hold.deadline.model <= now:
                self.happened.append("hold lapsed")
                self.unhold(acct, hold.parts)
                del acct.holds[rid]
        for b in acct.buckets:
            if not b.live and b.effective.model <= now:
                self.happened.append("bucket started")
                b.live = True
            if b.live and b.expires is not None and b.expires.model <= now:
                self.happened.append(f"{'refill' if b.id == REFILL else 'grant'} expired")
                b.remaining, b.expires = 0, None
        self.tidy(acct)
        if refills:
            self.refill(acct, now, call)

    def refill(self, acct: Account, now: int, call: int) -> None:
        """The refill bucket: kept as the rollover allows (never below its holds), then refilled."""
        settings = self.plans[acct.plan].refill
        if settings is None or not settings.credits:
            return
        assert isinstance(settings.every, timedelta), "the model knows rolling periods only"
        period = settings.every // timedelta(milliseconds=1)
        if acct.mark is not None and now < acct.mark + period:
            return
        first, acct.mark = acct.mark is None, now
        if first:
            return
        b = acct.bucket(REFILL)
        if b is not None and settings.rollover != "all":
            cap = 0 if settings.rollover == "none" else settings.rollover
            kept = max(min(b.remaining, cap), b.held)
            if kept < b.remaining:
                self.happened.append(f"rollover {settings.rollover} dropped credits")
            b.remaining = kept
        expires = None
        if settings.expires_in is not None:
            expires = Instant(now + settings.expires_in // timedelta(milliseconds=1), call)
        add = settings.credits
        if settings.mode == "top_up_to":
            add = max(settings.credits - acct.credits, 0)
        made = Instant(now, call)
        self.happened.append(f"refill {settings.mode} of {'some' if add else 'none'}")
        if b is None:
            if add == 0:
                self.tidy(acct)
                return
            b = Bucket(REFILL, 0, 0, 0, "", made, None, made, 0, True)
            acct.buckets.append(b)
        if b.held and expires is not None and acct.holds:
            # Credits a live hold has on the bucket last until the latest deadline.
            latest = max((h.deadline for h in acct.holds.values()), key=lambda d: d.model)
            if latest.model > expires.model:
                expires = latest
        b.priority, b.category, b.expires = settings.priority, settings.category, expires
        b.created, b.granted = made, add
        b.remaining += add
        self.tidy(acct)

    # -- credits and holds ---------------------------------------------------------------------

    def burn(self, acct: Account, amount: int) -> None:
        """Free credits in burn order; what they lack, from the base bucket (below zero)."""
        self.sort(acct)
        need = amount
        for b in acct.buckets:
            free = b.remaining - b.held
            if need and b.live and free > 0:
                n = min(free, need)
                b.remaining -= n
                need -= n
        acct.base().remaining -= need
        if acct.base().remaining < 0:
            self.happened.append("base below zero")
        self.tidy(acct)

    def backing(self, acct: Account, deadline: Instant, except_id: str | None = None) -> int:
        """Credits that can back a hold until ``deadline``, the overdraft included."""
        return self.overdraft(acct) + sum(
            b.remaining - b.held
            for b in acct.buckets
            if b.live and b.id != except_id and self.lasts(b, deadline)
        )

    def allocate(
        self, acct: Account, amount: int, deadline: Instant, except_id: str | None = None
    ) -> list[tuple[str, int]] | None:
        if self.backing(acct, deadline, except_id) < amount:
            return None
        self.sort(acct)
        need, parts = amount, []
        for b in acct.buckets:
            free = b.remaining - b.held
            if (
                need
                and b.live
                and b.id not in (BASE, except_id)
                and free > 0
                and self.lasts(b, deadline)
            ):
                n = min(free, need)
                b.held += n
                parts.append((b.id, n))
                need -= n
        if need:
            acct.base().held += need
            parts.append((BASE, need))
        return parts

    @staticmethod
    def unhold(acct: Account, parts: list[tuple[str, int]]) -> None:
        for bucket_id, n in parts:
            b = acct.bucket(bucket_id) or acct.base()
            b.held -= n

    def rehome(
        self,
        acct: Account,
        hold: Hold,
        deadline: Instant,
        leaving: Callable[[Bucket], bool],
        except_id: str | None = None,
    ) -> tuple[list[tuple[str, int]] | None, int]:
        """A hold's parts on the buckets ``leaving`` picks, moved to buckets that last."""
        kept: list[tuple[str, int]] = []
        short: list[tuple[str, int]] = []
        for bucket_id, n in hold.parts:
            b = acct.bucket(bucket_id)
            (short if b is not None and leaving(b) else kept).append((bucket_id, n))
        moving = sum(n for _, n in short)
        if not moving:
            return hold.parts, 0
        self.unhold(acct, short)
        moved = self.allocate(acct, moving, deadline, except_id)
        if moved is None:
            return None, moving
        self.happened.append("hold moved")
        return kept + moved, moving

    # -- one method per script: each changes a copy, returned on success --------------------------

    def spend(self, acct: Account, cost: int) -> Account:
        spendable = acct.available + self.overdraft(acct)
        if cost > spendable:
            raise Refused("InsufficientCredits", cost, spendable)
        self.burn(acct, cost)
        return acct

    def correct(self, acct: Account, credits: int) -> Account:
        if credits < 0 and -credits > acct.available:
            raise Refused("InsufficientCredits", -credits, acct.available)
        if credits < 0:
            self.burn(acct, -credits)
        else:
            acct.base().remaining += credits
        return acct

    def grant_bucket(
        self,
        acct: Account,
        *,
        bucket_id: str,
        credits: int,
        category: str,
        priority: int,
        effective: Instant,
        expires: Instant | None,
        now: Instant,
    ) -> Account:
        compare = self.clock.compare
        if expires is not None and (compare(expires, effective) <= 0 or compare(expires, now) <= 0):
            raise Refused("GrantExpired")
        if acct.bucket(bucket_id) is not None:
            raise Refused("GrantExists")
        if sum(b.id not in (BASE, REFILL) for b in acct.buckets) >= self.grants.max_grants:
            raise Refused("TooManyGrants")
        live = effective.model <= now.model
        self.grants_made += 1
        bucket = Bucket(
            bucket_id,
            credits,
            0,
            priority,
            category,
            effective,
            expires,
            now,
            credits,
            live,
            self.grants_made,
        )
        acct.buckets.append(bucket)
        return acct

    def reserve(self, acct: Account, rid: str, amount: int, deadline: Instant) -> Account:
        parts = self.allocate(acct, amount, deadline)
        if parts is None:
            raise Refused("InsufficientCredits", amount, self.backing(acct, deadline))
        acct.holds[rid] = Hold(rid, amount, deadline, parts)
        return acct

    def extend(self, acct: Account, rid: str, deadline: Instant) -> Account:
        hold = acct.holds[rid]

        def leaving(b: Bucket) -> bool:
            return b.expires is not None and self.clock.compare(b.expires, deadline) < 0

        parts, moving = self.rehome(acct, hold, deadline, leaving)
        if parts is None:
            raise Refused("InsufficientCredits", moving, self.backing(acct, deadline))
        hold.parts, hold.deadline = parts, deadline
        return acct

    def settle(self, acct: Account, rid: str, actual: int | None) -> tuple[Account, int]:
        """Ends the hold (when still live), then charges ``actual`` (None: a release)."""
        hold = acct.holds.pop(rid, None)
        if hold is not None:
            self.unhold(acct, hold.parts)
        charged = 0
        if actual is not None:
            charged = min(actual, max(acct.available + self.overdraft(acct), 0))
            self.burn(acct, charged)
        return acct, charged

    def void(self, acct: Account, bucket_id: str) -> tuple[Account, int, int]:
        """(account, credits taken back, credits its holds moved)."""
        b = acct.bucket(bucket_id)
        if b is None:
            raise Refused("GrantNotFound")
        moved = b.held
        if b.held:
            # The holds set's order: by deadline, then id.
            for hold in sorted(
                acct.holds.values(), key=lambda h: (self.clock.offset(h.deadline), h.rid)
            ):
                parts, moving = self.rehome(
                    acct, hold, hold.deadline, lambda x: x.id == bucket_id, bucket_id
                )
                if parts is None:
                    raise Refused(
                        "InsufficientCredits", moving, self.backing(acct, hold.deadline, bucket_id)
                    )
                hold.parts = parts
        taken = b.remaining
        b.remaining = 0
        self.tidy(acct)
        return acct, taken, moved

    @staticmethod
    def trial(acct: Account) -> Account:
        """A copy to apply a call to: a refused call leaves the original as it was."""
        return copy.deepcopy(acct)
