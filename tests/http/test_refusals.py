"""A Redis that answers but refuses (OOM, READONLY, an error no retry mends) is decided by policy.

Never a 500: a ``closed`` route answers the 503 problem, an ``open`` or
shadow route lets the request through uncharged, with the middleware and
with the FastAPI dependency, whether the client coalesces calls or not.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
from fastapi import Depends, FastAPI, Request
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as Endpoint

from redcredit import AsyncRedCredit, Settings, SpendResult
from redcredit.http.asgi import CreditGate
from redcredit.http.breaker import CircuitBreaker
from redcredit.http.fastapi import add_problem_handler, gate
from redcredit.http.routes import Route, Scope
from tests.support.asgi_support import ServedApp, http
from tests.support.refusing import Refusing

ACCOUNT_HEADER = "x-test-account"
UNAVAILABLE = "urn:redcredit:problem:unavailable"

ROUTES = (
    Route("POST", "/closed", cost=1, messages=0),
    Route("POST", "/chat", cost=1, messages=1),
    Route("POST", "/stream-closed", stream=True, max_cost=5, messages=0),
    Route("POST", "/open", cost=1, messages=0, on_unavailable="open"),
    Route("POST", "/stream-open", stream=True, max_cost=5, messages=0, on_unavailable="open"),
    Route("POST", "/shadow", cost=1, messages=0, shadow=True),
)
CLOSED = ("/closed", "/chat", "/stream-closed")
PASSED = ("/open", "/stream-open", "/shadow")
# Every request meets Redis itself: no breaker opening, no deadline passing.
GATE_OPTIONS: dict[str, Any] = {
    "deadline_s": 5,
    "breaker": CircuitBreaker(failure_threshold=10_000),
}


def _identify(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == ACCOUNT_HEADER.encode():
            return str(value.decode())
    return None


def middleware_app(client: AsyncRedCredit) -> CreditGate:
    async def ok(request: StarletteRequest) -> Response:
        # A stream's endpoint gets a usage handle, gated or not; a plain one does not.
        usage = getattr(request.state, "redcredit", None)
        return JSONResponse({"gated": None if usage is None else usage.gated})

    paths = [str(route.path) for route in ROUTES]
    app = Starlette(routes=[Endpoint(path, ok, methods=["POST"]) for path in paths])
    return CreditGate(app, client=client, identify=_identify, routes=ROUTES, **GATE_OPTIONS)


def dependency_app(client: AsyncRedCredit) -> FastAPI:
    def account(request: Request) -> str | None:
        return request.headers.get(ACCOUNT_HEADER)

    closed = gate(client, identify=account, cost=1, messages=0, **GATE_OPTIONS)
    shared = {"identify": account, "cost": 1, "keeper": closed.keeper}
    chat = gate(client, messages=1, **shared)
    opened = gate(client, messages=0, on_unavailable="open", **shared)
    shadow = gate(client, messages=0, shadow=True, **shared)
    app = FastAPI()
    add_problem_handler(app)
    for path, dependency in (("/closed", closed), ("/chat", chat), ("/open", opened),
                             ("/shadow", shadow)):  # fmt: skip

        async def endpoint(spent: SpendResult | None = Depends(dependency)) -> dict[str, Any]:  # noqa: B008
            return {"gated": spent is not None}

        app.post(path)(endpoint)
    app.state.gate = closed
    return app


BUILDS = pytest.mark.parametrize(
    "build", [middleware_app, dependency_app], ids=["middleware", "dependency"]
)


@pytest.fixture
def serve() -> Iterator[Callable[..., ServedApp]]:
    started: list[ServedApp] = []

    def start(settings: Settings, build: Callable[[AsyncRedCredit], Any]) -> ServedApp:
        served = ServedApp(settings, build).__enter__()
        started.append(served)
        return served

    yield start
    for served in reversed(started):
        served.__exit__()


def _paths(build: Callable[..., Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if build is dependency_app:
        # The dependency has no streams.
        return tuple(p for p in CLOSED if "stream" not in p), tuple(
            p for p in PASSED if "stream" not in p
        )
    return CLOSED, PASSED


async def _post_all(client: httpx.AsyncClient, paths: tuple[str, ...], account: str,
                    times: int = 1) -> list[tuple[str, httpx.Response]]:  # fmt: skip
    """Every path ``times`` times, all at once: the coalescing client batches them."""
    calls = [(path, client.post(path, headers={ACCOUNT_HEADER: account}))
             for path in paths for _ in range(times)]  # fmt: skip
    answers = await asyncio.gather(*(call for _, call in calls))
    return [(path, answer) for (path, _), answer in zip(calls, answers, strict=True)]


def _assert_per_policy(closed: list[tuple[str, httpx.Response]],
                       passed: list[tuple[str, httpx.Response]]) -> None:  # fmt: skip
    for path, answer in closed:
        assert answer.status_code == 503, (path, answer.status_code, answer.text)
        assert answer.headers["content-type"] == "application/problem+json"
        assert int(answer.headers["retry-after"]) >= 1
        assert answer.json()["type"] == UNAVAILABLE
    for path, answer in passed:
        assert answer.status_code == 200, (path, answer.status_code, answer.text)
        # Let through uncharged (a shadow route too, as it never refuses): no hold, no balance.
        assert answer.json()["gated"] is not True, path
        assert "x-credits-remaining" not in answer.headers, path


@BUILDS
@pytest.mark.parametrize("batch", [128, 1], ids=["coalesced", "one-at-a-time"])
async def test_a_refusing_redis_is_answered_per_policy(
    refusing_redis: Refusing,
    settings: Settings,
    serve: Callable[..., ServedApp],
    caplog: pytest.LogCaptureFixture,
    build: Callable[[AsyncRedCredit], Any],
    batch: int,
) -> None:
    own = settings.model_copy(update={"redis_url": refusing_redis.url, "pipeline_max_batch": batch})
    served = serve(own, build)
    closed_paths, passed_paths = _paths(build)
    caplog.set_level(logging.WARNING, logger="redcredit")
    async with http(served.url) as client:
        healthy = await client.post("/closed", headers={ACCOUNT_HEADER: "warm"})
        assert healthy.status_code == 200
        with refusing_redis.refusing():
            closed = [
                *await _post_all(client, closed_paths, "warm"),
                *await _post_all(client, closed_paths, "new", times=4),
            ]
            passed = [
                *await _post_all(client, passed_paths, "warm"),
                *await _post_all(client, passed_paths, "new", times=4),
            ]
    _assert_per_policy(closed, passed)
    stats = served.app.state.gate.stats if build is dependency_app else served.app.stats
    assert stats.unavailable == len(closed)
    assert stats.ungated == len(passed)
    said = f"Redis refused the call for now: {refusing_redis.kind}"
    assert any(said in record.getMessage() for record in caplog.records), caplog.records


@BUILDS
async def test_an_error_no_retry_mends_is_answered_per_policy_too(
    settings: Settings,
    serve: Callable[..., ServedApp],
    redis_client: redis.Redis,
    build: Callable[[AsyncRedCredit], Any],
) -> None:
    served = serve(settings, build)
    closed_paths, passed_paths = _paths(build)
    async with AsyncRedCredit(settings=settings) as arc:
        spoilt = arc.engine.keys.for_account("spoilt")
    # A string where the account's hash belongs: every script on it fails WRONGTYPE.
    redis_client.set(spoilt.hash, "not a hash")
    async with http(served.url) as client:
        closed = await _post_all(client, closed_paths, "spoilt")
        passed = await _post_all(client, passed_paths, "spoilt")
    _assert_per_policy(closed, passed)
