"""The tree of a simulation run, and the checks of its levels and of every account's buckets.

One small tree per run: ``org`` granted a pool, two teams under it, a few
users under each, one user capped with a fixed-length window. The load spends
and reserves on its paths while faults hit the servers; afterwards the ledger
must explain every level's balance, and no window of the cap may have charged
past it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg

from redcredit import Balance, Cap, Scope
from tests.properties.sim.world import SCHEMA

ROOT = "org"
TEAMS = {"team-a": ("ua-0", "ua-1", "ua-2"), "team-b": ("ub-0", "ub-1")}
POOL = 30_000
CAP_WINDOW_MS = 2_000
CAPPED = Scope(ROOT, "team-a", "ua-0")
CAP = Cap(credits=60, period=timedelta(milliseconds=CAP_WINDOW_MS))
# The ops whose credit delta is a charge: what a call costs the level that pays.
CHARGES = {"spend", "turn", "chat", "settle"}
# And those that bring credits in or take them away without a call's cost.
INCOME = {"open", "attach", "grant", "effective", "correct", "refill"}
TAKEN = {"void", "expire"}
NEUTRAL = {
    "plan",
    "cap",
    "reserve",
    "extend",
    "release",
    "lapse",
    "limit_reset",
    "child",
    "move_out",
    "move_in",
}


def members() -> list[Scope]:
    """Every level below the root, parents first."""
    scopes = []
    for team, users in TEAMS.items():
        scopes.append(Scope(ROOT, team))
        scopes += [Scope(ROOT, team, user) for user in users]
    return scopes


def paths() -> list[Scope]:
    """The paths calls are made on: a user's, or a team's own."""
    return members()


def every_level() -> list[Scope]:
    return [Scope(ROOT), *members()]


@dataclass
class TreeRow:
    account: str
    seq: int
    op: str
    dc: int
    key: str | None
    via: str | None
    ms: int
    cap_window: int | None
    cap_credits: int | None


def read_tree_rows(conn: psycopg.Connection[Any]) -> dict[str, list[TreeRow]]:
    names = [scope.account for scope in every_level()]
    rows = conn.execute(
        "SELECT account, seq, op, credit_delta, idempotency_key, via, "
        "(extract(epoch from server_time) * 1000)::bigint, cap_window, cap_credits "
        f'FROM "{SCHEMA}".ledger WHERE account = ANY(%s) ORDER BY account, seq',
        (names,),
    ).fetchall()
    ledger: dict[str, list[TreeRow]] = defaultdict(list)
    for row in rows:
        ledger[row[0]].append(TreeRow(*row))
    return ledger


def levels_in_bounds(balances: dict[str, Balance | None]) -> list[str]:
    """At the end no level is below zero, nor holds more than it has."""
    problems = []
    for account, balance in balances.items():
        if balance is None:
            problems.append(f"{account}: no balance could be read after the run")
        elif balance.credits < 0 or balance.available < 0 or balance.chat_messages < 0:
            problems.append(f"{account}: {balance.credits} credits, {balance.available} available")
    return problems


def cap_kept(ledger: dict[str, list[TreeRow]]) -> list[str]:
    """Per window, what the ledger charged through the capped user stays within its cap.

    The user is a leaf, so every call through it is a call for it: its own
    entries and every ancestor's entry made for it (``via``).
    """
    user, most = CAPPED.account, CAP.credits or 0
    charged: dict[int, int] = defaultdict(int)
    recorded: dict[int, int] = {}
    for rows in ledger.values():
        for row in rows:
            if row.op in CHARGES and (row.account == user or row.via == user):
                charged[row.ms // CAP_WINDOW_MS] -= row.dc
            if row.account == user and row.cap_window is not None:
                window = row.cap_window // CAP_WINDOW_MS
                recorded[window] = max(recorded.get(window, 0), row.cap_credits or 0)
    problems = [
        f"window {w * CAP_WINDOW_MS}: the ledger charged {n} through {user}, cap {most}"
        for w, n in sorted(charged.items())
        if n > most
    ]
    problems += [
        f"window {w * CAP_WINDOW_MS}: {user}'s cap use reached {n}, cap {most}"
        for w, n in sorted(recorded.items())
        if n > most
    ]
    return problems


def root_explained(ledger: dict[str, list[TreeRow]], root: Balance | None) -> list[str]:
    """The root's credits are what it was granted less what the ledger charged at it."""
    rows = ledger.get(ROOT, [])
    unknown = sorted({r.op for r in rows} - CHARGES - INCOME - TAKEN - NEUTRAL)
    if unknown:
        return [f"{ROOT} has entries the check does not know: {unknown}"]
    granted = sum(r.dc for r in rows if r.op in INCOME)
    taken = -sum(r.dc for r in rows if r.op in TAKEN)
    charged = -sum(r.dc for r in rows if r.op in CHARGES)
    problems = [
        f"{ROOT} moved by {r.op} #{r.seq} ({r.dc})" for r in rows if r.op in NEUTRAL and r.dc
    ]
    if root is None:
        return [*problems, f"{ROOT}: no balance could be read after the run"]
    if root.credits != granted - taken - charged:
        problems.append(
            f"{ROOT}: {root.credits} credits != granted {granted} - voided or expired {taken}"
            f" - charged {charged}"
        )
    if charged <= 0:
        problems.append(f"{ROOT} was never charged: the paths did not reach it")
    return problems


def paths_whole(ledger: dict[str, list[TreeRow]]) -> list[str]:
    """An ancestor's entry made for a call has the call's own entry beside it, same key and op."""
    own = {(r.account, r.key, r.op) for rows in ledger.values() for r in rows if r.via is None}
    return [
        f"{r.account}#{r.seq} {r.op} for {r.via} (key {r.key}) has no entry on {r.via}"
        for rows in ledger.values()
        for r in rows
        if r.via is not None and r.key is not None and (r.via, r.key, r.op) not in own
    ]


def buckets_add_up(conn: psycopg.Connection[Any]) -> list[str]:
    """Per bucket, the ledger's deltas sum to its remaining credits, and its newest change says so."""
    changes = conn.execute(
        "SELECT l.account, e.change->>'bucket', sum((e.change->>'delta')::bigint)::bigint, "
        "(array_agg((e.change->>'after')::bigint ORDER BY l.seq DESC, e.ord DESC))[1] "
        f'FROM "{SCHEMA}".ledger l, jsonb_array_elements(l.bucket_changes) '
        "WITH ORDINALITY AS e(change, ord) "
        "WHERE l.bucket_changes IS NOT NULL AND e.change->>'bucket' <> 'base' GROUP BY 1, 2"
    ).fetchall()
    table = {
        (a, b): (remaining, status)
        for a, b, remaining, status in conn.execute(
            f'SELECT account, bucket, remaining, status FROM "{SCHEMA}".buckets'
        ).fetchall()
    }
    problems = []
    for account, bucket, total, after in changes:
        remaining, status = table.pop((account, bucket), (None, None))
        if remaining is None:
            problems.append(f"{account}/{bucket}: in the ledger, not in buckets")
        elif total != remaining or after != remaining:
            problems.append(
                f"{account}/{bucket} ({status}): deltas sum to {total}, newest after {after},"
                f" remaining {remaining}"
            )
    problems += [
        f"{a}/{b}: {remaining} remaining ({status}) with no change in the ledger"
        for (a, b), (remaining, status) in table.items()
        if remaining
    ]
    return problems
