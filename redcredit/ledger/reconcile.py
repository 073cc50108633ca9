"""Compare Redis with PostgreSQL plus the journal not yet applied, and report any drift.

For every account, the balances Redis holds must equal those of the newest
journal entry not yet in PostgreSQL, or else PostgreSQL's own, and its
credit buckets those of PostgreSQL with the journal not yet applied folded
in, and so must a tree's member's place in its tree, its cap and the cap's
use in its current window (:mod:`.tree_check`); the ledger of every account
must sum to its balance with no gap in its sequence numbers, and each
bucket's changes in it to the bucket's remaining credits.
Accounts that change while being compared are checked again. Accounts whose
history in Redis forked from PostgreSQL's are named: once re-based they must
agree like any other (the fork's own entries, kept apart, are not compared),
and one whose re-base is still pending is drift. On a Redis
Cluster, every primary is scanned for accounts, and each read goes as one
pipeline per node.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import redis
from redis.client import Pipeline

from ..backends.pipelines import Command, RedisSource, primaries, routed, run_commands
from ..backends.postgres import (
    AccountState,
    LedgerSums,
    account_ids,
    account_states,
    account_trees,
    bucket_remaining,
    bucket_rows,
    forks_of,
    ledger_bucket_sums,
    ledger_sums,
    postgres_errors_translated,
)
from ..backends.redis import redis_errors_translated
from ..backends.topology import Topology
from ..config import Settings
from ..core.bucket_ledger import BucketRow, fold_entry, open_snapshots, unpack_buckets
from ..core.journal import JournalEntry, parse_entry, text
from ..core.keys import KeySpace
from ..core.loader import BucketSnapshot
from .divergence import Fork
from .tree_check import REDIS_TREE_FIELDS, TreePlace, expected_place, tree_problems

__all__ = ["Drift", "ReconcileReport", "reconcile", "scan_account_hashes", "scan_accounts"]


@dataclass(frozen=True, slots=True)
class Drift:
    account: str
    problem: str


@dataclass(slots=True)
class ReconcileReport:
    accounts: int = 0
    journal_entries: int = 0
    drift: list[Drift] = field(default_factory=list)
    # Still changing after every re-check (traffic kept them moving): not drift.
    in_flight: list[str] = field(default_factory=list)
    # Forked from PostgreSQL's history, and re-based (or reloaded) since.
    rebased: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.drift


def reconcile(
    settings: Settings,
    redis_client: RedisSource,
    conn: psycopg.Connection[Any],
    *,
    sample: int | None = None,
    rechecks: int = 3,
) -> ReconcileReport:
    """``redis_client``: a client, a Topology, a URL, or None for ``settings.redis_url``."""
    with routed(settings, redis_client) as topology:
        return _reconcile(settings, topology, conn, sample=sample, rechecks=rechecks)


def _reconcile(
    settings: Settings,
    topology: Topology,
    conn: psycopg.Connection[Any],
    *,
    sample: int | None,
    rechecks: int,
) -> ReconcileReport:
    keys = KeySpace(settings.versioned_prefix, settings.partitions)
    report = ReconcileReport()
    with postgres_errors_translated("compare Redis with PostgreSQL"):
        homes: dict[str, set[str]] = {}
        for account, key in scan_account_hashes(topology, keys):
            homes.setdefault(account, set()).add(key)
        accounts = account_ids(conn, settings.pg_schema) | set(homes)
        if sample is not None and sample < len(accounts):
            accounts = set(random.sample(sorted(accounts), sample))
        report.accounts = len(accounts)
        todo = accounts
        for attempt in range(rechecks + 1):
            final = attempt == rechecks
            moving = _check(settings, topology, conn, keys, homes, todo, report, final=final)
            if not moving:
                break
            todo = moving
            time.sleep(0.1)
        else:
            report.in_flight = sorted(todo)
    return report


def _check(
    settings: Settings,
    topology: Topology,
    conn: psycopg.Connection[Any],
    keys: KeySpace,
    homes: dict[str, set[str]],
    accounts: set[str],
    report: ReconcileReport,
    *,
    final: bool,
) -> set[str]:
    """Checks the accounts; returns those that changed during the check."""
    ordered = sorted(accounts)
    # PostgreSQL first, then the journal, then Redis: each later read can only
    # be newer, so an account that moved shows as Redis ahead, never behind.
    pg = account_states(conn, settings.pg_schema, ordered)
    ledger = ledger_sums(conn, settings.pg_schema, ordered)
    pg_buckets = bucket_rows(conn, settings.pg_schema, ordered)
    remaining = bucket_remaining(conn, settings.pg_schema, ordered)
    bucket_sums = ledger_bucket_sums(conn, settings.pg_schema, ordered)
    trees = account_trees(conn, settings.pg_schema, ordered)
    forks: dict[str, list[Fork]] = {}
    for row in forks_of(conn, settings.pg_schema, ordered):
        forks.setdefault(row[0], []).append(Fork.from_row(row))
    closed = {account for account, found in forks.items() if any(not f.is_open for f in found)}
    report.rebased = sorted(set(report.rebased) | closed)
    journal = _journal(topology, keys, accounts)
    report.journal_entries = sum(len(v) for v in journal.values())
    live, packed, places, half_done, now_ms = _redis_states(topology, keys, ordered, homes)
    moving: set[str] = set()
    for account in ordered:
        pg_state = pg.get(account)
        known = forks.get(account, [])
        unapplied = [
            e
            for e in journal.get(account, [])
            if (pg_state is None or e.seq > pg_state[3]) and not any(f.covers(e) for f in known)
        ]
        newest = max(unapplied, key=lambda e: e.seq, default=None)
        expected = (
            (newest.credits_after, newest.chat_after, newest.plan, newest.seq)
            if newest is not None
            else pg_state
        )
        redis_state = live.get(account)
        problems: list[str] = []
        if account in half_done:
            move_id, destination = half_done[account]
            where = "/".join(destination.split("\n")) or "a root of its own"
            problems.append(
                f"a move to {where} is half-done: its snapshot waits in its tombstone; "
                f"finish it with `redcredit move {account} --key {move_id}` and the same "
                "destination"
            )
        pending = [f for f in known if f.is_open]
        if pending:
            problems.append(
                f"its history in Redis forked from PostgreSQL's at entry {pending[0].fork_seq}; "
                f"the re-base is pending"
            )
        elif redis_state is not None:
            if expected is None:
                problems.append("in Redis but neither in PostgreSQL nor in the journal")
            elif redis_state[3] > expected[3]:
                moving.add(account)
                continue
            elif redis_state[3] < expected[3]:
                problems.append(
                    f"Redis is at entry {redis_state[3]}, the journal and PostgreSQL at "
                    f"{expected[3]}"
                )
            elif redis_state != expected:
                problems.append(f"Redis holds {redis_state}, expected {expected}")
            else:
                folded = _folded(pg_buckets.get(account, {}), unapplied)
                problems += _bucket_problems(unpack_buckets(packed.get(account)), folded)
                place = expected_place(TreePlace.from_row(trees.get(account)), unapplied)
                problems += tree_problems(places[account], place, now_ms)
        elif unapplied:
            problems.append(f"{len(unapplied)} journal entries for an account Redis does not have")
        if pg_state is not None and account in ledger:
            problems += _ledger_problems(pg_state, ledger[account])
            if ledger[account][3] == 1:  # the whole history: every bucket's changes
                problems += _bucket_sum_problems(account, remaining, bucket_sums)
        if problems and not final and _may_be_in_flight(problems):
            moving.add(account)
            continue
        report.drift += [Drift(account, problem) for problem in problems]
    return moving


def _may_be_in_flight(problems: list[str]) -> bool:
    # A syncer committing between our reads makes the ledger briefly disagree;
    # a fork is re-based by the syncer right after it finds it.
    # A move in progress leaves its tombstone for the moment between its steps.
    return any("ledger" in p or "re-base is pending" in p or "half-done" in p for p in problems)


def _ledger_problems(pg_state: AccountState, sums: LedgerSums) -> list[str]:
    credit_sum, chat_sum, count, first, last = sums
    problems = []
    if count != last - first + 1:
        problems.append(f"ledger has {count} entries for sequence numbers {first}..{last}")
    if last != pg_state[3]:
        problems.append(f"ledger ends at entry {last}, the account row at {pg_state[3]}")
    if first == 1 and (credit_sum, chat_sum) != pg_state[:2]:
        problems.append(
            f"ledger sums to {credit_sum} credits and {chat_sum} chat messages, "
            f"the account row holds {pg_state[0]} and {pg_state[1]}"
        )
    return problems


def _folded(rows: dict[str, BucketRow], unapplied: list[JournalEntry]) -> dict[str, BucketSnapshot]:
    """PostgreSQL's buckets with the journal not yet applied folded in, as Redis must hold them."""
    rows = copy.deepcopy(rows)
    for entry in sorted(unapplied, key=lambda e: e.seq):
        fold_entry(rows, entry)
    return open_snapshots(rows)


