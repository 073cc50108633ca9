"""A history in Redis that forked from PostgreSQL's: kept apart, never merged, then re-based.

Every ledger row is keyed by (account, seq) and keeps its entry's stream id,
so a re-delivered entry finds the row it made. An incoming entry whose
position the ledger holds under another stream id is no re-delivery: Redis
numbered a new change with a sequence number PostgreSQL had already used (a
replica promoted without entries the syncer had committed, or Redis restored
from an older copy), and ``ON CONFLICT DO NOTHING`` would drop it. Instead:

1. **Detection**, in the syncer's transaction (:meth:`Divergence.sort`). From
   the account's first such entry on, none of its entries of the batch reaches
   the ledger: they are kept in ``diverged_entries``, a ``rebases`` row records
   the fork (its first entry, the balances and plan it left from, and
   ``until_id``: every entry of the account up to that stream id is the
   fork's), and they are acknowledged like committed ones. While the fork is
   open, the account's later entries up to ``until_id`` are kept the same
   way; those past it wait, for they may come after the re-base.
2. **Re-base**, in Redis, after the commit (:meth:`Divergence.rebase_due`,
   ``lua/rebase.lua``): PostgreSQL's balances plus the fork's net change,
   clamped at what the live holds need, numbered on from PostgreSQL's last
   entry, and journaled as one ``rebase`` entry. It runs only when Redis is at
   the newest fork entry PostgreSQL holds, so that every entry of the fork is
   known; otherwise the script answers the stream's last id, ``until_id``
   moves up to it, and the entries that waited join the fork when offered
   again. The fork's entries that repeat one of PostgreSQL's side (the same
   idempotency key, or on a tree an ancestor's entry of such a call, see
   :mod:`.fork_tree`; a refill of a resource that side refilled too) are left
   out of the net change, and the keys of PostgreSQL's side are restored in
   Redis, so a call retried across the fork is counted once.
3. **Close**: the ledger takes the ``rebase`` entry like any other (its seq
   follows PostgreSQL's last), and the same transaction closes the fork; the
   entries after it are the account's history again.

Every step is idempotent and redone until done. A crash before the commit
re-delivers the entries; after it, they are kept again by stream id, once;
before or after the script, the fork is still open and the script runs again
(a second run answers the first run's reply); the ``rebase`` entry, pending,
is applied once. Open forks are looked up again every ``sync_claim_idle``, so
one whose entries were all acknowledged before a crash is still re-based, and
one whose re-base Redis lost is re-based again.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
import redis
from psycopg_pool import ConnectionPool

from ..backends.pipelines import run_scripts
from ..backends.postgres import (
    RESTORED_KEYS_MAX,
    ForkRow,
    account_roots,
    account_states,
    account_trees,
    cap_use_before,
    fork_entries,
    forks_of,
    history_since,
    ledger_ids,
    open_fork,
    open_forks,
    postgres_errors_translated,
    record_diverged,
    update_fork,
)
from ..backends.topology import Topology
from ..config import Settings
from ..core.journal import JournalEntry, text
from ..core.keys import KeySpace
from ..core.plan_rules import Rules
from ..core.replies import Status
from ..core.scripts import load_scripts
from ..errors import RedCreditError
from .fork_tree import ON_THE_WAY, cap_target, repeated_via, stream_order

__all__ = ["Divergence", "Fork", "RebasePlan", "Sorting", "sort_batch", "stream_order"]

log = logging.getLogger("redcredit.ledger.divergence")


@dataclass(slots=True)
class Fork:
    """A row of ``rebases``: one fork of one account's history."""

    account: str
    fork_id: str
    fork_seq: int
    base_credits: int
    base_chat: int
    base_plan: str | None
    until_id: str
    outcome: str | None  # None while open, then "rebased" or "absent"
    rebase_id: str | None

    @classmethod
    def from_row(cls, row: ForkRow) -> Fork:
        return cls(*row)

    @property
    def is_open(self) -> bool:
        return self.outcome is None

    def covers(self, entry: JournalEntry) -> bool:
        """Whether an entry the ledger does not hold belongs to this fork."""
        at = stream_order(entry.stream_id)
        if self.rebase_id is not None:
            # Everything Redis journaled before the re-base.
            return at < stream_order(self.rebase_id)
        return at <= stream_order(self.until_id)


