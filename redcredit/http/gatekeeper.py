"""What the ASGI middleware and the FastAPI dependency share: :class:`Gatekeeper`.

It decides one charge for a :class:`~redcredit.http.routes.Route` within a
deadline, under a circuit breaker, and answers every error the same way
(:meth:`Gatekeeper.answer`), counting outcomes in :class:`GateStats`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import TYPE_CHECKING, Literal, TypeVar

from .. import validation as v
from ..errors import (
    AlreadyApplied,
    BackendUnavailable,
    CapReached,
    ConfigError,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidInput,
    NotDurable,
    RateLimited,
    RedCreditError,
    RedisCommandError,
)
from ..results import Reservation, SpendResult
from ..scopes import Scope as AccountScope
from .breaker import CircuitBreaker, within_deadline
from .problems import Problem, Problems, credit_headers, ratelimit_headers
from .routes import Route

if TYPE_CHECKING:
    from ..clients.async_client import AsyncRedCredit

__all__ = ["GateStats", "Gatekeeper", "KeptGate", "UnidentifiedPolicy", "Verdict"]

T = TypeVar("T")

UnidentifiedPolicy = Literal["reject", "pass"]

# The logger the documentation names for the gate's warnings.
log = logging.getLogger("redcredit.http.asgi")

# A decision is meant to take milliseconds; a minute is far past any use.
_MAX_DEADLINE_S = 60


@dataclass(slots=True)
class GateStats:
    """Counters since the gate was made, for metrics and tests."""

    allowed: int = 0
    refused: int = 0
    rate_limited: int = 0
    # Answered 503 because Redis could not be reached (policy "closed").
    unavailable: int = 0
    # Let through uncharged because Redis could not be reached (policy "open").
    ungated: int = 0
    # Refusals that a shadow route let through.
    shadow_refusals: int = 0
    # Answered 400: an account, idempotency key or cost that redcredit refuses.
    invalid: int = 0
    conflicts: int = 0  # 409s: an idempotency key that cannot be answered with a replay
    unidentified: int = 0
    disconnects: int = 0
    settled: int = 0
    released: int = 0
    settle_failures: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the gate decided for one request.

    ``problem`` is the answer to send instead of running the endpoint;
    otherwise the endpoint runs, with ``headers`` added to its response.
    ``ungated`` means Redis could not be reached and the policy let it through;
    ``refusal`` is set when a shadow route let a refused request through.
    """

    problem: Problem | None = None
    result: SpendResult | None = None
    headers: tuple[tuple[str, str], ...] = ()
    ungated: bool = False
    refusal: InsufficientFunds | RateLimited | CapReached | None = None

    @property
    def allowed(self) -> bool:
        return self.problem is None


