"""Settings: typed and validated, from arguments, environment variables or a TOML file."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from redcredit import (
    ConfigError,
    CostRule,
    CostTable,
    InvalidInput,
    PlanSettings,
    RedCreditError,
    Settings,
    UnknownPlan,
)
from redcredit.config import BUILTIN_PLANS


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # A REDCREDIT_* variable in the developer's shell must not change these tests.
    for name in list(os.environ):
        if name.upper().startswith("REDCREDIT_"):
            monkeypatch.delenv(name)


TOML = """
[redcredit]
free_credits = 10
free_chat_messages = 3
key_prefix = "fromfile"
partitions = 128
reservation_ttl = 120
default_plan = "starter"

[redcredit.plans.starter]
bypass = false

[redcredit.plans.team]
bypass = true

[costs]
chat = 1
image = 8
document = { base = 2, per_unit = 1, unit = "pages", max_units = 500 }
"""


@pytest.fixture
def toml_file(tmp_path: Path) -> Path:
    path = tmp_path / "redcredit.toml"
    path.write_text(TOML)
    return path


# -- defaults and validation -------------------------------------------------------


def test_defaults() -> None:
    settings = Settings()
    assert settings.redis_url is None
    assert settings.key_prefix == "rc"
    assert settings.versioned_prefix == "rc:v1"
    assert settings.partitions == 64
    assert (settings.free_credits, settings.free_chat_messages) == (0, 0)
    assert settings.default_plan == "free"
    assert set(settings.plans) == {"free", "paid", "demo"}
    assert settings.bypass_plans == ("demo", "paid")
    assert settings.reservation_ttl == timedelta(seconds=60)
    assert settings.reservation_ttl_min == timedelta(seconds=1)
    assert settings.reservation_ttl_max == timedelta(days=1)
    assert settings.reservation_retention == timedelta(hours=1)
    assert settings.idempotency_window == timedelta(hours=24)
    assert settings.redis_socket_timeout == timedelta(seconds=2)
    assert settings.redis_connect_timeout == timedelta(seconds=1)
    assert settings.costs.names() == []


def test_arguments() -> None:
    settings = Settings(
        redis_url="redis://localhost:6379/0",
        key_prefix="app_1",
        partitions=16384,
        free_credits=2**53,
        free_chat_messages=5,
        reservation_ttl=timedelta(minutes=5),
        idempotency_window=3600,  # seconds
        redis_socket_timeout=0.5,
        costs={"chat": 2, "document": {"per_unit": 3}},
    )
    assert settings.versioned_prefix == "app_1:v1"
    assert settings.partitions == 16384
    assert settings.free_credits == 2**53
    assert settings.reservation_ttl == timedelta(minutes=5)
    assert settings.idempotency_window == timedelta(hours=1)
    assert settings.redis_socket_timeout == timedelta(milliseconds=500)
    assert settings.costs.price("chat") == 2
    assert settings.costs.price("document", units=4) == 12


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"partitions": 8}, "partitions"),
        ({"partitions": 16385}, "partitions"),
        ({"partitions": True}, "partitions must be an integer, not bool"),
        ({"partitions": 64.0}, "partitions must be an integer, not float"),
        ({"free_credits": -1}, "free_credits must be between 0 and 2**53"),
        ({"free_credits": 1.5}, "free_credits must be an integer"),
        ({"free_credits": True}, "free_credits must be an integer, not bool"),
        ({"free_credits": 2**53 + 1}, "free_credits must be between"),
        ({"free_chat_messages": -3}, "free_chat_messages must be between"),
        ({"free_chat_messages": None}, "free_chat_messages must be an integer"),
        ({"key_prefix": "a{b}"}, "key prefix must be"),
        ({"key_prefix": "a:b"}, "key prefix must be"),
        ({"key_prefix": ""}, "key prefix must be"),
        ({"key_prefix": "x" * 10_000}, "(10000 chars)"),
        ({"default_plan": "gold"}, "default_plan 'gold' is not a defined plan"),
        ({"default_plan": "Free"}, "plan name must be"),
        ({"plans": {"Bad Name": {"bypass": True}}}, "plan name must be"),
        ({"plans": {"team": {"bypass": 1}}}, "must be true or false"),
        ({"plans": {"team": {"bypass": True, "limit": 5}}}, "Extra inputs"),
        (
            {"reservation_ttl": timedelta(days=2)},
            "reservation_ttl (2 days, 0:00:00) must lie between",
        ),
        ({"reservation_ttl": timedelta(milliseconds=10)}, "must lie between"),
        ({"reservation_ttl_min": timedelta(seconds=90)}, "must lie between"),
        ({"reservation_ttl": True}, "reservation_ttl must be a duration, not a bool"),
        ({"idempotency_window": timedelta(0)}, "idempotency_window must be at least 1 ms"),
        ({"idempotency_window": -5}, "idempotency_window must be at least 1 ms"),
        ({"reservation_retention": timedelta(microseconds=500)}, "at least 1 ms"),
        ({"redis_socket_timeout": 0}, "redis_socket_timeout must be at least 1 ms"),
        ({"redis_connect_timeout": "soon"}, "redis_connect_timeout"),
        ({"costs": {"chat": -1}}, "cost of 'chat' must be between"),
        ({"costs": {"chat": True}}, "cost of 'chat' must be an int"),
        ({"costs": {"chat": "2"}}, "cost of 'chat' must be an int"),
        ({"costs": 5}, "costs"),
        ({"unknown_setting": 1}, "unknown_setting: Extra inputs are not permitted"),
    ],
    ids=lambda value: repr(value)[:50],
)
def test_invalid_settings_are_config_errors(values: dict[str, Any], reason: str) -> None:
    with pytest.raises(ConfigError) as error:
        Settings(**values)
    assert isinstance(error.value, ValueError)
    assert isinstance(error.value, RedCreditError)
    message = str(error.value)
    assert message.startswith("invalid redcredit settings: ")
    assert reason in message
    assert len(message) < 500
    # The pydantic details stay reachable for callers who want them.
    assert isinstance(error.value.__cause__, ValidationError)


def test_durations_take_iso_strings_and_seconds() -> None:
    settings = Settings(reservation_ttl="PT2M", reservation_retention=7200, idempotency_window=1.5)
    assert settings.reservation_ttl == timedelta(minutes=2)
    assert settings.reservation_retention == timedelta(hours=2)
    assert settings.idempotency_window == timedelta(seconds=1.5)


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.free_credits = 5  # type: ignore[misc]
    # Copies with changes are how tests and callers derive settings.
    assert settings.model_copy(update={"free_credits": 5}).free_credits == 5


# -- plans -----------------------------------------------------------------------------


def test_builtin_plans_are_always_there() -> None:
    settings = Settings(plans={"team": PlanSettings(bypass=True)})
    assert set(settings.plans) == {"free", "paid", "demo", "team"}
    assert settings.plans["free"].bypass is False
    assert settings.bypass_plans == ("demo", "paid", "team")


def test_custom_plans_can_override_builtins() -> None:
    settings = Settings(plans={"team": {"bypass": True}, "paid": {"bypass": False}})
    assert settings.bypass_plans == ("demo", "team")
    assert settings.plans["paid"] == PlanSettings(bypass=False)
    # The module's built-ins are not changed by one deployment's override.
    assert BUILTIN_PLANS["paid"].bypass is True
    assert Settings().bypass_plans == ("demo", "paid")


def test_default_plan_may_be_a_custom_plan() -> None:
    settings = Settings(plans={"starter": {}}, default_plan="starter")
    assert settings.default_plan == "starter"
    assert settings.plans["starter"].bypass is False


def test_require_plan() -> None:
    settings = Settings(plans={"team": {"bypass": True}})
    assert settings.require_plan("team") == "team"
    assert settings.require_plan("free") == "free"
    with pytest.raises(UnknownPlan, match="plan 'gold' is not defined \\(defined: demo, free"):
        settings.require_plan("gold")
    with pytest.raises(InvalidInput, match="plan name must be"):
        settings.require_plan("Not A Plan")


def test_plan_settings_refuse_non_bools() -> None:
    assert PlanSettings(bypass="true").bypass is True
    with pytest.raises(ValidationError, match="must be true or false"):
        PlanSettings(bypass=1)
    with pytest.raises(ValidationError, match="Extra inputs"):
        PlanSettings(limit=5)  # type: ignore[call-arg]


# -- costs ---------------------------------------------------------------------------------


def test_costs_from_a_table_a_mapping_or_the_serialised_form() -> None:
    table = CostTable.from_mapping({"chat": 1, "doc": CostRule(base=5, per_unit=2, unit="pages")})
    assert Settings(costs=table).costs == table
    assert Settings(costs={"chat": 1, "doc": CostRule(base=5, per_unit=2, unit="pages")}).costs == (
        table
    )
    assert Settings(costs=table.model_dump()).costs == table


def test_cost_functions_survive_settings() -> None:
    table = CostTable().with_function("tokens", lambda tokens: tokens // 1000)
    settings = Settings(costs=table)
    assert settings.costs.price("tokens", units=5000) == 5


def test_json_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(
        key_prefix="app",
        free_credits=7,
        plans={"team": {"bypass": True}},
        default_plan="team",
        reservation_ttl=timedelta(seconds=90),
        costs={"chat": 2, "document": {"base": 2, "per_unit": 3, "unit": "pages"}},
    )
    text = settings.model_dump_json()
    assert Settings.model_validate_json(text) == settings
    # A child process inheriting cost variables still reads the parent's table whole.
    monkeypatch.setenv("REDCREDIT_COSTS__IMAGE", "9")
    copy = Settings.model_validate_json(text)
    assert copy.costs.price("document", units=1) == 5
    assert copy.costs.price("chat") == 2


# -- environment ---------------------------------------------------------------------------


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDCREDIT_REDIS_URL", "redis://cache:6379/1")
    monkeypatch.setenv("REDCREDIT_FREE_CREDITS", "25")
    monkeypatch.setenv("redcredit_key_prefix", "app")  # names are case-insensitive
    monkeypatch.setenv("REDCREDIT_RESERVATION_TTL", "120")
    monkeypatch.setenv("REDCREDIT_IDEMPOTENCY_WINDOW", "PT1H")
    monkeypatch.setenv("REDCREDIT_REDIS_SOCKET_TIMEOUT", "0.25")
    monkeypatch.setenv("REDCREDIT_PLANS__TEAM__BYPASS", "true")
    monkeypatch.setenv("REDCREDIT_PLANS__PAID__BYPASS", "false")
    settings = Settings()
    assert settings.redis_url == "redis://cache:6379/1"
    assert (settings.free_credits, settings.key_prefix) == (25, "app")
    assert settings.reservation_ttl == timedelta(minutes=2)
    assert settings.idempotency_window == timedelta(hours=1)
    assert settings.redis_socket_timeout == timedelta(milliseconds=250)
    assert settings.bypass_plans == ("demo", "team")


def test_environment_costs_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDCREDIT_COSTS", json.dumps({"chat": 2, "pdf": {"per_unit": 3}}))
    costs = Settings().costs
    assert costs.price("chat") == 2
    assert costs.price("pdf", units=4) == 12


def test_environment_costs_per_feature(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDCREDIT_COSTS__CHAT", "2")
    monkeypatch.setenv("REDCREDIT_COSTS__DOCUMENT", '{"base": 1, "per_unit": 3, "unit": "pages"}')
    monkeypatch.setenv("REDCREDIT_COSTS__PDF__PER_UNIT", "4")
    monkeypatch.setenv("REDCREDIT_COSTS__PDF__UNIT", "pages")
    costs = Settings().costs
    assert costs.names() == ["chat", "document", "pdf"]
    assert costs.price("chat") == 2
    assert costs.price("document", units=2) == 7
    assert costs.price("pdf", units=2) == 8
    assert costs.features["pdf"] == CostRule(per_unit=4, unit="pages")


def test_environment_costs_in_the_serialised_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDCREDIT_COSTS__FEATURES__CHAT", "2")
    assert Settings().costs.price("chat") == 2


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("REDCREDIT_FREE_CREDITS", "-1", "free_credits must be between"),
        ("REDCREDIT_FREE_CREDITS", "lots", "free_credits"),
        ("REDCREDIT_PARTITIONS", "8", "partitions"),
        ("REDCREDIT_RESERVATION_TTL", "0", "reservation_ttl must be at least 1 ms"),
        ("REDCREDIT_KEY_PREFIX", "a:b", "key prefix must be"),
        ("REDCREDIT_DEFAULT_PLAN", "gold", "'gold' is not a defined plan"),
        ("REDCREDIT_PLANS__TEAM__BYPASS", "perhaps", "bypass"),
        ("REDCREDIT_COSTS__CHAT", "two", "cost of 'chat' must be an int, not str 'two'"),
        ("REDCREDIT_COSTS__CHAT", "-2", "cost of 'chat' must be between"),
        ("REDCREDIT_COSTS__CHAT", "1.5", "cost of 'chat' must be an int"),
        ("REDCREDIT_COSTS__CHAT", "true", "cost of 'chat' must be an int"),
        ("REDCREDIT_COSTS__PDF__PER_UNIT", "-4", "per_unit"),
        ("REDCREDIT_COSTS", "{not json", "costs"),
        ("REDCREDIT_COSTS", '{"chat": -1}', "cost of 'chat' must be between"),
    ],
)
def test_invalid_environment_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, reason: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as error:
        Settings()
    assert reason in str(error.value)


def test_unrelated_environment_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    # e.g. the test suite's own REDCREDIT_TEST_REDIS_URL.
    monkeypatch.setenv("REDCREDIT_TEST_REDIS_URL", "redis://elsewhere")
    assert Settings().redis_url is None


def test_arguments_beat_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDCREDIT_FREE_CREDITS", "25")
    monkeypatch.setenv("REDCREDIT_COSTS__CHAT", "5")
    monkeypatch.setenv("REDCREDIT_COSTS__IMAGE", "9")
    settings = Settings(free_credits=1, costs={"chat": 2})
    assert settings.free_credits == 1
    # A mapping merges feature by feature ...
    assert (settings.costs.price("chat"), settings.costs.price("image")) == (2, 9)
    # ... a CostTable replaces the table whole.
    assert Settings(costs=CostTable.from_mapping({"chat": 2})).costs.names() == ["chat"]


# -- TOML ------------------------------------------------------------------------------------


def test_toml(toml_file: Path) -> None:
    settings = Settings.from_toml(toml_file)
    assert (settings.free_credits, settings.free_chat_messages) == (10, 3)
    assert settings.key_prefix == "fromfile"
    assert settings.partitions == 128
    assert settings.reservation_ttl == timedelta(seconds=120)
    assert settings.default_plan == "starter"
    assert set(settings.plans) == {"free", "paid", "demo", "starter", "team"}
    assert settings.bypass_plans == ("demo", "paid", "team")
    assert settings.costs.price("document", units=10) == 12
    with pytest.raises(InvalidInput):
        settings.costs.price("document", units=501)
    assert settings.costs == CostTable.from_toml(toml_file)
    assert Settings.from_toml(str(toml_file)) == settings


def test_toml_precedence(toml_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDCREDIT_FREE_CHAT_MESSAGES", "7")
    monkeypatch.setenv("REDCREDIT_KEY_PREFIX", "fromenv")
    monkeypatch.setenv("REDCREDIT_COSTS__IMAGE", "20")
    monkeypatch.setenv("REDCREDIT_COSTS__DOCUMENT__PER_UNIT", "3")
    monkeypatch.setenv("REDCREDIT_PLANS__GOLD__BYPASS", "true")
    settings = Settings.from_toml(toml_file, key_prefix="override", costs={"chat": 4})
    assert settings.redis_connect_timeout == timedelta(seconds=1)  # default
    assert settings.free_credits == 10  # file beats default
    assert settings.free_chat_messages == 7  # environment beats file
    assert settings.key_prefix == "override"  # arguments beat both
    # Costs and plans merge key by key across the three sources.
    assert settings.costs.price("chat") == 4  # argument
    assert settings.costs.price("image") == 20  # environment
    assert settings.costs.features["document"] == CostRule(
        base=2, per_unit=3, unit="pages", max_units=500
    )  # file, one field from the environment
    assert settings.bypass_plans == ("demo", "gold", "paid", "team")
    assert settings.default_plan == "starter"


def test_toml_file_does_not_leak_into_later_settings(toml_file: Path) -> None:
    Settings.from_toml(toml_file)
    assert Settings().free_credits == 0
    assert Settings().costs.names() == []


def test_toml_costs_may_sit_under_redcredit(tmp_path: Path) -> None:
    path = tmp_path / "nested.toml"
    path.write_text("[redcredit]\nfree_credits = 1\n[redcredit.costs]\nchat = 3\n")
    assert Settings.from_toml(path).costs.price("chat") == 3
    path.write_text("[redcredit.costs]\nchat = 3\n[costs]\nchat = 4\n")
    with pytest.raises(ConfigError, match=r"\[costs\] or \[redcredit.costs\]"):
        Settings.from_toml(path)


def test_empty_toml_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("")
    assert Settings.from_toml(path) == Settings()


def test_load(toml_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings.load() == Settings()
    assert Settings.load(free_credits=3).free_credits == 3
    assert Settings.load(toml_file).key_prefix == "fromfile"
    assert Settings.load(toml_file, key_prefix="x").key_prefix == "x"
    monkeypatch.setenv("REDCREDIT_FREE_CREDITS", "-1")
    with pytest.raises(ConfigError):
        Settings.load()


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[redcredit\nfree_credits = 1", "is not valid TOML"),
        ("[redcredit]\nfree_credits = 1\nfree_credits = 2", "is not valid TOML"),
        ("redcredit = 5", "'redcredit' must be a table"),
        ("costs = 5", "'costs' must be a table"),
        ("[redcredit]\nfree_credits = -4", "free_credits must be between"),
        ("[redcredit]\nfree_credits = 1.0", "free_credits must be an integer"),
        ("[redcredit]\npartitions = true", "partitions must be an integer, not bool"),
        ("[redcredit]\nreservation_ttl = true", "must be a duration, not a bool"),
        ("[redcredit]\nreservation_ttl = 0", "at least 1 ms"),
        ("[redcredit]\nsurprise = 1", "surprise: Extra inputs are not permitted"),
        ("[redcredit]\ndefault_plan = 'gold'", "'gold' is not a defined plan"),
        ("[redcredit.plans.Team]\nbypass = true", "plan name must be"),
        ("[redcredit.plans.team]\nbypass = 1", "must be true or false"),
        ("[costs]\nchat = -1", "cost of 'chat' must be between"),
        ("[costs]\nchat = 1.5", "cost of 'chat' must be an int"),
        ("[costs]\nchat = true", "cost of 'chat' must be an int"),
        ("[costs]\n'bad name' = 1", "feature name must be"),
        ("[costs]\nfeatures = 1", "reserved"),
        ("[costs]\ndoc = { per_unit = 1, surprise = 2 }", "surprise"),
        ("[costs]\ndoc = { base = 1 }", "per_unit"),
    ],
)
def test_malformed_toml_is_a_config_error(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        Settings.from_toml(path)
    message = str(error.value)
    assert reason in message
    assert str(path) in message


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read .*absent\.toml"):
        Settings.from_toml(tmp_path / "absent.toml")
