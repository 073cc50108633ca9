"""EmbeddedCluster: real nodes that form a real cluster, agree on one map, and all stop."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from redcredit import RedCredit, Settings
from redcredit.errors import EmbeddedServerError
from redcredit.servers.cluster import EmbeddedCluster
from redcredit.servers.redis import find_redis_server
from redcredit.servers.spawn import children


@pytest.fixture(autouse=True)
def _a_server_binary() -> None:
    try:
        find_redis_server()
    except EmbeddedServerError as exc:
        if os.environ.get("REDCREDIT_TEST_REDIS_URL"):
            pytest.skip(f"a cluster of our own needs a server binary: {exc}")
        raise


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedCluster]:
    with EmbeddedCluster() as started:
        yield started


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return True
    return False


def _ranges(url: str) -> list[tuple[int, int, int, list[int]]]:
    with redis.Redis.from_url(url) as node:
        reply = node.execute_command("CLUSTER", "SLOTS")
    return sorted(
        (int(start), int(stop), int(primary[1]), sorted(int(r[1]) for r in replicas))
        for start, stop, primary, *replicas in reply
    )


def test_three_primaries_share_the_slots_evenly_and_agree(cluster: EmbeddedCluster) -> None:
    ports = [node.port for node in cluster.primaries]
    assert len(ports) == 3 and cluster.replicas == []
    expected = [(0, 5460, ports[0], []), (5461, 10921, ports[1], []), (10922, 16383, ports[2], [])]
    for url in cluster.urls:
        assert _ranges(url) == expected
        with redis.Redis.from_url(url) as node:
            assert node.cluster("INFO")["cluster_state"] == "ok"
    assert cluster.url == cluster.urls[0] == cluster.primaries[0].url
    assert cluster.seed_nodes == tuple(f"127.0.0.1:{port}" for port in ports)
    assert cluster.running


def test_a_client_configured_by_settings_alone_spreads_over_every_node(
    cluster: EmbeddedCluster,
) -> None:
    settings = Settings(redis_url=cluster.url, redis_cluster=True, key_prefix="srv")
    with RedCredit(settings=settings) as client:
        for n in range(40):
            client.grant(f"user-{n}", 5)
    router = RedisCluster.from_url(cluster.url)
    try:
        sizes = [router.dbsize(target_nodes=node) for node in router.get_primaries()]
    finally:
        router.close()
    assert len(sizes) == 3 and min(sizes) > 0


def test_replicas_follow_their_primaries_and_authenticate_to_them() -> None:
    with EmbeddedCluster(primaries=2, replicas_per_primary=1, password="s3cret") as cluster:
        assert len(cluster.nodes) == 4
        for primary in cluster.primaries:
            (replica,) = cluster.replicas_of(primary)
            with redis.Redis(port=replica.port, password="s3cret") as node:
                info = node.info("replication")
            assert info["role"] == "slave" and info["master_port"] == primary.port
        ranges = _ranges(cluster.url)
        for url in cluster.urls:
            assert _ranges(url) == ranges  # every node tells the same map, replicas included
        assert [replicas for *_, replicas in ranges] == [[node.port] for node in cluster.replicas]
        with redis.Redis(port=cluster.primaries[0].port, password="s3cret") as node:
            key = next(f"kept-{n}" for n in range(100) if key_slot(f"kept-{n}".encode()) < 8192)
            node.set(key, "1")
            assert node.execute_command("WAIT", 1, 5000) == 1
        assert "s3cret" in cluster.url
        nodes = cluster.nodes
    assert not cluster.running
    assert all(_refused(node.port) for node in nodes)


def test_stop_stops_every_node_and_removes_their_folders() -> None:
    cluster = EmbeddedCluster(primaries=2).start()
    nodes = list(cluster.nodes)
    folders = [node.data_dir for node in nodes]
    cluster.stop()
    assert all(_refused(node.port) and not node.running for node in nodes)
    assert not any(folder.exists() for folder in folders)
    assert cluster.nodes == [] and not cluster.running
    with pytest.raises(EmbeddedServerError, match="not been started"):
        _ = cluster.url


def test_a_cluster_that_cannot_form_in_time_leaves_no_node_behind() -> None:
    before = set(children(os.getpid()))
    with pytest.raises(EmbeddedServerError, match="gave up waiting"):
        EmbeddedCluster(primaries=2, startup_timeout=0).start()
    assert set(children(os.getpid())) - before == set()


@pytest.mark.parametrize(
    ("primaries", "replicas", "message"),
    [
        (0, 0, "primaries must be 1..16384"),
        (16385, 0, "primaries must be 1..16384"),
        (True, 0, "primaries must be an int"),
        (3, -1, "replicas_per_primary must be 0 or more"),
        (3, 1.5, "replicas_per_primary must be an int"),
    ],
)
def test_a_cluster_that_cannot_be_is_refused_before_anything_starts(
    primaries: object, replicas: object, message: str
) -> None:
    before = set(children(os.getpid()))
    with pytest.raises(EmbeddedServerError, match=message):
        EmbeddedCluster(primaries, replicas)  # type: ignore[arg-type]
    assert set(children(os.getpid())) == before
