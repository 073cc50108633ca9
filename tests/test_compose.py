"""docker-compose.yml, docker-compose.cluster.yml and the Dockerfile, checked without a Docker
engine.

The files are validated against the official compose-spec JSON schema (shipped
on PyPI inside check-jsonschema, in the dev extra), then against what
redcredit itself expects: its settings' variable names, its commands, Redis
with an AOF, and the start-up order; for the cluster, that the one-shot init
makes a cluster of every node, and that the app's code runs on a real cluster
by its settings alone. ``docker compose config`` also runs when this machine
has it.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import psycopg
import pytest
import redis
import yaml

from redcredit import Settings
from redcredit.backends.migrate import migrate
from redcredit.cli import build_parser
from redcredit.servers.redis import EmbeddedRedis, find_redis_server

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
CLUSTER_FILE = ROOT / "docker-compose.cluster.yml"
COMPOSE_FILES = [COMPOSE_FILE, CLUSTER_FILE]
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


def _load(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text())
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load(COMPOSE_FILE)


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


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda path: path.name)
def test_compose_file_follows_the_compose_spec(path: Path) -> None:
    assert _schema_errors(_load(path)) == []


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


# --- the cluster ----------------------------------------------------------------------------------

CLUSTER_OURS = ("migrate", "syncer", "app")
CREATE = ["valkey-cli", "--cluster", "create"]


@pytest.fixture(scope="module")
def cluster_services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = _load(CLUSTER_FILE)["services"]
    return found


def _words(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(word) for word in command]


def _nodes(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if _words(s)[:1] == ["valkey-server"]}


def _address(service: dict[str, Any]) -> str:
    return str(service["networks"]["default"]["ipv4_address"])


def _init_script(services: dict[str, dict[str, Any]]) -> str:
    words = _words(services["redis-cluster-init"])
    assert words[:2] == ["sh", "-c"] and len(words) == 3, words
    return words[2]


def test_cluster_nodes_are_cluster_servers_each_with_its_aof_and_address(
    cluster_services: dict[str, dict[str, Any]],
) -> None:
    nodes = _nodes(cluster_services)
    assert len(nodes) == 6
    (subnet,) = _load(CLUSTER_FILE)["networks"]["default"]["ipam"]["config"]
    network = ipaddress.ip_network(subnet["subnet"])
    volumes, addresses = set(), set()
    for name, node in nodes.items():
        assert node["image"].startswith("valkey/valkey:8"), name
        options = dict(zip(_words(node)[1::2], _words(node)[2::2], strict=False))
        assert options["--cluster-enabled"] == "yes"
        assert options["--cluster-config-file"] == "nodes.conf"
        assert options["--appendonly"] == "yes"
        assert options["--appendfsync"] == "everysec"
        assert options["--maxmemory-policy"] == "noeviction"
        (volume,) = [str(v) for v in node["volumes"] if str(v).endswith(":/data")]
        volumes.add(volume)
        addresses.add(ipaddress.ip_address(_address(node)))
        assert "valkey-cli" in node["healthcheck"]["test"]
    assert len(volumes) == len(addresses) == len(nodes)  # a folder and an address each
    assert all(address in network for address in addresses)


def test_the_init_service_makes_one_cluster_of_every_node(
    cluster_services: dict[str, dict[str, Any]],
) -> None:
    nodes = _nodes(cluster_services)
    init = cluster_services["redis-cluster-init"]
    script = _init_script(cluster_services)
    # Compose would read a $ as one of its own variables.
    assert "$" not in script
    words = shlex.split(script.replace("\\\n", " "))
    (create,) = [i for i in range(len(words)) if words[i : i + 3] == CREATE]
    options = next(i for i in range(create + 3, len(words)) if words[i].startswith("-"))
    listed = words[create + 3 : options]
    assert sorted(listed) == sorted(f"{_address(node)}:6379" for node in nodes.values())
    replicas = int(words[words.index("--cluster-replicas") + 1])
    assert len(nodes) == 3 * (1 + replicas)  # three primaries
    assert "--cluster-yes" in words  # no question to answer
    # Created once: a later `up` finds the cluster ok and leaves it as it is.
    assert script.index("cluster_state:ok") < script.index("--cluster create")
    assert script.rstrip().splitlines()[-1].startswith("until ")
    assert init["depends_on"] == {name: {"condition": "service_healthy"} for name in nodes}
    assert init["restart"] == "no"


def _cli_beside_the_server() -> Path:
    server = find_redis_server()
    for name in ("valkey-cli", "redis-cli"):
        for candidate in (server.with_name(name), shutil.which(name)):
            if candidate is not None and os.access(candidate, os.X_OK):
                return Path(candidate)
    pytest.skip(f"no valkey-cli or redis-cli beside {server} or on PATH")


def test_the_init_script_makes_six_real_nodes_a_cluster_once(
    cluster_services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    script = _init_script(cluster_services)
    cli = _cli_beside_the_server()
    (tmp_path / "valkey-cli").symlink_to(cli)
    env = os.environ | {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    with ExitStack() as stack:
        # Nodes with no slots, as the containers start.
        nodes = [
            stack.enter_context(EmbeddedRedis(cluster=True, cluster_slots=range(0)))
            for _ in _nodes(cluster_services)
        ]
        for node, service in zip(nodes, _nodes(cluster_services).values(), strict=True):
            script = script.replace(f"{_address(service)}:6379", f"127.0.0.1:{node.port}")
            script = script.replace(f"-h {_address(service)}", f"-h 127.0.0.1 -p {node.port}")
        for _ in ("create", "find it made"):
            done = subprocess.run(
                ["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        with redis.Redis(port=nodes[0].port) as first:
            assert first.cluster("INFO")["cluster_state"] == "ok"
            known = first.cluster("NODES")
    primaries = {v["node_id"] for v in known.values() if "master" in v["flags"] and v["slots"]}
    followed = [v["master_id"] for v in known.values() if "slave" in v["flags"]]
    assert len(primaries) == 3 and sorted(followed) == sorted(primaries)


def test_our_cluster_services_are_configured_by_settings_alone(
    services: dict[str, dict[str, Any]],
    cluster_services: dict[str, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nodes = _nodes(cluster_services)
    plain = _environment(services["syncer"])
    for name in CLUSTER_OURS:
        env = _environment(cluster_services[name])
        assert all(key.startswith("REDCREDIT_") for key in env), env
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        assert settings.redis_cluster is True
        url = urlsplit(str(settings.redis_url))
        assert (url.scheme, url.hostname in nodes, url.port) == ("redis", True, 6379)
        seeds = [seed.rpartition(":") for seed in settings.redis_seed_nodes]
        assert seeds and all(host in nodes and port == "6379" for host, _, port in seeds)
        # The rest is docker-compose.yml's, word for word.
        assert settings.database_url == plain["REDCREDIT_DATABASE_URL"]
    assert _argv(cluster_services["migrate"]) == ["redcredit", "migrate"]
    assert _argv(cluster_services["syncer"]) == ["redcredit", "sync"]


def test_cluster_start_up_order(cluster_services: dict[str, dict[str, Any]]) -> None:
    done = {"condition": "service_completed_successfully"}
    assert cluster_services["migrate"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"}
    }
    for name in ("syncer", "app"):
        assert cluster_services[name]["depends_on"] == {"migrate": done, "redis-cluster-init": done}
    assert cluster_services["syncer"]["restart"] == "unless-stopped"
    assert cluster_services["app"]["restart"] == "no"
    for name, service in cluster_services.items():
        for dependency, rule in service.get("depends_on", {}).items():
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in cluster_services[dependency], (
                    f"{name} waits on {dependency}"
                )


def test_the_app_runs_on_a_real_cluster_by_its_settings_alone(
    cluster_services: dict[str, dict[str, Any]],
    three_primary_cluster_url: str,
    postgres_url: str,
    pg_schema: str,
    prefix: str,
) -> None:
    app = cluster_services["app"]
    assert app["entrypoint"] == ["python", "-c"]
    (code,) = _words(app)
    # The compose addresses, replaced by the test servers'; nothing else changes.
    node = urlsplit(three_primary_cluster_url)
    env = _environment(app) | {
        "REDCREDIT_REDIS_URL": three_primary_cluster_url,
        "REDCREDIT_REDIS_SEED_NODES": f"{node.hostname}:{node.port}",
        "REDCREDIT_DATABASE_URL": postgres_url,
        "REDCREDIT_PG_SCHEMA": pg_schema,
        "REDCREDIT_KEY_PREFIX": prefix,
    }
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        migrate(conn, pg_schema)
    inherited = {k: v for k, v in os.environ.items() if not k.upper().startswith("REDCREDIT_")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=inherited | env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "credits=" in done.stdout


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


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda path: path.name)
def test_docker_compose_accepts_it(path: Path) -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    # `config` only reads the file: no engine is needed.
    done = subprocess.run(
        [*command, "-f", str(path), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
