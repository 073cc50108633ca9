"""Bounded memory: drop idle accounts that PostgreSQL holds in full.

An account is evicted only when it has no holds (active or lapsed), every one
of its journal entries is in PostgreSQL (its sequence number and balances
are PostgreSQL's: a history that forked from PostgreSQL's is kept until it
is re-based), and Redis has not touched it for the
idle time; the check and the delete are one script (``lua/evict.lua``). The
next call loads the account back from PostgreSQL. On a Redis Cluster every
primary is scanned, and the scripts go as one round trip per node.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import psycopg

from ..backends.pipelines import RedisSource, routed, run_scripts
from ..backends.postgres import account_states, postgres_errors_translated
from ..backends.topology import Topology
from ..config import Settings
from ..core.keys import KeySpace
from ..core.scripts import load_scripts
from .reconcile import scan_account_hashes

__all__ = ["EvictionReport", "evict_idle"]

_REASONS = {0: "gone", 1: "evicted", 2: "holds", 3: "unsynced", 4: "recent"}


@dataclass(slots=True)
class EvictionReport:
    scanned: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)

    @property
    def evicted(self) -> int:
        return self.outcomes["evicted"]


def evict_idle(
    settings: Settings,
    redis_client: RedisSource,
    conn: psycopg.Connection[Any],
    *,
    idle: timedelta,
    batch: int = 500,
) -> EvictionReport:
    """``redis_client``: a client, a Topology, a URL, or None for ``settings.redis_url``."""
    with routed(settings, redis_client) as topology:
        return _evict_idle(settings, topology, conn, idle=idle, batch=batch)


def _evict_idle(
    settings: Settings,
    topology: Topology,
    conn: psycopg.Connection[Any],
    *,
    idle: timedelta,
    batch: int,
) -> EvictionReport:
    keys = KeySpace(settings.versioned_prefix, settings.partitions)
    script = load_scripts()["evict"]
    idle_ms = int(idle.total_seconds() * 1000)
    report = EvictionReport()
    pending: list[tuple[str, str]] = []

    def flush() -> None:
        with postgres_errors_translated("read from PostgreSQL which accounts it holds in full"):
            synced = account_states(conn, settings.pg_schema, [a for a, _ in pending])
        calls = []
        for account, key in pending:
            # Unknown to PostgreSQL: -1 keeps it (sequence numbers start at 1).
            credits, chat, _plan, last_seq = synced.get(account, (-1, -1, "", -1))
            args = [idle_ms, last_seq, credits, chat]
            calls.append(([key, keys.holds_of(key)], args))
        results = run_scripts(topology, script, calls)
        report.outcomes.update(_REASONS[int(r)] for r in results)
        report.scanned += len(pending)
        pending.clear()

    for found in scan_account_hashes(topology, keys):
        pending.append(found)
        if len(pending) >= batch:
            flush()
    if pending:
        flush()
    return report
