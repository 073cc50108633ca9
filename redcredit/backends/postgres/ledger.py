"""The syncer's statements: a batch into the ledger and the buckets, and a fork kept apart."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from psycopg import sql

from ...core.journal import LEDGER_COLUMNS, JournalEntry
from .buckets import apply_bucket_entries

__all__ = [
    "ForkRow",
    "applied_calls",
    "apply_entries",
    "cap_use_before",
    "diverged_calls",
    "fork_entries",
    "forks_of",
    "history_since",
    "ledger_ids",
    "open_fork",
    "open_forks",
    "record_diverged",
    "update_fork",
]


# -- ledger writes (the syncer) ------------------------------------------------------------------

# Applying is idempotent: a ledger row is keyed by (account, seq) and inserted
# once; an account row only moves forward to a newer sequence number. So a batch
# applied twice, or batches applied out of order, give the same result.


def apply_entries(
    conn: psycopg.Connection[Any], schema: str, entries: Sequence[JournalEntry]
) -> set[tuple[str, int]]:
    """Writes a batch in the caller's transaction: ledger rows, buckets, account balances.

    An account's entries land in order only: one whose predecessor is not in
    PostgreSQL yet (another syncer holds it, or one that died) waits. Returns
    the positions (account, sequence number) of the entries that wait, to be
    offered again later.
    Otherwise a Redis that lost its data could leave a hole in the ledger: the
    predecessor lost with it, and the account reloaded past it. Only the
    entries that made a new ledger row change the buckets, so a batch
    delivered again changes nothing.
    """
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
    # Past an account's last applied entry, its entries must run on from it
    # without a hole; from the first hole on, they wait.
    waiting = conn.execute(
        sql.SQL(
            "DELETE FROM redcredit_incoming AS i USING ("
            " SELECT account, seq,"
            " seq - last_seq - row_number() OVER (PARTITION BY account ORDER BY seq) AS hole"
            " FROM (SELECT DISTINCT i.account, i.seq, COALESCE(a.last_seq, 0) AS last_seq"
            " FROM redcredit_incoming AS i LEFT JOIN {}.accounts AS a USING (account)) AS s"
            " WHERE seq > last_seq"
            ") AS w WHERE i.account = w.account AND i.seq = w.seq AND w.hole > 0 "
            "RETURNING i.account, i.seq"
        ).format(schema_id)
    ).fetchall()
    insert = sql.SQL(
        "INSERT INTO {schema}.ledger ({columns}) "
        "SELECT {columns} FROM redcredit_incoming "
        "ON CONFLICT (account, seq) DO NOTHING"
    ).format(schema=schema_id, columns=columns)
    bucketed = [entry for entry in entries if entry.touches_buckets]
    treed = [entry for entry in entries if entry.touches_tree]
    fresh: set[tuple[str, int]] = set()
    if not bucketed and not treed:
        # Most batches: no row to send back.
        conn.execute(insert)
    else:
        # Only the entries that made a new row change the buckets and the tree.
        returning = sql.SQL("{} RETURNING account, seq").format(insert)
        fresh = {(account, seq) for account, seq in conn.execute(returning)}
        touching: dict[tuple[str, int], JournalEntry] = {}
        for entry in bucketed:
            if entry.position in fresh:
                touching.setdefault(entry.position, entry)
        if touching:
            apply_bucket_entries(conn, schema, list(touching.values()))
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
    if treed:
        apply_tree_entries(conn, schema, [e for e in treed if e.position in fresh])
    return {(account, seq) for account, seq in waiting}


def apply_tree_entries(
    conn: psycopg.Connection[Any], schema: str, entries: Sequence[JournalEntry]
) -> None:
    """Where accounts sit in their trees, their caps, the caps' use and their children,
    from new entries: the newest of each kind per account wins."""
    placed: dict[str, tuple[int, str | None, str | None]] = {}
    capped: dict[str, tuple[int, str | None]] = {}
    used: dict[str, tuple[int, tuple[int | None, int | None, int | None]]] = {}
    counted: dict[str, int] = {}
    for e in sorted(entries, key=lambda entry: entry.seq):
        if e.places:
            placed[e.account] = (e.seq, e.parent, e.root)
        if e.children is not None:
            counted[e.account] = e.children
        if e.cap is not None:
            capped[e.account] = (e.seq, e.cap or None)
        if e.cap_use is not None:
            used[e.account] = (e.seq, e.cap_use)
        elif e.cap == "":
            # A cap removed takes its use with it (lua/set_cap.lua): set again,
            # it counts from nothing, and so must the account once reloaded.
            used[e.account] = (e.seq, (None, None, None))
    table = sql.Identifier(schema)
    with conn.cursor() as cursor:
        if placed:
            cursor.executemany(
                sql.SQL("UPDATE {}.accounts SET parent = %s, root = %s WHERE account = %s").format(
                    table
                ),
                [(parent, root, a) for a, (_s, parent, root) in sorted(placed.items())],
            )
        if capped:
            cursor.executemany(
                sql.SQL("UPDATE {}.accounts SET cap = %s WHERE account = %s").format(table),
                [(cap, a) for a, (_s, cap) in sorted(capped.items())],
            )
        if counted:
            cursor.executemany(
                sql.SQL("UPDATE {}.accounts SET children = %s WHERE account = %s").format(table),
                [(n, a) for a, n in sorted(counted.items())],
            )
        if used:
            cursor.executemany(
                sql.SQL(
                    "UPDATE {}.accounts SET cap_window = %s, cap_credits = %s, "
                    "cap_messages = %s WHERE account = %s"
                ).format(table),
                [(*use, a) for a, (_s, use) in sorted(used.items())],
            )


# -- divergence (the syncer): a history in Redis that forked from the ledger ---------------------

# account, fork_id, fork_seq, base_credits, base_chat, base_plan, until_id, outcome, rebase_id
ForkRow = tuple[Any, ...]


def ledger_ids(
    conn: psycopg.Connection[Any], schema: str, positions: Sequence[tuple[str, int]]
) -> dict[tuple[str, int], str]:
    """The stream id of the ledger's entry at each of these (account, seq) it holds."""
    query = sql.SQL(
        "SELECT l.account, l.seq, l.stream_id FROM {}.ledger AS l "
        "JOIN unnest(%s::text[], %s::bigint[]) AS p(account, seq) USING (account, seq)"
    ).format(sql.Identifier(schema))
    rows = conn.execute(query, [[a for a, _ in positions], [s for _, s in positions]])
    return {(account, seq): stream_id for account, seq, stream_id in rows}


