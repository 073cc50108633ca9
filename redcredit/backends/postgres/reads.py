"""Reads: an account back for the loaders, and what reconcile, evict and the demo compare."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import psycopg
from psycopg import sql

from ...core.loader import AccountSnapshot
from .buckets import bucket_from_row, open_buckets_query
from .common import fence_class

__all__ = [
    "RESTORED_KEYS_MAX",
    "AccountState",
    "LedgerSums",
    "account_ids",
    "account_roots",
    "account_states",
    "account_trees",
    "ledger_of",
    "ledger_size",
    "ledger_sums",
    "read_snapshot",
    "read_snapshot_async",
    "recent_ledger_async",
    "snapshot_from_row",
]

AccountState = tuple[int, int, str, int]  # credits, chat messages, plan, sequence
LedgerSums = tuple[int, int, int, int, int]  # credits, chat messages, entries, first, last seq


# The loaders' side of the fence (common.py): a statement of its own, run in
# the loader's transaction before the read, so the read takes its snapshot
# after the lock and sees what a syncer committed meanwhile.
_FENCE_FOR_LOAD = "SELECT pg_advisory_xact_lock(%s, %s)"


# -- reading an account back (the loaders) -------------------------------------------------------

# The most recent keys reloaded with an account; older ones are forgotten early.
RESTORED_KEYS_MAX = 1_000


@lru_cache(maxsize=16)
def _account_query(schema: str) -> sql.Composed:
    """The account's row, whether the schema has the buckets table yet, and the
    account's place in its tree and its cap (NULL before migration 0005), and
    its children (NULL before 0006).

    Parameters: the account, the schema. During a rolling upgrade new
    clients may load accounts before ``redcredit migrate`` has run 0004: a
    schema without the table holds no bucket (only a syncer of this release
    writes them, and it needs 0004), so its accounts load as every credit in
    the base bucket. Looked up each time, behind the fence: once the
    migration commits, the next load reads the table.
    """
    return sql.SQL(
        "SELECT credits, chat_messages, plan, last_seq, "
        "to_regclass(format('%%I.buckets', %s::text)) IS NOT NULL, "
        # Read by name from the row: a schema before 0005 has no tree columns.
        "to_jsonb(a) ->> 'parent', to_jsonb(a) ->> 'root', to_jsonb(a) ->> 'cap', "
        "(to_jsonb(a) ->> 'cap_window')::bigint, (to_jsonb(a) ->> 'cap_credits')::bigint, "
        "(to_jsonb(a) ->> 'cap_messages')::bigint, "
        # NULL before 0006 (no count kept); after it, NULL is none counted.
        "CASE WHEN to_jsonb(a) ? 'children' "
        "THEN COALESCE((to_jsonb(a) ->> 'children')::bigint, 0) END "
        "FROM {}.accounts AS a WHERE account = %s"
    ).format(sql.Identifier(schema))


@lru_cache(maxsize=16)
def _applied_keys_query(schema: str) -> sql.Composed:
    """Idempotency keys of an account's calls still within the window, newest first.

    Parameters: :func:`_applied_keys_params`. Entries a call wrote on its way
    (lapses, refills, the opening) carry its key but are not its effect.
    """
    return sql.SQL(
        "SELECT idempotency_key, max(seq), "
        "(extract(epoch FROM max(server_time) - now()) * 1000)::bigint + %s "
        "FROM {}.ledger WHERE account = %s AND idempotency_key IS NOT NULL "
        "AND op NOT IN ('lapse', 'refill', 'open') "
        "AND server_time > now() - %s * interval '1 millisecond' "
        "GROUP BY idempotency_key ORDER BY 2 DESC LIMIT %s"
    ).format(sql.Identifier(schema))


@lru_cache(maxsize=32)
def _refilled_query(schema: str, has_buckets: bool) -> sql.Composed:
    """The instant, in ms on the server's clock, of the account's last refill of credits
    and of chat messages (NULL: none journaled). Parameters: the account, twice.

    A refill of credits names the refill bucket (a schema without buckets
    knows only refills that added credits); a refill of chat messages adds
    some, or journals nothing.
    """
    if has_buckets:
        return sql.SQL(
            "SELECT (SELECT (extract(epoch FROM max(server_time)) * 1000)::bigint "
            "FROM {0}.ledger WHERE account = %s AND bucket = 'refill' AND op = 'refill'), "
            "(SELECT (extract(epoch FROM max(server_time)) * 1000)::bigint FROM {0}.ledger "
            "WHERE account = %s AND op = 'refill' AND chat_delta > 0)"
        ).format(sql.Identifier(schema))
    return sql.SQL(
        "SELECT (SELECT (extract(epoch FROM max(server_time)) * 1000)::bigint "
        "FROM {0}.ledger WHERE account = %s AND op = 'refill' AND credit_delta > 0), "
        "(SELECT (extract(epoch FROM max(server_time)) * 1000)::bigint FROM {0}.ledger "
        "WHERE account = %s AND op = 'refill' AND chat_delta > 0)"
    ).format(sql.Identifier(schema))


def _refilled(found: tuple[Any, ...] | None) -> tuple[tuple[str, int], ...]:
    if found is None:
        return ()
    return tuple(
        (resource, int(at)) for resource, at in zip("cm", found, strict=True) if at is not None
    )


def _applied_keys_params(account: str, window_ms: int) -> list[Any]:
    return [window_ms, account, window_ms, RESTORED_KEYS_MAX]


def read_snapshot(
    conn: psycopg.Connection[Any],
    schema: str,
    account: str,
    *,
    partition: int,
    window_ms: int,
    defaults: AccountSnapshot,
) -> AccountSnapshot:
    """An account as PostgreSQL has it, read in the caller's transaction behind the fence."""
    conn.execute(_FENCE_FOR_LOAD, [fence_class(schema), partition])
    found = conn.execute(_account_query(schema), [schema, account]).fetchone()
    row, applied, buckets, refilled = None, [], [], None
    if found is not None:
        row, has_buckets = (*found[:4], *found[5:]), found[4]
        params = _applied_keys_params(account, window_ms)
        applied = conn.execute(_applied_keys_query(schema), params).fetchall()
        if has_buckets:
            buckets = conn.execute(open_buckets_query(schema), [account]).fetchall()
        query = _refilled_query(schema, has_buckets)
        refilled = conn.execute(query, [account, account]).fetchone()
    return snapshot_from_row(row, defaults, applied, buckets, _refilled(refilled))


