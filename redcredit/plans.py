"""What a plan is: its rate limits, its refills, and whether it bypasses balances.

Kept apart from :mod:`redcredit.config` (which re-exports every name here):
these models are the plan rules the engine sends to Lua, while config is
about where settings come from.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from types import MappingProxyType
from typing import Annotated, Any, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import validation as v

__all__ = [
    "BUILTIN_PLANS",
    "GrantSettings",
    "LimitSettings",
    "PlanSettings",
    "RefillSettings",
]

BurnCriterion = Literal["priority", "expiry", "category", "effective", "created"]
_CATEGORY = r"^[a-z][a-z0-9_]{0,31}$"


class LimitSettings(BaseModel):
    """A rate limit: ``rate`` per ``period``, with bursts up to ``burst``.

    ``requests`` counts calls (GCRA: exact bursts, one stored number);
    ``credits`` is a token bucket drained by each call's cost (or, for a
    reservation, the amount held), e.g. tokens per minute. ``per_model``
    keeps one state per (account, model). A ``shadow`` limit is computed and
    journaled but never refuses, for rolling out new limits safely.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    kind: Literal["requests", "credits"] = "requests"
    rate: int = Field(ge=1, le=10**9)
    period: timedelta
    burst: int | None = Field(default=None, ge=1, le=10**12)
    per_model: bool = False
    shadow: bool = False

    @field_validator("period")
    @classmethod
    def _period(cls, value: timedelta) -> timedelta:
        if not timedelta(milliseconds=1) <= value <= timedelta(days=366):
            raise ValueError("period must lie between 1 ms and a year")
        return value

    @property
    def capacity(self) -> int:
        return self.burst if self.burst is not None else self.rate


class RefillSettings(BaseModel):
    """Free balances refilled once a period: a recurring grant.

    ``every`` is ``"day"``, ``"week"`` (from Monday) or ``"month"``, on calendar
    boundaries in ``timezone``, or a duration: a rolling period from the last
    refill. The credits go into the account's ``refill`` bucket (of
    ``category`` and ``priority``), which expires ``expires_in`` after the
    period starts (never by default).

    - ``mode="top_up_to"`` (the default) tops the account's credits up to
      ``credits``, never lowering them: a balance above it (after a purchase)
      gets nothing. ``mode="add"`` adds ``credits`` every period.
    - ``rollover`` is what the refill bucket keeps of its unspent credits
      when a new period starts: ``"all"`` (the default), ``"none"``, or a cap
      (an int). What live holds need is always kept.

    Chat messages are one balance: ``mode`` applies to them, ``rollover`` and
    ``expires_in`` do not.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    credits: int = Field(default=0, ge=0, le=v.MAX_AMOUNT)
    chat_messages: int = Field(default=0, ge=0, le=v.MAX_AMOUNT)
    every: Literal["day", "week", "month"] | timedelta
    timezone: str = "UTC"
    mode: Literal["top_up_to", "add"] = "top_up_to"
    rollover: Literal["all", "none"] | Annotated[int, Field(ge=0, le=v.MAX_AMOUNT)] = "all"
    expires_in: timedelta | None = None
    category: str = Field(default="promotional", pattern=_CATEGORY)
    priority: int = Field(default=50, ge=0, le=v.MAX_PRIORITY)

    @field_validator("expires_in")
    @classmethod
    def _expiry(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and not timedelta(seconds=1) <= value <= timedelta(days=3660):
            raise ValueError("expires_in must lie between a second and ten years")
        return value

    @field_validator("rollover", mode="before")
    @classmethod
    def _rollover(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f'must be "all", "none" or a cap (an int), not {value!r}')
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v.short_repr(value)}") from None
        return value

    @field_validator("every")
    @classmethod
    def _every(cls, value: Any) -> Any:
        if isinstance(value, timedelta) and value < timedelta(seconds=1):
            raise ValueError("a rolling refill period must be at least a second")
        return value


class PlanSettings(BaseModel):
    """What a plan changes. A bypassing plan (paid, demo) is never refused for
    credits or chat messages; its usage is still journaled. Its rate limits and
    refills apply all the same."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bypass: bool = False
    limits: tuple[LimitSettings, ...] = ()
    refill: RefillSettings | None = None
    # A credit line for postpaid customers: credits may go this far below
    # zero. Every other plan keeps "never below zero".
    overdraft: int = Field(default=0, ge=0, le=10**15)

    @field_validator("limits")
    @classmethod
    def _unique(cls, limits: tuple[LimitSettings, ...]) -> tuple[LimitSettings, ...]:
        names = [limit.name for limit in limits]
        if len(names) != len(set(names)):
            raise ValueError("limit names must be unique within a plan")
        return limits

    @field_validator("bypass", mode="before")
    @classmethod
    def _bool_only(cls, value: Any) -> Any:
        # Strings come from the environment ("true"); an int is more likely a
        # misplaced credit amount than a flag.
        if not isinstance(value, bool | str):
            raise ValueError(f"must be true or false, not {v.short_repr(value)}")
        return value


class GrantSettings(BaseModel):
    """How credit buckets burn, and how many an account may hold.

    ``categories`` lists the grant categories in the order they burn when
    the criteria before ``category`` in ``burn_order`` tie (promotional
    before paid by default); a grant's category must be one of them.
    ``burn_order`` is the order of the criteria: lower priority first, then
    soonest expiry (never-expiring last), then category, then earliest
    effective start, then earliest created, as billing platforms do. The
    base bucket of every account (``paid``, priority ``default_priority``,
    never expiring) burns by the same rules.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    categories: tuple[Annotated[str, Field(pattern=_CATEGORY)], ...] = ("promotional", "paid")
    burn_order: tuple[BurnCriterion, ...] = (
        "priority",
        "expiry",
        "category",
        "effective",
        "created",
    )
    # Grants an account may hold at once, besides its base and refill buckets.
    max_grants: int = Field(default=32, ge=1, le=256)
    default_priority: int = Field(default=50, ge=0, le=v.MAX_PRIORITY)

    @field_validator("categories")
    @classmethod
    def _categories(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("categories must be unique")
        if "paid" not in value:
            raise ValueError("categories must include 'paid', the base bucket's")
        return value

    @field_validator("burn_order")
    @classmethod
    def _order(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value) or not value:
            raise ValueError("burn_order must name each criterion at most once, and one at least")
        return value


BUILTIN_PLANS: Final[Mapping[str, PlanSettings]] = MappingProxyType(
    {
        "free": PlanSettings(bypass=False),
        "paid": PlanSettings(bypass=True),
        "demo": PlanSettings(bypass=True),
    }
)
