"""Which requests the ASGI gate charges, and how: :class:`Route`, and matching without I/O."""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final, Literal

from .. import validation as v
from ..errors import ConfigError, InvalidInput

__all__ = [
    "ASGIApp",
    "CostSpec",
    "DisconnectPolicy",
    "Message",
    "Receive",
    "Route",
    "Scope",
    "Send",
    "UnavailablePolicy",
    "match_route",
    "resolve_cost",
]

# The ASGI callable types, spelled out so that no web framework is needed.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# A fixed number of credits, or a function of the request (its path, query, headers).
CostSpec = int | Callable[[Scope], int | Awaitable[int]]
DisconnectPolicy = Literal["charge_used", "charge_all", "refund"]
UnavailablePolicy = Literal["closed", "open"]

_DISCONNECT_POLICIES: Final = ("charge_used", "charge_all", "refund")
_UNAVAILABLE_POLICIES: Final = ("closed", "open")
_METHOD: Final = re.compile(r"[A-Z]+|\*")
_PLACEHOLDER: Final = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::(path))?\}")


def _path_pattern(path: str) -> re.Pattern[str]:
    """``/v1/chat/{id}`` → a regex: ``{name}`` is one path segment, ``{name:path}`` the rest."""
    if not path.startswith("/"):
        raise ConfigError(f"route path {v.short_repr(path)} must start with '/'")
    parts: list[str] = []
    position = 0
    for placeholder in _PLACEHOLDER.finditer(path):
        parts.append(_literal(path, path[position : placeholder.start()]))
        name, kind = placeholder.group(1), placeholder.group(2)
        parts.append(f"(?P<{name}>.+)" if kind == "path" else f"(?P<{name}>[^/]+)")
        position = placeholder.end()
    parts.append(_literal(path, path[position:]))
    try:
        return re.compile("".join(parts))
    except re.error as exc:
        # The same placeholder name twice.
        raise ConfigError(f"route path {v.short_repr(path)}: {exc}") from exc


def _literal(path: str, text: str) -> str:
    if "{" in text or "}" in text:
        raise ConfigError(f"route path {v.short_repr(path)} has a malformed placeholder")
    return re.escape(text)


def _check_cost(value: object, name: str) -> None:
    if value is None or callable(value):
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= v.MAX_AMOUNT:
        raise ConfigError(
            f"{name} must be an int in 0..2**53 or a function of the request, "
            f"not {v.short_repr(value)}"
        )


def _check_flag(value: object, name: str) -> None:
    # A truthy string ("no") would silently turn the behaviour on.
    if type(value) is not bool:
        raise ConfigError(
            f"{name} must be a bool, not {type(value).__name__} {v.short_repr(value)}"
        )


