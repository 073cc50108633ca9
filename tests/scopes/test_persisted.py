"""A tree in PostgreSQL: where each account sits, its cap and the cap's use, and the
ledger's level of each row; an evicted member reloads in its place, reconcile is clean."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import psycopg
import pytest

from redcredit import Cap, CapReached, RedCredit, Scope, Settings
from redcredit.ledger.evict import evict_idle
from redcredit.ledger.reconcile import reconcile
from redcredit.ledger.syncer import Syncer

from .conftest import WHERE, make_settings

ALICE = Scope("acme", "research", "alice")
KEY = ALICE.child("key-9")


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


def _rows(pg: psycopg.Connection[Any], settings: Settings, query: str) -> list[Any]:
    return pg.execute(query.replace("{s}", f'"{settings.pg_schema}"')).fetchall()


def test_the_tree_and_its_caps_are_persisted_and_reload(
    tsettings: Settings, pg: psycopg.Connection[Any]
) -> None:
    settings = tsettings
    with RedCredit(settings=settings) as rc, Syncer(settings) as syncer:
        for level in (Scope("acme", "research"), ALICE, KEY):
            rc.attach(level)
        rc.grant("acme", 1_000)
        rc.set_cap(ALICE, Cap(credits=100, period=timedelta(days=7)))
        rc.spend(KEY, cost=60, idempotency_key="k-1")
        assert syncer.drain().caught_up

        accounts = _rows(
            pg,
            settings,
            "SELECT account, parent, root, cap, cap_credits FROM {s}.accounts "
            "WHERE root = 'acme' OR account = 'acme' ORDER BY account",
        )
        assert accounts == [
            ("acme", None, None, None, None),
            ("alice", "research", "acme", "100,-1,604800000", 60),
            ("key-9", "alice", "acme", None, None),
            ("research", "acme", "acme", None, None),
        ]
        spends = _rows(
            pg,
            settings,
            "SELECT account, level, via, credit_delta FROM {s}.ledger WHERE op = 'spend' "
            "ORDER BY level",
        )
        assert spends == [
            ("acme", 1, "key-9", -60),
            ("alice", 3, "key-9", 0),
            ("key-9", 4, None, 0),
        ]

        # Every level evicted: each reloads in its place, with its cap's use.
        before = {a: rc.balance(Scope(*p)) for a, p in _levels().items()}
        evicted = evict_idle(settings, None, pg, idle=timedelta(0))
        assert evicted.outcomes["evicted"] == 4
        with pytest.raises(CapReached):
            rc.spend(KEY, cost=50)
        for account, path in _levels().items():
            after = rc.balance(Scope(*path))
            assert (after.credits, after.plan) == (before[account].credits, before[account].plan)
        assert rc.spend(KEY, cost=60, idempotency_key="k-1").replayed
        rc.spend(KEY, cost=40)
        assert syncer.drain().caught_up
        report = reconcile(settings, None, pg)
        assert report.drift == [], report.drift
        assert rc.balance("acme").credits == 900


def _levels() -> dict[str, tuple[str, ...]]:
    return {
        "acme": ("acme",),
        "research": ("acme", "research"),
        "alice": ALICE.path,
        "key-9": KEY.path,
    }