class Gatekeeper:
    """Decides one charge within a deadline, under a circuit breaker, by the route's policies.

    Refusals (credits, chat messages, rate limits) become problems, or pass on
    a shadow route. A Redis that does not answer within ``deadline_s``
    (default 50 ms), or an open breaker, is decided by ``on_unavailable``
    without waiting for any socket timeout.
    """

    def __init__(
        self,
        client: AsyncRedCredit,
        *,
        deadline_s: float = 0.05,
        breaker: CircuitBreaker | None = None,
        problems: Problems | None = None,
        warn_interval_s: float = 10.0,
    ) -> None:
        if isinstance(deadline_s, bool) or not isinstance(deadline_s, int | float):
            raise ConfigError(
                f"deadline_s must be a number of seconds, not {v.short_repr(deadline_s)}"
            )
        # Compared, not converted: NaN fails both tests, and float() of a huge int overflows.
        if not 0 < deadline_s <= _MAX_DEADLINE_S:
            raise ConfigError(
                f"deadline_s must be positive and at most {_MAX_DEADLINE_S} s, "
                f"not {v.short_repr(deadline_s)}"
            )
        self.client = client
        self.deadline_s = float(deadline_s)
        self.breaker = breaker if breaker is not None else CircuitBreaker()
        self.problems = problems if problems is not None else Problems()
        self.stats = GateStats()
        self._warn_interval_s = warn_interval_s
        self._warned: dict[str, tuple[float, int]] = {}

    # -- deciding ------------------------------------------------------------------

    async def decide(self, call: Callable[[], Awaitable[T]]) -> T:
        """``await call()`` under the breaker and the deadline.

        Raises :class:`BackendUnavailable` at once while the breaker is open,
        and at the deadline when Redis is slow or gone.
        """
        if not self.breaker.allow():
            raise BackendUnavailable(
                "Redis failed repeatedly; not calling it for another "
                f"{self.breaker.retry_after():.1f} s"
            )
        try:
            result = await within_deadline(call(), self.deadline_s)
        except (InsufficientFunds, RateLimited, NotDurable):
            # Redis answered: a refusal is a healthy backend.
            self.breaker.record_success()
            raise
        except BackendUnavailable:
            # Unreachable, slow, or refusing for now (RedisRefused: OOM, READONLY...).
            self.breaker.record_failure()
            raise
        except RedisCommandError:
            # Redis answered at once, so the breaker has nothing to spare it from;
            # the error reaches answer(), which decides it as an outage.
            self.breaker.record_success()
            raise
        self.breaker.record_success()
        return result

    async def spend(
        self,
        route: Route,
        account: str | AccountScope,
        *,
        cost: int | None,
        idempotency_key: str | None = None,
        what: str | None = None,
    ) -> Verdict:
        """The route's chat turn (``messages`` > 0) or spend of ``cost``, decided."""
        what = what or _what(route, account)
        chat = route.messages > 0

        async def call() -> SpendResult:
            if chat:
                return await self.client.chat_turn(
                    account,
                    route.feature,
                    # A chat route priced by neither spends chat messages only.
                    cost=0 if route.feature is None and cost is None else cost,
                    messages=route.messages,
                    model=route.model,
                    idempotency_key=idempotency_key,
                )
            return await self.client.spend(
                account,
                route.feature,
                cost=cost,
                model=route.model,
                idempotency_key=idempotency_key,
            )

        try:
            result = await self.decide(call)
        except NotDurable as exc:
            # Applied in Redis, only not yet on disk or a replica: it was paid for.
            log.warning("%s: charged, but not confirmed durable: %s", what, exc)
            self.stats.allowed += 1
            return Verdict()
        except RedCreditError as exc:
            return self.answer(exc, route, what)
        self.stats.allowed += 1
        return Verdict(result=result, headers=tuple(credit_headers(result, chat=chat)))

    async def reserve(
        self,
        route: Route,
        account: str | AccountScope,
        *,
        amount: int,
        ttl: timedelta,
        idempotency_key: str | None = None,
        what: str | None = None,
    ) -> tuple[Verdict, Reservation | None]:
        """A hold of ``amount`` for the route's stream (and its chat messages), decided.

        No reservation comes back when the request is not gated.
        """
        what = what or _what(route, account)

        async def call() -> Reservation:
            return await self.client.reserve(
                account,
                amount,
                ttl=ttl,
                feature=route.feature,
                messages=route.messages,
                model=route.model,
                idempotency_key=idempotency_key,
            )

        try:
            reservation = await self.decide(call)
        except NotDurable as exc:
            if idempotency_key is None:
                # The hold exists but cannot be named: it lapses at its deadline.
                return self.answer(exc, route, what), None
            try:
                # The same key answers with the hold that was made.
                reservation = await call()
            except RedCreditError as again:
                return self._unavailable(again, route, what), None
        except RedCreditError as exc:
            return self.answer(exc, route, what), None
        self.stats.allowed += 1
        return Verdict(headers=tuple(ratelimit_headers(reservation.limits))), reservation

    def answer(self, exc: RedCreditError, route: Route, what: str) -> Verdict:
        """The verdict for a charge that raised ``exc``, counted; errors it does not know raise.

        A request whose account, idempotency key or cost is refused gets a 400
        and a reused idempotency key a 409, even on a shadow route: such a
        request could not be charged at all, so letting it through would make
        it free, and a conflict has no replay to give.
        """
        if isinstance(exc, InvalidInput):
            return Verdict(problem=self.invalid(exc, what))
        if isinstance(exc, IdempotencyConflict | AlreadyApplied):
            self.stats.conflicts += 1
            self._warn("conflict", "%s refused with 409: %s", what, exc)
            return Verdict(problem=self.problems.conflict(exc))
        if isinstance(exc, InsufficientFunds | RateLimited | CapReached):
            return self._refused(exc, route, what)
        if isinstance(exc, BackendUnavailable | NotDurable | RedisCommandError):
            # A Redis error no retry mends (a script error, a permission) leaves
            # the charge as undecidable as an outage does: no 500 for either.
            return self._unavailable(exc, route, what)
        raise exc

    def invalid(self, exc: InvalidInput, what: str) -> Problem:
        """The 400 for a request whose account, idempotency key or cost is refused; counted."""
        self.stats.invalid += 1
        self._warn("invalid", "%s refused with 400: %s", what, exc)
        return self.problems.invalid(exc)

    def _refused(
        self, refusal: InsufficientFunds | RateLimited | CapReached, route: Route, what: str
    ) -> Verdict:
        if route.shadow:
            self.stats.shadow_refusals += 1
            log.info("%s: shadow route let through what it would refuse: %s", what, refusal)
            return Verdict(refusal=refusal)
        if isinstance(refusal, RateLimited | CapReached):
            self.stats.rate_limited += 1
        else:
            self.stats.refused += 1
        return Verdict(problem=self.problems.refusal(refusal))

    def _unavailable(self, exc: Exception, route: Route, what: str) -> Verdict:
        if route.shadow or route.on_unavailable == "open":
            self.stats.ungated += 1
            self._warn("ungated", "%s let through ungated: %s", what, exc)
            return Verdict(ungated=True)
        self.stats.unavailable += 1
        self._warn("unavailable", "%s refused with 503: %s", what, exc)
        return Verdict(problem=self.problems.unavailable(self.breaker.retry_after()))

    def _warn(self, topic: str, message: str, *args: object) -> None:
        """A WARNING, at most one per topic per interval: an outage must not flood the logs."""
        now = time.monotonic()
        last, suppressed = self._warned.get(topic, (-math.inf, 0))
        if now - last < self._warn_interval_s:
            self._warned[topic] = (last, suppressed + 1)
            return
        self._warned[topic] = (now, 0)
        if suppressed:
            message += f" (and {suppressed} more like it since the last warning)"
        log.warning(message, *args)


def _what(route: Route, account: str | AccountScope) -> str:
    """How log lines name one request."""
    return f"{route.describe()} for {account!r}"


def payer(identified: object) -> str | AccountScope:
    """What ``identify`` named: an account id (checked), or the ``Scope`` of a tree's member.

    Checked before the account is named in a log line: a header can hold anything.
    """
    if isinstance(identified, AccountScope):
        return identified
    return v.check_account_id(identified)


class KeptGate:
    """What the middleware and the FastAPI dependency show of their Gatekeeper."""

    keeper: Gatekeeper

    @property
    def stats(self) -> GateStats:
        return self.keeper.stats

    @property
    def breaker(self) -> CircuitBreaker:
        return self.keeper.breaker
