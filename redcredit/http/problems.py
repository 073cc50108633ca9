"""HTTP answers for the gate, without I/O: RFC 9457 problem bodies and rate-limit headers.

Shared by the ASGI middleware and the FastAPI dependency, so both answer a
refusal with the same status, body and headers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal

from ..errors import (
    AlreadyApplied,
    CapReached,
    ConfigError,
    IdempotencyConflict,
    InsufficientChatMessages,
    InsufficientFunds,
    InvalidInput,
    RateLimited,
)
from ..results import LimitState, SpendResult
from ..validation import short_repr

__all__ = [
    "PROBLEM_CONTENT_TYPE",
    "Problem",
    "ProblemKind",
    "Problems",
    "credit_headers",
    "most_restrictive",
    "ratelimit_headers",
    "retry_after_seconds",
]

PROBLEM_CONTENT_TYPE: Final = "application/problem+json"

ProblemKind = Literal[
    "insufficient-credits",
    "insufficient-chat-messages",
    "rate-limited",
    "cap-reached",
    "unavailable",
    "unidentified",
    "invalid-request",
    "idempotency-conflict",
]

_DEFAULT_STATUSES: Final[Mapping[ProblemKind, int]] = MappingProxyType(
    {
        "insufficient-credits": 402,
        "insufficient-chat-messages": 402,
        "rate-limited": 429,
        "cap-reached": 429,
        "unavailable": 503,
        "unidentified": 401,
        "invalid-request": 400,
        "idempotency-conflict": 409,
    }
)
_DEFAULT_TITLES: Final[Mapping[ProblemKind, str]] = MappingProxyType(
    {
        "insufficient-credits": "Insufficient credits",
        "insufficient-chat-messages": "No chat messages left",
        "rate-limited": "Rate limit exceeded",
        "cap-reached": "Budget cap reached",
        "unavailable": "Credit service unavailable",
        "unidentified": "No paying account",
        "invalid-request": "Request cannot be charged",
        "idempotency-conflict": "Idempotency key already used",
    }
)


def _merged(
    defaults: Mapping[ProblemKind, Any], given: Mapping[ProblemKind, Any], what: str
) -> Mapping[ProblemKind, Any]:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown problem kinds in {what}: {', '.join(map(str, unknown))}")
    return MappingProxyType({**defaults, **given})


@dataclass(frozen=True, slots=True)
class Problems:
    """How refusals are answered: the problem ``type`` base URI, statuses and titles.

    Each problem's ``type`` is ``base_uri`` followed by its kind (e.g.
    ``insufficient-credits``); point ``base_uri`` at your own documentation.
    ``statuses`` and ``titles`` override the defaults kind by kind. A 401
    carries ``WWW-Authenticate: <www_authenticate>`` (HTTP requires one),
    unless it is ``None``.
    """

    base_uri: str = "urn:redcredit:problem:"
    statuses: Mapping[ProblemKind, int] = field(default_factory=dict)
    titles: Mapping[ProblemKind, str] = field(default_factory=dict)
    www_authenticate: str | None = "Bearer"

    def __post_init__(self) -> None:
        statuses = _merged(_DEFAULT_STATUSES, self.statuses, "statuses")
        for kind, status in statuses.items():
            if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
                raise ConfigError(
                    f"status for {kind} must be an int in 400..599, not {short_repr(status)}"
                )
        titles = _merged(_DEFAULT_TITLES, self.titles, "titles")
        for kind, title in titles.items():
            if not isinstance(title, str) or not title:
                raise ConfigError(f"title for {kind} must be a non-empty str")
        object.__setattr__(self, "statuses", statuses)
        object.__setattr__(self, "titles", titles)

    def problem(
        self,
        kind: ProblemKind,
        detail: str,
        *,
        headers: Iterable[tuple[str, str]] = (),
        **extensions: Any,
    ) -> Problem:
        status = self.statuses[kind]
        body: dict[str, Any] = {
            "type": self.base_uri + kind,
            "title": self.titles[kind],
            "status": status,
            "detail": detail,
            **extensions,
        }
        return Problem(status, tuple(headers), body)

    def refusal(self, refused: InsufficientFunds | RateLimited | CapReached) -> Problem:
        """The answer to a refused spend, chat turn or reservation; ``level`` names
        the level of the account's tree whose rule refused (the account alone)."""
        if isinstance(refused, CapReached):
            seconds = retry_after_seconds(refused.retry_after_ms)
            return self.problem(
                "cap-reached",
                f"The {refused.resource} cap of {refused.level!r} is reached; "
                f"its window turns in {seconds} s.",
                headers=[("retry-after", str(seconds))],
                cap={
                    "level": refused.level,
                    "resource": refused.resource,
                    "cap": refused.cap,
                    "used": refused.used,
                    "retry_after_ms": refused.retry_after_ms,
                    "account": refused.account,
                },
            )
        if isinstance(refused, RateLimited):
            seconds = retry_after_seconds(refused.retry_after_ms)
            return self.problem(
                "rate-limited",
                f"The {refused.limit!r} rate limit is exhausted; retry in {seconds} s.",
                headers=[("retry-after", str(seconds))],
                rate_limit={
                    "name": refused.limit,
                    "retry_after_ms": refused.retry_after_ms,
                    "account": refused.account,
                    "level": refused.level,
                },
            )
        if isinstance(refused, InsufficientChatMessages):
            kind: ProblemKind = "insufficient-chat-messages"
            resource = "chat_messages"
            detail = (
                f"This request needs {refused.required} chat messages; "
                f"{refused.available} are left."
            )
        else:
            kind = "insufficient-credits"
            resource = "credits"
            detail = (
                f"This request needs {refused.required} credits; {refused.available} are available."
            )
        return self.problem(
            kind,
            detail,
            balance={
                "resource": resource,
                "required": refused.required,
                "available": refused.available,
                "account": refused.account,
                "level": refused.level,
            },
        )

    def unavailable(self, retry_after_s: float) -> Problem:
        seconds = max(1, math.ceil(retry_after_s))
        return self.problem(
            "unavailable",
            "Credits cannot be checked right now; nothing was charged. Retry later.",
            headers=[("retry-after", str(seconds))],
        )

    def invalid(self, refused: InvalidInput) -> Problem:
        """The answer to a request whose account, idempotency key or cost redcredit refuses.

        Nothing was charged: the values were refused before Redis was asked.
        """
        return self.problem(
            "invalid-request", f"This request cannot be charged: {refused}. Nothing was charged."
        )

    def conflict(self, refused: IdempotencyConflict | AlreadyApplied) -> Problem:
        """The answer to a request whose idempotency key cannot be answered with a replay."""
        if isinstance(refused, AlreadyApplied):
            detail = (
                "A request with this idempotency key was charged before, once; its first "
                "response is no longer kept. Nothing more was charged."
            )
        else:
            detail = "This idempotency key was used for a different request. Nothing was charged."
        return self.problem("idempotency-conflict", detail)

    def unidentified(self) -> Problem:
        headers = (
            [] if self.www_authenticate is None else [("www-authenticate", self.www_authenticate)]
        )
        return self.problem(
            "unidentified",
            "This endpoint is paid for by an account, and the request is not tied to one.",
            headers=headers,
        )


