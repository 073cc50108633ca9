"""The cost table: flat costs, per-unit rules and functions; nothing unknown is free."""

from __future__ import annotations

import math
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from redcredit import ConfigError, CostRule, CostTable, InvalidInput, RedCreditError, UnknownFeature
from redcredit.validation import MAX_AMOUNT

TABLE = CostTable.from_mapping(
    {
        "chat": 1,
        "free_feature": 0,
        "document": {"base": 2, "per_unit": 1, "unit": "pages", "max_units": 500},
        "image": CostRule(base=5, per_unit=0),
    }
)

# -- CostRule -----------------------------------------------------------------------


def test_rule_prices_base_plus_units() -> None:
    rule = CostRule(base=2, per_unit=3, unit="pages")
    assert rule.price(0) == 2
    assert rule.price(10) == 32
    assert CostRule(per_unit=4).price(5) == 20  # base defaults to 0
    assert CostRule(per_unit=1).unit == "unit"


def test_rule_max_units() -> None:
    rule = CostRule(per_unit=1, unit="pages", max_units=500)
    assert rule.price(500) == 500
    with pytest.raises(InvalidInput, match="at most 500 pages allowed, not 501"):
        rule.price(501)


@pytest.mark.parametrize("units", [-1, 1.5, True, None, "3", math.nan, MAX_AMOUNT + 1])
def test_rule_refuses_bad_units(units: Any) -> None:
    with pytest.raises(InvalidInput, match="units"):
        CostRule(per_unit=1).price(units)


def test_rule_refuses_a_price_past_2_53() -> None:
    with pytest.raises(InvalidInput, match="passes 2\\*\\*53"):
        CostRule(base=1, per_unit=2**52).price(2)
    assert CostRule(per_unit=2**52).price(2) == MAX_AMOUNT


@pytest.mark.parametrize(
    "fields",
    [
        {"per_unit": -1},
        {"per_unit": 1, "base": -1},
        {"per_unit": True},
        {"per_unit": 1.0},
        {"per_unit": "1"},
        {"per_unit": Decimal(1)},
        {"per_unit": MAX_AMOUNT + 1},
        {"per_unit": 1, "max_units": -1},
        {"per_unit": 1, "unit": ""},
        {"per_unit": 1, "unit": 5},
        {"per_unit": 1, "surprise": 2},
        {"base": 1},  # per_unit is required
    ],
    ids=repr,
)
def test_rule_refuses_bad_fields(fields: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as error:
        CostRule(**fields)
    assert isinstance(error.value, ValueError)
    assert isinstance(error.value, RedCreditError)
    assert str(error.value).startswith("invalid cost rule: ")


def test_rule_is_frozen() -> None:
    rule = CostRule(per_unit=1)
    with pytest.raises(ValidationError):
        rule.per_unit = 0  # type: ignore[misc]


# -- CostTable.price ----------------------------------------------------------------


def test_flat_and_rule_prices() -> None:
    assert TABLE.price("chat") == 1
    assert TABLE.price("free_feature") == 0
    assert TABLE.price("document", units=10) == 12
    assert TABLE.price("document", 0) == 2
    assert TABLE.price("image", units=3) == 5


def test_unknown_feature_is_never_free() -> None:
    with pytest.raises(UnknownFeature) as error:
        TABLE.price("nope")
    assert isinstance(error.value, InvalidInput)
    assert isinstance(error.value, KeyError)
    message = str(error.value)
    assert message.startswith("feature 'nope' is not in the cost table")
    assert "chat, document, free_feature, image" in message
    with pytest.raises(UnknownFeature, match="known: none"):
        CostTable().price("chat")


def test_unknown_feature_message_is_short() -> None:
    with pytest.raises(UnknownFeature) as error:
        TABLE.price("x" * 10_000)
    assert len(str(error.value)) < 200


def test_flat_feature_refuses_units() -> None:
    with pytest.raises(InvalidInput, match="'chat' has a flat cost of 1; units do not apply"):
        TABLE.price("chat", units=3)
    with pytest.raises(InvalidInput, match="flat cost"):
        TABLE.price("chat", units=0)


def test_rule_feature_requires_units() -> None:
    with pytest.raises(InvalidInput, match="'document' is priced per pages: give units"):
        TABLE.price("document")


@pytest.mark.parametrize("units", [-1, 2.0, True, "4", 501])
def test_rule_feature_refuses_bad_units(units: Any) -> None:
    with pytest.raises(InvalidInput):
        TABLE.price("document", units=units)


def test_table_price_past_2_53_is_refused() -> None:
    table = CostTable.from_mapping({"huge": {"per_unit": 2**52}})
    assert table.price("huge", units=2) == MAX_AMOUNT
    with pytest.raises(InvalidInput, match="passes 2\\*\\*53"):
        table.price("huge", units=3)


@given(
    st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True).filter(lambda n: n != "features"),
        st.integers(min_value=0, max_value=MAX_AMOUNT),
        max_size=8,
    )
)
def test_flat_costs_round_trip(costs: dict[str, int]) -> None:
    table = CostTable.from_mapping(costs)
    assert table.names() == sorted(costs)
    for name, cost in costs.items():
        assert name in table
        assert table.price(name) == cost


