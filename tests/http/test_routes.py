"""Route matching, problem bodies and rate-limit headers: the gate's parts that do no I/O."""

from __future__ import annotations

import json
import re

import pytest

from redcredit import (
    ConfigError,
    InsufficientChatMessages,
    InsufficientCredits,
    LimitState,
    RateLimited,
    SpendResult,
)
from redcredit.http.problems import (
    Problems,
    credit_headers,
    most_restrictive,
    ratelimit_headers,
    retry_after_seconds,
)
from redcredit.http.routes import Route, Scope, match_route, resolve_cost

# --- routes ---------------------------------------------------------------------------------------


def test_path_patterns() -> None:
    route = Route("post", "/v1/chat/{id}")
    assert route.method == "POST"
    assert route.matches("POST", "/v1/chat/abc")
    assert not route.matches("GET", "/v1/chat/abc")
    assert not route.matches("POST", "/v1/chat/abc/more")
    assert not route.matches("POST", "/v1/chat/")
    assert not route.matches("POST", "/v1/chat")
    # HEAD runs the GET endpoint, so it pays like GET.
    assert Route("GET", "/x").matches("HEAD", "/x")
    assert not Route("POST", "/x").matches("HEAD", "/x")
    spanning = Route("*", "/files/{rest:path}", cost=1, messages=0)
    assert spanning.matches("DELETE", "/files/a/b/c")
    # Literal parts are literal, not regex.
    dotted = Route("GET", "/v1.0/x")
    assert dotted.matches("GET", "/v1.0/x")
    assert not dotted.matches("GET", "/v1a0/x")


def test_compiled_regex_must_match_the_whole_path() -> None:
    route = Route("POST", re.compile(r"/v\d+/complete"), cost=2, messages=0)
    assert route.matches("POST", "/v2/complete")
    assert not route.matches("POST", "/v2/complete/extra")


def test_first_matching_route_wins() -> None:
    specific = Route("POST", "/v1/chat/free", feature="free_feature", messages=0)
    general = Route("POST", "/v1/chat/{id}")
    routes = [specific, general]
    assert match_route(routes, "POST", "/v1/chat/free") is specific
    assert match_route(routes, "POST", "/v1/chat/other") is general
    assert match_route(routes, "GET", "/v1/chat/other") is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "PO ST", "path": "/x"}, "method"),
        ({"method": "POST", "path": "x"}, "start with"),
        ({"method": "POST", "path": "/x/{id"}, "malformed"),
        ({"method": "POST", "path": "/{a}/{a}"}, "/{a}/{a}"),
        ({"method": "POST", "path": "/x", "messages": -1}, "negative"),
        ({"method": "POST", "path": "/x", "messages": True}, "messages"),
        ({"method": "POST", "path": "/x", "cost": -1}, "cost"),
        ({"method": "POST", "path": "/x", "cost": 1.5}, "cost"),
        ({"method": "POST", "path": "/x", "feature": "a", "cost": 1}, "not both"),
        ({"method": "POST", "path": "/x", "messages": 0}, "charges nothing"),
        ({"method": "POST", "path": "/x", "max_cost": 5}, "does not stream"),
        ({"method": "POST", "path": "/x", "stream_ttl": 5}, "does not stream"),
        ({"method": "POST", "path": "/x", "stream": True}, "max_cost"),
        ({"method": "POST", "path": "/x", "stream": True, "max_cost": 5, "cost": 1}, "no cost"),
        ({"method": "POST", "path": "/x", "on_disconnect": "free"}, "on_disconnect"),
        ({"method": "POST", "path": "/x", "on_unavailable": "maybe"}, "on_unavailable"),
    ],
)
def test_bad_routes_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Route(**kwargs)  # type: ignore[arg-type]


async def test_costs_are_numbers_or_functions_of_the_request() -> None:
    scope: Scope = {"type": "http", "query_string": b"pages=7"}

    def per_page(scope: Scope) -> int:
        return 2 * int(scope["query_string"].split(b"=")[1])

    async def later(scope: Scope) -> int:
        return 4

    assert await resolve_cost(None, scope) is None
    assert await resolve_cost(3, scope) == 3
    assert await resolve_cost(per_page, scope) == 14
    assert await resolve_cost(later, scope) == 4


# --- problems -------------------------------------------------------------------------------------


def test_insufficient_credits_problem() -> None:
    problem = Problems().refusal(InsufficientCredits("u1", 10, 3))
    assert problem.status == 402
    assert problem.headers == ()
    assert json.loads(problem.content()) == {
        "type": "urn:redcredit:problem:insufficient-credits",
        "title": "Insufficient credits",
        "status": 402,
        "detail": "This request needs 10 credits; 3 are available.",
        "balance": {
            "resource": "credits",
            "required": 10,
            "available": 3,
            "account": "u1",
            "level": "u1",
        },
    }
    assert problem.all_headers() == [
        ("content-type", "application/problem+json"),
        ("content-length", str(len(problem.content()))),
        ("cache-control", "no-store"),
    ]


