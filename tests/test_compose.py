"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

The file is validated against the official compose-spec JSON schema (shipped
on PyPI inside check-jsonschema, in the dev extra), then against what
redcredit itself expects: its settings' variable names, its commands, Redis
with an AOF, and the start-up order. ``docker compose config`` also runs when
this machine has it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from redcredit import Settings
from redcredit.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
OURS = ("migrate", "syncer")  # the services built from this repository


def _compose_schema() -> dict[str, Any]:
    # Read as a file: importing check_jsonschema would load its whole CLI.
    spec = importlib.util.find_spec("check_jsonschema")
    assert spec is not None and spec.submodule_search_locations, (
        "check-jsonschema (the dev extra) ships the compose-spec schema: pip install -e '.[dev]'"
    )
    package = Path(next(iter(spec.submodule_search_locations)))
    schema: dict[str, Any] = json.loads(
        (package / "builtin_schemas" / "vendor" / "compose-spec.json").read_text()
    )
    return schema


def _schema_errors(document: object) -> list[str]:
    schema = _compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
        for error in validator.iter_errors(document)
    ]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def _entrypoint() -> list[str]:
    lines = re.findall(r"^ENTRYPOINT\s+(.+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert len(lines) == 1, "one ENTRYPOINT"
    entrypoint = json.loads(lines[0])  # exec form, so signals reach redcredit
    assert isinstance(entrypoint, list)
    return entrypoint


def _argv(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    words = shlex.split(command) if isinstance(command, str) else list(command)
    return _entrypoint() + words


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


# --- the compose specification --------------------------------------------------------------------


def test_compose_file_follows_the_compose_spec(compose: dict[str, Any]) -> None:
    assert _schema_errors(compose) == []


def test_the_schema_check_really_rejects_mistakes(compose: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["syncer"]["comand"] = ["sync"]
    broken["services"]["migrate"]["depends_on"]["postgres"]["condition"] = "healthy"
    errors = _schema_errors(broken)
    assert any("comand" in error for error in errors), errors
    assert any("healthy" in error for error in errors), errors


# --- what redcredit expects -----------------------------------------------------------------------


def test_our_services_use_the_settings_variable_names(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in OURS:
        env = _environment(services[name])
        assert {"REDCREDIT_REDIS_URL", "REDCREDIT_DATABASE_URL"} <= env.keys(), name
        assert all(key.startswith("REDCREDIT_") for key in env), env
        # The names are the ones Settings really reads.
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        assert settings.redis_url == env["REDCREDIT_REDIS_URL"]
        assert settings.database_url == env["REDCREDIT_DATABASE_URL"]


def test_urls_point_at_the_compose_servers(services: dict[str, dict[str, Any]]) -> None:
    postgres_env = _environment(services["postgres"])
    for name in OURS:
        env = _environment(services[name])
        redis_url = urlsplit(env["REDCREDIT_REDIS_URL"])
        assert (redis_url.scheme, redis_url.hostname, redis_url.port) == ("redis", "redis", 6379)
        database = urlsplit(env["REDCREDIT_DATABASE_URL"])
        assert database.scheme == "postgresql"
        assert (database.hostname, database.port) == ("postgres", 5432)
        assert database.username == postgres_env["POSTGRES_USER"]
        assert database.password == postgres_env["POSTGRES_PASSWORD"]
        assert database.path == "/" + postgres_env["POSTGRES_DB"]


def test_commands_are_redcredit_migrate_and_sync(services: dict[str, dict[str, Any]]) -> None:
    assert _argv(services["migrate"]) == ["redcredit", "migrate"]
    assert _argv(services["syncer"]) == ["redcredit", "sync"]
    for name in OURS:
        assert services[name]["build"] in (".", {"context": "."})
        # The command line the container runs is one the CLI accepts.
        build_parser().parse_args(_argv(services[name])[1:])


def test_redis_keeps_an_append_only_file_on_a_volume(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    command = redis["command"]
    argv = shlex.split(command) if isinstance(command, str) else [str(word) for word in command]
    options = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert argv[0] == "redis-server"
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "everysec"
    assert options.get("--maxmemory-policy", "noeviction") == "noeviction"
    assert any(str(volume).endswith(":/data") for volume in redis["volumes"])


def test_postgres_is_checked_with_pg_isready(services: dict[str, dict[str, Any]]) -> None:
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:16")
    assert "POSTGRES_PASSWORD" in _environment(postgres)
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    volumes = [str(volume) for volume in postgres["volumes"]]
    assert any(volume.endswith(":/var/lib/postgresql/data") for volume in volumes)


def test_start_up_order(services: dict[str, dict[str, Any]]) -> None:
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    # YAML 1.1 reads a bare no as False; compose needs the string.
    assert services["migrate"]["restart"] == "no"
    syncer = services["syncer"]
    assert syncer["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert syncer["depends_on"]["redis"]["condition"] in ("service_healthy", "service_started")
    assert syncer["restart"] == "unless-stopped"
    for name, dependencies in (
        (name, service.get("depends_on", {})) for name, service in services.items()
    ):
        for dependency, rule in dependencies.items():
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits on {dependency}"


# --- the image ------------------------------------------------------------------------------------


def test_dockerfile_installs_the_package_without_dev_tools() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
    installs = re.findall(r"pip install ([^&\n]+)", text)
    assert installs and all("dev" not in words for words in installs), installs
    assert _entrypoint() == ["redcredit"]
    # Everything the wheel is built from is in the build context it copies.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wheel = project["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = {"pyproject.toml", project["project"]["readme"], *wheel["packages"]}
    needed |= set(wheel.get("force-include", {}))
    copied = {
        Path(word).name
        for line in re.findall(r"^COPY\s+(.+)$", text, re.MULTILINE)
        for word in line.split()[:-1]
        if not word.startswith("--")
    }
    assert needed <= copied, needed - copied


# --- the real tool, where there is one ------------------------------------------------------------


def _compose_command() -> list[str] | None:
    for command in (["docker", "compose"], ["docker-compose"]):
        try:
            done = subprocess.run(
                [*command, "version"], capture_output=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return command
    return None


def test_docker_compose_accepts_it() -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    # `config` only reads the file: no engine is needed.
    done = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
