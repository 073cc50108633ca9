"""The problem bodies of refusals on a path of a tree name the level that refused."""

from __future__ import annotations

from redcredit import CapReached, InsufficientCredits, RateLimited
from redcredit.http.problems import Problems


def test_a_cap_refusal_is_a_429_naming_the_level_and_the_rule() -> None:
    refused = CapReached(
        "key-9", level="alice", resource="credits", cap=1_000, used=990, retry_after_ms=61_500
    )
    problem = Problems().refusal(refused)
    assert problem.status == 429
    assert ("retry-after", "62") in problem.headers
    assert problem.body["cap"] == {
        "level": "alice",
        "resource": "credits",
        "cap": 1_000,
        "used": 990,
        "retry_after_ms": 61_500,
        "account": "key-9",
    }
    assert "alice" in problem.body["detail"]


def test_rate_and_credit_refusals_name_their_level() -> None:
    limited = Problems().refusal(RateLimited("key-9", "per_minute", 500, level="research"))
    assert (limited.status, limited.body["rate_limit"]["level"]) == (429, "research")
    short = Problems().refusal(InsufficientCredits("key-9", 50, 20, level="acme"))
    assert (short.status, short.body["balance"]["level"]) == (402, "acme")
    alone = Problems().refusal(InsufficientCredits("bob", 50, 20))
    assert alone.body["balance"]["level"] == "bob"
