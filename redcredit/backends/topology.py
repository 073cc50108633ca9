"""Routing script calls to the node that owns their keys: one Redis, or a Redis Cluster.

The same router serves both: a single node is a cluster whose every slot is
one address. Whether the server is a cluster is configured
(``redis_cluster``) or, by default, asked of the server on first use; the
slot map is read before the first call goes out, so a cold client with many
callers sends none of them to the wrong node.

Calls are never re-sent once they may have run (see :mod:`.channel`). What
is followed or retried, within ``redis_retry_deadline``: MOVED (the map is
updated), ASK (the importing node is asked, once per redirect), TRYAGAIN,
CLUSTERDOWN, READONLY and LOADING (the node refused before running
anything), and a node that could not be connected to (nothing was sent). On
one server only the last is tried again: a refusal there will not change
within a second, and a redirect means the setting is wrong (``ConfigError``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Final

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.exceptions import AskError, RedisError, ResponseError

from ..config import Settings
from ..core.engine import ScriptCall, check_durable
from ..errors import ConfigError, RedCreditError
from .channel import NotSent, round_trip, round_trip_async
from .coalesce import Coalescer
from .nodes import (
    AsyncNodePlan,
    NodePlan,
    candidates,
    cluster_options,
    map_from,
    read_without_slots,
)
from .redis import translated
from .slots import Address, Route, SlotMap, slot_of

__all__ = ["AsyncTopology", "Topology", "redirected_as_one_server"]

_ROUND_TRIPS_IN_FLIGHT: Final = 4


Source = str | redis.Redis | redis.cluster.RedisCluster | None
AsyncSource = str | redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster | None


class Topology:
    """The synchronous router, for the sync client, the syncer and the commands."""

    def __init__(self, settings: Settings, source: Source = None) -> None:
        self._plan = NodePlan(settings, source)
        self._deadline_s = settings.redis_retry_deadline.total_seconds()
        self._pools: dict[Address, redis.ConnectionPool] = {}
        self._map: SlotMap | None = None
        self._stale = False
        self._refreshed_at = 0.0
        self._lock = threading.Lock()
        self._generic: redis.Redis | redis.cluster.RedisCluster | None = None

    # -- the map -----------------------------------------------------------------------

    @property
    def is_cluster(self) -> bool:
        self.slot_map()
        return self._plan.mode == "cluster"

    def slot_map(self) -> SlotMap:
        """The current map, read from the server first if need be (NotSent if unreachable)."""
        current = self._map
        if current is not None and not self._stale:
            return current
        with self._lock:
            if self._map is None or self._stale:
                self._load()
        assert self._map is not None
        return self._map

    def ready(self) -> None:
        """Asks the server what it is and reads its map now; BackendUnavailable if unreachable."""
        try:
            self.refresh()
        except NotSent as exc:
            raise translated(exc.error) from exc.error

    def refresh(self) -> SlotMap:
        self._stale = True
        return self.slot_map()

    def refresh_later(self) -> None:
        """The map is read again before the next call goes out (a node refused or failed)."""
        self._stale = True

    @property
    def retry_deadline_s(self) -> float:
        return self._deadline_s

    def _load(self) -> None:
        error: RedisError | OSError | None = None
        for address in candidates(self._plan.seeds, self._map):
            try:
                client = self.client(address)
                slots = None
                if self._plan.mode != "standalone":
                    try:
                        slots = client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
                    except ResponseError as exc:
                        read_without_slots(self._plan, exc)
                self._map = map_from(self._plan, address, slots)
            except (RedisError, OSError) as exc:
                error = exc
                continue
            self._stale = False
            self._refreshed_at = time.monotonic()
            return
        raise NotSent(error if error is not None else RedisError("no Redis node to ask"))

    def pool(self, address: Address) -> redis.ConnectionPool:
        if self._plan.shared_pool is not None:
            return self._plan.shared_pool  # type: ignore[no-any-return]
        pool = self._pools.get(address)
        if pool is None:
            settings = self._plan.settings
            pool = self._pools.setdefault(
                address,
                redis.BlockingConnectionPool(  # type: ignore[no-untyped-call]
                    timeout=settings.redis_connect_timeout.total_seconds(),
                    **self._plan.pool_options(address),
                ),
            )
        return pool

    def client(self, address: Address) -> redis.Redis:
        """A plain client of one node, for commands other than scripts."""
        return redis.Redis(connection_pool=self.pool(address))

    def node_of(self, key: str) -> Address:
        return self.slot_map().owner(slot_of(key))

    def primaries(self) -> list[Address]:
        return self.slot_map().primaries

    def generic(self) -> redis.Redis | redis.cluster.RedisCluster:
        """A redis-py client for any other command: plain for one node, cluster-aware for many."""
        if self._generic is None:
            if self.is_cluster:
                self._generic = redis.cluster.RedisCluster(
                    startup_nodes=[
                        redis.cluster.ClusterNode(h, p)  # type: ignore[no-untyped-call]
                        for h, p in self.primaries()
                    ],
                    **cluster_options(self._plan.pool_options(self.primaries()[0])),
                )
            else:
                self._generic = self.client(self.primaries()[0])
        return self._generic

    # -- script calls ------------------------------------------------------------------

    def run_script(self, call: ScriptCall) -> Any:
        """The call's reply, from the node owning its keys; raises a redcredit error."""
        route = Route(call.keys[0], self._deadline_s)
        while True:
            try:
                node = route.node(self.slot_map())
                reply = round_trip(self.pool(node), [call], asking=route.asking is not None)[0]
            except NotSent as exc:
                pause = route.not_sent()
                if pause is None:
                    raise translated(exc.error) from exc.error
            except RedisError as exc:
                # Sent, and then the connection failed: it may have run. Not
                # re-sent; the node may be gone, so the map is read again.
                self._stale = True
                raise translated(exc) from exc
            else:
                pause = route.replied(reply, self._plan.mode, self._map)
                if pause is None:
                    return _result(self._plan.mode, call, reply)
            self._stale |= route.take_reread(self._refreshed_at)
            if pause:
                time.sleep(pause)

    def close(self) -> None:
        if isinstance(self._generic, redis.cluster.RedisCluster):
            self._generic.close()
        for pool in self._pools.values():
            pool.disconnect()
        self._pools.clear()


