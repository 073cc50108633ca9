"""The upgrade from the previous release (044d1b8), one piece at a time.

New clients and a new syncer before the migration, the migration beside a
loader, old clients finishing what new ones began; and, expected to fail
until fixed, the two ways the releases disagree.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from redcredit import RedCredit, ReservationRef
from redcredit.backends.migrate import migrate
from redcredit.ledger.syncer import Syncer
from tests.support.helpers import assert_persisted_exactly
from tests.support.upgrade import (
    OPENING_CREDITS,
    Deployment,
    schema_at_0003,
    upgrade_settings,
)


def test_a_new_client_loads_accounts_from_a_schema_before_0004(
    postgres_url: str, pg_schema: str, redis_url: str, prefix: str
) -> None:
    """New clients may start before `redcredit migrate`: the old schema has no buckets to load."""
    schema_at_0003(postgres_url, pg_schema)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(
            f'INSERT INTO "{pg_schema}".accounts (account, credits, chat_messages, plan, last_seq) '
            "VALUES ('cold', 70, 4, 'free', 0)"
        )
    settings = upgrade_settings(redis_url, prefix, database_url=postgres_url, pg_schema=pg_schema)
    with RedCredit(settings=settings) as rc:
        balance = rc.balance("cold")
    assert (balance.credits, balance.chat_messages) == (70, 4)
    assert [(b.id, b.remaining) for b in balance.buckets] == [("base", 70)]


def test_old_clients_finish_what_new_clients_began(
    previous_release: Path, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """The other way round: a retry or a settle routed to a pod still on the old release."""
    dep = Deployment(upgrade_settings(redis_url, prefix), previous_release, tmp_path)
    with RedCredit(settings=dep.settings) as rc:
        spent = rc.spend("n", cost=7, idempotency_key="v2-spend")
        held = rc.reserve("n", 5, ttl=600, idempotency_key="v2-reserve")
        other = rc.reserve("n", 9, ttl=600)
        rc.set_plan("q", "paid")
        unlimited = rc.spend("q", cost=3, idempotency_key="v2-paid")
        replies = dep.old(
            "calls",
            calls=[
                {
                    "op": "spend",
                    "args": ["n"],
                    "kwargs": {"cost": 7, "idempotency_key": "v2-spend"},
                },
                {
                    "op": "reserve",
                    "args": ["n", 5],
                    "kwargs": {"ttl": 600, "idempotency_key": "v2-reserve"},
                },
                {"op": "settle", "args": [["n", held.id], 8]},  # 3 past the hold
                {"op": "release", "args": [["n", other.id]]},
                {"op": "spend", "args": ["q"], "kwargs": {"cost": 3, "idempotency_key": "v2-paid"}},
            ],
        )["results"]
        balance = rc.balance("n")
    again, reserved, settled, released, paid = replies
    assert (again["replayed"], again["sequence"]) == (True, spent.sequence)
    assert again["credits_remaining"] == spent.credits_remaining == OPENING_CREDITS - 7
    assert (reserved["replayed"], reserved["id"]) == (True, held.id)
    assert (settled["outcome"], settled["charged"]) == ("settled", 8)
    assert (released["outcome"], released["charged"]) == ("released", 0)
    assert (paid["replayed"], paid["credits_remaining"]) == (True, None)
    assert unlimited.credits_remaining is None
    assert (balance.credits, balance.held) == (OPENING_CREDITS - 7 - 8, 0)
    assert [(b.id, b.remaining) for b in balance.buckets] == [("base", balance.credits)]


def test_the_migration_never_deadlocks_with_a_loader_beside_it(
    postgres_url: str, pg_schema: str
) -> None:
    """A loader reads accounts, then the ledger; 0004 locks the ledger, then accounts.

    The migration, holding the ledger's lock and waiting for the accounts', gives
    up before the server would break the deadlock by failing one of them, and
    applies once the loader is through.
    """
    schema_at_0003(postgres_url, pg_schema)
    s = f'"{pg_schema}"'
    with (
        psycopg.connect(postgres_url) as loader,
        psycopg.connect(postgres_url, autocommit=True) as watch,
    ):
        loader.execute(f"SELECT count(*) FROM {s}.accounts").fetchone()  # its transaction is open

        def migrated() -> list[int]:
            with psycopg.connect(postgres_url, autocommit=True) as conn:
                return migrate(conn, pg_schema)

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(migrated)
            waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = %s::regclass"
            deadline = time.monotonic() + 20
            while watch.execute(waiting, [f"{s}.accounts"]).fetchone() != (1,):
                assert time.monotonic() < deadline, "the migration never waited for accounts"
                time.sleep(0.005)
            # The loader's second read, while the migration holds the ledger's lock.
            loader.execute(f"SELECT count(*) FROM {s}.ledger").fetchone()
            loader.commit()
            assert running.result(timeout=60) == [4, 5, 6]


def test_a_new_syncer_started_before_the_migration_waits_for_it(
    postgres_url: str,
    pg_schema: str,
    redis_client: redis.Redis,
    redis_url: str,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    schema_at_0003(postgres_url, pg_schema)
    settings = upgrade_settings(
        redis_url,
        prefix,
        database_url=postgres_url,
        pg_schema=pg_schema,
        sync_retry_max=timedelta(milliseconds=200),
    )
    with RedCredit(settings=settings) as rc:
        for i in range(20):
            rc.spend(f"early-{i % 5}", cost=1)
    with Syncer(settings) as syncer, psycopg.connect(postgres_url, autocommit=True) as pg:
        with caplog.at_level(logging.WARNING, logger="redcredit.ledger.syncer"):
            lag = syncer.drain(timeout_s=1)
        # Nothing written, nothing acknowledged: every entry waits in Redis.
        assert (lag.caught_up, lag.entries) == (False, 25)
        assert "is the schema migrated? `redcredit migrate`" in caplog.text
        assert migrate(pg, pg_schema) == [4, 5, 6]
        assert syncer.drain(timeout_s=30).caught_up
        assert assert_persisted_exactly(redis_client, settings, pg) == 5


def test_an_old_keyed_call_on_a_bypassing_plan_replays_as_unlimited(
    previous_release: Path, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    dep = Deployment(upgrade_settings(redis_url, prefix), previous_release, tmp_path)
    accounts = [f"p-{i}" for i in range(4)]
    populated = dep.old("populate", accounts=accounts, paid=accounts, seed=3)
    replays = []
    with RedCredit(settings=dep.settings) as rc:
        for call in populated["keyed"]:
            account, key, args = call["account"], call["key"], call["args"]
            if call["op"] == "spend":
                again: Any = rc.spend(account, cost=args["cost"], idempotency_key=key)
            elif call["op"] == "settle":
                ref = ReservationRef(account, args["id"])
                again = rc.settle(ref, args["actual"], idempotency_key=key)
            else:
                continue
            assert again.replayed
            replays.append(
                (call["op"], call["result"]["credits_remaining"], again.credits_remaining)
            )
    assert {op for op, _, _ in replays} == {"spend", "settle"}
    # The first reply said unlimited (None); so must its replay.
    assert [(op, first) for op, first, _ in replays] == [(op, None) for op, _, _ in replays]
    assert [(op, again) for op, _, again in replays] == [(op, None) for op, _, _ in replays]


DAY_MS = 86_400_000
DAILY = {"daily": {"refill": {"credits": 100, "every": "P1D"}}}


def test_an_old_client_after_a_new_refill_keeps_the_buckets_summing_to_the_balance(
    previous_release: Path, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """A plan that refills: the rolling upgrade meets a refill period's start."""
    plans = {**DAILY, "free": {}, "paid": {"bypass": True}, "demo": {"bypass": True}}
    settings = upgrade_settings(redis_url, prefix, free_credits=0, plans=plans)
    dep = Deployment(
        settings, previous_release, tmp_path, more_env={"REDCREDIT_PLANS": json.dumps(plans)}
    )
    first_day = DAY_MS + 1_000
    dep.old(
        "calls",
        calls=[
            {"op": "set_plan", "args": ["r", "daily"]},
            {"op": "balance", "args": ["r"]},  # the first touch starts the refill clock
            {"op": "balance", "args": ["r"], "offset_ms": first_day},  # refilled to 100
            {"op": "spend", "args": ["r"], "kwargs": {"cost": 80}, "offset_ms": first_day},
        ],
    )
    with RedCredit(settings=settings) as rc:
        rc.engine.clock_offset_ms = 2 * DAY_MS + 2_000
        topped_up = rc.balance("r")  # the new scripts' refill: 80 into the refill bucket
        assert [(b.id, b.remaining) for b in topped_up.buckets] == [("refill", 80), ("base", 20)]
        (spent,) = dep.old(
            "calls",
            calls=[{"op": "spend", "args": ["r"], "kwargs": {"cost": 90}, "offset_ms": 2 * DAY_MS}],
        )["results"]
        assert spent["credits_remaining"] == 10
        after = rc.balance("r")
    assert after.credits == 10
    assert sum(b.remaining for b in after.buckets) == after.credits
