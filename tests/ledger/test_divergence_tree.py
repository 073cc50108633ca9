"""A tree whose history in Redis forked from PostgreSQL's is re-based level by level, in its
root's partition: every level's balances, buckets, place and cap's use are PostgreSQL's plus
the fork's own change, a call retried across the fork counts once at every level, and the
member is still reached on its path.

The fork is real, as in test_divergence.py: Redis restored from an older copy of its
append-only file while PostgreSQL kept what came after.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from redcredit import Cap, RedCredit, Scope, ScopeRequired, Settings
from redcredit.ledger.reconcile import reconcile
from redcredit.ledger.syncer import Syncer
from redcredit.servers.redis import EmbeddedRedis

TEAM = Scope("acme", "research")
ALICE = TEAM.child("alice")
WEEK = timedelta(days=7)


def _copy(source: Path, target: Path) -> None:
    for item in target.iterdir():
        shutil.rmtree(item) if item.is_dir() else item.unlink()
    shutil.copytree(source, target, dirs_exist_ok=True)


def _hash(rc: RedCredit, account: str) -> dict[str, str]:
    key = rc.engine.keys.for_account(account, "acme").hash
    raw = rc.redis.hgetall(key)
    return {k.decode(): v.decode(errors="replace") for k, v in raw.items()}  # type: ignore[union-attr]


def _row(pg: psycopg.Connection[Any], schema: str, account: str) -> tuple[Any, ...]:
    row = pg.execute(
        f"SELECT credits, chat_messages, last_seq, parent, root, cap, cap_window, cap_credits, "
        f'cap_messages FROM "{schema}".accounts WHERE account = %s',
        [account],
    ).fetchone()
    assert row is not None
    return tuple(row)


def test_a_forked_member_is_re_based_in_place_with_its_cap(
    redis_factory: Callable[..., EmbeddedRedis],
    pg_settings: Settings,
    pg: psycopg.Connection[Any],
    tmp_path: Path,
) -> None:
    server = redis_factory(appendonly=True, extra_args=["--appendfsync", "always"])
    settings = pg_settings.model_copy(
        update={"redis_url": server.url, "sync_waits_for_aof": True, "free_credits": 0}
    )
    schema = settings.pg_schema
    syncer = Syncer(settings)
    try:
        with RedCredit(settings=settings) as rc:
            rc.attach(TEAM)
            rc.attach(ALICE)
            rc.grant("acme", 1_000, idempotency_key="invoice-1")
            rc.grant(
                ALICE,
                40,
                grant_id="gift-1",
                idempotency_key="gift-1",
                expires_in=timedelta(days=30),
            )
            rc.set_cap(ALICE, Cap(credits=500, period=WEEK))
            rc.spend(ALICE, cost=10)  # alice's own credits: 30 left, cap use 10
            assert syncer.drain().caught_up
            server.kill()
            _copy(server.data_dir, tmp_path)  # the older copy
            server.restart()
            # PostgreSQL keeps these; the copy never saw them.
            rc.spend(ALICE, cost=50, idempotency_key="call-1")  # 30 from alice, 20 from acme
            rc.spend(ALICE, cost=7)  # acme pays
            assert syncer.drain().caught_up
            server.kill()
            _copy(tmp_path, server.data_dir)
            server.restart()
            # On the fork: the caller retries call-1 (the copy has never seen its key), and
            # makes a new call.
            assert not rc.spend(ALICE, cost=50, idempotency_key="call-1").replayed
            rc.spend(ALICE, cost=5)

        for _ in range(5):
            assert syncer.drain().caught_up
            if syncer.divergence.rebased >= 2:
                break
        assert syncer.drain().caught_up

        with RedCredit(settings=settings) as rc:
            # Every charge once, call-1 once: 1000 - 20 - 7 - 5 at acme, alice's 40 - 10 - 30.
            assert rc.balance("acme").credits == 968
            assert rc.balance(ALICE).credits == 0
            alice = _hash(rc, "alice")
            assert (alice["P"], alice["R"], alice["K"]) == ("research", "acme", "500,-1,604800000")
            # Cap use: 10 + 50 + 7 on PostgreSQL's side, 5 on the fork's.
            assert alice["Kc"] == "72"
            for account in ("acme", "research", "alice"):
                fields = _hash(rc, account)
                row = _row(pg, schema, account)
                assert row[:5] == (
                    int(fields["c"]),
                    int(fields["m"]),
                    int(fields["s"]),
                    fields.get("P"),
                    fields.get("R"),
                ), account
                if "K" in fields:
                    assert row[5:] == (
                        fields["K"],
                        int(fields["Kw"]),
                        int(fields["Kc"]),
                        int(fields["Km"]),
                    ), account
            assert [b.remaining for b in rc.balance(ALICE).buckets if b.id == "gift-1"] in ([], [0])
            report = reconcile(settings, None, pg)
            assert report.drift == [], report.drift
            assert set(report.rebased) >= {"alice", "acme"}

            # Still on its path, in its root's partition, its cap counting.
            assert rc.spend(ALICE, cost=50, idempotency_key="call-1").replayed
            rc.spend(ALICE, cost=3)
            assert _hash(rc, "alice")["Kc"] == "75"
            with pytest.raises(ScopeRequired):
                rc.spend("alice", cost=1)
            assert rc.balance("acme").credits == 965
        assert syncer.drain().caught_up
        assert reconcile(settings, None, pg).drift == []
        ledger = pg.execute(
            f'SELECT COALESCE(SUM(credit_delta), 0) FROM "{schema}".ledger WHERE account = %s',
            ["acme"],
        ).fetchone()
        assert ledger == (965,)
    finally:
        syncer.close()
        client = redis.Redis.from_url(server.url)
        client.close()
