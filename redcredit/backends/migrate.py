"""Versioned plain-SQL migrations, applied in one transaction under an advisory lock.

Running them twice, or from two processes at once, applies each version once.
A migration may run beside the traffic of the release before it (loaders and
syncers reading and writing the same tables, in their own order), so it
waits for each table's lock a short while only: a wait that could close a
deadlock, or would hold back the queries queued behind it, gives up, the
whole transaction rolls back, and it starts again.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg

from .postgres import (
    applied_migrations,
    apply_migration,
    limit_lock_waits,
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


# Below PostgreSQL's deadlock_timeout (1 s by default): a migration gives up
# its locks before the server would pick a victim among the others' calls.
LOCK_WAIT_MS = 300
_RETRY_PAUSES_S = (0.05, 0.1, 0.2, 0.5, 1.0)


def migrate(conn: psycopg.Connection[Any], schema: str, *, give_up_s: float = 120.0) -> list[int]:
    """Brings ``schema`` up to date; returns the versions applied by this call.

    Tries again while the tables' locks stay taken, for up to ``give_up_s``.
    """
    deadline = time.monotonic() + give_up_s
    attempt = 0
    with postgres_errors_translated(f"migrate schema {schema!r}"):
        while True:
            try:
                return _migrate_once(conn, schema)
            except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected):
                pause = _RETRY_PAUSES_S[min(attempt, len(_RETRY_PAUSES_S) - 1)]
                if time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            attempt += 1


def _migrate_once(conn: psycopg.Connection[Any], schema: str) -> list[int]:
    applied_now = []
    with conn.transaction():
        # Waited for in full: another run holds it only to apply the same versions.
        lock_migrations(conn, schema)
        prepare_migrations(conn, schema)
        done = applied_migrations(conn, schema)
        pending = [m for m in migrations() if m.version not in done]
        if pending:
            limit_lock_waits(conn, LOCK_WAIT_MS)
        for migration in pending:
            apply_migration(conn, schema, migration.version, migration.name, migration.text)
            applied_now.append(migration.version)
    return applied_now
