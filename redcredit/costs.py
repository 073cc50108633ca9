"""The one table of what each feature costs.

A feature costs a flat number of credits, or follows a :class:`CostRule`
(a base plus a price per unit, e.g. per document page), or a Python function
of its units. An unknown feature is an error, never a free call.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from . import validation as v
from .errors import ConfigError, InvalidInput, UnknownFeature

__all__ = ["CostFunction", "CostRule", "CostTable"]

CostFunction = Callable[[int], int]


class CostRule(BaseModel):
    """``base + per_unit * units`` credits, for features priced by size."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")

    base: int = Field(default=0, ge=0, le=v.MAX_AMOUNT)
    per_unit: int = Field(ge=0, le=v.MAX_AMOUNT)
    unit: str = "unit"
    max_units: int | None = Field(default=None, ge=0, le=v.MAX_AMOUNT)

    def price(self, units: int) -> int:
        units = v.check_amount(units, name=f"units ({self.unit})")
        if self.max_units is not None and units > self.max_units:
            raise InvalidInput(f"at most {self.max_units} {self.unit} allowed, not {units}")
        return self.base + self.per_unit * units


class CostTable(BaseModel):
    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")

    features: dict[str, int | CostRule] = Field(default_factory=dict)
    _functions: dict[str, CostFunction] = PrivateAttr(default_factory=dict)

    @field_validator("features", mode="before")
    @classmethod
    def _check_features(cls, features: Any) -> Any:
        if not isinstance(features, Mapping):
            return features
        checked: dict[str, Any] = {}
        for name, cost in features.items():
            try:
                v.check_feature_name(name)
            except InvalidInput as exc:
                raise ValueError(str(exc)) from None
            if isinstance(cost, Mapping):
                checked[name] = CostRule.model_validate(dict(cost))
            elif isinstance(cost, CostRule):
                checked[name] = cost
            else:
                try:
                    checked[name] = v.check_amount(cost, name=f"cost of {name!r}")
                except InvalidInput as exc:
                    raise ValueError(str(exc)) from None
        return checked

    @classmethod
    def from_mapping(cls, features: Mapping[str, Any]) -> Self:
        try:
            return cls(features=dict(features))
        except ValidationError as exc:
            raise ConfigError(f"invalid cost table: {exc}") from None

    @classmethod
    def from_toml(cls, path: str | Path) -> Self:
        """Reads the ``[costs]`` table of a TOML file."""
        try:
            with open(path, "rb") as file:
                document = tomllib.load(file)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read cost table from {path}: {exc}") from None
        costs = document.get("costs", {})
        if not isinstance(costs, dict):
            raise ConfigError(f"[costs] in {path} must be a table")
        return cls.from_mapping(costs)

    def with_function(self, feature: str, function: CostFunction) -> CostTable:
        """A copy of this table where ``feature`` is priced by ``function(units)``."""
        feature = v.check_feature_name(feature)
        table = self.model_copy()
        table._functions = {**self._functions, feature: function}
        return table

    def __contains__(self, feature: object) -> bool:
        return feature in self.features or feature in self._functions

    def names(self) -> list[str]:
        return sorted({*self.features, *self._functions})

    def price(self, feature: str, units: int | None = None) -> int:
        function = self._functions.get(feature)
        if function is not None:
            if units is None:
                raise InvalidInput(f"feature {feature!r} is priced per unit: give units")
            cost = function(v.check_amount(units, name="units"))
            return v.check_amount(cost, name=f"cost of {feature!r}")
        entry = self.features.get(feature)
        if entry is None:
            raise UnknownFeature(f"feature {feature!r} is not in the cost table")
        if isinstance(entry, CostRule):
            if units is None:
                raise InvalidInput(f"feature {feature!r} is priced per {entry.unit}: give units")
            cost = entry.price(units)
            if cost > v.MAX_AMOUNT:
                raise InvalidInput(f"cost of {feature!r} for {units} {entry.unit} passes 2**53")
            return cost
        if units is not None:
            raise InvalidInput(f"feature {feature!r} has a flat cost; units do not apply")
        return entry