class AsyncTopology:
    """The asyncio router: concurrent calls are pipelined per node (see :mod:`.coalesce`)."""

    def __init__(self, settings: Settings, source: AsyncSource = None) -> None:
        self._plan = AsyncNodePlan(settings, source)
        self._deadline_s = settings.redis_retry_deadline.total_seconds()
        self._max_batch = settings.pipeline_max_batch
        self._pools: dict[Address, redis.asyncio.ConnectionPool] = {}
        self._coalescers: dict[Address, Coalescer] = {}
        self._map: SlotMap | None = None
        self._stale = False
        self._refreshed_at = 0.0
        self._loading: asyncio.Future[None] | None = None
        self._generic: redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster | None = None

    @property
    def is_cluster(self) -> bool | None:
        """None until the server was asked (``redis_cluster = "auto"``)."""
        return None if self._plan.mode == "auto" else self._plan.mode == "cluster"

    async def slot_map(self) -> SlotMap:
        current = self._map
        if current is not None and not self._stale:
            return current
        # One read for every caller waiting, and all of them resume together
        # (a lock would let them out one by one, each alone in its round trip).
        if self._loading is None or self._loading.done():
            self._loading = asyncio.ensure_future(self._load())
        await asyncio.shield(self._loading)
        assert self._map is not None
        return self._map

    async def ready(self) -> None:
        """Asks the server what it is and reads its map now; BackendUnavailable if unreachable."""
        self._stale = True
        try:
            await self.slot_map()
        except NotSent as exc:
            raise translated(exc.error) from exc.error

    async def _load(self) -> None:
        error: RedisError | OSError | None = None
        for address in candidates(self._plan.seeds, self._map):
            client = redis.asyncio.Redis(connection_pool=self.pool(address))
            try:
                slots = None
                if self._plan.mode != "standalone":
                    try:
                        slots = await client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
                    except ResponseError as exc:
                        read_without_slots(self._plan, exc)
                self._map = map_from(self._plan, address, slots)
            except (RedisError, OSError) as exc:
                error = exc
                continue
            self._stale = False
            self._refreshed_at = time.monotonic()
            return
        raise NotSent(error if error is not None else RedisError("no Redis node to ask"))

    def pool(self, address: Address) -> redis.asyncio.ConnectionPool:
        if self._plan.shared_pool is not None:
            return self._plan.shared_pool  # type: ignore[no-any-return]
        pool = self._pools.get(address)
        if pool is None:
            settings = self._plan.settings
            pool = self._pools.setdefault(
                address,
                redis.asyncio.BlockingConnectionPool(
                    timeout=settings.redis_connect_timeout.total_seconds(),
                    **self._plan.pool_options(address),
                ),
            )
        return pool

    def _coalescer(self, address: Address) -> Coalescer:
        coalescer = self._coalescers.get(address)
        if coalescer is None:
            pool = self.pool(address)

            async def send(calls: list[ScriptCall]) -> list[Any]:
                return await round_trip_async(pool, calls)

            # One budget of round trips in flight for the whole client, shared by
            # the nodes: four on one server, one per node on three primaries.
            # Spread thinner, every node's batches would shrink and the client
            # pay a round trip for a few calls (bench: cluster section).
            nodes = len(self._map.primaries) if self._map is not None else 1
            in_flight = max(1, _ROUND_TRIPS_IN_FLIGHT // nodes)
            coalescer = self._coalescers.setdefault(
                address, Coalescer(send, max_batch=self._max_batch, max_in_flight=in_flight)
            )
        return coalescer

    @property
    def coalescers(self) -> dict[Address, Coalescer]:
        return self._coalescers

    def generic(self) -> redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster:
        """A redis-py client for any other command: plain for one node, cluster-aware for many.

        Under ``redis_cluster = "auto"`` the server is asked first, once, with a
        short blocking call: this is for tests and admin code, not the hot path.
        """
        if self._generic is None:
            if self._plan.mode == "auto":
                probe = Topology(self._plan.settings, self._plan.url)
                try:
                    self._plan.mode = "cluster" if probe.is_cluster else "standalone"
                except NotSent as exc:
                    raise translated(exc.error) from exc.error
                finally:
                    probe.close()
            seed = self._plan.seeds[0]
            if self._plan.mode == "cluster":
                self._generic = redis.asyncio.cluster.RedisCluster(
                    startup_nodes=[
                        redis.asyncio.cluster.ClusterNode(h, p) for h, p in self._plan.seeds
                    ],
                    **cluster_options(self._plan.pool_options(seed)),
                )
            else:
                self._generic = redis.asyncio.Redis(connection_pool=self.pool(seed))
        return self._generic

    async def run_script(self, call: ScriptCall) -> Any:
        route = Route(call.keys[0], self._deadline_s)
        while True:
            try:
                node = route.node(await self.slot_map())
                if route.asking is not None:
                    reply = (await round_trip_async(self.pool(node), [call], asking=True))[0]
                elif self._max_batch > 1:
                    reply = await self._coalescer(node).run(call)
                else:
                    reply = (await round_trip_async(self.pool(node), [call]))[0]
            except NotSent as exc:
                pause = route.not_sent()
                if pause is None:
                    raise translated(exc.error) from exc.error
            except RedisError as exc:
                self._stale = True
                raise translated(exc) from exc
            else:
                pause = route.replied(reply, self._plan.mode, self._map)
                if pause is None:
                    return _result(self._plan.mode, call, reply)
            self._stale |= route.take_reread(self._refreshed_at)
            if pause:
                await asyncio.sleep(pause)

    async def close(self) -> None:
        if self._generic is not None and self._plan.shared_pool is None:
            await self._generic.aclose()
        for pool in self._pools.values():
            await pool.disconnect()
        self._pools.clear()
        self._coalescers.clear()


# -- shared ------------------------------------------------------------------------------


def redirected_as_one_server() -> ConfigError:
    """What a redirect from a server taken for one node means: the setting is wrong."""
    return ConfigError(
        "this Redis is a node of a Redis Cluster (it answered MOVED): set "
        "redis_cluster to auto or true, or pass a cluster client"
    )


def _result(mode: str, call: ScriptCall, reply: Any) -> Any:
    """The script's reply, or the redcredit error for a refusal; durable waits checked."""
    script_reply, confirmation = reply if call.wait is not None else (reply, None)
    for outcome in (script_reply, confirmation):
        if isinstance(outcome, AskError) and mode == "standalone":
            raise redirected_as_one_server() from outcome
        if isinstance(outcome, RedisError):
            raise translated(outcome) from outcome
        if isinstance(outcome, Exception):
            raise RedCreditError(f"Redis call failed: {outcome}") from outcome
    if call.wait is not None:
        check_durable(call, script_reply, confirmation)
    return script_reply
