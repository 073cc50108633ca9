"""How to reach each node: connection options, seed nodes, and reading the slot map.

What the routers of :mod:`.topology` were given (a URL, a client, a cluster
client) comes down to the same thing here: options for a connection pool per
node, the nodes to ask first, and whether the server is a cluster.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.exceptions import NoPermissionError, ResponseError

from ..config import Settings
from ..errors import ConfigError
from .redis import connection_options, require_url, url_options
from .slots import Address, SlotMap

__all__ = [
    "AsyncNodePlan",
    "NodePlan",
    "candidates",
    "cluster_options",
    "map_from",
    "read_without_slots",
]


class NodePlan:
    """What the router was given: how to connect, where to start, and the mode."""

    def __init__(self, settings: Settings, source: Any) -> None:
        self.settings = settings
        self.mode: str = _mode(settings.redis_cluster)
        self.shared_pool: Any = None  # a standalone client's pool, the user's
        self.kwargs: dict[str, Any] = {}
        self.seeds: list[Address] = []
        self.url: str | None = None
        if source is None or isinstance(source, str):
            self.url = url = source if source is not None else require_url(settings)
            self.kwargs = url_options(url, asyncio_=self._asyncio)
            self.seeds = [self._own_address(self.kwargs)]
            self.seeds += [_host_port(node) for node in settings.redis_seed_nodes]
            if "path" in self.kwargs:  # a unix socket: one server, never a cluster
                self.mode = "standalone"
        elif _is_cluster_client(source):
            self.mode = "cluster"
            manager = source.nodes_manager
            self.kwargs = _connection_kwargs(manager.connection_kwargs, asyncio_=self._asyncio)
            self.seeds = [(node.host, int(node.port)) for node in manager.startup_nodes.values()]
        else:
            self.mode = "standalone"
            self.shared_pool = source.connection_pool
            self.seeds = [self._own_address(source.connection_pool.connection_kwargs)]

    _asyncio = False

    @staticmethod
    def _own_address(kwargs: dict[str, Any]) -> Address:
        if "path" in kwargs:
            return (f"unix:{kwargs['path']}", 0)
        host = kwargs.get("host", "localhost")
        port = int(kwargs.get("port", 6379))
        return (str(host), port)

    def pool_options(self, address: Address) -> dict[str, Any]:
        options = {**connection_options(self.settings), **self.kwargs}
        options.pop("retry", None)
        options.setdefault("max_connections", self.settings.redis_max_connections)
        if "path" not in options:
            options["host"], options["port"] = address
        return options


class AsyncNodePlan(NodePlan):
    _asyncio = True


def _mode(setting: object) -> str:
    if setting == "auto":
        return "auto"
    return "cluster" if setting is True else "standalone"


def _is_cluster_client(source: object) -> bool:
    return isinstance(source, (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster))


def _host_port(node: str) -> Address:
    host, _, port = node.rpartition(":")
    return (host.strip("[]"), int(port))


def _connection_kwargs(kwargs: dict[str, Any], *, asyncio_: bool) -> dict[str, Any]:
    """What a cluster client keeps for its nodes, cut to what one node's connection takes."""
    default = redis.asyncio.Connection if asyncio_ else redis.Connection
    cls = kwargs.get("connection_class", default)
    accepted = {
        name
        for klass in cls.__mro__
        if "__init__" in vars(klass)
        for name in inspect.signature(vars(klass)["__init__"]).parameters
    }
    kept = {k: v for k, v in kwargs.items() if k in accepted and k not in ("host", "port", "self")}
    if "connection_class" in kwargs:
        kept["connection_class"] = cls
    return kept


def cluster_options(options: dict[str, Any]) -> dict[str, Any]:
    dropped = ("host", "port", "db", "path", "max_connections")
    return {k: v for k, v in options.items() if k not in dropped}


def candidates(seeds: Sequence[Address], current: SlotMap | None) -> list[Address]:
    # The nodes known from the last map first: a seed may have left the cluster.
    known = current.primaries if current is not None else []
    return list(dict.fromkeys([*known, *seeds]))


def read_without_slots(plan: NodePlan, error: ResponseError) -> None:
    """CLUSTER SLOTS refused: a server that is no cluster node, or an ACL that forbids asking.

    Under ``auto`` either means one server (a cluster node that redirects
    later says so, naming the setting); under ``true`` the first is a
    misconfiguration. Anything else is raised.
    """
    disabled = "cluster support disabled" in str(error).lower()
    if disabled and plan.mode == "cluster":
        raise ConfigError(
            "redis_cluster is true, but this Redis is not a cluster node (it has cluster "
            "support disabled): set redis_cluster to auto or false"
        ) from error
    if plan.mode == "auto" and (disabled or isinstance(error, NoPermissionError)):
        plan.mode = "standalone"
        return
    raise error


def map_from(plan: NodePlan, address: Address, cluster_slots: Any) -> SlotMap:
    if cluster_slots is None:
        return SlotMap.single(address)
    plan.mode = "cluster"
    try:
        return SlotMap.from_cluster_slots(cluster_slots, address[0])
    except ValueError as exc:
        # A cluster still forming, or one that lost a shard: nothing can run yet.
        raise redis.exceptions.ClusterDownError(f"CLUSTERDOWN {exc}") from exc
