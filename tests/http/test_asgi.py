"""The ASGI middleware and the FastAPI dependency, served by a real uvicorn over loopback.

Every test charges real accounts in the test's Redis (under its own key
prefix) and talks HTTP to the server with httpx, streaming where the
endpoint streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi import Depends, FastAPI, Request
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route as Endpoint

from redcredit import AsyncRedCredit, Settings, SpendResult, config
from redcredit.http.asgi import CreditGate
from redcredit.http.breaker import CircuitBreaker
from redcredit.http.fastapi import add_problem_handler, gate
from redcredit.http.problems import Problems
from redcredit.http.routes import Route, Scope
from redcredit.servers.spawn import free_port
from tests.support.asgi_support import (
    KILLED_ACCOUNT,
    KILLED_MAX_COST,
    KILLED_TTL_S,
    ServedApp,
    eventually,
    http,
)

ROOT = Path(__file__).resolve().parents[2]
ACCOUNT_HEADER = "x-test-account"
PROBLEM = "urn:redcredit:problem:"


def as_account(account: str) -> dict[str, str]:
    return {ACCOUNT_HEADER: account}


def identify(scope: Scope) -> str | None:
    """The test app's stand-in for authentication."""
    for name, value in scope["headers"]:
        if name == ACCOUNT_HEADER.encode():
            return str(value.decode())
    return None


async def identify_async(scope: Scope) -> str | None:
    await asyncio.sleep(0)
    return identify(scope)


ROUTES = (
    Route("POST", "/chat", cost=3, messages=1),
    Route("POST", "/image", feature="image", messages=0),
    Route("POST", "/stream", feature="chat", stream=True, max_cost=50, messages=0, stream_ttl=30),
    Route("POST", "/chat-stream", stream=True, max_cost=50, messages=1),
    Route("POST", "/hang/charge_used", stream=True, max_cost=50, messages=0),
    Route("POST", "/hang/charge_all", stream=True, max_cost=50, messages=0, on_disconnect="charge_all"),
    Route("POST", "/hang/refund", stream=True, max_cost=50, messages=0, on_disconnect="refund"),
    Route("POST", "/boom", stream=True, max_cost=20, messages=0),
    Route("POST", "/boom-mid", stream=True, max_cost=20, messages=0),
    Route("POST", "/held", stream=True, max_cost=20, messages=0),
    Route("POST", "/slow", stream=True, max_cost=40, messages=0, stream_ttl=1),
    Route("POST", "/shadow", cost=500, messages=0, shadow=True),
    Route("POST", "/closed", cost=1, messages=0),
    Route("POST", "/open", cost=1, messages=0, on_unavailable="open"),
    Route("POST", "/stream-closed", stream=True, max_cost=5, messages=0),
    Route("POST", "/stream-open", stream=True, max_cost=5, messages=0, on_unavailable="open"),
)  # fmt: skip


