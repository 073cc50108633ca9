"""The cluster harness itself, checked with plain redis-py clients: each fault does what it says."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import AskError, TryAgainError

from redcredit.servers.redis import EmbeddedRedis
from tests.support.cluster import SLOTS, ClusterHarness, measure_slot_move


@contextmanager
def _cluster_client(harness: ClusterHarness) -> Iterator[RedisCluster]:
    client = RedisCluster.from_url(harness.url)
    try:
        yield client
    finally:
        client.close()


def _tag_on(harness: ClusterHarness, primary: EmbeddedRedis) -> str:
    """A hash tag whose slot the primary owns."""
    for i in itertools.count():
        tag = f"h{i}"
        if harness.primary_for_slot(key_slot(tag.encode())) is primary:
            return tag
    raise AssertionError("unreachable")


def _every_slot_takes_writes(harness: ClusterHarness) -> None:
    with _cluster_client(harness) as client:
        for primary in harness.primaries:
            key = f"{{{_tag_on(harness, primary)}}}:probe"
            client.set(key, "1")
            assert client.get(key) == b"1"


def _replicated(primary: EmbeddedRedis) -> None:
    with redis.Redis(port=primary.port) as direct:
        assert direct.execute_command("WAIT", 1, 5000) == 1


def test_three_primaries_with_a_replica_each(cluster_harness: ClusterHarness) -> None:
    harness = cluster_harness
    nodes = harness.nodes
    assert len(nodes) == 6
    assert len(harness.seed_urls) == 6
    assert harness.url in harness.seed_urls
    primaries = sorted((n for n in nodes if n.role == "primary"), key=lambda n: n.slots[0].start)
    assert [n.slots for n in primaries] == [
        (range(0, 5461),),
        (range(5461, 10922),),
        (range(10922, SLOTS),),
    ]
    for node in primaries:
        assert harness.primary_for_slot(node.slots[0].start) is node.server
        assert harness.primary_for_slot(node.slots[0].stop - 1) is node.server
        replica = harness.replica_of(node.server)
        assert harness.replicas_of(node.server) == [replica]
        assert {n.server: n.role for n in nodes}[replica] == "replica"
    _every_slot_takes_writes(harness)
    assert harness.timings[0][0] == "start"


def test_graceful_failover_swaps_the_roles_and_loses_nothing(
    cluster_harness: ClusterHarness,
) -> None:
    harness = cluster_harness
    primary = harness.primary_for_slot(0)
    replica = harness.replica_of(primary)
    with _cluster_client(harness) as client:
        for i in range(100):
            client.set(f"{{h0}}:{i}", i)
    assert harness.failover(primary) is replica
    assert harness.primary_for_slot(0) is replica
    assert harness.replicas_of(replica) == [primary]
    with _cluster_client(harness) as client:
        assert client.mget_nonatomic([f"{{h0}}:{i}" for i in range(100)]) == [
            str(i).encode() for i in range(100)
        ]
    _every_slot_takes_writes(harness)


def test_a_killed_primary_fails_over_and_rejoins_as_a_replica(
    cluster_harness: ClusterHarness,
) -> None:
    harness = cluster_harness
    primary = harness.primary_for_slot(8000)
    replica = harness.replica_of(primary)
    tag = _tag_on(harness, primary)
    with redis.Redis(port=primary.port) as direct:
        direct.set(f"{{{tag}}}:replicated", "yes")
    _replicated(primary)
    assert harness.kill_primary(primary) is replica
    assert not primary.running
    assert harness.primary_for_slot(8000) is replica
    assert primary not in {node.server for node in harness.nodes}
    _every_slot_takes_writes(harness)
    with _cluster_client(harness) as client:
        assert client.get(f"{{{tag}}}:replicated") == b"yes"

    assert harness.rejoin(primary) is replica
    assert harness.replicas_of(replica) == [primary]
    assert harness.primary_for_slot(8000) is replica
    with redis.Redis(port=primary.port) as rejoined:
        rejoined.execute_command("READONLY")
        assert rejoined.get(f"{{{tag}}}:replicated") == b"yes"  # synced from its new primary


def test_a_lagging_failover_loses_the_writes_made_during_it(
    cluster_harness: ClusterHarness,
) -> None:
    harness = cluster_harness
    primary = harness.primary_for_slot(SLOTS - 1)
    replica = harness.replica_of(primary)
    tag = _tag_on(harness, primary)
    during_keys = [f"{{{tag}}}:during:{i}" for i in range(50)]
    with redis.Redis(port=primary.port) as direct:
        direct.set(f"{{{tag}}}:before", "kept")

        def during() -> None:
            for key in during_keys:
                assert direct.set(key, "acknowledged")
            assert direct.exists(*during_keys) == len(during_keys)  # the primary has them...
            assert direct.execute_command("WAIT", 1, 100) == 0  # ...and no replica does

        assert harness.lagging_failover(primary, during) is replica
    assert not primary.running
    assert harness.primary_for_slot(SLOTS - 1) is replica
    with _cluster_client(harness) as client:
        assert client.get(f"{{{tag}}}:before") == b"kept"
        assert client.exists(*during_keys) == 0
    _every_slot_takes_writes(harness)
    assert harness.rejoin(primary) is replica


def test_a_migration_moves_keys_and_ownership_meeting_ask_and_tryagain(
    cluster_harness: ClusterHarness,
) -> None:
    harness = cluster_harness
    source, target = harness.primary_for_slot(0), harness.primary_for_slot(SLOTS - 1)
    tag = _tag_on(harness, source)
    slot = key_slot(tag.encode())
    keys = [f"{{{tag}}}:{i}" for i in range(120)]
    with _cluster_client(harness) as client:
        for key in keys:
            client.set(key, key)
    met: list[str] = []

    def between() -> None:
        with redis.Redis(port=source.port) as direct:
            # Asked of the source, a key already gone is answered with ASK.
            remaining = direct.execute_command("CLUSTER", "GETKEYSINSLOT", slot, len(keys))
            left = remaining[0].decode()
            gone = next(key for key in keys if key.encode() not in remaining)
            with pytest.raises(AskError):
                direct.mget([gone])
            met.append("ASK")
            with pytest.raises(TryAgainError):
                direct.mget([gone, left])
            met.append("TRYAGAIN")
        with pytest.raises(TimeoutError):
            harness.wait_ok(timeout_s=0.1)  # a half-moved slot is not a settled cluster

    move = harness.migrate_slot(slot, target, between=between, batch=50)
    assert met == ["ASK", "TRYAGAIN"]
    assert (move.source, move.target, move.keys, move.batches) == (source, target, 120, 3)
    assert harness.primary_for_slot(slot) is target
    with redis.Redis(port=source.port) as old, redis.Redis(port=target.port) as new:
        assert old.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
        assert new.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 120
    with _cluster_client(harness) as client:
        assert client.mget_nonatomic(keys) == [key.encode() for key in keys]


def test_measuring_a_slot_move_accounts_for_every_call(cluster_harness: ClusterHarness) -> None:
    slot = key_slot(b"rc:v1:p7")
    source = cluster_harness.primary_for_slot(slot)
    cost = measure_slot_move(cluster_harness, accounts=100, tag="rc:v1:p7")
    assert cost.keys == 400
    assert cost.calls > 0
    assert cost.applied == cost.calls  # no write lost or doubled by the move
    assert cost.disturbed <= cost.calls
    assert cost.move_s > 0
    assert cluster_harness.primary_for_slot(slot) is not source