def _describe(b: BucketSnapshot) -> str:
    expires = "never expires" if b.expires_ms == 0 else f"expires at {b.expires_ms}"
    return (
        f"{'pending' if b.pending else 'live'}, {b.remaining} left of {b.granted}, "
        f"category {b.category}, priority {b.priority}, effective at {b.effective_ms}, "
        f"{expires}, made at {b.created_ms}"
    )


def _bucket_problems(
    in_redis: dict[str, BucketSnapshot], expected: dict[str, BucketSnapshot]
) -> list[str]:
    problems = []
    for bucket in sorted(in_redis.keys() | expected.keys()):
        theirs, ours = in_redis.get(bucket), expected.get(bucket)
        if ours is None and theirs is not None:
            problems.append(
                f"bucket {bucket!r} is in Redis ({_describe(theirs)}) but neither open in "
                "PostgreSQL nor in the journal"
            )
        elif theirs is None and ours is not None:
            problems.append(
                f"bucket {bucket!r} is open in PostgreSQL and the journal ({_describe(ours)}) "
                "but not in Redis"
            )
        elif theirs != ours and theirs is not None and ours is not None:
            differ = [
                f"{f.name} {getattr(theirs, f.name)} in Redis, {getattr(ours, f.name)} in "
                "PostgreSQL and the journal"
                for f in dataclasses.fields(BucketSnapshot)
                if getattr(theirs, f.name) != getattr(ours, f.name)
            ]
            problems.append(f"bucket {bucket!r} differs: {'; '.join(differ)}")
    return problems