def starlette_app() -> Starlette:
    """Endpoints for every route above, plus ``/free`` and ``/release`` that no route gates."""
    events: dict[str, Any] = {"started": False, "release": asyncio.Event()}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        events["started"] = True
        yield

    async def ok(request: StarletteRequest) -> Response:
        return JSONResponse({"ok": True})

    async def stream(request: StarletteRequest) -> Response:
        usage = request.state.redcredit
        chunks = int(request.query_params.get("chunks", "10"))
        per = request.query_params.get("per")

        async def body() -> AsyncIterator[bytes]:
            for i in range(chunks):
                if per is not None:
                    usage.add(int(per))
                yield f"chunk {i}\n".encode()

        return StreamingResponse(body(), media_type="text/plain")

    async def hang(request: StarletteRequest) -> Response:
        usage = request.state.redcredit

        async def body() -> AsyncIterator[bytes]:
            usage.add(5)
            yield b"first\n"
            await asyncio.sleep(30)
            yield b"never\n"

        return StreamingResponse(body(), media_type="text/plain")

    async def boom(request: StarletteRequest) -> Response:
        raise RuntimeError("the model fell over")

    async def boom_mid(request: StarletteRequest) -> Response:
        usage = request.state.redcredit

        async def body() -> AsyncIterator[bytes]:
            usage.add(2)
            yield b"first\n"
            await asyncio.sleep(0.05)
            raise RuntimeError("the model fell over mid-stream")

        return StreamingResponse(body(), media_type="text/plain")

    async def held(request: StarletteRequest) -> Response:
        """Sends one chunk, waits for ``/release``, then sends 200 more."""
        events["release"].clear()

        async def body() -> AsyncIterator[bytes]:
            yield b"first\n"
            await asyncio.wait_for(events["release"].wait(), 10)
            for i in range(200):
                yield f"more {i}\n".encode()

        return StreamingResponse(body(), media_type="text/plain")

    async def slow(request: StarletteRequest) -> Response:
        """Streams for 2.5 s, longer than its one-second lease."""
        usage = request.state.redcredit

        async def body() -> AsyncIterator[bytes]:
            for i in range(25):
                usage.add(1)
                yield f"tick {i}\n".encode()
                await asyncio.sleep(0.1)

        return StreamingResponse(body(), media_type="text/plain")

    async def release(request: StarletteRequest) -> Response:
        events["release"].set()
        return PlainTextResponse("released")

    async def usage_info(request: StarletteRequest) -> Response:
        usage = request.state.redcredit
        usage.set(1)
        return JSONResponse({"gated": usage.gated, "reserved": usage.reserved})

    async def free(request: StarletteRequest) -> Response:
        return PlainTextResponse("free")

    app = Starlette(
        routes=[
            *(Endpoint(path, ok, methods=["POST"]) for path in ("/chat", "/image", "/shadow")),
            *(Endpoint(path, ok, methods=["POST"]) for path in ("/closed", "/open")),
            Endpoint("/stream", stream, methods=["POST"]),
            Endpoint("/chat-stream", stream, methods=["POST"]),
            Endpoint("/hang/{policy}", hang, methods=["POST"]),
            Endpoint("/boom", boom, methods=["POST"]),
            Endpoint("/boom-mid", boom_mid, methods=["POST"]),
            Endpoint("/held", held, methods=["POST"]),
            Endpoint("/slow", slow, methods=["POST"]),
            Endpoint("/release", release, methods=["POST"]),
            Endpoint("/stream-closed", usage_info, methods=["POST"]),
            Endpoint("/stream-open", usage_info, methods=["POST"]),
            Endpoint("/free", free),
        ],
        lifespan=lifespan,
    )
    app.state.events = events
    return app


def build_gate(client: AsyncRedCredit, **options: Any) -> CreditGate:
    options.setdefault("identify", identify)
    options.setdefault("routes", ROUTES)
    return CreditGate(starlette_app(), client=client, **options)


@pytest.fixture
def serve() -> Iterator[Callable[..., ServedApp]]:
    """``serve(settings, build)`` starts uvicorn in a thread; all stop at teardown."""
    started: list[ServedApp] = []

    def start(
        settings: Settings, build: Callable[[AsyncRedCredit], Any], **options: Any
    ) -> ServedApp:
        served = ServedApp(settings, build, **options).__enter__()
        started.append(served)
        return served

    yield start
    for served in reversed(started):
        served.__exit__()


@pytest.fixture
def served(settings: Settings, serve: Callable[..., ServedApp]) -> ServedApp:
    return serve(settings, build_gate, lifespan="on")


async def held_and_credits(arc: AsyncRedCredit, account: str) -> tuple[int, int]:
    balance = await arc.balance(account)
    return balance.held, balance.credits


async def settles_to(arc: AsyncRedCredit, account: str, credits: int) -> None:
    """Waits for the hold to close (the settle runs after the last byte went out)."""

    async def settled() -> bool:
        return await held_and_credits(arc, account) == (0, credits)

    await eventually(settled)


# --- plain routes -------------------------------------------------------------------------------


async def test_chat_turn_succeeds_with_headers(served: ServedApp, arc: AsyncRedCredit) -> None:
    async with http(served.url) as client:
        response = await client.post("/chat", headers=as_account("alice"))
    assert response.status_code == 200
    assert response.json() == {"ok": True}
    assert response.headers["x-credits-remaining"] == "97"
    assert response.headers["x-chat-messages-remaining"] == "9"
    # No rate limits configured: no RateLimit fields.
    assert "ratelimit" not in response.headers
    assert "ratelimit-policy" not in response.headers
    balance = await arc.balance("alice")
    assert (balance.credits, balance.chat_messages) == (97, 9)
    assert served.app.stats.allowed == 1


