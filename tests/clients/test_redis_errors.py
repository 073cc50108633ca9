"""Every failure of redis-py reaches the caller as a typed redcredit error.

Replies are read by redis-py's own parser, as they would be off the wire;
the refusals that matter most (OOM, READONLY, MOVED, CLUSTERDOWN, a cluster
out of reach) come from real servers, through every way a call can go: the
coalescing async client, the async client one call at a time, the sync client.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.exceptions as rx
from redis._parsers import BaseParser

from redcredit import (
    AsyncRedCredit,
    BackendUnavailable,
    ConfigError,
    Lease,
    RedCredit,
    RedisAuthError,
    RedisCommandError,
    RedisRefused,
    Settings,
)
from redcredit.backends.redis import translated
from redcredit.clients.reservation import keep_renewing
from redcredit.servers.redis import EmbeddedRedis
from tests.support.refusing import Refusing, refusing_server

# What Redis sends, the class redis-py reads it as, and what redcredit raises.
REPLIES: list[tuple[str, type[Exception], type[Exception], str | None]] = [
    ("OOM command not allowed when used memory > 'maxmemory'.", rx.OutOfMemoryError, RedisRefused, "OOM"),
    ("READONLY You can't write against a read only replica.", rx.ReadOnlyError, RedisRefused, "READONLY"),
    ("LOADING Redis is loading the dataset in memory", rx.BusyLoadingError, RedisRefused, "LOADING"),
    ("BUSY Redis is busy running a script.", rx.ResponseError, RedisRefused, "BUSY"),
    ("MASTERDOWN Link with MASTER is down", rx.MasterDownError, RedisRefused, "MASTERDOWN"),
    ("CLUSTERDOWN Hash slot not served", rx.ClusterDownError, RedisRefused, "CLUSTERDOWN"),
    ("TRYAGAIN Multiple keys request during rehashing of slot", rx.TryAgainError, RedisRefused, "TRYAGAIN"),
    ("NOREPLICAS Not enough good replicas to write.", rx.ResponseError, RedisRefused, "NOREPLICAS"),
    ("MISCONF Redis is configured to save RDB snapshots", rx.ResponseError, RedisRefused, "MISCONF"),
    ("MOVED 3999 127.0.0.1:6381", rx.MovedError, RedisRefused, "MOVED"),
    ("ASK 3999 127.0.0.1:6381", rx.AskError, RedisRefused, "ASK"),
    ("WRONGPASS invalid username-password pair or user is disabled.", rx.AuthenticationError, RedisAuthError, "WRONGPASS"),
    ("NOAUTH Authentication required.", rx.AuthenticationError, RedisAuthError, "NOAUTH"),
    ("ERR invalid password", rx.AuthenticationError, RedisAuthError, "ERR"),
    ("ERR wrong number of arguments for 'auth' command", rx.AuthenticationWrongNumberOfArgsError, RedisAuthError, "ERR"),
    ("NOPERM User app has no permissions to run the 'evalsha' command", rx.NoPermissionError, RedisCommandError, "NOPERM"),
    ("CROSSSLOT Keys in request don't hash to the same slot", rx.ClusterCrossSlotError, RedisCommandError, "CROSSSLOT"),
    ("NOSCRIPT No matching script.", rx.NoScriptError, RedisCommandError, "NOSCRIPT"),
    ("EXECABORT Transaction discarded because of previous errors.", rx.ExecAbortError, RedisCommandError, "EXECABORT"),
    ("WRONGTYPE Operation against a key holding the wrong kind of value", rx.ResponseError, RedisCommandError, "WRONGTYPE"),
    ("ERR user_script:1: attempt to call a nil value", rx.ResponseError, RedisCommandError, "ERR"),
    ("ERR Error loading the extension. Please check the server logs.", rx.ModuleError, RedisCommandError, "ERR"),
    ("ERR no such fieldset", rx.NoSuchFieldsetError, RedisCommandError, "ERR"),
    ("ERR max number of clients reached", rx.ConnectionError, BackendUnavailable, None),
    ("ERR problem with LDAP service", rx.ExternalAuthProviderError, BackendUnavailable, None),
]  # fmt: skip

# Failures redis-py finds by itself, without a reply to read.
RAISED: list[tuple[Exception, type[Exception]]] = [
    (rx.TimeoutError("Timeout reading from socket"), BackendUnavailable),
    (rx.ConnectionError("Error 111 connecting to 127.0.0.1:6379"), BackendUnavailable),
    (rx.MaxConnectionsError("Too many connections"), BackendUnavailable),
    (rx.AuthorizationError("you are not authorized to view this ocsp certificate"), BackendUnavailable),
    (rx.InvalidResponse("Protocol Error: b'HTTP/1.1 400'"), BackendUnavailable),
    (rx.ClusterError("TTL exhausted."), BackendUnavailable),
    (rx.RedisClusterException("Redis Cluster cannot be connected."), BackendUnavailable),
    (rx.SlotNotCoveredError('Slot "12" is not covered by the cluster.'), BackendUnavailable),
    (rx.CrossSlotTransactionError("all keys must map to the same slot"), RedisCommandError),
    (rx.InvalidPipelineStack("the pipeline is not in a transaction"), RedisCommandError),
    (rx.DataError("Invalid input of type: 'NoneType'"), RedisCommandError),
    (rx.WatchError("Watched variable changed."), RedisCommandError),
    (rx.PubSubError("no subscription"), RedisCommandError),
    (rx.LockError("Cannot release an unlocked lock"), RedisCommandError),
    (rx.LockNotOwnedError("Cannot release a lock that's no longer owned"), RedisCommandError),
]  # fmt: skip


@pytest.mark.parametrize(("reply", "read_as", "raised", "kind"), REPLIES)
def test_every_reply_of_redis_is_typed(
    reply: str, read_as: type[Exception], raised: type[Exception], kind: str | None
) -> None:
    error = BaseParser.parse_error(reply)
    assert type(error) is read_as
    typed = translated(error)
    assert type(typed) is raised
    assert getattr(typed, "kind", None) == kind
    # Redis's own words, its code first (redis-py strips the codes it maps).
    code, _, said = reply.partition(" ")
    assert (said if kind is None else f"{code} {said}") in str(typed)


def test_refusals_for_now_and_logins_refused_are_outages_and_nothing_else_is() -> None:
    assert issubclass(RedisRefused, BackendUnavailable)
    assert issubclass(RedisAuthError, BackendUnavailable)
    assert not issubclass(RedisCommandError, BackendUnavailable)
    assert not issubclass(RedisAuthError, ConfigError)


@pytest.mark.parametrize(("error", "raised"), RAISED, ids=lambda x: type(x).__name__)
def test_every_failure_of_redis_py_is_typed(error: Exception, raised: type[Exception]) -> None:
    assert isinstance(error, rx.RedisError | rx.RedisClusterException)
    typed = translated(error)
    assert type(typed) is raised
    assert str(error) in str(typed)


def test_the_tables_name_every_error_class_of_redis_py() -> None:
    named = {read_as for _, read_as, _, _ in REPLIES} | {type(e) for e, _ in RAISED}
    failures = {
        cls
        for _, cls in inspect.getmembers(rx, inspect.isclass)
        if issubclass(cls, rx.RedisError | rx.RedisClusterException)
        # Bases that redis-py never raises as such are named through their leaves.
        and cls not in (rx.RedisError, rx.ResponseError)
    }
    assert failures - named == set()


# --- a real server refusing ------------------------------------------------------------------------


def _own(settings: Settings, refusing: Refusing, **update: Any) -> Settings:
    return settings.model_copy(update={"redis_url": refusing.url, **update})


def _assert_refused(outcomes: list[Any], kind: str) -> None:
    assert outcomes, "nothing was tried"
    for outcome in outcomes:
        assert isinstance(outcome, RedisRefused), outcome
        assert outcome.kind == kind
        assert str(outcome).startswith(f"Redis refused the call for now: {kind} ")


async def _refusals(*calls: Any) -> list[Any]:
    return list(await asyncio.gather(*calls, return_exceptions=True))


@pytest.mark.parametrize("batch", [128, 1], ids=["coalesced", "one-at-a-time"])
async def test_the_async_client_raises_a_refusal_typed(
    refusing_redis: Refusing, settings: Settings, batch: int
) -> None:
    async with AsyncRedCredit(
        settings=_own(settings, refusing_redis, pipeline_max_batch=batch)
    ) as arc:
        await arc.spend("warm", cost=1)
        coalescers = list(arc.topology.coalescers.values())
        assert len(coalescers) == (0 if batch == 1 else 1)
        coalescer = coalescers[0] if coalescers else None
        with refusing_redis.refusing():
            alone = [await _refusals(arc.spend(account, cost=1)) for account in ("warm", "new")]
            before = (coalescer.round_trips, coalescer.calls) if coalescer else (0, 0)
            together = await _refusals(
                *(arc.spend("warm", cost=1) for _ in range(12)),
                *(arc.reserve("warm", 5) for _ in range(4)),
            )
            if coalescer is not None:
                # Most of them shared round trips, so the batch path answered too.
                assert coalescer.round_trips - before[0] < coalescer.calls - before[1]
        _assert_refused([*alone[0], *alone[1], *together], refusing_redis.kind)
        if refusing_redis.kind == "OOM":
            # Refused, not applied.
            assert (await arc.balance("warm")).credits == 99


def test_the_sync_client_raises_a_refusal_typed(
    refusing_redis: Refusing, settings: Settings
) -> None:
    with RedCredit(settings=_own(settings, refusing_redis)) as rc:
        rc.spend("warm", cost=1)
        outcomes: list[Any] = []
        with refusing_redis.refusing():
            calls: list[Callable[[], Any]] = [
                lambda: rc.spend("warm", cost=1),
                lambda: rc.spend("new", cost=1),
                lambda: rc.reserve("warm", 5),
            ]
            for call in calls:
                with pytest.raises(RedisRefused) as refused:
                    call()
                outcomes.append(refused.value)
        _assert_refused(outcomes, refusing_redis.kind)
        if refusing_redis.kind == "OOM":
            assert rc.balance("warm").credits == 99


async def test_a_lease_keeps_renewing_through_out_of_memory(settings: Settings) -> None:
    # OOM only: a replica synced from another primary has lost the hold itself.
    with refusing_server("OOM") as oom:
        async with AsyncRedCredit(settings=_own(settings, oom)) as arc:
            reservation = await arc.reserve("holder", 10, ttl=5)
            with oom.refusing(), pytest.raises(RedisRefused) as refused:
                await arc.extend(reservation, ttl=5)
            assert keep_renewing(refused.value, Lease(reservation, 5000))
            # Once memory is back, the same lease renews.
            assert (await arc.extend(reservation, ttl=5)).id == reservation.id


async def test_an_error_no_retry_mends_is_typed_and_stops_renewal(
    arc: AsyncRedCredit, redis_client: redis.Redis
) -> None:
    reservation = await arc.reserve("spoilt", 10, ttl=5)
    keys = arc.engine.keys.for_account("spoilt")
    # Not a sorted set any more: every script that reads the holds fails the same way.
    redis_client.delete(keys.holds)
    redis_client.set(keys.holds, "not a sorted set")
    with pytest.raises(RedisCommandError) as spoilt:
        await arc.extend(reservation, ttl=5)
    assert spoilt.value.kind == "WRONGTYPE"
    assert not isinstance(spoilt.value, BackendUnavailable)
    assert not keep_renewing(spoilt.value, Lease(reservation, 5000))


# --- clusters --------------------------------------------------------------------------------------


async def test_a_plain_client_on_a_cluster_node_is_told_to_say_cluster(
    three_primary_cluster_url: str,
) -> None:
    settings = Settings(free_credits=10)
    plain = redis.asyncio.Redis.from_url(three_primary_cluster_url)
    async with AsyncRedCredit(plain, settings=settings) as arc:
        outcomes = await _refusals(*(arc.spend(f"moved-{i}", cost=1) for i in range(12)))
    await plain.aclose()
    moved = [o for o in outcomes if isinstance(o, Exception)]
    # A third of the slots live on the node asked, the rest elsewhere.
    assert 0 < len(moved) < len(outcomes)
    assert all(isinstance(o, ConfigError) and "redis_cluster" in str(o) for o in moved)


async def test_a_cluster_that_cannot_serve_raises_typed_errors(
    redis_factory: Callable[..., EmbeddedRedis],
) -> None:
    settings = Settings(free_credits=10)
    half = redis_factory(cluster=True, cluster_slots=range(100))
    # Asked directly, the node says the cluster is down; a cluster client
    # finds the slots uncovered before it asks.
    async with AsyncRedCredit(half.url, settings=settings) as arc:
        _assert_refused(await _refusals(arc.spend("x", cost=1)), "CLUSTERDOWN")
    cluster = redis.asyncio.RedisCluster.from_url(half.url, require_full_coverage=False)
    async with AsyncRedCredit(cluster, settings=settings) as arc:
        _assert_refused(await _refusals(arc.spend("x", cost=1)), "CLUSTERDOWN")
    await cluster.aclose()

    whole = redis_factory(cluster=True)
    clients = redis.asyncio.RedisCluster.from_url(whole.url), redis.RedisCluster.from_url(whole.url)
    async with AsyncRedCredit(clients[0], settings=settings) as arc:
        with RedCredit(clients[1], settings=settings) as rc:
            await arc.spend("x", cost=1)
            rc.spend("x", cost=1)
            whole.stop()
            with pytest.raises(BackendUnavailable, match="unreachable"):
                await arc.spend("x", cost=1)
            with pytest.raises(BackendUnavailable, match="unreachable"):
                rc.spend("x", cost=1)
    await clients[0].aclose()
    clients[1].close()
