"""The reply contract: Lua status codes against core/replies.py, and the pure parsers."""

from __future__ import annotations

import re

import pytest

from redcredit.core import replies
from redcredit.core.replies import OUTCOMES, Outcome, Status
from redcredit.core.scripts import SCRIPT_NAMES, lua_dir
from redcredit.errors import (
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

# `local A, B = 0, 1`: constants declared in a Lua chunk.
_LOCALS = re.compile(r"^local ([A-Z_]+(?:, [A-Z_]+)*) = ([0-9]+(?:, [0-9]+)*)$", re.M)
# The first element of a reply table built in code: `{NAME, ...` or `{3, ...`.
_CODE_STATUS = re.compile(r"\{([A-Z_]+|[0-9]+), ")
# A status a script answers with (hydrate also stores APPLIED_BEFORE, never returns it).
_RETURNED = re.compile(r"return (?:idem_store\()?(?:with_states\()?\{([A-Z_]+), ")
# A reply shown in a script's header comment: `{4, 0}`, `{2, 0, required, ...}`.
_DOC_STATUS = re.compile(r"\{([0-9]+), (?:0|replayed)\b")


def _source(name: str) -> str:
    return lua_dir().joinpath(f"{name}.lua").read_text()


def _constants(text: str) -> dict[str, int]:
    found: dict[str, int] = {}
    for names, values in _LOCALS.findall(text):
        found.update(zip(names.split(", "), map(int, values.split(", ")), strict=True))
    return found


def _code(text: str) -> str:
    return "\n".join(line.split("--", 1)[0] for line in text.splitlines())


def _header(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if line.startswith("--"))


def test_prelude_status_constants_are_the_enum() -> None:
    constants = _constants(_source("_prelude"))
    # MAX_AMOUNT and the fields of a credit bucket (BID, BREM, ...) are no statuses.
    statuses = {
        name: value
        for name, value in constants.items()
        if name != "MAX_AMOUNT" and not name.startswith("B")
    }
    assert statuses == {member.name: member.value for member in Status}


@pytest.mark.parametrize("name", ["_prelude", *SCRIPT_NAMES])
def test_every_status_a_script_replies_is_a_member(name: str) -> None:
    used = _CODE_STATUS.findall(_code(_source(name)))
    assert used, f"{name}.lua builds no reply"
    # Replies are built from the named constants, never bare numbers.
    assert {token for token in used if token.isdigit()} == set()
    assert set(used) <= set(Status.__members__)


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_header_documents_the_statuses_a_script_returns(name: str) -> None:
    text = _source(name)
    documented = {int(number) for number in _DOC_STATUS.findall(_header(text))}
    assert documented <= {member.value for member in Status}
    returned = {Status[token] for token in _RETURNED.findall(_code(text))}
    assert returned <= documented, f"{name}.lua returns statuses its header does not document"


def test_settle_outcomes_are_the_enum() -> None:
    outcomes = {
        name: value
        for name, value in _constants(_source("settle")).items()
        if name in ("SETTLED", "RELEASED", "LATE")
    }
    assert outcomes == {member.name: member.value for member in Outcome}
    assert set(OUTCOMES) == set(Outcome)


_REFUSALS: list[tuple[list[object], type[RedCreditError]]] = [
    ([Status.NO_CREDITS, 0, 5, 3], InsufficientCredits),
    ([Status.NO_CHAT, 0, 1, 0], InsufficientChatMessages),
    ([Status.RES_NOT_FOUND, 0], ReservationNotFound),
    ([Status.RES_LAPSED, 0, 1_000], ReservationLapsed),
    ([Status.IDEM_CONFLICT, 0], IdempotencyConflict),
    ([Status.OVERFLOW, 0, 2**53], BalanceOverflow),
    ([Status.RES_EXISTS, 0], ReservationError),
    ([Status.RES_CLOSED, 0, Outcome.RELEASED], ReservationClosed),
    ([Status.RATE_LIMITED, 0, b"per_minute", 250], RateLimited),
    ([Status.APPLIED_BEFORE, 1, 42], AlreadyApplied),
    ([Status.GRANT_EXISTS, 0], GrantExists),
    ([Status.GRANT_NOT_FOUND, 0], GrantNotFound),
    ([Status.TOO_MANY_GRANTS, 0, 32], TooManyGrants),
    ([Status.GRANT_EXPIRED, 0, 1_000, 2_000], GrantExpired),
    ([Status.CAP_REACHED, 0, b"acme", b"credits", 100, 90, 5_000], CapReached),
    ([Status.NOT_IN_SCOPE, 0, b"alice", b"other"], NotInScope),
    ([Status.IN_TREE, 0, b"acme"], ScopeRequired),
    ([Status.HAS_HISTORY, 0], AccountHasHistory),
    ([Status.MOVED, 0, b"acct", b"acme\nops"], AccountMoved),
    ([Status.HAS_CHILDREN, 0, 2], MoveRefused),
    ([Status.HAS_HOLDS, 0], MoveRefused),
    ([Status.HOLDS_UNKNOWN, 0, b"ab" * 16], MoveRefused),
    ([Status.UNCOUNTED, 0, b"acct"], MoveRefused),
    ([Status.MOVE_BUSY, 0, b"move-1"], MoveRefused),
]


def test_every_refusing_status_has_its_error() -> None:
    refusing = set(Status) - {Status.OK, Status.MISSING}
    assert {reply[0] for reply, _ in _REFUSALS} == refusing


@pytest.mark.parametrize(("reply", "error"), _REFUSALS)
def test_refusal_maps_to_its_typed_error(reply: list[object], error: type[RedCreditError]) -> None:
    refused = replies.refusal(reply, "acct", "r1")
    assert type(refused) is error
    account = getattr(refused, "account", "acct")
    assert account == "acct"


def test_refusal_details() -> None:
    short = replies.refusal([2, 0, 5, 3], "acct")
    assert isinstance(short, InsufficientCredits)
    assert (short.required, short.available) == (5, 3)
    limited = replies.refusal([10, 0, b"per_minute", 250], "acct")
    assert isinstance(limited, RateLimited)
    assert (limited.limit, limited.retry_after_ms) == ("per_minute", 250)
    closed = replies.refusal([9, 0, 3], "acct", "r1")
    assert isinstance(closed, ReservationClosed)
    assert "already settled late" in str(closed)
    assert closed.reservation_id == "r1"
    applied = replies.refusal([11, 1, 42], "acct")
    assert isinstance(applied, AlreadyApplied)
    assert applied.sequence == 42


def test_success_is_no_refusal_and_an_unknown_status_is_an_error() -> None:
    assert replies.refusal([0, 0], "acct") is None
    unknown = replies.refusal([99, 0], "acct")
    assert type(unknown) is RedCreditError
    assert "unexpected reply" in str(unknown)


def test_parsers_read_the_documented_layouts() -> None:
    limit = [b"rpm", 60, 60, 59, 1, 0, 0]
    spent = replies.spend_result([0, 1, replies.UNLIMITED, 4, 7, *limit], account="a")
    assert (spent.credits_remaining, spent.chat_messages_remaining) == (None, 4)
    # Within an overdraft a balance below zero is a balance, not "unlimited".
    owing = replies.spend_result([0, 0, -1, 4, 7], account="a")
    assert owing.credits_remaining == -1
    assert (spent.sequence, spent.replayed, spent.limits[0].name) == (7, True, "rpm")
    base = [b"base", 4, 3, 50, b"paid", 0, 0, 0, 0, 1]
    promo = [b"p1", 6, 0, 50, b"promotional", 900, 5_000, 900, 6, 1]
    balance = replies.balance(
        [0, 0, 10, 2, 3, b"free", 9, 0, 1_000, 20, [promo, base], *limit], account="a"
    )
    assert (balance.available, balance.plan, balance.limits[0].remaining) == (7, "free", 59)
    assert balance.overdraft == 20
    assert [(b.id, b.remaining, b.expires_at_ms) for b in balance.buckets] == [
        ("p1", 6, 5_000),
        ("base", 4, None),
    ]
    reservation = replies.reservation([0, 0, 5_000, 3, b"ab" * 16, *limit], account="a", amount=8)
    assert (reservation.id, reservation.amount, reservation.deadline_ms) == ("ab" * 16, 8, 5_000)
    settled = replies.settlement(
        [0, 0, 3, 4, 1, replies.UNLIMITED, 12], account="a", reservation_id="r"
    )
    assert (settled.outcome, settled.uncharged, settled.credits_remaining) == (
        "settled_late",
        1,
        None,
    )
    extended = replies.reservation_extended([0, 0, 9_000, 5, 8], account="a", reservation_id="r")
    assert (extended.amount, extended.deadline_ms, extended.sequence) == (8, 9_000, 5)
    changed = replies.plan_change([0, 0, 6, b"free"], account="a", plan="paid")
    assert (changed.previous_plan, changed.plan) == ("free", "paid")
    adjusted = replies.balance_change([0, 0, 20, 1, 8], account="a")
    assert (adjusted.credits, adjusted.chat_messages, adjusted.sequence) == (20, 1, 8)
    assert replies.limit_reset([0, 0, 2, 9]) == 2
