"""What the operations return: small immutable records."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, NamedTuple

from .scopes import Cap

__all__ = [
    "Attached",
    "Balance",
    "BalanceChange",
    "CapChange",
    "CreditBucket",
    "LimitState",
    "Moved",
    "PlanChange",
    "Reservation",
    "ReservationRef",
    "Settlement",
    "SettlementOutcome",
    "SpendResult",
    "Void",
]


def _utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


@dataclass(frozen=True, slots=True)
class LimitState:
    """One rate limit after a call, for ``RateLimit`` / ``RateLimit-Policy`` headers.

    ``limit`` units per ``window_s`` seconds; ``remaining`` units could still
    pass now; ``reset_s`` seconds until the limit is whole again. ``shadow``
    limits are computed and recorded but never refuse; ``would_refuse`` says
    whether this one would have.
    """

    name: str
    limit: int
    window_s: int
    remaining: int
    reset_s: int
    shadow: bool = False
    would_refuse: bool = False


@dataclass(frozen=True, slots=True)
class SpendResult:
    """A successful spend. ``None`` remaining means unlimited (a bypassing plan)."""

    account: str
    credits_remaining: int | None
    chat_messages_remaining: int | None
    sequence: int
    replayed: bool = False
    limits: tuple[LimitState, ...] = ()

    @property
    def unlimited(self) -> bool:
        return self.credits_remaining is None


@dataclass(frozen=True, slots=True)
class BalanceChange:
    """The balances after a grant or a correction.

    A grant that made a bucket names it (``grant_id``), with its start and
    expiry (ms, server clock; ``expires_at_ms`` ``None`` for never).
    """

    account: str
    credits: int
    chat_messages: int
    sequence: int
    replayed: bool = False
    grant_id: str | None = None
    effective_at_ms: int | None = None
    expires_at_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Void:
    """A voided grant: what was taken back, and the balance after.

    ``moved`` credits were held of it by live reservations and now are of
    other buckets.
    """

    account: str
    grant_id: str
    voided: int
    credits: int
    sequence: int
    moved: int = 0
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class PlanChange:
    account: str
    plan: str
    previous_plan: str
    sequence: int
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class CreditBucket:
    """One bucket of an account's credits: the base bucket, a grant, or the refill's.

    Times are ms on the server's clock; ``expires_at_ms`` is ``None`` for
    never. A bucket that is not ``live`` yet (pending) starts at
    ``effective_at_ms``; its credits are not in the balance until then.
    ``held`` is what live reservations hold of it.
    """

    id: str
    category: str
    priority: int
    remaining: int
    held: int
    granted: int
    effective_at_ms: int
    expires_at_ms: int | None
    created_ms: int
    live: bool


@dataclass(frozen=True, slots=True)
class Balance:
    """An account's balances at one moment of the server's clock.

    ``available`` is credits minus the holds still inside their lease. On a
    bypassing plan the numbers are still kept, and ``unlimited`` is true.
    """

    account: str
    credits: int
    chat_messages: int
    held: int
    plan: str
    unlimited: bool
    sequence: int
    server_time_ms: int
    # Rate limits read without spending (a peek).
    limits: tuple[LimitState, ...] = ()
    # In burn order, the base bucket included; credits is the sum of the live ones.
    buckets: tuple[CreditBucket, ...] = ()
    # How far below zero the plan lets credits go.
    overdraft: int = 0

    @property
    def available(self) -> int:
        return self.credits - self.held


class ReservationRef(NamedTuple):
    """Names a reservation when the :class:`Reservation` object is not at hand."""

    account: str
    id: str
    # On a path of a tree, the path it was made on, root first (``Scope.path``).
    path: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Reservation:
    """Credits held until ``deadline_ms`` (Redis server clock, ms since the epoch)."""

    account: str
    id: str
    amount: int
    deadline_ms: int
    sequence: int
    replayed: bool = False
    limits: tuple[LimitState, ...] = ()
    # On a path of a tree, the path it was made on, root first: settle,
    # release and extend act at every level of it.
    path: tuple[str, ...] = ()

    @property
    def deadline(self) -> datetime:
        return _utc(self.deadline_ms)

    @property
    def ref(self) -> ReservationRef:
        return ReservationRef(self.account, self.id, self.path)


SettlementOutcome = Literal["settled", "released", "settled_late"]


@dataclass(frozen=True, slots=True)
class Settlement:
    """How a reservation was closed.

    ``uncharged`` is the part of the actual cost that could not be charged
    because the balance ran out (only possible above the amount held, or late).
    """

    account: str
    reservation_id: str
    outcome: SettlementOutcome
    charged: int
    uncharged: int
    credits_remaining: int | None
    sequence: int
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class Attached:
    """An account placed in a tree under ``path``'s parent (``attached`` False: it was)."""

    account: str
    path: tuple[str, ...]
    attached: bool
    sequence: int


@dataclass(frozen=True, slots=True)
class Moved:
    """An account moved: ``path`` is where it is now, ``previous`` where it was.

    ``moved`` False: it was there already, and nothing changed. ``sequence``
    is its ``move_in`` entry's (its newest, when nothing moved).
    """

    account: str
    path: tuple[str, ...]
    previous: tuple[str, ...]
    moved: bool
    sequence: int
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class CapChange:
    """A level's cap set, or removed (``cap`` None)."""

    account: str
    cap: Cap | None
    sequence: int
    replayed: bool = False