@dataclass(slots=True)
class Sorting:
    """A batch sorted: for the ledger, kept apart as a fork's, or waiting."""

    apply: list[JournalEntry] = field(default_factory=list)
    # (account, fork id) -> the fork's entries of the batch
    kept: dict[tuple[str, str], list[JournalEntry]] = field(
        default_factory=lambda: defaultdict(list)
    )
    waiting: list[JournalEntry] = field(default_factory=list)
    # Accounts whose fork may be re-based now.
    due: set[str] = field(default_factory=set)

    def held_back(self, waiting_positions: Collection[tuple[str, int]]) -> set[tuple[str, str]]:
        """Identities of the entries not to acknowledge, given those the ledger made wait."""
        held = {entry.identity for entry in self.waiting}
        return held | {e.identity for e in self.apply if e.position in waiting_positions}


def sort_batch(
    conn: psycopg.Connection[Any], schema: str, entries: Sequence[JournalEntry]
) -> Sorting:
    """Sorts a batch in the syncer's transaction, recording forks and their entries."""
    sorting = Sorting()
    by_account: dict[str, list[JournalEntry]] = defaultdict(list)
    for entry in entries:
        by_account[entry.account].append(entry)
    ledger = ledger_ids(conn, schema, [entry.position for entry in entries])
    forks: dict[str, list[Fork]] = defaultdict(list)
    for row in forks_of(conn, schema, list(by_account)):
        fork = Fork.from_row(row)
        forks[fork.account].append(fork)
    for account, group in by_account.items():
        group.sort(key=lambda e: stream_order(e.stream_id))
        known = sorted(forks[account], key=lambda f: stream_order(f.fork_id))
        fresh = _sort_account(conn, schema, group, known, ledger, sorting)
        if fresh is not None:
            until = sorting.kept[account, fresh.stream_id][-1].stream_id
            open_fork(conn, schema, fresh, until)
    for (_account, fork_id), kept in sorting.kept.items():
        record_diverged(conn, schema, fork_id, kept)
    return sorting


def _sort_account(
    conn: psycopg.Connection[Any],
    schema: str,
    group: list[JournalEntry],
    known: list[Fork],
    ledger: dict[tuple[str, int], str],
    sorting: Sorting,
) -> JournalEntry | None:
    """One account's entries of the batch, in stream order; returns a new fork's first."""
    pending = known[-1] if known and known[-1].is_open else None
    fresh: JournalEntry | None = None
    for entry in group:
        account = entry.account
        theirs = ledger.get(entry.position)
        if theirs == entry.stream_id:
            sorting.apply.append(entry)  # a re-delivery: changes nothing
            continue
        fork = next((f for f in known if f.covers(entry)), None)
        if fork is not None:
            sorting.kept[account, fork.fork_id].append(entry)
            if fork.is_open:
                sorting.due.add(account)
        elif fresh is not None:
            sorting.kept[account, fresh.stream_id].append(entry)
        elif pending is not None:
            if entry.op == "rebase" and entry.feature == pending.fork_id:
                # The re-base reaches the ledger: the fork is closed, and what
                # follows is the account's history again.
                closed = {"rebase_seq": entry.seq, "rebase_id": entry.stream_id}
                update_fork(
                    conn, schema, account, pending.fork_id, {"outcome": "rebased", **closed}
                )
                pending = None
                sorting.apply.append(entry)
            else:
                sorting.waiting.append(entry)
                sorting.due.add(account)
        elif theirs is not None:
            fresh = entry
            sorting.kept[account, fresh.stream_id].append(entry)
            sorting.due.add(account)
            log.warning(
                "account %r: entry %d (%s) is not the ledger's (%s): its history in Redis "
                "forked from PostgreSQL's; its entries are kept apart and it is re-based",
                account, entry.seq, entry.stream_id, theirs,
            )  # fmt: skip
        else:
            sorting.apply.append(entry)
    return fresh


def _ran(reply: list[Any]) -> bool:
    """Whether a reply of the script is a re-base it has just made."""
    return text(reply[2]) == "rebased" and not reply[1]


@dataclass(frozen=True, slots=True)
class RebasePlan:
    """One re-base to send: the script call, and what to record of it."""

    fork: Fork
    keys: list[str]
    args: list[str | int]
    pg: tuple[int, int, int]  # PostgreSQL's last seq, credits, chat messages
    repeats: tuple[int, int]
    fork_net: tuple[int, int]  # as the newest fork entry PostgreSQL holds has it


