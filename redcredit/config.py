"""Typed settings, from arguments, ``REDCREDIT_*`` environment variables or a TOML file.

Precedence, highest first: arguments, environment variables, the TOML file,
the defaults. Nested values (plans, costs) merge key by key across sources,
so ``REDCREDIT_COSTS__CHAT=2`` changes the price of ``chat`` and keeps the
rest of the file's cost table.

Environment variables (names are case-insensitive, so features and plans set
this way have lowercase names)::

    REDCREDIT_FREE_CREDITS=25
    REDCREDIT_RESERVATION_TTL=120                  # seconds, or ISO 8601 "PT2M"
    REDCREDIT_PLANS__TEAM__BYPASS=true
    REDCREDIT_COSTS='{"chat": 2, "document": {"base": 2, "per_unit": 1}}'
    REDCREDIT_COSTS__CHAT=2                        # one feature, flat cost
    REDCREDIT_COSTS__DOCUMENT='{"base": 2, "per_unit": 1}'
    REDCREDIT_COSTS__DOCUMENT__PER_UNIT=3          # one field of a rule

A TOML file gives settings in ``[redcredit]`` and the cost table in
``[costs]`` (or ``[redcredit.costs]``). A :class:`CostTable` given as an
argument replaces the cost tables of the other sources instead of merging.

Invalid settings raise :class:`ConfigError` from ``Settings(...)``,
:meth:`Settings.load` and :meth:`Settings.from_toml`. ``Settings.model_validate*``
runs the same checks (pydantic calls ``__init__``, so the environment is read
there too, below the given values) but reports them as pydantic's
``ValidationError``.

Secrets: the passwords in ``redis_url`` and ``database_url`` never appear in
a repr, in ``str()``, in a dump (``model_dump``, ``model_dump_json``: pass
``context={"reveal_secrets": True}`` for a copy that keeps them, e.g. for a
child process) or in a validation error; :func:`redcredit.secrets.masked_url` shows a URL the
same way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Self

from pydantic import (
    Field,
    FieldSerializationInfo,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from . import validation as v
from .costs import CostTable, read_toml
from .errors import ConfigError, InvalidInput, UnknownPlan
from .plans import BUILTIN_PLANS, GrantSettings, LimitSettings, PlanSettings, RefillSettings
from .secrets import check_database_url, check_redis_url, masked_url, without_secrets

__all__ = [
    "BUILTIN_PLANS",
    "GrantSettings",
    "LimitSettings",
    "PlanSettings",
    "RefillSettings",
    "Settings",
]


_DURATIONS: Final = (
    "reservation_ttl",
    "reservation_ttl_min",
    "reservation_ttl_max",
    "reservation_retention",
    "idempotency_window",
    "redis_socket_timeout",
    "redis_connect_timeout",
    "redis_retry_deadline",
    "database_timeout",
    "durability_timeout",
    "sync_interval",
    "sync_claim_idle",
    "sync_retry_max",
)
_COUNTS: Final = (
    "partitions",
    "free_credits",
    "free_chat_messages",
    "redis_max_connections",
    "database_pool_size",
    "sync_batch_size",
    "pipeline_max_batch",
)
_SECRET_FIELDS: Final = ("redis_url", "database_url")
_IDENTIFIER: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_RULE_NUMBERS: Final = frozenset({"base", "per_unit", "max_units"})
_SECONDS: Final = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")

# The parsed [redcredit] and [costs] tables while Settings.from_toml builds its
# instance; a context variable so concurrent threads and tasks do not mix files.
_toml_values: ContextVar[dict[str, Any] | None] = ContextVar("_toml_values", default=None)


class Settings(BaseSettings):
    """Everything a deployment configures. Invalid values raise :class:`ConfigError`.

    The built-in plans ``free``, ``paid`` and ``demo`` always exist; ``plans``
    adds to them or overrides them. ``costs`` takes a :class:`CostTable`
    (which replaces lower-precedence cost tables) or a mapping such as
    ``{"chat": 1, "document": {"base": 2, "per_unit": 1}}`` (which merges).
    Durations take a timedelta, seconds, or an ISO 8601 duration string.
    """

    model_config = SettingsConfigDict(
        env_prefix="REDCREDIT_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
        frozen=True,
        # A pydantic error would otherwise quote the input, URLs and passwords included.
        hide_input_in_errors=True,
    )

    redis_url: str | None = None
    # A Redis Cluster, or one server: "auto" asks the server on first use.
    # redis_url is then any node; redis_seed_nodes ("host:port") are more
    # nodes to start from, with the URL's credentials and TLS settings.
    redis_cluster: Literal["auto"] | bool = "auto"
    # NoDecode: the environment's value is read by the validator, JSON or not.
    redis_seed_nodes: Annotated[tuple[str, ...], NoDecode] = ()
    key_prefix: str = "rc"
    # Fixed for the life of a deployment: changing it moves accounts to other keys.
    partitions: int = Field(default=64, ge=64, le=16384)
    # Opening balances of an account that has never been seen.
    free_credits: int = 0
    free_chat_messages: int = 0
    default_plan: str = "free"
    plans: dict[str, PlanSettings] = Field(default_factory=lambda: dict(BUILTIN_PLANS))
    grants: GrantSettings = GrantSettings()
    reservation_ttl: timedelta = timedelta(seconds=60)
    reservation_ttl_min: timedelta = timedelta(seconds=1)
    reservation_ttl_max: timedelta = timedelta(days=1)
    # How long a settled, released or lapsed reservation's record is kept, so
    # that a repeated settle gets the first outcome instead of "not found".
    reservation_retention: timedelta = timedelta(hours=1)
    idempotency_window: timedelta = timedelta(hours=24)
    redis_socket_timeout: timedelta = timedelta(seconds=2)
    redis_connect_timeout: timedelta = timedelta(seconds=1)
    redis_max_connections: int = Field(default=64, ge=1, le=10_000)
    # How long a call follows redirects and waits out refusals that ran
    # nothing (TRYAGAIN and CLUSTERDOWN during a reshard or a failover, a
    # node that cannot be connected to) before it fails. A call that may
    # have run is never re-sent, whatever this says.
    redis_retry_deadline: timedelta = timedelta(seconds=1)
    # The async client sends concurrent calls together, up to this many per
    # round trip; 1 turns the coalescing off.
    pipeline_max_batch: int = Field(default=128, ge=1, le=10_000)
    # "aof": answer only once the change reached the AOF on disk (WAITAOF);
    # "replica": once a replica has it (WAIT). Costs a wait per mutating call.
    durability: Literal["none", "aof", "replica"] = "none"
    durability_timeout: timedelta = timedelta(seconds=1)
    costs: CostTable = Field(default_factory=CostTable)

    # PostgreSQL, the system of record.
    database_url: str | None = None
    pg_schema: str = "redcredit"
    database_pool_size: int = Field(default=4, ge=1, le=1_000)
    # How long loading an account waits for PostgreSQL before the call fails
    # with BackendUnavailable: a request should not hang while it is down.
    database_timeout: timedelta = timedelta(seconds=2)
    # The syncer: journal entries per PostgreSQL transaction, how often an
    # idle syncer looks for new entries, how long a syncer that stopped
    # renewing its lease keeps its partitions (and the entries it left
    # pending) before another takes them, and the longest wait between
    # retries while PostgreSQL is down.
    sync_batch_size: int = Field(default=2_000, ge=1, le=100_000)
    sync_interval: timedelta = timedelta(milliseconds=200)
    sync_claim_idle: timedelta = timedelta(seconds=30)
    sync_retry_max: timedelta = timedelta(seconds=5)
    sync_group: str = "redcredit-syncer"
    # Before committing a batch, wait until Redis has its entries on disk
    # (WAITAOF, with an append-only file) and on every replica of their node
    # (WAIT): a Redis restarted from its file, or a promoted replica, never
    # lacks what PostgreSQL holds. Each wait slows a syncer (README), and a
    # lagging replica holds it back; without them a failover may lose entries.
    sync_waits_for_aof: bool = True
    sync_waits_for_replicas: bool = True

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            # Our own checks never quote a URL's password, but a value of the
            # wrong type is shown as given.
            urls = [url for name in _SECRET_FIELDS if isinstance(url := values.get(name), str)]
            raise ConfigError(
                without_secrets(
                    f"invalid redcredit settings: {v.describe_validation_error(exc)}", *urls
                )
            ) from exc
        except SettingsError as exc:
            # e.g. REDCREDIT_COSTS holding malformed JSON.
            raise ConfigError(f"invalid redcredit settings: {exc}") from exc

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Every source's cost table is brought to one shape (a flat mapping) so
        # that pydantic-settings can merge them feature by feature.
        sources: tuple[PydanticBaseSettingsSource, ...] = (
            _FlatCosts(init_settings, from_text=False),
            _FlatCosts(env_settings, from_text=True),
            _FlatCosts(dotenv_settings, from_text=True),
            _FlatCosts(file_secret_settings, from_text=True),
        )
        toml = _toml_values.get()
        if toml is not None:
            sources += (_FlatCosts(_TomlSource(settings_cls, toml), from_text=False),)
        return sources

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> Self:
        """Settings from arguments, the environment and (if ``path`` is given) a TOML file."""
        if path is None:
            return cls(**overrides)
        return cls.from_toml(path, **overrides)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> Self:
        """Settings from the ``[redcredit]`` and ``[costs]`` tables of a TOML file.

        Precedence: ``overrides``, then environment variables, then the file,
        then the defaults. A missing or malformed file raises :class:`ConfigError`.
        """
        document = read_toml(path)
        values = document.get("redcredit", {})
        costs = document.get("costs")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: 'redcredit' must be a table, not {v.short_repr(values)}")
        if costs is not None:
            if not isinstance(costs, dict):
                raise ConfigError(f"{path}: 'costs' must be a table, not {v.short_repr(costs)}")
            if "costs" in values:
                raise ConfigError(f"{path}: give the cost table as [costs] or [redcredit.costs]")
            values = {**values, "costs": costs}
        token = _toml_values.set(values)
        try:
            return cls(**overrides)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (from {path}, the environment and arguments)") from exc
        finally:
            _toml_values.reset(token)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            secret = name in _SECRET_FIELDS and isinstance(value, str)
            yield name, masked_url(value) if secret else value

    @field_serializer(*_SECRET_FIELDS)
    def _masked(self, value: str | None, info: FieldSerializationInfo) -> str | None:
        context = info.context
        if value is None or (isinstance(context, dict) and context.get("reveal_secrets") is True):
            return value
        return masked_url(value)

    @field_validator("redis_url")
    @classmethod
    def _redis_readable(cls, value: str | None) -> str | None:
        return None if value is None else _value_error(check_redis_url, value)

    @field_validator("redis_cluster", mode="before")
    @classmethod
    def _cluster_choice(cls, value: Any) -> Any:
        return v.cluster_choice(value)

    @field_validator("redis_seed_nodes", mode="before")
    @classmethod
    def _seed_list(cls, value: Any) -> Any:
        return v.seed_nodes(value)

    @field_validator("database_url")
    @classmethod
    def _libpq_readable(cls, value: str | None) -> str | None:
        return None if value is None else _value_error(check_database_url, value)

    @field_validator("key_prefix", "sync_group")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return _value_error(v.check_key_prefix, value)

    @field_validator("pg_schema")
    @classmethod
    def _schema(cls, value: str) -> str:
        if not _IDENTIFIER.fullmatch(value):
            raise ValueError(
                f"pg_schema must be a lowercase SQL identifier (a-z, 0-9, _), not "
                f"{v.short_repr(value)}"
            )
        return value

    @field_validator(*_COUNTS, mode="before")
    @classmethod
    def _integer_only(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic would read True as 1 and 64.0 as 64; strings come from the
        # environment and are parsed by pydantic.
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(
                f"{info.field_name} must be an integer, not "
                f"{type(value).__name__} {v.short_repr(value)}"
            )
        return value

    @field_validator("free_credits", "free_chat_messages")
    @classmethod
    def _amount(cls, value: int, info: ValidationInfo) -> int:
        try:
            return v.check_amount(value, name=info.field_name or "amount")
        except InvalidInput as exc:
            raise ValueError(str(exc)) from None

    @field_validator(*_DURATIONS, mode="before")
    @classmethod
    def _duration_type(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"{info.field_name} must be a duration, not a bool")
        if isinstance(value, str) and _SECONDS.fullmatch(value.strip()):
            # An environment variable holds seconds as text; pydantic only
            # parses ISO 8601 and [-][DD]HH:MM:SS from strings.
            return float(value) if "." in value else int(value)
        return value

    @field_validator(*_DURATIONS)
    @classmethod
    def _duration_positive(cls, value: timedelta, info: ValidationInfo) -> timedelta:
        # Redis takes whole milliseconds, and 0 ms would mean "no expiry" or an error.
        if value < timedelta(milliseconds=1):
            raise ValueError(f"{info.field_name} must be at least 1 ms, not {value}")
        return value

    @field_validator("default_plan")
    @classmethod
    def _plan_name(cls, value: str) -> str:
        return _value_error(v.check_plan_name, value)

    @field_validator("plans")
    @classmethod
    def _merge_builtin_plans(cls, plans: dict[str, PlanSettings]) -> dict[str, PlanSettings]:
        for name in plans:
            _value_error(v.check_plan_name, name)
        return {**BUILTIN_PLANS, **plans}

    @field_validator("costs", mode="before")
    @classmethod
    def _cost_table(cls, value: Any) -> Any:
        return CostTable.from_mapping(_flat(value)) if isinstance(value, Mapping) else value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.default_plan not in self.plans:
            raise ValueError(
                f"default_plan {self.default_plan!r} is not a defined plan "
                f"(defined: {', '.join(sorted(self.plans))})"
            )
        for name, plan in self.plans.items():
            refill = plan.refill
            if refill is not None and refill.category not in self.grants.categories:
                raise ValueError(
                    f"plan {name!r} refills credits of category {refill.category!r}, which is "
                    f"not in grants.categories ({', '.join(self.grants.categories)})"
                )
        if not self.reservation_ttl_min <= self.reservation_ttl <= self.reservation_ttl_max:
            raise ValueError(
                f"reservation_ttl ({self.reservation_ttl}) must lie between "
                f"reservation_ttl_min ({self.reservation_ttl_min}) and "
                f"reservation_ttl_max ({self.reservation_ttl_max})"
            )
        return self

    @property
    def versioned_prefix(self) -> str:
        """The key prefix with the schema version (1) that every key carries."""
        return f"{self.key_prefix}:v1"

    @property
    def bypass_plans(self) -> tuple[str, ...]:
        """Names of the plans that bypass credit and chat-message limits, sorted."""
        return tuple(sorted(name for name, plan in self.plans.items() if plan.bypass))

    def require_plan(self, plan: object) -> str:
        """``plan`` if it is a defined plan's name; :class:`UnknownPlan` otherwise."""
        name = v.check_plan_name(plan)
        if name not in self.plans:
            raise UnknownPlan(
                f"plan {name!r} is not defined (defined: {', '.join(sorted(self.plans))})"
            )
        return name


