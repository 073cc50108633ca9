"""An ASGI middleware that charges credits and chat messages per route: :class:`CreditGate`.

Pure ASGI (no framework needed): it answers refusals itself with RFC 9457
problem bodies, adds its headers to the application's one
``http.response.start`` message, and passes every body chunk on as it comes,
so streamed responses stay streamed. See ``docs/asgi.md``.

:class:`Gatekeeper` holds what the middleware and the FastAPI dependency
share: the circuit breaker, the deadline, the policies and the counters.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from redis.exceptions import RedisError

from .. import validation as v
from ..errors import (
    AlreadyApplied,
    BackendUnavailable,
    ConfigError,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidInput,
    NotDurable,
    RateLimited,
    RedCreditError,
    ReservationError,
)
from ..results import Reservation, Settlement, SpendResult
from .breaker import CircuitBreaker, within_deadline
from .problems import Problem, Problems, credit_headers, ratelimit_headers
from .routes import (
    ASGIApp,
    Message,
    Receive,
    Route,
    Scope,
    Send,
    UnavailablePolicy,
    match_route,
    resolve_cost,
)

if TYPE_CHECKING:
    from ..clients.async_client import AsyncRedCredit

__all__ = [
    "CreditGate",
    "GateStats",
    "Gatekeeper",
    "Identify",
    "StreamUsage",
    "UnidentifiedPolicy",
    "Verdict",
    "send_problem",
]

T = TypeVar("T")

# The paying account of a request, from the app's own authentication: never
# from a raw client header unless the app chooses so.
Identify = Callable[[Scope], str | Awaitable[str | None] | None]
IdempotencyKeyOf = Callable[[Scope], str | Awaitable[str | None] | None]
UnidentifiedPolicy = Literal["reject", "pass"]

log = logging.getLogger("redcredit.http.asgi")

# How long a settle that failed on a Redis outage keeps being retried, and
# how far apart. Settling is idempotent, and late settles are charged as far
# as the balance goes, so a retry can only ever charge once.
_SETTLE_RETRY_DELAYS_S = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0)
# A decision is meant to take milliseconds; a minute is far past any use.
_MAX_DEADLINE_S = 60


async def _maybe_await(value: T | Awaitable[T]) -> T:
    if inspect.isawaitable(value):
        return await value
    return value


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
    refusal: InsufficientFunds | RateLimited | None = None

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
            self.breaker.record_failure()
            raise
        except RedCreditError as exc:
            if isinstance(exc.__cause__, RedisError):
                # OOM, READONLY after a failover and the like: no decision can be made.
                self.breaker.record_failure()
                raise BackendUnavailable(f"Redis refused the call: {exc}") from exc
            raise
        self.breaker.record_success()
        return result

    async def spend(
        self,
        account: str,
        *,
        feature: str | None,
        cost: int | None,
        messages: int,
        shadow: bool = False,
        on_unavailable: UnavailablePolicy = "closed",
        idempotency_key: str | None = None,
        what: str = "request",
        model: str | None = None,
    ) -> Verdict:
        """One chat turn (``messages`` > 0) or spend, decided."""

        async def call() -> SpendResult:
            if messages > 0:
                if feature is None and cost is None:
                    return await self.client.chat_turn(
                        account,
                        cost=0,
                        messages=messages,
                        model=model,
                        idempotency_key=idempotency_key,
                    )
                return await self.client.chat_turn(
                    account,
                    feature,
                    cost=cost,
                    messages=messages,
                    model=model,
                    idempotency_key=idempotency_key,
                )
            return await self.client.spend(
                account, feature, cost=cost, model=model, idempotency_key=idempotency_key
            )

        try:
            result = await self.decide(call)
        except InvalidInput as exc:
            return Verdict(problem=self.invalid(exc, what))
        except (IdempotencyConflict, AlreadyApplied) as exc:
            return Verdict(problem=self.conflict(exc, what))
        except (InsufficientFunds, RateLimited) as refusal:
            return self._refused(refusal, shadow, what)
        except NotDurable as exc:
            # Applied in Redis, only not yet on disk or a replica: it was paid for.
            log.warning("%s: charged, but not confirmed durable: %s", what, exc)
            self.stats.allowed += 1
            return Verdict()
        except BackendUnavailable as exc:
            return self._unavailable(exc, shadow, on_unavailable, what)
        self.stats.allowed += 1
        return Verdict(result=result, headers=tuple(credit_headers(result, chat=messages > 0)))

    async def reserve(
        self,
        account: str,
        amount: int,
        *,
        ttl: timedelta,
        feature: str | None,
        messages: int,
        shadow: bool = False,
        on_unavailable: UnavailablePolicy = "closed",
        idempotency_key: str | None = None,
        what: str = "request",
        model: str | None = None,
    ) -> tuple[Verdict, Reservation | None]:
        """A hold for a stream (and its chat messages), decided; no reservation when not gated."""
        # Only asked for when needed, so routes without chat messages work
        # with clients that predate chat messages on reservations.
        extra: dict[str, Any] = {"messages": messages} if messages else {}

        async def call() -> Reservation:
            return await self.client.reserve(
                account,
                amount,
                ttl=ttl,
                feature=feature,
                model=model,
                idempotency_key=idempotency_key,
                **extra,
            )

        try:
            reservation = await self.decide(call)
        except InvalidInput as exc:
            return Verdict(problem=self.invalid(exc, what)), None
        except (IdempotencyConflict, AlreadyApplied) as exc:
            return Verdict(problem=self.conflict(exc, what)), None
        except (InsufficientFunds, RateLimited) as refusal:
            return self._refused(refusal, shadow, what), None
        except NotDurable as exc:
            if idempotency_key is None:
                # The hold exists but cannot be named: it lapses at its deadline.
                return self._unavailable(exc, shadow, on_unavailable, what), None
            try:
                # The same key answers with the hold that was made.
                reservation = await call()
            except RedCreditError as again:
                return self._unavailable(again, shadow, on_unavailable, what), None
        except BackendUnavailable as exc:
            return self._unavailable(exc, shadow, on_unavailable, what), None
        self.stats.allowed += 1
        limits = getattr(reservation, "limits", ())
        return Verdict(headers=tuple(ratelimit_headers(limits))), reservation

    def invalid(self, exc: InvalidInput, what: str) -> Problem:
        """The 400 for a request whose account, idempotency key or cost is refused; counted.

        Even on a shadow route: such a request could not be charged at all,
        so letting it through would make it free.
        """
        self.stats.invalid += 1
        self._warn("invalid", "%s refused with 400: %s", what, exc)
        return self.problems.invalid(exc)

    def conflict(self, exc: IdempotencyConflict | AlreadyApplied, what: str) -> Problem:
        """The 409 for a reused idempotency key, even on a shadow route (no replay to give)."""
        self.stats.conflicts += 1
        self._warn("conflict", "%s refused with 409: %s", what, exc)
        return self.problems.conflict(exc)

    def _refused(
        self, refusal: InsufficientFunds | RateLimited, shadow: bool, what: str
    ) -> Verdict:
        if shadow:
            self.stats.shadow_refusals += 1
            log.info("%s: shadow route let through what it would refuse: %s", what, refusal)
            return Verdict(refusal=refusal)
        if isinstance(refusal, RateLimited):
            self.stats.rate_limited += 1
        else:
            self.stats.refused += 1
        return Verdict(problem=self.problems.refusal(refusal))

    def _unavailable(
        self, exc: Exception, shadow: bool, policy: UnavailablePolicy, what: str
    ) -> Verdict:
        if shadow or policy == "open":
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


class StreamUsage:
    """What a stream route's endpoint reports: ``request.state.redcredit`` (``scope["state"]``).

    Call :meth:`add` as the work goes (e.g. per token) or :meth:`set` once;
    at the end the gate settles that amount, or the whole reservation if
    nothing was reported. More than reserved is charged as far as the balance
    goes. Without a reservation (``gated`` false: Redis was unreachable and
    the route is open, a shadow route refused, or an unidentified request
    was let through) reports are kept but nothing is charged.
    """

    __slots__ = ("_used", "account", "reservation", "settlement")

    def __init__(self, account: str | None, reservation: Reservation | None) -> None:
        self.account = account
        self.reservation = reservation
        self.settlement: Settlement | None = None
        self._used: int | None = None

    @property
    def gated(self) -> bool:
        return self.reservation is not None

    @property
    def reserved(self) -> int:
        return 0 if self.reservation is None else self.reservation.amount

    @property
    def used(self) -> int | None:
        """What was reported so far; ``None`` if nothing was."""
        return self._used

    def add(self, amount: int) -> int:
        amount = v.check_amount(amount, name="amount")
        total = (self._used or 0) + amount
        if total > v.MAX_AMOUNT:
            raise InvalidInput(f"reported usage would pass {v.MAX_AMOUNT}")
        self._used = total
        return total

    def set(self, amount: int) -> None:
        self._used = v.check_amount(amount, name="amount")

    def final_cost(self) -> int:
        return self.reserved if self._used is None else self._used

    def __repr__(self) -> str:
        held = self.reservation.id if self.reservation is not None else None
        return f"StreamUsage(account={self.account!r}, reservation={held}, used={self._used})"


def _raw_headers(headers: Sequence[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]


def _add_headers(message: Message, extra: list[tuple[bytes, bytes]]) -> Message:
    """A copy of a start message with ``extra`` headers the app did not set itself."""
    present = list(message.get("headers", ()))
    names = {bytes(name).lower() for name, _ in present}
    return {**message, "headers": present + [h for h in extra if h[0] not in names]}


def _with_headers(send: Send, headers: Sequence[tuple[str, str]]) -> Send:
    if not headers:
        return send
    extra = _raw_headers(headers)

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = _add_headers(message, extra)
        await send(message)

    return wrapped


async def send_problem(send: Send, problem: Problem) -> None:
    """Answers with ``problem``: one start message, one body."""
    await send(
        {
            "type": "http.response.start",
            "status": problem.status,
            "headers": _raw_headers(problem.all_headers()),
        }
    )
    await send({"type": "http.response.body", "body": problem.content()})


class _StreamWatch:
    """Wraps receive and send of one streamed response to notice a client that went away."""

    def __init__(self, receive: Receive, send: Send, headers: Sequence[tuple[str, str]]) -> None:
        self._receive = receive
        self._send = send
        self._extra = _raw_headers(headers)
        self.complete = False
        self.disconnected = False

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.disconnect" and not self.complete:
            self.disconnected = True
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start" and self._extra:
            message = _add_headers(message, self._extra)
        try:
            await self._send(message)
        except OSError:
            # ASGI 2.4 servers report a client that went away this way.
            self.disconnected = True
            raise
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete = True


class CreditGate:
    """Pure ASGI middleware charging the requests of ``routes`` to the account ``identify`` names.

    ``identify(scope)`` returns the paying account (or an awaitable of it),
    or ``None``: then ``unidentified="reject"`` answers 401, ``"pass"`` runs
    the endpoint uncharged. Non-HTTP scopes (lifespan, websocket) and
    requests no route matches pass straight through.

    ``idempotency_key(scope)``, if given, keys each charge (e.g. from the
    request's ``Idempotency-Key`` header), so a client retrying a request
    whose charge timed out is not charged twice.

    An account, idempotency key or cost that redcredit refuses (a header can
    hold anything) is answered 400 (``invalid-request``); nothing is charged.

    ``deadline_s`` bounds every decision; after ``breaker``'s threshold of
    failures in a row the decision is immediate until Redis answers a probe.
    ``gate.stats`` counts outcomes.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        client: AsyncRedCredit,
        identify: Identify,
        routes: Sequence[Route],
        unidentified: UnidentifiedPolicy = "reject",
        deadline_s: float = 0.05,
        breaker: CircuitBreaker | None = None,
        problems: Problems | None = None,
        idempotency_key: IdempotencyKeyOf | None = None,
    ) -> None:
        if unidentified not in ("reject", "pass"):
            raise ConfigError(
                f"unidentified must be 'reject' or 'pass', not {v.short_repr(unidentified)}"
            )
        if not callable(identify):
            raise ConfigError("identify must be a function of the ASGI scope")
        self.app = app
        self.client = client
        self.identify = identify
        self.routes = tuple(routes)
        self.unidentified = unidentified
        self.idempotency_key = idempotency_key
        self.keeper = Gatekeeper(client, deadline_s=deadline_s, breaker=breaker, problems=problems)
        self._ttl_ms: dict[int, int] = {}
        self._background: set[asyncio.Task[None]] = set()
        for route in self.routes:
            self._check(route)

    def _check(self, route: Route) -> None:
        if not isinstance(route, Route):
            raise ConfigError(f"routes must be Route objects, not {v.short_repr(route)}")
        if route.stream:
            try:
                self._ttl_ms[id(route)] = self.client.engine.ttl_ms(route.stream_ttl)
            except InvalidInput as exc:
                raise ConfigError(f"route {route.describe()}: {exc}") from exc
        elif route.feature is not None and route.feature not in self.client.settings.costs:
            # Found now rather than as a 500 on the first request.
            raise ConfigError(
                f"route {route.describe()} is priced by feature {route.feature!r}, "
                "which the cost table does not define"
            )

    @property
    def stats(self) -> GateStats:
        return self.keeper.stats

    @property
    def breaker(self) -> CircuitBreaker:
        return self.keeper.breaker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = match_route(self.routes, scope["method"], scope["path"])
        if route is None:
            await self.app(scope, receive, send)
            return
        account = await _maybe_await(self.identify(scope))
        if account is None:
            self.stats.unidentified += 1
            if self.unidentified == "pass":
                if route.stream:
                    # The endpoint's reports go nowhere, but its code runs unchanged.
                    scope.setdefault("state", {})["redcredit"] = StreamUsage(None, None)
                await self.app(scope, receive, send)
            else:
                await send_problem(send, self.keeper.problems.unidentified())
            return
        try:
            # Checked before the account is named in a log line: a header can hold anything.
            account = v.check_account_id(account)
        except InvalidInput as exc:
            await send_problem(send, self.keeper.invalid(exc, route.describe()))
            return
        if route.stream:
            await self._stream(route, account, scope, receive, send)
        else:
            await self._once(route, account, scope, receive, send)

    async def _key(self, scope: Scope) -> str | None:
        if self.idempotency_key is None:
            return None
        return await _maybe_await(self.idempotency_key(scope))

    async def _once(
        self, route: Route, account: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        verdict = await self.keeper.spend(
            account,
            feature=route.feature,
            cost=await resolve_cost(route.cost, scope),
            messages=route.messages,
            shadow=route.shadow,
            on_unavailable=route.on_unavailable,
            idempotency_key=await self._key(scope),
            what=f"{route.describe()} for {account!r}",
            model=route.model,
        )
        if verdict.problem is not None:
            await send_problem(send, verdict.problem)
            return
        await self.app(scope, receive, _with_headers(send, verdict.headers))

    async def _stream(
        self, route: Route, account: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        amount = await resolve_cost(route.max_cost, scope)
        if amount is None:
            raise ConfigError(f"stream route {route.describe()} has no max_cost")
        ttl = timedelta(milliseconds=self._ttl_ms[id(route)])
        what = f"{route.describe()} for {account!r}"
        verdict, reservation = await self.keeper.reserve(
            account,
            amount,
            ttl=ttl,
            feature=route.feature,
            messages=route.messages,
            shadow=route.shadow,
            on_unavailable=route.on_unavailable,
            idempotency_key=await self._key(scope),
            what=what,
            model=route.model,
        )
        if verdict.problem is not None:
            await send_problem(send, verdict.problem)
            return
        usage = StreamUsage(account, reservation)
        scope.setdefault("state", {})["redcredit"] = usage
        if reservation is None:
            await self.app(scope, receive, send)
            return
        watch = _StreamWatch(receive, send, verdict.headers)
        renewer = asyncio.create_task(self._renew(usage, ttl), name="redcredit-renew")
        try:
            await self.app(scope, watch.receive, watch.send)
        except BaseException:
            await _stop(renewer)
            await self._close(route, usage, watch.disconnected, failed=True, what=what)
            raise
        await _stop(renewer)
        await self._close(route, usage, watch.disconnected, failed=False, what=what)

    async def _renew(self, usage: StreamUsage, ttl: timedelta) -> None:
        # A third of the lease, so two renewals in a row may fail before it lapses.
        interval = ttl.total_seconds() / 3
        while usage.reservation is not None:
            await asyncio.sleep(interval)
            try:
                usage.reservation = await self.client.extend(usage.reservation, ttl=ttl)
            except ReservationError as exc:
                log.warning(
                    "reservation %s can no longer be renewed: %s", usage.reservation.id, exc
                )
                return
            except RedCreditError as exc:
                log.warning(
                    "renewing reservation %s failed, will retry: %s", usage.reservation.id, exc
                )

    async def _close(
        self, route: Route, usage: StreamUsage, disconnected: bool, *, failed: bool, what: str
    ) -> None:
        """Settles or releases the hold once the endpoint is done, whatever cancels this task."""
        if disconnected:
            self.stats.disconnects += 1
            policy = route.on_disconnect
            amount = usage.reserved if policy == "charge_all" else usage.final_cost()
            release = policy == "refund"
        else:
            amount, release = usage.final_cost(), failed
        first_attempt = asyncio.Event()
        self._spawn(self._closing(usage, amount, release, what, first_attempt))
        # The closing runs in a task of its own: a request cancelled now
        # still has its hold closed. Only the first attempt is waited for;
        # retries during an outage go on after the response is done.
        await first_attempt.wait()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work, name="redcredit-close")
        # The loop keeps only weak references to tasks.
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _closing(
        self,
        usage: StreamUsage,
        amount: int,
        release: bool,
        what: str,
        first_attempt: asyncio.Event,
    ) -> None:
        try:
            if await self._close_now(usage, amount, release, what):
                return
        finally:
            first_attempt.set()
        for delay in _SETTLE_RETRY_DELAYS_S:
            await asyncio.sleep(delay)
            if await self._close_now(usage, amount, release, what):
                return
        self.stats.settle_failures += 1
        log.error(
            "%s: gave up closing reservation %s; its hold lapses at its deadline",
            what,
            usage.reservation.id if usage.reservation is not None else None,
        )

    async def _close_now(self, usage: StreamUsage, amount: int, release: bool, what: str) -> bool:
        """One attempt at settling or releasing; false when Redis could not be reached."""
        reservation = usage.reservation
        if reservation is None:
            return True
        try:
            if release:
                usage.settlement = await self.client.release(reservation)
                self.stats.released += 1
                return True
            # Late is fine: the work was done, so charge it as far as the balance goes.
            usage.settlement = await self.client.settle(reservation, amount, allow_late=True)
        except BackendUnavailable as exc:
            log.warning("%s: closing reservation %s failed: %s", what, reservation.id, exc)
            return False
        except RedCreditError as exc:
            # Not worth retrying, and the endpoint's own outcome must not be masked.
            self.stats.settle_failures += 1
            log.error("%s: closing reservation %s failed: %s", what, reservation.id, exc)
            return True
        self.stats.settled += 1
        if usage.settlement.uncharged:
            log.warning(
                "%s: %d of %d credits could not be charged (the balance ran out)",
                what,
                usage.settlement.uncharged,
                amount,
            )
        return True


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    # asyncio.wait, unlike awaiting the task, cannot swallow a cancellation of our own.
    await asyncio.wait({task})