_FORK_COLUMNS = (
    "account, fork_id, fork_seq, base_credits, base_chat, base_plan, until_id, outcome, rebase_id"
)


def forks_of(conn: psycopg.Connection[Any], schema: str, accounts: Sequence[str]) -> list[ForkRow]:
    query = sql.SQL("SELECT {} FROM {}.rebases WHERE account = ANY(%s)").format(
        sql.SQL(_FORK_COLUMNS), sql.Identifier(schema)
    )
    return conn.execute(query, [list(accounts)]).fetchall()


def open_forks(conn: psycopg.Connection[Any], schema: str) -> list[ForkRow]:
    query = sql.SQL("SELECT {} FROM {}.rebases WHERE outcome IS NULL").format(
        sql.SQL(_FORK_COLUMNS), sql.Identifier(schema)
    )
    return conn.execute(query).fetchall()


def open_fork(
    conn: psycopg.Connection[Any], schema: str, first: JournalEntry, until_id: str
) -> None:
    """Records a fork from its first entry; the base plan is the ledger's just before it."""
    query = sql.SQL(
        "INSERT INTO {0}.rebases (account, fork_id, fork_seq, base_credits, base_chat, "
        "base_plan, until_id) SELECT %s, %s, %s, %s, %s, "
        "(SELECT plan FROM {0}.ledger WHERE account = %s AND seq = %s), %s "
        "ON CONFLICT DO NOTHING"
    ).format(sql.Identifier(schema))
    base = (first.credits_after - first.credit_delta, first.chat_after - first.chat_delta)
    conn.execute(
        query,
        [first.account, first.stream_id, first.seq, *base, first.account, first.seq - 1, until_id],
    )


def record_diverged(
    conn: psycopg.Connection[Any], schema: str, fork_id: str, entries: Sequence[JournalEntry]
) -> None:
    names = (*LEDGER_COLUMNS, "fork_id")
    query = sql.SQL(
        "INSERT INTO {}.diverged_entries ({}) VALUES ({}) ON CONFLICT DO NOTHING"
    ).format(
        sql.Identifier(schema),
        sql.SQL(", ").join(map(sql.Identifier, names)),
        sql.SQL(", ").join(map(sql.Placeholder, names)),
    )
    rows = [dict(zip(names, (*entry.ledger_row(), fork_id), strict=True)) for entry in entries]
    conn.cursor().executemany(query, rows)


