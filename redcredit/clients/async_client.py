"""The asyncio client: a thin driver of the engine's operations.

This file is the source of ``sync_client.py``: ``python tools/async_to_sync.py``
writes the synchronous twin from it, and a test fails when they differ.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any, Self, TypeVar

import redis.asyncio
import redis.asyncio.cluster

from ..backends.postgres_loader import AsyncPostgresLoader
from ..backends.topology import AsyncTopology
from ..config import Settings
from ..core.engine import (
    Engine,
    LoadAccount,
    Operation,
    ReservationLike,
    ScriptCall,
)
from ..core.loader import AsyncAccountLoader, AsyncDefaultsLoader
from ..errors import ConfigError
from ..results import (
    Attached,
    Balance,
    BalanceChange,
    CapChange,
    Moved,
    PlanChange,
    Reservation,
    Settlement,
    SpendResult,
    Void,
)
from ..scopes import Cap, Scope
from .reservation import AsyncReservationBlock

__all__ = ["AsyncRedCredit"]

T = TypeVar("T")


class AsyncRedCredit:
    """Credits, chat messages and reservations, from asyncio code.

    Pass a ``redis.asyncio.Redis`` (or ``redis.asyncio.cluster.RedisCluster``) client you own,
    or a URL; without either, ``settings.redis_url`` is used. Only a client
    created here is closed by :meth:`close`.
    """

    def __init__(
        self,
        redis_client: redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster | str | None = None,
        *,
        settings: Settings | None = None,
        loader: AsyncAccountLoader | None = None,
    ) -> None:
        self.settings = settings if settings is not None else Settings()
        self.engine = Engine(self.settings)
        if not isinstance(
            redis_client, (str, redis.asyncio.Redis, redis.asyncio.cluster.RedisCluster, type(None))
        ):
            raise ConfigError(
                f"redis_client must be a URL or a Redis client, not {type(redis_client).__name__}"
            )
        # Scripts go to the node owning their keys, concurrent ones pipelined
        # per node (see backends/topology.py); a client passed in lends its
        # connections (one server) or its nodes and credentials (a cluster).
        self.topology = AsyncTopology(self.settings, redis_client)
        self._given = None if isinstance(redis_client, str) else redis_client
        if loader is not None and not callable(getattr(loader, "load", None)):
            raise ConfigError(f"loader must have a load(account) method: {type(loader).__name__}")
        # Without a loader, accounts come from PostgreSQL when one is configured.
        self._owned_loader: AsyncPostgresLoader | None = None
        if loader is None and self.settings.database_url is not None:
            self._owned_loader = loader = AsyncPostgresLoader(self.settings)
        self.loader = loader if loader is not None else AsyncDefaultsLoader(self.settings)

    @property
    def redis(self) -> redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster:
        """A redis-py client of the same Redis, for commands of your own."""
        return self._given if self._given is not None else self.topology.generic()

    async def ready(self) -> None:
        """Finds out now whether Redis is one server or a cluster, and where each slot is.

        Otherwise the first call does it. Call it at startup (an app's lifespan)
        to fail fast when Redis is unreachable (:class:`BackendUnavailable`).
        """
        await self.topology.ready()

    async def close(self) -> None:
        if self._owned_loader is not None:
            await self._owned_loader.close()
        await self.topology.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- driver ------------------------------------------------------------------

    async def run(self, operation: Operation[T]) -> T:
        """Performs the I/O an engine operation asks for, until it returns."""
        try:
            step = next(operation)
            while True:
                if isinstance(step, ScriptCall):
                    step = operation.send(await self.topology.run_script(step))
                else:
                    step = operation.send(await self._load(step))
        except StopIteration as finished:
            result: T = finished.value
            return result

    async def _load(self, step: LoadAccount) -> Any:
        return await self.loader.load(step.account)

    # -- operations ----------------------------------------------------------------

    async def spend(
        self,
        account: str | Scope,
        feature: str | None = None,
        *,
        cost: int | None = None,
        units: int | None = None,
        model: str | None = None,
        idempotency_key: str | None = None,
    ) -> SpendResult:
        """Spends credits priced by ``feature`` (from the cost table) or an explicit ``cost``.

        Raises :class:`InsufficientCredits` (changing nothing) when the available
        balance is short, :class:`RateLimited` when a rate limit of the plan
        refuses (``model`` selects per-model limits). On a bypassing plan the
        result's remaining is ``None``.
        """
        return await self.run(
            self.engine.spend(
                account,
                feature,
                cost=cost,
                units=units,
                model=model,
                idempotency_key=idempotency_key,
            )
        )

    async def spend_chat_message(
        self,
        account: str | Scope,
        *,
        messages: int = 1,
        model: str | None = None,
        idempotency_key: str | None = None,
    ) -> SpendResult:
        """Spends chat messages; :class:`InsufficientChatMessages` when none are left."""
        return await self.run(
            self.engine.spend_chat_message(
                account, messages=messages, model=model, idempotency_key=idempotency_key
            )
        )

    async def chat_turn(
        self,
        account: str | Scope,
        feature: str | None = None,
        *,
        cost: int | None = None,
        units: int | None = None,
        messages: int = 1,
        model: str | None = None,
        idempotency_key: str | None = None,
    ) -> SpendResult:
        """One chat message and the turn's credits together: a refused turn spends neither.

        The plan's rate limits are checked in the same step: a turn refused by
        any of them spends nothing at all.
        """
        return await self.run(
            self.engine.chat_turn(
                account,
                feature,
                cost=cost,
                units=units,
                messages=messages,
                model=model,
                idempotency_key=idempotency_key,
            )
        )

    async def grant(
        self,
        account: str | Scope,
        credits: int = 0,
        *,
        chat_messages: int = 0,
        category: str | None = None,
        priority: int | None = None,
        effective_at: datetime | None = None,
        expires_at: datetime | None = None,
        expires_in: int | timedelta | None = None,
        grant_id: str | None = None,
        reason: str | None = None,
        idempotency_key: str | None = None,
    ) -> BalanceChange:
        """Adds credits and/or chat messages, e.g. keyed by a payment id.

        Plain credits join the account's base bucket (paid, never expiring).
        With a ``category``, ``priority``, start (``effective_at``), expiry
        (``expires_at``, or ``expires_in`` seconds or a timedelta) or a
        ``grant_id``, they make a bucket of their own, which burns in the
        configured order and can be voided; the result names it.
        """
        return await self.run(
            self.engine.grant(
                account,
                credits,
                chat_messages=chat_messages,
                category=category,
                priority=priority,
                effective_at=effective_at,
                expires_at=expires_at,
                expires_in=expires_in,
                grant_id=grant_id,
                new_grant_id=uuid.uuid4().hex,
                reason=reason,
                idempotency_key=idempotency_key,
            )
        )

    async def void(
        self,
        account: str | Scope,
        grant_id: str,
        *,
        reason: str | None = None,
        idempotency_key: str | None = None,
    ) -> Void:
        """Admin: takes back what is left of a grant (credits spent from it stay spent).

        Live reservations it backs move to other buckets that last until
        their deadlines; when none can, :class:`InsufficientCredits` and
        nothing changes. :class:`GrantNotFound` when there is no such bucket.
        """
        return await self.run(
            self.engine.void(account, grant_id, reason=reason, idempotency_key=idempotency_key)
        )

    async def correct(
        self,
        account: str | Scope,
        credits: int = 0,
        *,
        chat_messages: int = 0,
        reason: str | None = None,
        idempotency_key: str | None = None,
    ) -> BalanceChange:
        """Adds or removes balances by signed deltas, journaled like every change."""
        return await self.run(
            self.engine.correct(
                account,
                credits,
                chat_messages=chat_messages,
                reason=reason,
                idempotency_key=idempotency_key,
            )
        )

    async def set_plan(
        self, account: str | Scope, plan: str, *, idempotency_key: str | None = None
    ) -> PlanChange:
        return await self.run(self.engine.set_plan(account, plan, idempotency_key=idempotency_key))

    async def balance(self, account: str | Scope, *, model: str | None = None) -> Balance:
        """Balances and rate limits, read without spending (refills due are applied)."""
        return await self.run(self.engine.balance(account, model=model))

    async def reset_limits(
        self, account: str | Scope, name: str | None = None, *, idempotency_key: str | None = None
    ) -> int:
        """Admin: forgets one rate limit's state (or all); returns the states removed."""
        return await self.run(
            self.engine.reset_limits(account, name, idempotency_key=idempotency_key)
        )

    async def reserve(
        self,
        account: str | Scope,
        amount: int,
        *,
        ttl: int | timedelta | None = None,
        feature: str | None = None,
        messages: int = 0,
        model: str | None = None,
        idempotency_key: str | None = None,
    ) -> Reservation:
        """Holds ``amount`` credits until the lease ends (``ttl`` seconds, server clock).

        ``messages`` chat messages are spent with the hold, in the same step (a
        streamed chat turn); rate limits are checked with the amount held.
        """
        return await self.run(
            self.engine.reserve(
                account,
                amount,
                ttl=ttl,
                feature=feature,
                messages=messages,
                model=model,
                reservation_id=uuid.uuid4().hex,
                idempotency_key=idempotency_key,
            )
        )

    async def settle(
        self,
        reservation: ReservationLike,
        actual: int,
        *,
        allow_late: bool = False,
        idempotency_key: str | None = None,
    ) -> Settlement:
        """Charges the actual cost and ends the hold; repeating it returns the first outcome.

        A cost above the amount held is charged as far as the available balance
        goes; the rest is reported as ``uncharged``. A lapsed lease raises
        :class:`ReservationLapsed` unless ``allow_late``.
        """
        return await self.run(
            self.engine.close_reservation(
                reservation,
                release=False,
                actual=actual,
                allow_late=allow_late,
                idempotency_key=idempotency_key,
            )
        )

    async def release(
        self, reservation: ReservationLike, *, idempotency_key: str | None = None
    ) -> Settlement:
        """Ends the hold without charging; repeating it returns the first outcome."""
        return await self.run(
            self.engine.close_reservation(
                reservation, release=True, idempotency_key=idempotency_key
            )
        )

    async def extend(
        self, reservation: ReservationLike, *, ttl: int | timedelta | None = None
    ) -> Reservation:
        """Renews a live lease to now + ``ttl``; a lapsed one raises :class:`ReservationLapsed`."""
        return await self.run(self.engine.extend(reservation, ttl=ttl))

    async def attach(self, scope: Scope, *, idempotency_key: str | None = None) -> Attached:
        """Admin: adds a new account to a tree, under ``scope.parent`` (docs/scopes.md).

        From then on it is named by its path: a call naming it alone raises
        :class:`ScopeRequired`. An account with balances or a history of its
        own raises :class:`AccountHasHistory`. Attaching again is harmless.
        """
        return await self.run(self.engine.attach(scope, idempotency_key=idempotency_key))

    async def set_cap(
        self, account: str | Scope, cap: Cap | None, *, idempotency_key: str | None = None
    ) -> CapChange:
        """Admin: the most calls through this level may charge per window (``None``: no cap)."""
        return await self.run(self.engine.set_cap(account, cap, idempotency_key=idempotency_key))

    async def move(self, account: str | Scope, to: Scope | None, *, idempotency_key: str) -> Moved:
        """Admin: moves a leaf account, with all it holds, under the parent ``to``
        names (any tree), or out to be a root of its own (``None``); docs/scopes.md.

        Calling again with the same key finishes a move a failure interrupted.
        """
        return await self.run(self.engine.move(account, to, idempotency_key=idempotency_key))

    def reservation(
        self,
        account: str | Scope,
        amount: int,
        *,
        ttl: int | timedelta | None = None,
        feature: str | None = None,
        allow_late: bool = True,
    ) -> AsyncReservationBlock:
        """An ``async with`` block that reserves, renews while it runs, and settles or releases.

        ``allow_late`` charges the reported cost even if renewals failed and the
        lease lapsed, as far as the balance goes: the work was done.
        """
        return AsyncReservationBlock(self, account, amount, ttl, feature, allow_late)
