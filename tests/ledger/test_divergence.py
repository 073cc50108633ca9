"""A history in Redis that forked from PostgreSQL's is kept apart, then re-based: never merged.

The fork is real: Redis restored from an older copy of its append-only file
while PostgreSQL kept what came after, so new changes reuse sequence numbers
the ledger already has.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from redcredit import RedCredit, Settings
from redcredit.backends.pipelines import run_scripts
from redcredit.backends.postgres import forks_of
from redcredit.config import PlanSettings, RefillSettings
from redcredit.ledger.divergence import Fork
from redcredit.ledger.evict import evict_idle
from redcredit.ledger.reconcile import reconcile
from redcredit.ledger.syncer import Syncer
from redcredit.servers.redis import EmbeddedRedis
from tests.support.helpers import assert_persisted_exactly, snapshot


class Crash(Exception):
    """The syncer's process dies here (nothing after it runs)."""


@dataclass
class Forked:
    server: EmbeddedRedis
    settings: Settings
    syncer: Syncer
    # Every entry Redis journaled on the fork and after it, before any drain.
    journaled: set[str]


def _copy(source: Path, target: Path) -> None:
    for item in target.iterdir():
        shutil.rmtree(item) if item.is_dir() else item.unlink()
    shutil.copytree(source, target, dirs_exist_ok=True)


def _lost(rc: RedCredit) -> None:
    rc.spend("forked", cost=10)
    rc.grant("forked", 50, idempotency_key="pay-1")  # entry 5, 120 credits


def _on_the_fork(rc: RedCredit) -> None:
    rc.spend("forked", cost=5)  # entry 4 again, for another change
    # The payment webhook retried: the copy has never seen the key.
    rc.grant("forked", 50, idempotency_key="pay-1")
    rc.spend("forked", cost=1)
    rc.spend("steady", cost=2)  # entry 3: new, no fork


def _fork(
    redis_factory: Callable[..., EmbeddedRedis],
    settings: Settings,
    tmp_path: Path,
    fault: Callable[[str], None] = lambda _at: None,
    lost: Callable[[RedCredit], None] = _lost,
    on_the_fork: Callable[[RedCredit], None] = _on_the_fork,
) -> Forked:
    """Two spends on ``forked``, then ``lost`` (PostgreSQL keeps it, Redis forgets it),
    then ``on_the_fork`` (by default three entries, one a repeated grant)."""
    server = redis_factory(appendonly=True, extra_args=["--appendfsync", "always"])
    settings = settings.model_copy(update={"redis_url": server.url, "sync_waits_for_aof": True})
    syncer = Syncer(settings, fault_hook=fault)
    with RedCredit(settings=settings) as rc:
        rc.spend("forked", cost=10)
        rc.spend("forked", cost=10)  # open, two spends: entry 3, 80 credits
        rc.spend("steady", cost=1)
        rc.spend("quiet", cost=1)
        assert syncer.drain().caught_up
        server.kill()
        _copy(server.data_dir, tmp_path)  # the older copy
        server.restart()
        lost(rc)
        assert syncer.drain().caught_up  # PostgreSQL is ahead of the copy
        server.kill()
        _copy(tmp_path, server.data_dir)
        server.restart()
        assert rc.balance("forked").sequence == 3
        on_the_fork(rc)
    client = redis.Redis.from_url(server.url)
    journaled = {
        sid.decode() for stream in syncer.streams for sid, _fields in client.xrange(stream)
    }
    client.close()
    return Forked(server, settings, syncer, journaled)


def _rows(pg: psycopg.Connection[Any], schema: str, query: str) -> list[tuple[Any, ...]]:
    return pg.execute(query.replace("{s}", f'"{schema}"')).fetchall()


