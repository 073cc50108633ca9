"""Fixtures for tests that need PostgreSQL: settings with a fresh schema, a connection, a syncer."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest

from redcredit import Settings
from redcredit.backends.migrate import migrate
from redcredit.ledger.syncer import Syncer


@pytest.fixture
def pg_settings(settings: Settings, postgres_url: str, pg_schema: str) -> Settings:
    settings = settings.model_copy(
        update={
            "database_url": postgres_url,
            "pg_schema": pg_schema,
            "sync_claim_idle": timedelta(seconds=1),
            "sync_interval": timedelta(milliseconds=50),
            "sync_batch_size": 500,
        }
    )
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        migrate(conn, pg_schema)
    return settings


@pytest.fixture
def pg(pg_settings: Settings) -> Iterator[psycopg.Connection]:
    assert pg_settings.database_url is not None
    with psycopg.connect(pg_settings.database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def syncer(pg_settings: Settings) -> Iterator[Syncer]:
    syncer = Syncer(pg_settings)
    yield syncer
    syncer.close()
