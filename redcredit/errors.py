"""Every error redcredit raises derives from :class:`RedCreditError`.

Callers that only want to know "did redcredit refuse or fail" catch the root;
callers that need to tell "pay" from "wait" from "retry later" catch the leaves.
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "AccountHasHistory",
    "AccountIdError",
    "AccountMoved",
    "AlreadyApplied",
    "BackendUnavailable",
    "BalanceOverflow",
    "BatchGone",
    "CapReached",
    "ConfigError",
    "EmbeddedServerError",
    "GrantError",
    "GrantExists",
    "GrantExpired",
    "GrantNotFound",
    "IdempotencyConflict",
    "InsufficientChatMessages",
    "InsufficientCredits",
    "InsufficientFunds",
    "InvalidInput",
    "MoveRefused",
    "NotDurable",
    "NotInScope",
    "RateLimited",
    "RedCreditError",
    "RedisAuthError",
    "RedisCommandError",
    "RedisRefused",
    "ReservationClosed",
    "ReservationError",
    "ReservationLapsed",
    "ReservationNotFound",
    "ScopeError",
    "ScopeRequired",
    "TooManyGrants",
    "UnknownFeature",
    "UnknownPlan",
]


class RedCreditError(Exception):
    """Root of every error raised by redcredit."""


# -- Refused before any I/O: fix the arguments or the configuration. -----------


class InvalidInput(RedCreditError, ValueError):
    """An argument was refused before any I/O; nothing was changed.

    :class:`BalanceOverflow` is the one member refused later, by Redis.
    """


class AccountIdError(InvalidInput):
    """An account id is empty, too long, or holds characters that are not allowed."""


class UnknownFeature(InvalidInput, KeyError):
    """A feature has no entry in the cost table (it is never priced at zero by accident)."""

    def __str__(self) -> str:
        # KeyError would repr() the message; keep it readable.
        return str(self.args[0]) if self.args else ""


class UnknownPlan(InvalidInput):
    """A plan name that the configuration does not define."""


class ConfigError(RedCreditError, ValueError):
    """The configuration (settings, cost table, TOML file) is invalid."""


# -- Refused by Redis, nothing changed: pay (a top-up, another plan). ----------


class InsufficientFunds(RedCreditError):
    """Base of the "the account cannot pay for this" refusals; nothing was changed."""

    def __init__(
        self, account: str, required: int, available: int, *, level: str | None = None
    ) -> None:
        self.account = account
        self.required = required
        self.available = available
        # On a path of a tree, the root: what every level together could pay.
        self.level = account if level is None else level
        super().__init__(self._describe() + self._where())

    def _where(self) -> str:
        if self.level == self.account:
            return ""
        return f" on its path up to {self.level!r}"

    def _describe(self) -> str:
        return f"account {self.account!r} needs {self.required} but has {self.available} available"


class InsufficientCredits(InsufficientFunds):
    """Not enough available credits (credits minus active holds)."""

    def _describe(self) -> str:
        return (
            f"account {self.account!r} needs {self.required} credits but has "
            f"{self.available} available"
        )


class InsufficientChatMessages(InsufficientFunds):
    """No chat messages left."""

    def _describe(self) -> str:
        return (
            f"account {self.account!r} needs {self.required} chat messages but has "
            f"{self.available} left"
        )


# -- Refused by Redis, nothing changed: wait, then call again. -----------------


class RateLimited(RedCreditError):
    """A rate limit refused the call: wait ``retry_after_ms``, nothing was changed.

    Kept apart from the credit errors so callers can tell "wait" from "pay".
    """

    def __init__(
        self, account: str, limit: str, retry_after_ms: int, *, level: str | None = None
    ) -> None:
        self.account = account
        self.limit = limit
        self.retry_after_ms = retry_after_ms
        # The level of the call's path whose limit refused (the account itself alone).
        self.level = account if level is None else level
        whose = "its" if self.level == account else f"{self.level!r}'s"
        super().__init__(
            f"account {account!r} is over {whose} {limit!r} limit; retry in {retry_after_ms} ms"
        )

    @property
    def retry_after(self) -> float:
        """Seconds to wait, from the Redis server's clock."""
        return self.retry_after_ms / 1000


# -- Refused by Redis, nothing changed: look at the idempotency key or reservation.


