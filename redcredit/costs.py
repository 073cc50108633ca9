"""The one table of what each feature costs.

A feature costs a flat number of credits, follows a :class:`CostRule` (a base
plus a price per unit, e.g. per document page), or is priced by a Python
function of its units. A feature missing from the table is an error, never a
free call.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from os import PathLike
from pathlib import Path
from typing import Any, Final, Self

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from . import validation as v
from .errors import ConfigError, InvalidInput, UnknownFeature

__all__ = ["RESERVED_FEATURE_NAMES", "CostFunction", "CostRule", "CostTable", "read_toml"]

CostFunction = Callable[[int], int]

# "features" is the one key of a serialised table ({"features": {...}}); a
# feature of that name would make a plain mapping read as a serialised one.
RESERVED_FEATURE_NAMES: Final = frozenset({"features"})


class CostRule(BaseModel):
    """``base + per_unit * units`` credits, for features priced by size.

    ``max_units`` (if set) refuses larger requests; ``unit`` only names the
    unit in messages. Invalid fields raise :class:`ConfigError`.
    """

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")

    base: int = Field(default=0, ge=0, le=v.MAX_AMOUNT)
    per_unit: int = Field(ge=0, le=v.MAX_AMOUNT)
    unit: str = Field(default="unit", min_length=1, max_length=64)
    max_units: int | None = Field(default=None, ge=0, le=v.MAX_AMOUNT)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(f"invalid cost rule: {v.describe_validation_error(exc)}") from exc

    def price(self, units: int) -> int:
        """The cost of ``units`` units; refused above ``max_units`` or past 2**53."""
        units = v.check_amount(units, name=f"units ({self.unit})")
        if self.max_units is not None and units > self.max_units:
            raise InvalidInput(f"at most {self.max_units} {self.unit} allowed, not {units}")
        cost = self.base + self.per_unit * units
        if cost > v.MAX_AMOUNT:
            raise InvalidInput(f"the cost of {units} {self.unit} ({cost}) passes 2**53")
        return cost


class CostTable(BaseModel):
    """Feature name -> flat cost (int) or :class:`CostRule`, plus Python cost functions.

    Build it with :meth:`from_mapping`, :meth:`from_toml` or
    ``CostTable(features=...)``; invalid content raises :class:`ConfigError`.
    Treat it as immutable: :meth:`with_function` returns a new table.
    Cost functions are not serialised, so a table sent through JSON (e.g. to
    another process) lacks them and refuses their features as unknown.
    """

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")

    features: dict[str, int | CostRule] = Field(default_factory=dict)
    _functions: dict[str, CostFunction] = PrivateAttr(default_factory=dict)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(f"invalid cost table: {v.describe_validation_error(exc)}") from exc

    @field_validator("features", mode="before")
    @classmethod
    def _check_features(cls, features: Any) -> Any:
        if not isinstance(features, Mapping):
            raise ValueError(
                f"the cost table must be a mapping of feature names to costs, not "
                f"{type(features).__name__} {v.short_repr(features)}"
            )
        checked: dict[str, int | CostRule] = {}
        for name, cost in features.items():
            feature = _feature_name(name)
            if isinstance(cost, CostRule):
                checked[feature] = cost
            elif isinstance(cost, Mapping):
                try:
                    checked[feature] = CostRule.model_validate(dict(cost))
                except ValidationError as exc:
                    raise ValueError(
                        f"cost rule of {feature!r}: {v.describe_validation_error(exc)}"
                    ) from None
            else:
                # Raised as ValueError so that pydantic reports it with its location.
                try:
                    checked[feature] = v.check_amount(cost, name=f"cost of {feature!r}")
                except InvalidInput as exc:
                    raise ValueError(str(exc)) from None
        return checked

    @classmethod
    def from_mapping(cls, features: Mapping[str, Any]) -> Self:
        """``{"chat": 1, "document": {"base": 2, "per_unit": 1, "unit": "pages"}}``."""
        return cls(features=features)

    @classmethod
    def from_toml(cls, path: str | Path) -> Self:
        """The ``[costs]`` table of a TOML file (an absent table is an empty cost table)."""
        document = read_toml(path)
        costs = document.get("costs", {})
        if not isinstance(costs, dict):
            raise ConfigError(f"{path}: 'costs' must be a table, not {v.short_repr(costs)}")
        try:
            return cls.from_mapping(costs)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    def with_function(self, feature: str, function: CostFunction) -> Self:
        """A copy of this table in which ``function(units)`` prices ``feature``.

        It replaces any flat cost or rule of that name. The result of the
        function is checked like any amount (an int in ``0..2**53``).
        """
        try:
            feature = v.check_feature_name(feature)
        except InvalidInput as exc:
            raise ConfigError(str(exc)) from None
        if feature in RESERVED_FEATURE_NAMES:
            raise ConfigError(f"feature name {feature!r} is reserved")
        if not callable(function):
            raise ConfigError(f"the cost function of {feature!r} is not callable")
        # The flat entry goes too: a copy sent through JSON (which drops
        # functions) must refuse the feature, not charge its old price.
        features = {name: cost for name, cost in self.features.items() if name != feature}
        table = self.model_copy(update={"features": features})
        table._functions = {**self._functions, feature: function}
        return table

    def __contains__(self, feature: object) -> bool:
        return feature in self.features or feature in self._functions

    def names(self) -> list[str]:
        """Every priced feature, sorted."""
        return sorted({*self.features, *self._functions})

    def price(self, feature: str, units: int | None = None) -> int:
        """The cost of one use of ``feature``.

        A flat feature takes no ``units``; a rule or function feature requires
        them. Unknown features raise :class:`UnknownFeature`; every other
        refusal raises :class:`InvalidInput`.
        """
        entry = self.features.get(feature)
        if entry is None:
            function = self._functions.get(feature)
            if function is None:
                raise UnknownFeature(
                    f"feature {v.short_repr(feature)} is not in the cost table "
                    f"(known: {self._known()})"
                )
            units = self._units(feature, units, "unit")
            return v.check_amount(function(units), name=f"cost of {feature!r}")
        if isinstance(entry, CostRule):
            return entry.price(self._units(feature, units, entry.unit))
        if units is not None:
            raise InvalidInput(
                f"feature {feature!r} has a flat cost of {entry}; units do not apply"
            )
        return entry

    def _known(self) -> str:
        names = self.names()
        shown = ", ".join(names[:20]) or "none"
        return shown if len(names) <= 20 else f"{shown}, ... {len(names) - 20} more"

    @staticmethod
    def _units(feature: str, units: int | None, unit: str) -> int:
        if units is None:
            raise InvalidInput(f"feature {feature!r} is priced per {unit}: give units")
        return v.check_amount(units, name=f"units of {feature!r}")


def _feature_name(name: object) -> str:
    try:
        feature = v.check_feature_name(name)
    except InvalidInput as exc:
        raise ValueError(str(exc)) from None
    if feature in RESERVED_FEATURE_NAMES:
        raise ValueError(f"feature name {feature!r} is reserved")
    return feature


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML document; an unreadable or malformed file raises :class:`ConfigError`."""
    given: object = path
    if not isinstance(given, str | bytes | PathLike):
        # open() takes an int as a file descriptor: 0 would read standard input.
        raise ConfigError(
            f"a TOML file path must be a str or a Path, not {type(path).__name__} "
            f"{v.short_repr(path)}"
        )
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text: {exc}") from exc
    except ValueError as exc:
        # A path holding a NUL character.
        raise ConfigError(f"cannot read {v.short_repr(path)}: {exc}") from exc
    except RecursionError:
        # tomllib parses nested arrays and tables recursively.
        raise ConfigError(f"{path} is not valid TOML: nested too deeply") from None