@given(
    st.integers(min_value=0, max_value=10**6),
    st.integers(min_value=0, max_value=10**6),
    st.integers(min_value=0, max_value=10**6),
)
def test_rule_prices_match_the_formula(base: int, per_unit: int, units: int) -> None:
    table = CostTable.from_mapping({"f": {"base": base, "per_unit": per_unit}})
    assert table.price("f", units=units) == base + per_unit * units


# -- building a table ------------------------------------------------------------------


@pytest.mark.parametrize(
    "mapping",
    [
        {"chat": -1},
        {"chat": 1.0},
        {"chat": 1.5},
        {"chat": math.nan},
        {"chat": math.inf},
        {"chat": True},
        {"chat": False},
        {"chat": "1"},
        {"chat": None},
        {"chat": Decimal(1)},
        {"chat": MAX_AMOUNT + 1},
        {"chat": [1]},
        {"bad name": 1},
        {"": 1},
        {"_chat": 1},
        {"x" * 65: 1},
        {"features": 1},  # reserved: it is the key of the serialised form
        {"doc": {"per_unit": 1, "surprise": 2}},
        {"doc": {"per_unit": -1}},
        {"doc": {"per_unit": True}},
        {"doc": {"base": 1}},
    ],
    ids=lambda mapping: repr(mapping)[:40],
)
def test_invalid_tables_are_config_errors(mapping: dict[Any, Any]) -> None:
    with pytest.raises(ConfigError) as error:
        CostTable.from_mapping(mapping)
    assert isinstance(error.value, ValueError)
    assert isinstance(error.value, RedCreditError)
    assert str(error.value).startswith("invalid cost table: ")


def test_invalid_table_messages_name_the_feature() -> None:
    with pytest.raises(ConfigError, match="cost of 'chat' must be an int, not bool True"):
        CostTable.from_mapping({"chat": True})
    with pytest.raises(ConfigError, match="cost of 'chat' must be between 0 and 2\\*\\*53"):
        CostTable.from_mapping({"chat": -1})
    with pytest.raises(ConfigError, match=r"cost rule of 'doc': .*surprise"):
        CostTable.from_mapping({"doc": {"per_unit": 1, "surprise": 2}})
    with pytest.raises(ConfigError, match="feature name must be"):
        CostTable.from_mapping({"bad name": 1})


def test_a_table_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match="must be a mapping"):
        CostTable.from_mapping([("chat", 1)])  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        CostTable(features=5)


def test_direct_construction_checks_too() -> None:
    assert CostTable(features={"chat": 2}).price("chat") == 2
    with pytest.raises(ConfigError):
        CostTable(features={"chat": -2})
    with pytest.raises(ConfigError, match="Extra inputs"):
        CostTable(features={}, other=1)


def test_contains_and_names() -> None:
    assert "chat" in TABLE
    assert "nope" not in TABLE
    assert 5 not in TABLE
    assert TABLE.names() == ["chat", "document", "free_feature", "image"]
    assert CostTable().names() == []


def test_json_round_trip() -> None:
    assert CostTable.model_validate_json(TABLE.model_dump_json()) == TABLE


