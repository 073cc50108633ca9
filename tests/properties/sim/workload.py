"""The clients of a simulation run, and the record of what each call returned."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from redcredit import (
    AlreadyApplied,
    AsyncRedCredit,
    CapReached,
    GrantError,
    IdempotencyConflict,
    InsufficientFunds,
    RateLimited,
    RedCreditError,
    Reservation,
    ReservationError,
    Scope,
    ScopeError,
)
from tests.properties.sim import trees

# Refusals are answers: the call changed nothing and is not retried. GrantError
# covers GrantNotFound, GrantExists, GrantExpired and TooManyGrants; ScopeError
# NotInScope and ScopeRequired.
REFUSALS = (
    InsufficientFunds,
    RateLimited,
    ReservationError,
    IdempotencyConflict,
    GrantError,
    ScopeError,
    CapReached,
)
RETRY_FOR_S = 30.0  # an ambiguous call is retried with its key for this long, then given up
PLAN_WEIGHTS = {"free": 5, "metered": 3, "paid": 1, "demo": 1}


@dataclass
class Call:
    """One logical call, over all its attempts."""

    kind: str
    account: str
    key: str | None
    home: str  # the account whose partition holds it: its root's, on a tree
    outcome: str = "unknown"  # ok | refused | unknown (given up while ambiguous)
    attempts: int = 0
    ambiguous: bool = False  # an attempt failed in a way that may have applied it
    replayed: bool = False
    sequence: int | None = None
    epoch_before: int = 0  # Redis losses counted when the last attempt began
    refusal: str = ""
    answered_at: float = 0.0  # monotonic
    transient: list[str] = field(default_factory=list)


@dataclass
class Record:
    calls: list[Call] = field(default_factory=list)
    escaped: list[str] = field(default_factory=list)  # exceptions outside RedCreditError
    oversold: list[str] = field(default_factory=list)  # balance reads with available < 0
    balance_reads: int = 0

    def counts(self) -> Counter[str]:
        return Counter(f"{c.kind}:{c.outcome}" for c in self.calls)


class Clients:
    """``workers`` coroutines sharing one AsyncRedCredit, each with its own seeded draws."""

    def __init__(
        self,
        arc: AsyncRedCredit,
        accounts: list[str],
        seed: int,
        epoch: Callable[[], int],
    ) -> None:
        self.arc = arc
        self.accounts = accounts
        self.seed = seed
        self.epoch = epoch
        self.record = Record()
        self.stopping = asyncio.Event()

    async def run(self, workers: int) -> None:
        await asyncio.gather(*(self._worker(i) for i in range(workers)))

    # -- calls -----------------------------------------------------------------

    async def call(
        self,
        kind: str,
        send: Callable[..., Awaitable[Any]],
        target: Any,
        *args: Any,
        key: str | None = None,
        **options: Any,
    ) -> Any:
        """Sends until an answer comes back; a call that may have applied is sent again.

        ``target`` is the account, or the reservation of a call about one; the
        same ``key`` goes with every attempt.
        """
        account = target if isinstance(target, str) else target.account
        home = account
        if isinstance(target, Scope):
            home = target.root
        elif isinstance(target, Reservation) and target.path:
            home = target.path[0]
        if key is not None:
            options["idempotency_key"] = key
        call = Call(kind, account, key, home)
        self.record.calls.append(call)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + RETRY_FOR_S
        while True:
            call.attempts += 1
            call.epoch_before = self.epoch()
            try:
                result = await send(target, *args, **options)
            except AlreadyApplied as applied:
                # Redis lost the account since the first attempt, which had
                # reached PostgreSQL: applied once, its reply gone.
                call.outcome, call.replayed, call.sequence = "ok", True, applied.sequence
                call.answered_at = time.monotonic()
                return None
            except REFUSALS as refused:
                call.outcome, call.refusal = "refused", type(refused).__name__
                return None
            except RedCreditError as failed:
                call.transient.append(type(failed).__name__)
                call.ambiguous = True
                if key is None or loop.time() > give_up:
                    return None  # outcome unknown; without a key it is never sent again
                await asyncio.sleep(0.05 * min(call.attempts, 10))
                continue
            except Exception as escaped:  # a bug: every failure must be a RedCreditError
                self.record.escaped.append(f"{kind}: {type(escaped).__name__}: {escaped}")
                return None
            call.outcome, call.answered_at = "ok", time.monotonic()
            call.replayed = bool(getattr(result, "replayed", False))
            call.sequence = getattr(result, "sequence", None)
            return result

    # -- the workload ------------------------------------------------------------

    async def set_up_tree(self) -> None:
        """Attaches the tree, grants the root its pool and caps one user, before the load."""
        arc = self.arc
        for scope in trees.members():
            await self.call("attach", arc.attach, scope, key=f"attach-{scope.account}")
        for scope in trees.every_level():
            # No rate limit on any level: the whole tree's load passes the root.
            await self.call("plan", arc.set_plan, scope, "pool", key=f"pool-{scope.account}")
        await self.call("grant", arc.grant, trees.ROOT, trees.POOL, key="tree-pool")
        await self.call("cap", arc.set_cap, trees.CAPPED, trees.CAP, key="tree-cap")

    async def _worker(self, index: int) -> None:
        rng = random.Random(self.seed * 1_000 + index)
        serial = 0
        arc = self.arc
        grants: list[tuple[str | Scope, str]] = []  # buckets this worker made, to void
        while not self.stopping.is_set():
            serial += 1
            key = f"w{index}-{serial}"
            account = rng.choice(self.accounts)
            roll = rng.random()
            if roll < 0.26:
                await self.call("spend", arc.spend, account, cost=rng.randint(0, 8), key=key)
            elif roll < 0.42:
                await self.call("turn", arc.chat_turn, account, cost=rng.randint(1, 4), key=key)
            elif roll < 0.50:
                credits, messages = rng.randint(1, 30), rng.randint(0, 3)
                await self.call(
                    "grant", arc.grant, account, credits, chat_messages=messages, key=key
                )
            elif roll < 0.55:
                await self._bucket_grant(rng, account, key, grants)
            elif roll < 0.57:
                await self._void(rng, key, grants)
            elif roll < 0.60:
                delta = rng.choice([-5, -3, -1, 1, 2, 4])
                await self.call("correct", arc.correct, account, delta, key=key)
            elif roll < 0.62:
                plan = rng.choices(list(PLAN_WEIGHTS), weights=list(PLAN_WEIGHTS.values()))[0]
                await self.call("plan", arc.set_plan, account, plan, key=key)
            elif roll < 0.66:
                await self._read_balance(account)
            elif roll < 0.78:
                await self._on_tree(rng, key, grants)
            else:
                await self._stream(rng, account, key)
            await asyncio.sleep(0)

    async def _bucket_grant(
        self,
        rng: random.Random,
        target: str | Scope,
        key: str,
        grants: list[tuple[str | Scope, str]],
        kind: str = "bucket-grant",
    ) -> None:
        """A grant of its own bucket, lasting seconds, so that many expire while the run goes on."""
        grant_id = f"g-{key}"
        lasting = rng.randint(1, 6)
        options: dict[str, Any] = {
            "category": rng.choice(["promotional", "paid"]),
            "priority": rng.choice([10, 50, 50, 300]),
            "grant_id": grant_id,
        }
        if rng.random() < 0.25:  # starts a little later
            start = datetime.now(UTC) + timedelta(seconds=rng.uniform(0.2, 2.0))
            options["effective_at"] = start
            options["expires_at"] = start + timedelta(seconds=lasting)
        else:
            options["expires_in"] = lasting
        result = await self.call(
            kind, self.arc.grant, target, rng.randint(1, 40), key=key, **options
        )
        if result is not None:
            grants.append((target, grant_id))

    async def _void(
        self, rng: random.Random, key: str, grants: list[tuple[str | Scope, str]]
    ) -> None:
        if not grants:
            return
        target, grant_id = grants.pop(rng.randrange(len(grants)))
        kind = "void" if isinstance(target, str) else "tree-void"
        await self.call(kind, self.arc.void, target, grant_id, key=key)

    async def _on_tree(
        self, rng: random.Random, key: str, grants: list[tuple[str | Scope, str]]
    ) -> None:
        """A call on a path of the tree: mostly spends and streams, sometimes a team's own grant."""
        path = rng.choice(trees.paths())
        roll = rng.random()
        if roll < 0.45:
            await self.call("tree-spend", self.arc.spend, path, cost=rng.randint(0, 8), key=key)
        elif roll < 0.85:
            await self._stream(rng, path, key, prefix="tree-")
        elif roll < 0.95:
            team = Scope(*path.path[:2])
            await self._bucket_grant(rng, team, key, grants, kind="tree-grant")
        else:
            await self._void(rng, key, grants)

    async def _stream(
        self, rng: random.Random, target: str | Scope, key: str, prefix: str = ""
    ) -> None:
        """A streamed reply: reserve, maybe renew, then settle, release or walk away."""
        arc = self.arc
        amount, ttl = rng.randint(1, 20), rng.randint(1, 3)
        # Only the root of the tree has chat messages (its free ones), soon spent.
        messages = rng.randint(0, 1) if isinstance(target, str) else 0
        reservation: Reservation | None = await self.call(
            f"{prefix}reserve", arc.reserve, target, amount, ttl=ttl, messages=messages, key=key
        )
        if reservation is None:
            return
        await asyncio.sleep(rng.choice([0, 0, 0.01, 0.05]))
        ending = rng.random()
        if ending < 0.10:
            return  # abandoned: the lease must end by itself
        if ending < 0.20:
            await self.call(f"{prefix}extend", arc.extend, reservation, ttl=ttl)
        close = f"{key}-close"
        if ending < 0.35:
            await self.call(f"{prefix}release", arc.release, reservation, key=close)
            return
        actual, late = rng.randint(0, 25), rng.random() < 0.5
        await self.call(
            f"{prefix}settle", arc.settle, reservation, actual, allow_late=late, key=close
        )

    async def _read_balance(self, account: str) -> None:
        try:
            balance = await self.arc.balance(account)
        except RedCreditError:
            return
        except Exception as escaped:
            self.record.escaped.append(f"balance: {type(escaped).__name__}: {escaped}")
            return
        self.record.balance_reads += 1
        if not balance.unlimited and balance.available < 0:
            self.record.oversold.append(f"{account}: {balance}")
