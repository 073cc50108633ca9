"""Credit buckets in PostgreSQL: drained from the journal, reloaded, reconciled, re-based.

On a real PostgreSQL, and on one Redis server and a real three-primary
cluster: after a drain PostgreSQL's buckets are Redis's, each bucket's
changes in the ledger sum to its remaining credits, and an evicted account
comes back with exactly the buckets it had.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from redcredit import AsyncRedCredit, PlanSettings, RedCredit, RefillSettings, Settings
from redcredit.backends.migrate import migrate, migrations
from redcredit.backends.postgres import (
    apply_entries,
    apply_migration,
    bucket_remaining,
    bucket_rows,
    ledger_bucket_sums,
    prepare_migrations,
    read_snapshot,
)
from redcredit.core.bucket_ledger import open_snapshots, unpack_buckets
from redcredit.core.loader import AccountSnapshot, BucketSnapshot
from redcredit.ledger.evict import evict_idle
from redcredit.ledger.reconcile import reconcile
from redcredit.ledger.syncer import Syncer
from redcredit.servers.redis import EmbeddedRedis
from tests.grants.conftest import WHERE, make_settings
from tests.ledger.test_divergence import _fork
from tests.ledger.test_reconcile_evict import _cli
from tests.support.helpers import assert_persisted_exactly

DAY_MS = 86_400_000
MINUTE_MS = 60_000


@pytest.fixture(params=WHERE, ids=["one-node", "cluster"])
def bsettings(request: pytest.FixtureRequest, pg_settings: Settings) -> Settings:
    """The grant tests' settings (plans with an overdraft and a daily refill), with PostgreSQL."""
    plans = {
        "postpaid": PlanSettings(overdraft=500),
        "daily": PlanSettings(
            refill=RefillSettings(credits=100, every=timedelta(days=1), mode="add", rollover=30)
        ),
    }
    return make_settings(
        request.getfixturevalue(request.param),
        pg_settings.key_prefix,
        plans=plans,
        database_url=pg_settings.database_url,
        pg_schema=pg_settings.pg_schema,
        sync_claim_idle=pg_settings.sync_claim_idle,
        sync_interval=pg_settings.sync_interval,
        sync_batch_size=pg_settings.sync_batch_size,
    )


def _rows(pg: psycopg.Connection[Any], settings: Settings, query: str, *args: Any) -> list[Any]:
    return pg.execute(query.replace("{s}", f'"{settings.pg_schema}"'), list(args)).fetchall()


def assert_buckets_persisted(
    rc: RedCredit, settings: Settings, pg: psycopg.Connection[Any], accounts: list[str]
) -> None:
    """After a drain: PostgreSQL's open buckets are Redis's, and each sums in the ledger."""
    schema = settings.pg_schema
    in_pg = bucket_rows(pg, schema, accounts)
    for account in accounts:
        keys = rc.engine.keys.for_account(account)
        c, packed = rc.redis.hmget(keys.hash, "c", "B")
        assert open_snapshots(in_pg.get(account, {})) == unpack_buckets(packed), account
        (row,) = _rows(pg, settings, "SELECT credits FROM {s}.accounts WHERE account = %s", account)
        assert row[0] == int(c), account
    sums = ledger_bucket_sums(pg, schema, accounts)
    remaining = bucket_remaining(pg, schema, accounts)
    assert remaining, "no bucket reached PostgreSQL"
    assert {k: sums.get(k, 0) for k in remaining} == remaining
    assert set(sums) <= set(remaining)
    report = reconcile(settings, None, pg)
    assert report.clean, report.drift


def _statuses(pg: psycopg.Connection[Any], settings: Settings, account: str) -> dict[str, Any]:
    rows = _rows(
        pg,
        settings,
        "SELECT bucket, status, remaining FROM {s}.buckets WHERE account = %s",
        account,
    )
    return {bucket: (status, remaining) for bucket, status, remaining in rows}


def _bucket_ops(pg: psycopg.Connection[Any], settings: Settings, account: str) -> list[Any]:
    return _rows(
        pg,
        settings,
        "SELECT op, bucket FROM {s}.ledger WHERE account = %s AND bucket IS NOT NULL ORDER BY seq",
        account,
    )