class _TomlSource(PydanticBaseSettingsSource):
    """The file's tables, below the environment in precedence."""

    def __init__(self, settings_cls: type[BaseSettings], values: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._values = values

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        # Unused: __call__ returns the whole table at once.
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


class _FlatCosts(PydanticBaseSettingsSource):
    """Another source, with its cost table as a flat mapping of features.

    For a source of text (the environment), ``REDCREDIT_COSTS__CHAT=2``
    arrives as the string ``"2"``, which the strict cost table would refuse,
    so per-feature strings are read as JSON numbers or objects; JSON in
    ``REDCREDIT_COSTS`` is already parsed by pydantic-settings.
    """

    def __init__(self, source: PydanticBaseSettingsSource, *, from_text: bool) -> None:
        super().__init__(source.settings_cls)
        self._source = source
        self._from_text = from_text

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        # Unused: __call__ delegates to the wrapped source.
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        values = self._source()
        costs = values.get("costs")
        if isinstance(costs, Mapping):
            costs = _flat(costs)
            if self._from_text:
                costs = {name: _env_cost(cost) for name, cost in costs.items()}
            values = {**values, "costs": costs}
        return values


def _flat(costs: Mapping[str, Any]) -> dict[str, Any]:
    # {"features": {...}} is how a CostTable serialises; a feature cannot be
    # named "features" (it is reserved), so that one key means this form.
    features = costs.get("features") if len(costs) == 1 else None
    return dict(features) if isinstance(features, Mapping) else dict(costs)


def _env_cost(cost: Any) -> Any:
    if isinstance(cost, str):
        return _env_json(cost)
    if isinstance(cost, dict):
        return {
            key: _env_json(value) if key in _RULE_NUMBERS and isinstance(value, str) else value
            for key, value in cost.items()
        }
    return cost


def _env_json(text: str) -> Any:
    # Anything that is not an int or a JSON object stays a string, for the
    # cost table to refuse with its own message.
    try:
        parsed = json.loads(text)
    except ValueError:
        return text
    if isinstance(parsed, dict) or (isinstance(parsed, int) and not isinstance(parsed, bool)):
        return parsed
    return text


def _value_error(check: Callable[[Any], str], value: object) -> str:
    # pydantic reports a ValueError with the field's location; InvalidInput is
    # one, but re-raising keeps the message free of a chained traceback.
    try:
        return check(value)
    except (InvalidInput, ConfigError) as exc:
        raise ValueError(str(exc)) from None