async def read_snapshot_async(
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    account: str,
    *,
    partition: int,
    window_ms: int,
    defaults: AccountSnapshot,
) -> AccountSnapshot:
    """:func:`read_snapshot` on an async connection."""
    await conn.execute(_FENCE_FOR_LOAD, [fence_class(schema), partition])
    found = await (await conn.execute(_account_query(schema), [schema, account])).fetchone()
    row, applied, buckets, refilled = None, [], [], None
    if found is not None:
        row, has_buckets = (*found[:4], *found[5:]), found[4]
        params = _applied_keys_params(account, window_ms)
        applied = await (await conn.execute(_applied_keys_query(schema), params)).fetchall()
        if has_buckets:
            query = open_buckets_query(schema)
            buckets = await (await conn.execute(query, [account])).fetchall()
        query = _refilled_query(schema, has_buckets)
        refilled = await (await conn.execute(query, [account, account])).fetchone()
    return snapshot_from_row(row, defaults, applied, buckets, _refilled(refilled))


def snapshot_from_row(
    row: tuple[Any, ...] | None,
    defaults: AccountSnapshot,
    applied: Sequence[tuple[Any, ...]] = (),
    buckets: Sequence[tuple[Any, ...]] = (),
    refilled: tuple[tuple[str, int], ...] = (),
) -> AccountSnapshot:
    """An account as the system of record has it; unknown ones open with the defaults.

    ``buckets``: rows of :func:`~.buckets.open_buckets_query`, besides the base
    bucket, which holds the rest of the credits. ``refilled``: the instant of
    the last refill of each resource ('c', 'm') the ledger holds.
    """
    if row is None:
        return defaults
    credits, chat_messages, plan, last_seq, parent, root, cap, window, charged, messages = row[:10]
    children = row[10] if len(row) > 10 else 0
    cap_use = "" if window is None else f"{window},{charged},{messages}"
    # Rows imported from an older system may hold NULLs: they count as 0.
    return AccountSnapshot(
        credits=credits or 0,
        chat_messages=chat_messages or 0,
        plan=plan or defaults.plan,
        sequence=last_seq,
        applied_keys=tuple((key, seq, left) for key, seq, left in applied if left > 0),
        buckets=tuple(
            row.snapshot(bucket)
            for bucket, row in sorted(map(bucket_from_row, buckets), key=lambda b: b[0])
        ),
        parent=parent,
        root=root,
        cap=cap or "",
        cap_use=cap_use if cap else "",
        refilled=refilled,
        children=children,
    )