def _next_day(rc: RedCredit) -> None:
    """The server's clock a day (and a second) on: the daily refill is due."""
    rc.engine.clock_offset_ms += DAY_MS + 1_000


def test_every_bucket_op_reaches_postgres_as_redis_has_it(
    bsettings: Settings, pg: psycopg.Connection[Any]
) -> None:
    settings = bsettings
    with RedCredit(settings=settings) as rc, Syncer(settings) as syncer:
        now = datetime.now(UTC)
        rc.grant("spender", 100, idempotency_key="order-1")  # the base bucket
        rc.grant("spender", 50, grant_id="promo", category="promotional", expires_in=600)
        rc.grant("spender", 30, grant_id="early", category="free", priority=10)
        rc.grant("spender", 200, grant_id="later", effective_at=now + timedelta(hours=1))
        rc.grant("spender", 40, grant_id="soon", effective_at=now + timedelta(minutes=5))
        rc.spend("spender", cost=60)  # early's 30, then 30 of promo's
        held = rc.reserve("spender", 5, ttl=60)
        rc.settle(held, 8)  # held 5 from promo, 3 more burnt from it
        rc.void("spender", "later", reason="order cancelled")
        rc.engine.clock_offset_ms = 6 * MINUTE_MS
        assert rc.balance("spender").credits == 100 + 12 + 40  # soon is live
        rc.engine.clock_offset_ms = 11 * MINUTE_MS
        assert rc.balance("spender").credits == 100 + 40  # promo expired with 12 left

        # Overdraft: a postpaid plan goes below zero in the base bucket.
        rc.set_plan("post", "postpaid")
        rc.grant("post", 50, grant_id="promo", category="promotional", expires_in=3600)
        assert rc.spend("post", cost=80).credits_remaining == -30
        assert rc.grant("post", 10).credits == -20

        # A daily refill with a rollover of 30.
        rc.set_plan("refilled", "daily")
        rc.balance("refilled")  # the first touch starts the clock
        _next_day(rc)
        rc.spend("refilled", cost=20)
        _next_day(rc)
        assert rc.balance("refilled").credits == 130  # 30 rolled over, 50 expired, 100 added
        assert syncer.drain().caught_up

        accounts = ["spender", "post", "refilled"]
        assert_buckets_persisted(rc, settings, pg, accounts)
    assert _statuses(pg, settings, "spender") == {
        "promo": ("closed", 0),
        "early": ("closed", 0),
        "later": ("closed", 0),
        "soon": ("live", 40),
    }
    assert _bucket_ops(pg, settings, "spender") == [
        ("grant", "promo"),
        ("grant", "early"),
        ("grant", "later"),
        ("grant", "soon"),
        ("void", "later"),
        ("effective", "soon"),
        ("expire", "promo"),
    ]
    assert _statuses(pg, settings, "post") == {"promo": ("closed", 0)}
    (post,) = _rows(pg, settings, "SELECT credits FROM {s}.accounts WHERE account = 'post'")
    assert post == (-20,)
    assert _statuses(pg, settings, "refilled") == {"refill": ("live", 130)}
    assert _bucket_ops(pg, settings, "refilled") == [
        ("refill", "refill"),
        ("expire", "refill"),
        ("refill", "refill"),
    ]
    (spend,) = _rows(
        pg,
        settings,
        "SELECT bucket_changes FROM {s}.ledger WHERE account = 'spender' AND op = 'spend'",
    )
    assert spend == (
        [
            {"bucket": "early", "delta": -30, "after": 0},
            {"bucket": "promo", "delta": -30, "after": 20},
        ],
    )
    (refill,) = _rows(
        pg,
        settings,
        "SELECT grant_category, grant_priority, grant_amount, grant_expires_at FROM {s}.ledger "
        "WHERE account = 'refilled' AND op = 'refill' ORDER BY seq DESC LIMIT 1",
    )
    assert refill == ("promotional", 50, 100, None)