def update_fork(
    conn: psycopg.Connection[Any],
    schema: str,
    account: str,
    fork_id: str,
    changes: Mapping[str, Any],
) -> None:
    """Sets columns of a fork's row; one that got an ``outcome`` is closed now."""
    where = sql.SQL("WHERE account = %(fork_account)s AND fork_id = %(fork_first_id)s")
    query = sql.SQL("UPDATE {}.rebases SET ({}) = ROW({}) {}").format(
        sql.Identifier(schema),
        sql.SQL(", ").join(map(sql.Identifier, changes)),
        sql.SQL(", ").join(map(sql.Placeholder, changes)),
        where,
    )
    params = {**changes, "fork_account": account, "fork_first_id": fork_id}
    conn.execute(query, params)
    closing = sql.SQL(
        "UPDATE {}.rebases SET closed_at = now() {} AND outcome IS NOT NULL AND closed_at IS NULL"
    ).format(sql.Identifier(schema), where)
    conn.execute(closing, params)


def fork_entries(
    conn: psycopg.Connection[Any], schema: str, account: str, fork_id: str
) -> list[tuple[Any, ...]]:
    """A fork's entries as kept: stream id, seq, op, both deltas, both balances after, key,
    and on a tree's path the account the call was for and the cap's window and use after;
    and the server time."""
    query = sql.SQL(
        "SELECT stream_id, seq, op, credit_delta, chat_delta, credits_after, chat_after, "
        "idempotency_key, via, cap_window, cap_credits, cap_messages, server_time "
        "FROM {}.diverged_entries WHERE account = %s AND fork_id = %s"
    ).format(sql.Identifier(schema))
    return conn.execute(query, [account, fork_id]).fetchall()


def diverged_calls(
    conn: psycopg.Connection[Any], schema: str, accounts: Sequence[str], times: Sequence[Any]
) -> list[tuple[Any, ...]]:
    """The entries of these accounts made at these server times, kept apart as a fork's or
    in the ledger: account, stream id, op, key, server time."""
    query = sql.SQL(
        "SELECT account, stream_id, op, idempotency_key, server_time FROM {0}.diverged_entries "
        "WHERE account = ANY(%s) AND server_time = ANY(%s) "
        "UNION ALL SELECT account, stream_id, op, idempotency_key, server_time FROM {0}.ledger "
        "WHERE account = ANY(%s) AND server_time = ANY(%s)"
    ).format(sql.Identifier(schema))
    span = [list(accounts), list(times)]
    return conn.execute(query, span + span).fetchall()


def applied_calls(
    conn: psycopg.Connection[Any], schema: str, calls: Sequence[tuple[str, str]]
) -> list[tuple[Any, ...]]:
    """The ledger's entries of these (account, idempotency key): account, key, op, stream id."""
    query = sql.SQL(
        "SELECT l.account, l.idempotency_key, l.op, l.stream_id FROM {}.ledger AS l "
        "JOIN unnest(%s::text[], %s::text[]) AS c(account, k) "
        "ON l.account = c.account AND l.idempotency_key = c.k"
    ).format(sql.Identifier(schema))
    return conn.execute(query, [[a for a, _ in calls], [k for _, k in calls]]).fetchall()


def cap_use_before(
    conn: psycopg.Connection[Any], schema: str, account: str, seq: int
) -> tuple[int, int, int] | None:
    """The cap's window and use as the ledger leaves them before entry ``seq``."""
    query = sql.SQL(
        "SELECT cap_window, cap_credits, cap_messages FROM {}.ledger "
        "WHERE account = %s AND seq < %s AND cap_window IS NOT NULL ORDER BY seq DESC LIMIT 1"
    ).format(sql.Identifier(schema))
    row = conn.execute(query, [account, seq]).fetchone()
    return None if row is None else (int(row[0]), int(row[1]), int(row[2]))


def history_since(
    conn: psycopg.Connection[Any], schema: str, account: str, seq: int, window_ms: int
) -> list[tuple[Any, ...]]:
    """The ledger from ``seq`` on: seq, op, both deltas, key, ms left in the key's window."""
    query = sql.SQL(
        "SELECT seq, op, credit_delta, chat_delta, idempotency_key, "
        "(extract(epoch FROM server_time - now()) * 1000)::bigint + %s "
        "FROM {}.ledger WHERE account = %s AND seq >= %s ORDER BY seq"
    ).format(sql.Identifier(schema))
    return conn.execute(query, [window_ms, account, seq]).fetchall()
