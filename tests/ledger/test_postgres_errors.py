"""PostgreSQL's failures reach the ledger's callers as redcredit errors, never as psycopg's."""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest
import redis

from redcredit import BackendUnavailable, RedCredit, Settings
from redcredit.backends.migrate import migrate
from redcredit.ledger.evict import evict_idle
from redcredit.ledger.reconcile import reconcile
from redcredit.ledger.syncer import Syncer


@pytest.fixture
def unmigrated(settings: Settings, postgres_url: str) -> Settings:
    # PostgreSQL answers, and refuses every statement: the tables do not exist.
    schema = f"never_migrated_{uuid.uuid4().hex[:8]}"
    return settings.model_copy(update={"database_url": postgres_url, "pg_schema": schema})


def _assert_translated(error: BaseException) -> None:
    assert isinstance(error, BackendUnavailable)
    assert isinstance(error.__cause__, psycopg.ProgrammingError)
    assert "does not exist" in str(error)


def test_reconcile_and_evict_raise_backend_unavailable(
    rc: RedCredit, unmigrated: Settings, redis_client: redis.Redis, postgres_url: str
) -> None:
    rc.spend("known-to-redis", cost=1)  # something for eviction to look up in PostgreSQL
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        with pytest.raises(BackendUnavailable) as failed:
            reconcile(unmigrated, redis_client, conn)
        _assert_translated(failed.value)
        with pytest.raises(BackendUnavailable) as failed:
            evict_idle(unmigrated, redis_client, conn, idle=timedelta(0))
        _assert_translated(failed.value)


def test_the_syncer_raises_and_logs_backend_unavailable(
    rc: RedCredit, unmigrated: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    rc.spend("unsynced", cost=1)
    with Syncer(unmigrated) as syncer:
        batch = syncer.read_batch()
        assert batch
        with pytest.raises(BackendUnavailable) as failed:
            syncer.commit(batch)
        _assert_translated(failed.value)
    caplog.set_level(logging.WARNING, logger="redcredit.ledger.syncer")
    # The next syncer takes the batch over, fails the same way, and retries later.
    with Syncer(unmigrated) as syncer:
        assert syncer.tick(budget_s=1) == 0
    failures = [r.getMessage() for r in caplog.records if "sync failed" in r.getMessage()]
    assert len(failures) == 1 and "(BackendUnavailable)" in failures[0], failures
    # The batch's first statement finds no table: the schema was never made.
    assert "cannot write the batch to PostgreSQL (UndefinedTable" in failures[0]


def test_migrate_raises_backend_unavailable(postgres_url: str, pg_schema: str) -> None:
    conn = psycopg.connect(postgres_url, autocommit=True)
    conn.close()
    with pytest.raises(BackendUnavailable, match=f"cannot migrate schema '{pg_schema}'") as failed:
        migrate(conn, pg_schema)
    assert isinstance(failed.value.__cause__, psycopg.OperationalError)


@pytest.fixture
def silent_postgres(settings: Settings) -> Iterator[Settings]:
    """A PostgreSQL URL at a port that takes connections and never answers: a hung server."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)  # the kernel completes handshakes into the backlog; nobody accepts
        url = f"postgresql://redcredit@127.0.0.1:{sock.getsockname()[1]}/redcredit"
        yield settings.model_copy(
            update={"database_url": url, "database_timeout": timedelta(seconds=1)}
        )


def test_a_hung_postgres_fails_the_loader_within_database_timeout(
    silent_postgres: Settings,
) -> None:
    # Without connect_timeout libpq would wait about 130 s; 1 s is taken as 2 s.
    started = time.monotonic()
    with RedCredit(settings=silent_postgres) as rc, pytest.raises(BackendUnavailable):
        rc.spend("opens-from-postgres", cost=1)
    assert time.monotonic() - started < 15


def test_a_hung_postgres_fails_a_syncer_commit_within_database_timeout(
    silent_postgres: Settings, redis_client: redis.Redis
) -> None:
    started = time.monotonic()
    with (
        Syncer(silent_postgres, redis_client=redis_client) as syncer,
        pytest.raises(BackendUnavailable),
    ):
        syncer.commit([])
    assert time.monotonic() - started < 15