async def test_spend_route_and_unlimited_plan(served: ServedApp, arc: AsyncRedCredit) -> None:
    await arc.set_plan("paid-user", "paid")
    async with http(served.url) as client:
        priced = await client.post("/image", headers=as_account("bob"))
        unlimited = await client.post("/image", headers=as_account("paid-user"))
    assert priced.headers["x-credits-remaining"] == "90"
    # A spend (messages=0) touches no chat messages and says nothing about them.
    assert "x-chat-messages-remaining" not in priced.headers
    assert unlimited.headers["x-credits-remaining"] == "unlimited"
    assert (await arc.balance("bob")).chat_messages == 10


async def test_insufficient_credits_is_402_problem(served: ServedApp, arc: AsyncRedCredit) -> None:
    await arc.correct("carol", -95)
    async with http(served.url) as client:
        response = await client.post("/image", headers=as_account("carol"))
    assert response.status_code == 402
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["cache-control"] == "no-store"
    assert response.json() == {
        "type": PROBLEM + "insufficient-credits",
        "title": "Insufficient credits",
        "status": 402,
        "detail": "This request needs 10 credits; 5 are available.",
        "balance": {
            "resource": "credits",
            "required": 10,
            "available": 5,
            "account": "carol",
            "level": "carol",
        },
    }
    assert (await arc.balance("carol")).credits == 5
    assert served.app.stats.refused == 1


async def test_no_chat_messages_is_402_problem(served: ServedApp, arc: AsyncRedCredit) -> None:
    await arc.correct("dave", chat_messages=-10)
    async with http(served.url) as client:
        response = await client.post("/chat", headers=as_account("dave"))
    assert response.status_code == 402
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json() == {
        "type": PROBLEM + "insufficient-chat-messages",
        "title": "No chat messages left",
        "status": 402,
        "detail": "This request needs 1 chat messages; 0 are left.",
        "balance": {
            "resource": "chat_messages",
            "required": 1,
            "available": 0,
            "account": "dave",
            "level": "dave",
        },
    }
    # The turn's credits were not spent either.
    assert (await arc.balance("dave")).credits == 100


async def test_problem_statuses_titles_and_type_are_configurable(
    settings: Settings, serve: Callable[..., ServedApp], arc: AsyncRedCredit
) -> None:
    problems = Problems(
        base_uri="https://api.example.com/problems/",
        statuses={"insufficient-credits": 403},
        titles={"insufficient-credits": "Top up first"},
    )
    served = serve(settings, lambda client: build_gate(client, problems=problems))
    await arc.correct("erin", -100)
    async with http(served.url) as client:
        response = await client.post("/image", headers=as_account("erin"))
    assert response.status_code == 403
    body = response.json()
    assert (body["type"], body["title"], body["status"]) == (
        "https://api.example.com/problems/insufficient-credits",
        "Top up first",
        403,
    )


async def test_unidentified_requests(
    settings: Settings, serve: Callable[..., ServedApp], arc: AsyncRedCredit
) -> None:
    rejecting = serve(settings, build_gate)
    passing = serve(settings, lambda client: build_gate(client, unidentified="pass"))
    async with http(rejecting.url) as client:
        refused = await client.post("/chat")
        # A route no Route matches is not gated at all.
        free = await client.get("/free")
    async with http(passing.url) as client:
        let_through = await client.post("/chat")
        # A stream's endpoint still finds its usage handle, holding nothing.
        stream = await client.post("/stream-closed")
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == "Bearer"
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["type"] == PROBLEM + "unidentified"
    assert (free.status_code, free.text) == (200, "free")
    assert let_through.status_code == 200
    assert "x-credits-remaining" not in let_through.headers
    assert stream.json() == {"gated": False, "reserved": 0}
    assert (rejecting.app.stats.unidentified, passing.app.stats.unidentified) == (1, 2)


async def test_async_identify_and_idempotency_key(
    settings: Settings, serve: Callable[..., ServedApp], arc: AsyncRedCredit
) -> None:
    def key_of(scope: Scope) -> str | None:
        return dict(scope["headers"]).get(b"idempotency-key", b"").decode() or None

    served = serve(
        settings,
        lambda client: build_gate(client, identify=identify_async, idempotency_key=key_of),
    )
    headers = {**as_account("frank"), "idempotency-key": "req-1"}
    async with http(served.url) as client:
        first = await client.post("/image", headers=headers)
        retried = await client.post("/image", headers=headers)
        reused = await client.post("/chat", headers=headers)  # the key, for another request
    assert first.status_code == retried.status_code == 200
    # The retry replays the first charge.
    assert first.headers["x-credits-remaining"] == retried.headers["x-credits-remaining"] == "90"
    assert reused.status_code == 409
    assert reused.json()["type"] == PROBLEM + "idempotency-conflict"
    assert served.app.stats.conflicts == 1
    assert (await arc.balance("frank")).credits == 90


