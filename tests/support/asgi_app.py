"""The app of the test that SIGKILLs its server: ``python -m uvicorn tests.support.asgi_app:app``.

Configured from ``REDCREDIT_*`` environment variables. Its one stream
reports a credit per tick and never ends by itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route as Endpoint

from redcredit import AsyncRedCredit, Settings
from redcredit.http.asgi import CreditGate
from redcredit.http.routes import Route, Scope
from tests.support.asgi_support import KILLED_ACCOUNT, KILLED_MAX_COST, KILLED_TTL_S


async def stream(request: Request) -> Response:
    usage = request.state.redcredit

    async def ticks() -> AsyncIterator[bytes]:
        for _ in range(600):
            usage.add(1)
            yield b"tick\n"
            await asyncio.sleep(0.1)

    return StreamingResponse(ticks(), media_type="text/plain")


async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


def identify(scope: Scope) -> str:
    return KILLED_ACCOUNT


app = CreditGate(
    Starlette(routes=[Endpoint("/stream", stream, methods=["POST"]), Endpoint("/health", health)]),
    # Made before any loop runs: the client connects on first use, in the server's loop.
    client=AsyncRedCredit(settings=Settings()),
    identify=identify,
    routes=[
        Route(
            "POST",
            "/stream",
            stream=True,
            max_cost=KILLED_MAX_COST,
            messages=0,
            stream_ttl=KILLED_TTL_S,
        )
    ],
)
