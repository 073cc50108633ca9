"""Every script touches one slot: it runs unchanged on Redis Cluster."""

from __future__ import annotations

import time

import pytest
from redis.cluster import RedisCluster
from redis.crc import key_slot

from redcredit import RedCredit, ReservationRef, Settings
from redcredit.core.keys import KeySpace

IDS = ["plain", "{brace}", "}{", "a:b:c", "line", "ünïcødé-名前", "x" * 256, "{", "}", "*?[]"]


@pytest.mark.parametrize("account", IDS)
def test_all_keys_of_an_account_share_its_partition_slot(account: str) -> None:
    space = KeySpace("rc:v1", 64)
    keys = space.for_account(account)
    names = [*keys.common("some-key"), keys.common(None)[3], keys.reservation("f" * 32)]
    slots = {key_slot(name.encode()) for name in names}
    assert slots == {key_slot(space.journal(space.partition(account)).encode())}


def test_partitions_spread_over_slots() -> None:
    space = KeySpace("rc:v1", 64)
    slots = {key_slot(space.journal(p).encode()) for p in range(64)}
    assert len(slots) == 64
    # Three primaries each get a fair share of partitions.
    per_node = [sum(1 for s in slots if s * 3 // 16384 == node) for node in range(3)]
    assert min(per_node) >= 10


CLUSTERS = ["cluster_redis_url", "three_primary_cluster_url"]


@pytest.mark.parametrize("cluster_url", CLUSTERS, ids=["one-node", "three-primaries"])
def test_every_operation_runs_on_a_cluster(
    cluster_url: str, settings: Settings, request: pytest.FixtureRequest
) -> None:
    cluster = RedisCluster.from_url(request.getfixturevalue(cluster_url))
    client = RedCredit(cluster, settings=settings)
    try:
        for account in IDS[:6]:
            client.grant(account, 10, chat_messages=1, idempotency_key="g")
            client.spend(account, cost=5, idempotency_key="s")
            client.chat_turn(account, cost=1)
            reservation = client.reserve(account, 50)
            client.extend(reservation, ttl=30)
            client.settle(ReservationRef(account, reservation.id), 20)
            client.release(client.reserve(account, 1))
            client.set_plan(account, "paid")
            assert client.balance(account).credits == 100 + 10 - 5 - 1 - 20
        cluster.script_flush()
        assert client.spend(IDS[0], cost=1).credits_remaining is None
    finally:
        cluster.close()


def test_accounts_spread_over_the_three_primaries(
    three_primary_cluster_url: str, settings: Settings
) -> None:
    cluster = RedisCluster.from_url(three_primary_cluster_url)
    client = RedCredit(cluster, settings=settings)
    space = client.engine.keys
    try:
        accounts = [f"spread-{n}" for n in range(30)]
        for account in accounts:
            client.spend(account, cost=1)
        owners = {
            cluster.get_node_from_key(space.journal(space.partition(account))).port
            for account in accounts
        }
        assert len(owners) == 3
        assert {client.balance(account).credits for account in accounts} == {99}
    finally:
        cluster.close()


def test_a_reservation_block_renews_and_settles_on_three_primaries(
    three_primary_cluster_url: str, settings: Settings
) -> None:
    cluster = RedisCluster.from_url(three_primary_cluster_url)
    client = RedCredit(cluster, settings=settings)
    try:
        for account in IDS[:3]:
            with client.reservation(account, 30, ttl=1) as lease:
                time.sleep(1.5)  # past the first deadline: only renewals keep the hold
                lease.add(12)
            assert lease.settlement is not None
            assert lease.settlement.outcome == "settled"
            assert client.balance(account).credits == 100 - 12
    finally:
        cluster.close()
