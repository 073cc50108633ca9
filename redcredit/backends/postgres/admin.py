"""Migrations' bookkeeping, and the embedded server's two statements."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

__all__ = [
    "applied_migrations",
    "apply_migration",
    "create_database",
    "limit_lock_waits",
    "lock_migrations",
    "ping",
    "prepare_migrations",
]


# -- migrations ----------------------------------------------------------------------------------


def lock_migrations(conn: psycopg.Connection[Any], schema: str) -> None:
    """Serialises concurrent runs, to the caller's commit: the second waits, then finds nothing."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtext('redcredit.migrate.' || %s))", [schema])


def prepare_migrations(conn: psycopg.Connection[Any], schema: str) -> None:
    """The schema, and its table of applied migrations."""
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        ).format(sql.Identifier(schema))
    )


def limit_lock_waits(conn: psycopg.Connection[Any], timeout_ms: int) -> None:
    """Until the caller's commit, a statement waiting longer for a lock fails (LockNotAvailable)."""
    conn.execute("SELECT set_config('lock_timeout', %s, true)", [f"{timeout_ms}ms"])


def applied_migrations(conn: psycopg.Connection[Any], schema: str) -> set[int]:
    query = sql.SQL("SELECT version FROM {}.migrations").format(sql.Identifier(schema))
    return {row[0] for row in conn.execute(query)}


def apply_migration(
    conn: psycopg.Connection[Any], schema: str, version: int, name: str, migration_text: str
) -> None:
    """Runs a migration file's text, ``{schema}`` replaced by the quoted schema, and records it."""
    conn.execute(sql.SQL(migration_text).format(schema=sql.Identifier(schema)))
    conn.execute(
        sql.SQL("INSERT INTO {}.migrations (version, name) VALUES (%s, %s)").format(
            sql.Identifier(schema)
        ),
        [version, name],
    )


# -- administration (the embedded server) --------------------------------------------------------


def ping(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SELECT 1")


def create_database(conn: psycopg.Connection[Any], name: str) -> None:
    """Creates the database ``name`` unless it exists; ``conn`` must be in autocommit."""
    found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    if found is None:
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER postgres").format(sql.Identifier(name)))
