"""Write-behind: the journal drained into PostgreSQL, exactly once, whatever crashes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta

import psycopg
import pytest
import redis

from redcredit import AlreadyApplied, AsyncRedCredit, RedCredit, Settings
from redcredit.backends.migrate import migrate, migrations
from redcredit.backends.postgres import apply_entries
from redcredit.backends.postgres_loader import PostgresLoader
from redcredit.core.keys import KeySpace
from redcredit.ledger.syncer import BatchGone, Syncer
from tests.support.helpers import assert_persisted_exactly, mixed_load


async def test_mixed_load_on_1000_accounts_then_drain(
    pg_settings: Settings, syncer: Syncer, redis_client, pg
) -> None:
    accounts = [f"user-{i}" for i in range(1000)]
    lags = []
    syncer.start()
    async with AsyncRedCredit(settings=pg_settings) as arc:
        for start in range(0, 1000, 100):
            await asyncio.gather(*(arc.grant(a, 10) for a in accounts[start : start + 100]))
        load = asyncio.create_task(mixed_load(arc, accounts, 6000, seed=1))
        while not load.done():
            lags.append(syncer.lag())
            await asyncio.sleep(0.05)
        assert await load > 3000
    syncer.stop()
    final = syncer.drain(timeout_s=60)
    assert final.caught_up and final.pending == 0
    assert assert_persisted_exactly(redis_client, pg_settings, pg) == 1000
    assert max(lag.entries for lag in lags) > 0  # the syncer really ran behind the load


def test_two_syncers_apply_nothing_twice(pg_settings: Settings, redis_client, pg) -> None:
    first, second = Syncer(pg_settings), Syncer(pg_settings)
    try:
        first.start()
        second.start()
        with RedCredit(settings=pg_settings) as rc:
            for i in range(3000):
                rc.spend(f"acct-{i % 97}", cost=1)
        first.stop()
        second.stop()
        first.drain()
        second.drain()
    finally:
        first.close()
        second.close()
    assert first.applied > 0 and second.applied > 0  # both did share the work
    assert assert_persisted_exactly(redis_client, pg_settings, pg) == 97


def test_redelivered_entries_change_nothing(pg_settings: Settings, syncer: Syncer, pg) -> None:
    with RedCredit(settings=pg_settings) as rc:
        for i in range(50):
            rc.spend("dup", cost=1)
            rc.grant(f"dup-{i % 5}", 3)
    entries = syncer.read_batch()
    syncer.commit(entries)
    before = pg.execute(f'SELECT * FROM "{pg_settings.pg_schema}".accounts ORDER BY 1').fetchall()
    # Delivered again (a crash between commit and acknowledgement), and out of order.
    for again in (entries, list(reversed(entries))):
        with pg.transaction():
            apply_entries(pg, pg_settings.pg_schema, again)
    after = pg.execute(f'SELECT * FROM "{pg_settings.pg_schema}".accounts ORDER BY 1').fetchall()
    assert [r[:5] for r in before] == [r[:5] for r in after]
    count = pg.execute(f'SELECT COUNT(*) FROM "{pg_settings.pg_schema}".ledger').fetchone()
    assert count == (len(entries),)


def test_a_batch_redis_no_longer_holds_is_not_committed(
    pg_settings: Settings, syncer: Syncer, pg, redis_client
) -> None:
    """Entries read before Redis lost its data must not land after the accounts reload."""
    with RedCredit(settings=pg_settings) as rc:
        rc.spend("gone", cost=1)
    entries = syncer.read_batch()
    for key in redis_client.scan_iter(match=f"{pg_settings.key_prefix}:*"):
        redis_client.delete(key)
    with pytest.raises(BatchGone):
        syncer.commit(entries)
    assert pg.execute(f'SELECT COUNT(*) FROM "{pg_settings.pg_schema}".ledger').fetchone() == (0,)


def test_an_entry_waits_for_the_ones_before_it(pg_settings: Settings, syncer: Syncer, pg) -> None:
    """Applied ahead of an earlier entry of its account, an entry waits: the ledger has no hole.

    A hole would stay for good if Redis then lost the earlier entries: the
    account would reload past them.
    """
    with RedCredit(settings=pg_settings) as rc:
        for _ in range(4):
            rc.spend("split", cost=1)
    entries = syncer.read_batch()  # the opening and four spends
    ledger = f'SELECT seq FROM "{pg_settings.pg_schema}".ledger ORDER BY seq'
    later = {entry.position for entry in entries[3:]}
    with pg.transaction():
        assert apply_entries(pg, pg_settings.pg_schema, entries[3:]) == later
    assert pg.execute(ledger).fetchall() == []
    with pg.transaction():
        assert apply_entries(pg, pg_settings.pg_schema, entries[:3]) == set()
        assert apply_entries(pg, pg_settings.pg_schema, entries[3:]) == set()
    assert [seq for (seq,) in pg.execute(ledger).fetchall()] == [1, 2, 3, 4, 5]


def test_a_syncer_paused_past_its_lease_is_taken_over_and_harmless(
    pg_settings: Settings, redis_client, pg
) -> None:
    """The next syncer claims what the paused one held; what the paused one commits waits or is gone."""
    slow = pg_settings.model_copy(update={"sync_claim_idle": timedelta(minutes=5)})
    keys = KeySpace(pg_settings.versioned_prefix, pg_settings.partitions)
    with (
        RedCredit(settings=pg_settings) as rc,
        Syncer(slow, consumer="paused") as paused,
        Syncer(pg_settings, consumer="next") as successor,
    ):
        rc.spend("taken", cost=1)
        rc.spend("taken", cost=1)
        earlier = paused.read_batch()  # the opening and two spends
        assert len(earlier) == 3 and len(paused.leases.held) == pg_settings.partitions
        # Its leases and membership lapse while it is paused; it does not know yet.
        redis_client.delete(keys.sync_members(pg_settings.sync_group))
        for p in range(pg_settings.partitions):
            redis_client.delete(keys.sync_lease(p, pg_settings.sync_group))
        rc.spend("taken", cost=1)
        rc.spend("taken", cost=1)
        later = paused.read_batch()
        assert len(later) == 2
        assert paused.commit(later) == later  # seq 4 and 5 wait for 1..3
        ledger = f'SELECT seq FROM "{pg_settings.pg_schema}".ledger ORDER BY seq'
        assert pg.execute(ledger).fetchall() == []
        # The successor takes every partition, with what the paused one left pending.
        assert successor.run_once() == 5
        assert len(successor.leases.held) == pg_settings.partitions
        with pytest.raises(BatchGone):
            paused.commit(earlier)
        assert [seq for (seq,) in pg.execute(ledger).fetchall()] == [1, 2, 3, 4, 5]
        assert assert_persisted_exactly(redis_client, pg_settings, pg) == 1


def test_syncers_share_the_partitions_and_take_over_from_one_that_leaves(
    pg_settings: Settings,
) -> None:
    syncers = [Syncer(pg_settings, consumer=f"s{i}") for i in range(3)]
    try:
        for _ in range(2):  # the first to renew takes all; the second round balances
            for syncer in syncers:
                syncer._next_renewal = 0.0
                syncer.renew_leases()
        shares = [syncer.leases.held for syncer in syncers]
        assert sorted(len(share) for share in shares) == [21, 21, 22]
        assert frozenset().union(*shares) == frozenset(range(pg_settings.partitions))
        assert sum(map(len, shares)) == pg_settings.partitions  # no partition read twice
        syncers.pop().close()  # hands its partitions back at once
        # A partition moves once its holder has given it up: within two rounds.
        for syncer in syncers + syncers:
            syncer._next_renewal = 0.0
            syncer.renew_leases()
        assert sorted(len(s.leases.held) for s in syncers) == [32, 32]
        syncers[0].leases.release_all()  # leaves, then comes back: the two share again
        for syncer in syncers + syncers:
            syncer._next_renewal = 0.0
            syncer.renew_leases()
        assert sorted(len(s.leases.held) for s in syncers) == [32, 32]
    finally:
        for syncer in syncers:
            syncer.close()


def test_a_dead_syncers_partitions_lapse_to_the_others(pg_settings: Settings) -> None:
    with Syncer(pg_settings, consumer="alive") as alive:
        dead = Syncer(pg_settings, consumer="dead")
        for syncer in (alive, dead, alive, dead):
            syncer._next_renewal = 0.0
            syncer.renew_leases()
        assert len(alive.leases.held) == len(dead.leases.held) == 32
        dead.topology.close()  # dies without a word: nothing handed back
        time.sleep(pg_settings.sync_claim_idle.total_seconds() + 0.1)
        alive._next_renewal = 0.0
        alive.renew_leases()
        assert len(alive.leases.held) == pg_settings.partitions


def test_an_account_loaded_during_a_commit_is_read_after_it(
    pg_settings: Settings, pg, redis_client
) -> None:
    """A reload (after Redis lost the account) waits for a batch in flight, then sees it."""
    with RedCredit(settings=pg_settings) as rc:
        for _ in range(3):
            rc.spend("fenced", cost=1)
    loaded: list[int] = []
    loader = PostgresLoader(pg_settings)

    def while_committing(stage: str) -> None:
        if stage != "before_commit":
            return
        reader = threading.Thread(target=lambda: loaded.append(loader.load("fenced").sequence))
        reader.start()
        reader.join(0.3)
        assert reader.is_alive(), "the load did not wait for the batch in flight"
        threads.append(reader)

    threads: list[threading.Thread] = []
    with Syncer(pg_settings, fault_hook=while_committing) as fenced:
        assert fenced.run_once() == 4  # the opening entry and three spends
    threads[0].join(5)
    loader.close()
    assert loaded == [4]


KILLED_SYNCER = textwrap.dedent(
    """
    import os, signal, sys
    from redcredit import Settings
    from redcredit.ledger.syncer import Syncer

    stage = sys.argv[2]
    def hook(at):
        if at == stage:
            os.kill(os.getpid(), signal.SIGKILL)
    syncer = Syncer(Settings.model_validate_json(sys.argv[1]), fault_hook=hook)
    syncer.run_once()
    raise SystemExit("the fault hook did not fire")
    """
)


@pytest.mark.parametrize("stage", ["before_commit", "after_commit"])
def test_syncer_killed_mid_batch(pg_settings: Settings, redis_client, pg, stage: str) -> None:
    with RedCredit(settings=pg_settings) as rc:
        for i in range(400):
            rc.spend(f"k-{i % 40}", cost=1)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            KILLED_SYNCER,
            pg_settings.model_dump_json(context={"reveal_secrets": True}),
            stage,
        ],
        timeout=60,
        check=False,
    )
    assert done.returncode == -9
    ledger = pg.execute(f'SELECT COUNT(*) FROM "{pg_settings.pg_schema}".ledger').fetchone()
    # Killed before the commit: nothing persisted. After it: persisted, not acknowledged.
    assert (ledger[0] == 0) == (stage == "before_commit")
    time.sleep(1.1)  # the dead syncer's entries become claimable
    rescuer = Syncer(pg_settings)
    try:
        assert rescuer.drain(timeout_s=30).caught_up
    finally:
        rescuer.close()
    assert assert_persisted_exactly(redis_client, pg_settings, pg) == 40


def test_postgres_down_under_load_loses_nothing(
    settings: Settings, postgres_factory, pg_schema: str, redis_client
) -> None:
    server = postgres_factory()
    pg_settings = settings.model_copy(
        update={
            "database_url": server.url,
            "pg_schema": pg_schema,
            "sync_interval": timedelta(milliseconds=50),
            "sync_retry_max": timedelta(milliseconds=500),
        }
    )
    with psycopg.connect(server.url, autocommit=True) as conn:
        migrate(conn, pg_schema)
    syncer = Syncer(pg_settings)
    stop = threading.Event()
    spent = [0]

    def load() -> None:
        # Accounts are created before the outage: hydration needs PostgreSQL.
        with RedCredit(settings=pg_settings) as rc:
            while not stop.is_set():
                rc.spend(f"busy-{spent[0] % 20}", cost=1)
                spent[0] += 1

    with RedCredit(settings=pg_settings) as rc:
        for i in range(20):
            rc.grant(f"busy-{i}", 10_000)
    syncer.start()
    worker = threading.Thread(target=load)
    worker.start()
    try:
        time.sleep(0.5)
        server.stop()
        time.sleep(3)
        during = syncer.lag()
        server.start()
        time.sleep(0.5)
    finally:
        stop.set()
        worker.join()
        syncer.stop()
    try:
        assert during.entries > 0 and during.oldest_age_ms and during.oldest_age_ms > 1000
        assert syncer.drain(timeout_s=60).caught_up
    finally:
        syncer.close()
    with psycopg.connect(server.url, autocommit=True) as conn:
        assert assert_persisted_exactly(redis_client, pg_settings, conn) == 20
        total = conn.execute(f'SELECT SUM(credits) FROM "{pg_schema}".accounts').fetchone()
    assert total == (20 * (100 + 10_000) - spent[0],)


def test_redis_flushed_rebuilds_from_postgres(pg_settings: Settings, redis_factory, pg) -> None:
    server = redis_factory()
    settings = pg_settings.model_copy(update={"redis_url": server.url})
    with RedCredit(settings=settings) as rc, Syncer(settings) as syncer:
        rc.grant("phoenix", 50)
        rc.spend("phoenix", cost=30)
        rc.set_plan("phoenix", "starter")
        assert syncer.drain().caught_up
        server.restart()  # no AOF, no RDB: Redis comes back empty
        # Cold Redis: the account comes back from PostgreSQL, numbering continues.
        balance = rc.balance("phoenix")
        assert (balance.credits, balance.plan, balance.sequence) == (120, "starter", 4)
        assert rc.spend("phoenix", cost=20).sequence == 5
        assert syncer.drain().caught_up
        client = redis.Redis.from_url(server.url)
        assert assert_persisted_exactly(client, settings, pg) == 1
        client.close()


async def test_a_call_repeated_after_redis_lost_it_is_not_applied_again(
    pg_settings: Settings, redis_factory, pg
) -> None:
    """Idempotency keys outlive a Redis that restarted empty: they reload with the account."""
    server = redis_factory()
    settings = pg_settings.model_copy(update={"redis_url": server.url})
    with RedCredit(settings=settings) as rc, Syncer(settings) as syncer:
        rc.grant("lazarus", 50, idempotency_key="payment-1")
        rc.spend("lazarus", cost=30, idempotency_key="spend-1")
        reservation = rc.reserve("lazarus", 10, idempotency_key="hold-1")
        rc.settle(reservation, 4, idempotency_key="settle-1")
        rc.spend("lazarus", cost=1)  # no key: nothing to remember
        assert syncer.drain().caught_up
        server.restart()  # no AOF, no RDB: Redis comes back empty
        with pytest.raises(AlreadyApplied) as repeated:
            rc.spend("lazarus", cost=30, idempotency_key="spend-1")
        assert repeated.value.sequence == 3  # open, grant, then this spend
        for call in (
            lambda: rc.grant("lazarus", 50, idempotency_key="payment-1"),
            lambda: rc.reserve("lazarus", 10, idempotency_key="hold-1"),
            lambda: rc.settle(reservation, 4, idempotency_key="settle-1"),
        ):
            with pytest.raises(AlreadyApplied):
                call()
        async with AsyncRedCredit(settings=settings) as arc:
            with pytest.raises(AlreadyApplied):
                await arc.spend("lazarus", cost=30, idempotency_key="spend-1")
        assert rc.balance("lazarus").credits == 100 + 50 - 30 - 4 - 1
        # A new key still applies, once.
        assert rc.spend("lazarus", cost=5, idempotency_key="spend-2").credits_remaining == 110
        assert rc.spend("lazarus", cost=5, idempotency_key="spend-2").replayed
        assert syncer.drain().caught_up
        client = redis.Redis.from_url(server.url)
        assert assert_persisted_exactly(client, settings, pg) == 1
        client.close()


def test_legacy_rows_with_null_balances(pg_settings: Settings, redis_client, pg) -> None:
    schema = pg_settings.pg_schema
    pg.execute(
        f'INSERT INTO "{schema}".accounts (account, credits, chat_messages, plan) VALUES '
        "('old-null', NULL, NULL, NULL), ('old-rich', 70, 2, 'paid')"
    )
    with RedCredit(settings=pg_settings) as rc, Syncer(pg_settings) as syncer:
        poor = rc.balance("old-null")
        assert (poor.credits, poor.chat_messages, poor.plan) == (0, 0, "free")
        rich = rc.balance("old-rich")
        assert (rich.credits, rich.chat_messages, rich.unlimited) == (70, 2, True)
        rc.grant("old-null", 5)
        assert syncer.drain().caught_up
    assert assert_persisted_exactly(redis_client, pg_settings, pg) == 2


def test_unknown_account_is_created_with_defaults_and_journaled(
    pg_settings: Settings, redis_client, pg
) -> None:
    with RedCredit(settings=pg_settings) as rc, Syncer(pg_settings) as syncer:
        assert rc.spend("newbie", cost=1).credits_remaining == 99
        assert syncer.drain().caught_up
    ops = pg.execute(
        f'SELECT op, credit_delta FROM "{pg_settings.pg_schema}".ledger '
        "WHERE account = 'newbie' ORDER BY seq"
    ).fetchall()
    assert ops == [("open", 100), ("spend", -1)]


def test_migrations_twice_and_concurrently(postgres_url: str, pg_schema: str) -> None:
    results: list[list[int]] = []

    def run() -> None:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            results.append(migrate(conn, pg_schema))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [m.version for m in migrations()]
    assert sorted(results) == [[], [], [], every]
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        assert migrate(conn, pg_schema) == []
        # The CHECK constraints keep chat messages non-negative even for direct
        # writes; credits go below zero within a plan's overdraft.
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(
                f'INSERT INTO "{pg_schema}".accounts (account, chat_messages) VALUES (%s, -1)',
                ["x"],
            )
        conn.execute(
            f'INSERT INTO "{pg_schema}".accounts (account, credits) VALUES (%s, -1)', ["y"]
        )


async def test_racing_hydration_from_postgres(pg_settings: Settings, pg) -> None:
    pg.execute(
        f'INSERT INTO "{pg_settings.pg_schema}".accounts (account, credits, chat_messages, '
        "plan, last_seq) VALUES ('cold', 500, 5, 'free', 7)"
    )
    async with AsyncRedCredit(settings=pg_settings) as arc:
        results = await asyncio.gather(*(arc.spend("cold", cost=10) for _ in range(30)))
        assert sorted(r.credits_remaining for r in results) == list(range(200, 500, 10))
        assert (await arc.balance("cold")).sequence == 37


def test_standalone_sync_command_runs_until_sigterm(pg_settings: Settings, pg) -> None:
    import os
    import signal

    env = {k: v for k, v in os.environ.items() if not k.startswith("REDCREDIT_")}
    env.update(
        REDCREDIT_REDIS_URL=pg_settings.redis_url or "",
        REDCREDIT_DATABASE_URL=pg_settings.database_url or "",
        REDCREDIT_KEY_PREFIX=pg_settings.key_prefix,
        REDCREDIT_PG_SCHEMA=pg_settings.pg_schema,
        REDCREDIT_SYNC_INTERVAL="0.05",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "redcredit.cli", "sync"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        with RedCredit(settings=pg_settings) as rc:
            for i in range(200):
                rc.spend(f"bg-{i % 10}", cost=1)
        deadline = time.monotonic() + 30
        count = 0
        while time.monotonic() < deadline and count < 210:
            row = pg.execute(f'SELECT COUNT(*) FROM "{pg_settings.pg_schema}".ledger').fetchone()
            count = row[0] if row else 0
            time.sleep(0.05)
        assert count == 210  # 10 openings and 200 spends
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "syncing as" in out


def test_one_server_with_a_replica_commits_what_the_replica_has(
    pg_settings: Settings, redis_factory, pg
) -> None:
    primary = redis_factory(extra_args=["--repl-diskless-sync-delay", "0"])
    replica = redis_factory(extra_args=["--replicaof", "127.0.0.1", str(primary.port)])
    settings = pg_settings.model_copy(update={"redis_url": primary.url})
    with redis.Redis(port=primary.port) as admin, redis.Redis(port=replica.port) as copy:
        deadline = time.monotonic() + 10
        while copy.info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with RedCredit(settings=settings) as rc:
            for i in range(30):
                rc.spend(f"r-{i % 6}", cost=1)
        with Syncer(settings) as syncer:
            assert syncer.drain().caught_up
        assert int(admin.info("commandstats")["cmdstat_wait"]["calls"]) > 0
        admin.execute_command("WAIT", 1, 1000)  # the last acknowledgements too
        assert assert_persisted_exactly(copy, settings, pg) == 6
