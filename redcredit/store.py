"""PostgreSQL side: applying journal batches, and reading accounts back.

Applying is idempotent: a ledger row is keyed by (account, seq) and inserted
once; an account row only moves forward to a newer sequence number. So a batch
applied twice, or batches applied out of order, give the same result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from .journal import LEDGER_COLUMNS, JournalEntry
from .loader import AccountSnapshot

__all__ = ["apply_entries", "load_account_query", "snapshot_from_row"]


def apply_entries(
    conn: psycopg.Connection[Any], schema: str, entries: Sequence[JournalEntry]
) -> None:
    """Writes a batch in the caller's transaction: ledger rows, then account balances."""
    schema_id = sql.Identifier(schema)
    columns = sql.SQL(", ").join(map(sql.Identifier, LEDGER_COLUMNS))
    # A per-session staging table: COPY is several times faster than INSERTs,
    # and ON CONFLICT is only available to INSERT ... SELECT.
    conn.execute(
        sql.SQL(
            "CREATE TEMP TABLE IF NOT EXISTS redcredit_incoming "
            "(LIKE {}.ledger) ON COMMIT DELETE ROWS"
        ).format(schema_id)
    )
    with conn.cursor().copy(
        sql.SQL("COPY redcredit_incoming ({}) FROM STDIN").format(columns)
    ) as copy:
        for entry in entries:
            copy.write_row(entry.ledger_row())
    conn.execute(
        sql.SQL(
            "INSERT INTO {schema}.ledger ({columns}) "
            "SELECT {columns} FROM redcredit_incoming "
            "ON CONFLICT (account, seq) DO NOTHING"
        ).format(schema=schema_id, columns=columns)
    )
    # Newest entry per account; sorted so concurrent syncers lock rows in the
    # same order and cannot deadlock.
    conn.execute(
        sql.SQL(
            "INSERT INTO {schema}.accounts AS a "
            "(account, credits, chat_messages, plan, last_seq, created_at, updated_at) "
            "SELECT DISTINCT ON (account) account, credits_after, chat_after, plan, seq, "
            "server_time, now() FROM redcredit_incoming ORDER BY account, seq DESC "
            "ON CONFLICT (account) DO UPDATE SET credits = EXCLUDED.credits, "
            "chat_messages = EXCLUDED.chat_messages, plan = EXCLUDED.plan, "
            "last_seq = EXCLUDED.last_seq, updated_at = now() "
            "WHERE a.last_seq < EXCLUDED.last_seq"
        ).format(schema=schema_id)
    )


def load_account_query(schema: str) -> sql.Composed:
    return sql.SQL(
        "SELECT credits, chat_messages, plan, last_seq FROM {}.accounts WHERE account = %s"
    ).format(sql.Identifier(schema))


def snapshot_from_row(row: tuple[Any, ...] | None, defaults: AccountSnapshot) -> AccountSnapshot:
    """An account as the system of record has it; unknown ones open with the defaults."""
    if row is None:
        return defaults
    credits, chat_messages, plan, last_seq = row
    # Rows imported from an older system may hold NULLs: they count as 0.
    return AccountSnapshot(
        credits=credits or 0,
        chat_messages=chat_messages or 0,
        plan=plan or defaults.plan,
        sequence=last_seq,
    )