def _assert_joined(forked: Forked, pg: psycopg.Connection[Any]) -> None:
    """Everything journaled is in PostgreSQL once, and Redis is PostgreSQL again."""
    settings, schema = forked.settings, forked.settings.pg_schema
    client = redis.Redis.from_url(forked.server.url)
    try:
        assert assert_persisted_exactly(client, settings, pg) == 3
        with RedCredit(settings=settings) as rc:
            # 100 - 10 - 10 - 10 + 50 - 5 - 1: every charge of both sides, the grant once.
            balance = rc.balance("forked")
            assert (balance.credits, balance.sequence) == (114, 6)
        assert reconcile(settings, client, pg).clean
        assert reconcile(settings, client, pg).rebased == ["forked"]
    finally:
        client.close()
    ledger = _rows(pg, schema, "SELECT account, seq, op, credit_delta, stream_id FROM {s}.ledger")
    kept = _rows(
        pg, schema, "SELECT account, seq, op, credit_delta, stream_id FROM {s}.diverged_entries"
    )
    # No entry silently dropped: each one journaled after the restore is in one of the two.
    assert forked.journaled <= {row[4] for row in ledger} | {row[4] for row in kept}
    assert sorted(row[1:4] for row in kept) == [
        (4, "spend", -5),
        (5, "grant", 50),
        (6, "spend", -1),
    ]
    assert {row[0] for row in kept} == {"forked"}
    by_account = {a: sorted(r[1:4] for r in ledger if r[0] == a) for a in ("forked", "steady")}
    assert by_account["forked"][3:] == [(4, "spend", -10), (5, "grant", 50), (6, "rebase", -6)]
    assert by_account["steady"] == [(1, "open", 100), (2, "spend", -1), (3, "spend", -2)]
    fork = _rows(
        pg,
        schema,
        "SELECT account, fork_seq, outcome, rebase_seq, pg_seq, old_seq, repeat_credits, "
        "net_credits, applied_credits FROM {s}.rebases",
    )
    assert fork == [("forked", 4, "rebased", 6, 5, 6, 50, -6, -6)]


def _stage(stage: str, nth: int = 1) -> tuple[Callable[[str], None], Callable[[], None]]:
    """A fault hook that crashes at the nth ``stage`` once armed; and what arms it."""
    seen = [0]
    armed = [False]

    def hook(at: str) -> None:
        if armed[0] and at == stage:
            seen[0] += 1
            if seen[0] == nth:
                raise Crash(stage)

    return hook, lambda: armed.__setitem__(0, True)


def test_a_fork_is_kept_apart_and_re_based(
    redis_factory, pg_settings: Settings, pg, tmp_path
) -> None:
    forked = _fork(redis_factory, pg_settings, tmp_path)
    try:
        assert forked.syncer.drain().caught_up
        assert forked.syncer.divergence.rebased == 1
        _assert_joined(forked, pg)
        # The script again: it answers its first reply and changes nothing.
        client = redis.Redis.from_url(forked.server.url)
        row = forks_of(pg, pg_settings.pg_schema, ["forked"])[0]
        fork = Fork.from_row(row)
        fork.outcome = None
        plan = forked.syncer.divergence.plan(pg, fork)
        assert plan is not None
        before = snapshot(client, pg_settings.key_prefix)
        (reply,) = run_scripts(
            forked.syncer.topology, forked.syncer.divergence._script, [(plan.keys, plan.args)]
        )
        assert reply[:3] == [0, 1, b"rebased"]
        assert snapshot(client, pg_settings.key_prefix) == before
        # The grant's key came back from PostgreSQL's side: a third try applies nothing.
        with RedCredit(settings=forked.settings) as rc:
            assert rc.grant("forked", 50, idempotency_key="pay-1").replayed
        client.close()
    finally:
        forked.syncer.close()


@pytest.mark.parametrize(
    ("stage", "nth"),
    [
        ("before_commit", 1),  # the batch that finds the fork, rolled back
        ("after_commit", 1),  # ... committed, not acknowledged: delivered again
        ("before_rebase", 1),  # acknowledged; Redis not re-based yet
        ("after_rebase", 1),  # Redis re-based; PostgreSQL not told
        ("after_commit", 2),  # the rebase entry committed, not acknowledged
    ],
)
def test_a_crash_between_any_two_steps_loses_and_doubles_nothing(
    redis_factory, pg_settings: Settings, pg, tmp_path, stage: str, nth: int
) -> None:
    hook, arm = _stage(stage, nth)
    forked = _fork(redis_factory, pg_settings, tmp_path, hook)
    arm()
    try:
        with pytest.raises(Crash):
            forked.syncer.drain()
    finally:
        forked.syncer.close()
    # A new process: nothing of the crashed one's memory, its entries pending.
    forked.syncer = Syncer(forked.settings)
    try:
        assert forked.syncer.drain().caught_up
        _assert_joined(forked, pg)
    finally:
        forked.syncer.close()


def _fork_row(pg: psycopg.Connection[Any], schema: str) -> tuple[Any, ...]:
    (row,) = _rows(
        pg,
        schema,
        "SELECT outcome, repeat_credits, net_credits, applied_credits, "
        "(SELECT count(*) FROM {s}.diverged_entries) FROM {s}.rebases",
    )
    return row


def _drained(forked: Forked, pg: psycopg.Connection[Any]) -> redis.Redis:
    assert forked.syncer.drain().caught_up
    client = redis.Redis.from_url(forked.server.url)
    assert assert_persisted_exactly(client, forked.settings, pg) == 3
    assert reconcile(forked.settings, client, pg).clean
    return client


