"""Typed settings: from arguments, ``REDCREDIT_*`` environment variables or a TOML file."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from . import validation as v
from .costs import CostTable
from .errors import ConfigError, InvalidInput, UnknownPlan

__all__ = ["BUILTIN_PLANS", "PlanSettings", "Settings"]

T = TypeVar("T")

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class PlanSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # A bypassing plan is never refused for credits or chat messages (remaining
    # is unlimited), and its usage is still journaled.
    bypass: bool = False


BUILTIN_PLANS: Mapping[str, PlanSettings] = {
    "free": PlanSettings(bypass=False),
    "paid": PlanSettings(bypass=True),
    "demo": PlanSettings(bypass=True),
}


def _positive(duration: timedelta, name: str) -> timedelta:
    if duration <= timedelta(0):
        raise ValueError(f"{name} must be positive")
    return duration


class Settings(BaseSettings):
    """Everything a deployment configures. Invalid values raise :class:`ConfigError`.

    Cost tables come from Python (``costs=CostTable(...)`` or a mapping), from
    the ``[costs]`` table of a TOML file, or as JSON in ``REDCREDIT_COSTS``.
    """

    model_config = SettingsConfigDict(
        env_prefix="REDCREDIT_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
        frozen=True,
    )

    redis_url: str | None = None
    key_prefix: str = "rc"
    # Fixed for the life of a deployment: changing it moves accounts to other keys.
    partitions: int = Field(default=64, ge=64, le=16384)
    free_credits: int = 0
    free_chat_messages: int = 0
    default_plan: str = "free"
    plans: dict[str, PlanSettings] = Field(default_factory=lambda: dict(BUILTIN_PLANS))
    reservation_ttl: timedelta = timedelta(seconds=60)
    reservation_ttl_min: timedelta = timedelta(seconds=1)
    reservation_ttl_max: timedelta = timedelta(days=1)
    # How long a closed (or lapsed) reservation's record is kept, so that a
    # repeated settle gets the first outcome instead of "not found".
    reservation_retention: timedelta = timedelta(hours=1)
    idempotency_window: timedelta = timedelta(hours=24)
    redis_socket_timeout: timedelta = timedelta(seconds=2)
    redis_connect_timeout: timedelta = timedelta(seconds=1)
    redis_max_connections: int = Field(default=64, ge=1, le=10_000)
    # "aof": answer only once the change reached the AOF on disk (WAITAOF);
    # "replica": once a replica has it (WAIT). Costs a wait per mutating call.
    durability: Literal["none", "aof", "replica"] = "none"
    durability_timeout: timedelta = timedelta(seconds=1)
    costs: CostTable = Field(default_factory=CostTable)

    # PostgreSQL, the system of record.
    database_url: str | None = None
    pg_schema: str = "redcredit"
    database_pool_size: int = Field(default=4, ge=1, le=1_000)
    # The syncer: journal entries per PostgreSQL transaction, how often an
    # idle syncer looks for new entries, when entries left pending by a dead
    # syncer are claimed, and the longest wait between retries while
    # PostgreSQL is down.
    sync_batch_size: int = Field(default=2_000, ge=1, le=100_000)
    sync_interval: timedelta = timedelta(milliseconds=200)
    sync_claim_idle: timedelta = timedelta(seconds=30)
    sync_retry_max: timedelta = timedelta(seconds=5)
    sync_group: str = "redcredit-syncer"

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(f"invalid redcredit settings: {exc}") from None

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return _as_value_error(v.check_key_prefix, value)

    @field_validator(
        "free_credits",
        "free_chat_messages",
        "partitions",
        "redis_max_connections",
        "database_pool_size",
        "sync_batch_size",
        mode="before",
    )
    @classmethod
    def _no_bools(cls, value: Any) -> Any:
        # pydantic would read True as 1.
        if isinstance(value, bool | float):
            raise ValueError("must be an integer")
        return value

    @field_validator("pg_schema")
    @classmethod
    def _schema(cls, value: str) -> str:
        if not _IDENTIFIER.fullmatch(value):
            raise ValueError("pg_schema must be a lowercase SQL identifier (a-z, 0-9, _)")
        return value

    @field_validator("sync_group")
    @classmethod
    def _group(cls, value: str) -> str:
        return _as_value_error(v.check_key_prefix, value)

    @field_validator("free_credits", "free_chat_messages")
    @classmethod
    def _amount(cls, value: int) -> int:
        return _as_value_error(v.check_amount, value)

    @field_validator("default_plan")
    @classmethod
    def _plan_name(cls, value: str) -> str:
        return _as_value_error(v.check_plan_name, value)

    @field_validator("plans")
    @classmethod
    def _merge_builtin_plans(cls, plans: dict[str, PlanSettings]) -> dict[str, PlanSettings]:
        for name in plans:
            _as_value_error(v.check_plan_name, name)
        return {**BUILTIN_PLANS, **plans}

    @field_validator("costs", mode="before")
    @classmethod
    def _cost_mapping(cls, value: Any) -> Any:
        if isinstance(value, Mapping) and "features" not in value:
            return CostTable.from_mapping(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.default_plan not in self.plans:
            raise ValueError(f"default_plan {self.default_plan!r} is not a defined plan")
        for name in (
            "reservation_ttl",
            "reservation_ttl_min",
            "reservation_ttl_max",
            "reservation_retention",
            "idempotency_window",
            "redis_socket_timeout",
            "redis_connect_timeout",
            "durability_timeout",
            "sync_interval",
            "sync_claim_idle",
            "sync_retry_max",
        ):
            _positive(getattr(self, name), name)
        if not self.reservation_ttl_min <= self.reservation_ttl <= self.reservation_ttl_max:
            raise ValueError("reservation_ttl must lie within its min and max")
        if self.reservation_ttl_min < timedelta(milliseconds=1):
            raise ValueError("reservation_ttl_min must be at least 1 ms")
        return self

    @property
    def versioned_prefix(self) -> str:
        """The key prefix with the schema version that every key carries."""
        return f"{self.key_prefix}:v1"

    @property
    def bypass_plans(self) -> tuple[str, ...]:
        return tuple(sorted(name for name, plan in self.plans.items() if plan.bypass))

    def require_plan(self, plan: object) -> str:
        name = v.check_plan_name(plan)
        if name not in self.plans:
            raise UnknownPlan(
                f"plan {name!r} is not defined (known: {', '.join(sorted(self.plans))})"
            )
        return name

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> Self:
        """Settings from the ``[redcredit]`` and ``[costs]`` tables of a TOML file.

        Precedence: ``overrides``, then environment variables, then the file,
        then the defaults.
        """
        try:
            with open(path, "rb") as file:
                document = tomllib.load(file)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read settings from {path}: {exc}") from None
        values = document.get("redcredit", {})
        costs = document.get("costs")
        if not isinstance(values, dict) or not isinstance(costs, dict | None):
            raise ConfigError(f"[redcredit] and [costs] in {path} must be tables")
        values = dict(values)
        if costs is not None:
            values["costs"] = CostTable.from_mapping(costs)
        values.update(EnvSettingsSource(cls)())
        values.update(overrides)
        return cls(**values)


def _as_value_error(check: Callable[[Any], T], value: Any) -> T:
    # pydantic turns ValueError into a ValidationError, which __init__ wraps.
    try:
        return check(value)
    except InvalidInput as exc:
        raise ValueError(str(exc)) from None