async def test_shadow_route_never_refuses(served: ServedApp, arc: AsyncRedCredit) -> None:
    async with http(served.url) as client:
        response = await client.post("/shadow", headers=as_account("gina"))
    assert response.status_code == 200
    assert served.app.stats.shadow_refusals == 1
    assert (await arc.balance("gina")).credits == 100


async def test_lifespan_passes_through(served: ServedApp) -> None:
    # uvicorn ran with lifespan="on": startup went through the gate to the app.
    assert served.app.app.state.events["started"] is True


async def test_non_http_scopes_pass_through_untouched(arc: AsyncRedCredit) -> None:
    seen: list[tuple[Scope, Any, Any]] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        seen.append((scope, receive, send))

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: Any) -> None:
        pass

    gate_ = CreditGate(app, client=arc, identify=identify, routes=[Route("*", "/{any:path}")])
    for scope in ({"type": "lifespan"}, {"type": "websocket", "path": "/chat", "headers": []}):
        await gate_(scope, receive, send)
    assert [s["type"] for s, _, _ in seen] == ["lifespan", "websocket"]
    assert all(s is send for _, _, s in seen)
    assert seen[1][1] is receive
    # The lifespan's messages reach the app as they came; at startup the client is made ready.
    assert await seen[0][1]() == {"type": "lifespan.startup"}
    assert arc.topology.is_cluster is False