class IdempotencyConflict(RedCreditError):
    """An idempotency key was reused for a different operation or different arguments."""


class AlreadyApplied(RedCreditError):
    """The call was applied before Redis lost its copy of the account; its reply is gone.

    Raised, for the rest of the idempotency window, by a call repeated with
    the key of a call that PostgreSQL already holds, once the account has
    been reloaded from PostgreSQL (after Redis lost its data, or an eviction
    that outlived the key's record). Nothing changed: read the balance for
    the state after it. ``sequence`` is the journal entry of the first call.
    """

    def __init__(self, account: str, sequence: int) -> None:
        self.account = account
        self.sequence = sequence
        super().__init__(
            f"a call with this idempotency key was applied to account {account!r} before "
            f"(journal entry {sequence}); its first reply is no longer kept"
        )


class ReservationError(RedCreditError):
    """Base of reservation errors."""

    def __init__(self, message: str, *, account: str, reservation_id: str) -> None:
        self.account = account
        self.reservation_id = reservation_id
        super().__init__(message)


class ReservationNotFound(ReservationError):
    """No such reservation (never made, or its record has expired)."""


class ReservationClosed(ReservationError):
    """The reservation is already settled or released, so its lease cannot be renewed."""


class ReservationLapsed(ReservationError):
    """The reservation's lease ran out before it was settled or extended."""


# -- Refused by Redis, nothing changed: a credit bucket (grant) refused. ------


class GrantError(RedCreditError):
    """Base of the refusals about one credit bucket; nothing was changed."""

    def __init__(self, message: str, *, account: str, grant_id: str) -> None:
        self.account = account
        self.grant_id = grant_id
        super().__init__(message)


class GrantNotFound(GrantError):
    """The account has no such bucket: never granted, spent, expired or voided."""


class GrantExists(GrantError, InvalidInput):
    """A live bucket of the account already has this grant id."""


class GrantExpired(GrantError, InvalidInput):
    """The grant would expire before it starts (by the server's clock)."""


class TooManyGrants(GrantError):
    """The account holds the most grants it may (``grants.max_grants``).

    Never merged silently: spend or void one, or raise the bound.
    """

    def __init__(self, *, account: str, grant_id: str, most: int) -> None:
        self.most = most
        super().__init__(
            f"account {account!r} holds {most} grants, the most it may "
            "(grants.max_grants); none was added",
            account=account,
            grant_id=grant_id,
        )


# -- Refused by Redis, nothing changed: a tree of accounts. --------------------


class ScopeError(RedCreditError):
    """Base of the refusals about a tree of accounts; nothing was changed."""

    def __init__(self, message: str, *, account: str) -> None:
        self.account = account
        super().__init__(message)


class NotInScope(ScopeError, InvalidInput):
    """The path named is not the stored tree: ``level``'s parent is ``parent``."""

    def __init__(
        self, message: str, *, account: str, level: str | None = None, parent: str | None
    ) -> None:
        self.level = account if level is None else level
        self.parent = parent
        super().__init__(message, account=account)


class ScopeRequired(ScopeError, InvalidInput):
    """The account is a member of ``root``'s tree: name it by its path (a ``Scope``)."""

    def __init__(self, *, account: str, root: str) -> None:
        self.root = root
        super().__init__(
            f"account {account!r} is in the tree of {root!r}: name it by its path, "
            f"e.g. Scope({root!r}, ..., {account!r})",
            account=account,
        )


class AccountHasHistory(ScopeError, InvalidInput):
    """Only a new account can be attached to a tree: this one has balances of its own."""


class AccountMoved(ScopeError):
    """The account was moved away from the place the call names (docs/scopes.md).

    ``to`` is the path of its new parent, root first (``None``: it is a root
    of its own now); ``move_id`` the idempotency key of the move still under
    way, when ``done`` is False.
    """

    def __init__(
        self,
        message: str,
        *,
        account: str,
        to: tuple[str, ...] | None,
        move_id: str | None = None,
        done: bool = True,
    ) -> None:
        self.to = to
        self.move_id = move_id
        self.done = done
        super().__init__(message, account=account)


MoveReason = Literal[
    "children", "holds", "cycle", "depth", "target", "not_found", "busy", "uncounted"
]