@dataclass(frozen=True, slots=True)
class Route:
    """One gated endpoint: what it costs and what happens when it cannot be paid for.

    ``path`` is a pattern (``/v1/chat/{id}``; ``{rest:path}`` spans segments)
    or a compiled regex that must match the whole path of ``scope["path"]``;
    ``method`` is an HTTP method (``GET`` also matches ``HEAD``) or ``"*"``
    (any method, OPTIONS too: keep a CORS middleware outside the gate).

    A plain route is charged once before the endpoint runs: a chat turn
    (``messages`` chat messages and the credits) when ``messages`` > 0, else a
    spend. It is priced by ``feature`` from the cost table, or by ``cost`` (an
    int or a function of the ASGI scope) — not both; a chat route with
    neither spends chat messages only.

    A ``stream`` route reserves ``max_cost`` credits (and spends its
    ``messages``) for ``stream_ttl`` seconds (default: the configured
    reservation TTL), renewed while the response streams, and settles what
    the endpoint reported; ``feature`` only labels the reservation.
    ``on_disconnect`` says what a client that goes away mid-stream pays:
    what was reported so far (``charge_used``; the whole reservation if
    nothing was), the whole reservation, or nothing (``refund``).

    ``on_unavailable`` decides while Redis is unreachable: ``closed`` answers
    503, ``open`` lets the request through uncharged (counted and logged).
    A ``shadow`` route computes and records every decision but never refuses.
    """

    method: str
    path: str | re.Pattern[str]
    feature: str | None = None
    cost: CostSpec | None = None
    messages: int = 1
    stream: bool = False
    max_cost: CostSpec | None = None
    stream_ttl: int | timedelta | None = None
    on_disconnect: DisconnectPolicy = "charge_used"
    on_unavailable: UnavailablePolicy = "closed"
    shadow: bool = False
    # Selects the plan's per-model rate limits.
    model: str | None = None
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.model is not None:
            try:
                v.check_model_name(self.model)
            except InvalidInput as exc:
                raise ConfigError(f"route model: {exc}") from None
        if not isinstance(self.method, str) or not _METHOD.fullmatch(self.method.upper()):
            raise ConfigError(
                f"route method must be an HTTP method or '*', not {v.short_repr(self.method)}"
            )
        object.__setattr__(self, "method", self.method.upper())
        if isinstance(self.path, re.Pattern):
            pattern = self.path
        elif isinstance(self.path, str):
            pattern = _path_pattern(self.path)
        else:
            raise ConfigError(
                f"route path must be a str or a compiled regex, not {v.short_repr(self.path)}"
            )
        object.__setattr__(self, "pattern", pattern)
        if isinstance(self.messages, bool) or not isinstance(self.messages, int):
            raise ConfigError(f"messages must be an int, not {v.short_repr(self.messages)}")
        if self.messages < 0:
            raise ConfigError("messages must not be negative")
        if self.messages > v.MAX_AMOUNT:
            raise ConfigError(f"messages must be at most 2**53, not {v.short_repr(self.messages)}")
        if self.feature is not None:
            # Checked now, not on the first request: a stream route only
            # labels its reservation with it, so no cost table lookup finds it.
            try:
                v.check_feature_name(self.feature)
            except InvalidInput as exc:
                raise ConfigError(f"route feature: {exc}") from None
        _check_flag(self.stream, "stream")
        _check_flag(self.shadow, "shadow")
        _check_cost(self.cost, "cost")
        _check_cost(self.max_cost, "max_cost")
        if self.on_disconnect not in _DISCONNECT_POLICIES:
            raise ConfigError(
                f"on_disconnect must be one of {', '.join(_DISCONNECT_POLICIES)}, "
                f"not {v.short_repr(self.on_disconnect)}"
            )
        if self.on_unavailable not in _UNAVAILABLE_POLICIES:
            raise ConfigError(
                "on_unavailable must be 'closed' or 'open', not "
                f"{v.short_repr(self.on_unavailable)}"
            )
        if self.stream:
            if self.max_cost is None:
                raise ConfigError(f"stream route {self.describe()} needs a max_cost to reserve")
            if self.cost is not None:
                raise ConfigError(
                    f"stream route {self.describe()} is charged what it reports, up to "
                    "max_cost; it takes no cost"
                )
            return
        if self.max_cost is not None or self.stream_ttl is not None:
            raise ConfigError(
                f"route {self.describe()} does not stream: max_cost and stream_ttl apply "
                "to stream=True routes only"
            )
        if self.feature is not None and self.cost is not None:
            # The engine prices by one or the other; dropping either silently
            # would charge something the route does not say.
            raise ConfigError(f"route {self.describe()} is priced by feature or by cost, not both")
        if self.feature is None and self.cost is None and self.messages == 0:
            raise ConfigError(f"route {self.describe()} charges nothing")

    def describe(self) -> str:
        path = self.path if isinstance(self.path, str) else self.path.pattern
        return f"{self.method} {path}"

    def matches(self, method: str, path: str) -> bool:
        # HEAD runs a GET endpoint (frameworks route it there), so it pays like GET.
        method_matches = self.method in ("*", method) or (self.method == "GET" and method == "HEAD")
        return method_matches and self.pattern.fullmatch(path) is not None


def match_route(routes: Sequence[Route], method: str, path: str) -> Route | None:
    """The first route matching ``method`` and ``path``, or ``None``."""
    for route in routes:
        if route.matches(method, path):
            return route
    return None


async def resolve_cost(spec: CostSpec | None, scope: Scope) -> int | None:
    """The cost a route states for this request (calling its function, if it has one)."""
    if spec is None or isinstance(spec, int):
        return spec
    value = spec(scope)
    return await value if inspect.isawaitable(value) else value
