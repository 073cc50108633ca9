"""Every SQL statement redcredit runs, and the one translation of psycopg's failures.

Each statement sits in a small function taking a psycopg connection (and the
schema); callers own the connection and its transaction. The schema itself
is made by the plain-SQL files in ``migrations/``, which
:mod:`redcredit.backends.migrate` runs through the functions here. The
statements are grouped by who runs them: the syncer (:mod:`.ledger`, :mod:`.buckets`),
the readers (:mod:`.reads`) and the migrations and embedded server
(:mod:`.admin`); this package exports them all.
"""

from __future__ import annotations

from .admin import (
    applied_migrations,
    apply_migration,
    create_database,
    limit_lock_waits,
    lock_migrations,
    ping,
    prepare_migrations,
)
from .buckets import bucket_remaining, bucket_rows, ledger_bucket_sums
from .common import fence_for_apply, postgres_errors_translated
from .ledger import (
    ForkRow,
    applied_calls,
    apply_entries,
    cap_use_before,
    diverged_calls,
    fork_entries,
    forks_of,
    history_since,
    ledger_ids,
    open_fork,
    open_forks,
    record_diverged,
    update_fork,
)
from .reads import (
    RESTORED_KEYS_MAX,
    AccountState,
    LedgerSums,
    account_ids,
    account_roots,
    account_states,
    account_trees,
    ledger_of,
    ledger_size,
    ledger_sums,
    read_snapshot,
    read_snapshot_async,
    recent_ledger_async,
    snapshot_from_row,
)

__all__ = [
    "RESTORED_KEYS_MAX",
    "AccountState",
    "ForkRow",
    "LedgerSums",
    "account_ids",
    "account_roots",
    "account_states",
    "account_trees",
    "applied_calls",
    "applied_migrations",
    "apply_entries",
    "apply_migration",
    "bucket_remaining",
    "bucket_rows",
    "cap_use_before",
    "create_database",
    "diverged_calls",
    "fence_for_apply",
    "fork_entries",
    "forks_of",
    "history_since",
    "ledger_bucket_sums",
    "ledger_ids",
    "ledger_of",
    "ledger_size",
    "ledger_sums",
    "limit_lock_waits",
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