# -- reads for reconcile and evict ---------------------------------------------------------------


def account_ids(conn: psycopg.Connection[Any], schema: str) -> set[str]:
    query = sql.SQL("SELECT account FROM {}.accounts").format(sql.Identifier(schema))
    return {row[0] for row in conn.execute(query)}


def account_states(
    conn: psycopg.Connection[Any], schema: str, accounts: Sequence[str]
) -> dict[str, AccountState]:
    query = sql.SQL(
        "SELECT account, COALESCE(credits, 0), COALESCE(chat_messages, 0), plan, last_seq "
        "FROM {}.accounts WHERE account = ANY(%s)"
    ).format(sql.Identifier(schema))
    rows = conn.execute(query, [list(accounts)])
    return {row[0]: (row[1], row[2], row[3], row[4]) for row in rows}


def account_roots(
    conn: psycopg.Connection[Any], schema: str, accounts: Sequence[str]
) -> dict[str, str]:
    """The root of the tree of each of these accounts that is a tree's member."""
    query = sql.SQL(
        "SELECT account, root FROM {}.accounts WHERE account = ANY(%s) AND root IS NOT NULL"
    ).format(sql.Identifier(schema))
    return {account: root for account, root in conn.execute(query, [list(accounts)])}


def account_trees(
    conn: psycopg.Connection[Any], schema: str, accounts: Sequence[str]
) -> dict[str, tuple[Any, ...]]:
    """Each account's parent, root, cap, and the cap's window, credits and chat messages.

    Read by name from the row, like the loaders' read: a schema before
    migration 0005 has no tree columns, and its accounts sit in no tree.
    """
    query = sql.SQL(
        "SELECT account, to_jsonb(a) ->> 'parent', to_jsonb(a) ->> 'root', to_jsonb(a) ->> 'cap', "
        "(to_jsonb(a) ->> 'cap_window')::bigint, (to_jsonb(a) ->> 'cap_credits')::bigint, "
        "(to_jsonb(a) ->> 'cap_messages')::bigint FROM {}.accounts AS a WHERE account = ANY(%s)"
    ).format(sql.Identifier(schema))
    return {row[0]: tuple(row[1:]) for row in conn.execute(query, [list(accounts)])}


def ledger_sums(
    conn: psycopg.Connection[Any], schema: str, accounts: Sequence[str]
) -> dict[str, LedgerSums]:
    query = sql.SQL(
        "SELECT account, SUM(credit_delta), SUM(chat_delta), COUNT(*), MIN(seq), MAX(seq) "
        "FROM {}.ledger WHERE account = ANY(%s) GROUP BY account"
    ).format(sql.Identifier(schema))
    rows = conn.execute(query, [list(accounts)])
    return {row[0]: (int(row[1]), int(row[2]), row[3], row[4], row[5]) for row in rows}


# -- reads for the demo --------------------------------------------------------------------------


def ledger_of(conn: psycopg.Connection[Any], schema: str, account: str) -> list[tuple[Any, ...]]:
    """An account's ledger, oldest first: seq, op, both deltas, both balances after, feature."""
    query = sql.SQL(
        "SELECT seq, op, credit_delta, chat_delta, credits_after, chat_after, feature "
        "FROM {}.ledger WHERE account = %s ORDER BY seq"
    ).format(sql.Identifier(schema))
    return conn.execute(query, [account]).fetchall()


def ledger_size(conn: psycopg.Connection[Any], schema: str) -> int:
    query = sql.SQL("SELECT COUNT(*) FROM {}.ledger").format(sql.Identifier(schema))
    row = conn.execute(query).fetchone()
    return int(row[0]) if row else 0


async def recent_ledger_async(
    conn: psycopg.AsyncConnection[Any], schema: str, account: str, limit: int
) -> list[tuple[Any, ...]]:
    """An account's newest ledger rows, as :func:`ledger_of` plus the server time as text."""
    query = sql.SQL(
        "SELECT seq, op, credit_delta, chat_delta, credits_after, chat_after, feature, "
        "server_time::text FROM {}.ledger WHERE account = %s ORDER BY seq DESC LIMIT %s"
    ).format(sql.Identifier(schema))
    return await (await conn.execute(query, [account, limit])).fetchall()