def test_an_evicted_account_comes_back_with_exactly_its_buckets(
    bsettings: Settings, pg: psycopg.Connection[Any]
) -> None:
    settings = bsettings
    with RedCredit(settings=settings) as rc, Syncer(settings) as syncer:
        now = datetime.now(UTC)
        rc.grant("cold", 70)
        rc.grant("cold", 50, grant_id="promo", category="promotional", expires_in=timedelta(days=2))
        rc.grant("cold", 20, grant_id="gift", category="free", priority=5)
        rc.grant("cold", 90, grant_id="next", effective_at=now + timedelta(days=3))
        rc.set_plan("cold", "daily")
        rc.balance("cold")
        _next_day(rc)  # the refill bucket too
        rc.spend("cold", cost=15)  # from the gift, which burns first
        before = rc.balance("cold")
        assert {b.id for b in before.buckets} == {"base", "promo", "gift", "next", "refill"}
        assert syncer.drain().caught_up
        evicted = evict_idle(settings, None, pg, idle=timedelta(0))
        assert evicted.outcomes["evicted"] == 1
        assert not rc.redis.exists(rc.engine.keys.for_account("cold").hash)
        after = rc.balance("cold")  # loaded from PostgreSQL
        assert dataclasses.replace(after, server_time_ms=before.server_time_ms) == before
        # The grants still burn in their order, and the pending one starts on time.
        assert rc.spend("cold", cost=10).credits_remaining == before.credits - 10
        rc.engine.clock_offset_ms += 3 * DAY_MS
        later = {b.id: b for b in rc.balance("cold").buckets}
        assert "promo" not in later and "gift" not in later  # expired; spent
        assert (later["next"].live, later["next"].remaining) == (True, 90)
        assert syncer.drain().caught_up
        assert_buckets_persisted(rc, settings, pg, ["cold"])


async def test_the_async_loader_restores_the_buckets_too(
    bsettings: Settings, pg: psycopg.Connection[Any]
) -> None:
    settings = bsettings
    with RedCredit(settings=settings) as rc, Syncer(settings) as syncer:
        rc.grant("cold-async", 60, grant_id="trial", category="free", expires_in=86_400)
        rc.grant(
            "cold-async", 80, grant_id="soon", effective_at=datetime.now(UTC) + timedelta(days=1)
        )
        rc.spend("cold-async", cost=25)
        before = rc.balance("cold-async")
        assert syncer.drain().caught_up
        assert evict_idle(settings, None, pg, idle=timedelta(0)).outcomes["evicted"] == 1
    async with AsyncRedCredit(settings=settings) as arc:
        after = await arc.balance("cold-async")
    assert dataclasses.replace(after, server_time_ms=before.server_time_ms) == before
    assert [(b.id, b.remaining, b.live) for b in after.buckets] == [
        ("trial", 35, True),
        ("base", 0, True),
        ("soon", 80, False),
    ]


class _LegacyLoader:
    """An application's own loader: an account of an older system, with a grant of its own."""

    def load(self, account: str) -> AccountSnapshot:
        promo = BucketSnapshot(
            id="legacy-promo",
            category="promotional",
            priority=50,
            remaining=50,
            granted=80,
            effective_ms=1_000,
            expires_ms=0,
            created_ms=1_000,
        )
        return AccountSnapshot(credits=150, chat_messages=0, plan="free", buckets=(promo,))


def test_an_account_opened_with_buckets_journals_them(
    bsettings: Settings, pg: psycopg.Connection[Any]
) -> None:
    settings = bsettings
    with RedCredit(settings=settings, loader=_LegacyLoader()) as rc, Syncer(settings) as syncer:
        assert rc.spend("migrated", cost=10).credits_remaining == 140
        assert syncer.drain().caught_up
        assert_buckets_persisted(rc, settings, pg, ["migrated"])
    assert _statuses(pg, settings, "migrated") == {"legacy-promo": ("live", 40)}
    (opened,) = _rows(
        pg, settings, "SELECT bucket_changes FROM {s}.ledger WHERE account = 'migrated' AND seq = 1"
    )
    assert opened == ([{"bucket": "legacy-promo", "delta": 50, "after": 50}],)


