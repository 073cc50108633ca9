"""Credit buckets on the Python side: a grant's arguments checked, and buckets for hydrate.lua.

The buckets themselves live in Redis (``lua/_buckets.lua``); this module only
validates what a call sends, before any I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from .. import validation as v
from ..errors import InvalidInput
from ..plans import GrantSettings
from .loader import BucketSnapshot

__all__ = ["BucketGrant", "hydrated"]

_TEN_YEARS_MS: Final = 3660 * 86_400_000


@dataclass(frozen=True, slots=True)
class BucketGrant:
    """A grant that makes a bucket of its own, checked; times in ms (0: none)."""

    id: str
    named: bool
    category: str
    priority: int
    start_ms: int
    end_ms: int
    lasting_ms: int

    @classmethod
    def of(
        cls,
        grants: GrantSettings,
        *,
        credits: int,
        category: str | None,
        priority: int | None,
        effective_at: datetime | None,
        expires_at: datetime | None,
        expires_in: int | timedelta | None,
        grant_id: str | None,
        new_grant_id: str,
    ) -> BucketGrant:
        if credits == 0:
            raise InvalidInput("a grant with a bucket must add credits (1 or more)")
        if expires_at is not None and expires_in is not None:
            raise InvalidInput("give expires_at or expires_in, not both")
        start_ms = (
            0 if effective_at is None else v.check_instant_ms(effective_at, name="effective_at")
        )
        end_ms = 0 if expires_at is None else v.check_instant_ms(expires_at, name="expires_at")
        if start_ms and end_ms and end_ms <= start_ms:
            raise InvalidInput("expires_at must come after effective_at")
        lasting_ms = 0
        if expires_in is not None:
            lasting_ms = v.check_duration_ms(
                expires_in, name="expires_in", minimum_ms=1000, maximum_ms=_TEN_YEARS_MS
            )
        return cls(
            id=v.check_grant_id(grant_id if grant_id is not None else new_grant_id),
            named=grant_id is not None,
            category="paid" if category is None else v.check_category(category, grants.categories),
            priority=grants.default_priority if priority is None else v.check_priority(priority),
            start_ms=start_ms,
            end_ms=end_ms,
            lasting_ms=lasting_ms,
        )

    def fingerprint(self, chat_messages: int) -> str:
        # A made-up id is left out: a retry makes another, and must get the first one back.
        named = self.id if self.named else ""
        return (
            f"bucket:{chat_messages}:{named}:{self.category}:{self.priority}:"
            f"{self.start_ms}:{self.end_ms}:{self.lasting_ms}"
        )

    def args(self) -> tuple[str | int, ...]:
        """grant.lua's ARGV[11..16]."""
        return (self.id, self.category, self.priority, self.start_ms, self.end_ms, self.lasting_ms)


def hydrated(bucket: BucketSnapshot) -> str:
    """A bucket as hydrate.lua reads it (ids and categories hold no ',' or ';')."""
    grant_id = bucket.id if bucket.id == "refill" else v.check_grant_id(bucket.id)
    fields = (
        grant_id,
        v.check_category(bucket.category, None),
        v.check_priority(bucket.priority),
        v.check_amount(bucket.remaining, name="remaining"),
        v.check_amount(bucket.granted, name="granted"),
        v.check_amount(bucket.effective_ms, name="effective_ms"),
        v.check_amount(bucket.expires_ms, name="expires_ms"),
        v.check_amount(bucket.created_ms, name="created_ms"),
        0 if bucket.pending else 1,
    )
    return ",".join(map(str, fields))
