"""The upgrade from the previous release (044d1b8, before credit buckets), under traffic.

A deployment is populated by the previous release's own code, extracted
from git and run in processes of its own (its schema at migration 0003, its
syncer drained, some accounts evicted). Then, on one Redis server and on a
real three-primary cluster, the new code takes over while both releases'
clients spend side by side against the same Redis: the new ``redcredit
migrate`` runs in the middle (new clients load cold accounts before it), then
the new syncer, with the old one still draining beside it for a while.
At the end no credit is lost or doubled (per account, the opening balance
plus what every successful call returned moving), every old balance is one
never-expiring base bucket, old keyed calls replay, each keyed call is in
the ledger once, and PostgreSQL agrees with Redis.

``REDCREDIT_UPGRADE_LONG=1`` runs more accounts for longer.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import defaultdict
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from redis.cluster import RedisCluster

from redcredit import (
    AsyncRedCredit,
    InsufficientFunds,
    RedCredit,
    ReservationRef,
    Settings,
)
from redcredit.ledger.syncer import Syncer
from tests.ledger.test_buckets_ledger import assert_buckets_persisted
from tests.ledger.test_reconcile_evict import _cli
from tests.support.helpers import assert_persisted_exactly
from tests.support.upgrade import (
    OPENING_CHAT,
    OPENING_CREDITS,
    Deployment,
    upgrade_settings,
)

LONG = os.environ.get("REDCREDIT_UPGRADE_LONG") == "1"
ACCOUNTS = 1_500 if LONG else 240
ROLLING_S = 40.0 if LONG else 6.0
NEW_WORKERS = 16


def _accounts() -> tuple[list[str], list[str]]:
    accounts = [f"u-{i}" for i in range(ACCOUNTS)]
    return accounts, accounts[::10]  # every tenth on a bypassing plan


@pytest.fixture(params=["redis_url", "three_primary_cluster_url"], ids=["one-node", "cluster"])
def deployment(
    request: pytest.FixtureRequest,
    previous_release: Path,
    postgres_url: str,
    pg_schema: str,
    prefix: str,
    tmp_path: Path,
) -> Deployment:
    settings = upgrade_settings(
        request.getfixturevalue(request.param),
        prefix,
        database_url=postgres_url,
        pg_schema=pg_schema,
        sync_claim_idle=timedelta(seconds=1),
        sync_interval=timedelta(milliseconds=50),
        sync_batch_size=500,
    )
    return Deployment(settings, previous_release, tmp_path)


def _populate_v1(dep: Deployment) -> dict[str, Any]:
    """The previous release's deployment: schema, traffic, a drained journal, cold accounts."""
    accounts, paid = _accounts()
    migrated = dep.old_cli("migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert "migrations applied: 1, 2, 3" in migrated.stdout
    populated = dep.old("populate", accounts=accounts, paid=paid, seed=1)
    assert dep.old_cli("sync", "--once", "--timeout", "60").returncode == 0
    evicted = dep.old("evict")["outcomes"]
    assert evicted["evicted"] > ACCOUNTS // 2, evicted
    # Two thirds come back through the old loader; the rest stay in PostgreSQL only.
    warm = [a for i, a in enumerate(accounts) if i % 3]
    dep.old("spend", accounts=warm, paid=paid, seed=2, seconds=60, calls=ACCOUNTS)
    assert dep.old_cli("sync", "--once", "--timeout", "60").returncode == 0
    return populated


# --- the new code's traffic ---------------------------------------------------------------------


async def _new_spender(
    arc: AsyncRedCredit, dep: Deployment, worker: int, stop: asyncio.Event
) -> int:
    accounts, paid = _accounts()
    bypass = set(paid)
    rng = random.Random(1000 + worker)
    calls = 0
    while not stop.is_set():
        account = rng.choice(accounts)
        spends = account not in bypass
        kind = rng.random()
        calls += 1
        try:
            if kind < 0.5:
                cost = rng.randint(1, 4)
                key = f"v2-{worker}-{calls}" if kind < 0.25 else None
                done = await arc.spend(account, cost=cost, idempotency_key=key)
                if spends:
                    dep.move(account, -cost)
                if key is not None:
                    dep.keys.append(key)
                    again = await arc.spend(account, cost=cost, idempotency_key=key)
                    assert again.replayed and again.sequence == done.sequence
            elif kind < 0.65:
                await arc.chat_turn(account, cost=1, messages=1)
                if spends:
                    dep.move(account, -1, -1)
            elif kind < 0.75:
                await arc.grant(account, 2)
                dep.move(account, 2)
            else:
                held = await arc.reserve(account, 3, ttl=30)
                if kind < 0.9:
                    settled = await arc.settle(held, rng.randint(0, 5))
                    if spends:
                        dep.move(account, -settled.charged)
                else:
                    await arc.release(held)
        except InsufficientFunds:
            pass
        await asyncio.sleep(0.005)  # a busy service, not a benchmark
    return calls


async def _in_chunks(calls: list[Coroutine[Any, Any, Any]], size: int = 64) -> list[Any]:
    """Concurrent, as a busy service sends them, a chunk at a time."""
    done: list[Any] = []
    for start in range(0, len(calls), size):
        done += await asyncio.gather(*calls[start : start + size])
    return done


async def _replay(arc: AsyncRedCredit, call: dict[str, Any]) -> None:
    account, key, args, first = call["account"], call["key"], call["args"], call["result"]
    op = call["op"]
    again: Any
    if op == "spend":
        again = await arc.spend(account, cost=args["cost"], idempotency_key=key)
    elif op == "chat_turn":
        again = await arc.chat_turn(
            account, cost=args["cost"], messages=args["messages"], idempotency_key=key
        )
    elif op == "grant":
        again = await arc.grant(account, args["credits"], idempotency_key=key)
    elif op == "reserve":
        again = await arc.reserve(account, args["amount"], ttl=args["ttl"], idempotency_key=key)
        assert again.id == first["id"], call
    else:
        assert op == "settle", call
        ref = ReservationRef(account, args["id"])
        again = await arc.settle(ref, args["actual"], idempotency_key=key)
        assert (again.outcome, again.charged) == (first["outcome"], first["charged"]), call
    assert again.replayed, call
    assert again.sequence == first["sequence"], call
    for name in ("credits_remaining", "chat_messages_remaining", "credits", "chat_messages"):
        if name in first:
            assert getattr(again, name) == first[name], (name, call)


async def _replay_old_keyed_calls(arc: AsyncRedCredit, keyed: list[dict[str, Any]]) -> int:
    """The old code's keyed calls, sent again by the new code: replays, applied once."""
    _, paid = _accounts()
    # On a bypassing plan: test_an_old_keyed_call_on_a_bypassing_plan_replays_as_unlimited.
    calls = [_replay(arc, call) for call in keyed if call["account"] not in paid]
    return len(await _in_chunks(calls))


async def _close_old_reservation(
    arc: AsyncRedCredit, dep: Deployment, i: int, held: dict[str, Any]
) -> None:
    _, paid = _accounts()
    ref = ReservationRef(held["account"], held["id"])
    if i % 4 == 0:
        await arc.release(ref)
        return
    if i % 4 == 1:
        renewed = await arc.extend(ref, ttl=120)
        assert renewed.amount == held["amount"]
    key = f"v2-settle-{held['id']}" if i % 2 else None
    settled = await arc.settle(ref, 2 + i % 5, idempotency_key=key)
    assert settled.outcome == "settled"
    if held["account"] not in paid:
        dep.move(held["account"], -settled.charged)
    if key is not None:
        dep.keys.append(key)


async def _release_lapsed(arc: AsyncRedCredit, held: dict[str, Any]) -> None:
    # Long lapsed: a release still closes it, and it held nothing since its deadline.
    released = await arc.release(ReservationRef(held["account"], held["id"]))
    assert (released.outcome, released.charged) == ("released", 0)


async def _close_old_reservations(
    arc: AsyncRedCredit, dep: Deployment, populated: dict[str, Any]
) -> None:
    """The old code's holds, ended by the new code: settled, released, renewed, or lapsed."""
    await _in_chunks(
        [_close_old_reservation(arc, dep, i, held) for i, held in enumerate(populated["live"])]
        + [_release_lapsed(arc, held) for held in populated["lapsing"]]
    )


async def _rolling_upgrade(dep: Deployment, populated: dict[str, Any]) -> Syncer:
    """Both releases' clients against one Redis; the schema migrated and the syncers swapped meanwhile."""
    accounts, paid = _accounts()
    stop_file = dep.workdir / "stop"
    old_spenders = [
        await asyncio.create_subprocess_exec(
            *dep.driver_args(
                "spend",
                accounts=accounts,
                paid=paid,
                seed=10 + n,
                seconds=ROLLING_S * 10,
                stop=str(stop_file),
            ),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dep.env(old=True),
            cwd=dep.workdir,
        )
        for n in range(2)
    ]
    stop = asyncio.Event()
    syncer = Syncer(dep.settings)
    async with AsyncRedCredit(settings=dep.settings) as arc:
        spenders = [
            asyncio.create_task(_new_spender(arc, dep, worker, stop))
            for worker in range(NEW_WORKERS)
        ]
        try:
            await asyncio.sleep(ROLLING_S / 3)
            migrated = await asyncio.to_thread(dep.new_cli, "migrate")
            assert migrated.returncode == 0, migrated.stderr
            assert "migrations applied: 4" in migrated.stdout, migrated.stdout
            # The new syncer starts while an old one still runs on the migrated schema:
            # they share the partitions (under traffic the old one never catches up,
            # and says so with 1).
            syncer.start()
            drained = await asyncio.to_thread(dep.old_cli, "sync", "--once", "--timeout", "2")
            assert drained.returncode in (0, 1), drained.stderr
            assert await _replay_old_keyed_calls(arc, populated["keyed"]) > ACCOUNTS
            await _close_old_reservations(arc, dep, populated)
            await asyncio.sleep(ROLLING_S / 3)
            stop_file.touch()
            for process in old_spenders:
                out, err = await process.communicate()
                assert process.returncode == 0, err.decode()
                assert dep.counted(out.decode())["calls"] > 0
            stop.set()
            assert min(await asyncio.gather(*spenders)) > 0
        finally:
            stop.set()
            stop_file.touch()
            await asyncio.gather(*spenders, return_exceptions=True)
            for process in old_spenders:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
    return syncer


# --- the checks ---------------------------------------------------------------------------------


def _check_balances(rc: RedCredit, dep: Deployment) -> None:
    """Opening + grants - spends, per account; every old balance one never-expiring base bucket."""
    accounts, paid = _accounts()
    for account in accounts:
        balance = rc.balance(account)
        credits, chat = dep.moves[account]
        assert balance.credits == OPENING_CREDITS + credits, account
        if account not in paid:
            assert balance.chat_messages == OPENING_CHAT + chat, account
        assert balance.held == 0, account
        assert [(b.id, b.category, b.expires_at_ms, b.live) for b in balance.buckets] == [
            ("base", "paid", None, True)
        ], account
        assert balance.buckets[0].remaining == balance.credits, account


def _new_grants_on_old_accounts(rc: RedCredit, dep: Deployment) -> list[str]:
    accounts, paid = _accounts()
    granted = [a for a in accounts[::5] if a not in paid]
    for account in granted:
        rc.grant(account, 30, grant_id="after-upgrade", category="promotional", expires_in=3600)
        rc.spend(account, cost=10)  # the promotional bucket burns first
        dep.move(account, 30 - 10)
        balance = rc.balance(account)
        assert balance.credits == OPENING_CREDITS + dep.moves[account][0], account
        assert [(b.id, b.remaining) for b in balance.buckets] == [
            ("after-upgrade", 20),
            ("base", balance.credits - 20),
        ], account
    return granted


@contextmanager
def _redis_client(settings: Settings) -> Iterator[Any]:
    url = settings.redis_url or ""
    with RedCredit(settings=settings) as rc:
        cluster = rc.topology.is_cluster
    client = RedisCluster.from_url(url) if cluster else redis.Redis.from_url(url)
    try:
        yield client
    finally:
        client.close()


def _check_ledger(dep: Deployment, pg: psycopg.Connection[Any]) -> None:
    schema = dep.settings.pg_schema
    rows = pg.execute(
        f'SELECT idempotency_key, op, count(*) FROM "{schema}".ledger '
        "WHERE idempotency_key IS NOT NULL GROUP BY 1, 2"
    ).fetchall()
    # Entries a call writes on its way (a lapse it found) carry its key too, and
    # are not its effect (the loaders' rule, backends/postgres/reads.py).
    on_the_way = {"lapse", "refill", "open"}
    effects: dict[str, int] = defaultdict(int)
    for key, op, count in rows:
        if op not in on_the_way:
            effects[key] += count
    assert {k: n for k, n in effects.items() if n != 1} == {}
    assert sorted(effects) == sorted(dep.keys)
    # The old code's entries changed no bucket: every credit was the base bucket's.
    old_with_buckets = pg.execute(
        f'SELECT count(*) FROM "{schema}".ledger '
        "WHERE bucket_changes IS NOT NULL AND idempotency_key LIKE %s",
        ["v1-%"],
    ).fetchone()
    assert old_with_buckets == (0,)


async def test_an_upgrade_under_traffic_loses_and_doubles_nothing(deployment: Deployment) -> None:
    dep = deployment
    populated = await asyncio.to_thread(_populate_v1, dep)
    syncer = await _rolling_upgrade(dep, populated)
    try:
        with RedCredit(settings=dep.settings) as rc:
            _check_balances(rc, dep)
            granted = _new_grants_on_old_accounts(rc, dep)
            syncer.stop()
            assert syncer.drain(timeout_s=60).caught_up
            assert dep.settings.database_url is not None
            with psycopg.connect(dep.settings.database_url, autocommit=True) as pg:
                with _redis_client(dep.settings) as client:
                    assert assert_persisted_exactly(client, dep.settings, pg) == ACCOUNTS
                assert_buckets_persisted(rc, dep.settings, pg, granted)
                _check_ledger(dep, pg)
    finally:
        syncer.close()
    reconciled = _cli(dep.settings, "reconcile")
    assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr


# --- pieces of the upgrade, one at a time -------------------------------------------------------
