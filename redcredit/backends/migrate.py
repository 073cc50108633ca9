"""Versioned plain-SQL migrations, applied in one transaction under an advisory lock.

Running them twice, or from two processes at once, applies each version once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg

from .postgres import (
    applied_migrations,
    apply_migration,
    lock_migrations,
    postgres_errors_translated,
    prepare_migrations,
)

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
    with postgres_errors_translated(f"migrate schema {schema!r}"), conn.transaction():
        lock_migrations(conn, schema)
        prepare_migrations(conn, schema)
        done = applied_migrations(conn, schema)
        for migration in migrations():
            if migration.version in done:
                continue
            apply_migration(conn, schema, migration.version, migration.name, migration.text)
            applied_now.append(migration.version)
    return applied_now
