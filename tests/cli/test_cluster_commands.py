"""Every command on a real Redis Cluster of three primaries, configured by the environment alone."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psycopg
from redis.cluster import RedisCluster

from redcredit import RedCredit, Settings
from redcredit.cli import Exit
from redcredit.ledger.syncer import Syncer
from tests.cli.running import clean_env, run_cli
from tests.support.helpers import assert_persisted_exactly

ACCOUNTS = 30


def _environment(settings: Settings, **more: str) -> dict[str, str]:
    assert settings.redis_url is not None and settings.database_url is not None
    return clean_env(
        REDCREDIT_REDIS_URL=settings.redis_url,  # one node; the others are found from it
        REDCREDIT_KEY_PREFIX=settings.key_prefix,
        REDCREDIT_DATABASE_URL=settings.database_url,
        REDCREDIT_PG_SCHEMA=settings.pg_schema,
        REDCREDIT_FREE_CREDITS="100",
        **more,
    )


def _spend(settings: Settings, rounds: int) -> None:
    with RedCredit(settings=settings) as rc:
        for i in range(ACCOUNTS * rounds):
            rc.spend(f"cli-{i % ACCOUNTS}", cost=1)
        keys = rc.engine.keys
        nodes = {rc.topology.node_of(keys.for_account(f"cli-{i}").hash) for i in range(ACCOUNTS)}
    assert len(nodes) == 3


def test_every_command_on_a_cluster(
    three_primary_cluster_url: str, pg_settings: Settings, pg: psycopg.Connection
) -> None:
    settings = pg_settings.model_copy(update={"redis_url": three_primary_cluster_url})
    env = _environment(settings, REDCREDIT_REDIS_CLUSTER="true")
    _spend(settings, rounds=2)  # 30 openings and 60 spends

    status = run_cli("sync", "--status", "--json", env=env)
    assert status.returncode == Exit.OK, status.stderr
    # Told it is one server, it says what to set instead of retrying for ever.
    wrong = run_cli("sync", "--status", env={**env, "REDCREDIT_REDIS_CLUSTER": "false"})
    assert wrong.returncode == Exit.USAGE and "set redis_cluster" in wrong.stderr
    assert json.loads(status.stdout)["entries"] == 3 * ACCOUNTS
    once = run_cli("sync", "--once", "--timeout", "30", env=env)
    assert (once.returncode, once.stderr) == (Exit.OK, "")
    assert once.stdout.strip() == f"persisted {3 * ACCOUNTS} entries; 0 still waiting"
    status = run_cli("sync", "--status", env=env)
    assert (status.returncode, status.stdout.split()[:2]) == (Exit.OK, ["waiting:", "0"])

    checked = run_cli("reconcile", env=env)
    assert checked.returncode == Exit.OK, checked.stdout + checked.stderr
    assert f"checked {ACCOUNTS} accounts" in checked.stdout and "0 drifted" in checked.stdout
    evict = run_cli("evict", env=env)  # nothing idle for a day: every account scanned, kept
    assert (evict.returncode, evict.stdout.strip()) == (
        Exit.OK,
        f"scanned {ACCOUNTS} accounts: {ACCOUNTS} recent",
    )

    # Drift on every node is found: reconcile reads them all.
    with (
        RedisCluster.from_url(three_primary_cluster_url) as cluster,
        RedCredit(settings=settings) as rc,
    ):
        for i in range(ACCOUNTS):
            cluster.hset(rc.engine.keys.for_account(f"cli-{i}").hash, "c", 1_000)
    drifted = run_cli("reconcile", env=env)
    assert drifted.returncode == Exit.FAILED
    assert drifted.stdout.count("DRIFT 'cli-") == ACCOUNTS


def test_sync_runs_on_a_cluster_until_sigterm(
    three_primary_cluster_url: str, pg_settings: Settings, pg: psycopg.Connection
) -> None:
    settings = pg_settings.model_copy(update={"redis_url": three_primary_cluster_url})
    env = _environment(settings, REDCREDIT_SYNC_INTERVAL="0.05")  # redis_cluster: auto
    sync = subprocess.Popen(
        [sys.executable, "-m", "redcredit.cli", "sync"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert sync.stdout is not None
        assert sync.stdout.readline().startswith("syncing as ")
        _spend(settings, rounds=3)
        with Syncer(settings) as watcher:  # reads the lag only
            deadline = time.monotonic() + 20
            while not watcher.lag().caught_up:
                assert time.monotonic() < deadline, watcher.lag()
                time.sleep(0.05)
        sync.send_signal(signal.SIGTERM)
        _out, err = sync.communicate(timeout=20)
    finally:
        sync.kill()
    assert (sync.returncode, err) == (Exit.OK, "")
    with RedisCluster.from_url(three_primary_cluster_url) as cluster:
        assert assert_persisted_exactly(cluster, settings, pg) == ACCOUNTS
