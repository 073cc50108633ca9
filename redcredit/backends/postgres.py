"""PostgreSQL side: applying journal batches, and reading accounts back.

Applying is idempotent: a ledger row is keyed by (account, seq) and inserted
once; an account row only moves forward to a newer sequence number. So a batch
applied twice, or batches applied out of order, give the same result.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from ..core.journal import LEDGER_COLUMNS, JournalEntry
from ..core.loader import AccountSnapshot

__all__ = [
    "RESTORED_KEYS_MAX",
    "applied_keys_query",
    "apply_entries",
    "fence_for_apply",
    "fence_for_load",
    "fence_key",
    "load_account_query",
    "snapshot_from_row",
]


# The fence between syncers and loaders, per partition, as transaction-scoped
# advisory locks. A syncer holds it shared from before it writes a batch until
# its commit, and confirms in between that Redis still has the batch's entries;
# a loader takes it exclusively before reading an account. So when Redis lost
# its data and an account is loaded again, a syncer still holding entries of
# the lost data has either committed them before the read (and the account
# resumes after them) or finds them gone and rolls back; it never lands them
# after the read, on sequence numbers the reloaded account reuses.


def _fence_class(schema: str) -> int:
    # The advisory lock's first key: one lock space per schema.
    return int.from_bytes(zlib.crc32(schema.encode()).to_bytes(4, "big"), "big", signed=True)


def fence_for_apply(conn: psycopg.Connection[Any], schema: str, partitions: Sequence[int]) -> None:
    conn.execute(
        "SELECT count(pg_advisory_xact_lock_shared(%s, p)) "
        "FROM (SELECT DISTINCT unnest(%s::int[]) AS p ORDER BY 1) AS fenced",
        [_fence_class(schema), list(partitions)],
    )


def fence_for_load() -> str:
    """The statement a loader runs, in its transaction, before reading an account.

    Its parameters are :func:`fence_key`. It must be a statement of its own: the
    read that follows then takes its snapshot after the lock, and sees what a
    syncer committed meanwhile.
    """
    return "SELECT pg_advisory_xact_lock(%s, %s)"


def fence_key(schema: str, partition: int) -> list[int]:
    return [_fence_class(schema), partition]


def apply_entries(
    conn: psycopg.Connection[Any], schema: str, entries: Sequence[JournalEntry]
) -> set[tuple[str, int]]:
    """Writes a batch in the caller's transaction: ledger rows, then account balances.

    An account's entries land in order only: one whose predecessor is not in
    PostgreSQL yet (another syncer holds it, or one that died) waits. Returns
    the positions (account, sequence number) of the entries that wait, to be
    offered again later.
    Otherwise a Redis that lost its data could leave a hole in the ledger: the
    predecessor lost with it, and the account reloaded past it.
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
    return {(account, seq) for account, seq in waiting}


def load_account_query(schema: str) -> sql.Composed:
    return sql.SQL(
        "SELECT credits, chat_messages, plan, last_seq FROM {}.accounts WHERE account = %s"
    ).format(sql.Identifier(schema))


# The most recent keys reloaded with an account; older ones are forgotten early.
RESTORED_KEYS_MAX = 1_000


def applied_keys_query(schema: str) -> sql.Composed:
    """Idempotency keys of an account's calls still within the window, newest first.

    Parameters: window (ms), account, window (ms), limit. Entries a call wrote
    on its way (lapses, refills, the opening) carry its key but are not its effect.
    """
    return sql.SQL(
        "SELECT idempotency_key, max(seq), "
        "(extract(epoch FROM max(server_time) - now()) * 1000)::bigint + %s "
        "FROM {}.ledger WHERE account = %s AND idempotency_key IS NOT NULL "
        "AND op NOT IN ('lapse', 'refill', 'open') "
        "AND server_time > now() - %s * interval '1 millisecond' "
        "GROUP BY idempotency_key ORDER BY 2 DESC LIMIT %s"
    ).format(sql.Identifier(schema))


def snapshot_from_row(
    row: tuple[Any, ...] | None,
    defaults: AccountSnapshot,
    applied: Sequence[tuple[Any, ...]] = (),
) -> AccountSnapshot:
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
        applied_keys=tuple((key, seq, left) for key, seq, left in applied if left > 0),
    )