# -- cost functions ------------------------------------------------------------------------


def per_thousand_tokens(tokens: int) -> int:
    return (tokens + 999) // 1000


def test_cost_functions() -> None:
    table = TABLE.with_function("tokens", per_thousand_tokens)
    assert table.price("tokens", units=2500) == 3
    assert table.price("tokens", units=0) == 0
    assert "tokens" in table
    assert table.names() == ["chat", "document", "free_feature", "image", "tokens"]
    # A new table; the original is unchanged.
    assert "tokens" not in TABLE
    with pytest.raises(UnknownFeature):
        TABLE.price("tokens", units=1)


def test_cost_function_requires_valid_units() -> None:
    table = CostTable().with_function("tokens", per_thousand_tokens)
    with pytest.raises(InvalidInput, match="give units"):
        table.price("tokens")
    for units in [-1, 1.5, True, "10"]:
        with pytest.raises(InvalidInput, match="units of 'tokens'"):
            table.price("tokens", units=units)  # type: ignore[arg-type]


@pytest.mark.parametrize("result", [-1, 1.5, math.nan, True, None, "3", MAX_AMOUNT + 1])
def test_cost_function_results_are_checked(result: Any) -> None:
    table = CostTable().with_function("broken", lambda _units: result)
    with pytest.raises(InvalidInput, match="cost of 'broken'"):
        table.price("broken", units=3)


def test_cost_function_replaces_an_entry() -> None:
    table = TABLE.with_function("chat", lambda units: 2 * units)
    assert table.price("chat", units=5) == 10
    assert "chat" not in table.features
    assert TABLE.price("chat") == 1


def test_cost_functions_are_not_serialised() -> None:
    table = TABLE.with_function("chat", lambda units: 2 * units)
    assert "chat" not in table.model_dump()["features"]
    copy = CostTable.model_validate_json(table.model_dump_json())
    # Sent elsewhere without its function, the feature is refused, not priced at its old cost.
    with pytest.raises(UnknownFeature):
        copy.price("chat")


def test_with_function_refuses_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="feature name must be"):
        TABLE.with_function("bad name", per_thousand_tokens)
    with pytest.raises(ConfigError, match="reserved"):
        TABLE.with_function("features", per_thousand_tokens)
    with pytest.raises(ConfigError, match="not callable"):
        TABLE.with_function("tokens", 5)  # type: ignore[arg-type]


# -- TOML ------------------------------------------------------------------------------------


def test_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "costs.toml"
    path.write_text(
        """
        [redcredit]
        free_credits = 10

        [costs]
        chat = 1
        image = 8
        document = { base = 2, per_unit = 1, unit = "pages", max_units = 500 }
        """
    )
    table = CostTable.from_toml(path)
    assert table.names() == ["chat", "document", "image"]
    assert table.price("image") == 8
    assert table.price("document", units=10) == 12
    assert CostTable.from_toml(str(path)) == table


def test_from_toml_without_costs_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("[redcredit]\nfree_credits = 1\n")
    assert CostTable.from_toml(path).names() == []


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[costs\nchat = 1", "not valid TOML"),
        ("[costs]\nchat = 1\nchat = 2", "not valid TOML"),
        ("costs = 5", "'costs' must be a table"),
        ("[costs]\nchat = -1", "cost of 'chat' must be between"),
        ("[costs]\nchat = 1.5", "cost of 'chat' must be an int"),
        ("[costs]\nchat = true", "cost of 'chat' must be an int"),
        ("[costs]\nchat = '1'", "cost of 'chat' must be an int"),
        ("[costs]\n'bad name' = 1", "feature name must be"),
        ("[costs]\ndoc = { per_unit = 1, surprise = 2 }", "surprise"),
    ],
)
def test_malformed_toml(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        CostTable.from_toml(path)
    assert str(path) in str(error.value)
    assert reason in str(error.value)


def test_unreadable_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read .*absent\.toml"):
        CostTable.from_toml(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        CostTable.from_toml(tmp_path)  # a directory
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"[costs]\nchat = 1\n# \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"not UTF-8|not valid TOML"):
        CostTable.from_toml(binary)
