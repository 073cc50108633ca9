"""Gating one FastAPI endpoint: ``Depends(gate(client, feature="chat", identify=current_account))``.

Needs the ``fastapi`` extra (``pip install 'redcredit[fastapi]'``); the rest
of redcredit never imports this module. The dependency charges before the
endpoint runs, with the same decisions, problem bodies and headers as
:class:`redcredit.http.asgi.CreditGate`; call :func:`add_problem_handler` once so
refusals are answered as ``application/problem+json``. Streamed responses
are gated by the middleware, which settles after the last chunk.

``identify`` is itself a FastAPI dependency (it may take ``Request``, or
depend on your authentication) returning the paying account or ``None``.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

try:
    from fastapi import Depends, FastAPI, HTTPException, Request, Response
except ImportError as exc:  # pragma: no cover - only without the extra
    raise ImportError(
        "redcredit.http.fastapi needs FastAPI: pip install 'redcredit[fastapi]'"
    ) from exc

from ..clients.async_client import AsyncRedCredit
from ..errors import ConfigError
from ..results import SpendResult
from ..scopes import Scope as AccountScope
from .breaker import CircuitBreaker
from .gatekeeper import Gatekeeper, KeptGate, UnidentifiedPolicy
from .problems import Problem, Problems
from .routes import CostSpec, Route, Scope, UnavailablePolicy, resolve_cost

__all__ = ["CreditDependency", "ProblemException", "add_problem_handler", "gate"]

_ANY_PATH = re.compile(".*")


class ProblemException(HTTPException):
    """A refusal, as an HTTPException carrying its RFC 9457 problem.

    Without :func:`add_problem_handler` FastAPI still answers with its status
    and headers, the problem wrapped in ``{"detail": ...}``.
    """

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.status, detail=dict(problem.body), headers=dict(problem.headers))
        self.problem = problem


async def _problem_response(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, ProblemException):
        raise exc
    problem = exc.problem
    return Response(
        content=problem.content(),
        status_code=problem.status,
        headers=dict(problem.all_headers()),
    )


def add_problem_handler(app: FastAPI) -> None:
    """Answers :class:`ProblemException` with its ``application/problem+json`` body."""
    app.add_exception_handler(ProblemException, _problem_response)


class CreditDependency(KeptGate):
    """A FastAPI dependency: a chat turn (``messages`` > 0) or a spend before the endpoint.

    Refusals raise :class:`ProblemException` (402, 429, or 503 / 401 per the
    policies). On success the ``X-Credits-Remaining`` and ``RateLimit``
    headers are set, and the dependency's value is the
    :class:`~redcredit.results.SpendResult`. Pass one ``keeper`` to several
    dependencies (or a middleware's ``gate.keeper``) to share one breaker and
    one set of counters. ``idempotency_key(scope)``, if given, keys the
    charge, as with the middleware. ``stats`` and ``breaker`` are its
    gatekeeper's.
    """

    def __init__(
        self,
        client: AsyncRedCredit,
        *,
        identify: Callable[..., Any],
        feature: str | None = None,
        cost: CostSpec | None = None,
        messages: int = 1,
        shadow: bool = False,
        on_unavailable: UnavailablePolicy = "closed",
        unidentified: UnidentifiedPolicy = "reject",
        keeper: Gatekeeper | None = None,
        deadline_s: float = 0.05,
        breaker: CircuitBreaker | None = None,
        problems: Problems | None = None,
        idempotency_key: Callable[[Scope], str | None] | None = None,
    ) -> None:
        if unidentified not in ("reject", "pass"):
            raise ConfigError(f"unidentified must be 'reject' or 'pass', not {unidentified!r}")
        # The route's own checks: priced by feature or cost, and something to charge.
        self.route = Route(
            "*",
            _ANY_PATH,
            feature=feature,
            cost=cost,
            messages=messages,
            shadow=shadow,
            on_unavailable=on_unavailable,
        )
        if feature is not None and feature not in client.settings.costs:
            raise ConfigError(f"feature {feature!r} is not in the cost table")
        self.unidentified = unidentified
        self.idempotency_key = idempotency_key
        self.keeper = (
            keeper
            if keeper is not None
            else Gatekeeper(client, deadline_s=deadline_s, breaker=breaker, problems=problems)
        )
        # FastAPI reads the parameters it injects from the signature; the
        # account comes from the app's own dependency.
        parameter = inspect.Parameter.POSITIONAL_OR_KEYWORD
        self.__signature__ = inspect.Signature(
            [
                inspect.Parameter("request", parameter, annotation=Request),
                inspect.Parameter("response", parameter, annotation=Response),
                inspect.Parameter(
                    "account", parameter, default=Depends(identify), annotation=str | None
                ),
            ]
        )

    async def __call__(
        self, request: Request, response: Response, account: str | AccountScope | None
    ) -> SpendResult | None:
        """The spend's result; ``None`` when the request went through uncharged."""
        keeper, route = self.keeper, self.route
        if account is None:
            keeper.stats.unidentified += 1
            if self.unidentified == "pass":
                return None
            raise ProblemException(keeper.problems.unidentified())
        verdict = await keeper.spend(
            route,
            account,
            cost=await resolve_cost(route.cost, request.scope),
            idempotency_key=(
                None if self.idempotency_key is None else self.idempotency_key(request.scope)
            ),
            what=f"{request.method} {request.url.path} for {account!r}",
        )
        if verdict.problem is not None:
            raise ProblemException(verdict.problem)
        for name, value in verdict.headers:
            response.headers[name] = value
        return verdict.result


# The name endpoints use: ``Depends(gate(client, identify=..., feature="chat"))``.
gate = CreditDependency