def test_insufficient_chat_messages_problem() -> None:
    problem = Problems().refusal(InsufficientChatMessages("u2", 1, 0))
    assert problem.status == 402
    assert problem.body["type"] == "urn:redcredit:problem:insufficient-chat-messages"
    assert problem.body["balance"] == {
        "resource": "chat_messages",
        "required": 1,
        "available": 0,
        "account": "u2",
        "level": "u2",
    }


@pytest.mark.parametrize(
    ("retry_after_ms", "seconds"),
    [(0, 1), (1, 1), (999, 1), (1000, 1), (1001, 2), (59_001, 60), (60_000, 60)],
)
def test_rate_limited_problem_rounds_retry_after_up(retry_after_ms: int, seconds: int) -> None:
    assert retry_after_seconds(retry_after_ms) == seconds
    problem = Problems().refusal(RateLimited("u3", "rpm", retry_after_ms))
    assert problem.status == 429
    assert problem.headers == (("retry-after", str(seconds)),)
    assert problem.body == {
        "type": "urn:redcredit:problem:rate-limited",
        "title": "Rate limit exceeded",
        "status": 429,
        "detail": f"The 'rpm' rate limit is exhausted; retry in {seconds} s.",
        "rate_limit": {
            "name": "rpm",
            "retry_after_ms": retry_after_ms,
            "account": "u3",
            "level": "u3",
        },
    }


def test_unavailable_and_unidentified_problems() -> None:
    problems = Problems()
    down = problems.unavailable(2.1)
    assert (down.status, down.headers) == (503, (("retry-after", "3"),))
    assert problems.unavailable(0).headers == (("retry-after", "1"),)
    anonymous = problems.unidentified()
    assert (anonymous.status, anonymous.headers) == (401, (("www-authenticate", "Bearer"),))
    assert Problems(www_authenticate=None).unidentified().headers == ()


def test_problems_are_configurable_kind_by_kind() -> None:
    problems = Problems(
        base_uri="https://example.com/p/",
        statuses={"insufficient-chat-messages": 429},
        titles={"unavailable": "Try again soon"},
    )
    chat = problems.refusal(InsufficientChatMessages("u", 1, 0))
    assert (chat.status, chat.body["type"]) == (
        429,
        "https://example.com/p/insufficient-chat-messages",
    )
    # The others keep their defaults.
    assert problems.refusal(InsufficientCredits("u", 1, 0)).status == 402
    assert problems.unavailable(1).body["title"] == "Try again soon"
    with pytest.raises(ConfigError, match="unknown problem kinds"):
        Problems(statuses={"nope": 400})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match=re.escape("400..599")):
        Problems(statuses={"unavailable": 200})
    with pytest.raises(ConfigError, match="non-empty"):
        Problems(titles={"unavailable": ""})


# --- headers --------------------------------------------------------------------------------------


def test_ratelimit_headers_name_the_most_restrictive_enforced_limit() -> None:
    limits = (
        LimitState("rpm", 60, 60, 12, 10),
        LimitState("tpm", 10_000, 60, 3, 40),
        LimitState("rpd", 1000, 86_400, 3, 5),
        LimitState("new", 1, 60, 0, 60, shadow=True, would_refuse=True),
    )
    assert most_restrictive(limits) == limits[1]
    assert ratelimit_headers(limits) == [
        ("ratelimit", '"tpm";r=3;t=40'),
        ("ratelimit-policy", '"tpm";q=10000;w=60'),
    ]
    assert ratelimit_headers(limits[3:]) == []
    assert ratelimit_headers(()) == []


def test_ratelimit_names_are_structured_field_strings() -> None:
    (field, _policy) = ratelimit_headers([LimitState('a"b\\c\u00e9', 1, 1, -1, -5)])
    assert field == ("ratelimit", '"a\\"b\\\\c_";r=0;t=0')


def test_credit_headers() -> None:
    result = SpendResult("u", 7, 2, 1)
    assert credit_headers(result, chat=True) == [
        ("x-credits-remaining", "7"),
        ("x-chat-messages-remaining", "2"),
    ]
    unlimited = SpendResult("u", None, None, 1, limits=(LimitState("rpm", 5, 60, 4, 12),))
    assert credit_headers(unlimited, chat=False) == [
        ("x-credits-remaining", "unlimited"),
        ("ratelimit", '"rpm";r=4;t=12'),
        ("ratelimit-policy", '"rpm";q=5;w=60'),
    ]