@dataclass(frozen=True, slots=True)
class Problem:
    """A ready answer: status, extra headers (lowercase names) and the JSON body."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: Mapping[str, Any]

    def content(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":"), ensure_ascii=False).encode()

    def all_headers(self) -> list[tuple[str, str]]:
        """Every header of the response, for a body of :meth:`content`."""
        return [
            ("content-type", PROBLEM_CONTENT_TYPE),
            ("content-length", str(len(self.content()))),
            # A refusal is about one account at one moment: no cache may keep it.
            ("cache-control", "no-store"),
            *self.headers,
        ]


def retry_after_seconds(retry_after_ms: int) -> int:
    """Whole seconds for ``Retry-After``, rounded up, and at least 1.

    A refused client told ``0`` would retry at once and be refused again.
    """
    return max(1, -(-int(retry_after_ms) // 1000))


def most_restrictive(limits: Iterable[LimitState]) -> LimitState | None:
    """The enforced limit with the fewest units left (the longest reset breaks a tie).

    Shadow limits never refuse, so advertising them would only slow clients down.
    """
    enforced = [state for state in limits if not state.shadow]
    if not enforced:
        return None
    return min(enforced, key=lambda state: (state.remaining, -state.reset_s))


def _sf_string(text: str) -> str:
    # RFC 8941 sf-string: printable ASCII only, with '"' and '\' escaped.
    safe = "".join(ch if " " <= ch <= "~" else "_" for ch in text)
    return '"' + safe.replace("\\", "\\\\").replace('"', '\\"') + '"'


def ratelimit_headers(limits: Iterable[LimitState]) -> list[tuple[str, str]]:
    """``RateLimit`` and ``RateLimit-Policy`` (draft-ietf-httpapi-ratelimit-headers).

    For the most restrictive enforced limit, e.g. ``RateLimit: "rpm";r=4;t=37``
    and ``RateLimit-Policy: "rpm";q=10;w=60``; nothing when there is none.
    """
    state = most_restrictive(limits)
    if state is None:
        return []
    name = _sf_string(state.name)
    return [
        ("ratelimit", f"{name};r={max(0, state.remaining)};t={max(0, state.reset_s)}"),
        ("ratelimit-policy", f"{name};q={max(0, state.limit)};w={max(1, state.window_s)}"),
    ]


def credit_headers(result: SpendResult, *, chat: bool) -> list[tuple[str, str]]:
    """``X-Credits-Remaining`` (and for a chat turn ``X-Chat-Messages-Remaining``) after a spend."""

    def shown(value: int | None) -> str:
        return "unlimited" if value is None else str(value)

    headers = [("x-credits-remaining", shown(result.credits_remaining))]
    if chat:
        headers.append(("x-chat-messages-remaining", shown(result.chat_messages_remaining)))
    return [*headers, *ratelimit_headers(result.limits)]
