"""Versioned plain-SQL migrations, applied in one transaction under an advisory lock.

Running them twice, or from two processes at once, applies each version once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

__all__ = ["Migration", "migrate", "migrations"]

_NAME = re.compile(r"(\d{4})_(\w+)\.sql")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    text: str


def migrations() -> list[Migration]:
    found = []
    for entry in resources.files("redcredit.backends").joinpath("migrations").iterdir():
        match = _NAME.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    return sorted(found, key=lambda m: m.version)


def migrate(conn: psycopg.Connection[Any], schema: str) -> list[int]:
    """Brings ``schema`` up to date; returns the versions applied by this call."""
    applied_now = []
    schema_id = sql.Identifier(schema)
    with conn.transaction():
        # Serialises concurrent runs: the second waits, then finds nothing to do.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('redcredit.migrate.' || %s))", [schema])
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema_id))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(schema_id)
        )
        cursor = conn.execute(sql.SQL("SELECT version FROM {}.migrations").format(schema_id))
        done = {row[0] for row in cursor}
        for migration in migrations():
            if migration.version in done:
                continue
            conn.execute(sql.SQL(migration.text).format(schema=schema_id))
            conn.execute(
                sql.SQL("INSERT INTO {}.migrations (version, name) VALUES (%s, %s)").format(
                    schema_id
                ),
                [migration.version, migration.name],
            )
            applied_now.append(migration.version)
    return applied_now
