"""Reconcile finds drift, eviction keeps only what PostgreSQL lacks, durability waits."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta

import pytest

from redcredit import NotDurable, RedCredit, RedCreditError, Settings
from redcredit.ledger.evict import evict_idle
from redcredit.ledger.reconcile import reconcile
from redcredit.ledger.syncer import Syncer


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDCREDIT_")}
    env.update(
        REDCREDIT_REDIS_URL=settings.redis_url or "",
        REDCREDIT_DATABASE_URL=settings.database_url or "",
        REDCREDIT_KEY_PREFIX=settings.key_prefix,
        REDCREDIT_PG_SCHEMA=settings.pg_schema,
    )
    return subprocess.run(
        [sys.executable, "-m", "redcredit.cli", *args],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip


def test_reconcile_reports_injected_drift(pg_settings: Settings, redis_client, pg) -> None:
    with RedCredit(settings=pg_settings) as rc, Syncer(pg_settings) as syncer:
        for i in range(30):
            rc.spend(f"r-{i % 6}", cost=2)
        syncer.drain()
        rc.spend("r-0", cost=1)  # journaled, not yet persisted: still no drift
        assert reconcile(pg_settings, redis_client, pg).clean
        assert _cli(pg_settings, "reconcile").returncode == 0

        redis_client.hset(rc.engine.keys.for_account("r-3").hash, "c", 1_000)
        pg.execute(
            f'UPDATE "{pg_settings.pg_schema}".accounts SET credits = 3 WHERE account = %s',
            ["r-4"],
        )
        report = reconcile(pg_settings, redis_client, pg)
    assert {d.account for d in report.drift} == {"r-3", "r-4"}
    done = _cli(pg_settings, "reconcile")
    assert done.returncode == 1
    assert "DRIFT 'r-3'" in done.stdout and "DRIFT 'r-4'" in done.stdout


def test_cli_migrate_sync_status(pg_settings: Settings) -> None:
    with RedCredit(settings=pg_settings) as rc:
        rc.spend("cli", cost=1)
    assert "already up to date" in _cli(pg_settings, "migrate").stdout
    status = _cli(pg_settings, "sync", "--status")
    assert status.returncode == 0 and "waiting: 2" in status.stdout
    assert _cli(pg_settings, "sync", "--once").returncode == 0
    assert "waiting: 0" in _cli(pg_settings, "sync", "--status").stdout


def test_evict_only_synced_idle_accounts_without_holds(
    pg_settings: Settings, redis_client, pg
) -> None:
    with RedCredit(settings=pg_settings) as rc, Syncer(pg_settings) as syncer:
        rc.spend("synced", cost=10)
        rc.reserve("holding", 5)
        syncer.drain()
        rc.spend("unsynced", cost=1)
        report = evict_idle(pg_settings, redis_client, pg, idle=timedelta(0))
        assert report.outcomes == {"evicted": 1, "holds": 1, "unsynced": 1}
        recent = evict_idle(pg_settings, redis_client, pg, idle=timedelta(hours=1))
        assert recent.evicted == 0
        # Evicted means cold, not lost: the next call loads it from PostgreSQL.
        assert not redis_client.exists(rc.engine.keys.for_account("synced").hash)
        assert rc.balance("synced").credits == 90
        syncer.drain()
    assert reconcile(pg_settings, redis_client, pg).clean


def test_durability_aof_waits_for_the_disk(redis_factory, settings: Settings) -> None:
    server = redis_factory(appendonly=True)
    durable = settings.model_copy(update={"redis_url": server.url, "durability": "aof"})
    with RedCredit(settings=durable) as rc:
        assert rc.spend("safe", cost=1).credits_remaining == 99
        reservation = rc.reserve("safe", 10)
        assert rc.settle(reservation, 4).charged == 4
        rc.redis.script_flush()
        assert rc.spend("safe", cost=1).credits_remaining == 94


def test_durability_replica_not_confirmed_is_not_durable(
    redis_url: str, settings: Settings
) -> None:
    durable = settings.model_copy(
        update={"durability": "replica", "durability_timeout": timedelta(milliseconds=100)}
    )
    with RedCredit(settings=durable) as rc:
        # No replica answers: the change is applied, but the caller is told it
        # may not survive a failover.
        with pytest.raises(NotDurable):
            rc.grant("lonely", 5, idempotency_key="g-1")
        assert rc.balance("lonely").credits == 105


def test_durability_refused_without_aof(redis_factory, settings: Settings) -> None:
    server = redis_factory(appendonly=False)
    durable = settings.model_copy(update={"redis_url": server.url, "durability": "aof"})
    with RedCredit(settings=durable) as rc, pytest.raises(RedCreditError, match="appendonly"):
        rc.spend("unsafe", cost=1)
