"""A move in PostgreSQL: the account row at its new place with the same balances and
buckets, the ledger's sums unchanged, each parent's count of children, reconcile clean
after the drain (and naming a move left half-done), and an evicted account reloading
at its new place."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import psycopg
import pytest

from redcredit import AlreadyApplied, MoveRefused, RedCredit, Scope, Settings
from redcredit.ledger.evict import evict_idle
from redcredit.ledger.reconcile import reconcile
from redcredit.ledger.syncer import Syncer

from .conftest import WHERE, make_settings, tree

ALICE = Scope("acme", "research", "alice")
OPS = Scope("globex", "ops")


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


def _sums(pg: psycopg.Connection[Any], settings: Settings) -> list[Any]:
    return _rows(
        pg,
        settings,
        "SELECT account, sum(credit_delta)::bigint, sum(chat_delta)::bigint FROM {s}.ledger "
        "GROUP BY account ORDER BY account",
    )


def test_a_move_reaches_postgresql_and_an_evicted_account_reloads_there(
    tsettings: Settings, pg: psycopg.Connection[Any]
) -> None:
    settings = tsettings
    with RedCredit(settings=settings) as rc, Syncer(settings) as syncer:
        tree(rc, ("acme", "research"), ALICE.path, OPS.path)
        rc.grant(ALICE, 80, chat_messages=2)
        rc.grant(ALICE, 20, grant_id="welcome", category="promotional")
        rc.spend(ALICE, cost=30, idempotency_key="s-1")
        assert syncer.drain().caught_up
        sums = _sums(pg, settings)
        buckets = _rows(pg, settings, "SELECT bucket, remaining FROM {s}.buckets ORDER BY 1")

        rc.move("alice", OPS, idempotency_key="move-1")
        assert syncer.drain().caught_up
        assert _sums(pg, settings) == sums
        assert (
            _rows(pg, settings, "SELECT bucket, remaining FROM {s}.buckets ORDER BY 1") == buckets
        )
        rows = _rows(
            pg,
            settings,
            "SELECT account, parent, root, credits, chat_messages, children FROM {s}.accounts "
            "ORDER BY account",
        )
        assert rows == [
            ("acme", None, None, 0, 0, 1),
            ("alice", "ops", "globex", 70, 2, None),  # NULL: none counted
            ("globex", None, None, 0, 0, 1),
            ("ops", "globex", "globex", 0, 0, 1),
            ("research", "acme", "acme", 0, 0, 0),
        ]
        ops = _rows(pg, settings, "SELECT op FROM {s}.ledger WHERE account = 'alice' ORDER BY seq")
        assert [op for (op,) in ops][-2:] == ["move_out", "move_in"]
        assert reconcile(settings, None, pg).drift == []

        # Evicted, every level reloads in its place: alice under ops, ops with its child.
        evicted = evict_idle(settings, None, pg, idle=timedelta(0))
        assert evicted.outcomes["evicted"] >= 3
        new = OPS.child("alice")
        assert rc.balance(new).credits == 70
        assert [b.id for b in rc.balance(new).buckets] == ["base"]
        with pytest.raises(MoveRefused) as parent:
            rc.move("ops", None, idempotency_key="move-2")
        assert parent.value.reason == "children"
        # Reloaded from PostgreSQL, its keyed calls come along: not applied twice.
        with pytest.raises(AlreadyApplied):
            rc.spend(new, cost=30, idempotency_key="s-1")
        rc.move("research", OPS.child("alice"), idempotency_key="move-3")
        assert syncer.drain().caught_up
        assert reconcile(settings, None, pg).drift == []


def test_reconcile_names_a_move_left_half_done(
    tsettings: Settings, pg: psycopg.Connection[Any]
) -> None:
    settings = tsettings
    with RedCredit(settings=settings) as rc, Syncer(settings) as syncer:
        tree(rc, ("acme", "research"), ALICE.path, OPS.path)
        rc.grant(ALICE, 10)
        rc.run(rc.engine.move_out("alice", OPS, idempotency_key="half"))
        assert syncer.drain().caught_up
        report = reconcile(settings, None, pg, rechecks=0)
        problems = [d.problem for d in report.drift if d.account == "alice"]
        assert len(problems) == 1 and "half-done" in problems[0] and "half" in problems[0]
        rc.move("alice", OPS, idempotency_key="half")
        assert syncer.drain().caught_up
        assert reconcile(settings, None, pg).drift == []
        assert rc.balance(OPS.child("alice")).credits == 10
