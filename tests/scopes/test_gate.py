"""The ASGI gate charges a tree's member by the path ``identify`` returns."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route as Endpoint

from redcredit import AsyncRedCredit, Cap, Scope, Settings
from redcredit.http.asgi import CreditGate
from redcredit.http.routes import Route


async def _ok(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


async def test_a_cap_refuses_with_a_problem_naming_its_level(scope_settings: Settings) -> None:
    async with AsyncRedCredit(settings=scope_settings) as arc:
        alice = Scope("acme", "research", "alice")
        for level in (Scope("acme", "research"), alice):
            await arc.attach(level)
        await arc.grant("acme", 100)
        await arc.set_cap(alice, Cap(credits=15, period="day"))

        def identify(scope: dict[str, object]) -> Scope | None:
            user = dict(scope["headers"]).get(b"x-user")  # type: ignore[call-overload]
            return None if user is None else Scope("acme", "research", user.decode())

        app = CreditGate(
            Starlette(routes=[Endpoint("/v1/complete", _ok, methods=["POST"])]),
            client=arc,
            identify=identify,
            routes=[Route("POST", "/v1/complete", cost=10, messages=0)],
            deadline_s=5,
        )
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gate") as http:
            assert (await http.post("/v1/complete", headers={"x-user": "alice"})).status_code == 200
            refused = await http.post("/v1/complete", headers={"x-user": "alice"})
            assert refused.status_code == 429
            assert refused.headers["content-type"] == "application/problem+json"
            body = refused.json()
            assert (body["cap"]["level"], body["cap"]["resource"], body["cap"]["used"]) == (
                "alice",
                "credits",
                10,
            )
            assert int(refused.headers["retry-after"]) >= 1
            # A user outside the tree is refused as a bad request, charging nothing.
            stranger = await http.post("/v1/complete", headers={"x-user": "mallory"})
            assert stranger.status_code == 400
        assert (await arc.balance("acme")).credits == 90


@pytest.mark.parametrize("identified", [Scope("acme"), "acme"])
async def test_a_root_is_named_alone_or_by_its_one_level_scope(
    scope_settings: Settings, identified: object
) -> None:
    async with AsyncRedCredit(settings=scope_settings) as arc:
        await arc.grant("acme", 5)
        result = await arc.spend(identified, cost=5)  # type: ignore[arg-type]
        assert result.credits_remaining == 0