async def test_one_start_message_and_every_chunk_in_order(arc: AsyncRedCredit) -> None:
    sent: list[dict[str, Any]] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-app", b"1")]})
        for i in range(100):
            await send({"type": "http.response.body", "body": b"%d" % i, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    gate_ = CreditGate(app, client=arc, identify=identify, routes=ROUTES)
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/chat",
        "headers": [(ACCOUNT_HEADER.encode(), b"hank")],
        "query_string": b"",
    }
    await gate_(scope, receive, send)
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1
    assert dict(starts[0]["headers"]) == {
        b"x-app": b"1",
        b"x-credits-remaining": b"97",
        b"x-chat-messages-remaining": b"9",
    }
    assert [m["body"] for m in sent[1:]] == [b"%d" % i for i in range(100)] + [b""]


# --- rate limits ----------------------------------------------------------------------------------

LimitSettings = getattr(config, "LimitSettings", None)


@pytest.mark.skipif(LimitSettings is None, reason="rate limits have not landed")
async def test_rate_limit_headers_then_429_with_retry_after(
    settings: Settings, serve: Callable[..., ServedApp], arc: AsyncRedCredit
) -> None:
    assert LimitSettings is not None
    free = config.PlanSettings(
        limits=(
            LimitSettings(name="per_minute", rate=1, period=timedelta(minutes=1)),
            LimitSettings(name="per_hour", rate=100, period=timedelta(hours=1)),
        )
    )
    limited = settings.model_copy(update={"plans": {**settings.plans, "free": free}})
    served = serve(limited, build_gate)
    async with http(served.url) as client:
        first = await client.post("/chat", headers=as_account("ivy"))
        second = await client.post("/chat", headers=as_account("ivy"))
    assert first.status_code == 200
    # The most restrictive limit: none left of one per minute.
    assert first.headers["ratelimit-policy"] == '"per_minute";q=1;w=60'
    name, remaining, reset = first.headers["ratelimit"].split(";")
    assert (name, remaining) == ('"per_minute"', "r=0")
    assert 59 <= int(reset.removeprefix("t=")) <= 60
    assert second.status_code == 429
    assert second.headers["content-type"] == "application/problem+json"
    body = second.json()
    wait_ms = body["rate_limit"]["retry_after_ms"]
    assert 58_000 < wait_ms <= 60_000
    # Whole seconds, rounded up, from the server's own figure.
    assert second.headers["retry-after"] == str(math.ceil(wait_ms / 1000))
    assert body == {
        "type": PROBLEM + "rate-limited",
        "title": "Rate limit exceeded",
        "status": 429,
        "detail": f"The 'per_minute' rate limit is exhausted; retry in {math.ceil(wait_ms / 1000)} s.",
        "rate_limit": {
            "name": "per_minute",
            "retry_after_ms": wait_ms,
            "account": "ivy",
            "level": "ivy",
        },
    }
    # The refused turn spent nothing.
    balance = await arc.balance("ivy")
    assert (balance.credits, balance.chat_messages) == (97, 9)
    assert served.app.stats.rate_limited == 1


# --- streams --------------------------------------------------------------------------------------


async def test_stream_settles_reported_usage(served: ServedApp, arc: AsyncRedCredit) -> None:
    async with (
        http(served.url) as client,
        client.stream(
            "POST", "/stream", params={"chunks": 10, "per": 2}, headers=as_account("jack")
        ) as response,
    ):
        body = b"".join([chunk async for chunk in response.aiter_raw()])
    assert response.status_code == 200
    assert body == b"".join(b"chunk %d\n" % i for i in range(10))
    await settles_to(arc, "jack", 80)
    assert served.app.stats.settled == 1


async def test_stream_that_reports_nothing_pays_its_reservation(
    served: ServedApp, arc: AsyncRedCredit
) -> None:
    async with http(served.url) as client:
        response = await client.post("/stream", params={"chunks": 3}, headers=as_account("kate"))
    assert response.status_code == 200
    await settles_to(arc, "kate", 50)


async def test_streamed_chat_turn_spends_its_message(
    served: ServedApp, arc: AsyncRedCredit
) -> None:
    async with http(served.url) as client:
        response = await client.post(
            "/chat-stream", params={"chunks": 4, "per": 1}, headers=as_account("liam")
        )
    assert response.status_code == 200
    await settles_to(arc, "liam", 96)
    assert (await arc.balance("liam")).chat_messages == 9


async def test_stream_refused_when_the_reservation_cannot_be_held(
    served: ServedApp, arc: AsyncRedCredit
) -> None:
    await arc.correct("mia", -60)
    async with http(served.url) as client:
        response = await client.post("/stream", headers=as_account("mia"))
    assert response.status_code == 402
    assert response.json()["balance"] == {
        "resource": "credits",
        "required": 50,
        "available": 40,
        "account": "mia",
        "level": "mia",
    }


async def test_stream_chunks_arrive_before_the_stream_ends(served: ServedApp) -> None:
    async with (
        http(served.url) as client,
        http(served.url) as other,
        client.stream("POST", "/held", headers=as_account("noah")) as response,
    ):
        chunks = response.aiter_raw()
        # The endpoint sends nothing more until /release: a buffering
        # middleware would never deliver this first chunk.
        first = await asyncio.wait_for(anext(chunks), 5)
        assert first == b"first\n"
        assert (await other.post("/release")).status_code == 200
        rest = b"".join([chunk async for chunk in chunks])
    assert rest == b"".join(b"more %d\n" % i for i in range(200))


async def test_lease_is_renewed_while_the_response_streams(
    served: ServedApp, arc: AsyncRedCredit
) -> None:
    held_late = None
    async with (
        http(served.url) as client,
        client.stream("POST", "/slow", headers=as_account("rose")) as response,
    ):
        async for chunk in response.aiter_lines():
            if chunk == "tick 20":
                # Two seconds in: a one-second lease that was not renewed would have lapsed.
                held_late = (await arc.balance("rose")).held
    assert held_late == 40
    await settles_to(arc, "rose", 75)


@pytest.mark.parametrize(
    ("policy", "credits"), [("charge_used", 95), ("charge_all", 50), ("refund", 100)]
)
async def test_client_disconnect_mid_stream(
    served: ServedApp, arc: AsyncRedCredit, policy: str, credits: int
) -> None:
    account = f"leaver-{policy}"
    async with (
        http(served.url) as client,
        client.stream("POST", f"/hang/{policy}", headers=as_account(account)) as response,
    ):
        # Held on to: a dropped iterator would close the response at once.
        chunks = response.aiter_raw()
        assert await anext(chunks) == b"first\n"
        assert (await arc.balance(account)).held == 50
        # Leaving the block closes the connection mid-stream.
    await settles_to(arc, account, credits)
    assert served.app.stats.disconnects == 1


async def test_endpoint_exception_releases_the_hold(served: ServedApp, arc: AsyncRedCredit) -> None:
    async with http(served.url) as client:
        response = await client.post("/boom", headers=as_account("olga"))
    assert response.status_code == 500
    async with http(served.url) as client:
        # After the first chunk the server can only break the connection.
        with pytest.raises(httpx.TransportError):
            await client.post("/boom-mid", headers=as_account("olga"))
    await settles_to(arc, "olga", 100)
    assert served.app.stats.released == 2


# --- Redis outages --------------------------------------------------------------------------------


async def timed_post(client: httpx.AsyncClient, path: str, account: str) -> httpx.Response:
    started = time.perf_counter()
    response = await client.post(path, headers=as_account(account))
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5, f"{path} took {elapsed:.3f} s"
    return response


async def answers_per_policy(served: ServedApp, client: httpx.AsyncClient) -> None:
    for path in ("/closed", "/stream-closed"):
        refused = await timed_post(client, path, "pat")
        assert refused.status_code == 503
        assert refused.headers["content-type"] == "application/problem+json"
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["type"] == PROBLEM + "unavailable"
    assert (await timed_post(client, "/open", "pat")).json() == {"ok": True}
    # The stream's endpoint still gets a usage handle, holding nothing.
    assert (await timed_post(client, "/stream-open", "pat")).json() == {
        "gated": False,
        "reserved": 0,
    }


async def test_redis_outage_is_decided_by_policy_within_the_deadline(
    settings: Settings,
    serve: Callable[..., ServedApp],
    redis_factory: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    redis_server = redis_factory()
    own = settings.model_copy(
        update={
            "redis_url": redis_server.url,
            # Far longer than any answer may take: only the gate's deadline can be met.
            "redis_socket_timeout": timedelta(seconds=5),
            "redis_connect_timeout": timedelta(seconds=5),
        }
    )
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=0.3)
    served = serve(own, lambda client: build_gate(client, breaker=breaker))
    caplog.set_level(logging.WARNING, logger="redcredit.http.asgi")

    async def gated_again() -> bool:
        return (await client.post("/closed", headers=as_account("pat"))).status_code == 200

    async with http(served.url) as client:
        assert (await client.post("/closed", headers=as_account("pat"))).status_code == 200
        # A hung Redis: connections are accepted, nothing is answered.
        os.kill(redis_server.pid, signal.SIGSTOP)
        try:
            await answers_per_policy(served, client)
            assert breaker.state == "open"
            # Open: decided without calling Redis at all.
            await answers_per_policy(served, client)
        finally:
            os.kill(redis_server.pid, signal.SIGCONT)
        await eventually(gated_again)
        assert breaker.state == "closed"

        # A stopped Redis, then started again on the same port.
        redis_server.stop()
        await answers_per_policy(served, client)
        redis_server.start()
        await eventually(gated_again)

    stats = served.app.stats
    assert stats.ungated == 6
    # The rest were polls for the recovery.
    assert stats.unavailable >= 6
    assert any("ungated" in record.getMessage() for record in caplog.records)
    assert all(record.levelno == logging.WARNING for record in caplog.records)


async def test_redis_out_of_memory_is_decided_by_policy(
    settings: Settings, serve: Callable[..., ServedApp], redis_factory: Callable[..., Any]
) -> None:
    redis_server = redis_factory()
    served = serve(settings.model_copy(update={"redis_url": redis_server.url}), build_gate)
    control = redis.Redis.from_url(redis_server.url)
    try:
        async with http(served.url) as client:
            assert (await client.post("/closed", headers=as_account("oom"))).status_code == 200
            control.config_set("maxmemory", 1)
            try:
                await answers_per_policy(served, client)
            finally:
                control.config_set("maxmemory", 0)
    finally:
        control.close()
    assert served.app.stats.ungated == 2


# --- a server killed mid-stream -------------------------------------------------------------------


async def test_hold_of_a_killed_server_lapses_at_its_deadline(
    settings: Settings, arc: AsyncRedCredit
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "REDCREDIT_REDIS_URL": settings.redis_url or "",
        "REDCREDIT_KEY_PREFIX": settings.key_prefix,
        "REDCREDIT_FREE_CREDITS": "100",
    }
    command = [sys.executable, "-m", "uvicorn", "tests.support.asgi_app:app", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--log-level", "warning", "--ws", "none"]
    server = await asyncio.create_subprocess_exec(*command, cwd=ROOT, env=env)
    try:
        async with http(f"http://127.0.0.1:{port}") as client:

            async def up() -> bool:
                with contextlib.suppress(httpx.TransportError):
                    return (await client.get("/health")).status_code == 200
                return False

            await eventually(up, within=20)
            async with client.stream("POST", "/stream") as response:
                ticks = response.aiter_raw()
                await anext(ticks)
                await anext(ticks)
                assert (await arc.balance(KILLED_ACCOUNT)).held == KILLED_MAX_COST
                server.send_signal(signal.SIGKILL)
                await server.wait()
                killed_at = time.monotonic()
        # Nothing of ours runs any more; the hold still counts until its deadline.
        assert (await arc.balance(KILLED_ACCOUNT)).held == KILLED_MAX_COST

        async def lapsed() -> bool:
            return (await arc.balance(KILLED_ACCOUNT)).held == 0

        await eventually(lapsed, within=KILLED_TTL_S + 2)
        # Renewed every third of the TTL, so the deadline was at most one TTL away.
        assert time.monotonic() - killed_at <= KILLED_TTL_S + 0.3
        # Never settled, so never charged.
        assert (await arc.balance(KILLED_ACCOUNT)).credits == 100
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()


# --- FastAPI --------------------------------------------------------------------------------------


def fastapi_app(client: AsyncRedCredit, **options: Any) -> FastAPI:
    def account(request: Request) -> str | None:
        return request.headers.get(ACCOUNT_HEADER)

    chat = gate(client, identify=account, cost=3, messages=1, **options)
    image = gate(client, identify=account, feature="image", messages=0, keeper=chat.keeper)
    open_image = gate(
        client, identify=account, feature="image", messages=0, on_unavailable="open",
        keeper=chat.keeper,
    )  # fmt: skip
    app = FastAPI()
    add_problem_handler(app)

    @app.post("/chat")
    async def chat_endpoint(spent: SpendResult | None = Depends(chat)) -> dict[str, Any]:  # noqa: B008
        return {"credits": spent.credits_remaining if spent else None}

    @app.post("/image")
    async def image_endpoint(spent: SpendResult | None = Depends(image)) -> dict[str, Any]:  # noqa: B008
        return {"credits": spent.credits_remaining if spent else None}

    @app.post("/open-image")
    async def open_endpoint(spent: SpendResult | None = Depends(open_image)) -> dict[str, Any]:  # noqa: B008
        return {"credits": spent.credits_remaining if spent else None}

    app.state.gate = chat
    return app


async def test_fastapi_dependency(
    settings: Settings, serve: Callable[..., ServedApp], arc: AsyncRedCredit
) -> None:
    served = serve(settings, fastapi_app)
    await arc.correct("rita", -95)
    async with http(served.url) as client:
        turn = await client.post("/chat", headers=as_account("quinn"))
        refused = await client.post("/image", headers=as_account("rita"))
        unidentified = await client.post("/chat")
    assert turn.status_code == 200
    assert turn.json() == {"credits": 97}
    assert turn.headers["x-credits-remaining"] == "97"
    assert turn.headers["x-chat-messages-remaining"] == "9"
    assert refused.status_code == 402
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json() == {
        "type": PROBLEM + "insufficient-credits",
        "title": "Insufficient credits",
        "status": 402,
        "detail": "This request needs 10 credits; 5 are available.",
        "balance": {
            "resource": "credits",
            "required": 10,
            "available": 5,
            "account": "rita",
            "level": "rita",
        },
    }
    assert unidentified.status_code == 401
    assert unidentified.headers["www-authenticate"] == "Bearer"
    stats = served.app.state.gate.stats
    assert (stats.allowed, stats.refused, stats.unidentified) == (1, 1, 1)


async def test_fastapi_dependency_when_redis_is_gone(
    settings: Settings, serve: Callable[..., ServedApp], redis_factory: Callable[..., Any]
) -> None:
    redis_server = redis_factory()
    own = settings.model_copy(update={"redis_url": redis_server.url})
    served = serve(own, fastapi_app)
    async with http(served.url) as client:
        assert (await client.post("/image", headers=as_account("sam"))).status_code == 200
        redis_server.stop()
        closed = await timed_post(client, "/image", "sam")
        opened = await timed_post(client, "/open-image", "sam")
    assert closed.status_code == 503
    assert closed.headers["content-type"] == "application/problem+json"
    assert closed.headers["retry-after"] == "1"
    assert json.loads(closed.content)["type"] == PROBLEM + "unavailable"
    assert (opened.status_code, opened.json()) == (200, {"credits": None})
    assert served.app.state.gate.stats.ungated == 1
