"""Where an account comes from when Redis does not have it.

A loader answers with an :class:`AccountSnapshot`; the engine inserts it into
Redis only if the account is still absent (so racing loaders cannot overwrite
each other) and then retries the call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..config import Settings

__all__ = [
    "AccountLoader",
    "AccountSnapshot",
    "AsyncAccountLoader",
    "AsyncDefaultsLoader",
    "BucketSnapshot",
    "DefaultsLoader",
]


@dataclass(frozen=True, slots=True)
class BucketSnapshot:
    """A credit bucket (a grant) as the system of record has it, besides the base bucket.

    ``pending`` buckets are not effective yet: their credits are not in the
    account's balance. Expiry and effective start are in ms on the server's
    clock; ``expires_ms`` 0 means never.
    """

    id: str
    category: str
    priority: int
    remaining: int
    granted: int
    effective_ms: int
    expires_ms: int
    created_ms: int
    pending: bool = False


@dataclass(frozen=True, slots=True)
class AccountSnapshot:
    """An account as the system of record has it, or as it opens when unknown."""

    credits: int
    chat_messages: int
    plan: str
    # Last sequence number the system of record has applied for this account.
    # At 0 (a new account, or a legacy row with no history) the opening
    # balances are journaled, so the ledger always sums to the balance.
    sequence: int = 0
    # Idempotency keys of calls the system of record holds, still within the
    # window: (key, sequence number of the call's entry, ms left in the window).
    # Reloaded with the account, so a call repeated after Redis lost the
    # account is not applied twice.
    applied_keys: tuple[tuple[str, int, int], ...] = ()
    # The account's buckets other than its base bucket, which holds the rest
    # of ``credits``: the live buckets' remaining credits are part of it.
    buckets: tuple[BucketSnapshot, ...] = ()
    # A tree's member: its parent and its tree's root (None for an account of
    # no tree, or a root), and the cap of the level with its current window's
    # use (lua/_scopes.lua: K, and 'window start,credits,messages').
    parent: str | None = None
    root: str | None = None
    cap: str = ""
    cap_use: str = ""
    # The instant (ms, server clock) of the last refill of credits ('c') and
    # of chat messages ('m') the system of record holds: the refill period
    # markers, so a reloaded account refills neither twice in a period nor
    # never.
    refilled: tuple[tuple[str, int], ...] = ()
    # How many children it has in its tree (docs/scopes.md); None when the
    # system of record keeps no count (a schema before migration 0006).
    children: int | None = 0


class AccountLoader(Protocol):
    def load(self, account: str) -> AccountSnapshot: ...


class AsyncAccountLoader(Protocol):
    async def load(self, account: str) -> AccountSnapshot: ...


class DefaultsLoader:
    """Every unknown account is new and opens with the configured free balances."""

    def __init__(self, settings: Settings) -> None:
        self._snapshot = AccountSnapshot(
            credits=settings.free_credits,
            chat_messages=settings.free_chat_messages,
            plan=settings.default_plan,
        )

    def load(self, account: str) -> AccountSnapshot:
        return self._snapshot


class AsyncDefaultsLoader:
    def __init__(self, settings: Settings) -> None:
        self._defaults = DefaultsLoader(settings)

    async def load(self, account: str) -> AccountSnapshot:
        return self._defaults.load(account)
