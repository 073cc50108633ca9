"""Settings and the cost table: typed, validated, from Python, environment or TOML."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from redcredit import ConfigError, CostRule, CostTable, InvalidInput, Settings, UnknownFeature


def test_defaults() -> None:
    settings = Settings()
    assert settings.versioned_prefix == "rc:v1"
    assert settings.partitions == 64
    assert settings.bypass_plans == ("demo", "paid")
    assert settings.reservation_ttl == timedelta(seconds=60)


@pytest.mark.parametrize(
    "values",
    [
        {"partitions": 8},
        {"partitions": True},
        {"free_credits": -1},
        {"free_credits": 1.5},
        {"free_credits": 2**53 + 1},
        {"key_prefix": "a{b}"},
        {"key_prefix": "a:b"},
        {"default_plan": "gold"},
        {"plans": {"Bad Name": {"bypass": True}}},
        {"reservation_ttl": timedelta(days=2)},
        {"idempotency_window": timedelta(0)},
        {"unknown_setting": 1},
    ],
    ids=repr,
)
def test_invalid_settings_are_config_errors(values: dict) -> None:
    with pytest.raises(ConfigError):
        Settings(**values)


def test_custom_plans_merge_with_builtins() -> None:
    settings = Settings(plans={"team": {"bypass": True}, "paid": {"bypass": False}})
    assert settings.bypass_plans == ("demo", "team")
    assert settings.require_plan("free") == "free"


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDCREDIT_FREE_CREDITS", "25")
    monkeypatch.setenv("REDCREDIT_KEY_PREFIX", "app")
    monkeypatch.setenv("REDCREDIT_COSTS", json.dumps({"chat": 2, "pdf": {"per_unit": 3}}))
    monkeypatch.setenv("REDCREDIT_PLANS__TEAM__BYPASS", "true")
    settings = Settings()
    assert (settings.free_credits, settings.key_prefix) == (25, "app")
    assert settings.costs.price("chat") == 2
    assert settings.costs.price("pdf", units=4) == 12
    assert "team" in settings.bypass_plans


def test_toml_with_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "redcredit.toml"
    path.write_text(
        """
        [redcredit]
        free_credits = 10
        free_chat_messages = 3
        key_prefix = "fromfile"
        reservation_ttl = 120

        [costs]
        chat = 1
        image = 8
        document = { base = 2, per_unit = 1, unit = "pages", max_units = 500 }
        """
    )
    monkeypatch.setenv("REDCREDIT_FREE_CHAT_MESSAGES", "7")
    settings = Settings.from_toml(path, key_prefix="override")
    assert settings.free_credits == 10  # file
    assert settings.free_chat_messages == 7  # environment beats file
    assert settings.key_prefix == "override"  # arguments beat both
    assert settings.reservation_ttl == timedelta(seconds=120)
    assert settings.costs.price("document", units=10) == 12
    with pytest.raises(InvalidInput):
        settings.costs.price("document", units=501)
    assert CostTable.from_toml(path).price("image") == 8


@pytest.mark.parametrize(
    "text",
    [
        "[redcredit\nfree_credits = 1",
        "[redcredit]\nfree_credits = -4",
        "[costs]\nchat = -1",
        "[costs]\nchat = 1.5",
        "[costs]\nchat = true",
        "[costs]\n'bad name' = 1",
        "[costs]\ndoc = { per_unit = 1, surprise = 2 }",
        "costs = 5",
    ],
    ids=repr,
)
def test_malformed_toml_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        Settings.from_toml(path)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        Settings.from_toml(tmp_path / "absent.toml")


def test_cost_table_rules() -> None:
    table = CostTable.from_mapping({"chat": 1, "doc": CostRule(base=5, per_unit=2, unit="pages")})
    assert table.price("chat") == 1
    assert table.price("doc", units=0) == 5
    assert "doc" in table and "nope" not in table
    with pytest.raises(UnknownFeature, match="'nope' is not in the cost table"):
        table.price("nope")
    with pytest.raises(InvalidInput, match="flat cost"):
        table.price("chat", units=3)
    with pytest.raises(InvalidInput, match="give units"):
        table.price("doc")
    with pytest.raises(InvalidInput):
        table.price("doc", units=-1)
    with pytest.raises(InvalidInput):
        CostTable.from_mapping({"huge": {"per_unit": 2**52}}).price("huge", units=4)


def test_cost_functions() -> None:
    table = CostTable.from_mapping({"chat": 1}).with_function("tokens", lambda n: (n + 999) // 1000)
    assert table.price("tokens", units=2500) == 3
    assert table.names() == ["chat", "tokens"]
    broken = table.with_function("broken", lambda n: -n)
    with pytest.raises(InvalidInput):
        broken.price("broken", units=3)
