"""The invariants of the design, checked on every account after a run has drained.

Each check returns the violations it found, as sentences; none means it holds.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import redis

from redcredit import Settings
from redcredit.core.keys import KeySpace
from redcredit.ledger.reconcile import reconcile
from tests.properties.sim.workload import Call
from tests.properties.sim.world import HOLD_TTL_S, SCHEMA, Hold, Loss

BYPASS_PLANS = {"paid", "demo"}
SIDE_ENTRIES = {"lapse", "refill", "open", "expire", "effective"}
LEDGER_COLUMNS = (
    "account, seq, op, credit_delta, chat_delta, credits_after, chat_after, plan, "
    "idempotency_key, reservation_id, hold_amount, "
    "(extract(epoch from server_time) * 1000)::bigint, via"
)


@dataclass
class Row:
    account: str
    seq: int
    op: str
    dc: int
    dm: int
    c: int
    m: int
    plan: str
    key: str | None
    rid: str | None
    held: int | None
    ms: int
    via: str | None  # on a tree: an ancestor's entry made for this account's call


@dataclass
class Findings:
    violations: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def add(self, check: str, problems: list[str]) -> None:
        self.figures[f"checked: {check}"] = "ok" if not problems else f"{len(problems)} violations"
        self.violations += [f"{check}: {p}" for p in problems[:20]]


def read_ledger(conn: psycopg.Connection[Any]) -> dict[str, list[Row]]:
    rows = conn.execute(
        f'SELECT {LEDGER_COLUMNS} FROM "{SCHEMA}".ledger ORDER BY account, seq'
    ).fetchall()
    ledger: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        ledger[row[0]].append(Row(*row))
    return ledger


def sequences_without_gaps(ledger: dict[str, list[Row]]) -> list[str]:
    return [
        f"{account} has sequence numbers {[r.seq for r in rows][:10]}..."
        for account, rows in ledger.items()
        if [r.seq for r in rows] != list(range(1, len(rows) + 1))
    ]


def conserved(ledger: dict[str, list[Row]], conn: psycopg.Connection[Any]) -> list[str]:
    """Each entry moves the balance by its delta from the one before; the row holds the sum."""
    problems = []
    for account, rows in ledger.items():
        credits = chat = 0
        for row in rows:
            credits, chat = credits + row.dc, chat + row.dm
            if (credits, chat) != (row.c, row.m):
                problems.append(f"{account}#{row.seq}: sums {credits},{chat} != {row.c},{row.m}")
                break
    balances = dict(
        (a, (c, m, s))
        for a, c, m, s in conn.execute(
            f'SELECT account, credits, chat_messages, last_seq FROM "{SCHEMA}".accounts'
        ).fetchall()
    )
    for account, rows in ledger.items():
        last = rows[-1]
        if balances.get(account) != (last.c, last.m, last.seq):
            problems.append(f"{account}: row {balances.get(account)} != ledger end {last}")
    return problems


def same_in_redis(
    ledger: dict[str, list[Row]], client: redis.Redis | redis.RedisCluster, settings: Settings
) -> list[str]:
    space = KeySpace(settings.versioned_prefix, settings.partitions)
    problems = [
        f"{stream} still holds {client.xlen(stream)} entries"
        for stream in space.journals()
        if client.xlen(stream)
    ]
    for account, rows in ledger.items():
        c, m, s, p = client.hmget(space.for_account(account).hash, "c", "m", "s", "p")
        if c is None:
            continue  # evicted or never reloaded after a loss: PostgreSQL has it
        last = rows[-1]
        if (int(c), int(m), int(s), p.decode()) != (last.c, last.m, last.seq, last.plan):
            problems.append(f"{account}: Redis {c, m, s, p} != PostgreSQL {last}")
    return problems


def never_oversold(ledger: dict[str, list[Row]], loss_times: list[int]) -> list[str]:
    """Replays every account's holds: after each entry, credits cover the active holds.

    A hold is active from its reserve entry to its settle, release or lapse;
    a total loss of Redis ends every hold made before it.
    """
    problems = []
    for account, rows in ledger.items():
        holds: dict[str, int] = {}
        previous_ms = 0
        for row in rows:
            if any(previous_ms <= lost < row.ms for lost in loss_times):
                holds.clear()
            previous_ms = row.ms
            if row.op == "reserve" and row.plan not in BYPASS_PLANS and row.rid:
                holds[row.rid] = row.held or 0
            elif row.op in ("settle", "release", "lapse") and row.rid:
                holds.pop(row.rid, None)
            if row.c - sum(holds.values()) < 0:
                problems.append(f"{account}#{row.seq}: credits {row.c} < held {holds}")
                break
    return problems


def keyed_entries(ledger: dict[str, list[Row]]) -> dict[str, list[Row]]:
    by_key: dict[str, list[Row]] = defaultdict(list)
    for rows in ledger.values():
        for row in rows:
            # A call also journals what it found due on the way (lapsed holds,
            # a refill, the opening balances, expiries), under its key: those
            # are not its effect; nor are the entries of the levels above the
            # account of a call on a path (trees.paths_whole checks those).
            if row.key is not None and row.op not in SIDE_ENTRIES and row.via is None:
                by_key[row.key].append(row)
    return by_key


def applied_twice(ledger: dict[str, list[Row]]) -> list[str]:
    by_key = keyed_entries(ledger)
    return [f"key {k} applied {len(v)} times" for k, v in by_key.items() if len(v) > 1]


def exactly_once(
    calls: list[Call],
    ledger: dict[str, list[Row]],
    losses: list[Loss],
    partition_of: Callable[[str], int],
) -> tuple[list[str], list[tuple[int, float, str]]]:
    """Every key's effect is in the ledger once, or was lost in the unsynced window of a loss.

    Returns the violations, and for each acknowledged call lost that way the
    loss that took it (its index), how long before it the call was answered (s),
    and the call's kind and home account.
    """
    by_key = keyed_entries(ledger)
    problems = applied_twice(ledger)
    lost: list[tuple[int, float, str]] = []
    for call in calls:
        if call.key is None:
            continue
        found = by_key.get(call.key, [])
        if call.outcome == "refused" and not call.ambiguous and found:
            problems.append(f"refused {call.kind} {call.key} left an entry")
        if call.outcome != "ok" or found or call.sequence is None:
            continue
        # Not in PostgreSQL: only allowed if a later loss of Redis took it
        # before any syncer had committed it.
        partition = partition_of(call.home)
        taken_by = [
            index
            for index, loss in enumerate(losses)
            if index >= call.epoch_before
            and loss.takes(partition)
            and call.sequence > loss.synced.get(call.account, 0)
        ]
        if taken_by:
            age = losses[taken_by[0]].monotonic - call.answered_at
            # Which losses could have taken it: a graceful failover named
            # beside a later one says the call stayed unsynced through both.
            could = "+".join(losses[i].kind for i in taken_by)
            lost.append((taken_by[0], age, f"{call.kind} on {call.home} ({could})"))
        else:
            problems.append(f"acknowledged {call.kind} {call.key} (seq {call.sequence}) is missing")
    return problems, lost


def holds_lapsed(
    holds: list[Hold],
    ledger: dict[str, list[Row]],
    losses: list[Loss],
    partition_of: Callable[[str], int],
) -> list[str]:
    """Holds of killed clients ended by themselves, at their deadline and not before."""
    problems = []
    entries = {(r.account, r.rid, r.op): r for rows in ledger.values() for r in rows if r.rid}
    for hold in holds:
        lapse = entries.get((hold.account, hold.id, "lapse"))
        if lapse is None:
            made_ms = hold.deadline_ms - HOLD_TTL_S * 1000
            partition = partition_of(hold.account)
            if not any(  # a loss took it with it
                loss.server_ms >= made_ms and loss.takes(partition) for loss in losses
            ):
                problems.append(f"hold {hold.id} on {hold.account} never lapsed")
        elif lapse.ms < hold.deadline_ms:
            problems.append(f"hold {hold.id} lapsed at {lapse.ms}, before {hold.deadline_ms}")
        if (hold.account, hold.id, "settle") in entries:
            problems.append(f"hold {hold.id} of a dead client was settled")
    return problems


def never_forked(conn: psycopg.Connection[Any]) -> list[str]:
    """PostgreSQL never held an entry that Redis lost, so no history forked and was re-based."""
    problems = []
    for table in ("diverged_entries", "rebases"):
        for account, n in conn.execute(
            f'SELECT account, count(*) FROM "{SCHEMA}".{table} GROUP BY account ORDER BY account'
        ).fetchall():
            problems.append(f"{account} has {n} rows in {table}")
    return problems


def no_drift(
    settings: Settings, client: redis.Redis | redis.RedisCluster, conn: psycopg.Connection[Any]
) -> list[str]:
    report = reconcile(settings, client, conn)
    return [f"{d.account}: {d.problem}" for d in report.drift] + [
        f"{a}: still moving" for a in report.in_flight
    ]


def tally(calls: list[Call]) -> dict[str, Any]:
    outcomes = Counter(c.outcome for c in calls)
    return {
        "calls": len(calls),
        "calls ok": outcomes["ok"],
        "calls refused (an answer)": outcomes["refused"],
        "calls given up (outcome unknown)": outcomes["unknown"],
        "given up, by kind": dict(Counter(c.kind for c in calls if c.outcome == "unknown")),
        "calls that hit a fault and were retried": sum(c.ambiguous for c in calls),
        "retries answered from the idempotency record": sum(
            c.replayed and c.ambiguous for c in calls
        ),
        "attempts": sum(c.attempts for c in calls),
        "refusals, by kind": dict(Counter(c.refusal for c in calls if c.refusal)),
        "on the tree, by kind": dict(
            Counter(f"{c.kind}:{c.outcome}" for c in calls if c.kind.startswith("tree-"))
        ),
        "bucket grants ok": sum(
            c.kind in ("bucket-grant", "tree-grant") and c.outcome == "ok" for c in calls
        ),
    }