def test_entries_journaled_before_the_re_base_join_the_fork(
    redis_factory, pg_settings: Settings, pg, tmp_path
) -> None:
    """The account keeps moving between the fork's discovery and its re-base."""
    late: list[int] = []

    def meanwhile(at: str) -> None:
        if at == "before_rebase" and len(late) < 2:
            with RedCredit(settings=forked.settings) as rc:
                late.append(rc.spend("forked", cost=3).sequence)

    forked = _fork(redis_factory, pg_settings, tmp_path, meanwhile)
    try:
        client = _drained(forked, pg)
        client.close()
    finally:
        forked.syncer.close()
    # The first try found Redis past the fork PostgreSQL knew, the second too;
    # each time the new entries joined the fork, and the third try re-based.
    assert late == [7, 8]
    assert _fork_row(pg, pg_settings.pg_schema) == ("rebased", 50, -12, -12, 5)
    with RedCredit(settings=forked.settings) as rc:
        assert rc.balance("forked").credits == 114 - 6
        assert rc.balance("forked").sequence == 6


def test_a_fork_that_would_go_below_zero_is_clamped_and_the_rest_recorded(
    redis_factory, pg_settings: Settings, pg, tmp_path
) -> None:
    def lost(rc: RedCredit) -> None:
        rc.spend("forked", cost=70)  # PostgreSQL: 10 credits

    def on_the_fork(rc: RedCredit) -> None:
        rc.spend("forked", cost=50)  # Redis: 30, of which 20 are held below
        rc.reserve("forked", 20, ttl=60)

    forked = _fork(redis_factory, pg_settings, tmp_path, lost=lost, on_the_fork=on_the_fork)
    try:
        client = _drained(forked, pg)
        client.close()
        with RedCredit(settings=forked.settings) as rc:
            balance = rc.balance("forked")
    finally:
        forked.syncer.close()
    # 10 - 50 would be -40: the live hold keeps 20, and 60 were not collected.
    assert (balance.credits, balance.held, balance.available) == (20, 20, 0)
    assert _fork_row(pg, pg_settings.pg_schema) == ("rebased", 0, -50, 10, 2)


def test_a_refill_both_sides_made_is_counted_once(
    redis_factory, pg_settings: Settings, pg, tmp_path
) -> None:
    hourly = PlanSettings(refill=RefillSettings(credits=100, every=timedelta(hours=1)))
    settings = pg_settings.model_copy(
        update={"plans": {**pg_settings.plans, "hourly": hourly}, "default_plan": "hourly"}
    )

    def later(cost: int) -> Callable[[RedCredit], None]:
        def spend(rc: RedCredit) -> None:
            rc.engine.clock_offset_ms = 2 * 3600 * 1000  # a new period: refill, then spend
            rc.spend("forked", cost=cost)
            rc.engine.clock_offset_ms = 0

        return spend

    forked = _fork(redis_factory, settings, tmp_path, lost=later(10), on_the_fork=later(5))
    try:
        client = _drained(forked, pg)
        client.close()
        with RedCredit(settings=forked.settings) as rc:
            credits = rc.balance("forked").credits
    finally:
        forked.syncer.close()
    # Both sides topped 80 up to 100; the top-up counts once: 100 - 10 - 5.
    assert credits == 85
    assert _fork_row(pg, pg_settings.pg_schema) == ("rebased", 20, -5, -5, 2)


def test_a_forked_account_is_not_evicted(
    redis_factory, pg_settings: Settings, pg, tmp_path
) -> None:
    """Behind PostgreSQL's sequence number, the fork would be dropped by a reload."""

    def on_the_fork(rc: RedCredit) -> None:
        rc.spend("forked", cost=1)  # Redis at entry 4, PostgreSQL at 5

    forked = _fork(redis_factory, pg_settings, tmp_path, on_the_fork=on_the_fork)
    client = redis.Redis.from_url(forked.server.url)
    try:
        report = evict_idle(forked.settings, client, pg, idle=timedelta(0))
        assert report.outcomes == {"evicted": 2, "unsynced": 1}  # steady and quiet go
        with RedCredit(settings=forked.settings) as rc:
            assert [rc.balance(a).credits for a in ("steady", "quiet")] == [99, 99]
        _drained(forked, pg).close()
    finally:
        client.close()
        forked.syncer.close()
    with RedCredit(settings=forked.settings) as rc:
        assert rc.balance("forked").credits == 120 - 1