def test_reconcile_names_a_tampered_bucket(
    bsettings: Settings, pg: psycopg.Connection[Any]
) -> None:
    settings = bsettings
    with RedCredit(settings=settings) as rc, Syncer(settings) as syncer:
        rc.grant("tamper", 40, grant_id="gift", category="free")
        rc.grant("tamper", 60, grant_id="promo", category="promotional", expires_in=3600)
        rc.spend("tamper", cost=10)  # from promo, which expires first
        assert syncer.drain().caught_up
        assert reconcile(settings, None, pg).clean
        rc.spend("tamper", cost=5)  # journaled, not applied yet: still clean
        assert reconcile(settings, None, pg).clean
        assert syncer.drain().caught_up
    pg.execute(
        f'UPDATE "{settings.pg_schema}".buckets SET remaining = remaining + 7 '
        "WHERE account = 'tamper' AND bucket = 'gift'"
    )
    pg.execute(
        f"DELETE FROM \"{settings.pg_schema}\".buckets WHERE account = 'tamper' AND bucket = 'promo'"
    )
    report = reconcile(settings, None, pg, rechecks=0)
    problems = sorted(d.problem for d in report.drift if d.account == "tamper")
    assert len(problems) == 4, problems
    assert problems[0] == (
        "bucket 'gift' differs: remaining 40 in Redis, 47 in PostgreSQL and the journal"
    )
    assert problems[1].startswith("bucket 'promo' is in Redis (live, 45 left of 60")
    assert problems[2:] == [
        "ledger's changes of bucket 'gift' sum to 40, its buckets row holds 47 remaining",
        "ledger's changes of bucket 'promo' sum to 45, its buckets row holds 0 remaining",
    ]
    done = _cli(settings, "reconcile")
    assert done.returncode == 1
    assert "DRIFT 'tamper': bucket 'gift' differs" in done.stdout


def test_a_batch_delivered_again_changes_the_buckets_once(
    bsettings: Settings, pg: psycopg.Connection[Any]
) -> None:
    settings = bsettings
    with RedCredit(settings=settings) as rc, Syncer(settings) as syncer:
        for i in range(4):
            rc.grant("again", 25, grant_id=f"g-{i}", category="promotional", priority=i)
        for _ in range(6):
            rc.spend("again", cost=7)
        rc.void("again", "g-3")
        entries = syncer.read_batch()
        assert len(entries) == 12
        syncer.commit(entries)
        schema = settings.pg_schema
        before = pg.execute(f'SELECT * FROM "{schema}".buckets ORDER BY 1, 2').fetchall()
        ledger = pg.execute(f'SELECT * FROM "{schema}".ledger ORDER BY 1, 2').fetchall()
        # A crash between commit and acknowledgement delivers it again, in any order.
        for redelivered in (entries, list(reversed(entries)), entries[3:7]):
            with pg.transaction():
                assert apply_entries(pg, schema, redelivered) == set()
        assert pg.execute(f'SELECT * FROM "{schema}".buckets ORDER BY 1, 2').fetchall() == before
        assert pg.execute(f'SELECT * FROM "{schema}".ledger ORDER BY 1, 2').fetchall() == ledger
        assert _statuses(pg, settings, "again") == {
            "g-0": ("closed", 0),
            "g-1": ("live", 8),
            "g-2": ("live", 25),
            "g-3": ("closed", 0),
        }
        assert_buckets_persisted(rc, settings, pg, ["again"])


# --- a fork of an account with buckets, re-based ------------------------------------------------


def _lost_with_a_grant(rc: RedCredit) -> None:
    rc.grant("forked", 40, grant_id="gift", category="promotional")
    rc.spend("forked", cost=10)  # from the gift: PostgreSQL keeps it at 30


def _a_grant_on_the_fork(rc: RedCredit) -> None:
    rc.grant("forked", 25, grant_id="promo", category="promotional", expires_in=3600)
    rc.spend("forked", cost=5)  # from promo, which expires first
    rc.spend("steady", cost=2)


