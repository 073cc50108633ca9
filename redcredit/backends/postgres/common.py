"""What every statement module shares: psycopg's failures translated, and the fence."""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg

from ...errors import BackendUnavailable

__all__ = ["fence_class", "fence_for_apply", "postgres_errors_translated"]


@contextmanager
def postgres_errors_translated(action: str, outcome: str = "") -> Iterator[None]:
    """psycopg's failures as :class:`BackendUnavailable`: "cannot ``action`` (...)``outcome``".

    A refused statement too (a schema never migrated), not only an unreachable
    server: either way the system of record cannot serve the call, and the
    HTTP gate must apply its outage policy rather than fail the request. The
    message keeps psycopg's class name, and the error is the cause.
    """
    try:
        yield
    except psycopg.Error as exc:
        # psycopg's messages name the server, never the password.
        hint = ""
        if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.UndefinedColumn):
            # A schema never migrated, or one a release behind during an upgrade
            # (new syncers retry until it is migrated, losing nothing).
            hint = "; is the schema migrated? `redcredit migrate` brings it up to date"
        raise BackendUnavailable(
            f"cannot {action} ({type(exc).__name__}: {exc}){hint}{outcome}"
        ) from exc


# -- the fence between syncers and loaders -------------------------------------------------------

# Per partition, as transaction-scoped advisory locks. A syncer holds it shared
# from before it writes a batch until its commit, and confirms in between that
# Redis still has the batch's entries; a loader takes it exclusively before
# reading an account. So when Redis lost its data and an account is loaded
# again, a syncer still holding entries of the lost data has either committed
# them before the read (and the account resumes after them) or finds them gone
# and rolls back; it never lands them after the read, on sequence numbers the
# reloaded account reuses. The loader's side is in reads.py.


def fence_class(schema: str) -> int:
    # The advisory lock's first key: one lock space per schema.
    return int.from_bytes(zlib.crc32(schema.encode()).to_bytes(4, "big"), "big", signed=True)


def fence_for_apply(conn: psycopg.Connection[Any], schema: str, partitions: Sequence[int]) -> None:
    conn.execute(
        "SELECT count(pg_advisory_xact_lock_shared(%s, p)) "
        "FROM (SELECT DISTINCT unnest(%s::int[]) AS p ORDER BY 1) AS fenced",
        [fence_class(schema), list(partitions)],
    )
