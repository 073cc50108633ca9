"""Every SQL statement redcredit runs, and the one translation of psycopg's failures.

Each statement sits in a small function taking a psycopg connection (and the
schema); callers own the connection and its transaction. The schema itself
is made by the plain-SQL files in ``migrations/``, which
:mod:`redcredit.backends.migrate` runs through the functions here.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import psycopg
from psycopg import sql

from ..core.journal import LEDGER_COLUMNS, JournalEntry
from ..core.loader import AccountSnapshot
from ..errors import BackendUnavailable

__all__ = [
    "RESTORED_KEYS_MAX",
    "AccountState",
    "ForkRow",
    "LedgerSums",
    "account_ids",
    "account_states",
    "applied_migrations",
    "apply_entries",
    "apply_migration",
    "create_database",
    "fence_for_apply",
    "fork_entries",
    "forks_of",
    "history_since",
    "ledger_ids",
    "ledger_of",
    "ledger_size",
    "ledger_sums",
    "lock_migrations",
    "open_fork",
    "open_forks",
    "ping",
    "postgres_errors_translated",
    "prepare_migrations",
    "read_snapshot",
    "read_snapshot_async",
    "recent_ledger_async",
    "record_diverged",
    "snapshot_from_row",
    "update_fork",
]

AccountState = tuple[int, int, str, int]  # credits, chat messages, plan, sequence
LedgerSums = tuple[int, int, int, int, int]  # credits, chat messages, entries, first, last seq


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
        raise BackendUnavailable(f"cannot {action} ({type(exc).__name__}: {exc}){outcome}") from exc


# -- the fence between syncers and loaders -------------------------------------------------------

# Per partition, as transaction-scoped advisory locks. A syncer holds it shared
# from before it writes a batch until its commit, and confirms in between that
# Redis still has the batch's entries; a loader takes it exclusively before
# reading an account. So when Redis lost its data and an account is loaded
# again, a syncer still holding entries of the lost data has either committed
# them before the read (and the account resumes after them) or finds them gone
# and rolls back; it never lands them after the read, on sequence numbers the
# reloaded account reuses.


def _fence_class(schema: str) -> int:
    # The advisory lock's first key: one lock space per schema.
    return int.from_bytes(zlib.crc32(schema.encode()).to_bytes(4, "big"), "big", signed=True)


def fence_for_apply(conn: psycopg.Connection[Any], schema: str, partitions: Sequence[int]) -> None:
    conn.execute(
        "SELECT count(pg_advisory_xact_lock_shared(%s, p)) "
        "FROM (SELECT DISTINCT unnest(%s::int[]) AS p ORDER BY 1) AS fenced",
        [_fence_class(schema), list(partitions)],
    )


# A statement of its own, run in the loader's transaction before the read: the
# read then takes its snapshot after the lock, and sees what a syncer committed
# meanwhile.
_FENCE_FOR_LOAD = "SELECT pg_advisory_xact_lock(%s, %s)"


# -- ledger writes (the syncer) ------------------------------------------------------------------

# Applying is idempotent: a ledger row is keyed by (account, seq) and inserted
# once; an account row only moves forward to a newer sequence number. So a batch
# applied twice, or batches applied out of order, give the same result.


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
    """A fork's entries as kept: stream id, seq, op, both deltas, both balances after, key."""
    query = sql.SQL(
        "SELECT stream_id, seq, op, credit_delta, chat_delta, credits_after, chat_after, "
        "idempotency_key FROM {}.diverged_entries WHERE account = %s AND fork_id = %s"
    ).format(sql.Identifier(schema))
    return conn.execute(query, [account, fork_id]).fetchall()


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


# -- reading an account back (the loaders) -------------------------------------------------------

# The most recent keys reloaded with an account; older ones are forgotten early.
RESTORED_KEYS_MAX = 1_000


@lru_cache(maxsize=16)
def _account_query(schema: str) -> sql.Composed:
    return sql.SQL(
        "SELECT credits, chat_messages, plan, last_seq FROM {}.accounts WHERE account = %s"
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
    conn.execute(_FENCE_FOR_LOAD, [_fence_class(schema), partition])
    row = conn.execute(_account_query(schema), [account]).fetchone()
    applied = []
    if row is not None:
        params = _applied_keys_params(account, window_ms)
        applied = conn.execute(_applied_keys_query(schema), params).fetchall()
    return snapshot_from_row(row, defaults, applied)


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
    await conn.execute(_FENCE_FOR_LOAD, [_fence_class(schema), partition])
    row = await (await conn.execute(_account_query(schema), [account])).fetchone()
    applied = []
    if row is not None:
        params = _applied_keys_params(account, window_ms)
        applied = await (await conn.execute(_applied_keys_query(schema), params)).fetchall()
    return snapshot_from_row(row, defaults, applied)


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
