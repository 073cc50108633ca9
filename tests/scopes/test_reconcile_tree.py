"""Reconcile compares each member's place in its tree and its cap: a clean tree is clean,
a parent, cap or cap use changed on either side is a problem named for its account."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from redcredit import Cap, RedCredit, Scope, Settings
from redcredit.ledger.reconcile import Drift, reconcile
from redcredit.ledger.syncer import Syncer

from .conftest import WHERE, make_settings

ALICE = Scope("acme", "research", "alice")
KEY = ALICE.child("key-9")
WEEK = 7 * 24 * 3600 * 1000


@pytest.fixture(params=WHERE, ids=["one-node", "cluster"])
def tsettings(request: pytest.FixtureRequest, pg_settings: Settings) -> Settings:
    return make_settings(
        request.getfixturevalue(request.param),
        pg_settings.key_prefix,
        database_url=pg_settings.database_url,
        pg_schema=pg_settings.pg_schema,
        sync_claim_idle=pg_settings.sync_claim_idle,
        sync_interval=pg_settings.sync_interval,
        sync_batch_size=pg_settings.sync_batch_size,
    )


def _drift(settings: Settings, pg: psycopg.Connection[Any]) -> list[Drift]:
    return reconcile(settings, None, pg, rechecks=0).drift


def test_a_tree_reconciles_and_every_change_of_place_or_cap_is_named(
    tsettings: Settings, pg: psycopg.Connection[Any]
) -> None:
    settings, schema = tsettings, f'"{tsettings.pg_schema}"'
    with RedCredit(settings=settings) as rc, Syncer(settings) as syncer:
        for level in (Scope("acme", "research"), ALICE, KEY):
            rc.attach(level)
        rc.grant("acme", 1_000)
        rc.set_cap(ALICE, Cap(credits=100, period=timedelta(days=7)))
        rc.spend(KEY, cost=30)
        rc.set_cap(Scope("acme", "research"), Cap(chat_messages=5, period="month"))
        assert syncer.drain().caught_up
        assert _drift(settings, pg) == []
        # Journaled, not yet in PostgreSQL: a new member, a cap's use, a cap removed.
        rc.attach(ALICE.child("key-10"))
        rc.spend(KEY, cost=20)
        rc.set_cap(Scope("acme", "research"), None)
        assert _drift(settings, pg) == []
        assert syncer.drain().caught_up
        assert _drift(settings, pg) == []
        # Set again in the same window: the removed cap's use went with it.
        rc.set_cap(Scope("acme", "research"), Cap(chat_messages=5, period="month"))
        assert syncer.drain().caught_up
        assert _drift(settings, pg) == []

        alice = rc.engine.keys.for_account("alice", "acme").hash
        client = rc.redis

        def tampered(field: str, value: str) -> list[Drift]:
            before = client.hget(alice, field)
            client.hset(alice, field, value)
            try:
                return _drift(settings, pg)
            finally:
                assert before is not None
                client.hset(alice, field, before)

        assert tampered("P", "acme") == [
            Drift(
                "alice",
                "tree place differs: under 'acme' in 'acme''s tree in Redis, under 'research' "
                "in 'acme''s tree in PostgreSQL and the journal",
            )
        ]
        assert tampered("K", f"80,-1,{WEEK}") == [
            Drift(
                "alice",
                f"cap differs: '80,-1,{WEEK}' in Redis, '100,-1,{WEEK}' in PostgreSQL and the "
                "journal",
            )
        ]
        [drift] = tampered("Kc", "10")
        assert drift.account == "alice" and drift.problem.startswith("cap use in the window")
        assert drift.problem.endswith(
            "differs: 10 credits and 0 chat messages in Redis, 50 and 0 in PostgreSQL and the "
            "journal"
        )
        # A use recorded for an earlier window is none in this one.
        [drift] = tampered("Kw", "0")
        assert "0 credits and 0 chat messages in Redis, 50 and 0 in" in drift.problem
        assert _drift(settings, pg) == []

        def row_tampered(change: str) -> list[Drift]:
            with pg.transaction():
                pg.execute("SAVEPOINT tamper")
                pg.execute(f"UPDATE {schema}.accounts SET {change} WHERE account = 'alice'")
                found = _drift(settings, pg)
                pg.execute("ROLLBACK TO SAVEPOINT tamper")
            return found

        problems: dict[str, Callable[[str], bool]] = {
            "parent = 'acme'": lambda p: p.startswith("tree place differs"),
            "root = 'other'": lambda p: "in 'other''s tree in PostgreSQL" in p,
            "cap = NULL": lambda p: p.startswith("cap differs: '100,-1,") and "none in" in p,
            "cap_credits = 49": lambda p: "50 credits and 0 chat messages in Redis, 49 and" in p,
        }
        for change, expected in problems.items():
            [drift] = row_tampered(change)
            assert drift.account == "alice" and expected(drift.problem), (change, drift)
        assert _drift(settings, pg) == []
