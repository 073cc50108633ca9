"""The demo's chat API: a fake model streaming tokens, gated by the ASGI middleware.

Served by ``redcredit demo`` on localhost. Every request is paid for by the
account named in ``Authorization: Bearer <account>`` — the demo's stand-in for
real authentication, chosen by the app in :func:`identify_bearer`; the gate
itself trusts nothing the client sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict
from datetime import timedelta
from typing import Any

import psycopg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route as Endpoint
from starlette.types import ASGIApp, Scope

from ..backends.postgres import recent_ledger_async
from ..clients.async_client import AsyncRedCredit
from ..config import LimitSettings, PlanSettings, RefillSettings, Settings
from ..costs import CostTable
from ..http.asgi import CreditGate
from ..http.routes import Route

__all__ = ["DEMO_ROUTES", "build_app", "demo_settings", "identify_bearer"]

# One credit per token streamed; a plain completion costs 5.
DEMO_COSTS = {"chat": 1, "complete": 5}
TOKENS_PER_SECOND = 20
ANSWER = (
    "Credits are held while the answer streams and settled at what it really used ; a client "
    "that leaves early pays for the tokens it received and no more ."
)

DEMO_ROUTES = (
    Route("POST", "/v1/chat", feature="chat", stream=True, max_cost=200, messages=1,
          stream_ttl=10, on_disconnect="charge_used"),
    Route("POST", "/v1/complete", feature="complete", messages=1),
)  # fmt: skip


def demo_settings(base: Settings) -> Settings:
    free = PlanSettings(
        limits=(
            LimitSettings(name="rpm", rate=30, period=timedelta(minutes=1), burst=5),
            LimitSettings(name="tpm", kind="credits", rate=3000, period=timedelta(minutes=1),
                          burst=1000),
        ),
        refill=RefillSettings(chat_messages=20, every="day"),
    )  # fmt: skip
    return base.model_copy(
        update={
            "free_credits": 300,
            "free_chat_messages": 20,
            "costs": CostTable.from_mapping(DEMO_COSTS),
            "plans": {**base.plans, "free": free},
            "sync_interval": timedelta(milliseconds=100),
        }
    )


def identify_bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization" and value.startswith(b"Bearer "):
            return value[7:].decode("utf-8", "replace").strip() or None
    return None


def fake_tokens(count: int) -> Iterator[str]:
    """A deterministic model: the same prompt always gets the same answer."""
    words = ANSWER.split()
    for i in range(count):
        yield words[i % len(words)]


def build_app(settings: Settings, *, gated: bool = True) -> ASGIApp:
    """The chat API; ``gated=False`` serves it without the middleware (benchmarks)."""
    # Connections open lazily, in the server's event loop.
    client = AsyncRedCredit(settings=settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # One server or a cluster, and its slot map, before the first request.
        await client.ready()
        yield
        await client.close()

    async def chat(request: Request) -> Response:
        body = await _json(request)
        count = max(1, min(int(body.get("max_tokens", 40)), 200))
        usage = request.scope.get("state", {}).get("redcredit")

        async def stream() -> AsyncIterator[bytes]:
            for token in fake_tokens(count):
                await asyncio.sleep(1 / TOKENS_PER_SECOND)
                if usage is not None:
                    usage.add(1)
                yield f"data: {json.dumps({'token': token})}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def complete(request: Request) -> Response:
        return JSONResponse({"text": " ".join(fake_tokens(8))})

    async def account(request: Request) -> Response:
        who = identify_bearer(request.scope)
        if who is None:
            return JSONResponse({"detail": "send Authorization: Bearer <account>"}, 401)
        balance = await client.balance(who)
        return JSONResponse({**asdict(balance), "available": balance.available})

    async def ledger(request: Request) -> Response:
        who = identify_bearer(request.scope)
        if who is None or settings.database_url is None:
            return JSONResponse({"detail": "send Authorization: Bearer <account>"}, 401)
        async with await psycopg.AsyncConnection.connect(settings.database_url) as conn:
            rows = await recent_ledger_async(conn, settings.pg_schema, who, limit=20)
        names = ("seq", "op", "credits", "chat", "credits_after", "chat_after", "feature", "at")
        return JSONResponse([dict(zip(names, row, strict=True)) for row in rows])

    app = Starlette(
        routes=[
            Endpoint("/v1/chat", chat, methods=["POST"]),
            Endpoint("/v1/complete", complete, methods=["POST"]),
            Endpoint("/v1/account", account),
            Endpoint("/v1/ledger", ledger),
        ],
        lifespan=lifespan,
    )
    if not gated:
        return app
    return CreditGate(app, client=client, identify=identify_bearer, routes=DEMO_ROUTES)


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
