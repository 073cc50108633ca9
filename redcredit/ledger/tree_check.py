"""Where an account sits in its tree and its cap, in Redis against PostgreSQL plus the journal.

Reconcile's share for trees of accounts (docs/scopes.md): a member's parent
and root, its cap, and what calls through it charged in the cap's current
window. A cap's use is compared in the window that is current by the
server's clock, as the scripts read it: a use recorded for an earlier
window counts for nothing, whichever side holds it, and an account without
a cap has no use to compare.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..core.journal import JournalEntry, text
from ..core.plan_rules import cap_window_start

__all__ = ["REDIS_TREE_FIELDS", "TreePlace", "expected_place", "tree_problems"]

# The fields of an account hash that say where it sits and what its cap is (lua/_scopes.lua).
REDIS_TREE_FIELDS = ("P", "R", "K", "Kw", "Kc", "Km")

CapUse = tuple[int, int, int]  # the window's start, credits and chat messages charged in it


@dataclass(frozen=True, slots=True)
class TreePlace:
    parent: str | None = None
    root: str | None = None
    cap: str | None = None
    use: CapUse | None = None

    @classmethod
    def from_redis(cls, values: Sequence[Any]) -> TreePlace:
        """From the hash's :data:`REDIS_TREE_FIELDS`, as HMGET answers them."""
        parent, root, cap, window, credits, messages = (
            None if v is None else text(v) for v in values
        )
        use = None
        if window is not None:
            use = (int(window), int(credits or 0), int(messages or 0))
        return cls(parent, root, cap or None, use)

    @classmethod
    def from_row(cls, row: Sequence[Any] | None) -> TreePlace:
        """From :func:`~redcredit.backends.postgres.account_trees`'s row (None: no row)."""
        if row is None:
            return cls()
        parent, root, cap, window, credits, messages = row
        use = None if window is None else (int(window), int(credits or 0), int(messages or 0))
        return cls(parent, root, cap or None, use)

    def use_in(self, now_ms: int) -> tuple[int, int] | None:
        """Credits and chat messages charged through the cap in its current window."""
        if self.cap is None:
            return None
        start = _window(self.cap, now_ms)
        if start is None:
            return None  # a cap no script could read: nothing to compare
        if self.use is None or self.use[0] != start:
            return (0, 0)
        return self.use[1:]


def expected_place(pg: TreePlace, unapplied: Iterable[JournalEntry]) -> TreePlace:
    """PostgreSQL's place and cap with the journal not yet applied laid over, newest last."""
    place = pg
    for entry in sorted(unapplied, key=lambda e: e.seq):
        if entry.root is not None:
            place = replace(place, parent=entry.parent, root=entry.root)
        if entry.cap is not None:
            # A cap removed takes its use with it (lua/set_cap.lua).
            place = replace(place, cap=entry.cap or None, use=place.use if entry.cap else None)
        if entry.cap_use is not None:
            place = replace(place, use=entry.cap_use)
    return place


def tree_problems(in_redis: TreePlace, expected: TreePlace, now_ms: int) -> list[str]:
    """One line for each way Redis's place and cap differ from PostgreSQL's and the journal's."""
    problems = []
    where = "PostgreSQL and the journal"
    if (in_redis.parent, in_redis.root) != (expected.parent, expected.root):
        problems.append(
            f"tree place differs: {_place(in_redis)} in Redis, {_place(expected)} in {where}"
        )
    if in_redis.cap != expected.cap:
        problems.append(
            f"cap differs: {_cap(in_redis.cap)} in Redis, {_cap(expected.cap)} in {where}"
        )
    else:
        theirs, ours = in_redis.use_in(now_ms), expected.use_in(now_ms)
        if theirs != ours and theirs is not None and ours is not None:
            start = _window(str(expected.cap), now_ms)
            problems.append(
                f"cap use in the window from {start} differs: {theirs[0]} credits and "
                f"{theirs[1]} chat messages in Redis, {ours[0]} and {ours[1]} in {where}"
            )
    return problems


def _window(cap: str, now_ms: int) -> int | None:
    try:
        return cap_window_start(cap.split(",")[2], now_ms)
    except (IndexError, ValueError, ZeroDivisionError):
        return None


def _place(place: TreePlace) -> str:
    if place.root is None:
        return "in no tree (or its root)"
    return f"under {place.parent!r} in {place.root!r}'s tree"


def _cap(cap: str | None) -> str:
    return "none" if cap is None else repr(cap)
