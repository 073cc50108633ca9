"""The reply contract of the Lua scripts, on the Python side.

Every script of the prelude answers ``{status, replayed, ...}``. The status
codes live here once, as :class:`Status`, and must agree with the ``local``
constants at the top of ``lua/_prelude.lua`` (tests/core/test_replies.py
reads the Lua sources and compares). The parsers are pure: a reply list in,
a result record of :mod:`redcredit.results` or a typed refusal out.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, Final

from ..errors import (
    AccountHasHistory,
    AccountMoved,
    AlreadyApplied,
    BalanceOverflow,
    CapReached,
    GrantExists,
    GrantExpired,
    GrantNotFound,
    IdempotencyConflict,
    InsufficientChatMessages,
    InsufficientCredits,
    MoveReason,
    MoveRefused,
    NotInScope,
    RateLimited,
    RedCreditError,
    ReservationClosed,
    ReservationError,
    ReservationLapsed,
    ReservationNotFound,
    ScopeRequired,
    TooManyGrants,
)
from ..results import (
    Balance,
    BalanceChange,
    CreditBucket,
    LimitState,
    PlanChange,
    Reservation,
    Settlement,
    SettlementOutcome,
    SpendResult,
    Void,
)

__all__ = [
    "OUTCOMES",
    "Outcome",
    "Reply",
    "Status",
    "balance",
    "balance_change",
    "grant_change",
    "has_history",
    "limit_reset",
    "move_refused",
    "moved",
    "plan_change",
    "refusal",
    "reservation",
    "reservation_extended",
    "settlement",
    "spend_result",
    "text",
    "void",
]

Reply = list[Any]


class Status(IntEnum):
    """The first element of every reply; 0 is success."""

    OK = 0
    # The account is not in Redis: load it, hydrate, and call again.
    MISSING = 1
    NO_CREDITS = 2
    NO_CHAT = 3
    RES_NOT_FOUND = 4
    RES_LAPSED = 5
    IDEM_CONFLICT = 6
    OVERFLOW = 7
    RES_EXISTS = 8
    RES_CLOSED = 9
    RATE_LIMITED = 10
    # Stored by hydrate under a key PostgreSQL holds: the first reply is gone.
    APPLIED_BEFORE = 11
    GRANT_EXISTS = 12
    GRANT_NOT_FOUND = 13
    TOO_MANY_GRANTS = 14
    GRANT_EXPIRED = 15
    CAP_REACHED = 16
    # The path named is not the stored tree (or not the reservation's path).
    NOT_IN_SCOPE = 17
    # The account is in a tree and was named without its path.
    IN_TREE = 18
    HAS_HISTORY = 19
    # The account left this place: its tombstone names where it went.
    MOVED = 20
    HAS_CHILDREN = 21
    HAS_HOLDS = 22
    # Live holds on the path's ancestors whose reservation records the
    # caller must name before a move can tell whether they are the account's.
    HOLDS_UNKNOWN = 23
    # A hash made before the count of children: pass the system of record's.
    UNCOUNTED = 24
    MOVE_BUSY = 25


# A bypassing plan's balances in replies (-2**53): with an overdraft a real
# balance may be below zero.
UNLIMITED: Final = -(2**53)


class Outcome(IntEnum):
    """How settle.lua closed a reservation (its SETTLED, RELEASED, LATE)."""

    SETTLED = 1
    RELEASED = 2
    LATE = 3


OUTCOMES: Final[dict[int, SettlementOutcome]] = {
    Outcome.SETTLED: "settled",
    Outcome.RELEASED: "released",
    Outcome.LATE: "settled_late",
}


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _unlimited_as_none(value: int) -> int | None:
    return None if value == UNLIMITED else int(value)


def refusal(
    reply: Reply, account: str, reservation_id: str = "", grant_id: str = ""
) -> RedCreditError | None:
    """The error a refused reply stands for; ``None`` for success.

    MISSING is not a refusal: the engine loads the account and calls again
    before a reply reaches this function.
    """
    if reply[0] == Status.OK:
        return None
    where = {"account": account, "reservation_id": reservation_id}
    match reply[0]:
        case Status.NO_CREDITS:
            return InsufficientCredits(account, int(reply[2]), int(reply[3]), level=_level(reply))
        case Status.NO_CHAT:
            return InsufficientChatMessages(
                account, int(reply[2]), int(reply[3]), level=_level(reply)
            )
        case Status.APPLIED_BEFORE:
            return AlreadyApplied(account, int(reply[2]))
        case Status.IDEM_CONFLICT:
            return IdempotencyConflict(
                f"idempotency key of account {account!r} was used for a different call"
            )
        case Status.OVERFLOW:
            return BalanceOverflow(f"a balance of account {account!r} would pass {int(reply[2])}")
        case Status.RATE_LIMITED:
            return RateLimited(account, text(reply[2]), int(reply[3]), level=_level(reply))
        case Status.CAP_REACHED:
            return CapReached(
                account,
                level=text(reply[2]),
                resource=text(reply[3]),
                cap=int(reply[4]),
                used=int(reply[5]),
                retry_after_ms=max(int(reply[6]), 0),
            )
        case Status.NOT_IN_SCOPE:
            level, parent = text(reply[2]), text(reply[3]) or None
            return NotInScope(
                f"account {level!r} is not where the path names it: its parent is {parent!r} "
                f"(call for {account!r})",
                account=account,
                level=level,
                parent=parent,
            )
        case Status.IN_TREE:
            return ScopeRequired(account=account, root=text(reply[2]))
        case Status.HAS_HISTORY:
            return has_history(account)
        case Status.MOVED:
            return moved(account, text(reply[2]), text(reply[3]))
        case Status.HAS_CHILDREN:
            return move_refused(account, "children", f"it has {int(reply[2])} children")
        case Status.HAS_HOLDS | Status.HOLDS_UNKNOWN:
            return move_refused(account, "holds", "it has a live reservation")
        case Status.UNCOUNTED:
            return move_refused(
                account, "uncounted", f"{text(reply[2])!r}'s children are not counted"
            )
        case Status.MOVE_BUSY:
            move_id = text(reply[2]) or None
            return move_refused(
                account, "busy", f"another move of it ({move_id!r}) is half-done", move_id
            )
        case Status.RES_NOT_FOUND:
            return ReservationNotFound(
                f"no reservation {reservation_id} for account {account!r} "
                "(never made, or its record has expired)",
                **where,
            )
        case Status.RES_LAPSED:
            return ReservationLapsed(
                f"reservation {reservation_id} of account {account!r} lapsed at "
                f"{int(reply[2])} ms (server clock); pass allow_late=True to charge it anyway",
                **where,
            )
        case Status.RES_CLOSED:
            closed = OUTCOMES[int(reply[2])].replace("_", " ")
            return ReservationClosed(
                f"reservation {reservation_id} of account {account!r} is already {closed}",
                **where,
            )
        case Status.GRANT_EXISTS:
            return GrantExists(
                f"account {account!r} has a live grant {grant_id!r} already",
                account=account,
                grant_id=grant_id,
            )
        case Status.GRANT_NOT_FOUND:
            return GrantNotFound(
                f"account {account!r} has no grant {grant_id!r} "
                "(never granted, spent, expired or voided)",
                account=account,
                grant_id=grant_id,
            )
        case Status.TOO_MANY_GRANTS:
            return TooManyGrants(account=account, grant_id=grant_id, most=int(reply[2]))
        case Status.GRANT_EXPIRED:
            return GrantExpired(
                f"grant {grant_id!r} of account {account!r} would expire at {int(reply[2])} ms, "
                f"not after it starts (server time {int(reply[3])} ms)",
                account=account,
                grant_id=grant_id,
            )
        case Status.RES_EXISTS:
            return ReservationError(f"reservation id {reservation_id} is already in use", **where)
    return RedCreditError(f"unexpected reply from Redis: {reply!r}")


def has_history(account: str) -> AccountHasHistory:
    """The refusal to attach an account that is not new (join.lua, or its loader says so)."""
    return AccountHasHistory(
        f"account {account!r} has balances or a history of its own: only a new "
        "account can be attached to a tree",
        account=account,
    )


def moved(account: str, level: str, destination: str) -> AccountMoved:
    """The refusal of a call on a place ``level`` moved away from (its tombstone's
    destination: the new parent's path, '\n'-separated; '' a root of its own)."""
    to = tuple(destination.split("\n")) if destination else None
    where = "a root of its own" if to is None else "under " + "/".join(to)
    return AccountMoved(
        f"account {level!r} was moved: it is {where} now (call for {account!r})",
        account=account,
        to=to,
    )


def move_refused(
    account: str, reason: MoveReason, why: str, move_id: str | None = None
) -> MoveRefused:
    """A move refused, before any I/O or by a script; nothing was changed."""
    return MoveRefused(
        f"account {account!r} cannot move: {why}", account=account, reason=reason, move_id=move_id
    )


def _level(reply: Reply) -> str | None:
    """The level of a path a refusal names (its 5th value), if any."""
    return text(reply[4]) if len(reply) > 4 else None


def limit_states(reply: Reply, start: int) -> tuple[LimitState, ...]:
    """The limit states appended to a reply from ``start``, 7 values each."""
    return tuple(
        LimitState(
            name=text(reply[i]),
            limit=int(reply[i + 1]),
            window_s=int(reply[i + 2]),
            remaining=int(reply[i + 3]),
            reset_s=int(reply[i + 4]),
            shadow=bool(reply[i + 5]),
            would_refuse=bool(reply[i + 6]),
        )
        for i in range(start, len(reply), 7)
    )


# The parsers below read a successful reply; the layouts are in each script's header.


def spend_result(reply: Reply, *, account: str) -> SpendResult:
    """debit.lua: credits left, chat messages left, sequence, limit states."""
    if int(reply[3]) == -1:
        # Chat messages never go below zero: a reply stored by the scripts of
        # a release before overdrafts, which said -1 for a bypassing plan's
        # unlimited balances, replayed after the upgrade.
        reply = [reply[0], reply[1], UNLIMITED, UNLIMITED, *reply[4:]]
    return SpendResult(
        account,
        _unlimited_as_none(reply[2]),
        _unlimited_as_none(reply[3]),
        int(reply[4]),
        bool(reply[1]),
        limit_states(reply, 5),
    )


def balance_change(reply: Reply, *, account: str) -> BalanceChange:
    """adjust.lua: credits, chat messages, sequence."""
    return BalanceChange(account, int(reply[2]), int(reply[3]), int(reply[4]), bool(reply[1]))


def grant_change(reply: Reply, *, account: str) -> BalanceChange:
    """grant.lua: credits, chat messages, sequence, bucket id, effective, expiry."""
    expires = int(reply[7])
    return BalanceChange(
        account,
        int(reply[2]),
        int(reply[3]),
        int(reply[4]),
        bool(reply[1]),
        grant_id=text(reply[5]),
        effective_at_ms=int(reply[6]),
        expires_at_ms=expires or None,
    )


def void(reply: Reply, *, account: str, grant_id: str) -> Void:
    """void.lua: credits taken back, credits after, sequence, credits moved."""
    return Void(
        account=account,
        grant_id=grant_id,
        voided=int(reply[2]),
        credits=int(reply[3]),
        sequence=int(reply[4]),
        moved=int(reply[5]),
        replayed=bool(reply[1]),
    )


def _bucket(raw: list[Any]) -> CreditBucket:
    return CreditBucket(
        id=text(raw[0]),
        remaining=int(raw[1]),
        held=int(raw[2]),
        priority=int(raw[3]),
        category=text(raw[4]),
        effective_at_ms=int(raw[5]),
        expires_at_ms=int(raw[6]) or None,
        created_ms=int(raw[7]),
        granted=int(raw[8]),
        live=bool(raw[9]),
    )


def plan_change(reply: Reply, *, account: str, plan: str) -> PlanChange:
    """set_plan.lua: sequence, previous plan."""
    return PlanChange(account, plan, text(reply[3]), int(reply[2]), bool(reply[1]))


def balance(reply: Reply, *, account: str) -> Balance:
    """balance.lua: credits, chat, held, plan, sequence, bypass, server time,
    overdraft, buckets, limit states."""
    return Balance(
        account=account,
        credits=int(reply[2]),
        chat_messages=int(reply[3]),
        held=int(reply[4]),
        plan=text(reply[5]),
        sequence=int(reply[6]),
        unlimited=bool(reply[7]),
        server_time_ms=int(reply[8]),
        overdraft=int(reply[9]),
        buckets=tuple(_bucket(raw) for raw in reply[10]),
        limits=limit_states(reply, 11),
    )


def reservation(
    reply: Reply, *, account: str, amount: int, path: tuple[str, ...] = ()
) -> Reservation:
    """reserve.lua: deadline, sequence, reservation id, limit states."""
    return Reservation(
        account=account,
        path=path,
        # A replay answers with the first call's id, not the one made for the retry.
        id=text(reply[4]),
        amount=amount,
        deadline_ms=int(reply[2]),
        sequence=int(reply[3]),
        replayed=bool(reply[1]),
        limits=limit_states(reply, 5),
    )


def limit_reset(reply: Reply) -> int:
    """reset_limits.lua: the number of limit states removed."""
    return int(reply[2])


def settlement(reply: Reply, *, account: str, reservation_id: str) -> Settlement:
    """settle.lua: outcome, charged, uncharged, credits after, sequence."""
    return Settlement(
        account=account,
        reservation_id=reservation_id,
        outcome=OUTCOMES[int(reply[2])],
        charged=int(reply[3]),
        uncharged=int(reply[4]),
        credits_remaining=_unlimited_as_none(reply[5]),
        sequence=int(reply[6]),
        replayed=bool(reply[1]),
    )


def reservation_extended(
    reply: Reply, *, account: str, reservation_id: str, path: tuple[str, ...] = ()
) -> Reservation:
    """extend.lua: new deadline, sequence, amount held."""
    return Reservation(
        account=account,
        path=path,
        id=reservation_id,
        amount=int(reply[4]),
        deadline_ms=int(reply[2]),
        sequence=int(reply[3]),
    )
