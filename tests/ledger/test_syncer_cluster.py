"""The syncer, its leases, reconcile and evict on a real Redis Cluster: every node, every wait."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from redcredit import RedCredit, Settings
from redcredit.backends.topology import Topology
from redcredit.core.keys import KeySpace
from redcredit.ledger.evict import evict_idle
from redcredit.ledger.reconcile import reconcile
from redcredit.ledger.syncer import Syncer
from redcredit.servers.redis import EmbeddedRedis
from tests.support.cluster import hand_over, migrate_keys, replica_of, three_primaries
from tests.support.helpers import assert_persisted_exactly

CLUSTERS = ["cluster_redis_url", "three_primary_cluster_url"]


def _ledger_rows(pg: psycopg.Connection, settings: Settings) -> int:
    row = pg.execute(f'SELECT COUNT(*) FROM "{settings.pg_schema}".ledger').fetchone()
    assert row is not None
    return int(row[0])


def _spend_everywhere(settings: Settings, accounts: int, spends: int) -> set[int]:
    """Spends on ``accounts`` accounts; returns the ports of the nodes that hold them."""
    with RedCredit(settings=settings) as rc:
        for i in range(spends):
            rc.spend(f"c-{i % accounts}", cost=1)
        keys = rc.engine.keys
        return {rc.topology.node_of(keys.for_account(f"c-{i}").hash)[1] for i in range(accounts)}


@pytest.mark.parametrize("cluster", CLUSTERS, ids=["one-node", "three-primaries"])
def test_the_syncer_drains_every_node(
    cluster: str, pg_settings: Settings, pg, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(cluster)
    settings = pg_settings.model_copy(update={"redis_url": url})
    nodes = _spend_everywhere(settings, accounts=60, spends=300)
    assert len(nodes) == (3 if cluster == "three_primary_cluster_url" else 1)
    with RedisCluster.from_url(url) as client:
        client.script_flush()  # every primary forgets the scripts: each gets them again
    with Syncer(settings) as syncer:
        assert syncer.topology.is_cluster
        before = syncer.lag()  # each node's journal, by its own clock
        assert before.entries == 360 and before.oldest_age_ms is not None
        assert 0 <= before.oldest_age_ms < 60_000
        assert syncer.drain(timeout_s=30).caught_up
        assert syncer.applied == 360
    with RedisCluster.from_url(url) as client:
        assert assert_persisted_exactly(client, settings, pg) == 60


def test_two_syncers_share_the_partitions_of_every_node(
    three_primary_cluster_url: str, pg_settings: Settings, pg
) -> None:
    settings = pg_settings.model_copy(update={"redis_url": three_primary_cluster_url})
    keys = KeySpace(settings.versioned_prefix, settings.partitions)
    with (
        RedisCluster.from_url(three_primary_cluster_url) as cluster,
        Syncer(settings, cluster, consumer="one") as one,  # a cluster client given
        Syncer(settings, consumer="two") as two,  # the settings alone
    ):
        for syncer in (one, two, one, two):  # leases taken, then shared out
            syncer._next_renewal = 0.0
            syncer.renew_leases()
        assert sorted(one.leases.held | two.leases.held) == list(range(settings.partitions))
        assert not one.leases.held & two.leases.held
        for syncer in (one, two):
            owners = {syncer.topology.node_of(keys.journal(p)) for p in syncer.leases.held}
            assert len(owners) == 3  # each syncer reads a share of every node
        one.start()
        two.start()
        _spend_everywhere(settings, accounts=97, spends=900)
        one.stop()
        two.stop()
        one.drain()
        two.drain()
        assert one.applied > 0 and two.applied > 0
        assert one.applied + two.applied >= 997
        assert assert_persisted_exactly(cluster, settings, pg) == 97


def test_reconcile_and_evict_cover_every_primary(
    three_primary_cluster_url: str, pg_settings: Settings, pg
) -> None:
    settings = pg_settings.model_copy(update={"redis_url": three_primary_cluster_url})
    assert len(_spend_everywhere(settings, accounts=30, spends=60)) == 3
    with Syncer(settings) as syncer:
        assert syncer.drain().caught_up
    report = reconcile(settings, None, pg)
    assert (report.accounts, report.clean) == (30, True)
    with RedCredit(settings=settings) as rc:
        rc.reserve("c-1", 5)  # a hold keeps its account
    with RedisCluster.from_url(three_primary_cluster_url) as cluster:
        evicted = evict_idle(settings, cluster, pg, idle=timedelta(0))
        assert evicted.scanned == 30
        assert evicted.outcomes == {"evicted": 29, "holds": 1}


# --- a cluster of its own: a replica to wait for, slots to move ---------------------------------


@pytest.fixture(scope="module")
def replicated() -> Iterator[tuple[list[EmbeddedRedis], EmbeddedRedis]]:
    """Three primaries, the first with a replica."""
    with three_primaries() as nodes, replica_of(nodes[0]) as replica:
        yield nodes, replica


def _calls(node: EmbeddedRedis, command: str) -> int:
    with redis.Redis(port=node.port) as client:
        stats = client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def _waits(node: EmbeddedRedis) -> dict[str, int]:
    return {name: _calls(node, name) for name in ("wait", "waitaof")}


def test_wait_goes_to_the_node_of_the_batch_and_holds_back_what_its_replica_lacks(
    replicated: tuple[list[EmbeddedRedis], EmbeddedRedis],
    pg_settings: Settings,
    pg,
    caplog: pytest.LogCaptureFixture,
) -> None:
    nodes, replica = replicated
    settings = pg_settings.model_copy(
        update={"redis_url": nodes[1].url, "sync_retry_max": timedelta(milliseconds=100)}
    )
    before = [_waits(node) for node in nodes]
    assert len(_spend_everywhere(settings, accounts=30, spends=60)) == 3
    with Syncer(settings) as syncer:
        assert syncer.drain(timeout_s=20).caught_up
        after = [_waits(node) for node in nodes]
        # WAIT only where there is a replica; WAITAOF on every node of the batch.
        assert after[0]["wait"] > before[0]["wait"]
        assert [after[i]["wait"] - before[i]["wait"] for i in (1, 2)] == [0, 0]
        assert all(a["waitaof"] > b["waitaof"] for a, b in zip(after, before, strict=True))
        persisted = _ledger_rows(pg, settings)

        # The replica stops answering: what the first node holds is not committed.
        assert replica.pid is not None
        os.kill(replica.pid, signal.SIGSTOP)
        try:
            with RedCredit(settings=settings) as rc:
                keys = rc.engine.keys
                on_first = next(
                    f"c-{i}"
                    for i in range(30)
                    if rc.topology.node_of(keys.for_account(f"c-{i}").hash)[1] == nodes[0].port
                )
                rc.spend(on_first, cost=1)
            with caplog.at_level(logging.WARNING, logger="redcredit.ledger.syncer"):
                assert syncer.tick(budget_s=0.1) == 0
            assert "0 of the 1 replicas of 127.0.0.1:" in caplog.text
            assert _ledger_rows(pg, settings) == persisted
        finally:
            os.kill(replica.pid, signal.SIGCONT)
        time.sleep(0.2)  # past the backoff
        assert syncer.drain(timeout_s=20).caught_up
        assert _ledger_rows(pg, settings) == persisted + 1


def _until_listed_as_replica(primary: EmbeddedRedis, replica: EmbeddedRedis) -> None:
    """Gossip tells a primary whose replica a new node is a moment after it syncs."""
    with redis.Redis(port=primary.port) as node, redis.Redis(port=replica.port) as other:
        primary_id = node.execute_command("CLUSTER", "MYID")
        replica_id = other.execute_command("CLUSTER", "MYID")
        deadline = time.monotonic() + 10
        while not any(
            line.startswith(replica_id)
            for line in node.execute_command("CLUSTER", "REPLICAS", primary_id)
        ):
            assert time.monotonic() < deadline, "the primary never listed its replica"
            time.sleep(0.05)


def test_a_replica_whose_link_dropped_still_holds_the_batch_back(
    replicated: tuple[list[EmbeddedRedis], EmbeddedRedis], pg_settings: Settings, pg
) -> None:
    """The primary cut a paused replica off: none connected, yet it may still be promoted."""
    nodes, replica = replicated
    # Leases renewed every 0.1 s, each renewal reading the replica counts again.
    settings = pg_settings.model_copy(
        update={
            "redis_url": nodes[1].url,
            "sync_retry_max": timedelta(milliseconds=100),
            "sync_claim_idle": timedelta(milliseconds=400),
        }
    )
    with Syncer(settings) as syncer:
        with RedCredit(settings=settings) as rc:
            keys = rc.engine.keys
            on_first = next(
                f"d-{i}"
                for i in range(200)
                if rc.topology.node_of(keys.for_account(f"d-{i}").hash)[1] == nodes[0].port
            )
            rc.spend(on_first, cost=1)
            assert syncer.drain(timeout_s=20).caught_up
            persisted = _ledger_rows(pg, settings)
            assert replica.pid is not None
            _until_listed_as_replica(nodes[0], replica)
            os.kill(replica.pid, signal.SIGSTOP)
            try:
                with redis.Redis(port=nodes[0].port) as primary:
                    primary.execute_command("CLIENT", "KILL", "TYPE", "replica")
                    assert primary.info("replication")["connected_slaves"] == 0
                rc.spend(on_first, cost=1)
                for _ in range(2):
                    time.sleep(0.15)  # past a renewal and the backoff
                    assert syncer.tick(budget_s=0.1) == 0
                assert _ledger_rows(pg, settings) == persisted
            finally:
                os.kill(replica.pid, signal.SIGCONT)
        time.sleep(0.2)  # past the backoff
        assert syncer.drain(timeout_s=20).caught_up
        assert _ledger_rows(pg, settings) == persisted + 1


def test_a_slot_moving_under_the_syncer(
    replicated: tuple[list[EmbeddedRedis], EmbeddedRedis], pg_settings: Settings, pg
) -> None:
    """Its streams answer ASK while they move and MOVED after: followed, nothing lost or doubled."""
    nodes, _replica = replicated
    settings = pg_settings.model_copy(update={"redis_url": nodes[0].url})
    keys = KeySpace(settings.versioned_prefix, settings.partitions)
    topology = Topology(settings)
    try:
        owner = topology.node_of(keys.for_account("mover").hash)[1]
        source = next(node for node in nodes if node.port == owner)
        target = next(node for node in nodes if node.port != owner)
        slot = key_slot(keys.for_account("mover").hash.encode())
        with RedCredit(topology.generic(), settings=settings) as rc, Syncer(settings) as syncer:
            for _ in range(5):
                rc.spend("mover", cost=1)
            _spend_everywhere(settings, accounts=10, spends=20)
            syncer.renew_leases()  # the syncer has its map, and a lease in the slot
            asked = _calls(target, "asking")
            assert migrate_keys(slot, source, target) >= 3  # account, journal, lease...
            assert syncer.drain(timeout_s=20).caught_up
            assert _calls(target, "asking") > asked  # the moved keys were asked for there
            hand_over(slot, target, nodes)
            rc.spend("mover", cost=1)
            rc.spend("mover", cost=1)
            assert syncer.drain(timeout_s=20).caught_up  # MOVED, then the new map
            journal = keys.journal(keys.partition("mover"))
            assert syncer.topology.node_of(journal)[1] == target.port
        with RedisCluster.from_url(nodes[0].url) as cluster:
            assert assert_persisted_exactly(cluster, settings, pg) == 11
        assert reconcile(settings, None, pg).clean
    finally:
        topology.close()


def test_a_node_that_stops_answering_is_waited_out(
    replicated: tuple[list[EmbeddedRedis], EmbeddedRedis],
    pg_settings: Settings,
    pg,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its failures are typed, logged and retried; the syncer's job lives on and drains it."""
    nodes, _replica = replicated
    settings = pg_settings.model_copy(
        update={
            "redis_url": nodes[0].url,
            "redis_socket_timeout": timedelta(milliseconds=300),
            "redis_retry_deadline": timedelta(milliseconds=100),
            "sync_retry_max": timedelta(milliseconds=200),
        }
    )
    _spend_everywhere(settings, accounts=30, spends=30)
    stopped = nodes[2]
    assert stopped.pid is not None
    with (
        caplog.at_level(logging.WARNING, logger="redcredit.ledger.syncer"),
        Syncer(settings) as syncer,
    ):
        os.kill(stopped.pid, signal.SIGSTOP)
        try:
            syncer.start()
            time.sleep(1.0)
        finally:
            os.kill(stopped.pid, signal.SIGCONT)
        deadline = time.monotonic() + 20
        while not syncer.lag().caught_up:
            assert time.monotonic() < deadline, syncer.lag()
            time.sleep(0.05)
    assert "sync failed (BackendUnavailable)" in caplog.text
    with RedisCluster.from_url(nodes[0].url) as cluster:
        assert assert_persisted_exactly(cluster, settings, pg) == 30
