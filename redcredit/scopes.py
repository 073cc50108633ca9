"""Trees of accounts: the path a call is made on, and the caps of a level.

A tree has at most :data:`MAX_DEPTH` levels, e.g. ``org → project → user →
key``. Every call on a member names its path, root first, as a
:class:`Scope`; the scripts check it against the stored tree, and check every
level's rate limits and cap in the same step (docs/scopes.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from . import validation as v
from .errors import InvalidInput

__all__ = ["MAX_DEPTH", "Cap", "CapPeriod", "Scope"]

MAX_DEPTH = 4

CapPeriod = Literal["day", "week", "month"] | timedelta

_CALENDAR = {"day": "d", "week": "w", "month": "M"}
_SHORTEST_WINDOW = timedelta(seconds=1)


@dataclass(frozen=True, slots=True, init=False)
class Scope:
    """The path of a call, root first: ``Scope("acme", "research", "alice", "key-9")``.

    ``Scope("bob")`` is the account ``bob`` alone, the same as naming ``"bob"``.
    """

    path: tuple[str, ...]

    def __init__(self, *path: str) -> None:
        if not 1 <= len(path) <= MAX_DEPTH:
            raise InvalidInput(f"a scope has 1 to {MAX_DEPTH} levels, root first; got {len(path)}")
        checked = tuple(v.check_account_id(account) for account in path)
        if len(set(checked)) != len(checked):
            raise InvalidInput(f"a scope names each account once: {checked!r}")
        object.__setattr__(self, "path", checked)

    @classmethod
    def of(cls, target: object) -> Scope:
        """A scope from a Scope, or from an account id (anything else is refused as one)."""
        if isinstance(target, Scope):
            return target
        return cls(v.check_account_id(target))

    @property
    def account(self) -> str:
        """The account the call is made for: the path's last level."""
        return self.path[-1]

    @property
    def root(self) -> str:
        return self.path[0]

    @property
    def parent(self) -> str | None:
        return self.path[-2] if len(self.path) > 1 else None

    @property
    def ancestors(self) -> tuple[str, ...]:
        """The levels above the account, parent first."""
        return self.path[-2::-1]

    @property
    def depth(self) -> int:
        return len(self.path)

    def child(self, account: str) -> Scope:
        return Scope(*self.path, account)

    def __str__(self) -> str:
        return " → ".join(self.path)


@dataclass(frozen=True, slots=True)
class Cap:
    """The most that calls through one level may charge per window.

    ``credits`` and ``chat_messages`` are ceilings (``None``: no ceiling on
    that resource), whichever level of the path pays. ``period`` is a
    calendar ``"day"``, ``"week"`` or ``"month"`` (UTC), or a fixed length
    whose windows are aligned on the Unix epoch.
    """

    credits: int | None = None
    chat_messages: int | None = None
    period: CapPeriod = "month"

    def __post_init__(self) -> None:
        if self.credits is None and self.chat_messages is None:
            raise InvalidInput("a cap limits credits, chat_messages or both")
        if self.credits is not None:
            v.check_amount(self.credits, name="credits")
        if self.chat_messages is not None:
            v.check_amount(self.chat_messages, name="chat_messages")
        if isinstance(self.period, timedelta):
            if self.period < _SHORTEST_WINDOW or self.period % timedelta(milliseconds=1):
                raise InvalidInput(
                    f"a cap's period is at least 1 s, in whole milliseconds, not {self.period!r}"
                )
        elif self.period not in _CALENDAR:
            raise InvalidInput(
                f"a cap's period is 'day', 'week', 'month' or a timedelta, not {self.period!r}"
            )

    def text(self) -> str:
        """The cap as the scripts keep it (field K, see lua/_scopes.lua)."""
        if isinstance(self.period, timedelta):
            period = str(self.period // timedelta(milliseconds=1))
        else:
            period = _CALENDAR[self.period]
        credits = -1 if self.credits is None else self.credits
        messages = -1 if self.chat_messages is None else self.chat_messages
        return f"{credits},{messages},{period}"

    @classmethod
    def from_text(cls, text: str) -> Cap:
        credits, messages, period = text.split(",")
        calendar = {letter: name for name, letter in _CALENDAR.items()}
        return cls(
            credits=None if credits == "-1" else int(credits),
            chat_messages=None if messages == "-1" else int(messages),
            period=calendar.get(period) or timedelta(milliseconds=int(period)),  # type: ignore[arg-type]
        )