def test_a_re_based_account_has_redis_buckets_in_postgres(
    redis_factory: Callable[..., EmbeddedRedis],
    pg_settings: Settings,
    pg: psycopg.Connection[Any],
    tmp_path: Path,
) -> None:
    settings = make_settings(
        pg_settings.redis_url or "",
        pg_settings.key_prefix,
        free_credits=100,
        database_url=pg_settings.database_url,
        pg_schema=pg_settings.pg_schema,
        sync_claim_idle=pg_settings.sync_claim_idle,
        sync_interval=pg_settings.sync_interval,
    )
    forked = _fork(
        redis_factory, settings, tmp_path, lost=_lost_with_a_grant, on_the_fork=_a_grant_on_the_fork
    )
    try:
        assert forked.syncer.drain().caught_up
        assert forked.syncer.divergence.rebased == 1
        # Before the re-base PostgreSQL had the gift, which Redis's fork never saw.
        assert _statuses(pg, settings, "forked") == {"gift": ("closed", 0), "promo": ("live", 20)}
        client = redis.Redis.from_url(forked.server.url)
        assert assert_persisted_exactly(client, forked.settings, pg) == 3
        with RedCredit(settings=forked.settings) as rc:
            assert_buckets_persisted(rc, forked.settings, pg, ["forked", "steady"])
            assert {b.id: b.remaining for b in rc.balance("forked").buckets} == {
                "promo": 20,
                "base": rc.balance("forked").credits - 20,
            }
        client.close()
        (rebase,) = _rows(
            pg,
            settings,
            "SELECT bucket_changes FROM {s}.ledger WHERE account = 'forked' AND op = 'rebase'",
        )
        changes = {c["bucket"]: (c["delta"], c["after"]) for c in rebase[0]}
        assert (changes["gift"], changes["promo"]) == ((-30, 0), (20, 20))
    finally:
        forked.syncer.close()


# --- the upgrade ----------------------------------------------------------------------------


def test_an_upgrade_from_a_populated_0003_keeps_every_row(
    postgres_url: str, pg_schema: str
) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        with conn.transaction():
            prepare_migrations(conn, pg_schema)
            for migration in migrations()[:3]:
                apply_migration(conn, pg_schema, migration.version, migration.name, migration.text)
        s = f'"{pg_schema}"'
        conn.execute(
            f"INSERT INTO {s}.accounts (account, credits, chat_messages, plan, last_seq) VALUES "
            "('legacy', NULL, NULL, NULL, 0), ('paying', 90, 3, 'free', 2)"
        )
        conn.execute(
            f"INSERT INTO {s}.ledger (account, seq, op, credit_delta, chat_delta, credits_after, "
            "chat_after, plan, credits_used, feature, idempotency_key, server_time, stream_id) "
            "VALUES ('paying', 1, 'open', 100, 3, 100, 3, 'free', NULL, NULL, NULL, now(), '1-0'), "
            "('paying', 2, 'spend', -10, 0, 90, 3, 'free', 10, 'image', 'k-1', now(), '2-0')"
        )
        conn.execute(
            f"INSERT INTO {s}.rebases (account, fork_id, fork_seq, base_credits, base_chat, "
            "base_plan, until_id) VALUES ('paying', '3-0', 2, 100, 3, 'free', '3-0')"
        )
        conn.execute(
            f"INSERT INTO {s}.diverged_entries (account, seq, op, credit_delta, chat_delta, "
            "credits_after, chat_after, plan, server_time, stream_id, fork_id) "
            "VALUES ('paying', 2, 'spend', -5, 0, 95, 3, 'free', now(), '3-0', '3-0')"
        )
        tables = ("accounts", "ledger", "rebases", "diverged_entries")
        before = {
            t: conn.execute(f"SELECT * FROM {s}.{t} ORDER BY 1, 2").fetchall() for t in tables
        }
        assert sum(map(len, before.values())) == 6

        assert migrate(conn, pg_schema) == [4, 5, 6]

        for table in tables:
            after = conn.execute(f"SELECT * FROM {s}.{table} ORDER BY 1, 2").fetchall()
            assert [row[: len(before[table][0])] for row in after] == before[table], table
            # The columns 0004 adds are empty on the rows from before buckets.
            assert all(v is None for row in after for v in row[len(before[table][0]) :]), table
        assert conn.execute(f"SELECT count(*) FROM {s}.buckets").fetchone() == (0,)
        # An overdraft may now take credits below zero.
        conn.execute(f"UPDATE {s}.accounts SET credits = -5 WHERE account = 'paying'")
        defaults = AccountSnapshot(credits=0, chat_messages=0, plan="free")
        with conn.transaction():
            loaded = read_snapshot(
                conn, pg_schema, "paying", partition=0, window_ms=60_000, defaults=defaults
            )
        assert (loaded.credits, loaded.sequence, loaded.buckets) == (-5, 2, ())
