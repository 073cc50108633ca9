"""The ``buckets`` table: written from the ledger's new entries, read by loaders and reconcile.

Rows are folded in Python (:mod:`redcredit.core.bucket_ledger`), the rule
reconcile applies too, and written back in one statement per batch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

import psycopg
from psycopg import sql

from ...core.bucket_ledger import BucketRow, fold_entry
from ...core.journal import BASE_BUCKET, JournalEntry, changes_json, instant

__all__ = [
    "AccountBuckets",
    "apply_bucket_entries",
    "bucket_from_row",
    "bucket_remaining",
    "bucket_rows",
    "ledger_bucket_sums",
    "open_buckets_query",
]

# Per account, its bucket rows by id.
AccountBuckets = dict[str, dict[str, BucketRow]]

# Times as ms on the server's clock, exactly (extract gives a numeric).
_ROW = (
    "account, bucket, category, priority, (extract(epoch FROM effective_at) * 1000)::bigint, "
    "COALESCE((extract(epoch FROM expires_at) * 1000)::bigint, 0), granted, "
    "(extract(epoch FROM created_at) * 1000)::bigint, remaining, status, last_seq"
)


def _row(values: Sequence[Any]) -> BucketRow:
    _a, _b, category, priority, effective, expires, granted, created, remaining, status, seq = (
        values
    )
    return BucketRow(
        category=category,
        priority=priority,
        effective_ms=effective,
        expires_ms=expires,
        granted=granted,
        created_ms=created,
        remaining=remaining,
        live=status == "live",
        last_seq=seq,
    )


def bucket_rows(
    conn: psycopg.Connection[Any],
    schema: str,
    accounts: Sequence[str],
    named: Iterable[tuple[str, str]] = (),
) -> AccountBuckets:
    """The buckets of these accounts that are not closed, and those ``named`` (account, id)."""
    pairs = sorted(set(named))
    query = sql.SQL(
        "SELECT {} FROM {}.buckets WHERE (account = ANY(%s) AND status <> 'closed') "
        "OR (account, bucket) IN (SELECT * FROM unnest(%s::text[], %s::text[]))"
    ).format(sql.SQL(_ROW), sql.Identifier(schema))
    found: AccountBuckets = defaultdict(dict)
    params = [list(accounts), [a for a, _ in pairs], [b for _, b in pairs]]
    for values in conn.execute(query, params):
        found[values[0]][values[1]] = _row(values)
    return found


@lru_cache(maxsize=16)
def open_buckets_query(schema: str) -> sql.Composed:
    """An account's buckets that are not closed, as :func:`bucket_from_row` reads them."""
    return sql.SQL("SELECT {} FROM {}.buckets WHERE account = %s AND status <> 'closed'").format(
        sql.SQL(_ROW), sql.Identifier(schema)
    )


def bucket_from_row(values: Sequence[Any]) -> tuple[str, BucketRow]:
    return values[1], _row(values)


def apply_bucket_entries(
    conn: psycopg.Connection[Any], schema: str, entries: Sequence[JournalEntry]
) -> None:
    """Folds new ledger entries into the buckets, in the caller's transaction.

    A re-base's ledger row gets the changes that take the buckets to Redis's,
    so every bucket's deltas in the ledger still sum to its remaining credits.
    """
    ordered = sorted(entries, key=lambda e: e.position)
    snapshots = sorted({e.account for e in ordered if e.bucket_snapshot is not None})
    named = {(e.account, e.bucket) for e in ordered if e.bucket}
    named |= {(e.account, c.bucket) for e in ordered for c in e.bucket_changes}
    rows = bucket_rows(conn, schema, snapshots, named)
    touched: set[tuple[str, str]] = set()
    rebased = []
    for entry in ordered:
        account_rows = rows.setdefault(entry.account, {})
        changed: set[str] = set()
        changes = fold_entry(account_rows, entry, changed)
        touched |= {(entry.account, bucket) for bucket in changed}
        if changes is not None:
            rebased.append((changes_json(changes), entry.account, entry.seq))
    _write(conn, schema, rows, sorted(touched))
    if rebased:
        query = sql.SQL(
            "UPDATE {}.ledger SET bucket_changes = %s::jsonb WHERE account = %s AND seq = %s"
        ).format(sql.Identifier(schema))
        conn.cursor().executemany(query, rebased)


def _write(
    conn: psycopg.Connection[Any],
    schema: str,
    rows: AccountBuckets,
    touched: Sequence[tuple[str, str]],
) -> None:
    columns: list[list[Any]] = [[] for _ in range(11)]
    for account, bucket in touched:
        row = rows[account][bucket]
        values = (
            account,
            bucket,
            row.category,
            row.priority,
            instant(row.effective_ms),
            instant(row.expires_ms) if row.expires_ms else None,
            row.granted,
            row.remaining,
            row.status,
            row.last_seq,
            instant(row.created_ms),
        )
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    # Sorted by key, so two transactions lock rows in the same order; a row
    # only moves forward to a newer entry.
    conn.execute(
        sql.SQL(
            "INSERT INTO {}.buckets AS b (account, bucket, category, priority, effective_at, "
            "expires_at, granted, remaining, status, last_seq, created_at) "
            "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::int[], "
            "%s::timestamptz[], %s::timestamptz[], %s::bigint[], %s::bigint[], %s::text[], "
            "%s::bigint[], %s::timestamptz[]) "
            "ON CONFLICT (account, bucket) DO UPDATE SET category = EXCLUDED.category, "
            "priority = EXCLUDED.priority, effective_at = EXCLUDED.effective_at, "
            "expires_at = EXCLUDED.expires_at, granted = EXCLUDED.granted, "
            "remaining = EXCLUDED.remaining, status = EXCLUDED.status, "
            "last_seq = EXCLUDED.last_seq, created_at = EXCLUDED.created_at "
            "WHERE b.last_seq < EXCLUDED.last_seq"
        ).format(sql.Identifier(schema)),
        columns,
    )


# -- for reconcile -------------------------------------------------------------------------------


def bucket_remaining(
    conn: psycopg.Connection[Any], schema: str, accounts: Sequence[str]
) -> dict[tuple[str, str], int]:
    """Every bucket row of these accounts, closed ones included: its remaining credits."""
    query = sql.SQL(
        "SELECT account, bucket, remaining FROM {}.buckets WHERE account = ANY(%s)"
    ).format(sql.Identifier(schema))
    return {(a, b): r for a, b, r in conn.execute(query, [list(accounts)])}


def ledger_bucket_sums(
    conn: psycopg.Connection[Any], schema: str, accounts: Sequence[str]
) -> dict[tuple[str, str], int]:
    """Per (account, bucket) besides the base bucket: the sum of the ledger's deltas."""
    query = sql.SQL(
        "SELECT l.account, c.bucket, sum(c.delta) FROM {}.ledger AS l, "
        "jsonb_to_recordset(l.bucket_changes) AS c(bucket text, delta bigint) "
        "WHERE l.account = ANY(%s) AND l.bucket_changes IS NOT NULL AND c.bucket <> %s "
        "GROUP BY 1, 2"
    ).format(sql.Identifier(schema))
    rows = conn.execute(query, [list(accounts), BASE_BUCKET])
    return {(a, b): int(total) for a, b, total in rows}