def _bucket_sum_problems(
    account: str, remaining: dict[tuple[str, str], int], sums: dict[tuple[str, str], int]
) -> list[str]:
    buckets = {b for a, b in remaining.keys() | sums.keys() if a == account}
    return [
        f"ledger's changes of bucket {bucket!r} sum to {sums.get((account, bucket), 0)}, "
        f"its buckets row holds {remaining.get((account, bucket), 0)} remaining"
        for bucket in sorted(buckets)
        if sums.get((account, bucket), 0) != remaining.get((account, bucket), 0)
    ]


def scan_accounts(source: Topology | redis.Redis, keys: KeySpace) -> Iterator[str]:
    """Every account Redis holds, by its hash (SCAN, so each may come more than once).

    A Topology is scanned on every primary (a cluster node holds only its
    own slots); a plain client, on its one server. The SCAN pattern also
    matches the other keys of an account whose id holds ``}:a:`` (the holds
    of ``}:a:victim`` read as ``victim``'s hash): only a name that is the
    hash of the id read from it counts.
    """
    for account, _key in scan_account_hashes(source, keys):
        yield account


def scan_account_hashes(
    source: Topology | redis.Redis, keys: KeySpace
) -> Iterator[tuple[str, str]]:
    """Every account hash Redis holds, with its account (see :func:`scan_accounts`).

    A tree's member has its hash in its root's partition and a stub (no
    balances) in its own: both come.
    """
    if isinstance(source, Topology):
        nodes = [source.client(node) for node in primaries(source)]
    else:
        nodes = [source]
    for client in nodes:
        with redis_errors_translated():
            for key in client.scan_iter(match=keys.account_pattern(), count=1000):
                account = keys.account_from_key(key)
                if keys.is_account_hash(key, account):
                    yield account, text(key)


def _journal(
    topology: Topology, keys: KeySpace, accounts: Iterable[str]
) -> dict[str, list[JournalEntry]]:
    wanted = set(accounts)
    found: dict[str, list[JournalEntry]] = {}
    streams = keys.journals()
    ranges = [Command.of(stream, Pipeline.xrange, stream) for stream in streams]
    for stream, messages in zip(streams, run_commands(topology, ranges).checked(), strict=True):
        for stream_id, fields in messages or []:
            entry = parse_entry(stream, stream_id, fields)
            if entry.account in wanted:
                found.setdefault(entry.account, []).append(entry)
    return found


def _redis_states(
    topology: Topology, keys: KeySpace, accounts: list[str], homes: dict[str, set[str]]
) -> tuple[
    dict[str, AccountState], dict[str, bytes], dict[str, TreePlace], dict[str, tuple[str, str]], int
]:
    """Each account's balances, plan and sequence number, its packed buckets (field B)
    and its place in its tree; the moves left half-done (the tombstone's move id and
    destination); and the server's time, in ms, that judges caps' windows."""
    fields = ("c", "m", "p", "s", "B", "M", "F", "D", *REDIS_TREE_FIELDS)
    # Read before the accounts: a window that turns meanwhile can only have
    # turned for both sides alike.
    clock = keys.journals()[0]
    reads, read_for = [Command.of(clock, Pipeline.time)], [""]
    for account in accounts:
        # A tree's member: its hash in its root's partition, a stub in its own.
        for key in sorted(homes.get(account) or {keys.for_account(account).hash}):
            reads.append(Command.of(key, Pipeline.hmget, key, list(fields)))
            read_for.append(account)
    replies = run_commands(topology, reads).checked()
    seconds, micros = replies[0]
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    states, packed, places, half_done = {}, {}, {}, {}
    for account, values in zip(read_for[1:], replies[1:], strict=True):
        if values[0] is not None:
            plan = values[2].decode() if isinstance(values[2], bytes) else values[2]
            states[account] = (int(values[0]), int(values[1]), plan, int(values[3]))
            if values[4] is not None:
                packed[account] = values[4]
            places[account] = TreePlace.from_redis(values[8:])
        elif values[5] is not None and values[6] is None:
            half_done[account] = (text(values[5]), text(values[7] or b""))
    return states, packed, places, half_done, now_ms
