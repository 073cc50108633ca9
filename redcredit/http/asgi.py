"""An ASGI middleware that charges credits and chat messages per route: :class:`CreditGate`.

Pure ASGI (no framework needed): it answers refusals itself with RFC 9457
problem bodies, adds its headers to the application's one
``http.response.start`` message, and passes every body chunk on as it comes,
so streamed responses stay streamed. See ``docs/asgi.md``. The decisions
themselves are :class:`~redcredit.http.gatekeeper.Gatekeeper`'s.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from .. import validation as v
from ..clients.reservation import Lease, renew_until_cancelled, stop_renewing
from ..errors import BackendUnavailable, ConfigError, InvalidInput, RedCreditError
from ..results import Reservation
from ..scopes import Scope as AccountScope
from .breaker import CircuitBreaker
from .gatekeeper import Gatekeeper, KeptGate, UnidentifiedPolicy, payer
from .problems import Problem, Problems
from .routes import ASGIApp, Message, Receive, Route, Scope, Send, match_route, resolve_cost

if TYPE_CHECKING:
    from ..clients.async_client import AsyncRedCredit

__all__ = ["CreditGate", "Identify", "send_problem"]

T = TypeVar("T")

# The paying account of a request, from the app's own authentication: never
# from a raw client header unless the app chooses so.
# An account id, or the Scope (path) of a tree's member.
Payer = str | AccountScope
Identify = Callable[[Scope], Payer | Awaitable[Payer | None] | None]
IdempotencyKeyOf = Callable[[Scope], str | Awaitable[str | None] | None]
# What a stream route's endpoint reports to, as ``request.state.redcredit``.
StreamLease = Lease[Reservation | None]

log = logging.getLogger("redcredit.http.asgi")

# How long a settle that failed on a Redis outage keeps being retried, and
# how far apart. Settling is idempotent, and late settles are charged as far
# as the balance goes, so a retry can only ever charge once.
_SETTLE_RETRY_DELAYS_S = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0)


async def _maybe_await(value: T | Awaitable[T]) -> T:
    if inspect.isawaitable(value):
        return await value
    return value


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


class CreditGate(KeptGate):
    """Pure ASGI middleware charging the requests of ``routes`` to the account ``identify`` names.

    ``identify(scope)`` returns the paying account, or the ``Scope`` (path)
    of a tree's member, every level of which the call checks (or an
    awaitable of either), or ``None``: then ``unidentified="reject"`` answers 401, ``"pass"`` runs
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

    def _warming(self, receive: Receive) -> Receive:
        """At the server's startup the client learns the server (one node or a cluster).

        So the first requests do not spend their short deadline on it. Redis
        out of reach at startup is no reason to refuse to start: the routes'
        policies answer for it, and the first call tries again.
        """

        async def receive_and_warm() -> Message:
            message = await receive()
            if message.get("type") == "lifespan.startup":
                try:
                    await self.client.ready()
                except RedCreditError as exc:
                    log.warning("Redis is not reachable at startup: %s", exc)
            return message

        return receive_and_warm

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, self._warming(receive), send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = match_route(self.routes, scope["method"], scope["path"])
        if route is None:
            await self.app(scope, receive, send)
            return
        identified = await _maybe_await(self.identify(scope))
        if identified is None:
            self.stats.unidentified += 1
            if self.unidentified == "pass":
                if route.stream:
                    # The endpoint's reports go nowhere, but its code runs unchanged.
                    self._hand_over(route, scope, None)
                await self.app(scope, receive, send)
            else:
                await send_problem(send, self.keeper.problems.unidentified())
            return
        try:
            account = payer(identified)
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

    def _hand_over(
        self, route: Route, scope: Scope, reservation: Reservation | None
    ) -> StreamLease:
        """The lease the endpoint reports to, in ``scope["state"]``."""
        lease: StreamLease = Lease(reservation, self._ttl_ms[id(route)])
        scope.setdefault("state", {})["redcredit"] = lease
        return lease

    async def _once(
        self, route: Route, account: str | AccountScope, scope: Scope, receive: Receive, send: Send
    ) -> None:
        verdict = await self.keeper.spend(
            route,
            account,
            cost=await resolve_cost(route.cost, scope),
            idempotency_key=await self._key(scope),
        )
        if verdict.problem is not None:
            await send_problem(send, verdict.problem)
            return
        await self.app(scope, receive, _with_headers(send, verdict.headers))

    async def _stream(
        self, route: Route, account: str | AccountScope, scope: Scope, receive: Receive, send: Send
    ) -> None:
        amount = await resolve_cost(route.max_cost, scope)
        if amount is None:
            raise ConfigError(f"stream route {route.describe()} has no max_cost")
        what = f"{route.describe()} for {account!r}"
        verdict, reservation = await self.keeper.reserve(
            route,
            account,
            amount=amount,
            ttl=timedelta(milliseconds=self._ttl_ms[id(route)]),
            idempotency_key=await self._key(scope),
            what=what,
        )
        if verdict.problem is not None:
            await send_problem(send, verdict.problem)
            return
        lease = self._hand_over(route, scope, reservation)
        if reservation is None:
            await self.app(scope, receive, send)
            return
        watch = _StreamWatch(receive, send, verdict.headers)
        renewer = asyncio.create_task(
            renew_until_cancelled(self.client, lease), name="redcredit-renew"
        )
        try:
            await self.app(scope, watch.receive, watch.send)
        except BaseException:
            await stop_renewing(renewer)
            await self._close(route, lease, watch.disconnected, failed=True, what=what)
            raise
        await stop_renewing(renewer)
        await self._close(route, lease, watch.disconnected, failed=False, what=what)

    async def _close(
        self, route: Route, lease: StreamLease, disconnected: bool, *, failed: bool, what: str
    ) -> None:
        """Settles or releases the hold once the endpoint is done, whatever cancels this task."""
        if disconnected:
            self.stats.disconnects += 1
            policy = route.on_disconnect
            amount = lease.reserved if policy == "charge_all" else lease.final_cost()
            release = policy == "refund"
        else:
            amount, release = lease.final_cost(), failed
        first_attempt = asyncio.Event()
        self._spawn(self._closing(lease, amount, release, what, first_attempt))
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
        lease: StreamLease,
        amount: int,
        release: bool,
        what: str,
        first_attempt: asyncio.Event,
    ) -> None:
        try:
            if await self._close_now(lease, amount, release, what):
                return
        finally:
            first_attempt.set()
        for delay in _SETTLE_RETRY_DELAYS_S:
            await asyncio.sleep(delay)
            if await self._close_now(lease, amount, release, what):
                return
        self.stats.settle_failures += 1
        log.error(
            "%s: gave up closing reservation %s; its hold lapses at its deadline",
            what,
            lease.reservation.id if lease.reservation is not None else None,
        )

    async def _close_now(self, lease: StreamLease, amount: int, release: bool, what: str) -> bool:
        """One attempt at settling or releasing; false when Redis could not be reached."""
        reservation = lease.reservation
        if reservation is None:
            return True
        try:
            if release:
                lease.settlement = await self.client.release(reservation)
                self.stats.released += 1
                return True
            # Late is fine: the work was done, so charge it as far as the balance goes.
            lease.settlement = await self.client.settle(reservation, amount, allow_late=True)
        except BackendUnavailable as exc:
            log.warning("%s: closing reservation %s failed: %s", what, reservation.id, exc)
            return False
        except RedCreditError as exc:
            # Not worth retrying, and the endpoint's own outcome must not be masked.
            self.stats.settle_failures += 1
            log.error("%s: closing reservation %s failed: %s", what, reservation.id, exc)
            return True
        self.stats.settled += 1
        if lease.settlement.uncharged:
            log.warning(
                "%s: %d of %d credits could not be charged (the balance ran out)",
                what,
                lease.settlement.uncharged,
                amount,
            )
        return True
