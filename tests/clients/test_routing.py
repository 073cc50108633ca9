"""Routing on one server and on a real three-primary cluster: no call re-sent, none lost."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
from redis.cluster import RedisCluster

from redcredit import AsyncRedCredit, BackendUnavailable, ConfigError, RedCredit, Settings
from redcredit.backends.slots import slot_of
from redcredit.errors import NotDurable
from tests.support.cluster import three_primaries


@contextmanager
def script_replies_dropped(target_port: int) -> Iterator[int]:
    """A proxy that cuts the connection in place of the reply to the first script call.

    The script has reached Redis and run: only its reply is lost. Everything
    else, before and after (a re-sent script too), passes both ways.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    dropped = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection(("127.0.0.1", target_port))
            with client, upstream:
                client.settimeout(5)
                while not stop.is_set():
                    request = client.recv(65536)
                    if not request:
                        break
                    upstream.sendall(request)
                    reply = upstream.recv(65536)
                    if b"EVALSHA" in request and not dropped.is_set():
                        dropped.set()
                        break  # the script ran; its reply never arrives
                    client.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        stop.set()
        thread.join(timeout=2)
        listener.close()


def _through(url: str, port: int) -> str:
    head, _, tail = url.rpartition(":")
    return f"{head}:{port}/{tail.split('/', 1)[1]}" if "/" in tail else f"{head}:{port}"


def test_a_reply_lost_on_a_torn_connection_is_not_resent(
    redis_url: str, settings: Settings
) -> None:
    probe = RedCredit(settings=settings.model_copy(update={"redis_url": redis_url}))
    probe.grant("torn", 50)
    probe.spend("torn", cost=0)  # loaded and its script cached: the next spend is one round trip
    upstream = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    with script_replies_dropped(upstream) as port:
        torn = settings.model_copy(update={"redis_url": _through(redis_url, port)})
        with RedCredit(settings=torn) as client, pytest.raises(BackendUnavailable):
            client.spend("torn", cost=7)
    # It ran once: redis-py's own retry would have sent it again and charged 14.
    assert probe.balance("torn").credits == 150 - 7
    probe.close()


async def test_a_reply_lost_on_a_torn_connection_is_not_resent_async(
    redis_url: str, settings: Settings
) -> None:
    async with AsyncRedCredit(settings=settings.model_copy(update={"redis_url": redis_url})) as ok:
        await ok.grant("torn-async", 50)
        await ok.spend("torn-async", cost=0)
        upstream = int(redis_url.rsplit(":", 1)[1].split("/")[0])
        with script_replies_dropped(upstream) as port:
            torn = settings.model_copy(update={"redis_url": _through(redis_url, port)})
            async with AsyncRedCredit(settings=torn) as client:
                with pytest.raises(BackendUnavailable):
                    await client.spend("torn-async", cost=7)
        assert (await ok.balance("torn-async")).credits == 150 - 7


async def test_a_cold_client_with_64_callers_on_three_primaries(
    three_primary_cluster_url: str, settings: Settings
) -> None:
    cold = settings.model_copy(update={"redis_url": three_primary_cluster_url})
    accounts = [f"cold-{n}" for n in range(64)]
    async with AsyncRedCredit(settings=cold) as client:
        results = await asyncio.gather(
            *(client.spend(a, cost=3, idempotency_key=f"k-{a}") for a in accounts),
            return_exceptions=True,
        )
        assert [r for r in results if isinstance(r, BaseException)] == []
        assert len(client.topology.coalescers) == 3  # every primary served its share
        again = await asyncio.gather(
            *(client.spend(a, cost=3, idempotency_key=f"k-{a}") for a in accounts)
        )
        assert all(r.replayed for r in again)
        balances = await asyncio.gather(*(client.balance(a) for a in accounts))
    assert {b.credits for b in balances} == {97}  # each charged exactly once


@pytest.mark.parametrize("mode", ["auto", "true", "seeds"])
def test_settings_alone_point_at_a_cluster(
    three_primary_cluster_url: str, settings: Settings, mode: str
) -> None:
    update: dict[str, object] = {"redis_url": three_primary_cluster_url}
    if mode == "true":
        update["redis_cluster"] = True
    if mode == "seeds":
        # The URL names a node that is gone; a seed node is alive.
        dead = socket.create_server(("127.0.0.1", 0))
        dead_port = dead.getsockname()[1]
        dead.close()
        live = three_primary_cluster_url.rsplit(":", 1)[1].split("/")[0]
        update["redis_url"] = _through(three_primary_cluster_url, dead_port)
        update["redis_seed_nodes"] = (f"127.0.0.1:{live}",)
    with RedCredit(settings=settings.model_copy(update=update)) as client:
        accounts = [f"by-settings-{mode}-{n}" for n in range(24)]
        for account in accounts:
            client.spend(account, cost=2)
        assert {client.balance(a).credits for a in accounts} == {98}
        assert client.topology.is_cluster
        assert (
            len(
                {
                    client.topology.node_of(
                        client.engine.keys.journal(client.engine.keys.partition(a))
                    )
                    for a in accounts
                }
            )
            == 3
        )
        assert isinstance(client.redis, RedisCluster)


def test_the_wrong_mode_is_a_clear_config_error(
    three_primary_cluster_url: str, redis_url: str, settings: Settings
) -> None:
    standalone = settings.model_copy(
        update={"redis_url": three_primary_cluster_url, "redis_cluster": False}
    )
    with RedCredit(settings=standalone) as client:
        accounts = [f"wrong-mode-{n}" for n in range(12)]  # some live on another node
        with pytest.raises(ConfigError, match="redis_cluster"):
            for account in accounts:
                client.spend(account, cost=1)
    forced = settings.model_copy(update={"redis_url": redis_url, "redis_cluster": True})
    with RedCredit(settings=forced) as client, pytest.raises(ConfigError, match="not a cluster"):
        client.spend("wrong-mode", cost=1)