class Divergence:
    """The syncer's share of divergence: sorts its batches, re-bases what forked.

    ``fault_hook`` is called with ``"before_rebase"`` and ``"after_rebase"``
    (the script has run, nothing recorded yet), for fault-injection tests.
    """

    def __init__(
        self,
        settings: Settings,
        topology: Topology,
        pool: ConnectionPool[Any],
        fault_hook: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.schema = settings.pg_schema
        self.keys = KeySpace(settings.versioned_prefix, settings.partitions)
        self.topology = topology
        self.pool = pool
        self._script = load_scripts()["rebase"]
        self._fault = fault_hook or (lambda _stage: None)
        self._window_ms = int(settings.idempotency_window.total_seconds() * 1000)
        self._bypass = "|" + "|".join(settings.bypass_plans) + "|"
        # The grant settings: a re-base may touch the account's buckets.
        self._rules = Rules(settings)
        self._due: set[str] = set()
        self._next_sweep = 0.0  # open forks are looked up at the first call
        self._retry_at = 0.0
        self.rebased = 0  # re-bases run by this syncer

    def sort(self, conn: psycopg.Connection[Any], entries: Sequence[JournalEntry]) -> Sorting:
        """:func:`sort_batch` in the syncer's transaction; notes the forks to re-base."""
        sorting = sort_batch(conn, self.schema, entries)
        # Should the transaction roll back, a due account finds no open fork: harmless.
        self._due |= sorting.due
        return sorting

    def rebase_due(self, partitions: Collection[int]) -> int:
        """Re-bases the open forks of these partitions that are due; returns how many ran.

        A failure is logged and the re-bases tried again later: they wait,
        while the other accounts' entries go on.
        """
        now = time.monotonic()
        sweep = now >= self._next_sweep
        if now < self._retry_at or not (self._due or sweep):
            return 0
        try:
            return self._rebase_due(set(partitions), sweep)
        except (redis.RedisError, RedCreditError, OSError) as exc:
            self._retry_at = time.monotonic() + self.settings.sync_retry_max.total_seconds()
            log.warning("could not re-base forked accounts (%s); retrying later: %s",
                        type(exc).__name__, exc)  # fmt: skip
            return 0

    def _rebase_due(self, partitions: set[int], sweep: bool) -> int:
        with (
            postgres_errors_translated("read the forks to re-base"),
            self.pool.connection() as conn,
            conn.transaction(),
        ):
            if sweep:
                self._due |= {row[0] for row in open_forks(conn, self.schema)}
                self._next_sweep = time.monotonic() + self.settings.sync_claim_idle.total_seconds()
            # Another syncer's partitions are its own; a sweep finds them if they become ours.
            # A tree's member lives in its root's partition.
            roots = account_roots(conn, self.schema, sorted(self._due))
            mine = sorted(
                a for a in self._due if self.keys.partition(roots.get(a, a)) in partitions
            )
            forks = [Fork.from_row(row) for row in forks_of(conn, self.schema, mine)]
            plans = [plan for f in forks if f.is_open and (plan := self.plan(conn, f))]
        self._due = {plan.fork.account for plan in plans}
        if not plans:
            return 0
        self._fault("before_rebase")
        replies = run_scripts(self.topology, self._script, [(p.keys, p.args) for p in plans])
        self._fault("after_rebase")
        with (
            postgres_errors_translated("record the re-bases"),
            self.pool.connection() as conn,
            conn.transaction(),
        ):
            for plan, reply in zip(plans, replies, strict=True):
                self._record(conn, plan, reply)
        return sum(1 for reply in replies if reply[0] == Status.OK and _ran(reply))

    def plan(self, conn: psycopg.Connection[Any], fork: Fork) -> RebasePlan | None:
        """The script call that re-bases an open fork (None if it has no entries yet)."""
        state = account_states(conn, self.schema, [fork.account]).get(fork.account)
        entries = fork_entries(conn, self.schema, fork.account, fork.fork_id)
        if state is None or not entries:
            return None  # a fork is opened with its first entry, on a known account
        pg_credits, pg_chat, pg_plan, pg_seq = state
        history = history_since(conn, self.schema, fork.account, fork.fork_seq, self._window_ms)
        # PostgreSQL's side of the fork: its calls' keys, and which resources it refilled.
        applied: dict[str, tuple[int, int]] = {}
        refilled = [False, False]
        for seq, op, credit_delta, chat_delta, key, left in history:
            if op == "refill":
                refilled[0] |= credit_delta > 0
                refilled[1] |= chat_delta > 0
            elif key is not None and op not in ON_THE_WAY:
                applied[key] = (seq, left)
        repeats = [0, 0]
        # A tree's level: its entries of calls made below it that PostgreSQL's side holds.
        repeated = repeated_via(conn, self.schema, entries)
        for sid, _seq, op, credit_delta, chat_delta, _c, _m, key, *_tree in entries:
            if op == "refill":
                repeats[0] += credit_delta if refilled[0] and credit_delta > 0 else 0
                repeats[1] += chat_delta if refilled[1] and chat_delta > 0 else 0
            elif (key in applied or sid in repeated) and op not in ON_THE_WAY:
                repeated.add(sid)
                repeats[0] += credit_delta
                repeats[1] += chat_delta
        tree = account_trees(conn, self.schema, [fork.account]).get(fork.account)
        pg_use = None if tree is None or tree[3] is None else (tree[3], tree[4], tree[5])
        base_use = cap_use_before(conn, self.schema, fork.account, fork.fork_seq)
        cap_use = cap_target(base_use, pg_use, entries, repeated)
        newest = max(entries, key=lambda row: stream_order(row[0]))
        keys = self.keys.for_account(fork.account, None if tree is None else tree[1])
        restored = sorted(
            ((key, seq, left) for key, (seq, left) in applied.items() if left > 0),
            key=lambda record: record[1],
        )[-RESTORED_KEYS_MAX:]
        # A plan of NULL (a legacy row) names no plan: Redis's is kept.
        base_plan = (fork.base_plan or "") if pg_plan else ""
        args: list[str | int] = [
            fork.account, 0, "", "", self._window_ms, self._bypass, self._rules.text(), "",
            fork.fork_id, newest[1], fork.base_credits, fork.base_chat, *repeats,
            pg_credits, pg_chat, pg_plan or "", pg_seq, base_plan,
            "" if cap_use is None else ",".join(map(str, cap_use)),
        ]  # fmt: skip
        for _key, seq, left in restored:
            args += [seq, left]
        return RebasePlan(
            fork,
            [*keys.common(None), *(keys.idempotency(key) for key, _, _ in restored)],
            args,
            (pg_seq, pg_credits, pg_chat),
            (repeats[0], repeats[1]),
            (newest[5] - fork.base_credits - repeats[0], newest[6] - fork.base_chat - repeats[1]),
        )

    def _record(self, conn: psycopg.Connection[Any], plan: RebasePlan, reply: list[Any]) -> None:
        fork = plan.fork
        figures: dict[str, Any] = {
            "pg_seq": plan.pg[0],
            "pg_credits": plan.pg[1],
            "pg_chat": plan.pg[2],
            "repeat_credits": plan.repeats[0],
            "repeat_chat": plan.repeats[1],
        }
        if reply[0] == Status.MISSING:
            # Redis no longer has the account: it reloads from PostgreSQL, and
            # the fork's change stays in diverged_entries, not collected.
            figures |= {
                "until_id": max(fork.until_id, text(reply[2]), key=stream_order),
                "net_credits": plan.fork_net[0],
                "net_chat": plan.fork_net[1],
                "applied_credits": 0,
                "applied_chat": 0,
                "outcome": "absent",
            }
            log.warning("account %r forked and is no longer in Redis: it reloads from "
                        "PostgreSQL, without the fork's change", fork.account)  # fmt: skip
            self._due.discard(fork.account)
        elif text(reply[2]) == "behind":
            # Redis has fork entries PostgreSQL does not hold yet: they all
            # come up to this id, and join the fork when offered again.
            until = max(fork.until_id, text(reply[4]), key=stream_order)
            figures = {"until_id": until, "old_seq": int(reply[3])}
        else:
            old_seq, _seq, net_credits, net_chat, added_credits, added_chat = reply[3:9]
            figures |= {
                "old_seq": old_seq,
                "net_credits": net_credits,
                "net_chat": net_chat,
                "applied_credits": added_credits,
                "applied_chat": added_chat,
            }
            if _ran(reply):
                self.rebased += 1
                log.warning(
                    "account %r re-based onto PostgreSQL's history: %+d credits, %+d chat "
                    "messages from the fork (%d and %d not collected)",
                    fork.account, added_credits, added_chat,
                    added_credits - net_credits, added_chat - net_chat,
                )  # fmt: skip
            self._due.discard(fork.account)
        update_fork(conn, self.schema, fork.account, fork.fork_id, figures)