class MoveRefused(ScopeError):
    """A move was refused and nothing changed; ``reason`` says why.

    ``children``: the account has children (only a leaf moves); ``holds``: it
    has a live reservation; ``cycle``: the destination is in its own subtree;
    ``depth``: the tree would pass four levels; ``target``: the new parent
    does not exist; ``not_found``: the account does not; ``busy``: another
    move of it is half-done (``move_id``: retry that one); ``uncounted``: the
    system of record keeps no count of children yet (run ``redcredit migrate``).
    """

    def __init__(
        self, message: str, *, account: str, reason: MoveReason, move_id: str | None = None
    ) -> None:
        self.reason: MoveReason = reason
        self.move_id = move_id
        super().__init__(message, account=account)


class CapReached(RedCreditError):
    """A level's cap refused the call until its window turns; nothing was changed.

    Like :class:`RateLimited`, a "wait" (or raise the cap), not a "pay".
    """

    def __init__(
        self, account: str, *, level: str, resource: str, cap: int, used: int, retry_after_ms: int
    ) -> None:
        self.account = account
        self.level = level
        self.resource = resource
        self.cap = cap
        self.used = used
        self.retry_after_ms = retry_after_ms
        super().__init__(
            f"account {account!r}: the {resource} cap of {level!r} ({cap} per window, "
            f"{used} used or held) refuses; its next window starts in {retry_after_ms} ms"
        )

    @property
    def retry_after(self) -> float:
        return self.retry_after_ms / 1000


# -- Refused by Redis, nothing changed: a balance would lose exactness. --------


class BalanceOverflow(InvalidInput):
    """A grant or correction would push a balance past 2**53; nothing was changed.

    Refused by Redis, the only place that knows the balance, so unlike the
    rest of :class:`InvalidInput` it costs a round trip. It stays one because
    the amount is what to fix.
    """


# -- Backends: a server out of reach, refusing the login or the call for now,
#    or not started, or a change not made durable.


class BackendUnavailable(RedCreditError):
    """Redis (or PostgreSQL) could not be reached within the configured deadline.

    Also a server that answers but cannot serve: :class:`RedisRefused`,
    :class:`RedisAuthError`.
    """


class RedisRefused(BackendUnavailable):
    """Redis was reached and refused the call for now; the call was not applied.

    ``kind`` is Redis's own error code: ``OOM`` (``maxmemory`` reached under
    ``noeviction``), ``READONLY`` (a replica, e.g. after a failover),
    ``LOADING``, ``BUSY``, ``MASTERDOWN``, ``CLUSTERDOWN``, ``TRYAGAIN``,
    ``NOREPLICAS``, ``MISCONF``, or ``MOVED`` / ``ASK`` (the key's slot is
    served by another node). An outage, like a Redis that cannot be reached:
    the gate answers it by the route's ``on_unavailable``, and a lease keeps
    being renewed through it.
    """

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


class RedisAuthError(BackendUnavailable):
    """Redis refused the login (``WRONGPASS``, ``NOAUTH``...): fix the Redis URL's credentials.

    Counted with the outages, as a PostgreSQL refusing the login is: no call
    can be made until the credentials match again. ``kind`` is Redis's error
    code. The message never holds the password.
    """

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


class NotDurable(BackendUnavailable):
    """A change was applied in Redis but not confirmed durable (AOF or replica) in time."""


class BatchGone(RedCreditError):
    """The journal entries a syncer read are no longer pending in Redis: another syncer
    took them over, or Redis lost its data. The syncer commits none of them."""


class EmbeddedServerError(RedCreditError):
    """A server for the demo or the tests could not be found or started."""


# -- Redis answered with an error that is no outage: a fault to look into.


class RedisCommandError(RedCreditError):
    """Redis answered the call with an error that calling again will not mend.

    A script error, a key of another type under redcredit's prefix, an ACL
    user without the rights it needs, a slot rule broken, a client-side
    misuse of redis-py: a fault to look into, not an outage. ``kind`` is
    Redis's error code (``ERR``, ``WRONGTYPE``, ``NOPERM``, ``CROSSSLOT``...),
    or ``None`` when redis-py refused the call before sending it. The gate
    still answers it by the route's ``on_unavailable``: no decision can be made.
    """

    def __init__(self, kind: str | None, message: str) -> None:
        self.kind = kind
        super().__init__(message)
