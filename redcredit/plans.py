"""What a plan is: its rate limits, its refills, and whether it bypasses balances.

Kept apart from :mod:`redcredit.config` (which re-exports every name here):
these models are the plan rules the engine sends to Lua, while config is
about where settings come from.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from types import MappingProxyType
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import validation as v

__all__ = ["BUILTIN_PLANS", "LimitSettings", "PlanSettings", "RefillSettings"]


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
    """Free balances topped up (never lowered) once a period.

    ``every`` is ``"day"``, ``"week"`` (from Monday) or ``"month"``, on calendar
    boundaries in ``timezone``, or a duration: a rolling period from the last
    refill. A balance above the amount (after a purchase) is left as it is.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    credits: int = Field(default=0, ge=0, le=v.MAX_AMOUNT)
    chat_messages: int = Field(default=0, ge=0, le=v.MAX_AMOUNT)
    every: Literal["day", "week", "month"] | timedelta
    timezone: str = "UTC"

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


BUILTIN_PLANS: Final[Mapping[str, PlanSettings]] = MappingProxyType(
    {
        "free": PlanSettings(bypass=False),
        "paid": PlanSettings(bypass=True),
        "demo": PlanSettings(bypass=True),
    }
)