async def test_a_cluster_client_passed_in_keeps_working(
    three_primary_cluster_url: str, settings: Settings
) -> None:
    sync_cluster = RedisCluster.from_url(three_primary_cluster_url)
    with RedCredit(sync_cluster, settings=settings) as client:
        client.spend("passed-in", cost=4)
        assert client.redis is sync_cluster
    assert sync_cluster.ping()  # not closed: it is the caller's
    sync_cluster.close()
    async_cluster = redis.asyncio.cluster.RedisCluster.from_url(three_primary_cluster_url)
    async with AsyncRedCredit(async_cluster, settings=settings) as aclient:
        results = await asyncio.gather(*(aclient.spend(f"passed-{n}", cost=1) for n in range(32)))
        assert all(r.credits_remaining == 99 for r in results)
    assert await async_cluster.ping()
    await async_cluster.aclose()


def test_durability_waits_on_the_node_that_ran_the_script(
    three_primary_cluster_url: str, settings: Settings
) -> None:
    # No primary here has a replica: a WAIT on the right node confirms none.
    replica = settings.model_copy(
        update={"redis_url": three_primary_cluster_url, "durability": "replica"}
    )
    with RedCredit(settings=replica) as client:
        with pytest.raises(NotDurable):
            client.spend("durable-replica", cost=1)
        # Applied all the same; a retry with a key would tell.
        assert client.balance("durable-replica").credits == 99


def test_durability_aof_on_a_cluster_node(settings: Settings) -> None:
    from redcredit.servers.redis import EmbeddedRedis

    with EmbeddedRedis(cluster=True, appendonly=True) as node:
        aof = settings.model_copy(update={"redis_url": node.url, "durability": "aof"})
        with RedCredit(settings=aof) as client:
            assert client.spend("durable-aof", cost=1).credits_remaining == 99


def _slot_owner_ids(client: redis.Redis) -> dict[int, str]:
    owners = {}
    for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
        for slot in range(start, end + 1):
            owners[slot] = primary[2].decode()
    return owners


def test_redirects_while_a_slot_moves_are_followed_once() -> None:
    """MOVED after a move, TRYAGAIN and ASK during it: every call applied exactly once."""
    with three_primaries() as nodes:
        settings = Settings(redis_url=nodes[0].url, free_credits=1_000, key_prefix="mv")
        clients = {node.port: redis.Redis(port=node.port) for node in nodes}
        with RedCredit(settings=settings) as rc:
            account = "moving"
            keys = rc.engine.keys
            slot = slot_of(keys.journal(keys.partition(account)))
            rc.spend(account, cost=1)  # the map is warm, the account's keys exist
            source_port = rc.topology.node_of(keys.journal(keys.partition(account)))[1]
            target_port = next(p for p in clients if p != source_port)
            source, target = clients[source_port], clients[target_port]
            source_id = source.execute_command("CLUSTER", "MYID").decode()
            target_id = target.execute_command("CLUSTER", "MYID").decode()
            target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            names = source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
            # Half moved: a script on both halves hears TRYAGAIN until the move ends.
            source.execute_command(
                "MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "KEYS", names[0]
            )

            def finish() -> None:
                time.sleep(0.3)
                rest = source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
                if rest:
                    source.execute_command(
                        "MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "KEYS", *rest
                    )
                for client in clients.values():
                    client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)

            mover = threading.Thread(target=finish)
            mover.start()
            started = time.monotonic()
            rc.spend(account, cost=1)  # retried through TRYAGAIN, then MOVED
            waited = time.monotonic() - started
            mover.join()
            assert waited >= 0.25
            assert rc.topology.node_of(keys.journal(keys.partition(account)))[1] == target_port
            assert rc.spend(account, cost=1).credits_remaining == 997
            assert _slot_owner_ids(target)[slot] == target_id
        for client in clients.values():
            client.close()


async def test_ready_reads_the_map_at_startup_or_says_redis_is_unreachable(
    three_primary_cluster_url: str, settings: Settings
) -> None:
    async with AsyncRedCredit(
        settings=settings.model_copy(update={"redis_url": three_primary_cluster_url})
    ) as client:
        assert client.topology.is_cluster is None  # auto: not asked yet
        await client.ready()
        assert client.topology.is_cluster is True
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    gone = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0"})
    async with AsyncRedCredit(settings=gone) as client:
        with pytest.raises(BackendUnavailable):
            await client.ready()
    with RedCredit(settings=gone) as sync_client, pytest.raises(BackendUnavailable):
        sync_client.ready()


def test_a_client_passed_in_does_not_resend_with_its_own_retries(
    redis_url: str, settings: Settings
) -> None:
    """redis-py's default retries would re-send the script whose reply was lost; not here."""
    probe = RedCredit(settings=settings.model_copy(update={"redis_url": redis_url}))
    probe.grant("torn-given", 50)
    probe.spend("torn-given", cost=0)
    upstream = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    with script_replies_dropped(upstream) as port:
        retrying = redis.Redis(
            port=port,
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 3),
            retry_on_error=[redis.exceptions.ConnectionError],
        )
        with RedCredit(retrying, settings=settings) as client, pytest.raises(BackendUnavailable):
            client.spend("torn-given", cost=7)
        retrying.close()
    assert probe.balance("torn-given").credits == 150 - 7
    probe.close()
